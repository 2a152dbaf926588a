//! End to end for CCE ELB Ingresses (issue 14): the real binary against the simulated cloud and the fake
//! apiserver's Ingresses.

mod common;

use common::*;
use elb_exporter::demo::{ingress, service};
use elb_exporter::sim::cloud::{LbKind, SimConfig, SimListener, datapoint_value};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use std::time::Duration;

const ID: &str = "kubernetes.io/elb.id";
const CLASS: &str = "kubernetes.io/elb.class";
const DEDICATED: &str = "11111111-1111-4111-8111-111111111111";
const SHARED: &str = "22222222-2222-4222-8222-222222222222";
const L_DED_80: &str = "d0000000-0000-4000-8000-000000000080";
const L_DED_443: &str = "d0000000-0000-4000-8000-000000000443";
const L_SHARED_8080: &str = "50000000-0000-4000-8000-000000008080";
const L_SVC: &str = "50000000-0000-4000-8000-000000000081";
const METRICS: &str = "collection:\n  interval: \"60s\"\n  metrics: [m1_cps, mb_l7_qps]\n";
const WAIT: Duration = Duration::from_secs(20);

async fn fixture() -> World {
    let w = World::start(SimConfig::default()).await;
    w.sim.add_loadbalancer(DEDICATED, LbKind::Dedicated);
    w.sim.add_loadbalancer(SHARED, LbKind::Shared);
    for (elb, id, name, proto, port) in [
        (DEDICATED, L_DED_80, "k8s_HTTP_80", "HTTP", 80),
        (DEDICATED, L_DED_443, "k8s_HTTPS_443", "HTTPS", 443),
        (SHARED, L_SHARED_8080, "k8s_HTTP_8080", "HTTP", 8080),
        (SHARED, L_SVC, "k8s_TCP_81", "TCP", 81),
    ] {
        w.sim
            .add_listener(elb, SimListener::new(id, name, proto, port));
    }
    // A Service on the shared ELB: its series keep exactly their labels.
    w.cluster.apply(service(
        "default",
        "legacy",
        &[(ID, SHARED), (CLASS, "union")],
        &[81],
    ));
    w
}

fn listener_labels(
    ns: &str,
    ing: &str,
    elb: &str,
    id: &str,
    name: &str,
    port: u16,
    proto: &str,
) -> String {
    format!(
        "namespace=\"{ns}\",ingress=\"{ing}\",lbaas_instance_id=\"{elb}\",lbaas_listener_id=\"{id}\",listener_name=\"{name}\",port=\"{port}\",protocol=\"{proto}\""
    )
}

fn created(secs: i64) -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(secs).expect("timestamp"))
}

