//! End to end: the real `elb-exporter` binary against the simulated cloud and the fake Kubernetes API
//! server (through a kubeconfig), asserting what Prometheus would scrape.

mod common;

use common::*;
use elb_exporter::demo::service;
use elb_exporter::sim::cloud::{
    LbKind, SimApi, SimConfig, SimListener, SimProfile, SimUser, datapoint_value,
};
use std::time::Duration;

const ID: &str = "kubernetes.io/elb.id";
const CLASS: &str = "kubernetes.io/elb.class";
const DEDICATED: &str = "11111111-1111-4111-8111-111111111111";
const SHARED: &str = "22222222-2222-4222-8222-222222222222";
const SHOP: &str = "33333333-3333-4333-8333-333333333333";
const UNKNOWN: &str = "99999999-9999-4999-8999-999999999999";

/// A listener of the fixture: (elb, id, name, protocol, port).
type Fl = (&'static str, &'static str, &'static str, &'static str, u16);

const LISTENERS: &[Fl] = &[
    (
        DEDICATED,
        "d0000000-0000-4000-8000-000000000080",
        "k8s_TCP_80",
        "TCP",
        80,
    ),
    (
        SHARED,
        "50000000-0000-4000-8000-000000000080",
        "web \"quoted\"",
        "HTTP",
        80,
    ),
    (
        SHARED,
        "50000000-0000-4000-8000-000000000443",
        "k8s_TCP_443",
        "TCP",
        443,
    ),
    (
        SHOP,
        "c0000000-0000-4000-8000-000000008080",
        "k8s_TCP_8080",
        "TCP",
        8080,
    ),
    // Claimed by no Service port: never exported.
    (
        SHOP,
        "c0000000-0000-4000-8000-000000009090",
        "admin",
        "TCP",
        9090,
    ),
];

async fn fixture() -> World {
    fixture_with(SimConfig::default()).await
}

async fn fixture_with(cfg: SimConfig) -> World {
    let w = World::start(cfg).await;
    w.sim.add_loadbalancer(DEDICATED, LbKind::Dedicated);
    w.sim.add_loadbalancer(SHARED, LbKind::Shared);
    w.sim.add_loadbalancer(SHOP, LbKind::Dedicated);
    // The others keep the simulator's default name, `sim-elb-<first 8 characters of the id>`.
    w.sim.set_loadbalancer_name(SHARED, "shared-api");
    for (elb, id, name, proto, port) in LISTENERS {
        w.sim
            .add_listener(elb, SimListener::new(*id, *name, *proto, *port));
    }
    let c = &w.cluster;
    c.apply(service(
        "default",
        "nginx",
        &[(ID, DEDICATED), (CLASS, "performance")],
        &[80],
    ));
    // Two ports, shared ELB, no class annotation: found through v3 first, then v2.
    c.apply(service("default", "api", &[(ID, SHARED)], &[80, 443]));
    c.apply(service("default", "frontend", &[], &[80]));
    c.apply(service(
        "shop",
        "cart",
        &[(ID, SHOP), (CLASS, "performance")],
        &[8080, 8443],
    ));
    c.apply(service(
        "shop",
        "ghost",
        &[(ID, UNKNOWN), (CLASS, "union")],
        &[80],
    ));
    w
}

const METRICS: &str =
    "collection:\n  interval: \"60s\"\n  metrics: [m1_cps, m7_in_Bps, mb_l7_qps]\n";

fn labels(ns: &str, svc: &str, l: &(&str, &str, &str, &str, u16)) -> String {
    format!(
        "namespace=\"{ns}\",service=\"{svc}\",lbaas_instance_id=\"{}\",lbaas_listener_id=\"{}\",listener_name=\"{}\",port=\"{}\",protocol=\"{}\"",
        l.0,
        l.1,
        l.2.replace('"', "\\\""),
        l.4,
        l.3
    )
}

/// Exported (namespace, service, listener) in exposition order.
fn expected_targets() -> Vec<(&'static str, &'static str, &'static Fl)> {
    vec![
        ("default", "api", &LISTENERS[1]),
        ("default", "api", &LISTENERS[2]),
        ("default", "nginx", &LISTENERS[0]),
        ("shop", "cart", &LISTENERS[3]),
    ]
}

