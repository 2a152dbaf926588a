//! Fault injection: the real `elb-exporter` binary against the simulated cloud (`CloudSim::inject`,
//! removed load balancers and listeners, hostile answers) and the fake Kubernetes API server (outages,
//! dropped watches, 410 Gone, restarts), asserting only what a user sees: `/metrics`, `/healthz`,
//! `/readyz`, the process staying up, the requests the cloud received, and the log.
//!
//! Every scenario uses short intervals and small retry backoffs so it finishes in seconds; the fault
//! matrix in docs/RELIABILITY.md names the test that proves each row.

mod common;

use common::*;
use elb_exporter::demo::service;
use elb_exporter::sim::cloud::{
    CloudSim, Fault, LbKind, SimApi, SimConfig, SimListener, SimRequest, datapoint_value,
};
use serde_json::json;
use std::time::{Duration, Instant};

const ID: &str = "kubernetes.io/elb.id";
const CLASS: &str = "kubernetes.io/elb.class";
/// Dedicated ELB with listeners on 80 and 443.
const ELB_A: &str = "a1111111-1111-4111-8111-111111111111";
/// Shared ELB with a listener on 8080.
const ELB_B: &str = "b2222222-2222-4222-8222-222222222222";
const L_A80: &str = "a0000000-0000-4000-8000-000000000080";
const L_A443: &str = "a0000000-0000-4000-8000-000000000443";
const L_B8080: &str = "b0000000-0000-4000-8000-000000008080";
const LISTENERS: [&str; 3] = [L_A80, L_A443, L_B8080];
const METRICS: [&str; 2] = ["m1_cps", "m7_in_Bps"];
/// Collection cycles a failed collection keeps serving the last good values.
const STALE: u32 = 2;

const CES_500: &str = r#"{"error_code":"ces.0500","error_msg":"Internal service error."}"#;

/// The simulated cloud with two ELBs, and two annotated Services using all three listeners:
/// `default/web` (dedicated ELB A, ports 80 and 443) and `shop/cart` (shared ELB B, port 8080).
async fn fixture() -> World {
    fixture_with(SimConfig::default()).await
}

async fn fixture_with(cfg: SimConfig) -> World {
    let w = World::start(cfg).await;
    w.sim.add_loadbalancer(ELB_A, LbKind::Dedicated);
    w.sim.add_loadbalancer(ELB_B, LbKind::Shared);
    w.sim
        .add_listener(ELB_A, SimListener::new(L_A80, "k8s_TCP_80", "TCP", 80));
    w.sim
        .add_listener(ELB_A, SimListener::new(L_A443, "k8s_TCP_443", "TCP", 443));
    w.sim.add_listener(
        ELB_B,
        SimListener::new(L_B8080, "k8s_HTTP_8080", "HTTP", 8080),
    );
    w.cluster.apply(service(
        "default",
        "web",
        &[(ID, ELB_A), (CLASS, "performance")],
        &[80, 443],
    ));
    w.cluster.apply(service(
        "shop",
        "cart",
        &[(ID, ELB_B), (CLASS, "union")],
        &[8080],
    ));
    w
}

/// Short intervals and small backoffs; `collection`/`cloud`/`rest` add keys to those sections.
fn fast(collection: &str, cloud: &str, rest: &str) -> String {
    format!(
        "collection:\n  interval: \"1s\"\n  metrics: [m1_cps, m7_in_Bps]\n  stale_intervals: {STALE}\n{collection}\
         cloud:\n  retry:\n    initial_backoff: \"10ms\"\n    max_backoff: \"100ms\"\n    max_attempts: 2\n{cloud}{rest}"
    )
}

/// Edits `global.scrape_batch_size` into a generated config.
fn batch_size(n: usize) -> impl FnOnce(String) -> String {
    move |t: String| {
        t.replace(
            "  prefix: \"huaweicloud\"\n",
            &format!("  prefix: \"huaweicloud\"\n  scrape_batch_size: {n}\n"),
        )
    }
}

fn num(body: &str, series: &str) -> f64 {
    sample(body, &format!("{series} ")).unwrap_or(0.0)
}

fn failures(body: &str, api: &str, code: &str) -> f64 {
    num(
        body,
        &format!("elb_exporter_cloud_request_failures_total{{api=\"{api}\",code=\"{code}\"}}"),
    )
}

fn cycles(body: &str, result: &str) -> f64 {
    num(
        body,
        &format!("elb_exporter_collections_total{{result=\"{result}\"}}"),
    )
}

fn problems(body: &str, reason: &str) -> f64 {
    num(
        body,
        &format!("elb_exporter_discovery_problems{{reason=\"{reason}\"}}"),
    )
}

/// Cloud series lines (`huaweicloud_sys_elb_listener_*`).
fn cloud_lines(body: &str) -> Vec<&str> {
    body.lines()
        .filter(|l| l.starts_with("huaweicloud_sys_elb_listener_"))
        .collect()
}

/// Whether any cloud series carries this Service's labels.
fn exports(body: &str, ns: &str, svc: &str) -> bool {
    let needle = format!("{{namespace=\"{ns}\",service=\"{svc}\",");
    cloud_lines(body).iter().any(|l| l.contains(&needle))
}

/// Whether a cloud series of this listener exists.
fn exports_listener(body: &str, listener: &str) -> bool {
    let needle = format!("lbaas_listener_id=\"{listener}\"");
    cloud_lines(body).iter().any(|l| l.contains(&needle))
}

fn ces(sim: &CloudSim) -> Vec<SimRequest> {
    sim.requests()
        .into_iter()
        .filter(|r| r.api == SimApi::Ces)
        .collect()
}

fn value_of(body: &str, metric: &str, listener: &str) -> Option<f64> {
    let family = format!("huaweicloud_sys_elb_listener_{metric}");
    samples_where(body, &family, &[("lbaas_listener_id", listener)])
        .first()
        .map(|(_, _, v)| *v)
}

/// Whether `v` is what the simulator serves for this listener and metric in the newest minute (or the
/// one before, if the minute turned between collection and assertion).
fn is_sim_value(sim: &CloudSim, listener: &str, metric: &str, v: f64) -> bool {
    let newest = sim.newest_minute(now_ms());
    [newest, newest - 60_000, newest - 120_000]
        .iter()
        .any(|m| datapoint_value(listener, metric, *m) == v)
}

/// Waits until the exporter is ready, `up` is 1 and all six fixture series are exported.
async fn steady(e: &Exporter) {
    e.wait_ready().await;
    let ok = wait_for(Duration::from_secs(10), || async {
        let b = e.metrics().await;
        num(&b, "elb_exporter_up") == 1.0 && cloud_lines(&b).len() == 6
    })
    .await;
    assert!(
        ok,
        "no steady state: up 1 and 6 series\n{}\nlogs:\n{}",
        e.metrics().await,
        e.logs()
    );
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

async fn assert_alive(e: &mut Exporter) {
    assert!(e.alive(), "the exporter exited; logs:\n{}", e.logs());
    assert_eq!(e.get("/healthz").await.0, 200, "/healthz");
}

// ---------------------------------------------------------------------------------------------------------
// Cloud faults

/// CES fails (500s, then throttling) for five cycles: `up` 0, failures counted by code, the last good
/// values served until they are `stale_intervals` × interval old, then dropped; after the faults, `up` 1
/// and the series come back. `/readyz` stays 200 so Prometheus keeps scraping `up 0`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ces_outage_serves_last_values_for_stale_intervals_then_drops_them_and_recovers() {
    let w = fixture().await;
    let mut e = w.exporter(&fast("", "", ""));
    steady(&e).await;
    let before = e.metrics().await;
    let f0 = cycles(&before, "failure");
    let success_ts = num(
        &before,
        "elb_exporter_last_collection_success_timestamp_seconds",
    );

    // One batch per cycle, two attempts per failed call: 10 faults = 5 failed cycles.
    w.sim.inject(
        SimApi::Ces,
        Fault::Status {
            status: 500,
            body: CES_500.into(),
            count: 6,
        },
    );
    w.sim.inject(
        SimApi::Ces,
        Fault::Throttle {
            retry_after_secs: None,
            count: 4,
        },
    );

    // (failed cycles so far, up, cloud series, seconds since the last success) at every scrape until the
    // exporter is up again.
    let mut seen: Vec<(u32, f64, usize, f64)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let b = e.metrics().await;
        let k = (cycles(&b, "failure") - f0) as u32;
        let up = num(&b, "elb_exporter_up");
        let age = unix_now() - success_ts;
        seen.push((k, up, cloud_lines(&b).len(), age));
        if k >= 1 {
            assert_eq!(e.get("/readyz").await.0, 200, "ready during a cloud outage");
            assert!(
                num(&b, "elb_exporter_last_collection_success_timestamp_seconds")
                    <= success_ts + 2.0
                    || up == 1.0
            );
        }
        if k >= 5 && up == 1.0 && cloud_lines(&b).len() == 6 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no recovery in time; seen (failed cycles, up, series, age): {seen:?}\nlogs:\n{}",
            e.logs()
        );
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    // The bound is an age: STALE intervals (1 s each) after the values were fetched, which the last
    // success timestamp marks (to within the end of that cycle).
    let bound = f64::from(STALE);
    let outage = || seen.iter().filter(|s| s.0 >= 1 && s.1 == 0.0);
    assert!(
        outage().filter(|s| s.3 < bound - 0.5).count() > 0,
        "no scrape early in the outage: {seen:?}"
    );
    assert!(
        outage().filter(|s| s.3 < bound - 0.5).all(|s| s.2 == 6),
        "last good values kept within the bound: {seen:?}"
    );
    assert!(
        outage().filter(|s| s.3 > bound + 0.5).all(|s| s.2 == 0),
        "nothing served past the bound: {seen:?}"
    );
    assert!(
        outage().any(|s| s.3 > bound + 0.5),
        "the outage outlasted the bound: {seen:?}"
    );

    let b = e.metrics().await;
    assert_eq!(failures(&b, "ces_batch_query", "500"), 6.0, "{b}");
    assert_eq!(failures(&b, "ces_batch_query", "429"), 4.0, "{b}");
    assert_eq!(cycles(&b, "failure") - f0, 5.0);
    assert!(num(&b, "elb_exporter_last_collection_success_timestamp_seconds") > success_ts);
    for l in LISTENERS {
        for m in METRICS {
            let v = value_of(&b, m, l).unwrap_or_else(|| panic!("{l} {m} after recovery"));
            assert!(is_sim_value(&w.sim, l, m, v), "{l} {m} = {v}");
        }
    }
    let statuses: Vec<u16> = ces(&w.sim)
        .iter()
        .map(|r| r.status)
        .filter(|s| *s != 200)
        .collect();
    assert_eq!(statuses, [500, 500, 500, 500, 500, 500, 429, 429, 429, 429]);
    assert!(e.logs().contains("collection failed in part"));
    assert_alive(&mut e).await;
}

