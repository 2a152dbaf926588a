//! End to end for CCE ELB Ingresses (issue 14): the real binary against the simulated cloud and the fake
//! apiserver's Ingresses.

mod common;

use common::*;
use elb_exporter::demo::{ingress, service};
use elb_exporter::sim::cloud::{Fault, LbKind, SimApi, SimConfig, SimListener, datapoint_value};
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
    // An ELB no API knows: reported like a Service's.
    w.cluster.apply_ingress(ingress(
        "shop",
        "lost",
        &[
            (ID, "99999999-9999-4999-8999-999999999999"),
            (CLASS, "performance"),
        ],
        &[("x", 80)],
    ));
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
            && sample(
                body,
                "elb_exporter_discovery_problems{reason=\"unknown_elb\"}",
            ) == Some(1.0)
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
    // listener_info adds the Ingress's uid and the ELB's name (the simulator's default name).
    let web_uid = w
        .cluster
        .ingresses()
        .into_iter()
        .find(|i| i.metadata.name.as_deref() == Some("web"))
        .and_then(|i| i.metadata.uid)
        .expect("the apiserver sets a uid");
    assert!(
        body.contains(&format!(
            "elb_exporter_listener_info{{{},uid=\"{web_uid}\",elb_name=\"sim-elb-{}\"}} 1",
            listener_labels(
                "shop",
                "web",
                DEDICATED,
                L_DED_443,
                "k8s_HTTPS_443",
                443,
                "HTTPS"
            ),
            &DEDICATED[..8]
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

const POOL_METRICS: &str = "collection:\n  interval: \"2s\"\n  metrics: [m1_cps, mb_l7_qps]\n  pool_metrics: [mb_l7_qps, m24_l7_req_Bps, m17_l7_upstream_rt]\n";

fn pool_series(
    metric: &str,
    svc: &str,
    ing: &str,
    elb: &str,
    pool: &str,
    name: &str,
    port: u16,
) -> String {
    format!(
        "huaweicloud_sys_elb_pool_{metric}{{namespace=\"shop\",service=\"{svc}\",ingress=\"{ing}\",lbaas_instance_id=\"{elb}\",lbaas_pool_id=\"{pool}\",pool_name=\"{name}\",port=\"{port}\"}} "
    )
}

/// Two Ingresses on one listener (web, the older: cart + web; api: cart + orders), CCE's pools and
/// policies behind it, a pool no backend matches, and an Ingress on the shared ELB (v2 pools).
async fn pool_fixture(w: &World) -> [String; 5] {
    let mut web = ingress(
        "shop",
        "web",
        &[(ID, DEDICATED), (CLASS, "performance")],
        &[("cart", 8080), ("web", 80)],
    );
    web.metadata.creation_timestamp = Some(created(1_700_000_000));
    let web = w.cluster.apply_ingress(web);
    let mut api = ingress(
        "shop",
        "api",
        &[(ID, DEDICATED), (CLASS, "performance")],
        &[("cart", 8080), ("orders", 9000)],
    );
    api.metadata.creation_timestamp = Some(created(1_700_000_100));
    let api = w.cluster.apply_ingress(api);
    let old = ingress(
        "shop",
        "old",
        &[
            (ID, SHARED),
            (CLASS, "union"),
            ("kubernetes.io/elb.port", "8080"),
        ],
        &[("legacy", 81)],
    );
    let old = w.cluster.apply_ingress(old);
    let uid = |i: &k8s_openapi::api::networking::v1::Ingress| i.metadata.uid.clone().expect("uid");
    let route = |lb, l, port, svc, svc_port, ing: &str| {
        w.sim.add_cce_route(lb, l, port, "shop", svc, svc_port, ing)
    };
    let cart = route(DEDICATED, L_DED_80, 80, "cart", 8080, &uid(&web));
    let web_pool = route(DEDICATED, L_DED_80, 80, "web", 80, &uid(&web));
    assert_eq!(
        route(DEDICATED, L_DED_80, 80, "cart", 8080, &uid(&api)),
        cart,
        "one pool per backend and listener"
    );
    let orders = route(DEDICATED, L_DED_80, 80, "orders", 9000, &uid(&api));
    // A pool behind the listener that no Ingress backend names.
    let _ghost = route(DEDICATED, L_DED_80, 80, "ghost", 80, &uid(&api));
    let legacy = route(SHARED, L_SHARED_8080, 8080, "legacy", 81, &uid(&old));
    [cart, web_pool, orders, legacy, uid(&web)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_backend_gets_its_own_pool_series_behind_a_shared_listener() {
    let w = fixture().await;
    let [cart, web_pool, orders, legacy, web_uid] = pool_fixture(&w).await;
    let e = w.exporter(POOL_METRICS);
    e.wait_ready().await;
    let cart_qps = pool_series(
        "mb_l7_qps",
        "cart",
        "web",
        DEDICATED,
        &cart,
        "k8s_shop_cart-8080_HTTP-80",
        80,
    );
    let orders_qps = pool_series(
        "mb_l7_qps",
        "orders",
        "api",
        DEDICATED,
        &orders,
        "k8s_shop_orders-9000_HTTP-80",
        80,
    );
    let web_bps = pool_series(
        "m24_l7_req_Bps",
        "web",
        "web",
        DEDICATED,
        &web_pool,
        "k8s_shop_web-80_HTTP-80",
        80,
    );
    let legacy_rt = pool_series(
        "m17_l7_upstream_rt",
        "legacy",
        "old",
        SHARED,
        &legacy,
        "k8s_shop_legacy-81_HTTP-8080",
        8080,
    );
    let (ok, body) = scrape_until(&e, WAIT, |body| {
        [&cart_qps, &orders_qps, &web_bps, &legacy_rt]
            .iter()
            .all(|p| sample(body, p).is_some())
    })
    .await;
    assert!(ok, "pool series missing:\n{body}\nlogs:\n{}", e.logs());
    let cart_v = sample(&body, &cart_qps).unwrap_or(-1.0);
    let orders_v = sample(&body, &orders_qps).unwrap_or(-1.0);
    assert!(is_sim_value(cart_v, &cart, "mb_l7_qps"), "{cart_v}");
    assert!(is_sim_value(orders_v, &orders, "mb_l7_qps"), "{orders_v}");
    assert_ne!(cart_v, orders_v, "each backend its own values");
    assert!(is_sim_value(
        sample(&body, &web_bps).unwrap_or(-1.0),
        &web_pool,
        "m24_l7_req_Bps"
    ));
    assert!(is_sim_value(
        sample(&body, &legacy_rt).unwrap_or(-1.0),
        &legacy,
        "m17_l7_upstream_rt"
    ));
    // The shared cart pool is exported once, with the oldest Ingress; the listener once, to web.
    assert_eq!(
        family_lines(&body, "huaweicloud_sys_elb_pool_mb_l7_qps")
            .iter()
            .filter(|l| l.contains(&*cart))
            .count(),
        1,
        "{body}"
    );
    assert_eq!(
        family_lines(&body, "huaweicloud_sys_elb_listener_m1_cps")
            .iter()
            .filter(|l| l.contains(L_DED_80))
            .count(),
        1,
        "{body}"
    );
    assert_eq!(
        sample(
            &body,
            "elb_exporter_discovery_problems{reason=\"pool_unmatched\"}"
        ),
        Some(1.0),
        "{body}"
    );
    assert!(!body.contains("service=\"ghost\""), "{body}");
    assert!(
        body.contains(&format!(
            "elb_exporter_pool_info{{namespace=\"shop\",service=\"cart\",ingress=\"web\",lbaas_instance_id=\"{DEDICATED}\",lbaas_pool_id=\"{cart}\",pool_name=\"k8s_shop_cart-8080_HTTP-80\",port=\"80\",uid=\"{web_uid}\",elb_name=\"sim-elb-{}\"}} 1",
            &DEDICATED[..8]
        )),
        "{body}"
    );
    // Pool and policy listings are counted under their own api label: one each per ELB (2), not again
    // when the ELB names arrive (a name is not a route change).
    for api in ["elb_list_pools", "elb_list_l7policies"] {
        let n = sample(
            &body,
            &format!("elb_exporter_cloud_requests_total{{api=\"{api}\"}}"),
        )
        .unwrap_or(0.0);
        assert_eq!(n, 2.0, "{api}: {n}\n{body}");
    }
    check_exposition(&body).expect("valid exposition");

    // Deleting the older Ingress hands the shared cart pool to api; web's own pool goes.
    assert!(w.cluster.delete_ingress("shop", "web"));
    let cart_api = pool_series(
        "mb_l7_qps",
        "cart",
        "api",
        DEDICATED,
        &cart,
        "k8s_shop_cart-8080_HTTP-80",
        80,
    );
    let (ok, body) = scrape_until(&e, WAIT, |body| {
        sample(body, &cart_api).is_some()
            && !body.contains(&*web_pool)
            && !body.contains("ingress=\"web\"")
    })
    .await;
    assert!(ok, "after deleting web:\n{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ces_calls_per_cycle_pack_listener_and_pool_series() {
    let w = fixture().await;
    pool_fixture(&w).await;
    // Listeners: legacy's 81 (Service), dedicated 80 (web), shared 8080 (old) = 3 x 2 metrics = 6;
    // pools: cart, web, orders, legacy = 4 x 3 metrics = 12; 18 series in batches of 5 -> 4 calls
    // (listeners and pools batched apart would take ceil(6/5) + ceil(12/5) = 5).
    let e = w.exporter_edited(POOL_METRICS, |t| {
        t.replace(
            "  prefix: \"huaweicloud\"\n",
            "  prefix: \"huaweicloud\"\n  scrape_batch_size: 5\n",
        )
    });
    e.wait_ready().await;
    let want = pool_series("mb_l7_qps", "legacy", "old", SHARED, "", "", 0);
    let want = want
        .split("lbaas_pool_id")
        .next()
        .unwrap_or_default()
        .to_string();
    let (ok, body) = scrape_until(&e, WAIT, |body| {
        family_lines(body, "huaweicloud_sys_elb_pool_mb_l7_qps").len() == 4 && body.contains(&want)
    })
    .await;
    assert!(ok, "{body}");
    let cycles =
        |b: &str| sample(b, "elb_exporter_collections_total{result=\"success\"}").unwrap_or(0.0);
    let (_, body) = scrape_until(&e, WAIT, |_| true).await;
    let c0 = cycles(&body);
    let (ok, _) = scrape_until(&e, WAIT, |b| cycles(b) >= c0 + 1.0).await;
    assert!(ok);
    w.sim.clear_requests();
    let (_, body) = scrape_until(&e, WAIT, |_| true).await;
    let c1 = cycles(&body);
    let (ok, _) = scrape_until(&e, Duration::from_secs(15), |b| cycles(b) >= c1 + 4.0).await;
    assert!(ok);
    let ces: Vec<_> = w
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("batch-query-metric-data"))
        .collect();
    let groups = calls_per_cycle(&ces);
    assert!(groups.len() >= 3, "{groups:?}");
    assert!(
        groups[1..groups.len() - 1].iter().all(|&n| n == 4),
        "ceil((6 + 12) / 5) = 4 calls per cycle: {groups:?}"
    );
    assert!(ces.iter().all(|r| r.ces_metrics <= 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_shows_ingresses_listeners_pools_and_backends() {
    let w = fixture().await;
    let [cart, _, orders, _, _] = pool_fixture(&w).await;
    let (code, out, err) = w.run(POOL_METRICS, &["check"]);
    let row = |cells: &[&str]| {
        out.lines()
            .any(|l| cells.iter().all(|c| l.split_whitespace().any(|w| w == *c)))
    };
    assert!(
        row(&["shop", "web", DEDICATED, L_DED_80, "80", "HTTP"]),
        "{out}"
    );
    assert!(
        row(&["shop", "old", SHARED, L_SHARED_8080, "8080"]),
        "{out}"
    );
    assert!(
        row(&[
            "shop",
            "web",
            "cart",
            &cart,
            "80",
            "k8s_shop_cart-8080_HTTP-80"
        ]),
        "{out}"
    );
    assert!(row(&["shop", "api", "orders", &orders, "80"]), "{out}");
    // api shares web's listener: a note, not a problem; the ghost pool is a problem.
    assert!(out.contains("note: ingress shop/api: listener"), "{out}");
    assert!(
        out.contains("3 listeners x 2 metrics + 4 pools x 3 pool metrics = 18 series"),
        "{out}"
    );
    assert_ne!(code, 0, "an unmatched pool is a problem:\n{out}\n{err}");
    assert!(
        format!("{out}{err}").contains("matches no backend"),
        "{out}\n{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingresses_bind_by_vip_address_and_by_cce_auto_created_name() {
    const AUTO: &str = "33333333-3333-4333-8333-333333333333";
    const L_AUTO: &str = "a0000000-0000-4000-8000-000000000080";
    let w = fixture().await;
    w.sim.add_loadbalancer(AUTO, LbKind::Dedicated);
    w.sim
        .add_listener(AUTO, SimListener::new(L_AUTO, "k8s_HTTP_80", "HTTP", 80));
    let vip = elb_exporter::sim::cloud::vip_address(DEDICATED);
    w.cluster.apply_ingress(ingress(
        "shop",
        "byip",
        &[
            ("kubernetes.io/elb.ip", vip.as_str()),
            ("kubernetes.io/elb.listen-ports", r#"[{"HTTPS":443}]"#),
        ],
        &[("cart", 8080)],
    ));
    // No binding annotation: CCE's auto-created ELB, which does not exist yet.
    let auto = w
        .cluster
        .apply_ingress(ingress("shop", "auto", &[], &[("web", 80)]));
    let e = w.exporter(METRICS);
    e.wait_ready().await;
    let byip = format!(
        "huaweicloud_sys_elb_listener_m1_cps{{{}}} ",
        listener_labels(
            "shop",
            "byip",
            DEDICATED,
            L_DED_443,
            "k8s_HTTPS_443",
            443,
            "HTTPS"
        )
    );
    let (ok, body) = scrape_until(&e, WAIT, |body| {
        sample(body, &byip).is_some()
            && sample(
                body,
                "elb_exporter_discovery_problems{reason=\"ingress_unbound\"}",
            ) == Some(1.0)
    })
    .await;
    assert!(ok, "{body}\n{}", e.logs());
    // CCE creates the ELB `cce-lb-<uid>`; the next change of the Ingress (or the periodic retry) binds it.
    let uid = auto.metadata.uid.clone().expect("uid");
    w.sim.set_loadbalancer_name(AUTO, &format!("cce-lb-{uid}"));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut touched = auto.clone();
    touched.metadata.labels = Some([("touched".to_string(), "1".to_string())].into());
    w.cluster.apply_ingress(touched);
    let bound = format!(
        "huaweicloud_sys_elb_listener_m1_cps{{{}}} ",
        listener_labels("shop", "auto", AUTO, L_AUTO, "k8s_HTTP_80", 80, "HTTP")
    );
    let (ok, body) = scrape_until(&e, WAIT, |body| {
        sample(body, &bound).is_some()
            && sample(
                body,
                "elb_exporter_discovery_problems{reason=\"ingress_unbound\"}",
            ) == Some(0.0)
    })
    .await;
    assert!(ok, "{body}\n{}", e.logs());
    let lbs = sample(
        &body,
        "elb_exporter_cloud_requests_total{api=\"elb_list_loadbalancers\"}",
    );
    assert!(lbs.is_some_and(|n| n >= 2.0), "{lbs:?}");
}

/// The client against the simulator's pool and policy listings: every page is followed (v2 pages of 500,
/// v3 pages of 2000), filters keep other load balancers' pools out, and a policy-only pool is found through
/// its policy but not through a `listener_id` filter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_and_policy_listings_page_and_filter() {
    use elb_exporter::cloud::client::HttpCloud;
    use elb_exporter::cloud::{CloudApi, ElbVersion, Lane};
    use elb_exporter::sim::cloud::SimPool;
    let w = fixture().await;
    let pool = |lb: &str, i: usize| SimPool {
        id: format!("{}-pool-{i:05}", &lb[..8]),
        name: format!("p{i}"),
        protocol: "HTTP".into(),
        listeners: Vec::new(),
    };
    for i in 0..501 {
        w.sim.add_pool(SHARED, pool(SHARED, i));
    }
    for i in 0..2001 {
        w.sim.add_pool(DEDICATED, pool(DEDICATED, i));
    }
    // Another dedicated ELB's pools: the loadbalancer_id filter keeps them out.
    const OTHER: &str = "44444444-4444-4444-8444-444444444444";
    w.sim.add_loadbalancer(OTHER, LbKind::Dedicated);
    for i in 0..3 {
        w.sim.add_pool(OTHER, pool(OTHER, i));
    }
    let routed = w
        .sim
        .add_cce_route(DEDICATED, L_DED_80, 80, "shop", "cart", 8080, "uid-1");
    let text = elb_exporter::demo::config_for(&w.sim, &w.cloud_url, "");
    let cfg = elb_exporter::config::Config::from_yaml(&text, &|_| None).expect("config");
    let cloud = HttpCloud::new(&cfg, elb_exporter::telemetry::Telemetry::new()).expect("client");
    let v2 = cloud
        .list_pools(ElbVersion::V2, SHARED, Lane::Priority)
        .await
        .expect("v2 pools");
    assert_eq!(v2.len(), 501);
    let v3 = cloud
        .list_pools(ElbVersion::V3, DEDICATED, Lane::Background)
        .await
        .expect("v3 pools");
    assert_eq!(v3.len(), 2002, "every page, this ELB's pools only");
    assert!(v3.iter().any(|p| p.id == routed && p.listeners.is_empty()));
    let policies = cloud
        .list_l7policies(ElbVersion::V3, &[L_DED_80], Lane::Priority)
        .await
        .expect("policies");
    assert_eq!(policies.len(), 1);
    assert_eq!(
        policies[0].redirect_pool_id.as_deref(),
        Some(routed.as_str())
    );
    assert_eq!(policies[0].action, "REDIRECT_TO_POOL");
    let pages: Vec<_> = w
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/elb/pools"))
        .collect();
    assert_eq!(pages.len(), 2 + 2, "v2: 500 + 1, v3: 2000 + 2: {pages:?}");
    assert!(pages.iter().all(|r| r.status == 200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_ingresses_false_never_reads_ingresses() {
    let w = fixture().await;
    w.cluster.apply_ingress(ingress(
        "shop",
        "web",
        &[(ID, DEDICATED)],
        &[("cart", 8080)],
    ));
    let e = w.exporter(&format!("{METRICS}discovery:\n  ingresses: false\n"));
    e.wait_ready().await;
    let legacy = "huaweicloud_sys_elb_listener_m1_cps{namespace=\"default\",service=\"legacy\"";
    let (ok, body) = scrape_until(&e, WAIT, |body| sample(body, legacy).is_some()).await;
    assert!(ok, "{body}");
    assert!(!body.contains("ingress=\""), "{body}");
    let asked: Vec<_> = w
        .cluster
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("ingresses"))
        .collect();
    assert!(asked.is_empty(), "{asked:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_cce_creates_after_the_ingress_is_picked_up_before_the_refresh() {
    let w = fixture().await;
    let web = w.cluster.apply_ingress(ingress(
        "shop",
        "web",
        &[(ID, DEDICATED)],
        &[("cart", 8080)],
    ));
    // listener_refresh 5m: only the missing-pool retry (15 s) can find the pool in time.
    let e = w.exporter(&format!(
        "{POOL_METRICS}discovery:\n  listener_refresh: \"5m\"\n"
    ));
    e.wait_ready().await;
    let (ok, body) = scrape_until(&e, WAIT, |b| b.contains("ingress=\"web\"")).await;
    assert!(ok, "{body}");
    assert!(!body.contains("huaweicloud_sys_elb_pool_"), "{body}");
    let uid = web.metadata.uid.clone().expect("uid");
    let cart = w
        .sim
        .add_cce_route(DEDICATED, L_DED_80, 80, "shop", "cart", 8080, &uid);
    let series = pool_series(
        "mb_l7_qps",
        "cart",
        "web",
        DEDICATED,
        &cart,
        "k8s_shop_cart-8080_HTTP-80",
        80,
    );
    let (ok, body) = scrape_until(&e, Duration::from_secs(25), |b| {
        sample(b, &series).is_some()
    })
    .await;
    assert!(ok, "{body}\n{}", e.logs());
}

/// A pool listing's answer is capped by what the request can legitimately get (16 KiB per pool asked
/// for): a 200 larger than that is refused as malformed from its Content-Length, never read and parsed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_pool_answer_is_refused() {
    use elb_exporter::cloud::client::HttpCloud;
    use elb_exporter::cloud::{CloudApi, CloudError, ElbVersion, Lane};
    use elb_exporter::sim::cloud::{Fault, SimApi};
    let w = fixture().await;
    // Valid JSON over the v2 cap (500 pools x 16 KiB + 64 KiB), under the client's whole body budget.
    let body = format!(r#"{{"pools":[],"pad":"{}"}}"#, "x".repeat(9 * 1024 * 1024));
    w.sim.inject(
        SimApi::ElbV2,
        Fault::Status {
            status: 200,
            body,
            count: 100,
        },
    );
    let text = elb_exporter::demo::config_for(&w.sim, &w.cloud_url, "");
    let cfg = elb_exporter::config::Config::from_yaml(&text, &|_| None).expect("config");
    let cloud = HttpCloud::new(&cfg, elb_exporter::telemetry::Telemetry::new()).expect("client");
    let err = tokio::time::timeout(
        Duration::from_secs(60),
        cloud.list_pools(ElbVersion::V2, SHARED, Lane::Background),
    )
    .await
    .expect("bounded")
    .expect_err("an answer over the cap");
    assert!(matches!(err, CloudError::Malformed(..)), "{err}");
    assert!(err.to_string().contains("over"), "{err}");
}

/// Turns the Ingress's backends of `named` Services into `port.name` references.
fn name_ports(ing: &mut k8s_openapi::api::networking::v1::Ingress, named: &[(&str, &str)]) {
    let spec = ing.spec.as_mut().expect("spec");
    for rule in spec.rules.iter_mut().flatten() {
        for path in rule.http.iter_mut().flat_map(|h| h.paths.iter_mut()) {
            let Some(svc) = path.backend.service.as_mut() else {
                continue;
            };
            if let Some((_, name)) = named.iter().find(|(s, _)| *s == svc.name) {
                svc.port = Some(k8s_openapi::api::networking::v1::ServiceBackendPort {
                    name: Some(name.to_string()),
                    number: None,
                });
            }
        }
    }
}

/// A backend naming its Service port (`backend.service.port.name`) is resolved to the port's number
/// through that Service's `spec.ports[]` — a plain backend Service, without the ELB annotation — so
/// CCE's pool (named by the number) is attributed. A named port no watched Service has stays
/// `pool_unmatched`, and `check` says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_naming_its_service_port_is_resolved_through_the_service() {
    let w = fixture().await;
    // Port 8080 is named "p8080" (demo::service names each port p<number>).
    w.cluster.apply(service("shop", "cart", &[], &[8080]));
    let mut ing = ingress(
        "shop",
        "named",
        &[(ID, DEDICATED), (CLASS, "performance")],
        &[("cart", 0), ("nosvc", 0)],
    );
    name_ports(&mut ing, &[("cart", "p8080"), ("nosvc", "http")]);
    let ing = w.cluster.apply_ingress(ing);
    let uid = ing.metadata.uid.clone().expect("uid");
    let cart = w
        .sim
        .add_cce_route(DEDICATED, L_DED_80, 80, "shop", "cart", 8080, &uid);
    let nosvc = w
        .sim
        .add_cce_route(DEDICATED, L_DED_80, 80, "shop", "nosvc", 80, &uid);
    let e = w.exporter(POOL_METRICS);
    e.wait_ready().await;
    let cart_qps = pool_series(
        "mb_l7_qps",
        "cart",
        "named",
        DEDICATED,
        &cart,
        "k8s_shop_cart-8080_HTTP-80",
        80,
    );
    let unmatched = "elb_exporter_discovery_problems{reason=\"pool_unmatched\"}";
    let (ok, body) = scrape_until(&e, WAIT, |b| {
        sample(b, &cart_qps).is_some() && sample(b, unmatched) == Some(1.0)
    })
    .await;
    assert!(ok, "{body}\n{}", e.logs());
    assert!(!body.contains(&nosvc), "{body}");
    let (code, out, err) = w.run(POOL_METRICS, &["check"]);
    let text = format!("{out}{err}");
    assert_ne!(code, 0, "an unmatched pool is a problem:\n{text}");
    assert!(
        text.contains("ingress shop/named names port \"http\" of Service nosvc"),
        "{text}"
    );
    assert!(!text.contains("of Service cart"), "{text}");
}

/// An ELB name that arrives after its Ingress's listeners (a slow load balancer listing) reaches
/// pool_info without listing the pools again: a name is not a route change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_elb_name_reaches_pool_info_without_listing_pools_again() {
    let w = fixture().await;
    let e = w.exporter(&format!(
        "{POOL_METRICS}discovery:\n  listener_refresh: \"5m\"\n"
    ));
    e.wait_ready().await;
    // The dedicated ELB is new: its v3 listener lookup and then its name listing answer 1.5 s late,
    // so its listeners (and pools) are published before its name.
    w.sim.inject(
        SimApi::ElbV3,
        Fault::Delay {
            delay: Duration::from_millis(1500),
            count: 2,
        },
    );
    let web = w.cluster.apply_ingress(ingress(
        "shop",
        "web",
        &[(ID, DEDICATED), (CLASS, "performance")],
        &[("cart", 8080)],
    ));
    let uid = web.metadata.uid.clone().expect("uid");
    let cart = w
        .sim
        .add_cce_route(DEDICATED, L_DED_80, 80, "shop", "cart", 8080, &uid);
    let named = format!("lbaas_pool_id=\"{cart}\"");
    let with_name = |b: &str, name: &str| {
        family_lines(b, "elb_exporter_pool_info")
            .iter()
            .any(|l| l.contains(&named) && l.contains(&format!(",elb_name=\"{name}\"")))
    };
    // The late path itself: the pool is first published without the name ...
    let nameless_first = std::cell::Cell::new(false);
    let (ok, body) = scrape_until(&e, WAIT, |b| {
        if with_name(b, "") {
            nameless_first.set(true);
        }
        with_name(b, "sim-elb-11111111")
    })
    .await;
    assert!(ok, "{body}\n{}", e.logs());
    assert!(
        nameless_first.get(),
        "the name came before the pool: not the late path"
    );
    let pool_listings: Vec<_> = w
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/elb/pools") && r.query.contains(DEDICATED))
        .collect();
    assert_eq!(pool_listings.len(), 1, "{pool_listings:?}");
}
