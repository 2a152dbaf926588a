//! Backend server groups (pools) behind Ingress listeners, attributed to the backend Service they serve.
//!
//! A stage between the inventory and the collector: it takes the inventory's [`Targets`], lists the
//! pools and forwarding policies of every ELB that carries an Ingress listener (at once for a new ELB
//! or changed routes, then every `listener_refresh`; a failed listing keeps the last good one and is
//! retried with backoff), and publishes the same targets plus [`PoolTarget`]s.
//!
//! Attribution is strict: a pool belongs to a listener when the listener's `REDIRECT_TO_POOL`
//! policies point at it (or the pool lists the listener), and to a backend when CCE's pool name
//! `k8s_<namespace>_<service>-<servicePort>_<PROTOCOL>-<listenerPort>` names the listener's port and a
//! backend (`service`, `servicePort`) of an Ingress on that listener in that namespace. Anything else
//! is reported `pool_unmatched`, never guessed. A pool several Ingresses route to is exported once,
//! with the oldest of them.

use super::Problem;
use super::inventory::Targets;
pub use super::inventory::{IngressRoute, PoolTarget, RouteIngress};
use crate::cloud::{CloudApi, CloudError, ElbVersion, L7Policy, Lane, Pool};
use futures::StreamExt;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

/// First retry delay after a failed pool listing; doubles up to the refresh period.
const RETRY_BASE: Duration = Duration::from_secs(15);
/// ELBs whose pools are listed at once.
const CONCURRENCY: usize = 4;
/// An ELB where some Ingress backend has no pool yet (CCE creates it after the Ingress changes) is listed
/// again after this (or half the refresh period, when shorter), not only at the next refresh.
const MISSING_RETRY: Duration = Duration::from_secs(15);

/// CCE's pool name, split: (namespace, service, service port, protocol, listener port). `None` for a
/// name that is not exactly that shape (namespaces have no `_`, ports are decimal).
pub fn parse_pool_name(name: &str) -> Option<(&str, &str, u16, &str, u16)> {
    let rest = name.strip_prefix("k8s_")?;
    let (ns, rest) = rest.split_once('_')?;
    let (backend, listener) = rest.rsplit_once('_')?;
    let (service, service_port) = backend.rsplit_once('-')?;
    let (protocol, port) = listener.rsplit_once('-')?;
    let num = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| s.parse::<u16>().ok())
            .flatten()
    };
    if ns.is_empty() || service.is_empty() || protocol.is_empty() {
        return None;
    }
    Some((ns, service, num(service_port)?, protocol, num(port)?))
}

/// The pools and policies of one ELB.
#[derive(Debug, Clone, Default)]
pub struct ElbPools {
    /// The ELB's backend server groups.
    pub pools: Vec<Pool>,
    /// The ELB's forwarding policies.
    pub policies: Vec<L7Policy>,
}

/// Attributes the pools behind every route; returns the pools and the unmatched ones in words.
pub fn attribute_pools(
    routes: &[IngressRoute],
    listings: &HashMap<Arc<str>, ElbPools>,
) -> (Vec<PoolTarget>, Vec<String>) {
    let mut out: Vec<PoolTarget> = Vec::new();
    let mut unmatched = Vec::new();
    let mut seen: HashSet<&str> = HashSet::new();
    for route in routes {
        let Some(listing) = listings.get(&route.elb_id) else {
            continue;
        };
        let via_policy: HashSet<&str> = listing
            .policies
            .iter()
            .filter(|p| *p.listener_id == *route.listener_id && p.action == "REDIRECT_TO_POOL")
            .filter_map(|p| p.redirect_pool_id.as_deref())
            .collect();
        let behind = listing.pools.iter().filter(|p| {
            via_policy.contains(p.id.as_str())
                || p.listeners.iter().any(|l| **l == *route.listener_id)
        });
        for pool in behind {
            if !seen.insert(&pool.id) {
                continue;
            }
            let owner = parse_pool_name(&pool.name).and_then(|(ns, svc, svc_port, _, port)| {
                let ing = (port == route.port)
                    .then(|| {
                        route.ingresses.iter().find(|i| {
                            *i.namespace == *ns
                                && i.backends
                                    .iter()
                                    .any(|(s, p)| **s == *svc && *p == svc_port)
                        })
                    })
                    .flatten()?;
                Some((ing, svc))
            });
            match owner {
                Some((ing, svc)) => out.push(PoolTarget {
                    namespace: ing.namespace.clone(),
                    service: svc.into(),
                    ingress: ing.name.clone(),
                    uid: ing.uid.clone(),
                    // Filled from the listener targets when published: a name is not a route.
                    elb_name: "".into(),
                    elb_id: route.elb_id.clone(),
                    pool_id: pool.id.as_str().into(),
                    pool_name: pool.name.as_str().into(),
                    port: route.port,
                }),
                None => unmatched.push(unmatched_reason(route, pool)),
            }
        }
    }
    out.sort_by(|a, b| {
        (&a.namespace, &a.service, a.port, &a.pool_id).cmp(&(
            &b.namespace,
            &b.service,
            b.port,
            &b.pool_id,
        ))
    });
    (out, unmatched)
}

