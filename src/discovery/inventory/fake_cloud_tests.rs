//! The real [`Inventory`] driven as `app` wires it (discovery events in, [`Targets`] out) against
//! [`FakeCloud`], under tokio's paused clock: attribution, removal, failures, lanes and the class hint.

use super::*;
use crate::annotations;
use crate::discovery::observe;
use crate::sim::fake::{FakeCloud, FakeListing, Script};
use crate::sim::fixtures;

const NS: &str = "shop";
const ELB_A: &str = "0a0a0a0a-0000-4000-8000-00000000000a";
const ELB_B: &str = "0b0b0b0b-0000-4000-8000-00000000000b";
/// Long enough that no periodic re-listing runs unless a test waits for one.
const REFRESH: Duration = Duration::from_secs(300);
/// Paused time a test waits at most for a publication or a listing.
const WAIT: Duration = Duration::from_secs(30);

fn listener(id: &str, port: u16) -> Listener {
    Listener {
        id: id.into(),
        name: format!("k8s_TCP_{port}"),
        protocol: "TCP".into(),
        port,
    }
}

/// A Service as the watch sees it, read by the real annotation parser (`class`: `elb.class`).
fn service(name: &str, elb: Option<&str>, class: Option<&str>, ports: &[i32]) -> Observed {
    let a: Vec<(&str, &str)> = [(annotations::ELB_ID, elb), (annotations::ELB_CLASS, class)]
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
        .collect();
    let mut s = fixtures::service(NS, name, &a, ports);
    s.metadata.uid = Some(format!("uid-{name}"));
    observe(&s, annotations::ELB_ID)
}

fn key(name: &str) -> ServiceKey {
    (NS.into(), name.into())
}

fn targets_of<'a>(t: &'a Targets, svc: &str) -> Vec<&'a Target> {
    t.listeners.iter().filter(|x| &*x.service == svc).collect()
}

fn report<'a>(t: &'a Targets, svc: &str) -> &'a ServiceReport {
    t.reports
        .iter()
        .find(|r| &*r.name == svc)
        .unwrap_or_else(|| panic!("no report for {svc}"))
}

/// (API, asked ids, lane) of listings, without the time.
fn shape(ls: &[FakeListing]) -> Vec<(ElbVersion, Option<Vec<String>>, Lane)> {
    ls.iter()
        .map(|l| (l.version, l.ids.clone(), l.lane))
        .collect()
}