fn is_l7(proto: &str) -> bool {
    matches!(proto, "HTTP" | "HTTPS" | "QUIC" | "TERMINATED_HTTPS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exposition_lines_are_exact_for_the_fixture() {
    let w = fixture().await;
    let e = w.exporter(METRICS);
    e.wait_ready().await;
    let body = e.metrics().await;
    let newest = w.sim.newest_minute(now_ms());

    for metric in ["m1_cps", "m7_in_Bps", "mb_l7_qps"] {
        let family = format!("huaweicloud_sys_elb_listener_{metric}");
        let got = family_lines(&body, &family);
        // The minute may have turned between collection and now: one minute earlier is the other candidate.
        let mut found = None;
        for minute in [newest, newest - 60_000] {
            let want: Vec<String> = expected_targets()
                .into_iter()
                .filter(|(_, _, l)| !metric.starts_with("mb_l7") || is_l7(l.3))
                .map(|(ns, svc, l)| {
                    let v = datapoint_value(l.1, metric, minute);
                    format!("{family}{{{}}} {v}", labels(ns, svc, l))
                })
                .collect();
            if got == want.iter().map(String::as_str).collect::<Vec<_>>() {
                found = Some(minute);
            }
        }
        assert!(
            found.is_some(),
            "{family}: exported lines do not match the simulator's values\n{}",
            got.join("\n")
        );
        assert!(
            body.contains(&format!("# TYPE {family} gauge\n")),
            "TYPE line for {family}"
        );
        assert!(body.contains(&format!(
            "# HELP {family} Cloud Eye SYS.ELB listener metric {metric}"
        )));
    }
    // An L7 metric exists only for the HTTP listener: no made-up zeros for TCP listeners.
    assert_eq!(
        family_lines(&body, "huaweicloud_sys_elb_listener_mb_l7_qps").len(),
        1
    );

    // listener_info adds the Service's uid and the ELB's name (read from the load balancer listings).
    let info: Vec<String> = expected_targets()
        .into_iter()
        .map(|(ns, svc, l)| {
            let uid = w.cluster.get(ns, svc).and_then(|s| s.metadata.uid);
            let uid = uid.expect("the apiserver sets a uid");
            let elb_name = match l.0 {
                SHARED => "shared-api".to_string(),
                other => format!("sim-elb-{}", &other[..8]),
            };
            format!(
                "elb_exporter_listener_info{{{},uid=\"{uid}\",elb_name=\"{elb_name}\"}} 1",
                labels(ns, svc, l)
            )
        })
        .collect();
    assert_eq!(family_lines(&body, "elb_exporter_listener_info"), info);

    // Not exported: the listener no port claims, the unannotated Service, the unknown ELB.
    assert!(!body.contains("c0000000-0000-4000-8000-000000009090"));
    assert!(!body.contains("service=\"frontend\""));
    assert!(!body.contains(UNKNOWN));
    assert_eq!(sample(&body, "elb_exporter_services "), Some(4.0));
    assert_eq!(sample(&body, "elb_exporter_listeners "), Some(4.0));
    assert_eq!(sample(&body, "elb_exporter_up "), Some(1.0));
    assert_eq!(
        sample(
            &body,
            "elb_exporter_discovery_problems{reason=\"unknown_elb\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &body,
            "elb_exporter_discovery_problems{reason=\"port_without_listener\"}"
        ),
        Some(1.0),
        "shop/cart port 8443 has no listener"
    );
    assert!(body.contains("elb_exporter_build_info{version=\""));
    assert!(sample(&body, "elb_exporter_newest_datapoint_age_seconds ").is_some_and(|a| a >= 60.0));
    // The shared ELB without a class was asked on v3 first, then found on v2.
    let reqs = w.sim.requests();
    let shared_v3 = reqs
        .iter()
        .filter(|r| matches!(r.api, SimApi::ElbV3) && r.query.contains(SHARED))
        .count();
    let shared_v2 = reqs
        .iter()
        .filter(|r| matches!(r.api, SimApi::ElbV2) && r.query.contains(SHARED))
        .count();
    assert!(
        shared_v3 >= 1 && shared_v2 >= 1,
        "v3 then v2 for an unclassified shared ELB"
    );
    // Query parameters are ignored (the guide's scrape job sends ?services=SYS.ELB).
    let (status, with_params) = e.get("/metrics?services=SYS.ELB").await;
    assert_eq!(status, 200);
    assert!(with_params.contains("huaweicloud_sys_elb_listener_m7_in_Bps{"));
}

/// A user whose policy allows listing listeners but not load balancers: the ELB names cannot be read,
/// so every listener_info line stays, with an empty `elb_name`, and the refusal is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_info_stays_with_an_empty_elb_name_when_names_cannot_be_listed() {
    let w = fixture().await;
    w.sim.set_policy(&[
        "iam:projects:list",
        "elb:listeners:list",
        "ces:metricData:list",
    ]);
    let e = w.exporter(METRICS);
    e.wait_ready().await;
    let body = e.metrics().await;
    let info = family_lines(&body, "elb_exporter_listener_info");
    assert_eq!(info.len(), expected_targets().len(), "{body}");
    assert!(
        info.iter().all(|l| l.ends_with(",elb_name=\"\"} 1")),
        "{info:#?}"
    );
    assert!(
        sample(
            &body,
            "elb_exporter_cloud_request_failures_total{api=\"elb_list_loadbalancers\",code=\"403\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{body}"
    );
    assert_eq!(sample(&body, "elb_exporter_up "), Some(1.0), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_added_and_deleted_while_running() {
    let w = fixture().await;
    let e = w.exporter(METRICS);
    e.wait_ready().await;
    assert!(e.metrics().await.contains("service=\"nginx\""));

    // A new Service on a new ELB: collected promptly, long before the 60 s tick.
    let new_elb = "44444444-4444-4444-8444-444444444444";
    let new_listener = "e0000000-0000-4000-8000-000000000080";
    w.sim.add_loadbalancer(new_elb, LbKind::Dedicated);
    w.sim.add_listener(
        new_elb,
        SimListener::new(new_listener, "k8s_TCP_80", "TCP", 80),
    );
    let added = std::time::Instant::now();
    w.cluster.apply(service(
        "shop",
        "orders",
        &[(ID, new_elb), (CLASS, "performance")],
        &[80],
    ));
    let appeared = wait_for(Duration::from_secs(5), || async {
        e.metrics().await.contains(&format!(
            "huaweicloud_sys_elb_listener_m7_in_Bps{{namespace=\"shop\",service=\"orders\",lbaas_instance_id=\"{new_elb}\",lbaas_listener_id=\"{new_listener}\""
        ))
    })
    .await;
    assert!(
        appeared,
        "new Service's series within 5 s; logs:\n{}",
        e.logs()
    );
    eprintln!("new Service -> first series: {:?}", added.elapsed());

    // Deleted, and un-annotated: gone on the next scrape (after the watch event).
    w.cluster.delete("default", "nginx");
    w.cluster.apply(service("default", "api", &[], &[80, 443]));
    let gone = wait_for(Duration::from_secs(5), || async {
        let b = e.metrics().await;
        !b.contains("service=\"nginx\"") && !b.contains("service=\"api\"")
    })
    .await;
    assert!(gone, "deleted and un-annotated Services have no series");
    let b = e.metrics().await;
    assert!(b.contains("service=\"orders\"") && b.contains("service=\"cart\""));
    assert_eq!(sample(&b, "elb_exporter_services "), Some(3.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_added_on_the_cloud_side_is_seen_after_refresh() {
    let w = fixture().await;
    let e = w.exporter(&format!(
        "{METRICS}discovery:\n  listener_refresh: \"10s\"\n"
    ));
    e.wait_ready().await;
    assert!(!e.metrics().await.contains("port=\"8443\""));
    // shop/cart has a port 8443 without a listener; the listener is created outside Kubernetes.
    let id = "c0000000-0000-4000-8000-000000008443";
    w.sim
        .add_listener(SHOP, SimListener::new(id, "k8s_TCP_8443", "TCP", 8443));
    let seen = wait_for(Duration::from_secs(20), || async {
        e.metrics().await.contains(&format!(
            "huaweicloud_sys_elb_listener_m1_cps{{namespace=\"shop\",service=\"cart\",lbaas_instance_id=\"{SHOP}\",lbaas_listener_id=\"{id}\""
        ))
    })
    .await;
    assert!(
        seen,
        "listener added in the cloud is exported after the refresh"
    );
    let b = e.metrics().await;
    assert_eq!(
        sample(
            &b,
            "elb_exporter_discovery_problems{reason=\"port_without_listener\"}"
        ),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ces_calls_per_cycle_are_the_minimum() {
    let w = fixture().await;
    // 4 attributed listeners on 3 ELBs x 13 metrics = 52 series; batches of 10 -> 6 calls per cycle.
    // Per-ELB batching would need ceil(13/10)+ceil(26/10)+ceil(13/10) = 7.
    let e = w.exporter_edited("collection:\n  interval: \"2s\"\n", |t| {
        t.replace(
            "  prefix: \"huaweicloud\"\n",
            "  prefix: \"huaweicloud\"\n  scrape_batch_size: 10\n",
        )
    });
    e.wait_ready().await;
    let cycles =
        |b: &str| sample(b, "elb_exporter_collections_total{result=\"success\"}").unwrap_or(0.0);
    let start = cycles(&e.metrics().await);
    // Count the CES calls of whole cycles between two observations.
    let ok = wait_for(Duration::from_secs(10), || async {
        cycles(&e.metrics().await) >= start + 1.0
    })
    .await;
    assert!(ok);
    w.sim.clear_requests();
    let c0 = cycles(&e.metrics().await);
    let ok = wait_for(Duration::from_secs(15), || async {
        cycles(&e.metrics().await) >= c0 + 4.0
    })
    .await;
    assert!(ok);
    let ces: Vec<_> = w
        .sim
        .requests()
        .into_iter()
        .filter(|r| matches!(r.api, SimApi::Ces))
        .collect();
    // Cycles are 2 s apart and take milliseconds; every whole cycle between the first and the last
    // group (cut by the observation window) must be exactly 6.
    let groups = calls_per_cycle(&ces);
    assert!(
        groups.len() >= 3,
        "at least one whole cycle observed: {groups:?}"
    );
    let whole = &groups[1..groups.len() - 1];
    assert!(
        whole.iter().all(|&n| n == 6),
        "CES calls per whole cycle must be the packed minimum 6: {groups:?}"
    );
    assert!(ces.iter().all(|r| r.ces_metrics <= 10));
    assert_eq!(ces.iter().map(|r| r.ces_metrics).max(), Some(10));
    let b = e.metrics().await;
    assert_eq!(
        sample(
            &b,
            "elb_exporter_planned_cloud_calls_per_minute{api=\"ces_batch_query\"}"
        ),
        Some(180.0),
        "6 calls every 2 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_prints_the_plan_and_fails_on_problems() {
    let w = fixture().await;
    let (code, out, err) = w.run(METRICS, &["check"]);
    assert_eq!(
        code, 1,
        "problems make check fail\nstdout:\n{out}\nstderr:\n{err}"
    );
    assert!(out.contains("config: ok"), "{out}");
    assert!(out.contains("project: cn-east-3 -> "), "{out}");
    for (ns, svc, l) in expected_targets() {
        let row = out
            .lines()
            .find(|r| r.contains(l.1))
            .unwrap_or_else(|| panic!("no row for listener {}\n{out}", l.1));
        assert!(
            row.starts_with(ns) && row.contains(svc) && row.contains(l.0),
            "{row}"
        );
        assert!(
            row.contains(&format!(" {} ", l.4)) && row.contains(l.3),
            "{row}"
        );
    }
    assert!(
        out.contains(
            "plan: 4 listeners x 3 metrics = 12 series -> 1 CES batch call(s) per 1m interval"
        ),
        "{out}"
    );
    assert!(
        out.contains("shop/ghost: ELB 99999999-9999-4999-8999-999999999999 has no listener"),
        "{out}"
    );
    assert!(
        out.contains("shop/cart: port 8443 has no listener"),
        "{out}"
    );
    assert!(out.contains("ces: ok"), "{out}");

    // Only the healthy namespace: check passes.
    let (code, out, _) = w.run(
        &format!("{METRICS}discovery:\n  namespaces: [default]\n"),
        &["check"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("check: ok"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_exits_2_naming_the_field() {
    let w = fixture().await;
    for args in [vec!["check"], vec![]] {
        let (code, _, err) = w.run(
            "collection:\n  filter: \"median\"\n",
            &args.iter().map(|s| &**s).collect::<Vec<_>>(),
        );
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(
            err.contains("collection.filter") && err.contains("median"),
            "{err}"
        );
    }
    // Values the HTTP router would refuse with a panic (exit 101) are config errors in run mode too.
    let (base, _) = w.write_config("collection:\n  interval: \"999999999999h\"\n");
    let base = std::fs::read_to_string(base).unwrap();
    for (text, field, value) in [
        (base.clone(), "collection.interval", "999999999999h"),
        (
            base.replace("  prefix:", "  metric_path: \"/:m\"\n  prefix:"),
            "global.metric_path",
            "/:m",
        ),
        (
            base.replace("  prefix:", "  metric_path: \"/*x\"\n  prefix:"),
            "global.metric_path",
            "/*x",
        ),
        (
            base.replace("  prefix:", "  metric_path: \"/{\"\n  prefix:"),
            "global.metric_path",
            "/{",
        ),
    ] {
        let path = w.dir.path().join("router.yml");
        std::fs::write(
            &path,
            text.replace(
                "999999999999h",
                if field == "collection.interval" {
                    "999999999999h"
                } else {
                    "60s"
                },
            ),
        )
        .unwrap();
        let out = std::process::Command::new(BIN)
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{field}={value}: {err}");
        assert!(err.contains(field) && err.contains(value), "{err}");
    }
    let out = std::process::Command::new(BIN)
        .args(["--listen", "nonsense"])
        .arg("--config")
        .arg(w.write_config("").0)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen"));
    let out = std::process::Command::new(BIN)
        .arg("--frobnicate")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = std::process::Command::new(BIN)
        .arg("--version")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("elb-exporter "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_series() {
    let e = Exporter::spawn(
        std::process::Command::new(BIN).args(["demo", "--listen", "127.0.0.1:0"]),
        std::path::Path::new("/nonexistent-kubeconfig"),
    );
    e.wait_ready().await;
    let body = e.metrics().await;
    for svc in ["nginx", "api", "cart", "checkout"] {
        let line = "huaweicloud_sys_elb_listener_m7_in_Bps{namespace=";
        assert!(
            body.lines()
                .any(|l| l.starts_with(line) && l.contains(&format!("service=\"{svc}\""))),
            "demo series for {svc}"
        );
    }
    assert_eq!(sample(&body, "elb_exporter_up "), Some(1.0));
    // 5 Service listeners and the Ingress storefront's, which shares its listener between two backends:
    // each backend its own pool series.
    assert_eq!(family_lines(&body, "elb_exporter_listener_info").len(), 6);
    for svc in ["web", "cart"] {
        assert!(
            body.lines()
                .any(|l| l.starts_with("huaweicloud_sys_elb_pool_mb_l7_qps{")
                    && l.contains(&format!("service=\"{svc}\",ingress=\"storefront\""))),
            "demo pool series for {svc}:\n{body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_credentials_apply_without_restart_and_are_not_hammered() {
    let w = fixture().await;
    let good = w.sim.config().sk.clone();
    let bad = "RotatedButWrong0000000000000000000000001";
    let e = w.exporter_edited(
        "collection:\n  interval: \"1s\"\n  metrics: [m1_cps]\n",
        |t| t.replacen("auth:\n", "auth:\n  credentials_reload: \"1s\"\n", 1),
    );
    e.wait_ready().await;
    let up = |b: &str| sample(b, "elb_exporter_up ");
    assert!(
        wait_for(Duration::from_secs(10), || async {
            up(&e.metrics().await) == Some(1.0)
        })
        .await
    );
    let cfg = w.dir.path().join("clouds.yml");
    let text = std::fs::read_to_string(&cfg).unwrap();

    // A bad rotation: the exporter notices within a cycle, sends one probe, and pauses.
    std::fs::write(&cfg, text.replace(&good, bad)).unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || async {
            up(&e.metrics().await) == Some(0.0)
        })
        .await,
        "up drops after a bad rotation; logs:\n{}",
        e.logs()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rejected = w.sim.requests().iter().filter(|r| r.status == 401).count();
    assert_eq!(rejected, 1, "one probe with the rejected key, then a pause");

    // The fix: picked up without a restart.
    std::fs::write(&cfg, text).unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || async {
            up(&e.metrics().await) == Some(1.0)
        })
        .await,
        "up recovers after the fix; logs:\n{}",
        e.logs()
    );
    assert!(e.logs().contains("credentials reloaded"));
    assert!(
        !e.logs().contains(bad) && !e.logs().contains(&good),
        "no secret in logs"
    );
    assert_eq!(
        w.sim.requests().iter().filter(|r| r.status == 401).count(),
        1
    );
}

/// A namespace whose Services RBAC refuses must not hold back the others: ready, the allowed
/// namespace is collected, the refusal is reported (metric, `check`), and a later grant heals it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_namespace_is_reported_and_does_not_block_the_others() {
    let w = fixture().await;
    w.cluster.set_forbidden("shop", true);
    let scoped = format!("{METRICS}discovery:\n  namespaces: [default, shop]\n");

    let (code, out, _) = w.run(&scoped, &["check"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("default") && out.contains("nginx"), "{out}");
    assert!(
        out.contains("namespace shop: services is forbidden"),
        "{out}"
    );

    let e = w.exporter(&scoped);
    e.wait_ready().await;
    let forbidden = "elb_exporter_discovery_problems{reason=\"namespace_forbidden\"}";
    let body = e.metrics().await;
    assert_eq!(sample(&body, forbidden), Some(1.0), "{body}");
    let nginx = "huaweicloud_sys_elb_listener_m1_cps{namespace=\"default\",service=\"nginx\"";
    assert!(sample(&body, nginx).is_some(), "{body}");

    w.cluster.set_forbidden("shop", false);
    let cart = "huaweicloud_sys_elb_listener_m1_cps{namespace=\"shop\",service=\"cart\"";
    let healed = wait_for(Duration::from_secs(30), || async {
        let body = e.metrics().await;
        sample(&body, forbidden) == Some(0.0) && sample(&body, cart).is_some()
    })
    .await;
    assert!(healed, "{}\n{}", e.metrics().await, e.logs());
}

/// A plan over the CES budget is reported by `check` with the period cycles will be paced to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_a_plan_over_the_ces_budget() {
    let w = fixture().await;
    let over = "collection:\n  interval: \"10s\"\n  metrics: [m1_cps, m7_in_Bps, mb_l7_qps]\ncloud:\n  rate_limit:\n    ces_per_minute: 3\n";
    let (code, out, _) = w.run(over, &["check"]);
    assert_eq!(code, 1, "{out}");
    // 1 call per 10 s = 6 calls/minute against 3: one cycle every 20 s.
    assert!(
        out.contains("cycles will be paced to one every 20s instead of 10s"),
        "{out}"
    );
}

/// An IAM user without `iam:projects:list` and no `/v3/auth/projects` fallback: `check` and the running
/// exporter say exactly what to do (log, `check`, the 403 failure counter), and a later grant heals the
/// running exporter without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_that_may_not_list_projects_is_told_the_fix_and_heals_after_a_grant() {
    let w = World::start(SimConfig {
        user: SimUser::LeastPrivilege,
        auth_projects_with_aksk: false,
        ..SimConfig::default()
    })
    .await;
    w.sim.add_loadbalancer(DEDICATED, LbKind::Dedicated);
    let l = LISTENERS[0];
    w.sim
        .add_listener(DEDICATED, SimListener::new(l.1, l.2, l.3, l.4));
    w.cluster.apply(service(
        "default",
        "nginx",
        &[(ID, DEDICATED), (CLASS, "performance")],
        &[80],
    ));
    let fix = [
        "set auth.project_id",
        "grant the IAM user iam:projects:list",
    ];
    let (code, out, _) = w.run(METRICS, &["check"]);
    assert_eq!(code, 1, "{out}");
    for f in fix {
        assert!(out.contains(f), "check prints the fix {f:?}:\n{out}");
    }

    let e = w.exporter(METRICS);
    e.wait_ready().await;
    let refused =
        "elb_exporter_cloud_request_failures_total{api=\"iam_list_projects\",code=\"403\"}";
    let body = e.metrics().await;
    assert!(sample(&body, refused).unwrap_or(0.0) >= 1.0, "{body}");
    assert_eq!(sample(&body, "elb_exporter_up "), Some(0.0));
    for f in fix {
        assert!(e.logs().contains(f), "the log says {f:?}:\n{}", e.logs());
    }

    w.sim.grant("iam:projects:list");
    let nginx = "huaweicloud_sys_elb_listener_m1_cps{namespace=\"default\",service=\"nginx\"";
    let healed = wait_for(Duration::from_secs(40), || async {
        sample(&e.metrics().await, nginx).is_some()
    })
    .await;
    assert!(healed, "{}\n{}", e.metrics().await, e.logs());
    assert!(
        e.logs().contains("via=\"iam_list_projects\"")
            || e.logs().contains("via=iam_list_projects"),
        "{}",
        e.logs()
    );
}

/// A cloud whose CES takes 10 metrics per call: `check` and the exporter find out from one refused
/// batch, and the collector plans every later cycle with 10 (12 series: 10 + 2, never refused again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10_metric_ces_limit_is_learned_once_and_planned_with() {
    let w = fixture_with(SimConfig {
        ces_max_metrics: 10,
        ..SimConfig::default()
    })
    .await;
    let scoped = "collection:\n  interval: \"1s\"\n  metrics: [m1_cps, m7_in_Bps, mb_l7_qps]\ndiscovery:\n  namespaces: [default, shop]\n";
    let (_, out, _) = w.run(scoped, &["check"]);
    assert!(
        out.contains("ces: batch size 10: CES refused a larger batch"),
        "{out}"
    );
    assert!(out.contains("= 12 series -> 2 CES batch call(s)"), "{out}");

    w.sim.clear_requests();
    let e = w.exporter(scoped);
    e.wait_ready().await;
    let ces = || -> Vec<(usize, u16)> {
        w.sim
            .requests()
            .iter()
            .filter(|r| r.api == SimApi::Ces)
            .map(|r| (r.ces_metrics, r.status))
            .collect()
    };
    assert!(wait_for(Duration::from_secs(15), || async { ces().len() >= 9 }).await);
    let calls = ces();
    assert_eq!(calls[..3], [(12, 400), (10, 200), (2, 200)], "{calls:?}");
    assert!(
        calls[3..]
            .iter()
            .all(|(n, s)| *s == 200 && [10, 2].contains(n)),
        "{calls:?}"
    );
    let body = e.metrics().await;
    assert_eq!(sample(&body, "elb_exporter_ces_batch_size "), Some(10.0));
    assert_eq!(sample(&body, "elb_exporter_up "), Some(1.0));
    // The collector plans with 10: 2 calls per 1 s cycle.
    let planned = "elb_exporter_planned_cloud_calls_per_minute{api=\"ces_batch_query\"}";
    assert_eq!(sample(&body, planned), Some(120.0), "{body}");
    assert_eq!(
        e.logs()
            .matches("this cloud's limit is 10 metrics per call")
            .count(),
        1,
        "{}",
        e.logs()
    );
}

/// The practice guide's `scrape_batch_size: 10` is honoured, with one warning saying what it costs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_scrape_batch_size_is_honoured_with_a_warning() {
    let w = fixture().await;
    let small = |t: String| t.replacen("global:\n", "global:\n  scrape_batch_size: 10\n", 1);
    let scoped = "collection:\n  interval: \"1s\"\n  metrics: [m1_cps, m7_in_Bps, mb_l7_qps]\ndiscovery:\n  namespaces: [default, shop]\n";
    let e = w.exporter_edited(scoped, small);
    e.wait_ready().await;
    let warning = "10 instead of 500: 50x more CES calls per cycle";
    assert_eq!(e.logs().matches(warning).count(), 1, "{}", e.logs());
    assert!(
        wait_for(Duration::from_secs(10), || async {
            w.sim
                .requests()
                .iter()
                .filter(|r| r.api == SimApi::Ces)
                .count()
                >= 4
        })
        .await
    );
    let sizes: Vec<usize> = w
        .sim
        .requests()
        .iter()
        .filter(|r| r.api == SimApi::Ces)
        .map(|r| r.ces_metrics)
        .collect();
    assert!(sizes.iter().all(|n| *n <= 10), "{sizes:?}");
    assert_eq!(
        sample(&e.metrics().await, "elb_exporter_ces_batch_size "),
        Some(10.0)
    );
}

/// Runs the exporter binary against `cfg`'s cloud as an operator would configure it for that cloud:
/// credentials, its real `auth_url` and region (plus `project_id` when given), nothing else. Every
/// request goes to the cloud's real host names; an HTTP proxy on loopback (the simulator) answers them,
/// and the simulator refuses a host that is not the service's own in that cloud.
async fn profile_run(cfg: SimConfig, project_id: bool) {
    let profile = cfg.profile;
    let w = World::start(cfg).await;
    elb_exporter::demo::seed_cloud(&w.sim);
    for s in elb_exporter::demo::services() {
        w.cluster.apply(s);
    }
    let c = w.sim.config();
    let mut text = format!(
        "auth:\n  auth_url: \"http://{}/v3\"\n  region: \"{}\"\n  access_key: \"{}\"\n  secret_key: \"{}\"\n",
        profile.iam_host(),
        profile.region(),
        c.ak,
        c.sk
    );
    if project_id {
        text.push_str(&format!("  project_id: \"{}\"\n", c.project_id));
    }
    let (cfg_path, kubeconfig) = w.write_config("");
    std::fs::write(&cfg_path, &text).unwrap();
    let e = Exporter::spawn_env(
        std::process::Command::new(BIN)
            .arg("--config")
            .arg(&cfg_path)
            .arg("--listen")
            .arg("127.0.0.1:0"),
        &kubeconfig,
        &[
            ("HTTP_PROXY", w.cloud_url.as_str()),
            ("NO_PROXY", "127.0.0.1,localhost"),
        ],
    );
    e.wait_ready().await;
    let ctx = format!("{} {:?} project_id={project_id}", profile.as_str(), c.user);
    let body = e.metrics().await;
    assert_eq!(
        sample(&body, "elb_exporter_up "),
        Some(1.0),
        "{ctx}\n{body}\n{}",
        e.logs()
    );
    assert_eq!(
        family_lines(&body, "elb_exporter_listener_info").len(),
        5,
        "{ctx}\n{body}"
    );
    // ELB names come from each cloud's load balancer listings (Open Telekom Cloud: the OpenStack path).
    for line in family_lines(&body, "elb_exporter_listener_info") {
        assert!(
            line.contains(",elb_name=\"sim-elb-"),
            "{ctx}: {line}\n{}",
            e.logs()
        );
    }
    for svc in ["nginx", "api", "cart", "checkout"] {
        let prefix = "huaweicloud_sys_elb_listener_m7_in_Bps{namespace=";
        assert!(
            body.lines()
                .any(|l| l.starts_with(prefix) && l.contains(&format!("service=\"{svc}\""))),
            "{ctx}: series for {svc}\n{body}"
        );
    }
    // Every call went to the service's own host in that cloud.
    let hosts: Vec<(SimApi, String, u16)> = w
        .sim
        .requests()
        .iter()
        .map(|r| (r.api, r.host.clone(), r.status))
        .filter(|(_, _, status)| *status != 403 && *status != 400)
        .collect();
    let own = |svc: &str| format!("{svc}.{}.{}", profile.region(), profile.domain());
    for (api, host, status) in &hosts {
        let svc = match api {
            SimApi::Iam => "iam",
            SimApi::ElbV2 | SimApi::ElbV3 => "elb",
            SimApi::Ces => "ces",
        };
        assert_eq!((host, *status), (&own(svc), 200), "{ctx}: {hosts:?}");
    }
    assert!(
        hosts.iter().any(|(a, ..)| *a == SimApi::Ces),
        "{ctx}: {hosts:?}"
    );
    let batch = if c.ces_max_metrics == 10 { 10.0 } else { 500.0 };
    assert_eq!(
        sample(&body, "elb_exporter_ces_batch_size "),
        Some(batch),
        "{ctx}"
    );
    if !project_id {
        let via = match c.user {
            SimUser::Admin => "iam_list_projects",
            SimUser::LeastPrivilege => "iam_list_auth_projects",
        };
        assert!(
            e.logs().contains(via),
            "{ctx}: resolved via {via}\n{}",
            e.logs()
        );
    }
}

/// Each cloud profile, with an administrator, a least-privilege user, and a least-privilege user that
/// may not list projects at all (then `project_id` is configured).
async fn profile_runs(profile: SimProfile) {
    profile_run(profile.config(), false).await;
    profile_run(profile.least_privilege(), false).await;
    let no_listing = SimConfig {
        auth_projects_with_aksk: false,
        ..profile.least_privilege()
    };
    profile_run(no_listing, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_huawei_cn_collects_everything_unconfigured() {
    profile_runs(SimProfile::HuaweiCn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_huawei_eu_collects_everything_unconfigured() {
    profile_runs(SimProfile::HuaweiEu).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_otc_collects_everything_unconfigured() {
    profile_runs(SimProfile::Otc).await;
}

/// `demo --profile otc`: the demo on Open Telekom Cloud's limits (10-metric CES batches) still serves
/// every Service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_each_profile() {
    for profile in SimProfile::ALL {
        let e = Exporter::spawn(
            std::process::Command::new(BIN).args([
                "demo",
                "--listen",
                "127.0.0.1:0",
                "--profile",
                profile.as_str(),
            ]),
            std::path::Path::new("/nonexistent-kubeconfig"),
        );
        e.wait_ready().await;
        let body = e.metrics().await;
        assert_eq!(
            sample(&body, "elb_exporter_up "),
            Some(1.0),
            "{}",
            profile.as_str()
        );
        // The demo's 5 Service listeners and its Ingress's listener.
        assert_eq!(family_lines(&body, "elb_exporter_listener_info").len(), 6);
        let batch = if profile == SimProfile::Otc {
            10.0
        } else {
            500.0
        };
        assert_eq!(sample(&body, "elb_exporter_ces_batch_size "), Some(batch));
    }
    let out = std::process::Command::new(BIN)
        .args(["demo", "--profile", "aws"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("huawei-cn, huawei-eu, otc"));
}