/// Why a pool behind `route` matches no backend, in words.
fn unmatched_reason(route: &IngressRoute, pool: &Pool) -> String {
    let head = format!(
        "pool {} ({:?}) behind listener {} (port {})",
        pool.id, pool.name, route.listener_id, route.port
    );
    let named = parse_pool_name(&pool.name).and_then(|(ns, svc, ..)| {
        route.ingresses.iter().find_map(|i| {
            let (_, port) = i
                .unresolved
                .iter()
                .find(|(s, _)| *i.namespace == *ns && **s == *svc)?;
            Some((i, svc, port))
        })
    });
    match named {
        Some((i, svc, port)) => format!(
            "{head} matches no backend of its Ingresses: ingress {}/{} names port {port:?} of Service {svc}, which the exporter cannot resolve to a number (the Service is not in a watched namespace, or has no port of that name)",
            i.namespace, i.name
        ),
        None => format!("{head} matches no backend of its Ingresses"),
    }
}

#[derive(Debug)]
struct Cached {
    /// The last good listing.
    listing: Option<ElbPools>,
    /// The routes it was listed for: changed routes (a new backend, a new listener) list again at once.
    routes: Vec<IngressRoute>,
    next: Instant,
    failures: u32,
    error: Option<String>,
    in_flight: bool,
}

/// A listing to make now: an ELB's pools and the forwarding policies of its Ingress listeners.
struct Due {
    elb: Arc<str>,
    version: ElbVersion,
    listeners: Vec<Arc<str>>,
    lane: Lane,
}

/// The pool stage: see the module documentation.
pub struct PoolStage<C: CloudApi> {
    cloud: Arc<C>,
    refresh: Duration,
    cache: HashMap<Arc<str>, Cached>,
    logged: Vec<String>,
    tx: watch::Sender<Arc<Targets>>,
}

impl<C: CloudApi> PoolStage<C> {
    /// A stage with nothing listed yet, and the receiver of the targets it completes with pools.
    pub fn new(cloud: Arc<C>, refresh: Duration) -> (Self, watch::Receiver<Arc<Targets>>) {
        let (tx, rx) = watch::channel(Arc::new(Targets::default()));
        (
            PoolStage {
                cloud,
                refresh,
                cache: HashMap::new(),
                logged: Vec::new(),
                tx,
            },
            rx,
        )
    }

