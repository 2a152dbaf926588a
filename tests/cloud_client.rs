//! The real cloud client (`HttpCloud`) against the simulated Huawei Cloud over HTTP on loopback: project
//! resolution, listener paging, CES batches, authentication, fault classification, retries, `Retry-After`,
//! timeouts and request telemetry. The simulator verifies every signature and header it receives.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::{Duration, Instant};

use elb_exporter::clock::now_ms;
use elb_exporter::cloud::client::HttpCloud;
use elb_exporter::cloud::{BatchQuery, CloudApi, CloudError, ElbVersion, Lane, MetricQuery};
use elb_exporter::config::{Config, Filter};
use elb_exporter::demo::config_for;
use elb_exporter::sim::cloud::{
    CloudSim, Fault, LbKind, SimApi, SimConfig, SimListener, SimProfile, SimRequest, SimUser,
    datapoint_value,
};
use elb_exporter::telemetry::Telemetry;

/// Upper bound on any single awaited call; every test finishes far below it.
const BOUND: Duration = Duration::from_secs(30);
const MAX_ATTEMPTS: u32 = 3;
const SHARED_LB: &str = "7a2d7b2f-1e8f-4d66-8b4c-2e3f4a5b6c02";
const DEDICATED_LB: &str = "6f1c6a1e-0d7e-4c55-9a3b-1d2e3f4a5b01";
const METRICS: &[&str] = elb_exporter::config::DEFAULT_METRICS;
const TCP_RESET_METRICS: [&str; 3] = ["m1e_server_rps", "m1f_lvs_rps", "m21_client_rps"];

async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(BOUND, f)
        .await
        .expect("call did not finish within the bound")
}

async fn start(cfg: SimConfig) -> (CloudSim, String) {
    let sim = CloudSim::new(cfg);
    let addr = sim
        .serve(([127, 0, 0, 1], 0).into())
        .await
        .expect("bind loopback");
    (sim, format!("http://{addr}"))
}

/// The `cloud:` section: small backoffs so retries cost milliseconds.
fn cloud_yaml(request_timeout: &str) -> String {
    format!(
        "cloud:\n  request_timeout: \"{request_timeout}\"\n  retry:\n    max_attempts: {MAX_ATTEMPTS}\n    initial_backoff: \"10ms\"\n    max_backoff: \"50ms\"\n"
    )
}

/// A config pointing at the simulator; `auth_extra` lines are added to the `auth:` section.
fn config(sim: &CloudSim, url: &str, auth_extra: &str, request_timeout: &str) -> Config {
    let text = config_for(sim, url, &cloud_yaml(request_timeout));
    let text = text.replacen("auth:\n", &format!("auth:\n{auth_extra}"), 1);
    Config::from_yaml(&text, &|_| None).unwrap_or_else(|e| panic!("config: {e}\n{text}"))
}

fn client_with(cfg: &Config) -> (HttpCloud, Telemetry) {
    let telemetry = Telemetry::new();
    let cloud = HttpCloud::new(cfg, telemetry.clone()).expect("client");
    (cloud, telemetry)
}

/// A client with the simulator's own credentials, resolving the project through IAM.
fn client(sim: &CloudSim, url: &str) -> (HttpCloud, Telemetry) {
    client_with(&config(sim, url, "", "5s"))
}

/// A client with the project id configured, so the request log holds only the calls under test.
fn client_with_project(sim: &CloudSim, url: &str) -> (HttpCloud, Telemetry) {
    let auth = format!("  project_id: \"{}\"\n", sim.config().project_id);
    client_with(&config(sim, url, &auth, "5s"))
}

fn count(sim: &CloudSim, api: SimApi) -> usize {
    sim.requests().iter().filter(|r| r.api == api).count()
}

fn of(sim: &CloudSim, api: SimApi) -> Vec<SimRequest> {
    sim.requests()
        .into_iter()
        .filter(|r| r.api == api)
        .collect()
}

fn query(lb: &str, listener: &str, metric: &str) -> MetricQuery {
    MetricQuery {
        namespace: "SYS.ELB".into(),
        metric_name: metric.into(),
        dimensions: vec![
            ("lbaas_instance_id".into(), lb.into()),
            ("lbaas_listener_id".into(), listener.into()),
        ],
    }
}

fn batch(metrics: Vec<MetricQuery>) -> BatchQuery {
    let to = now_ms();
    BatchQuery {
        metrics,
        from_ms: to - 5 * 60_000,
        to_ms: to,
        period: "1",
        filter: Filter::Average,
        lane: elb_exporter::cloud::Lane::Priority,
    }
}

/// A simulator with one dedicated TCP listener, and a one-metric query for it.
fn small_setup(sim: &CloudSim) -> BatchQuery {
    sim.add_loadbalancer(DEDICATED_LB, LbKind::Dedicated);
    sim.add_listener(
        DEDICATED_LB,
        SimListener::new("listener-small", "k8s_TCP_80", "TCP", 80),
    );
    batch(vec![query(DEDICATED_LB, "listener-small", "m1_cps")])
}

fn listener_id(tag: u32, i: usize) -> String {
    format!("{tag:08x}-0000-4000-8000-{i:012x}")
}

/// A probe whose caller gives up (its future dropped mid-request) must not leave the gate waiting for a
/// verdict forever: the next call probes and succeeds.
#[tokio::test]
async fn a_cancelled_probe_does_not_wedge_later_calls() {
    let (sim, url) = start(SimConfig::default()).await;
    let q = small_setup(&sim);
    let (cloud, _) = client_with_project(&sim, &url);
    sim.inject(
        SimApi::Ces,
        Fault::Delay {
            delay: Duration::from_secs(5),
            count: 1,
        },
    );
    // The first call is the probe of fresh credentials; cancel it while the simulator sits on it.
    let cancelled = tokio::time::timeout(Duration::from_millis(300), cloud.batch_query(&q)).await;
    assert!(cancelled.is_err(), "the probe was still in flight");
    let next = tokio::time::timeout(Duration::from_secs(5), cloud.batch_query(&q)).await;
    assert!(
        matches!(next, Ok(Ok(_))),
        "the call after a cancelled probe went through: {next:?}"
    );
}

/// Rejected credentials are not hammered: of many concurrent calls only one probe is sent; later calls
/// are refused locally until the cooldown or new credentials; new credentials work at once. Then the
/// key is revoked while three accepted calls are in flight: each is rejected once, and the three late
/// rejections count as one strike (the pause is the first cooldown, not one doubled per late answer).
#[tokio::test]
async fn rejected_credentials_send_one_probe_then_pause() {
    let (sim, url) = start(SimConfig {
        // Keeps concurrent calls in flight together.
        ces_latency: Duration::from_millis(300),
        ..SimConfig::default()
    })
    .await;
    let q = small_setup(&sim);
    let good = sim.config().sk.clone();
    let text = config_for(&sim, &url, &cloud_yaml("5s"))
        .replace(&good, "WrongSecretKey00000000000000000000000001")
        .replacen(
            "auth:\n",
            &format!("auth:\n  project_id: \"{}\"\n", sim.config().project_id),
            1,
        );
    let cfg = Config::from_yaml(&text, &|_| None).unwrap();
    let (cloud, telemetry) = client_with(&cfg);
    let cloud = std::sync::Arc::new(cloud);
    let concurrent = |n: usize| {
        let calls = (0..n).map(|_| {
            let (cloud, q) = (cloud.clone(), q.clone());
            tokio::spawn(async move { cloud.batch_query(&q).await })
        });
        bounded(futures::future::join_all(calls))
    };
    let results = concurrent(10).await;
    let (mut unauthorized, mut paused) = (0, 0);
    for r in results {
        match r.unwrap() {
            Err(CloudError::Unauthorized(..)) => unauthorized += 1,
            Err(CloudError::AuthBackoff(..)) => paused += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((unauthorized, paused), (1, 9));
    assert_eq!(count(&sim, SimApi::Ces), 1, "one probe reached the cloud");
    let err = bounded(cloud.batch_query(&q)).await.unwrap_err();
    assert!(matches!(err, CloudError::AuthBackoff(..)), "{err:?}");
    assert_eq!(count(&sim, SimApi::Ces), 1);
    assert_eq!(
        telemetry
            .cloud_requests
            .with_label_values(&["ces_batch_query"])
            .get(),
        1,
        "paused calls are not requests"
    );

    let mut fixed = cfg.auth.credentials.clone();
    fixed.secret_key = elb_exporter::config::Secret::new(good);
    cloud.set_credentials(fixed);
    assert!(bounded(cloud.batch_query(&q)).await.is_ok());
    assert_eq!(count(&sim, SimApi::Ces), 2);

    // Revoked under load: three accepted calls in flight together, all answered 401.
    sim.inject(
        SimApi::Ces,
        status_fault(
            401,
            r#"{"error_msg":"Incorrect IAM authentication information: verify aksk signature fail","error_code":"APIGW.0301"}"#,
            3,
        ),
    );
    let results = concurrent(3).await;
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Ok(Err(CloudError::Unauthorized(..))))),
        "{results:?}"
    );
    assert_eq!(count(&sim, SimApi::Ces), 5);
    match bounded(cloud.batch_query(&q)).await {
        Err(CloudError::AuthBackoff(_, left)) => assert!(
            left <= Duration::from_secs(60) && left > Duration::from_secs(50),
            "one strike pauses for the first cooldown (60 s), not {left:?}"
        ),
        other => panic!("paused, not {other:?}"),
    }
    assert_eq!(count(&sim, SimApi::Ces), 5);
}