/// Transient failures are retried inside the cycle, which then succeeds (`up` stays 1): 503, 429
/// without and with `Retry-After` (honoured), a throttling code on a non-429 status, a truncated 2xx
/// body, and a timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_ces_failures_are_retried_within_the_cycle() {
    let w = fixture().await;
    // A cycle is cut after its interval: 2 s leaves room for a retry after `Retry-After: 1`.
    let mut e = w.exporter(
        &fast("", "  request_timeout: \"400ms\"\n", "")
            .replace("interval: \"1s\"", "interval: \"2s\""),
    );
    steady(&e).await;

    let cases: Vec<(&str, Fault, &str)> = vec![
        (
            "503",
            Fault::Status {
                status: 503,
                body: r#"{"error_code":"ces.0503","error_msg":"busy"}"#.into(),
                count: 1,
            },
            "503",
        ),
        (
            "429",
            Fault::Throttle {
                retry_after_secs: None,
                count: 1,
            },
            "429",
        ),
        (
            "APIG.0308 on 400",
            Fault::Status {
                status: 400,
                body: r#"{"error_code":"APIG.0308","error_msg":"The request is throttled."}"#
                    .into(),
                count: 1,
            },
            "429",
        ),
        ("truncated", Fault::Malformed { count: 1 }, "malformed"),
        (
            "timeout",
            Fault::Delay {
                delay: Duration::from_millis(900),
                count: 1,
            },
            "timeout",
        ),
        (
            "429 Retry-After: 1",
            Fault::Throttle {
                retry_after_secs: Some(1),
                count: 1,
            },
            "429",
        ),
    ];
    for (what, fault, code) in cases {
        let b = e.metrics().await;
        let (ok0, bad0, code0) = (
            cycles(&b, "success"),
            cycles(&b, "failure"),
            failures(&b, "ces_batch_query", code),
        );
        let injected = now_ms();
        w.sim.inject(SimApi::Ces, fault);
        // Two more successful cycles: the faulted one (retried) and a clean one after it.
        let ok = wait_for(Duration::from_secs(10), || async {
            cycles(&e.metrics().await, "success") >= ok0 + 2.0
        })
        .await;
        assert!(ok, "{what}: cycles did not go on; logs:\n{}", e.logs());
        let b = e.metrics().await;
        assert_eq!(
            cycles(&b, "failure"),
            bad0,
            "{what}: a retry saves the cycle"
        );
        assert_eq!(
            failures(&b, "ces_batch_query", code),
            code0 + 1.0,
            "{what}: counted as {code}"
        );
        assert_eq!(num(&b, "elb_exporter_up"), 1.0, "{what}");
        assert_eq!(cloud_lines(&b).len(), 6, "{what}");
        if what.contains("Retry-After") {
            // By arrival: the throttled request, then its retry no sooner than Retry-After allows.
            let mut reqs: Vec<SimRequest> = ces(&w.sim)
                .into_iter()
                .filter(|r| r.time_ms >= injected)
                .collect();
            reqs.sort_by_key(|r| r.time_ms);
            assert_eq!(reqs[0].status, 429, "{reqs:?}");
            let gap = reqs[1].time_ms - reqs[0].time_ms;
            assert!(gap >= 1000, "{what}: Retry-After honoured, gap {gap} ms");
        }
    }
    let logs = e.logs();
    assert!(logs.contains("cloud call failed, retrying"), "{logs}");
    assert_alive(&mut e).await;
}

/// 400, 403 and 404 are not retried: exactly one request for the failed call, the next CES call comes
/// with the next cycle; `up` is 0 for that cycle and 1 again after. A 401 is not retried either, and
/// pauses every cloud call (the AK is not locked by five bad signatures): the following cycles fail
/// without sending anything (such calls are logged, not counted as requests or failures).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_are_not_retried_and_401_pauses_cloud_calls() {
    let w = fixture().await;
    let mut e = w.exporter(&fast("", "", ""));
    steady(&e).await;
    let cases = [
        (
            400,
            r#"{"error_code":"ces.0014","error_msg":"Some content in message body is not correct"}"#,
        ),
        (
            403,
            r#"{"error_code":"ces.0002","error_msg":"Insufficient permissions"}"#,
        ),
        (
            404,
            r#"{"error_msg":"The API does not exist or has not been published in the environment","error_code":"APIGW.0101","request_id":"r"}"#,
        ),
    ];
    for (status, body) in cases {
        let b = e.metrics().await;
        let (ok0, bad0) = (cycles(&b, "success"), cycles(&b, "failure"));
        let code = status.to_string();
        let injected = now_ms();
        w.sim.inject(
            SimApi::Ces,
            Fault::Status {
                status,
                body: body.into(),
                count: 1,
            },
        );
        let ok = wait_for(Duration::from_secs(10), || async {
            let b = e.metrics().await;
            cycles(&b, "failure") > bad0 && cycles(&b, "success") > ok0
        })
        .await;
        assert!(
            ok,
            "{status}: a failed then a good cycle; logs:\n{}",
            e.logs()
        );
        let b = e.metrics().await;
        assert_eq!(cycles(&b, "failure"), bad0 + 1.0, "{status}");
        assert_eq!(failures(&b, "ces_batch_query", &code), 1.0, "{status}");
        let mut reqs: Vec<SimRequest> = ces(&w.sim)
            .into_iter()
            .filter(|r| r.time_ms >= injected)
            .collect();
        reqs.sort_by_key(|r| r.time_ms);
        assert_eq!(reqs[0].status, status, "{reqs:?}");
        assert_eq!(
            reqs.iter().filter(|r| r.status == status).count(),
            1,
            "{status}: one request"
        );
        let gap = reqs[1].time_ms - reqs[0].time_ms;
        assert!(
            gap >= 500,
            "{status}: not retried; the next call belongs to the next 1 s cycle ({gap} ms later)"
        );
    }

    // 401: one request, then a pause of every cloud call.
    let b = e.metrics().await;
    let bad0 = cycles(&b, "failure");
    let injected = now_ms();
    w.sim.inject(
        SimApi::Ces,
        Fault::Status {
            status: 401,
            body: r#"{"error_msg":"Incorrect IAM authentication information: verify aksk signature fail","error_code":"APIGW.0301","request_id":"r"}"#.into(),
            count: 1,
        },
    );
    let ok = wait_for(Duration::from_secs(10), || async {
        cycles(&e.metrics().await, "failure") >= bad0 + 4.0
    })
    .await;
    assert!(ok, "cycles go on failing; logs:\n{}", e.logs());
    let after: Vec<SimRequest> = w
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.time_ms >= injected)
        .collect();
    assert_eq!(
        after.len(),
        1,
        "one rejected request, then nothing: {after:?}"
    );
    assert_eq!(after[0].status, 401);
    let b = e.metrics().await;
    assert_eq!(failures(&b, "ces_batch_query", "401"), 1.0);
    // Calls not sent are not requests: no failure counted for them, the cycles fail.
    assert_eq!(
        num(
            &b,
            "elb_exporter_cloud_requests_total{api=\"ces_batch_query\"}"
        ),
        ces(&w.sim).len() as f64
    );
    assert_eq!(num(&b, "elb_exporter_up"), 0.0);
    assert_eq!(e.get("/readyz").await.0, 200);

    let logs = e.logs();
    for status in ["HTTP 400", "HTTP 401", "HTTP 403", "HTTP 404"] {
        assert!(
            !logs
                .lines()
                .any(|l| l.contains("retrying") && l.contains(status)),
            "{status} retried:\n{logs}"
        );
    }
    assert!(logs.contains("pausing cloud calls"), "{logs}");
    assert!(
        logs.contains("not sent: the credentials were rejected"),
        "{logs}"
    );
    assert_alive(&mut e).await;
}