    /// Runs until the inventory's channel closes.
    pub async fn run(mut self, mut input: watch::Receiver<Arc<Targets>>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let targets = input.borrow_and_update().clone();
            self.update(&targets).await;
            tokio::select! {
                changed = input.changed() => if changed.is_err() { return },
                _ = tick.tick() => {}
            }
        }
    }

    /// Lists what is due and publishes when the output changed (or the input did).
    pub async fn update(&mut self, targets: &Arc<Targets>) {
        let due = self.due(targets);
        let fetched: Vec<(Arc<str>, Result<ElbPools, CloudError>)> = futures::stream::iter(due)
            .map(
                |Due {
                     elb,
                     version,
                     listeners,
                     lane,
                 }| {
                    let cloud = self.cloud.clone();
                    async move {
                        let ids: Vec<&str> = listeners.iter().map(|l| &**l).collect();
                        let r = async {
                            let pools = cloud.list_pools(version, &elb, lane).await?;
                            let policies = cloud.list_l7policies(version, &ids, lane).await?;
                            Ok(ElbPools { pools, policies })
                        }
                        .await;
                        (elb, r)
                    }
                },
            )
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let changed = !fetched.is_empty();
        for (elb, r) in fetched {
            self.record(&elb, r);
        }
        let current = self.tx.borrow().clone();
        if changed || current.generation != targets.generation || current.synced != targets.synced {
            self.publish(targets);
        }
    }

    /// ELBs to list now, with their API and Ingress listener ids; forgets ELBs without routes.
    /// A first listing or one for changed routes goes on the priority lane, a periodic one in the
    /// background.
    fn due(&mut self, targets: &Targets) -> Vec<Due> {
        let mut by_elb: BTreeMap<&Arc<str>, Vec<&IngressRoute>> = BTreeMap::new();
        for r in &targets.routes {
            by_elb.entry(&r.elb_id).or_default().push(r);
        }
        self.cache.retain(|id, _| by_elb.contains_key(id));
        let now = Instant::now();
        let mut due = Vec::new();
        for (elb, routes) in by_elb {
            let Some(version) = routes.iter().find_map(|r| r.version) else {
                continue;
            };
            let owned: Vec<IngressRoute> = routes.iter().map(|r| (*r).clone()).collect();
            let c = self.cache.entry(elb.clone()).or_insert_with(|| Cached {
                listing: None,
                routes: Vec::new(),
                next: now,
                failures: 0,
                error: None,
                in_flight: false,
            });
            let lane = if c.routes != owned || c.listing.is_none() {
                Lane::Priority
            } else {
                Lane::Background
            };
            if c.routes != owned {
                c.routes = owned;
                c.next = now;
            }
            if c.next <= now && !c.in_flight {
                c.in_flight = true;
                due.push(Due {
                    elb: elb.clone(),
                    version,
                    listeners: routes.iter().map(|r| r.listener_id.clone()).collect(),
                    lane,
                });
            }
        }
        due
    }

    fn record(&mut self, elb: &Arc<str>, r: Result<ElbPools, CloudError>) {
        let Some(c) = self.cache.get_mut(elb) else {
            return;
        };
        c.in_flight = false;
        match r {
            Ok(listing) => {
                info!(elb = %elb, pools = listing.pools.len(), policies = listing.policies.len(), "pools listed");
                c.listing = Some(listing);
                c.failures = 0;
                c.error = None;
                c.next = Instant::now() + self.refresh;
            }
            Err(e) => {
                c.failures = c.failures.saturating_add(1);
                let backoff = RETRY_BASE
                    .saturating_mul(1u32 << c.failures.min(10).saturating_sub(1))
                    .min(self.refresh);
                warn!(elb = %elb, error = %e, retry_in_ms = backoff.as_millis() as u64, "pool listing failed; keeping the last good pools");
                c.error = Some(e.to_string());
                c.next = Instant::now() + backoff;
            }
        }
    }

    /// Brings the next listing forward for ELBs where a backend of an Ingress has no pool yet.
    fn retry_missing(&mut self, routes: &[IngressRoute], pools: &[PoolTarget]) {
        let soon = Instant::now() + MISSING_RETRY.min(self.refresh / 2);
        for r in routes {
            let missing = r.ingresses.iter().any(|i| {
                i.backends.iter().any(|(svc, _)| {
                    !pools.iter().any(|p| {
                        p.elb_id == r.elb_id
                            && p.port == r.port
                            && p.namespace == i.namespace
                            && p.service == *svc
                    })
                })
            });
            if let Some(c) = self
                .cache
                .get_mut(&r.elb_id)
                .filter(|c| missing && c.listing.is_some())
            {
                c.next = c.next.min(soon);
            }
        }
    }

    fn publish(&mut self, input: &Targets) {
        let listings: HashMap<Arc<str>, ElbPools> = self
            .cache
            .iter()
            .filter_map(|(id, c)| c.listing.clone().map(|l| (id.clone(), l)))
            .collect();
        let (mut pools, unmatched) = attribute_pools(&input.routes, &listings);
        self.retry_missing(&input.routes, &pools);
        let names: HashMap<&str, &Arc<str>> = input
            .listeners
            .iter()
            .map(|t| (&*t.elb_id, &t.elb_name))
            .collect();
        for p in &mut pools {
            if let Some(name) = names.get(&*p.elb_id) {
                p.elb_name = Arc::clone(name);
            }
        }
        let mut problems = input.problems.clone();
        let mut words: Vec<(Problem, String)> = input.ingress_problems.clone();
        if !unmatched.is_empty() {
            problems.insert(Problem::PoolUnmatched, unmatched.len());
        }
        words.extend(unmatched.into_iter().map(|w| (Problem::PoolUnmatched, w)));
        let failed: Vec<String> = self
            .cache
            .iter()
            .filter_map(|(id, c)| c.error.as_ref().map(|e| format!("pools of ELB {id}: {e}")))
            .collect();
        if !failed.is_empty() {
            problems.insert(Problem::PoolLookupFailed, failed.len());
        }
        words.extend(failed.into_iter().map(|w| (Problem::PoolLookupFailed, w)));
        // Synced once every ELB with a route has been listed (or failed) once.
        let listed = self
            .cache
            .values()
            .all(|c| c.listing.is_some() || c.error.is_some());
        // Ingress and pool problems are logged once each when they appear (a shared listener is normal).
        let fresh: Vec<String> = words
            .iter()
            .filter(|(p, _)| !matches!(p, Problem::SharedListener))
            .map(|(_, w)| w.clone())
            .collect();
        for w in fresh.iter().filter(|w| !self.logged.contains(w)) {
            warn!(problem = %w, "ingress or pool cannot be fully exported");
        }
        self.logged = fresh;
        let out = Targets {
            synced: input.synced && listed,
            pools,
            problems,
            ingress_problems: words,
            ..input.clone()
        };
        self.tx.send_replace(Arc::new(out));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A first listing and one for changed routes go on the priority lane; the periodic re-listing in
    /// the background.
    #[cfg(feature = "sim")]
    #[tokio::test(start_paused = true)]
    async fn first_and_changed_listings_are_priority_refreshes_background() {
        use crate::sim::fake::FakeCloud;
        let cloud = Arc::new(FakeCloud::default());
        let refresh = Duration::from_secs(300);
        let (mut stage, _rx) = PoolStage::new(cloud.clone(), refresh);
        let route = |backends: &[(&str, u16)]| IngressRoute {
            elb_id: "elb1".into(),
            version: Some(ElbVersion::V3),
            listener_id: "l1".into(),
            port: 80,
            ingresses: vec![RouteIngress {
                namespace: "default".into(),
                name: "web".into(),
                uid: "uid-1".into(),
                backends: backends.iter().map(|(s, p)| ((*s).into(), *p)).collect(),
                unresolved: Vec::new(),
            }],
        };
        let targets = |r: IngressRoute| {
            Arc::new(Targets {
                synced: true,
                routes: vec![r],
                ..Targets::default()
            })
        };
        let lanes = || -> Vec<Lane> { cloud.pool_listings().into_iter().map(|(_, l)| l).collect() };
        stage.update(&targets(route(&[]))).await;
        assert_eq!(lanes(), [Lane::Priority]);
        tokio::time::advance(refresh).await;
        stage.update(&targets(route(&[]))).await;
        assert_eq!(lanes(), [Lane::Priority, Lane::Background]);
        stage.update(&targets(route(&[("api", 8080)]))).await;
        assert_eq!(
            lanes(),
            [Lane::Priority, Lane::Background, Lane::Priority],
            "a changed route lists at once, ahead of refreshes"
        );
    }

    #[test]
    fn pool_names_parse_strictly() {
        assert_eq!(
            parse_pool_name("k8s_default_nginx-80_HTTP-8000"),
            Some(("default", "nginx", 80, "HTTP", 8000))
        );
        assert_eq!(
            parse_pool_name("k8s_shop_my-web-app-8080_HTTPS-443"),
            Some(("shop", "my-web-app", 8080, "HTTPS", 443))
        );
        for bad in [
            "k8s_default_nginx_HTTP-8000",
            "default_nginx-80_HTTP-8000",
            "k8s_default_nginx-80_HTTP-80a",
            "k8s_default_nginx-+80_HTTP-8000",
            "k8s__nginx-80_HTTP-8000",
            "k8s_default_nginx-80_HTTP-70000",
        ] {
            assert_eq!(parse_pool_name(bad), None, "{bad}");
        }
    }

    fn pool(id: &str, name: &str, listeners: &[&str]) -> Pool {
        Pool {
            id: id.into(),
            name: name.into(),
            protocol: "HTTP".into(),
            listeners: listeners.iter().map(|l| l.to_string()).collect(),
        }
    }

    fn policy(listener: &str, pool: &str) -> L7Policy {
        L7Policy {
            id: format!("pol-{pool}"),
            listener_id: listener.into(),
            action: "REDIRECT_TO_POOL".into(),
            redirect_pool_id: Some(pool.into()),
        }
    }

    fn ing(name: &str, backends: &[(&str, u16)]) -> RouteIngress {
        RouteIngress {
            namespace: "shop".into(),
            name: name.into(),
            uid: format!("uid-{name}").into(),
            backends: backends.iter().map(|(s, p)| (Arc::from(*s), *p)).collect(),
            unresolved: Vec::new(),
        }
    }

    #[test]
    fn pools_go_to_their_own_backend_through_policies_and_names() {
        let route = IngressRoute {
            elb_id: "elb".into(),
            version: Some(ElbVersion::V3),
            listener_id: "l80".into(),
            port: 80,
            // Oldest first: "web" also routes to cart, so cart's pool is attributed to it.
            ingresses: vec![
                ing("web", &[("cart", 8080), ("web", 80)]),
                ing("api", &[("cart", 8080), ("orders", 9000)]),
            ],
        };
        let listing = ElbPools {
            pools: vec![
                pool("p-cart", "k8s_shop_cart-8080_HTTP-80", &[]),
                pool("p-orders", "k8s_shop_orders-9000_HTTP-80", &[]),
                // Listed by the listener itself (a default pool), no policy.
                pool("p-web", "k8s_shop_web-80_HTTP-80", &["l80"]),
                // Reached by a policy, but the name names another port / no backend / no CCE shape.
                pool("p-port", "k8s_shop_cart-8080_HTTP-81", &[]),
                pool("p-other", "k8s_shop_ghost-80_HTTP-80", &[]),
                pool("p-manual", "my-pool", &[]),
                // Not behind this listener at all: ignored.
                pool("p-else", "k8s_shop_cart-8080_HTTP-80", &["l443"]),
            ],
            policies: ["p-cart", "p-orders", "p-port", "p-other", "p-manual"]
                .iter()
                .map(|p| policy("l80", p))
                .collect(),
        };
        let listings = [(Arc::from("elb"), listing)].into_iter().collect();
        let (pools, unmatched) = attribute_pools(&[route], &listings);
        let got: Vec<(&str, &str, &str)> = pools
            .iter()
            .map(|p| (&*p.pool_id, &*p.service, &*p.ingress))
            .collect();
        assert_eq!(
            got,
            vec![
                ("p-cart", "cart", "web"),
                ("p-orders", "orders", "api"),
                ("p-web", "web", "web"),
            ]
        );
        assert_eq!(unmatched.len(), 3, "{unmatched:?}");
        assert!(pools.iter().all(|p| p.port == 80));
    }
}