struct World {
    cloud: Arc<FakeCloud>,
    tx: mpsc::Sender<DiscoveryEvent>,
    rx: watch::Receiver<Arc<Targets>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for World {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl World {
    /// An inventory on `cloud` whose one watch scope lists `services`; returns once it is synced.
    async fn start(cloud: Arc<FakeCloud>, services: Vec<Observed>) -> World {
        let settings = InventorySettings {
            listener_refresh: REFRESH,
            scopes: 1,
            ingress_scopes: 0,
        };
        let (inv, rx) = Inventory::new(cloud.clone(), settings, Telemetry::new());
        let (tx, events) = mpsc::channel(16);
        let task = tokio::spawn(inv.run(events));
        let mut w = World {
            cloud,
            tx,
            rx,
            task,
        };
        w.send(DiscoveryEvent::Resync {
            scope: None,
            observed: services,
        })
        .await;
        w.until(|t| t.synced).await;
        w.settle().await;
        w
    }

    async fn send(&self, ev: DiscoveryEvent) {
        self.tx.send(ev).await.expect("the inventory runs");
    }

    /// Lets pending work finish (publications included), then marks the current targets seen.
    async fn settle(&mut self) -> Arc<Targets> {
        tokio::time::sleep(Duration::from_secs(1)).await;
        self.rx.borrow_and_update().clone()
    }

    /// The next publication.
    async fn next(&mut self) -> Arc<Targets> {
        tokio::time::timeout(WAIT, self.rx.changed())
            .await
            .expect("a publication")
            .expect("the inventory runs");
        self.rx.borrow_and_update().clone()
    }

    async fn until(&mut self, f: impl Fn(&Targets) -> bool) -> Arc<Targets> {
        let deadline = Instant::now() + WAIT;
        loop {
            let t = self.rx.borrow_and_update().clone();
            if f(&t) {
                return t;
            }
            tokio::time::timeout_at(deadline, self.rx.changed())
                .await
                .expect("the awaited targets")
                .expect("the inventory runs");
        }
    }

    /// Waits (up to `within`) until `n` listener listings were asked.
    async fn listings(&self, n: usize, within: Duration) -> Vec<FakeListing> {
        let deadline = Instant::now() + within;
        while self.cloud.listener_listings().len() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.cloud.listener_listings()
    }
}

/// ELB A (dedicated, v3) with listeners 8080, 443, 80 in that order (so position is not port).
fn cloud_a() -> Arc<FakeCloud> {
    let cloud = Arc::new(FakeCloud::default());
    cloud.set_listeners(
        ElbVersion::V3,
        ELB_A,
        vec![
            listener("a-8080", 8080),
            listener("a-443", 443),
            listener("a-80", 80),
        ],
    );
    cloud.add_loadbalancer(ElbVersion::V3, ELB_A, "shop-elb");
    cloud
}

#[tokio::test(start_paused = true)]
async fn service_ports_are_attributed_to_the_listeners_on_them() {
    let w = World::start(
        cloud_a(),
        vec![
            service("web", Some(ELB_A), Some("performance"), &[80, 443]),
            service("admin", Some(ELB_A), Some("performance"), &[443, 9090]),
        ],
    )
    .await;
    let t = w.rx.borrow().clone();
    let expected = |svc: &str, id: &str, port: u16| Target {
        owner: Owner::Service,
        namespace: NS.into(),
        service: svc.into(),
        elb_id: ELB_A.into(),
        listener_id: id.into(),
        listener_name: format!("k8s_TCP_{port}").into(),
        port,
        protocol: "TCP".into(),
        uid: format!("uid-{svc}").into(),
        elb_name: "shop-elb".into(),
    };
    assert_eq!(
        t.listeners,
        vec![
            expected("admin", "a-443", 443),
            expected("web", "a-80", 80),
            expected("web", "a-443", 443),
        ],
        "one target per (Service, listener on one of its ports), sorted by namespace, service, port"
    );
    assert!(
        !t.listeners.iter().any(|x| x.port == 8080),
        "no Service names 8080"
    );
    assert_eq!(
        t.problems,
        BTreeMap::from([(Problem::PortWithoutListener, 1)]),
        "admin's 9090 has no listener"
    );
    let admin = report(&t, "admin");
    assert_eq!(admin.listeners, 1);
    assert_eq!(
        admin.problems,
        vec![format!("port 9090 has no listener on ELB {ELB_A}")]
    );
    let web = report(&t, "web");
    assert_eq!(
        (web.listeners, web.api, web.problems.is_empty()),
        (2, Some(ElbVersion::V3), true)
    );
    assert_eq!((t.services, t.elbs), (2, 1));
}

/// Services `gone` and `stay` on ELB A (port 80), and ELB B with a listener on 80.
async fn two_services() -> World {
    let cloud = cloud_a();
    cloud.set_listeners(ElbVersion::V3, ELB_B, vec![listener("b-80", 80)]);
    let w = World::start(
        cloud,
        vec![
            service("gone", Some(ELB_A), None, &[80]),
            service("stay", Some(ELB_A), None, &[80]),
        ],
    )
    .await;
    assert_eq!(w.rx.borrow().listeners.len(), 2);
    w
}

/// `stay` keeps its target through `gone`'s change.
fn assert_stays(t: &Targets) {
    let stay = targets_of(t, "stay");
    assert_eq!(stay.len(), 1, "the other Service keeps its target");
    assert_eq!(&*stay[0].listener_id, "a-80");
}

#[tokio::test(start_paused = true)]
async fn a_service_moved_to_another_elb_loses_its_old_targets_on_the_next_publish() {
    let mut w = two_services().await;
    w.send(DiscoveryEvent::Upsert(service(
        "gone",
        Some(ELB_B),
        None,
        &[80],
    )))
    .await;
    let t = w.next().await;
    assert!(
        targets_of(&t, "gone").iter().all(|x| &*x.elb_id == ELB_B),
        "no target on the old ELB: {:?}",
        t.listeners
    );
    assert_stays(&t);
    let t = w.until(|t| !targets_of(t, "gone").is_empty()).await;
    let moved = targets_of(&t, "gone");
    assert_eq!(
        (moved.len(), &*moved[0].listener_id, t.elbs),
        (1, "b-80", 2)
    );
}

#[tokio::test(start_paused = true)]
async fn a_deleted_service_loses_its_targets_on_the_next_publish() {
    let mut w = two_services().await;
    w.send(DiscoveryEvent::Delete(key("gone"))).await;
    let t = w.next().await;
    assert!(targets_of(&t, "gone").is_empty(), "{:?}", t.listeners);
    assert_eq!(t.services, 1);
    assert_stays(&t);
}

#[tokio::test(start_paused = true)]
async fn an_unannotated_service_loses_its_targets_on_the_next_publish() {
    let mut w = two_services().await;
    w.send(DiscoveryEvent::Upsert(service("gone", None, None, &[80])))
        .await;
    let t = w.next().await;
    assert!(targets_of(&t, "gone").is_empty(), "{:?}", t.listeners);
    assert_eq!(t.services, 1);
    assert_stays(&t);
}

#[tokio::test(start_paused = true)]
async fn a_failed_refresh_keeps_the_last_known_listeners_and_is_retried() {
    let mut w = World::start(cloud_a(), vec![service("web", Some(ELB_A), None, &[80])]).await;
    let before = w.rx.borrow().clone();
    assert_eq!(w.cloud.listener_listings().len(), 1);
    // The refresh fails; meanwhile the cloud's listener on 80 was replaced.
    w.cloud.script_listings([Script::Fail(500)]);
    w.cloud
        .set_listeners(ElbVersion::V3, ELB_A, vec![listener("a-80-new", 80)]);
    let failed = w.listings(2, REFRESH + WAIT).await[1].clone();
    let t = w.settle().await;
    assert_eq!(
        t.generation, before.generation,
        "a failed refresh publishes nothing new"
    );
    assert_eq!(t.listeners, before.listeners, "last known listeners kept");
    assert!(
        t.problems.is_empty(),
        "an ELB with known listeners is not reported failed: {:?}",
        t.problems
    );
    // Retried with backoff (RETRY_BASE, 15 s) before the next refresh, and then current again. The
    // background lane's pace (refresh / (calls + calls/4 + 1)) holds the retry back: 150 s for one ELB.
    let retry = w.listings(3, REFRESH).await[2].clone();
    let after = retry.at - failed.at;
    assert!(
        after >= RETRY_BASE && after < REFRESH,
        "retried after {after:?}"
    );
    assert_eq!(
        shape(&[failed, retry]),
        vec![
            (
                ElbVersion::V3,
                Some(vec![ELB_A.to_string()]),
                Lane::Background
            );
            2
        ]
    );
    let t = w
        .until(|t| t.listeners.iter().any(|x| &*x.listener_id == "a-80-new"))
        .await;
    assert_eq!(t.listeners.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_never_listed_elb_whose_listing_fails_is_reported_and_retried() {
    for status in [503, 404] {
        let cloud = cloud_a();
        cloud.script_listings([Script::Fail(status)]);
        let mut w = World::start(cloud, vec![service("web", Some(ELB_A), None, &[80])]).await;
        let t = w.rx.borrow().clone();
        assert!(t.synced, "a failed first lookup does not hold readiness");
        assert!(t.listeners.is_empty());
        assert_eq!(
            t.problems,
            BTreeMap::from([(Problem::ElbLookupFailed, 1)]),
            "status {status}"
        );
        let problems = &report(&t, "web").problems;
        assert!(
            problems.len() == 1 && problems[0].starts_with("listener lookup failed: "),
            "{problems:?}"
        );
        let t = w.until(|t| !t.listeners.is_empty()).await;
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        let ls = w.cloud.listener_listings();
        assert_eq!(ls.len(), 2);
        assert!(ls[1].at - ls[0].at >= RETRY_BASE, "backoff before retrying");
        assert_eq!(ls[1].lane, Lane::Priority, "still urgent: never resolved");
    }
}

#[tokio::test(start_paused = true)]
async fn new_services_are_looked_up_once_on_the_priority_lane() {
    let mut w = World::start(cloud_a(), vec![service("web", Some(ELB_A), None, &[80])]).await;
    w.cloud
        .set_listeners(ElbVersion::V3, ELB_B, vec![listener("b-80", 80)]);
    w.cloud.add_loadbalancer(ElbVersion::V3, ELB_B, "b-elb");
    let seen = w.cloud.elb_listings().len();
    // Two new Services on one new ELB: one listener listing, one name listing, both priority.
    for name in ["b1", "b2"] {
        w.send(DiscoveryEvent::Upsert(service(
            name,
            Some(ELB_B),
            None,
            &[80],
        )))
        .await;
    }
    let t = w
        .until(|t| t.listeners.iter().filter(|x| &*x.elb_id == ELB_B).count() == 2)
        .await;
    assert!(
        targets_of(&t, "b1")
            .iter()
            .chain(&targets_of(&t, "b2"))
            .all(|x| &*x.listener_id == "b-80" && &*x.elb_name == "b-elb")
    );
    w.settle().await;
    let new = w.cloud.elb_listings().split_off(seen);
    let b = Some(vec![ELB_B.to_string()]);
    assert_eq!(
        new.iter()
            .map(|l| (l.op, l.version, l.ids.clone(), l.lane))
            .collect::<Vec<_>>(),
        vec![
            (
                Operation::ElbListListeners,
                ElbVersion::V3,
                b.clone(),
                Lane::Priority
            ),
            (
                Operation::ElbListLoadbalancers,
                ElbVersion::V3,
                b,
                Lane::Priority
            ),
        ]
    );
    // A new Service on a known ELB: attributed from the known listeners at once, and the ELB re-listed
    // at once on the priority lane (CCE may have just added a listener for it), not at a port retry.
    w.cloud.set_listeners(
        ElbVersion::V3,
        ELB_A,
        vec![listener("a-80", 80), listener("a-81", 81)],
    );
    let seen = w.cloud.listener_listings().len();
    let sent = Instant::now();
    w.send(DiscoveryEvent::Upsert(service(
        "web2",
        Some(ELB_A),
        None,
        &[80, 81],
    )))
    .await;
    let t = w.until(|t| targets_of(t, "web2").len() == 2).await;
    let ids: Vec<&str> = targets_of(&t, "web2")
        .iter()
        .map(|x| &*x.listener_id)
        .collect();
    assert_eq!(ids, ["a-80", "a-81"]);
    w.settle().await;
    let relisted = &w.cloud.listener_listings()[seen..];
    assert_eq!(
        shape(relisted),
        vec![(
            ElbVersion::V3,
            Some(vec![ELB_A.to_string()]),
            Lane::Priority
        )]
    );
    assert!(
        relisted[0].at - sent < Duration::from_secs(1),
        "re-listed {:?} after the new Service",
        relisted[0].at - sent
    );
}

/// `kubernetes.io/elb.class`, the API that knows the ELB, the APIs asked in order, and the words
/// naming the API(s) in the problem when none knows it.
type ClassCase = (
    Option<&'static str>,
    Option<ElbVersion>,
    &'static [ElbVersion],
    Option<&'static str>,
);

#[tokio::test(start_paused = true)]
async fn the_class_hint_picks_the_listener_api() {
    use ElbVersion::{V2, V3};
    let cases: [ClassCase; 8] = [
        (Some("union"), Some(V2), &[V2], None),
        (Some("performance"), Some(V3), &[V3], None),
        (None, Some(V3), &[V3], None),
        (None, Some(V2), &[V3, V2], None),
        (Some("other"), Some(V2), &[V3, V2], None),
        (Some("union"), Some(V3), &[V2], Some("v2 API")),
        (Some("performance"), None, &[V3], Some("v3 API")),
        (None, None, &[V3, V2], Some("v3 or v2 API")),
    ];
    for (class, on, asked, unknown) in cases {
        let cloud = Arc::new(FakeCloud::default());
        if let Some(v) = on {
            cloud.set_listeners(v, ELB_A, vec![listener("a-80", 80)]);
        }
        let w = World::start(cloud, vec![service("web", Some(ELB_A), class, &[80])]).await;
        let case = format!("class {class:?} on {on:?}");
        let expected: Vec<_> = asked
            .iter()
            .map(|v| (*v, Some(vec![ELB_A.to_string()]), Lane::Priority))
            .collect();
        assert_eq!(shape(&w.cloud.listener_listings()), expected, "{case}");
        let t = w.rx.borrow().clone();
        let web = report(&t, "web");
        match unknown {
            None => {
                assert_eq!((t.listeners.len(), web.api), (1, on), "{case}");
                assert!(t.problems.is_empty(), "{case}: {:?}", t.problems);
            }
            Some(api) => {
                assert!(t.listeners.is_empty(), "{case}");
                assert_eq!(
                    t.problems,
                    BTreeMap::from([(Problem::UnknownElb, 1)]),
                    "{case}"
                );
                assert_eq!(
                    web.problems,
                    vec![format!(
                        "ELB {ELB_A} has no listener on the {api} (unknown id?)"
                    )],
                    "{case}"
                );
            }
        }
    }
}