/// A key CES rejects while IAM and ELB accept it (CES is its own simulator with the same AK and another
/// SK), e.g. a key revoked while the exporter runs, with the default concurrency (8) and six CES calls
/// per cycle: IAM and ELB accepting the key does not open the gate for CES, so the first CES call is a
/// lone probe; its 401 pauses every API, and later ELB or IAM successes do not reopen it. Over many
/// cycles the simulated gateway (which locks an AK after five consecutive bad signatures) sees exactly
/// one bad signature (never five within five minutes) and never locks; the exporter keeps serving with
/// `up` 0. (Behaviour across several cooldowns, which last minutes, is unit-tested with paused time in
/// `cloud::auth`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_secret_key_is_not_hammered_and_the_ak_is_not_locked() {
    let w = fixture().await;
    let ces_sim = CloudSim::new(SimConfig {
        sk: "AnotherSecretKey00000000000000000000000".into(),
        ..SimConfig::default()
    });
    let ces_addr = ces_sim.serve(loopback()).await.unwrap();
    let cloud_url = w.cloud_url.clone();
    // 3 listeners x 2 metrics in batches of 1: six CES calls per cycle, all wanting to go at once.
    let mut e = w.exporter_edited(&fast("", "", ""), |t| {
        batch_size(1)(t).replace(
            &format!("  ces: \"{cloud_url}\""),
            &format!("  ces: \"http://{ces_addr}\""),
        )
    });
    e.wait_ready().await;
    let ok = wait_for(Duration::from_secs(15), || async {
        cycles(&e.metrics().await, "failure") >= 5.0
    })
    .await;
    assert!(ok, "failing cycles go on; logs:\n{}", e.logs());
    // A new Service on a new ELB after the pause: the ELB API accepts the key, but its listing is not
    // sent while the gate is closed.
    let elb_c = "c3333333-3333-4333-8333-333333333333";
    w.sim.add_loadbalancer(elb_c, LbKind::Dedicated);
    w.sim.add_listener(
        elb_c,
        SimListener::new(
            "c0000000-0000-4000-8000-000000000080",
            "k8s_TCP_80",
            "TCP",
            80,
        ),
    );
    w.cluster.apply(service(
        "default",
        "late",
        &[(ID, elb_c), (CLASS, "performance")],
        &[80],
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let listings: Vec<_> = w
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.query.contains(elb_c))
        .collect();
    assert!(listings.is_empty(), "sent while paused: {listings:?}");
    let reqs = ces_sim.requests();
    assert!(reqs.iter().all(|r| r.status == 401), "{reqs:?}");
    let times: Vec<i64> = reqs.iter().map(|r| r.time_ms).collect();
    let worst = times
        .iter()
        .map(|t| {
            times
                .iter()
                .filter(|u| **u >= *t && **u - *t < 300_000)
                .count()
        })
        .max()
        .unwrap_or(0);
    assert!(worst < 5, "{worst} bad signatures within 5 minutes");
    assert_eq!(
        reqs.len(),
        1,
        "one probe, then a pause for every API: {} requests\nlogs:\n{}",
        reqs.len(),
        e.logs()
    );
    let b = e.metrics().await;
    assert_eq!(num(&b, "elb_exporter_up"), 0.0);
    assert_eq!(failures(&b, "ces_batch_query", "401"), 1.0, "{b}");
    assert_eq!(
        num(
            &b,
            "elb_exporter_cloud_requests_total{api=\"ces_batch_query\"}"
        ),
        1.0
    );
    assert!(cloud_lines(&b).is_empty());
    // ELB and IAM accepted the key before CES rejected it: the listeners are known.
    assert_eq!(family_lines(&b, "elb_exporter_listener_info").len(), 3);
    assert_eq!(e.get("/readyz").await.0, 200);
    let logs = e.logs();
    assert!(!logs.contains("locked after"), "{logs}");
    assert!(
        logs.contains("not sent: the credentials were rejected"),
        "{logs}"
    );
    assert!(logs.contains("authentication failed"));
    assert!(
        !logs
            .lines()
            .any(|l| l.contains("retrying") && l.contains("401"))
    );
    assert_alive(&mut e).await;
}

/// A wrong secret key everywhere: the first call (the IAM project lookup) is rejected and cloud calls
/// pause, so nothing resolves; the process keeps serving and is ready (so the failure is scraped), the
/// problem shows in `elb_exporter_discovery_problems{reason="elb_lookup_failed"}`, and `elb_exporter_up`
/// must be 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_key_everywhere_reports_down() {
    let w = fixture().await;
    let sk = w.sim.config().sk.clone();
    let mut e = w.exporter_edited(&fast("", "", ""), |t| {
        t.replace(&sk, "WrongSecretKey0000000000000000000000000")
    });
    e.wait_ready().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let b = e.metrics().await;
    assert_eq!(problems(&b, "elb_lookup_failed"), 2.0, "{b}");
    let reqs = w.sim.requests();
    assert_eq!(reqs.len(), 1, "one probe, then a pause: {reqs:?}");
    assert_eq!(reqs[0].status, 401);
    assert_alive(&mut e).await;
    assert_eq!(
        num(&b, "elb_exporter_up"),
        0.0,
        "nothing can be collected with a wrong key:\n{b}"
    );
}

/// A key fixed by rotating the config file (`auth.credentials_reload`) after the ELB listings failed
/// with the wrong one: the failed listings should be retried at once, so the series appear within a
/// reload period and a cycle or two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_credentials_resolve_failed_elbs_promptly() {
    let w = fixture().await;
    let sk = w.sim.config().sk.clone();
    let reload = |t: String| t.replacen("auth:\n", "auth:\n  credentials_reload: \"1s\"\n", 1);
    let mut e = w.exporter_edited(&fast("", "", ""), |t| {
        reload(t).replace(&sk, "WrongSecretKey0000000000000000000000000")
    });
    e.wait_ready().await;
    let ok = wait_for(Duration::from_secs(10), || async {
        problems(&e.metrics().await, "elb_lookup_failed") == 2.0
    })
    .await;
    assert!(ok, "{}", e.logs());
    let good = reload(elb_exporter::demo::config_for(
        &w.sim,
        &w.cloud_url,
        &fast("", "", ""),
    ));
    std::fs::write(w.dir.path().join("clouds.yml"), good).unwrap();
    let fixed = Instant::now();
    let ok = wait_for(Duration::from_secs(30), || async {
        cloud_lines(&e.metrics().await).len() == 6
    })
    .await;
    assert!(ok, "{}", e.logs());
    let took = fixed.elapsed();
    assert!(
        took <= Duration::from_secs(5),
        "series {took:?} after the fixed key was written (reload every 1 s, cycle 1 s)"
    );
    assert_alive(&mut e).await;
}