/// A credential rotation forgets the project id resolved for the old key (it may be another account):
/// the next call asks IAM again.
#[tokio::test]
async fn project_cache_is_cleared_on_rotation() {
    let (sim, url) = start(SimConfig::default()).await;
    let cfg = config(&sim, &url, "", "5s");
    let (cloud, _) = client_with(&cfg);
    let want = sim.config().project_id.clone();
    assert_eq!(bounded(cloud.project_id()).await.unwrap(), want);
    assert_eq!(bounded(cloud.project_id()).await.unwrap(), want);
    assert_eq!(count(&sim, SimApi::Iam), 1);
    cloud.set_credentials(cfg.auth.credentials.clone());
    assert_eq!(bounded(cloud.project_id()).await.unwrap(), want);
    assert_eq!(
        count(&sim, SimApi::Iam),
        2,
        "asked again after the rotation"
    );
}

// ---------------------------------------------------------------------------------------------------------
// 1. Project resolution

#[tokio::test]
async fn project_is_resolved_through_iam_once_and_cached() {
    let (sim, url) = start(SimConfig::default()).await;
    let (cloud, telemetry) = client(&sim, &url);
    let want = sim.config().project_id.clone();
    assert_eq!(bounded(cloud.project_id()).await.unwrap(), want);
    assert_eq!(bounded(cloud.project_id()).await.unwrap(), want);
    let iam = of(&sim, SimApi::Iam);
    assert_eq!(iam.len(), 1, "the project id is cached: {iam:?}");
    assert_eq!(iam[0].status, 200);
    assert_eq!(iam[0].query, "name=cn-east-3");
    assert_eq!(
        telemetry
            .cloud_requests
            .with_label_values(&["iam_list_projects"])
            .get(),
        1
    );

    // Concurrent first calls on a fresh client share one lookup.
    sim.clear_requests();
    let (cloud, _) = client(&sim, &url);
    let (a, b, c) =
        bounded(async { tokio::join!(cloud.project_id(), cloud.project_id(), cloud.project_id()) })
            .await;
    assert_eq!(
        (a.unwrap(), b.unwrap(), c.unwrap()),
        (want.clone(), want.clone(), want)
    );
    assert_eq!(count(&sim, SimApi::Iam), 1);
}

#[tokio::test]
async fn unknown_project_name_is_a_project_error_naming_it_and_is_not_cached() {
    let (sim, url) = start(SimConfig::default()).await;
    let text = config_for(&sim, &url, &cloud_yaml("5s")).replace(
        "project_name: \"cn-east-3\"",
        "project_name: \"xx-nowhere-9\"",
    );
    let cfg_missing = Config::from_yaml(&text, &|_| None).expect("config");
    assert_eq!(cfg_missing.auth.project_name, "xx-nowhere-9");
    let (cloud, _) = client_with(&cfg_missing);
    let err = bounded(cloud.project_id()).await.unwrap_err();
    match &err {
        CloudError::Project(msg) => assert!(msg.contains("xx-nowhere-9"), "{msg}"),
        other => panic!("expected a project error, got {other:?}"),
    }
    assert_eq!(err.metric_code(), "project");
    assert!(!err.is_retryable());
    assert_eq!(
        count(&sim, SimApi::Iam),
        1,
        "a definite answer is not retried"
    );

    // A failure is kept only for the retry backoff (10 ms here): once the project exists, the next
    // call after it finds it.
    let id = "1234567890abcdef1234567890abcdef";
    sim.add_project("xx-nowhere-9", id);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(bounded(cloud.project_id()).await.unwrap(), id);
    assert_eq!(count(&sim, SimApi::Iam), 2);
}

#[tokio::test]
async fn ambiguous_project_name_is_a_project_error() {
    let (sim, url) = start(SimConfig::default()).await;
    sim.add_project("cn-east-3", "ffffffffffffffffffffffffffffffff");
    let (cloud, _) = client(&sim, &url);
    let err = bounded(cloud.project_id()).await.unwrap_err();
    match &err {
        CloudError::Project(msg) => {
            assert!(msg.contains("2 projects"), "{msg}");
            assert!(msg.contains("cn-east-3"), "{msg}");
            assert!(msg.contains("auth.project_id"), "{msg}");
        }
        other => panic!("expected a project error, got {other:?}"),
    }
    assert_eq!(count(&sim, SimApi::Iam), 1);
}

#[tokio::test]
async fn configured_project_id_never_asks_iam() {
    let (sim, url) = start(SimConfig::default()).await;
    let q = small_setup(&sim);
    let (cloud, telemetry) = client_with_project(&sim, &url);
    assert_eq!(
        bounded(cloud.project_id()).await.unwrap(),
        sim.config().project_id
    );
    let got = bounded(cloud.batch_query(&q)).await.unwrap();
    assert!(got.newest[0].is_some());
    let listeners = bounded(cloud.list_listeners(ElbVersion::V3, DEDICATED_LB))
        .await
        .unwrap();
    assert_eq!(listeners.len(), 1);
    assert_eq!(count(&sim, SimApi::Iam), 0);
    assert_eq!(count(&sim, SimApi::Ces), 1);
    assert_eq!(count(&sim, SimApi::ElbV3), 1);
    assert_eq!(
        telemetry
            .cloud_requests
            .with_label_values(&["iam_list_projects"])
            .get(),
        0
    );
}

// ---------------------------------------------------------------------------------------------------------
// 2. Listener paging

fn check_pages(reqs: &[SimRequest], limit: usize, min_pages: usize) {
    assert!(
        reqs.len() >= min_pages,
        "expected at least {min_pages} pages, got {}",
        reqs.len()
    );
    let mut markers = HashSet::new();
    for (i, r) in reqs.iter().enumerate() {
        assert_eq!(r.status, 200, "page {i}: {r:?}");
        let pairs: Vec<(&str, &str)> = r
            .query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .collect();
        let get = |k: &str| pairs.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
        assert_eq!(get("limit"), Some(limit.to_string().as_str()), "{r:?}");
        let marker = get("marker");
        if i == 0 {
            assert_eq!(marker, None, "the first page has no marker: {r:?}");
        } else {
            let m = marker.unwrap_or_else(|| panic!("page {i} without marker: {r:?}"));
            assert!(!m.is_empty());
            assert!(markers.insert(m.to_string()), "marker {m} repeated");
        }
    }
}