/// Scrapes every 100 ms until `pred` holds on the body or `limit` passes; returns the last body.
async fn scrape_until(
    e: &Exporter,
    limit: Duration,
    pred: impl Fn(&str) -> bool,
) -> (bool, String) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let body = e.metrics().await;
        if pred(&body) {
            return (true, body);
        }
        if std::time::Instant::now() >= deadline {
            return (false, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value must be the simulator's datapoint for that listener and metric at some recent minute.
fn is_sim_value(v: f64, listener: &str, metric: &str) -> bool {
    let now = now_ms();
    (0..10).any(|k| {
        let t = (now / 60_000 - k) * 60_000;
        (datapoint_value(listener, metric, t) - v).abs() < 1e-9
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingresses_on_dedicated_and_shared_elbs_get_listener_series() {
    let w = fixture().await;
    // Dedicated ELB, spec.ingressClassName, HTTPS port from elb.listen-ports.
    w.cluster.apply_ingress(ingress(
        "shop",
        "web",
        &[
            (ID, DEDICATED),
            (CLASS, "performance"),
            ("kubernetes.io/elb.listen-ports", r#"[{"HTTPS":443}]"#),
        ],
        &[("cart", 8080)],
    ));
    // Shared ELB, class by the pre-1.23 annotation, port from elb.port.
    let mut old_style = ingress(
        "default",
        "api",
        &[
            (ID, SHARED),
            (CLASS, "union"),
            ("kubernetes.io/elb.port", "8080"),
            ("kubernetes.io/ingress.class", "cce"),
        ],
        &[("api", 80)],
    );
    old_style.spec.as_mut().expect("spec").ingress_class_name = None;
    w.cluster.apply_ingress(old_style);
    // Another class: not ours.
    let mut nginx = ingress("default", "other", &[(ID, DEDICATED)], &[("x", 80)]);
    nginx.spec.as_mut().expect("spec").ingress_class_name = Some("nginx".into());
    w.cluster.apply_ingress(nginx);

    let e = w.exporter(METRICS);
    e.wait_ready().await;
    let web = format!(
        "huaweicloud_sys_elb_listener_mb_l7_qps{{{}}} ",
        listener_labels(
            "shop",
            "web",
            DEDICATED,
            L_DED_443,
            "k8s_HTTPS_443",
            443,
            "HTTPS"
        )
    );
    let api = format!(
        "huaweicloud_sys_elb_listener_m1_cps{{{}}} ",
        listener_labels(
            "default",
            "api",
            SHARED,
            L_SHARED_8080,
            "k8s_HTTP_8080",
            8080,
            "HTTP"
        )
    );
    let legacy = format!(
        "huaweicloud_sys_elb_listener_m1_cps{{namespace=\"default\",service=\"legacy\",lbaas_instance_id=\"{SHARED}\",lbaas_listener_id=\"{L_SVC}\",listener_name=\"k8s_TCP_81\",port=\"81\",protocol=\"TCP\"}} "
    );
    let body: String;
    let ok;
    (ok, body) = scrape_until(&e, WAIT, |body| {
        [&web, &api, &legacy]
            .iter()
            .all(|p| sample(body, p).is_some())
    })
    .await;
    assert!(ok, "series missing:\n{body}\nlogs:\n{}", e.logs());
    assert!(is_sim_value(
        sample(&body, &web).unwrap_or(-1.0),
        L_DED_443,
        "mb_l7_qps"
    ));
    assert!(is_sim_value(
        sample(&body, &api).unwrap_or(-1.0),
        L_SHARED_8080,
        "m1_cps"
    ));
    // Only the attributed listeners: not the dedicated ELB's port 80, nothing for the nginx class.
    assert!(!body.contains(L_DED_80), "{body}");
    assert!(!body.contains("ingress=\"other\""), "{body}");
    assert!(
        body.contains(&format!(
            "elb_exporter_listener_info{{{}}} 1",
            listener_labels(
                "shop",
                "web",
                DEDICATED,
                L_DED_443,
                "k8s_HTTPS_443",
                443,
                "HTTPS"
            )
        )),
        "{body}"
    );
    check_exposition(&body).expect("valid exposition");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_listener_is_attributed_once_and_deleted_ingresses_lose_their_series() {
    let w = fixture().await;
    let mut older = ingress("shop", "web", &[(ID, DEDICATED)], &[("cart", 8080)]);
    older.metadata.creation_timestamp = Some(created(1_700_000_000));
    let mut newer = ingress("shop", "api", &[(ID, DEDICATED)], &[("checkout", 8080)]);
    newer.metadata.creation_timestamp = Some(created(1_700_000_100));
    w.cluster.apply_ingress(newer);
    w.cluster.apply_ingress(older);
    let e = w.exporter(METRICS);
    e.wait_ready().await;

    let series = |ing: &str| {
        format!(
            "huaweicloud_sys_elb_listener_m1_cps{{{}}} ",
            listener_labels("shop", ing, DEDICATED, L_DED_80, "k8s_HTTP_80", 80, "HTTP")
        )
    };
    let mut body: String;
    let ok;
    (ok, body) = scrape_until(&e, WAIT, |body| sample(body, &series("web")).is_some()).await;
    assert!(
        ok,
        "the oldest Ingress owns the listener:\n{body}\n{}",
        e.logs()
    );
    assert_eq!(
        family_lines(&body, "huaweicloud_sys_elb_listener_m1_cps")
            .iter()
            .filter(|l| l.contains(L_DED_80))
            .count(),
        1,
        "one attribution per listener:\n{body}"
    );
    assert_eq!(
        sample(
            &body,
            "elb_exporter_discovery_problems{reason=\"shared_listener\"}"
        ),
        Some(1.0),
        "{body}"
    );

    // The listener master annotation wins over age.
    let mut mastered = ingress(
        "shop",
        "api",
        &[
            (ID, DEDICATED),
            ("kubernetes.io/elb.listener-master-ingress", "shop/api"),
        ],
        &[("checkout", 8080)],
    );
    mastered.metadata.creation_timestamp = Some(created(1_700_000_100));
    w.cluster.apply_ingress(mastered);
    let ok;
    (ok, body) = scrape_until(&e, WAIT, |body| {
        sample(body, &series("api")).is_some() && sample(body, &series("web")).is_none()
    })
    .await;
    assert!(ok, "the master Ingress owns the listener:\n{body}");

    // Deleting the owner hands the listener to the other; deleting both removes the series.
    assert!(w.cluster.delete_ingress("shop", "api"));
    let ok;
    (ok, body) = scrape_until(&e, WAIT, |body| {
        sample(body, &series("web")).is_some() && sample(body, &series("api")).is_none()
    })
    .await;
    assert!(ok, "after deleting api:\n{body}");
    assert!(w.cluster.delete_ingress("shop", "web"));
    let ok;
    (ok, body) = scrape_until(&e, WAIT, |body| !body.contains("ingress=\"")).await;
    assert!(ok, "after deleting both:\n{body}");
    assert!(
        sample(
            &body,
            "huaweicloud_sys_elb_listener_m1_cps{namespace=\"default\",service=\"legacy\""
        )
        .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_ingresses_leave_services_working_and_are_reported() {
    let w = fixture().await;
    w.cluster.set_ingresses_forbidden("*", true);
    w.cluster.apply_ingress(ingress(
        "shop",
        "web",
        &[(ID, DEDICATED)],
        &[("cart", 8080)],
    ));
    let e = w.exporter(METRICS);
    e.wait_ready().await;
    let mut body: String;
    let ok;
    (ok, body) = scrape_until(&e, WAIT, |body| {
        sample(
            body,
            "elb_exporter_discovery_problems{reason=\"ingress_forbidden\"}",
        ) == Some(1.0)
            && sample(
                body,
                "huaweicloud_sys_elb_listener_m1_cps{namespace=\"default\",service=\"legacy\"",
            )
            .is_some()
    })
    .await;
    assert!(ok, "{body}\n{}", e.logs());
    assert!(!body.contains("ingress=\"web\""), "{body}");

    // An unbound CCE Ingress (no elb.id) is reported, not dropped silently.
    w.cluster.set_ingresses_forbidden("*", false);
    w.cluster.apply_ingress(ingress(
        "shop",
        "auto",
        &[("kubernetes.io/elb.ip", "192.168.0.9")],
        &[("cart", 8080)],
    ));
    let ok;
    (ok, body) = scrape_until(&e, Duration::from_secs(40), |body| {
        sample(
            body,
            "elb_exporter_discovery_problems{reason=\"ingress_unbound\"}",
        ) == Some(1.0)
            && body.contains("ingress=\"web\"")
    })
    .await;
    assert!(ok, "{body}\n{}", e.logs());
}