/// Truncated (invalid JSON), garbage and oversized (33 MB) 2xx answers are retried and counted as
/// `malformed`; when every attempt is bad the cycle fails like any outage; an ELB listing that comes
/// back truncated is retried too. No crash, and everything recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_truncated_and_huge_answers_never_crash() {
    let w = fixture().await;
    let mut e = w.exporter(&fast("", "", ""));
    steady(&e).await;
    let b = e.metrics().await;
    let bad0 = cycles(&b, "failure");

    w.sim.inject(SimApi::Ces, Fault::Malformed { count: 2 });
    w.sim.inject(
        SimApi::Ces,
        Fault::Status {
            status: 200,
            body: "<html>proxy error</html>".into(),
            count: 1,
        },
    );
    w.sim.inject(
        SimApi::Ces,
        Fault::Status {
            status: 200,
            body: r#"{"metrics": "not a list", "unknown": [1, 2, {"x": null}]}"#.into(),
            count: 1,
        },
    );
    w.sim.inject(
        SimApi::Ces,
        Fault::Status {
            status: 200,
            body: format!(r#"{{"metrics":[{}"#, "x".repeat(33 * 1024 * 1024)),
            count: 2,
        },
    );
    let ok = wait_for(Duration::from_secs(20), || async {
        let b = e.metrics().await;
        cycles(&b, "failure") >= bad0 + 3.0 && num(&b, "elb_exporter_up") == 1.0
    })
    .await;
    assert!(ok, "three failed cycles then recovery; logs:\n{}", e.logs());
    let b = e.metrics().await;
    assert_eq!(cycles(&b, "failure"), bad0 + 3.0);
    assert_eq!(failures(&b, "ces_batch_query", "malformed"), 6.0, "{b}");
    assert!(e.logs().contains("response body over"), "{}", e.logs());
    let ok = wait_for(Duration::from_secs(5), || async {
        cloud_lines(&e.metrics().await).len() == 6
    })
    .await;
    assert!(ok, "series back");

    // A new Service on a new ELB whose first listing is truncated: retried, then exported.
    let elb_c = "c3333333-3333-4333-8333-333333333333";
    let l_c = "c0000000-0000-4000-8000-000000000080";
    w.sim.add_loadbalancer(elb_c, LbKind::Dedicated);
    w.sim
        .add_listener(elb_c, SimListener::new(l_c, "k8s_TCP_80", "TCP", 80));
    w.sim.inject(SimApi::ElbV3, Fault::Malformed { count: 1 });
    w.cluster.apply(service(
        "default",
        "new",
        &[(ID, elb_c), (CLASS, "performance")],
        &[80],
    ));
    let ok = wait_for(Duration::from_secs(10), || async {
        exports(&e.metrics().await, "default", "new")
    })
    .await;
    assert!(ok, "retried listing; logs:\n{}", e.logs());
    let b = e.metrics().await;
    assert_eq!(failures(&b, "elb_list_listeners", "malformed"), 1.0);
    assert_eq!(problems(&b, "elb_lookup_failed"), 0.0);
    assert_alive(&mut e).await;
}

/// The container memory limit of deploy/deployment.yaml, in KiB.
fn deployment_memory_limit_kib() -> u64 {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/deployment.yaml"
    ))
    .expect("deploy/deployment.yaml");
    let limits = text.split("limits:").nth(1).expect("a limits: block");
    let mem = limits
        .lines()
        .find_map(|l| l.trim().strip_prefix("memory:"))
        .expect("a memory limit")
        .trim()
        .trim_matches('"');
    let mib: u64 = mem
        .strip_suffix("Mi")
        .expect("memory in Mi")
        .parse()
        .unwrap();
    mib * 1024
}

/// `{"<key>":[0,0,…]}` of about `bytes`: valid JSON, the shape that multiplies most when parsed.
fn zeros(key: &str, bytes: usize) -> String {
    format!("{{\"{key}\":[{}0]}}", "0,".repeat(bytes / 2))
}

/// Huge but valid answers — ~31 MiB of `[0,0,…]` to IAM, ELB v2 and v3 and CES (six CES calls in flight
/// at once), a ~31 MiB error body, and a CES answer of `[0,0,…]` just under its size cap — are refused
/// or read with bounded memory: the process survives, recovers, and its peak RSS (VmHWM) stays under
/// the deployment's memory limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_valid_answers_keep_memory_under_the_pod_limit() {
    const HUGE: usize = 31 * 1024 * 1024;
    let w = fixture().await;
    w.sim.inject(
        SimApi::Iam,
        Fault::Status {
            status: 200,
            body: zeros("projects", HUGE),
            count: 1,
        },
    );
    // 3 s: room for the retried huge answers inside one cycle, which is cut after its interval.
    let mut e = w.exporter_edited(
        &fast("", "", "").replace("interval: \"1s\"", "interval: \"3s\""),
        batch_size(1),
    );
    steady(&e).await;
    let huge_error = format!(
        r#"{{"error_code":"ces.0007","error_msg":"{}"}}"#,
        "x".repeat(HUGE)
    );
    for (status, body) in [
        (200, zeros("metrics", HUGE)),
        (503, huge_error),
        // Under the cap of a one-metric CES answer (~0.8 MB): parsed, one item at a time.
        (200, zeros("metrics", 700 * 1024)),
    ] {
        w.sim.inject(
            SimApi::Ces,
            Fault::Status {
                status,
                body,
                count: 6,
            },
        );
    }
    let (elb_c, elb_d) = (
        "c3333333-3333-4333-8333-333333333333",
        "d4444444-4444-4444-8444-444444444444",
    );
    w.sim.add_loadbalancer(elb_c, LbKind::Dedicated);
    w.sim.add_loadbalancer(elb_d, LbKind::Shared);
    w.sim.add_listener(
        elb_c,
        SimListener::new(
            "c0000000-0000-4000-8000-000000000080",
            "k8s_TCP_80",
            "TCP",
            80,
        ),
    );
    w.sim.add_listener(
        elb_d,
        SimListener::new(
            "d0000000-0000-4000-8000-000000000080",
            "k8s_TCP_80",
            "TCP",
            80,
        ),
    );
    for api in [SimApi::ElbV3, SimApi::ElbV2] {
        w.sim.inject(
            api,
            Fault::Status {
                status: 200,
                body: zeros("listeners", HUGE),
                count: 1,
            },
        );
    }
    w.cluster.apply(service(
        "default",
        "c",
        &[(ID, elb_c), (CLASS, "performance")],
        &[80],
    ));
    w.cluster.apply(service(
        "default",
        "d",
        &[(ID, elb_d), (CLASS, "union")],
        &[80],
    ));
    let ok = wait_for(Duration::from_secs(30), || async {
        let b = e.get("/metrics").await.1;
        failures(&b, "ces_batch_query", "503") >= 6.0
            && exports(&b, "default", "c")
            && exports(&b, "default", "d")
            && num(&b, "elb_exporter_up") == 1.0
    })
    .await;
    assert!(e.alive(), "the exporter died; logs:\n{}", e.logs());
    let status = std::fs::read_to_string(format!("/proc/{}/status", e.child.id())).unwrap();
    let peak: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    let limit = deployment_memory_limit_kib();
    eprintln!("peak RSS {} MiB, limit {} MiB", peak / 1024, limit / 1024);
    assert!(
        peak < limit,
        "peak RSS {peak} KiB over the deployment limit {limit} KiB"
    );
    assert!(ok, "recovers (alive: {}); logs:\n{}", e.alive(), e.logs());
    let b = e.metrics().await;
    assert_eq!(failures(&b, "iam_list_projects", "malformed"), 1.0, "{b}");
    assert_eq!(failures(&b, "elb_list_listeners", "malformed"), 2.0, "{b}");
    assert!(failures(&b, "ces_batch_query", "malformed") >= 6.0, "{b}");
    assert_alive(&mut e).await;
}