#[tokio::test]
async fn thousands_of_listeners_are_paged_on_v2_and_v3() {
    const N: usize = 2500;
    let (sim, url) = start(SimConfig::default()).await;
    sim.add_loadbalancer(SHARED_LB, LbKind::Shared);
    sim.add_loadbalancer(DEDICATED_LB, LbKind::Dedicated);
    let v2_protocols = ["TCP", "UDP", "HTTP", "TERMINATED_HTTPS"];
    let v3_protocols = ["TCP", "UDP", "HTTP", "HTTPS", "QUIC", "TLS"];
    let mut expected: HashMap<(u32, String), SimListener> = HashMap::new();
    for i in 0..N {
        // Interleaved, so each API must filter by load balancer and kind.
        for (tag, lb, protocols) in [
            (0xa2u32, SHARED_LB, &v2_protocols[..]),
            (0xb3u32, DEDICATED_LB, &v3_protocols[..]),
        ] {
            let l = SimListener::new(
                listener_id(tag, i),
                format!("listener-{tag:x}-{i}"),
                protocols[i % protocols.len()],
                (1 + (i * 7 + tag as usize) % 65535) as u16,
            );
            sim.add_listener(lb, l.clone());
            expected.insert((tag, l.id.clone()), l);
        }
    }
    let (cloud, _) = client(&sim, &url);
    for (version, lb, tag, api, limit, min_pages) in [
        (ElbVersion::V2, SHARED_LB, 0xa2u32, SimApi::ElbV2, 500, 5),
        (
            ElbVersion::V3,
            DEDICATED_LB,
            0xb3u32,
            SimApi::ElbV3,
            2000,
            2,
        ),
    ] {
        let got = bounded(cloud.list_listeners(version, lb)).await.unwrap();
        assert_eq!(got.len(), N, "{version:?}");
        let ids: HashSet<&str> = got.iter().map(|l| l.id.as_str()).collect();
        assert_eq!(ids.len(), N, "{version:?}: every listener exactly once");
        for l in &got {
            let want = expected
                .get(&(tag, l.id.clone()))
                .unwrap_or_else(|| panic!("{version:?}: unexpected listener {l:?}"));
            assert_eq!(l.name, want.name);
            assert_eq!(l.port, want.port);
            assert_eq!(l.protocol, want.protocol);
        }
        let reqs = of(&sim, api);
        check_pages(&reqs, limit, min_pages);
        // Bounded: one page more than needed at most (a final empty page).
        assert!(
            reqs.len() <= N.div_ceil(limit) + 1,
            "{version:?}: {} pages",
            reqs.len()
        );
        for r in &reqs {
            assert!(r.query.contains(&format!("loadbalancer_id={lb}")), "{r:?}");
            assert!(
                r.path.contains(&sim.config().project_id),
                "project-scoped path: {r:?}"
            );
        }
    }
    assert_eq!(count(&sim, SimApi::Iam), 1, "the project was resolved once");
}

// ---------------------------------------------------------------------------------------------------------
// 3. CES batch of 500

/// A full v2 page of 500 listeners whose last id is `last` (the next marker).
fn full_v2_page(lb: &str, tag: u32, last: &str) -> String {
    let mut items: Vec<serde_json::Value> = (0..499)
        .map(|i| {
            serde_json::json!({"id": listener_id(tag, i), "name": "n", "protocol": "TCP",
                "protocol_port": 1000 + i, "loadbalancers": [{"id": lb}]})
        })
        .collect();
    items.push(
        serde_json::json!({"id": last, "name": "n", "protocol": "TCP",
        "protocol_port": 80, "loadbalancers": [{"id": lb}]}),
    );
    serde_json::json!({ "listeners": items }).to_string()
}

/// Paging that comes back to an earlier marker (A, B, A) stops with an error instead of going round.
#[tokio::test]
async fn paging_stops_on_any_marker_seen_before() {
    let (sim, url) = start(SimConfig::default()).await;
    sim.add_loadbalancer(SHARED_LB, LbKind::Shared);
    let (cloud, _) = client_with_project(&sim, &url);
    let (a, b) = (listener_id(0xa, 999), listener_id(0xb, 999));
    for (tag, last) in [(1, &a), (2, &b), (3, &a)] {
        sim.inject(
            SimApi::ElbV2,
            status_fault(200, &full_v2_page(SHARED_LB, tag, last), 1),
        );
    }
    let err = bounded(cloud.list_listeners(ElbVersion::V2, SHARED_LB))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CloudError::Malformed(_, m) if m.contains("came back")),
        "{err:?}"
    );
    assert_eq!(count(&sim, SimApi::ElbV2), 3, "no page after the repeat");
}

/// A full-port listener (port 0, protocol IP, on a dedicated ELB) is valid: it is attributed to no port
/// and counted as `unattributable_listener`, not as `invalid_listener`.
#[tokio::test]
async fn a_port_0_listener_is_unattributable_not_invalid() {
    let (sim, url) = start(SimConfig::default()).await;
    sim.add_loadbalancer(DEDICATED_LB, LbKind::Dedicated);
    sim.add_listener(
        DEDICATED_LB,
        SimListener::new(listener_id(7, 0), "all", "IP", 0),
    );
    sim.add_listener(
        DEDICATED_LB,
        SimListener::new(listener_id(7, 1), "k8s_TCP_80", "TCP", 80),
    );
    let (cloud, telemetry) = client_with_project(&sim, &url);
    let got = bounded(cloud.list_listeners(ElbVersion::V3, DEDICATED_LB))
        .await
        .unwrap();
    assert_eq!(
        got.iter().map(|l| l.port).collect::<Vec<_>>(),
        vec![80],
        "{got:?}"
    );
    let skipped = |r: &str| telemetry.skipped.with_label_values(&[r]).get();
    assert_eq!(skipped("unattributable_listener"), 1);
    assert_eq!(skipped("invalid_listener"), 0);
}

#[tokio::test]
async fn a_500_metric_batch_is_matched_to_the_request() {
    let (sim, url) = start(SimConfig::default()).await;
    sim.add_loadbalancer(SHARED_LB, LbKind::Shared);
    sim.add_loadbalancer(DEDICATED_LB, LbKind::Dedicated);
    // 39 listeners: TCP (every metric), HTTP (no TCP reset metrics), and unknown ids (nothing).
    let mut listeners: Vec<(String, &str, &str)> = Vec::new(); // (id, lb, protocol or "unknown")
    for i in 0..39usize {
        let lb = if i % 2 == 0 { SHARED_LB } else { DEDICATED_LB };
        let id = listener_id(0xce5, i);
        let protocol = match i {
            3 | 20 => "unknown",
            _ if i % 5 == 0 => "HTTP",
            _ => "TCP",
        };
        if protocol != "unknown" {
            sim.add_listener(
                lb,
                SimListener::new(&id, format!("l{i}"), protocol, 8000 + i as u16),
            );
        }
        listeners.push((id, lb, protocol));
    }
    let mut metrics: Vec<MetricQuery> = Vec::new();
    let mut meta: Vec<(usize, &str)> = Vec::new();
    for (i, (id, lb, _)) in listeners.iter().enumerate() {
        for m in METRICS {
            metrics.push(query(lb, id, m));
            meta.push((i, m));
        }
    }
    assert_eq!(metrics.len(), 39 * 13);
    metrics.truncate(500);
    meta.truncate(500);

    let (cloud, telemetry) = client_with_project(&sim, &url);
    let q = batch(metrics);
    let before = sim.newest_minute(now_ms());
    let result = bounded(cloud.batch_query(&q)).await.unwrap();
    let after = sim.newest_minute(now_ms());

    let ces = of(&sim, SimApi::Ces);
    assert_eq!(ces.len(), 1, "one call for 500 metrics");
    assert_eq!(ces[0].status, 200);
    assert_eq!(ces[0].ces_metrics, 500);
    assert_eq!(ces[0].budget_from, None, "within the datapoint budget");
    assert_eq!(result.newest.len(), 500);
    assert!(result.skipped.is_empty(), "{:?}", result.skipped);

    let mut present = 0;
    for (k, ((i, metric), point)) in meta.iter().zip(&result.newest).enumerate() {
        let (id, _, protocol) = &listeners[*i];
        let expect_data = match *protocol {
            "unknown" => false,
            "HTTP" => !TCP_RESET_METRICS.contains(metric),
            _ => true,
        };
        match point {
            Some(p) => {
                assert!(
                    expect_data,
                    "#{k} {id} {metric} ({protocol}) has data {p:?}"
                );
                assert!(
                    p.timestamp_ms == before || p.timestamp_ms == after,
                    "#{k}: newest minute {} not {before}/{after}",
                    p.timestamp_ms
                );
                assert_eq!(
                    p.value,
                    datapoint_value(id, metric, p.timestamp_ms),
                    "#{k} {id} {metric}"
                );
                present += 1;
            }
            None => assert!(!expect_data, "#{k} {id} {metric} ({protocol}) has no data"),
        }
    }
    assert!(present > 400, "{present} results present");
    assert_eq!(
        telemetry
            .cloud_requests
            .with_label_values(&["ces_batch_query"])
            .get(),
        1
    );
}

