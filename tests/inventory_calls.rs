//! ELB listing calls of the inventory, counted exactly from the simulator's request log: cold start and a
//! periodic refresh at a few hundred listeners, the budgeted fallback for a large project with few
//! annotated ELBs, the priority lookup of a new Service, and the quick retry of a new Service's port.

mod common;

use common::*;
use elb_exporter::cloud::client::HttpCloud;
use elb_exporter::cloud::{CloudApi, ElbVersion, Lane};
use elb_exporter::config::Config;
use elb_exporter::demo::{config_for, service};
use elb_exporter::sim::cloud::{LbKind, SimApi, SimConfig, SimListener, SimRequest};
use elb_exporter::telemetry::Telemetry;
use std::time::Duration;

const ID: &str = "kubernetes.io/elb.id";
const CLASS: &str = "kubernetes.io/elb.class";
const PORTS: [u16; 4] = [80, 443, 8080, 8443];
/// The shortest refresh the config accepts, so a test sees one within seconds.
const CONFIG: &str = "discovery:\n  listener_refresh: \"10s\"\ncollection:\n  metrics: [m1_cps]\n";

fn elb(kind: &str, i: usize) -> String {
    format!("{kind}0000000-0000-4000-8000-{i:012}")
}

/// Adds an ELB with the four listeners, and (when `annotated`) a Service on them.
fn add_elb(w: &World, kind: LbKind, i: usize, annotated: bool) -> String {
    let (tag, class) = match kind {
        LbKind::Shared => ("5", "union"),
        LbKind::Dedicated => ("d", "performance"),
    };
    let id = elb(if annotated { tag } else { "e" }, i);
    w.sim.add_loadbalancer(&id, kind);
    for port in PORTS {
        let lid = format!("{id}-{port}");
        w.sim.add_listener(
            &id,
            SimListener::new(lid, format!("k8s_TCP_{port}"), "TCP", port),
        );
    }
    if annotated {
        let ports: Vec<i32> = PORTS.iter().map(|p| i32::from(*p)).collect();
        w.cluster.apply(service(
            &format!("ns{}", i % 3),
            &format!("svc-{tag}-{i}"),
            &[(ID, &id), (CLASS, class)],
            &ports,
        ));
    }
    id
}

/// ELB listener listing requests: (api, whether filtered by load balancer, query).
fn elb_calls(reqs: &[SimRequest]) -> Vec<(SimApi, bool, String)> {
    calls_to(reqs, "/listeners", "loadbalancer_id=")
}

/// ELB load balancer listing requests (the ELB names): (api, whether filtered by id, query).
fn lb_calls(reqs: &[SimRequest]) -> Vec<(SimApi, bool, String)> {
    calls_to(reqs, "/loadbalancers", "id=")
}

fn calls_to(reqs: &[SimRequest], path: &str, filter: &str) -> Vec<(SimApi, bool, String)> {
    reqs.iter()
        .filter(|r| matches!(r.api, SimApi::ElbV2 | SimApi::ElbV3) && r.path.ends_with(path))
        .map(|r| (r.api, r.query.contains(filter), r.query.clone()))
        .collect()
}

/// (v2 calls, v3 calls) that are `filtered` (or not), and all calls.
fn per_api(calls: &[(SimApi, bool, String)], filtered: bool) -> (usize, usize, usize) {
    (
        count(calls, SimApi::ElbV2, filtered),
        count(calls, SimApi::ElbV3, filtered),
        calls.len(),
    )
}

/// Name listings: (unfiltered v2 pages, id-filtered v3 calls, all).
fn names_split(lbs: &[(SimApi, bool, String)]) -> (usize, usize, usize) {
    (
        count(lbs, SimApi::ElbV2, false),
        count(lbs, SimApi::ElbV3, true),
        lbs.len(),
    )
}

fn count(calls: &[(SimApi, bool, String)], api: SimApi, filtered: bool) -> usize {
    calls
        .iter()
        .filter(|(a, f, _)| *a == api && *f == filtered)
        .count()
}

fn inventory_calls(body: &str, version: &str) -> Option<f64> {
    sample(
        body,
        &format!(
            "elb_exporter_inventory_calls{{api=\"elb_list_listeners\",version=\"{version}\"}}"
        ),
    )
}

/// Waits until the log holds at least `n` ELB calls, then `settle` longer, and returns them.
async fn elb_calls_after(
    w: &World,
    n: usize,
    limit: Duration,
    settle: Duration,
) -> Vec<(SimApi, bool, String)> {
    wait_for(limit, || async { elb_calls(&w.sim.requests()).len() >= n }).await;
    tokio::time::sleep(settle).await;
    elb_calls(&w.sim.requests())
}