/// CES answers that parse but carry unusable parts — a negative value, a "NaN" string, a zero
/// timestamp, a duplicated result, an unmatched result, an entry without dimensions, unknown fields
/// everywhere — are skipped and counted; the usable parts are exported; nothing is made up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_ces_values_are_skipped_and_counted() {
    let w = fixture().await;
    // A longer interval so the crafted answers' cycles are easy to observe.
    let mut e = w.exporter(
        &fast("", "", "")
            .replace("interval: \"1s\"", "interval: \"2s\"")
            .replace("max_attempts: 2", "max_attempts: 1"),
    );
    steady(&e).await;
    let ts = w.sim.newest_minute(now_ms());
    let dims = |elb: &str, l: &str| json!([{"name": "lbaas_instance_id", "value": elb}, {"name": "lbaas_listener_id", "value": l}]);
    let entry = |metric: &str, elb: &str, l: &str, points: serde_json::Value| {
        json!({"namespace": "SYS.ELB", "metric_name": metric, "dimensions": dims(elb, l),
               "datapoints": points, "unit": "Count"})
    };
    let answer = json!({
        "metrics": [
            entry("m1_cps", ELB_A, L_A80, json!([{"average": -5.0, "timestamp": ts}])),
            entry("m7_in_Bps", ELB_A, L_A80, json!([
                {"average": 42.5, "timestamp": ts, "surprise": {"nested": [1, 2]}}])),
            entry("m1_cps", ELB_A, L_A443, json!([{"average": "NaN", "timestamp": ts}])),
            entry("m7_in_Bps", ELB_A, L_A443, json!([{"average": 1.0, "timestamp": ts - 60_000}])),
            entry("m7_in_Bps", ELB_A, L_A443, json!([{"average": 2.0, "timestamp": ts}])),
            entry("m1_cps", ELB_B, L_B8080, json!([{"average": 7.0, "timestamp": 0}])),
            entry("m7_in_Bps", ELB_B, L_B8080, json!([])),
            entry("m1_cps", ELB_B, "ffffffff-0000-4000-8000-000000000000",
                  json!([{"average": 1.0, "timestamp": ts}])),
            {"namespace": "SYS.ELB", "metric_name": "m1_cps"},
        ],
        "extra_top_level": {"ignored": true}
    })
    .to_string();
    w.sim.inject(
        SimApi::Ces,
        Fault::Status {
            status: 200,
            body: answer,
            count: 2,
        },
    );
    let ok = wait_for(Duration::from_secs(10), || async {
        let b = e.metrics().await;
        num(
            &b,
            "elb_exporter_skipped_items_total{reason=\"duplicate_result\"}",
        ) >= 1.0
            && value_of(&b, "m7_in_Bps", L_A80) == Some(42.5)
    })
    .await;
    assert!(ok, "crafted answer exported; logs:\n{}", e.logs());
    let b = e.metrics().await;
    check_exposition(&b).unwrap();
    assert_eq!(
        num(&b, "elb_exporter_up"),
        1.0,
        "a parsed answer is a success"
    );
    // Usable parts: the unknown-field entry and the newest point of the duplicated result.
    assert_eq!(value_of(&b, "m7_in_Bps", L_A80), Some(42.5));
    assert_eq!(value_of(&b, "m7_in_Bps", L_A443), Some(2.0));
    // Unusable: negative, NaN, timestamp 0, no datapoints: absent, never a made-up value.
    assert_eq!(value_of(&b, "m1_cps", L_A80), None, "negative");
    assert_eq!(value_of(&b, "m1_cps", L_A443), None, "NaN");
    assert_eq!(value_of(&b, "m1_cps", L_B8080), None, "timestamp 0");
    assert_eq!(value_of(&b, "m7_in_Bps", L_B8080), None, "no datapoint");
    assert!(!b.contains("ffffffff-0000-4000-8000-000000000000"));
    assert!(!b.contains("NaN"));
    let skipped = |r: &str| {
        num(
            &b,
            &format!("elb_exporter_skipped_items_total{{reason=\"{r}\"}}"),
        )
    };
    // Counted per answer (the crafted answer may have been served once or twice by now).
    let n = skipped("duplicate_result");
    assert!(n == 1.0 || n == 2.0, "{b}");
    assert_eq!(skipped("invalid_datapoint"), 3.0 * n, "{b}");
    assert_eq!(skipped("unmatched_result"), n);
    assert_eq!(skipped("invalid_result"), n);
    // Then the normal answers again.
    let ok = wait_for(Duration::from_secs(10), || async {
        cloud_lines(&e.metrics().await).len() == 6
    })
    .await;
    assert!(ok);
    assert_alive(&mut e).await;
}

/// Connect errors (CES endpoint refusing connections) are retried, counted as `connect`, and fail the
/// cycle (`up` 0) without affecting discovery or the HTTP endpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_is_counted_and_survived() {
    let w = fixture().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let cloud_url = w.cloud_url.clone();
    let mut e = w.exporter_edited(&fast("", "  connect_timeout: \"300ms\"\n", ""), |t| {
        t.replace(
            &format!("  ces: \"{cloud_url}\""),
            &format!("  ces: \"http://{dead}\""),
        )
    });
    e.wait_ready().await;
    let ok = wait_for(Duration::from_secs(10), || async {
        cycles(&e.metrics().await, "failure") >= 2.0
    })
    .await;
    assert!(ok, "logs:\n{}", e.logs());
    let b = e.metrics().await;
    assert_eq!(num(&b, "elb_exporter_up"), 0.0);
    let connect = failures(&b, "ces_batch_query", "connect");
    let sent = num(
        &b,
        "elb_exporter_cloud_requests_total{api=\"ces_batch_query\"}",
    );
    assert!(connect >= 4.0, "two attempts per failed cycle: {b}");
    assert_eq!(connect, sent, "every attempt counted once");
    assert_eq!(family_lines(&b, "elb_exporter_listener_info").len(), 3);
    assert_alive(&mut e).await;
}

/// The client-side CES rate limit holds even when cycles want more, and the concurrency cap
/// serializes batches; `/metrics` never waits for the cloud.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_and_concurrency_cap_hold() {
    let w = fixture().await;
    // 6 series in batches of 2 = 3 calls per cycle; at most 3 CES calls per minute; one call at a time.
    w.sim.inject(
        SimApi::Ces,
        Fault::Delay {
            delay: Duration::from_millis(300),
            count: 3,
        },
    );
    let mut e = w.exporter_edited(
        &fast(
            "",
            "  max_concurrency: 1\n  rate_limit:\n    ces_per_minute: 3\n",
            "",
        ),
        batch_size(2),
    );
    steady(&e).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = Instant::now();
    let b = e.metrics().await;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "/metrics served from memory"
    );
    let reqs = ces(&w.sim);
    assert_eq!(
        reqs.len(),
        3,
        "3 calls per minute, 3 s after the first cycle"
    );
    for pair in reqs.windows(2) {
        assert!(
            pair[1].time_ms - pair[0].time_ms >= 250,
            "one call at a time: {} ms apart",
            pair[1].time_ms - pair[0].time_ms
        );
    }
    assert_eq!(
        cycles(&b, "success"),
        1.0,
        "the second cycle waits for the limiter"
    );
    assert_eq!(
        num(
            &b,
            "elb_exporter_planned_cloud_calls_per_minute{api=\"ces_batch_query\"}"
        ),
        180.0
    );
    assert_eq!(cloud_lines(&b).len(), 6);
    assert_alive(&mut e).await;
}

// ---------------------------------------------------------------------------------------------------------
// Cluster faults

/// The apiserver answers 503 when the exporter starts: the process stays up, `/healthz` 200, `/readyz`
/// 503; once the apiserver is back the watch syncs and the series appear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_unreachable_at_start_is_not_ready_then_recovers() {
    let w = fixture().await;
    w.cluster.set_available(false);
    let mut e = w.exporter(&fast("", "", ""));
    let outage: u64 = std::env::var("OUTAGE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let until = Instant::now() + Duration::from_secs(outage);
    while Instant::now() < until {
        assert_alive(&mut e).await;
        let (status, why) = e.get("/readyz").await;
        assert_eq!(status, 503, "{why}");
        assert!(why.contains("Kubernetes"), "{why}");
        let b = e.metrics().await;
        assert_eq!(num(&b, "elb_exporter_up"), 0.0, "nothing collected yet");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(e.logs().contains("503"), "the failures are logged");
    w.cluster.set_available(true);
    let back = Instant::now();
    let ok = wait_for(Duration::from_secs(40), || async {
        e.get("/readyz").await.0 == 200
    })
    .await;
    assert!(
        ok,
        "ready after the apiserver came back; logs:\n{}",
        e.logs()
    );
    eprintln!(
        "apiserver down {outage} s at start; ready {:?} after it came back",
        back.elapsed()
    );
    steady(&e).await;
    assert_alive(&mut e).await;
}

/// Changes made while the watch is down, which must all be seen: `shop/gone{round}` deleted and
/// `shop/fresh{round}` added.
fn change_while_disconnected(w: &World, round: u32) -> (String, String) {
    let gone = format!("gone{round}");
    let fresh = format!("fresh{round}");
    w.cluster.delete("shop", &gone);
    w.cluster.apply(service(
        "shop",
        &fresh,
        &[(ID, ELB_B), (CLASS, "union")],
        &[8080],
    ));
    (gone, fresh)
}

fn add_gone(w: &World, round: u32) {
    w.cluster.apply(service(
        "shop",
        &format!("gone{round}"),
        &[(ID, ELB_A), (CLASS, "performance")],
        &[80],
    ));
}

async fn converged(e: &Exporter, gone: &str, fresh: &str, what: &str) {
    let ok = wait_for(Duration::from_secs(30), || async {
        let b = e.metrics().await;
        !exports(&b, "shop", gone) && exports(&b, "shop", fresh)
    })
    .await;
    let b = e.metrics().await;
    assert!(
        ok,
        "{what}: {gone} gone and {fresh} present\n{b}\nlogs:\n{}",
        e.logs()
    );
    assert!(exports(&b, "default", "web"), "{what}: nothing lost");
    assert!(exports(&b, "shop", "cart"), "{what}: nothing lost");
}

/// Dropped watches and an apiserver outage (503, watches cut): changes made meanwhile are all applied
/// after reconnection; nothing stale is kept and nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watch_and_outage_lose_nothing_and_keep_nothing_stale() {
    let w = fixture().await;
    add_gone(&w, 1);
    add_gone(&w, 2);
    w.cluster.apply(service(
        "shop",
        "strip",
        &[(ID, ELB_A), (CLASS, "performance")],
        &[80],
    ));
    let mut e = w.exporter(&fast("", "", ""));
    e.wait_ready().await;
    let ok = wait_for(Duration::from_secs(10), || async {
        let b = e.metrics().await;
        exports(&b, "shop", "gone2") && exports(&b, "shop", "strip")
    })
    .await;
    assert!(ok);

    // Cut mid-stream, then change at once (the client is reconnecting).
    w.cluster.drop_watches();
    let (gone, fresh) = change_while_disconnected(&w, 1);
    converged(&e, &gone, &fresh, "drop_watches").await;

    // Unavailable for a while: changes while every request gets 503.
    w.cluster.set_available(false);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (gone, fresh) = change_while_disconnected(&w, 2);
    w.cluster.apply(service("shop", "strip", &[], &[80]));
    tokio::time::sleep(Duration::from_secs(1)).await;
    w.cluster.set_available(true);
    converged(&e, &gone, &fresh, "outage").await;
    let b = e.metrics().await;
    assert!(
        !exports(&b, "shop", "strip"),
        "lost its annotation while disconnected"
    );
    assert_eq!(
        num(&b, "elb_exporter_services"),
        4.0,
        "web cart fresh1 fresh2:\n{b}"
    );
    assert_alive(&mut e).await;
}