// ---------------------------------------------------------------------------------------------------------
// 4. Wrong SK

#[tokio::test]
async fn wrong_secret_key_is_unauthorized_and_not_retried() {
    let (sim, url) = start(SimConfig::default()).await;
    let q = small_setup(&sim);
    let good_sk = sim.config().sk.clone();
    let bad_sk = "WrongSecretKey00000000000000000000000001";
    assert_ne!(good_sk, bad_sk);
    let text = config_for(&sim, &url, &cloud_yaml("5s")).replace(&good_sk, bad_sk);
    let auth_pid = format!("auth:\n  project_id: \"{}\"\n", sim.config().project_id);
    let with_pid = text.replacen("auth:\n", &auth_pid, 1);

    // A CES call with the project configured.
    let (cloud, telemetry) = client_with(&Config::from_yaml(&with_pid, &|_| None).unwrap());
    let err = bounded(cloud.batch_query(&q)).await.unwrap_err();
    assert!(matches!(err, CloudError::Unauthorized(..)), "{err:?}");
    assert_eq!(err.cloud_code(), Some("APIGW.0301"));
    assert_eq!(err.metric_code(), "401");
    assert!(!err.is_retryable());
    let ces = of(&sim, SimApi::Ces);
    assert_eq!(ces.len(), 1, "not retried: {ces:?}");
    assert_eq!(ces[0].status, 401);
    assert_eq!(
        telemetry
            .cloud_failures
            .with_label_values(&["ces_batch_query", "401"])
            .get(),
        1
    );

    // The IAM lookup with the wrong key fails the same way.
    let (cloud, _) = client_with(&Config::from_yaml(&text, &|_| None).unwrap());
    let err = bounded(cloud.project_id()).await.unwrap_err();
    assert!(matches!(err, CloudError::Unauthorized(..)), "{err:?}");
    assert_eq!(err.cloud_code(), Some("APIGW.0301"));
    assert_eq!(count(&sim, SimApi::Iam), 1);

    // The right key still works (two failures do not lock the AK).
    let (cloud, _) = client_with_project(&sim, &url);
    assert!(bounded(cloud.batch_query(&q)).await.is_ok());
}

// ---------------------------------------------------------------------------------------------------------
// 5. Injected faults

/// Injects `fault` on CES, runs one batch call, and returns its result plus the CES requests it caused.
async fn ces_call_with(
    fault: Fault,
) -> (
    Result<elb_exporter::cloud::BatchResult, CloudError>,
    Vec<SimRequest>,
    Telemetry,
) {
    let (sim, url) = start(SimConfig::default()).await;
    let q = small_setup(&sim);
    let (cloud, telemetry) = client_with_project(&sim, &url);
    sim.inject(SimApi::Ces, fault);
    let result = bounded(cloud.batch_query(&q)).await;
    (result, of(&sim, SimApi::Ces), telemetry)
}

fn status_fault(status: u16, body: &str, count: u32) -> Fault {
    Fault::Status {
        status,
        body: body.to_string(),
        count,
    }
}

fn failures(t: &Telemetry, code: &str) -> u64 {
    t.cloud_failures
        .with_label_values(&["ces_batch_query", code])
        .get()
}

#[tokio::test]
async fn definite_errors_are_typed_and_not_retried() {
    let cases: [(Fault, &str, Option<&str>); 3] = [
        (
            status_fault(
                401,
                r#"{"error_msg":"Incorrect IAM authentication information: verify aksk signature fail","error_code":"APIGW.0301","request_id":"r1"}"#,
                MAX_ATTEMPTS,
            ),
            "401",
            Some("APIGW.0301"),
        ),
        (
            status_fault(
                403,
                r#"{"error_code":"ces.0017","error_msg":"Insufficient permissions"}"#,
                MAX_ATTEMPTS,
            ),
            "403",
            Some("ces.0017"),
        ),
        (
            status_fault(
                404,
                r#"{"error_code":"ces.0016","error_msg":"The project does not exist"}"#,
                MAX_ATTEMPTS,
            ),
            "404",
            Some("ces.0016"),
        ),
    ];
    for (fault, code, cloud_code) in cases {
        let (result, reqs, telemetry) = ces_call_with(fault).await;
        let err = result.expect_err(code);
        match (code, &err) {
            ("401", CloudError::Unauthorized(..))
            | ("403", CloudError::Forbidden(..))
            | ("404", CloudError::NotFound(..)) => {}
            _ => panic!("{code}: wrong kind {err:?}"),
        }
        assert_eq!(err.metric_code(), code);
        assert_eq!(err.cloud_code(), cloud_code);
        assert!(!err.is_retryable(), "{code}");
        assert_eq!(reqs.len(), 1, "{code} is not retried: {reqs:?}");
        assert_eq!(reqs[0].status.to_string(), code);
        assert_eq!(failures(&telemetry, code), 1);
    }
}

#[tokio::test]
async fn bad_request_is_typed_and_not_retried() {
    let (sim, url) = start(SimConfig::default()).await;
    let mut q = small_setup(&sim);
    // A real validation failure of the simulator: `from` must be earlier than `to`.
    q.from_ms = q.to_ms;
    let (cloud, telemetry) = client_with_project(&sim, &url);
    let err = bounded(cloud.batch_query(&q)).await.unwrap_err();
    assert!(matches!(err, CloudError::BadRequest(..)), "{err:?}");
    assert_eq!(err.cloud_code(), Some("ces.0014"));
    assert_eq!(err.metric_code(), "400");
    assert!(err.to_string().contains("from"), "{err}");
    let ces = of(&sim, SimApi::Ces);
    assert_eq!(ces.len(), 1, "not retried: {ces:?}");
    assert_eq!(ces[0].error_code.as_deref(), Some("ces.0014"));
    assert_eq!(failures(&telemetry, "400"), 1);
}

#[tokio::test]
async fn throttling_is_retried_until_attempts_run_out() {
    let (result, reqs, telemetry) = ces_call_with(Fault::Throttle {
        retry_after_secs: None,
        count: MAX_ATTEMPTS,
    })
    .await;
    let err = result.unwrap_err();
    assert!(matches!(err, CloudError::Throttled(..)), "{err:?}");
    assert_eq!(err.metric_code(), "429");
    assert_eq!(err.cloud_code(), Some("ces.0429"));
    assert_eq!(reqs.len(), MAX_ATTEMPTS as usize, "{reqs:?}");
    assert!(reqs.iter().all(|r| r.status == 429));
    assert_eq!(failures(&telemetry, "429"), u64::from(MAX_ATTEMPTS));

    // One attempt fewer than the budget: the last attempt succeeds.
    let (result, reqs, _) = ces_call_with(Fault::Throttle {
        retry_after_secs: None,
        count: MAX_ATTEMPTS - 1,
    })
    .await;
    assert!(result.unwrap().newest[0].is_some());
    assert_eq!(reqs.len(), MAX_ATTEMPTS as usize);
    assert_eq!(reqs.last().map(|r| r.status), Some(200));
}