/// 75 shared + 75 dedicated annotated ELBs (600 listeners) and 75 unannotated shared ones: the project
/// has 600 v2 listeners (2 pages of 500) and 300 v3 (1 page of 2000). Filtered listings would take 75 v2
/// + 2 v3 calls; the project-wide ones take 2 + 1, at cold start and at every refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_start_and_refresh_page_through_the_project() {
    let w = World::start(SimConfig::default()).await;
    for i in 0..75 {
        add_elb(&w, LbKind::Shared, i, true);
        add_elb(&w, LbKind::Dedicated, i, true);
        add_elb(&w, LbKind::Shared, i, false);
    }
    let e = w.exporter(CONFIG);
    e.wait_ready().await;
    let calls = elb_calls(&w.sim.requests());
    assert_eq!(
        per_api(&calls, false),
        (2, 1, 3),
        "cold start: 2 v2 pages + 1 v3 page, nothing filtered: {calls:?}"
    );
    // The ELB names: one project-wide load balancer page per API (150 shared, 75 dedicated), after
    // the listener listings, before readiness.
    let lbs = lb_calls(&w.sim.requests());
    assert_eq!(per_api(&lbs, false), (1, 1, 2), "cold start names: {lbs:?}");
    assert!(
        calls.iter().all(|(_, _, q)| q.contains("limit=")),
        "{calls:?}"
    );
    let body = e.metrics().await;
    assert_eq!(family_lines(&body, "elb_exporter_listener_info").len(), 600);
    assert_eq!(
        inventory_calls(&body, "v2"),
        Some(2.0),
        "gauge counts the cold start"
    );
    assert_eq!(inventory_calls(&body, "v3"), Some(1.0));
    for v in ["v2", "v3"] {
        assert_eq!(
            sample(
                &body,
                &format!(
                    "elb_exporter_inventory_calls{{api=\"elb_list_loadbalancers\",version=\"{v}\"}}"
                ),
            ),
            Some(1.0),
            "the name listings are counted apart: {v}"
        );
    }

    // A new Service is looked up at once, by one filtered call, not by another project-wide listing.
    w.sim.clear_requests();
    let new_elb = add_elb(&w, LbKind::Shared, 900, true);
    assert!(
        wait_for(Duration::from_secs(3), || async {
            e.metrics()
                .await
                .contains(&format!("lbaas_instance_id=\"{new_elb}\""))
        })
        .await,
        "the new Service's listeners are exported within 3 s"
    );
    let calls = elb_calls(&w.sim.requests());
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(
        calls[0].0 == SimApi::ElbV2 && calls[0].2.contains(&new_elb),
        "{calls:?}"
    );
    // Its name: one v2 load balancer call filtered by its id (1 page either way; filtered is not
    // costlier), not another project-wide listing.
    assert!(
        wait_for(Duration::from_secs(3), || async {
            !lb_calls(&w.sim.requests()).is_empty()
        })
        .await
    );
    let lbs = lb_calls(&w.sim.requests());
    assert_eq!(lbs.len(), 1, "{lbs:?}");
    assert!(
        lbs[0].0 == SimApi::ElbV2 && lbs[0].1 && lbs[0].2.contains(&new_elb),
        "{lbs:?}"
    );

    // The refresh (10 s after cold start): the same 2 + 1 pages, no per-ELB call.
    w.sim.clear_requests();
    let calls = elb_calls_after(&w, 3, Duration::from_secs(15), Duration::from_secs(3)).await;
    assert_eq!(
        per_api(&calls, false),
        (2, 1, 3),
        "refresh: 2 v2 pages + 1 v3 page: {calls:?}"
    );
    let lbs = lb_calls(&w.sim.requests());
    assert_eq!(
        per_api(&lbs, false),
        (1, 1, 2),
        "refresh names: one project-wide page per API: {lbs:?}"
    );
}