/// 410 Gone: a watch ended by compaction, and a resume from a compacted resourceVersion after an outage,
/// both re-list; a Service deleted meanwhile (seen by no watch event at all) is dropped by the re-list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_410_relists_and_drops_services_deleted_meanwhile() {
    let w = fixture().await;
    add_gone(&w, 1);
    add_gone(&w, 2);
    let mut e = w.exporter(&fast("", "", ""));
    e.wait_ready().await;
    let ok = wait_for(Duration::from_secs(10), || async {
        exports(&e.metrics().await, "shop", "gone2")
    })
    .await;
    assert!(ok);

    w.cluster.expire_watches();
    let (gone, fresh) = change_while_disconnected(&w, 1);
    converged(&e, &gone, &fresh, "expire_watches").await;

    // Outage, changes, compaction: the watch cannot resume from its resourceVersion and gets 410.
    w.cluster.set_available(false);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (gone, fresh) = change_while_disconnected(&w, 2);
    w.cluster.compact();
    w.cluster.set_available(true);
    converged(&e, &gone, &fresh, "compacted during outage").await;
    let b = e.metrics().await;
    assert_eq!(
        num(&b, "elb_exporter_services"),
        4.0,
        "web cart fresh1 fresh2:\n{b}"
    );
    assert!(
        b.contains("elb_exporter_kubernetes_watch_errors_total{kind=\"watch_status\"}")
            || b.contains("elb_exporter_kubernetes_watch_errors_total{kind=\"watch_start\"}"),
        "{b}"
    );
    assert_alive(&mut e).await;
}

/// The apiserver restarts on the same address (connections refused meanwhile, history compacted):
/// the exporter reconnects, re-lists, and ends with exactly the current Services.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_restart_relists() {
    let w = fixture().await;
    add_gone(&w, 1);
    let mut e = w.exporter(&fast("", "", ""));
    e.wait_ready().await;
    let ok = wait_for(Duration::from_secs(10), || async {
        exports(&e.metrics().await, "shop", "gone1")
    })
    .await;
    assert!(ok);
    let addr = w.cluster.addr().expect("serving");
    w.cluster.shutdown();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (gone, fresh) = change_while_disconnected(&w, 1);
    w.cluster.compact();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_alive(&mut e).await;
    w.cluster
        .serve(addr)
        .await
        .expect("restart on the same address");
    converged(&e, &gone, &fresh, "restart").await;
    assert_eq!(num(&e.metrics().await, "elb_exporter_services"), 3.0);
    assert_eq!(e.get("/readyz").await.0, 200);
    assert_alive(&mut e).await;
}

// ---------------------------------------------------------------------------------------------------------
// Bad input

/// An ELB deleted under us and a listener deleted under us: their cloud series go with the next cycle
/// (CES has no datapoint for them), and after `discovery.listener_refresh` their `listener_info` too;
/// the Service on the deleted ELB counts as `unknown_elb` and the port that lost its listener as
/// `port_without_listener`; the rest keeps being exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_elb_and_listener_disappear_after_refresh() {
    let w = fixture().await;
    let mut e = w.exporter(&fast("", "", "discovery:\n  listener_refresh: \"10s\"\n"));
    steady(&e).await;
    w.sim.remove_loadbalancer(ELB_B);
    w.sim.remove_listener(L_A443);
    let removed = Instant::now();
    // CES has no datapoint for them any more: the cloud series go with the next cycle.
    let ok = wait_for(Duration::from_secs(5), || async {
        let b = e.metrics().await;
        !exports(&b, "shop", "cart") && !exports_listener(&b, L_A443)
    })
    .await;
    assert!(ok, "no datapoint, no series; logs:\n{}", e.logs());
    // The listing refresh notices the deletions: no more listener_info, the problems are counted.
    let ok = wait_for(Duration::from_secs(20), || async {
        let b = e.metrics().await;
        !b.contains(L_A443) && !b.contains(L_B8080) && problems(&b, "unknown_elb") == 1.0
    })
    .await;
    assert!(ok, "gone after the refresh; logs:\n{}", e.logs());
    let noticed = removed.elapsed();
    eprintln!("deleted in the cloud -> noticed by the listener refresh: {noticed:?}");
    assert!(noticed <= Duration::from_secs(13), "{noticed:?}");
    let b = e.metrics().await;
    assert_eq!(problems(&b, "unknown_elb"), 1.0, "{b}");
    assert_eq!(problems(&b, "port_without_listener"), 1.0, "{b}");
    assert!(exports_listener(&b, L_A80));
    assert!(!b.contains(L_B8080));
    assert_eq!(num(&b, "elb_exporter_listeners"), 1.0);
    assert_eq!(num(&b, "elb_exporter_services"), 2.0);
    assert_eq!(num(&b, "elb_exporter_up"), 1.0);
    let logs = e.logs();
    assert!(
        logs.lines().any(|l| l.contains("cannot be fully exported")
            && l.contains("namespace=shop")
            && l.contains("service=cart")),
        "{logs}"
    );
    assert_alive(&mut e).await;
}

/// Bad annotations arriving through the real watch (initial list and later events): each counted by
/// reason, logged naming the Service, never blocking valid Services; fixing or deleting them clears
/// the counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_annotations_are_counted_logged_and_isolated() {
    let w = fixture().await;
    let long = "a".repeat(100);
    // In the initial list.
    w.cluster.apply(service("bad", "empty", &[(ID, "")], &[80]));
    w.cluster
        .apply(service("bad", "blank", &[(ID, "  \t ")], &[80]));
    let mut e = w.exporter(&fast("", "", ""));
    steady(&e).await;
    // Through watch events.
    w.cluster
        .apply(service("bad", "several", &[(ID, "a,b")], &[80]));
    w.cluster.apply(service(
        "bad",
        "chars",
        &[(ID, "elb\"id\\with/bad<chars>")],
        &[80],
    ));
    w.cluster
        .apply(service("bad", "unicode", &[(ID, "ëlb-ïd")], &[80]));
    w.cluster
        .apply(service("bad", "long", &[(ID, long.as_str())], &[80]));
    // A valid annotation with a port the ELB has no listener for.
    w.cluster.apply(service(
        "bad",
        "noport",
        &[(ID, ELB_A), (CLASS, "performance")],
        &[80, 9999],
    ));
    let ok = wait_for(Duration::from_secs(10), || async {
        let b = e.metrics().await;
        problems(&b, "invalid_elb_id") == 3.0 && problems(&b, "port_without_listener") == 1.0
    })
    .await;
    let b = e.metrics().await;
    assert!(ok, "{b}");
    assert_eq!(problems(&b, "empty_annotation"), 2.0);
    assert_eq!(problems(&b, "several_elb_ids"), 1.0);
    assert_eq!(problems(&b, "invalid_elb_id"), 3.0);
    assert_eq!(problems(&b, "port_without_listener"), 1.0);
    assert_eq!(
        num(&b, "elb_exporter_services"),
        9.0,
        "annotated, usable or not"
    );
    // Valid Services unaffected; the bad ones have no series; noport exports its good port.
    assert!(exports(&b, "default", "web") && exports(&b, "shop", "cart"));
    for svc in ["empty", "blank", "several", "chars", "unicode", "long"] {
        assert!(!b.contains(&format!("service=\"{svc}\"")), "{svc}");
    }
    assert!(exports(&b, "bad", "noport"));
    assert!(!b.contains("port=\"9999\""));
    check_exposition(&b).unwrap();
    assert_eq!(num(&b, "elb_exporter_up"), 1.0);

    let logs = e.logs();
    for (svc, reason) in [
        ("empty", "empty"),
        ("blank", "empty"),
        ("several", "several ids"),
        ("chars", "not an ELB id"),
        ("unicode", "not an ELB id"),
        ("long", "not an ELB id"),
        ("noport", "port 9999 has no listener"),
    ] {
        assert!(
            logs.lines().any(|l| l.contains("namespace=bad")
                && l.contains(&format!("service={svc} "))
                && l.contains(reason)),
            "log line for bad/{svc} ({reason}):\n{logs}"
        );
    }
    // Logged once per change, not every cycle.
    let lines = logs
        .lines()
        .filter(|l| l.contains("service=several "))
        .count();
    assert_eq!(lines, 1, "{logs}");

    // Fixing and deleting clears the counts.
    w.cluster.apply(service(
        "bad",
        "chars",
        &[(ID, ELB_B), (CLASS, "union")],
        &[8080],
    ));
    for svc in ["empty", "blank", "several", "unicode", "long", "noport"] {
        w.cluster.delete("bad", svc);
    }
    let ok = wait_for(Duration::from_secs(10), || async {
        let b = e.metrics().await;
        exports(&b, "bad", "chars")
            && [
                "empty_annotation",
                "several_elb_ids",
                "invalid_elb_id",
                "port_without_listener",
            ]
            .iter()
            .all(|r| problems(&b, r) == 0.0)
    })
    .await;
    assert!(ok, "{}", e.metrics().await);
    assert!(
        e.logs()
            .lines()
            .any(|l| l.contains("service problems resolved") && l.contains("service=chars")),
        "{}",
        e.logs()
    );
    assert_alive(&mut e).await;
}