#[tokio::test]
async fn server_errors_are_retried() {
    let body = r#"{"error_code":"ces.0007","error_msg":"internal error"}"#;
    let (result, reqs, telemetry) = ces_call_with(status_fault(500, body, 1)).await;
    let got = result.expect("the second attempt succeeds");
    assert!(got.newest[0].is_some());
    assert_eq!(
        reqs.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![500, 200]
    );
    assert_eq!(failures(&telemetry, "500"), 1);

    let (result, reqs, _) = ces_call_with(status_fault(500, body, MAX_ATTEMPTS)).await;
    let err = result.unwrap_err();
    assert!(matches!(err, CloudError::Server(..)), "{err:?}");
    assert_eq!(err.metric_code(), "500");
    assert_eq!(err.cloud_code(), Some("ces.0007"));
    assert_eq!(reqs.len(), MAX_ATTEMPTS as usize);
}

#[tokio::test]
async fn malformed_answers_are_retried() {
    let (result, reqs, telemetry) = ces_call_with(Fault::Malformed { count: 1 }).await;
    let got = result.expect("a malformed answer is retried");
    assert!(got.newest[0].is_some());
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(failures(&telemetry, "malformed"), 1);

    let (result, reqs, telemetry) = ces_call_with(Fault::Malformed {
        count: MAX_ATTEMPTS,
    })
    .await;
    let err = result.unwrap_err();
    assert!(matches!(err, CloudError::Malformed(..)), "{err:?}");
    assert_eq!(err.metric_code(), "malformed");
    assert_eq!(reqs.len(), MAX_ATTEMPTS as usize);
    assert_eq!(failures(&telemetry, "malformed"), u64::from(MAX_ATTEMPTS));
}

#[tokio::test]
async fn malformed_iam_and_elb_answers_are_retried() {
    let (sim, url) = start(SimConfig::default()).await;
    sim.add_loadbalancer(DEDICATED_LB, LbKind::Dedicated);
    for i in 0..3 {
        sim.add_listener(
            DEDICATED_LB,
            SimListener::new(listener_id(0xe1b, i), format!("l{i}"), "TCP", 80 + i as u16),
        );
    }
    sim.inject(SimApi::Iam, Fault::Malformed { count: 1 });
    sim.inject(SimApi::ElbV3, Fault::Malformed { count: 1 });
    let (cloud, telemetry) = client(&sim, &url);
    assert_eq!(
        bounded(cloud.project_id()).await.unwrap(),
        sim.config().project_id
    );
    let got = bounded(cloud.list_listeners(ElbVersion::V3, DEDICATED_LB))
        .await
        .unwrap();
    assert_eq!(got.len(), 3);
    assert_eq!(count(&sim, SimApi::Iam), 2);
    assert_eq!(count(&sim, SimApi::ElbV3), 2);
    for api in ["iam_list_projects", "elb_list_listeners"] {
        assert_eq!(
            telemetry
                .cloud_failures
                .with_label_values(&[api, "malformed"])
                .get(),
            1,
            "{api}"
        );
        assert_eq!(telemetry.cloud_requests.with_label_values(&[api]).get(), 2);
    }
}

// ---------------------------------------------------------------------------------------------------------
// 6. Retry-After

#[tokio::test]
async fn retry_after_is_honoured() {
    let (sim, url) = start(SimConfig::default()).await;
    let q = small_setup(&sim);
    let (cloud, _) = client_with_project(&sim, &url);
    sim.inject(
        SimApi::Ces,
        Fault::Throttle {
            retry_after_secs: Some(1),
            count: 1,
        },
    );
    let started = Instant::now();
    let got = bounded(cloud.batch_query(&q)).await.unwrap();
    let took = started.elapsed();
    assert!(got.newest[0].is_some());
    assert!(
        took >= Duration::from_secs(1),
        "the retry waited {took:?}, less than Retry-After (max_backoff is 50ms)"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    let ces = of(&sim, SimApi::Ces);
    assert_eq!(
        ces.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![429, 200]
    );
    assert!(ces[1].time_ms - ces[0].time_ms >= 1000, "{ces:?}");
}

/// A 503 with `Retry-After` is waited out like a throttled answer (max_backoff is 50 ms).
#[tokio::test]
async fn retry_after_on_503_is_honoured() {
    let (sim, url) = start(SimConfig::default()).await;
    let q = small_setup(&sim);
    let (cloud, _) = client_with_project(&sim, &url);
    sim.inject(
        SimApi::Ces,
        Fault::Unavailable {
            retry_after_secs: Some(1),
            count: 1,
        },
    );
    let got = bounded(cloud.batch_query(&q)).await.unwrap();
    assert!(got.newest[0].is_some());
    let ces = of(&sim, SimApi::Ces);
    assert_eq!(
        ces.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![503, 200]
    );
    assert!(
        ces[1].time_ms - ces[0].time_ms >= 1000,
        "the retry waited {} ms, less than Retry-After",
        ces[1].time_ms - ces[0].time_ms
    );
}

/// A retry the rate limit would hold past `max_elapsed` is not sent: the call fails when its time is up,
/// not a minute later (1 CES call per minute, max_elapsed 1 s).
#[tokio::test]
async fn no_retry_starts_after_max_elapsed() {
    let (sim, url) = start(SimConfig::default()).await;
    let q = small_setup(&sim);
    let text = config_for(
        &sim,
        &url,
        "cloud:\n  retry:\n    initial_backoff: \"10ms\"\n    max_backoff: \"50ms\"\n    max_elapsed: \"1s\"\n  rate_limit:\n    ces_per_minute: 1\n",
    );
    let text = text.replacen(
        "auth:\n",
        &format!("auth:\n  project_id: \"{}\"\n", sim.config().project_id),
        1,
    );
    let (cloud, _) = client_with(&Config::from_yaml(&text, &|_| None).unwrap());
    sim.inject(
        SimApi::Ces,
        Fault::Unavailable {
            retry_after_secs: None,
            count: 1,
        },
    );
    let started = Instant::now();
    let err = bounded(cloud.batch_query(&q)).await.unwrap_err();
    assert_eq!(err.metric_code(), "503");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "gave up after {took:?}"
    );
    assert_eq!(count(&sim, SimApi::Ces), 1, "the held retry was never sent");
}

// ---------------------------------------------------------------------------------------------------------
// 7. Security token

#[tokio::test]
async fn security_token_is_sent_and_signed() {
    let token = "SimSecurityToken-temporary-credentials-0001";
    let (sim, url) = start(SimConfig {
        security_token: Some(token.to_string()),
        ..SimConfig::default()
    })
    .await;
    let q = small_setup(&sim);

    let with_token = config(
        &sim,
        &url,
        &format!("  security_token: \"{token}\"\n"),
        "5s",
    );
    let (cloud, _) = client_with(&with_token);
    assert_eq!(
        bounded(cloud.project_id()).await.unwrap(),
        sim.config().project_id
    );
    assert!(bounded(cloud.batch_query(&q)).await.unwrap().newest[0].is_some());
    assert!(sim.requests().iter().all(|r| r.status == 200));

    let (cloud, _) = client(&sim, &url);
    let err = bounded(cloud.project_id()).await.unwrap_err();
    assert!(matches!(err, CloudError::Unauthorized(..)), "{err:?}");
    assert_eq!(err.cloud_code(), Some("APIGW.0301"));

    let wrong = config(&sim, &url, "  security_token: \"another-token\"\n", "5s");
    let (cloud, _) = client_with(&wrong);
    let err = bounded(cloud.project_id()).await.unwrap_err();
    assert!(matches!(err, CloudError::Unauthorized(..)), "{err:?}");
    assert_eq!(count(&sim, SimApi::Iam), 3, "401s are not retried");
}