/// 2 annotated shared ELBs among 300 unannotated ones (1,208 v2 listeners): a project-wide listing would
/// take 3 pages against 2 filtered calls. Cold start tries it within a budget of 2 pages, stops, and
/// lists the 2 ELBs; the refresh then lists them directly. One dedicated ELB: 1 filtered v3 call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_project_with_few_annotated_elbs_is_not_paged_through() {
    let w = World::start(SimConfig::default()).await;
    for i in 0..2 {
        add_elb(&w, LbKind::Shared, i, true);
    }
    add_elb(&w, LbKind::Dedicated, 0, true);
    for i in 0..300 {
        add_elb(&w, LbKind::Shared, i, false);
    }
    let e = w.exporter(CONFIG);
    e.wait_ready().await;
    let calls = elb_calls(&w.sim.requests());
    assert_eq!(
        (
            count(&calls, SimApi::ElbV2, false),
            count(&calls, SimApi::ElbV2, true),
            count(&calls, SimApi::ElbV3, true),
            calls.len()
        ),
        (2, 2, 1, 5),
        "cold start: 2 budgeted v2 pages, then 2 filtered v2 calls and 1 filtered v3 call: {calls:?}"
    );
    // Names: the 302 shared load balancers fit one v2 page (cheaper than 2 filtered calls); the
    // dedicated one is asked by id (1 call either way).
    let lbs = lb_calls(&w.sim.requests());
    assert_eq!(names_split(&lbs), (1, 1, 2), "cold start names: {lbs:?}");
    let body = e.metrics().await;
    assert_eq!(family_lines(&body, "elb_exporter_listener_info").len(), 12);

    w.sim.clear_requests();
    let calls = elb_calls_after(&w, 3, Duration::from_secs(20), Duration::from_secs(2)).await;
    assert_eq!(
        per_api(&calls, true),
        (2, 1, 3),
        "refresh: filtered only: {calls:?}"
    );
    let lbs = lb_calls(&w.sim.requests());
    assert_eq!(names_split(&lbs), (1, 1, 2), "refresh names: {lbs:?}");
}

/// A new Service names a port whose listener CCE has not created yet: the ELB is re-listed within
/// seconds (not at the next refresh, 5 minutes by default), and the series appear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_services_missing_port_is_retried_within_seconds() {
    let w = World::start(SimConfig::default()).await;
    let id = add_elb(&w, LbKind::Shared, 0, true);
    let e = w.exporter("collection:\n  metrics: [m1_cps]\n");
    e.wait_ready().await;
    w.cluster.apply(service(
        "late",
        "web",
        &[(ID, &id), (CLASS, "union")],
        &[9000],
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    w.sim.add_listener(
        &id,
        SimListener::new("late-9000", "k8s_TCP_9000", "TCP", 9000),
    );
    assert!(
        wait_for(Duration::from_secs(8), || async {
            e.metrics()
                .await
                .contains("lbaas_listener_id=\"late-9000\"")
        })
        .await,
        "the late listener is found by a quick retry"
    );
}

/// The client's project-wide listing against the simulator: every page on v2 (500) and v3 (2000), each
/// listener attributed to the load balancer it names, and a page budget that stops the listing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn project_wide_listing_pages_through_every_listener_on_v2_and_v3() {
    const PER_API: usize = 2100;
    let w = World::start(SimConfig::default()).await;
    let lbs: Vec<(LbKind, String)> = (0..6)
        .map(|i| {
            let kind = if i % 2 == 0 {
                LbKind::Shared
            } else {
                LbKind::Dedicated
            };
            let id = elb("f", i);
            w.sim.add_loadbalancer(&id, kind);
            (kind, id)
        })
        .collect();
    for i in 0..PER_API * 2 {
        let (_, lb) = &lbs[i % lbs.len()];
        w.sim
            .add_listener(lb, SimListener::new(format!("l-{i:05}"), "n", "TCP", 80));
    }
    let auth = format!("auth:\n  project_id: \"{}\"\n", w.sim.config().project_id);
    let text = config_for(&w.sim, &w.cloud_url, "").replacen("auth:\n", &auth, 1);
    let cfg = Config::from_yaml(&text, &|_| None).expect("config");
    let cloud = HttpCloud::new(&cfg, Telemetry::new()).expect("client");
    for (version, api, kind, pages) in [
        (ElbVersion::V2, SimApi::ElbV2, LbKind::Shared, 5),
        (ElbVersion::V3, SimApi::ElbV3, LbKind::Dedicated, 2),
    ] {
        w.sim.clear_requests();
        let got = cloud
            .list_all_listeners(version, Lane::Background, 100, Duration::ZERO)
            .await
            .expect("listing");
        assert!(got.complete, "{version:?}");
        assert_eq!(
            (got.seen, got.calls as usize),
            (PER_API, pages),
            "{version:?}"
        );
        let mine: Vec<&String> = lbs
            .iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, id)| id)
            .collect();
        assert_eq!(got.by_lb.len(), mine.len(), "{version:?}");
        for id in mine {
            assert_eq!(
                got.by_lb[id.as_str()].len(),
                PER_API / 3,
                "{version:?} {id}"
            );
        }
        let reqs: Vec<SimRequest> = w
            .sim
            .requests()
            .into_iter()
            .filter(|r| r.api == api)
            .collect();
        assert_eq!(reqs.len(), pages, "{version:?}");
        assert!(
            reqs.iter()
                .all(|r| r.status == 200 && !r.query.contains("loadbalancer_id"))
        );
    }
    let stopped = cloud
        .list_all_listeners(ElbVersion::V2, Lane::Background, 2, Duration::ZERO)
        .await
        .expect("listing");
    assert_eq!(
        (stopped.complete, stopped.calls, stopped.seen),
        (false, 2, 1000)
    );
}