/// `check` prints listener names from the cloud with control characters (terminal escapes, carriage
/// returns, newlines, bidirectional overrides) escaped, so a name cannot rewrite the operator's screen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_escapes_control_characters_in_cloud_names() {
    let w = fixture().await;
    let elb = "d4444444-4444-4444-8444-444444444444";
    w.sim.add_loadbalancer(elb, LbKind::Dedicated);
    w.sim.add_listener(
        elb,
        SimListener::new(
            "d0000000-0000-4000-8000-000000000080",
            "evil\u{1b}[2J\rname\nline\u{202e}rtl é名",
            "TCP",
            80,
        ),
    );
    w.cluster.apply(service(
        "hostile",
        "names",
        &[(ID, elb), (CLASS, "performance")],
        &[80],
    ));
    let (code, out, err) = w.run("", &["check"]);
    assert_eq!(code, 0, "{out}\n{err}");
    for bad in ['\u{1b}', '\r', '\u{202e}'] {
        assert!(!out.contains(bad), "{bad:?} printed raw:\n{out:?}");
    }
    assert!(
        out.contains(r"evil\u{1b}[2J\rname\nline\u{202e}rtl é名"),
        "{out}"
    );
}

/// A listener name with quotes, backslashes, a newline and non-ASCII characters: escaped exactly as the
/// text format requires, and the whole body still parses line by line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_listener_names_are_escaped() {
    let w = fixture().await;
    let elb = "d4444444-4444-4444-8444-444444444444";
    let lid = "d0000000-0000-4000-8000-000000000080";
    let name = "a\"b\\c\nd é名";
    w.sim.add_loadbalancer(elb, LbKind::Dedicated);
    w.sim
        .add_listener(elb, SimListener::new(lid, name, "TCP", 80));
    w.sim.add_listener(
        elb,
        SimListener::new(
            "d0000000-0000-4000-8000-000000000081",
            "} 1\n# TYPE x counter\nevil{a=\"",
            "TCP",
            81,
        ),
    );
    w.cluster.apply(service(
        "hostile",
        "names",
        &[(ID, elb), (CLASS, "performance")],
        &[80, 81],
    ));
    let mut e = w.exporter(&fast("", "", ""));
    e.wait_ready().await;
    let ok = wait_for(Duration::from_secs(10), || async {
        let b = e.metrics().await;
        exports_listener(&b, lid) && exports_listener(&b, "d0000000-0000-4000-8000-000000000081")
    })
    .await;
    let b = e.metrics().await;
    assert!(ok, "{b}");
    let escaped = r#"listener_name="a\"b\\c\nd é名""#;
    let lines: Vec<&str> = b.lines().filter(|l| l.contains(lid)).collect();
    assert_eq!(lines.len(), 3, "two metrics and listener_info: {lines:?}");
    for l in &lines {
        assert!(l.contains(escaped), "{l}");
        let (_, labels, _) = parse_sample(l).unwrap();
        let got = labels
            .iter()
            .find(|(k, _)| k == "listener_name")
            .map(|(_, v)| v.as_str());
        assert_eq!(got, Some(name), "round trip");
    }
    let samples = check_exposition(&b).unwrap_or_else(|e| panic!("{e}\n{b}"));
    assert!(samples > 10);
    assert!(
        !b.lines().any(|l| l.starts_with("evil")),
        "no injected line"
    );
    assert_eq!(b.lines().filter(|l| l.starts_with("# TYPE x ")).count(), 0);
    assert_alive(&mut e).await;
}

// ---------------------------------------------------------------------------------------------------------
// Secrets

const TOKEN: &str = "SecurityTokenValue-ZmFrZS10b2tlbi1mb3ItdGVzdHM-Xq7";

fn assert_no_secret(what: &str, text: &str, secrets: &[&str]) {
    for s in secrets {
        if let Some(i) = text.find(s) {
            let start = text[..i].rfind('\n').map_or(0, |p| p + 1);
            let end = text[i..].find('\n').map_or(text.len(), |p| i + p);
            panic!("{what} leaks a secret: {}", &text[start..end]);
        }
    }
}