// ---------------------------------------------------------------------------------------------------------
// 8. Telemetry

#[tokio::test]
async fn request_counters_match_the_simulator_log() {
    let (sim, url) = start(SimConfig::default()).await;
    let q = small_setup(&sim);
    let (cloud, telemetry) = client(&sim, &url);
    let body = r#"{"error_code":"ces.0007","error_msg":"internal error"}"#;

    assert!(bounded(cloud.batch_query(&q)).await.is_ok());
    sim.inject(SimApi::Ces, status_fault(500, body, 1));
    assert!(bounded(cloud.batch_query(&q)).await.is_ok());
    sim.inject(
        SimApi::Ces,
        Fault::Throttle {
            retry_after_secs: None,
            count: 2,
        },
    );
    assert!(bounded(cloud.batch_query(&q)).await.is_ok());
    let mut bad = q.clone();
    bad.to_ms = bad.from_ms;
    assert!(matches!(
        bounded(cloud.batch_query(&bad)).await,
        Err(CloudError::BadRequest(..))
    ));

    let ces = of(&sim, SimApi::Ces);
    assert_eq!(ces.len(), 1 + 2 + 3 + 1);
    let requests = |api: &str| telemetry.cloud_requests.with_label_values(&[api]).get();
    assert_eq!(requests("ces_batch_query"), ces.len() as u64);
    assert_eq!(
        requests("iam_list_projects"),
        count(&sim, SimApi::Iam) as u64
    );
    assert_eq!(requests("elb_list_listeners"), 0);
    for (code, n) in [
        ("500", 1),
        ("429", 2),
        ("400", 1),
        ("401", 0),
        ("malformed", 0),
    ] {
        assert_eq!(failures(&telemetry, code), n, "code {code}");
    }
    let by_status = |s: u16| ces.iter().filter(|r| r.status == s).count() as u64;
    assert_eq!(failures(&telemetry, "500"), by_status(500));
    assert_eq!(failures(&telemetry, "429"), by_status(429));
    assert_eq!(failures(&telemetry, "400"), by_status(400));
    assert_eq!(
        telemetry
            .cloud_duration
            .with_label_values(&["ces_batch_query"])
            .get_sample_count(),
        ces.len() as u64
    );
}

// ---------------------------------------------------------------------------------------------------------
// 9. Timeouts

#[tokio::test]
async fn slow_answers_time_out_after_retries() {
    let (sim, url) = start(SimConfig::default()).await;
    let q = small_setup(&sim);
    let pid = format!("  project_id: \"{}\"\n", sim.config().project_id);
    let (cloud, telemetry) = client_with(&config(&sim, &url, &pid, "300ms"));
    sim.inject(
        SimApi::Ces,
        Fault::Delay {
            delay: Duration::from_secs(5),
            count: MAX_ATTEMPTS,
        },
    );
    let started = Instant::now();
    let err = bounded(cloud.batch_query(&q)).await.unwrap_err();
    let took = started.elapsed();
    match &err {
        CloudError::Timeout(_, d) => assert_eq!(*d, Duration::from_millis(300)),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(err.metric_code(), "timeout");
    assert!(
        took >= Duration::from_millis(300 * u64::from(MAX_ATTEMPTS)),
        "{MAX_ATTEMPTS} attempts of 300ms took {took:?}"
    );
    assert!(
        took < Duration::from_secs(4),
        "bounded by the timeout: {took:?}"
    );
    assert_eq!(
        telemetry
            .cloud_requests
            .with_label_values(&["ces_batch_query"])
            .get(),
        u64::from(MAX_ATTEMPTS)
    );
    assert_eq!(failures(&telemetry, "timeout"), u64::from(MAX_ATTEMPTS));

    // The faults are used up: the next call is answered in time.
    assert!(bounded(cloud.batch_query(&q)).await.unwrap().newest[0].is_some());
}

fn iam_failures(t: &Telemetry, api: &str, code: &str) -> u64 {
    t.cloud_failures.with_label_values(&[api, code]).get()
}

/// An IAM user with only "ELB ReadOnlyAccess" + "CES ReadOnlyAccess" may not list projects by name
/// (403 IAM.0002); the project is then found among the projects it may access (`/v3/auth/projects`).
#[tokio::test]
async fn least_privilege_user_resolves_the_project_through_auth_projects() {
    let (sim, url) = start(SimConfig {
        user: SimUser::LeastPrivilege,
        ..SimConfig::default()
    })
    .await;
    let (cloud, telemetry) = client(&sim, &url);
    let want = sim.config().project_id.clone();
    assert_eq!(bounded(cloud.project_id()).await.unwrap(), want);
    let iam = of(&sim, SimApi::Iam);
    let seen: Vec<(&str, u16, Option<&str>)> = iam
        .iter()
        .map(|r| (r.path.as_str(), r.status, r.error_code.as_deref()))
        .collect();
    assert_eq!(
        seen,
        [
            ("/v3/projects", 403, Some("IAM.0002")),
            ("/v3/auth/projects", 200, None)
        ]
    );
    assert_eq!(
        iam_failures(&telemetry, "iam_list_projects", "403"),
        1,
        "the refusal is counted"
    );
    assert_eq!(
        telemetry
            .cloud_requests
            .with_label_values(&["iam_list_auth_projects"])
            .get(),
        1
    );
    // ELB and CES work with the resolved project.
    let q = small_setup(&sim);
    bounded(cloud.batch_query(&q)).await.expect("CES answers");
}

/// When both lookups are refused the error says what to do; the failure is kept for the retry backoff
/// (no IAM storm), and a later grant of `iam:projects:list` heals it without a new client.
#[tokio::test]
async fn refused_project_lookups_say_what_to_do_and_heal_after_a_grant() {
    let (sim, url) = start(SimConfig {
        user: SimUser::LeastPrivilege,
        auth_projects_with_aksk: false,
        ..SimConfig::default()
    })
    .await;
    let text = config_for(&sim, &url, &cloud_yaml("5s"))
        .replace("initial_backoff: \"10ms\"", "initial_backoff: \"500ms\"")
        .replace("max_backoff: \"50ms\"", "max_backoff: \"1s\"");
    let cfg = Config::from_yaml(&text, &|_| None).expect("config");
    let (cloud, telemetry) = client_with(&cfg);
    let err = bounded(cloud.project_id()).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, CloudError::Project(_)), "{err:?}");
    for fix in [
        "set auth.project_id",
        "grant the IAM user iam:projects:list",
    ] {
        assert!(msg.contains(fix), "{msg}");
    }
    assert_eq!(iam_failures(&telemetry, "iam_list_projects", "403"), 1);
    assert_eq!(iam_failures(&telemetry, "iam_list_auth_projects", "403"), 1);
    // Within the backoff: the same answer, no new request.
    let again = bounded(cloud.project_id()).await.unwrap_err();
    assert_eq!(again.to_string(), msg);
    assert_eq!(count(&sim, SimApi::Iam), 2);

    sim.grant("iam:projects:list");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        bounded(cloud.project_id()).await.unwrap(),
        sim.config().project_id
    );
    let last = of(&sim, SimApi::Iam).pop().unwrap();
    assert_eq!((last.path.as_str(), last.status), ("/v3/projects", 200));
}

/// A 403 names the permission of the API that refused, not every permission the exporter uses.
#[tokio::test]
async fn a_403_names_the_permission_of_its_api() {
    let (sim, url) = start(SimConfig {
        user: SimUser::LeastPrivilege,
        ..SimConfig::default()
    })
    .await;
    let (cloud, _) = client_with_project(&sim, &url);
    let q = small_setup(&sim);
    sim.inject(
        SimApi::Ces,
        status_fault(403, r#"{"error_code":"ces.0017","error_msg":"Policy doesn't allow ces:metricData:list to be performed."}"#, 1),
    );
    let ces = bounded(cloud.batch_query(&q))
        .await
        .unwrap_err()
        .to_string();
    assert!(ces.contains("lacks ces:metricData:list"), "{ces}");
    assert!(ces.contains("granted in this region's project"), "{ces}");
    assert!(!ces.contains("elb:") && !ces.contains("iam:"), "{ces}");
    sim.inject(
        SimApi::ElbV3,
        status_fault(
            403,
            r#"{"http_code":"403","message":{"details":"denied","code":"403"}}"#,
            1,
        ),
    );
    let elb = bounded(cloud.list_listeners(ElbVersion::V3, DEDICATED_LB))
        .await
        .unwrap_err()
        .to_string();
    assert!(elb.contains("lacks elb:listeners:list"), "{elb}");
    assert!(!elb.contains("ces:") && !elb.contains("iam:"), "{elb}");
}

/// `n` metrics over TCP listeners of one dedicated load balancer, every one with data.
fn many_metrics(sim: &CloudSim, n: usize) -> BatchQuery {
    sim.add_loadbalancer(DEDICATED_LB, LbKind::Dedicated);
    let mut metrics = Vec::new();
    for i in 0..n.div_ceil(METRICS.len()) {
        let id = listener_id(0x10, i);
        sim.add_listener(
            DEDICATED_LB,
            SimListener::new(&id, format!("l{i}"), "TCP", 8000 + i as u16),
        );
        for m in METRICS {
            metrics.push(query(DEDICATED_LB, &id, m));
        }
    }
    metrics.truncate(n);
    batch(metrics)
}

/// A cloud whose CES takes 10 metrics per call (Open Telekom Cloud): the refused batch is retried as its
/// first 10 metrics; accepted, 10 is the limit from then on (exported), and the batch is still answered
/// whole, in request order.
#[tokio::test]
async fn a_10_metric_ces_limit_is_learned_by_experiment() {
    let (sim, url) = start(SimConfig {
        ces_max_metrics: 10,
        ..SimConfig::default()
    })
    .await;
    let (cloud, telemetry) = client_with_project(&sim, &url);
    assert_eq!(telemetry.ces_batch_size.get(), 500);
    let q = many_metrics(&sim, 25);
    let result = bounded(cloud.batch_query(&q))
        .await
        .expect("answered in parts");
    assert_eq!(result.newest.len(), 25);
    assert!(result.newest.iter().all(Option::is_some), "{result:?}");
    let sizes: Vec<(usize, u16)> = of(&sim, SimApi::Ces)
        .iter()
        .map(|r| (r.ces_metrics, r.status))
        .collect();
    assert_eq!(sizes, [(25, 400), (10, 200), (10, 200), (5, 200)]);
    assert_eq!(cloud.ces_batch_limit(), Some(10));
    assert_eq!(telemetry.ces_batch_size.get(), 10);

    // Learned: no more refused calls.
    sim.clear_requests();
    bounded(cloud.batch_query(&q)).await.unwrap();
    let sizes: Vec<usize> = of(&sim, SimApi::Ces)
        .iter()
        .map(|r| r.ces_metrics)
        .collect();
    assert_eq!(sizes, [10, 10, 5]);
}

/// A 400 that is not about the size (the 10-metric batch is refused too) keeps the size and reports
/// the 400.
#[tokio::test]
async fn a_400_for_another_reason_keeps_the_batch_size() {
    let (sim, url) = start(SimConfig::default()).await;
    let (cloud, telemetry) = client_with_project(&sim, &url);
    let q = many_metrics(&sim, 25);
    let body =
        r#"{"error_code":"ces.0014","error_msg":"Some content in message body is not correct"}"#;
    sim.inject(SimApi::Ces, status_fault(400, body, 2));
    let err = bounded(cloud.batch_query(&q)).await.unwrap_err();
    assert!(matches!(err, CloudError::BadRequest(..)), "{err:?}");
    let sizes: Vec<usize> = of(&sim, SimApi::Ces)
        .iter()
        .map(|r| r.ces_metrics)
        .collect();
    assert_eq!(sizes, [25, 10]);
    assert_eq!(cloud.ces_batch_limit(), None);
    assert_eq!(telemetry.ces_batch_size.get(), 500);
    // A batch of 10 or fewer is never split.
    sim.inject(SimApi::Ces, status_fault(400, body, 1));
    sim.clear_requests();
    let small = batch(q.metrics[..10].to_vec());
    assert!(bounded(cloud.batch_query(&small)).await.is_err());
    assert_eq!(count(&sim, SimApi::Ces), 1);
}

/// Should the fallback answer 401 (it is documented for token callers only), that says nothing about the
/// key IAM just accepted: the auth gate stays open, and a later grant heals the lookup.
#[tokio::test]
async fn a_401_from_the_auth_projects_fallback_does_not_pause_the_credential() {
    let (sim, url) = start(SimConfig {
        user: SimUser::LeastPrivilege,
        ..SimConfig::default()
    })
    .await;
    let (cloud, telemetry) = client(&sim, &url);
    let forbidden = r#"{"error_msg":"You are not authorized to perform the requested action.","error_code":"IAM.0002"}"#;
    let token_only = r#"{"error_msg":"Incorrect IAM authentication information: AK/SK is not supported","error_code":"APIGW.0301"}"#;
    sim.inject(SimApi::Iam, status_fault(403, forbidden, 1));
    sim.inject(SimApi::Iam, status_fault(401, token_only, 1));
    let err = bounded(cloud.project_id()).await.unwrap_err().to_string();
    assert!(
        err.contains("was refused too") && err.contains("set auth.project_id"),
        "{err}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    // No fault left: /v3/projects is refused by policy, /v3/auth/projects answers.
    assert_eq!(
        bounded(cloud.project_id()).await.unwrap(),
        sim.config().project_id
    );
    assert_eq!(
        telemetry
            .paused_calls
            .with_label_values(&["iam_list_projects"])
            .get(),
        0
    );
}

/// A v3 listing the cloud refuses (400) because one id is malformed is split until that id is alone:
/// the other load balancers keep their listeners.
#[tokio::test]
async fn a_400_for_a_v3_listing_is_split_to_isolate_the_malformed_id() {
    let (sim, url) = start(SimConfig {
        v3_rejects_malformed_ids: true,
        ..SimConfig::default()
    })
    .await;
    let good: Vec<String> = (0..5).map(|i| listener_id(0x1b, i)).collect();
    for (i, lb) in good.iter().enumerate() {
        sim.add_loadbalancer(lb, LbKind::Dedicated);
        sim.add_listener(
            lb,
            SimListener::new(listener_id(0x2b, i), "k8s_TCP_80", "TCP", 80),
        );
    }
    let mut ids: Vec<&str> = good.iter().map(String::as_str).collect();
    ids.insert(3, "not-a-uuid");
    let (cloud, _) = client_with_project(&sim, &url);
    let listing = bounded(cloud.list_listeners_of(ElbVersion::V3, &ids, Lane::Priority))
        .await
        .expect("the good ids are listed");
    let mut found: Vec<&str> = listing.by_lb.keys().map(String::as_str).collect();
    found.sort();
    assert_eq!(found, good.iter().map(String::as_str).collect::<Vec<_>>());
    let refused = of(&sim, SimApi::ElbV3)
        .iter()
        .filter(|r| r.status == 400)
        .count();
    // 6 ids -> [3 good | bad + 2] -> [bad | 2] -> [bad]: three refusals, each half of the last split.
    assert_eq!(refused, 3, "{:?}", of(&sim, SimApi::ElbV3));
    // A listing of the malformed id alone stays an error.
    let err = bounded(cloud.list_listeners_of(ElbVersion::V3, &["not-a-uuid"], Lane::Priority))
        .await
        .unwrap_err();
    assert!(matches!(err, CloudError::BadRequest(..)), "{err:?}");
}

/// Open Telekom Cloud lists shared-LB listeners only at `/v2.0/lbaas/listeners`: when the Huawei v2
/// route answers 404, the client asks that path with the same filters, and remembers it.
#[tokio::test]
async fn shared_lb_listeners_fall_back_to_the_openstack_path_and_remember_it() {
    let (sim, url) = start(SimProfile::Otc.config()).await;
    sim.add_loadbalancer(SHARED_LB, LbKind::Shared);
    sim.add_listener(
        SHARED_LB,
        SimListener::new(listener_id(0x0c, 1), "k8s_TCP_80", "TCP", 80),
    );
    let (cloud, telemetry) = client_with_project(&sim, &url);
    for _ in 0..2 {
        let listing =
            bounded(cloud.list_listeners_of(ElbVersion::V2, &[SHARED_LB], Lane::Priority))
                .await
                .expect("listed");
        assert_eq!(listing.by_lb[SHARED_LB].len(), 1);
    }
    let paths: Vec<(String, u16)> = of(&sim, SimApi::ElbV2)
        .into_iter()
        .map(|r| (r.path.split('/').nth(1).unwrap_or("").to_string(), r.status))
        .collect();
    // The gateway does not log unknown routes: the one 404 shows in the failure counter.
    let want = [("v2.0", 200), ("v2.0", 200)].map(|(p, s)| (p.to_string(), s));
    assert_eq!(paths, want);
    assert_eq!(
        telemetry
            .cloud_failures
            .with_label_values(&["elb_list_listeners", "404"])
            .get(),
        1,
        "the v2 route is asked once, then the choice is remembered"
    );
    let filtered = of(&sim, SimApi::ElbV2).pop().unwrap();
    assert!(
        filtered
            .query
            .contains(&format!("loadbalancer_id={SHARED_LB}")),
        "{filtered:?}"
    );

    // Huawei Cloud: the v2 route answers; the OpenStack path is never asked.
    let (sim, url) = start(SimProfile::HuaweiCn.config()).await;
    sim.add_loadbalancer(SHARED_LB, LbKind::Shared);
    let (cloud, _) = client_with_project(&sim, &url);
    bounded(cloud.list_listeners_of(ElbVersion::V2, &[SHARED_LB], Lane::Priority))
        .await
        .unwrap();
    assert!(
        of(&sim, SimApi::ElbV2)
            .iter()
            .all(|r| r.path.starts_with("/v2/"))
    );
}

/// Open Telekom Cloud documents shared-LB pools and forwarding policies only at `/v2.0/lbaas/pools` and
/// `/v2.0/lbaas/l7policies`: both listings fall back there (same filters), and once one has, the other
/// v2 listings go straight to the OpenStack paths. Huawei Cloud never sees them.
#[tokio::test]
async fn shared_lb_pools_and_policies_fall_back_to_the_openstack_paths() {
    for profile in [SimProfile::Otc, SimProfile::HuaweiCn] {
        let (sim, url) = start(profile.config()).await;
        sim.add_loadbalancer(SHARED_LB, LbKind::Shared);
        let listener = listener_id(0x0d, 1);
        sim.add_listener(
            SHARED_LB,
            SimListener::new(listener.clone(), "k8s_HTTP_80", "HTTP", 80),
        );
        let pool = sim.add_cce_route(SHARED_LB, &listener, 80, "shop", "cart", 8080, "uid-1");
        let (cloud, telemetry) = client_with_project(&sim, &url);
        for _ in 0..2 {
            let pools = bounded(cloud.list_pools(ElbVersion::V2, SHARED_LB, Lane::Priority))
                .await
                .expect("pools listed");
            assert_eq!(
                pools.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
                [pool.as_str()],
                "{profile:?}"
            );
            let policies =
                bounded(cloud.list_l7policies(ElbVersion::V2, &[&listener], Lane::Priority))
                    .await
                    .expect("policies listed");
            assert_eq!(policies.len(), 1, "{profile:?}");
            assert_eq!(policies[0].redirect_pool_id.as_deref(), Some(pool.as_str()));
        }
        let paths: Vec<(String, u16)> = of(&sim, SimApi::ElbV2)
            .into_iter()
            .map(|r| (r.path.replace(&sim.config().project_id, "P"), r.status))
            .collect();
        let want: Vec<(String, u16)> = match profile {
            SimProfile::Otc => [
                "/v2.0/lbaas/pools",
                "/v2.0/lbaas/l7policies",
                "/v2.0/lbaas/pools",
                "/v2.0/lbaas/l7policies",
            ]
            .map(|p| (p.to_string(), 200))
            .to_vec(),
            _ => [
                "/v2/P/elb/pools",
                "/v2/P/elb/l7policies",
                "/v2/P/elb/pools",
                "/v2/P/elb/l7policies",
            ]
            .map(|p| (p.to_string(), 200))
            .to_vec(),
        };
        assert_eq!(paths, want, "{profile:?}");
        // The gateway does not log unknown routes: the one 404 shows in the failure counter.
        let not_found = |api: &str| {
            telemetry
                .cloud_failures
                .with_label_values(&[api, "404"])
                .get()
        };
        let asked_once = u64::from(profile == SimProfile::Otc);
        assert_eq!(
            (
                not_found("elb_list_pools"),
                not_found("elb_list_l7policies")
            ),
            (asked_once, 0),
            "{profile:?}: the Huawei route is asked once, then the choice is remembered"
        );
        let last = of(&sim, SimApi::ElbV2).pop().unwrap();
        assert!(
            last.query.contains(&format!("listener_id={listener}")),
            "{last:?}"
        );
    }
}

/// A v3 forwarding-policy listing the cloud refuses (400) because one listener id is malformed is split
/// until that id is alone: the other listeners keep their policies.
#[tokio::test]
async fn a_400_for_a_v3_policy_listing_is_split_to_isolate_the_malformed_id() {
    let (sim, url) = start(SimConfig {
        v3_rejects_malformed_ids: true,
        ..SimConfig::default()
    })
    .await;
    sim.add_loadbalancer(DEDICATED_LB, LbKind::Dedicated);
    let listeners: Vec<String> = (0..5).map(|i| listener_id(0x3b, i)).collect();
    let mut pools = Vec::new();
    for (i, l) in listeners.iter().enumerate() {
        let port = 80 + i as u16;
        sim.add_listener(
            DEDICATED_LB,
            SimListener::new(l.clone(), format!("k8s_HTTP_{port}"), "HTTP", port),
        );
        pools.push(sim.add_cce_route(DEDICATED_LB, l, port, "shop", "cart", 8080, "uid-1"));
    }
    let mut ids: Vec<&str> = listeners.iter().map(String::as_str).collect();
    ids.insert(3, "not-a-uuid");
    let (cloud, _) = client_with_project(&sim, &url);
    let policies = bounded(cloud.list_l7policies(ElbVersion::V3, &ids, Lane::Priority))
        .await
        .expect("the good ids are listed");
    let mut found: Vec<&str> = policies
        .iter()
        .filter_map(|p| p.redirect_pool_id.as_deref())
        .collect();
    found.sort();
    pools.sort();
    assert_eq!(found, pools.iter().map(String::as_str).collect::<Vec<_>>());
    let refused = of(&sim, SimApi::ElbV3)
        .iter()
        .filter(|r| r.status == 400)
        .count();
    // 6 ids -> [3 good | bad + 2] -> [bad | 2] -> [bad]: three refusals.
    assert_eq!(refused, 3, "{:?}", of(&sim, SimApi::ElbV3));
    // A listing of the malformed id alone stays an error; so does a v3 pool listing for it.
    let err = bounded(cloud.list_l7policies(ElbVersion::V3, &["not-a-uuid"], Lane::Priority))
        .await
        .unwrap_err();
    assert!(matches!(err, CloudError::BadRequest(..)), "{err:?}");
    let err = bounded(cloud.list_pools(ElbVersion::V3, "not-a-uuid", Lane::Priority))
        .await
        .unwrap_err();
    assert!(matches!(err, CloudError::BadRequest(..)), "{err:?}");
}