/// At `RUST_LOG=trace`, with temporary credentials (SK + security token): a healthy run, a run whose
/// key the cloud rejects, a running exporter whose config file is rotated (to a rejected key, to an
/// invalid file, back to the right key), `/metrics` behind a bearer token probed with wrong
/// credentials, `check` with secrets from the environment, and configuration errors about the secret
/// fields never print the secret key, the token or the web credentials — not in stdout, stderr or any
/// HTTP answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_appear_in_logs_errors_or_metrics() {
    let w = fixture_with(SimConfig {
        security_token: Some(TOKEN.into()),
        ..SimConfig::default()
    })
    .await;
    let sk = w.sim.config().sk.clone();
    let with_token = |t: String| {
        t.replace(
            "  secret_key:",
            &format!("  security_token: \"{TOKEN}\"\n  secret_key:"),
        )
    };
    let trace = [("RUST_LOG", "trace")];

    // Healthy: signed calls with the token succeed.
    let e = w.exporter_env(&fast("", "", ""), with_token, &trace);
    steady(&e).await;
    // A listing after start, a scrape of every endpoint, gzip too.
    w.cluster.apply(service(
        "shop",
        "late",
        &[(ID, ELB_B), (CLASS, "union")],
        &[8080],
    ));
    let ok = wait_for(Duration::from_secs(10), || async {
        exports(&e.metrics().await, "shop", "late")
    })
    .await;
    assert!(ok);
    let mut seen = String::new();
    for p in ["/metrics", "/", "/healthz", "/readyz", "/nope"] {
        seen.push_str(&e.get(p).await.1);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let logs = e.logs();
    assert!(
        logs.contains("TRACE") && logs.len() > 10_000,
        "trace logging is on"
    );
    assert_no_secret("trace run: /metrics and pages", &seen, &[&sk, TOKEN]);
    assert_no_secret("trace run: stderr", &logs, &[&sk, TOKEN]);
    assert_no_secret("trace run: stdout", &e.stdout(), &[&sk, TOKEN]);
    drop(e);

    // Errors path, from the start: the cloud rejects the key (IAM 401, then calls pause).
    let wrong = "WrongSecretKeyThatMustNotLeak000000000000";
    let reload = |t: String| t.replacen("auth:\n", "auth:\n  credentials_reload: \"1s\"\n", 1);
    let e = w.exporter_env(
        &fast("", "", ""),
        |t| with_token(t).replace(&sk, wrong),
        &trace,
    );
    e.wait_ready().await;
    let ok = wait_for(Duration::from_secs(5), || async {
        e.logs().contains("listener lookup failed")
    })
    .await;
    assert!(ok, "{}", e.logs());
    let body = e.metrics().await;
    let logs = e.logs();
    assert!(logs.contains("authentication failed"), "{logs}");
    assert_no_secret("wrong key: /metrics", &body, &[wrong, TOKEN, &sk]);
    assert_no_secret("wrong key: stderr", &logs, &[wrong, TOKEN, &sk]);
    assert_no_secret("wrong key: stdout", &e.stdout(), &[wrong, TOKEN, &sk]);
    drop(e);

    // Rotation in a running exporter: to a key CES rejects, to an invalid file (a list where the
    // secret belongs), back to the right key.
    let good = reload(with_token(elb_exporter::demo::config_for(
        &w.sim,
        &w.cloud_url,
        &fast("", "", ""),
    )));
    let e = w.exporter_env(&fast("", "", ""), |t| reload(with_token(t)), &trace);
    let healthy = || async {
        let b = e.metrics().await;
        num(&b, "elb_exporter_up") == 1.0
            && exports(&b, "default", "web")
            && exports(&b, "shop", "late")
    };
    e.wait_ready().await;
    assert!(wait_for(Duration::from_secs(10), healthy).await);
    let cfg_path = w.dir.path().join("clouds.yml");
    std::fs::write(&cfg_path, good.replace(&sk, wrong)).unwrap();
    let ok = wait_for(Duration::from_secs(10), || async {
        num(&e.metrics().await, "elb_exporter_up") == 0.0
    })
    .await;
    assert!(ok, "the rejected key is used; logs:\n{}", e.logs());
    std::fs::write(
        &cfg_path,
        good.replace(
            &format!("  secret_key: \"{sk}\""),
            &format!("  secret_key: [\"{sk}\"]"),
        ),
    )
    .unwrap();
    let ok = wait_for(Duration::from_secs(5), || async {
        e.logs()
            .contains("is invalid; keeping the running credentials")
    })
    .await;
    assert!(ok, "{}", e.logs());
    std::fs::write(&cfg_path, &good).unwrap();
    assert!(
        wait_for(Duration::from_secs(10), healthy).await,
        "the right key again; logs:\n{}",
        e.logs()
    );
    let body = e.metrics().await;
    let logs = e.logs();
    assert!(logs.contains("credentials reloaded"), "{logs}");
    assert!(logs.contains("authentication failed"), "{logs}");
    assert_no_secret("rotation: /metrics", &body, &[wrong, TOKEN, &sk]);
    assert_no_secret("rotation: stderr", &logs, &[wrong, TOKEN, &sk]);
    assert_no_secret("rotation: stdout", &e.stdout(), &[wrong, TOKEN, &sk]);
    drop(e);

    // /metrics protected by a bearer token: right, wrong and basic credentials never show either.
    let web_token = "WebBearerTokenThatMustNotLeak-7f3a9c";
    let wrong_web = "WrongBearerTokenThatMustNotLeak-11d2";
    let basic_pw = "BasicPasswordThatMustNotLeak-55e0";
    let token_file = w.dir.path().join("bearer");
    std::fs::write(&token_file, web_token).unwrap();
    let e = w.exporter_env(
        &fast(
            "",
            "",
            &format!("web:\n  bearer_token_file: \"{}\"\n", token_file.display()),
        ),
        with_token,
        &trace,
    );
    e.wait_ready().await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let status = |r: reqwest::RequestBuilder| async move {
        r.send().await.map(|r| r.status().as_u16()).unwrap_or(0)
    };
    assert_eq!(status(client.get(&e.metrics_url)).await, 401);
    assert_eq!(
        status(client.get(&e.metrics_url).bearer_auth(wrong_web)).await,
        401
    );
    assert_eq!(
        status(
            client
                .get(&e.metrics_url)
                .basic_auth("admin", Some(basic_pw))
        )
        .await,
        401
    );
    assert_eq!(
        status(client.get(&e.metrics_url).bearer_auth(web_token)).await,
        200
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let secrets = [web_token, wrong_web, basic_pw, TOKEN, sk.as_str()];
    assert_no_secret("web auth: stderr", &e.logs(), &secrets);
    assert_no_secret("web auth: stdout", &e.stdout(), &secrets);
    drop(e);

    // Secrets from the environment, `check` at trace level.
    let (code, out, err) = w.run_raw(
        &elb_exporter::demo::config_for(&w.sim, &w.cloud_url, "")
            .replace(&format!("  secret_key: \"{sk}\"\n"), ""),
        &["check"],
        &[
            ("RUST_LOG", "trace"),
            ("HUAWEICLOUD_SDK_SK", &sk),
            ("HUAWEICLOUD_SDK_SECURITY_TOKEN", TOKEN),
        ],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("check: ok"), "{out}");
    assert_no_secret("check", &format!("{out}{err}"), &[&sk, TOKEN]);

    // Configuration errors about, or next to, the secret fields.
    let base = elb_exporter::demo::config_for(&w.sim, &w.cloud_url, "");
    let secret_line = format!("  secret_key: \"{sk}\"\n");
    let bad_configs: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "another field invalid",
            with_token(base.clone()) + "collection:\n  filter: \"median\"\n",
            vec![&sk, TOKEN],
        ),
        (
            "unknown key beside the secret",
            base.replace(
                &secret_line,
                &format!("{secret_line}  secret_key_file: \"{sk}\"\n"),
            ),
            vec![&sk],
        ),
        (
            "secret_key is a list",
            base.replace(&secret_line, &format!("  secret_key: [\"{sk}\"]\n")),
            vec![&sk],
        ),
        (
            "security_token is a mapping",
            base.replace(
                &secret_line,
                &format!("{secret_line}  security_token: {{value: \"{TOKEN}\"}}\n"),
            ),
            vec![TOKEN],
        ),
        (
            "secret_key unterminated quote",
            base.replace(&secret_line, &format!("  secret_key: \"{sk}\n")),
            vec![&sk],
        ),
        (
            "access_key missing",
            base.replace(&format!("  access_key: \"{}\"\n", w.sim.config().ak), ""),
            vec![&sk],
        ),
        (
            "access_key invalid: the secret pasted into it",
            base.replace(
                &format!("  access_key: \"{}\"\n", w.sim.config().ak),
                &format!("  access_key: \"{sk}, x\"\n"),
            ),
            vec![&sk],
        ),
        (
            "secret_key blank, token set",
            base.replace(
                &secret_line,
                &format!("  secret_key: \"  \"\n  security_token: \"{TOKEN}\"\n"),
            ),
            vec![TOKEN],
        ),
    ];
    let mut leaks = Vec::new();
    for (what, text, secrets) in &bad_configs {
        for args in [vec!["check"], vec![]] {
            let (code, out, err) = w.run_raw(text, &args, &trace);
            assert_eq!(code, 2, "{what} {args:?}: exit 2\n{out}\n{err}");
            assert!(
                err.contains("auth.")
                    || err.contains("collection.filter")
                    || err.contains("config"),
                "{what}: names the field\n{err}"
            );
            let all = format!("{out}{err}");
            for s in secrets {
                if all.contains(s) {
                    leaks.push(format!("{what} ({args:?}): {}", err.trim()));
                }
            }
        }
    }
    assert!(leaks.is_empty(), "secrets printed:\n{}", leaks.join("\n"));
}

/// Basic auth at `RUST_LOG=trace`: a right password, a wrong one, an unknown user and a burst of wrong
/// passwords beyond the check cap (429s). Neither the passwords, their `Authorization` values nor the
/// bcrypt hash appear in `/metrics`, the logs or stdout.
#[tokio::test]
async fn basic_auth_secrets_never_appear_in_logs_or_metrics() {
    use base64::Engine as _;
    let w = fixture().await;
    let (right, wrong) = ("RightBasicAuthPassword-7Hq", "WrongBasicAuthPassword-9Zx");
    let hash = bcrypt::hash(right, 6).unwrap();
    let web = format!("web:\n  basic_auth_users:\n    prometheus: \"{hash}\"\n");
    let e = w.exporter_env(&fast("", "", &web), |t| t, &[("RUST_LOG", "trace")]);
    e.wait_ready().await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let get = |user: &'static str, password: &'static str| {
        let request = client.get(&e.metrics_url).basic_auth(user, Some(password));
        async move {
            let r = request.send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let (status, body) = get("prometheus", right).await;
    assert_eq!(status, 200);
    assert_eq!(get("prometheus", wrong).await.0, 401);
    assert_eq!(get("nobody", right).await.0, 401);
    let burst = futures::future::join_all((0..8).map(|_| get("prometheus", wrong))).await;
    assert!(
        burst.iter().all(|(s, _)| *s == 401 || *s == 429),
        "{burst:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let header =
        |u: &str, p: &str| base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
    let secrets = [
        right,
        wrong,
        hash.as_str(),
        &header("prometheus", right),
        &header("prometheus", wrong),
        &header("nobody", right),
    ];
    assert_no_secret("basic auth: /metrics", &body, &secrets);
    assert_no_secret("basic auth: stderr", &e.logs(), &secrets);
    assert_no_secret("basic auth: stdout", &e.stdout(), &secrets);
}
