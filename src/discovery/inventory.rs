//! The inventory joins discovered Services with their ELBs' listeners and publishes the current
//! [`Targets`]: one entry per (Service, listener) whose `protocol_port` equals one of the Service's ports.
//!
//! Listeners are resolved when an ELB is first seen (at once, not at the next tick), re-resolved every
//! `listener_refresh`, and after a failure retried with backoff (never a retry storm). Events are coalesced
//! so a burst of Service changes publishes one new target set.

use super::ingress::{IngressBook, IngressEvent};
use super::{DiscoveryEvent, ElbClass, Observed, Owner, Problem, Scope, ServiceKey};
use crate::cloud::{CloudApi, CloudError, ElbVersion, Listener};
use crate::telemetry::Telemetry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{info, warn};

/// How long events are coalesced before a new target set is published.
const COALESCE: Duration = Duration::from_millis(100);
/// ELB listings in flight at once (each is paged; the cloud client also caps total concurrency).
const RESOLVE_CONCURRENCY: usize = 8;
/// Load balancers per v3 listing task (the client splits further to keep URLs short).
const V3_BATCH: usize = 50;
/// Retry delay of a listing refused for credentials (no request is sent while the auth gate is closed).
const AUTH_RETRY: Duration = Duration::from_secs(2);
/// First retry delay after a failed listing; doubles up to `listener_refresh`.
const RETRY_BASE: Duration = Duration::from_secs(15);

/// One exported listener of one Service (or Ingress).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Whether `service` names a Service or an Ingress.
    pub owner: Owner,
    pub namespace: Arc<str>,
    pub service: Arc<str>,
    pub elb_id: Arc<str>,
    pub listener_id: Arc<str>,
    pub listener_name: Arc<str>,
    pub port: u16,
    pub protocol: Arc<str>,
}

/// The state of one annotated Service, for `check` and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceReport {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub elb_id: Option<Arc<str>>,
    pub api: Option<ElbVersion>,
    /// Empty when fine; otherwise what is wrong, in words.
    pub problems: Vec<String>,
    pub listeners: usize,
}

/// What the collector collects and the exposition labels: published as a whole, atomically.
#[derive(Debug, Default, Clone)]
pub struct Targets {
    /// Increases with every publication.
    pub generation: u64,
    /// The Service list has synced and every ELB known then has been looked up once.
    pub synced: bool,
    /// Annotated Services (usable or not).
    pub services: usize,
    /// Service listeners sorted by namespace, service, port, listener id; then Ingress listeners
    /// sorted the same way.
    pub targets: Vec<Target>,
    /// CCE Ingresses watched (usable or not).
    pub ingresses: usize,
    /// Ingress problems for `check` and logs: the reason, and `ingress namespace/name: problem`.
    pub ingress_problems: Vec<(Problem, String)>,
    /// Every Ingress listener with the Ingresses routed through it (input of the pool stage).
    pub routes: Vec<super::pools::IngressRoute>,
    /// Pools attributed to backend Services (filled by the pool stage).
    pub pools: Vec<super::pools::PoolTarget>,
    /// Current problem counts by reason (`elb_exporter_discovery_problems`).
    pub problems: BTreeMap<Problem, usize>,
    /// Watch scopes the apiserver refuses to list (RBAC), with its message, for `check` and logs.
    pub forbidden: Vec<(Scope, String)>,
    pub reports: Vec<ServiceReport>,
    /// Distinct ELBs referenced.
    pub elbs: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ElbStatus {
    Pending,
    Ok,
    /// Neither API knows it (or it has no listener at all).
    NotFound,
    Failed(String),
}

#[derive(Debug)]
struct ElbState {
    class: ElbClass,
    version: Option<ElbVersion>,
    listeners: Arc<Vec<Listener>>,
    status: ElbStatus,
    in_flight: bool,
    next_resolve: Instant,
    failures: u32,
}

/// Settings of the inventory.
#[derive(Debug, Clone)]
pub struct InventorySettings {
    pub listener_refresh: Duration,
    /// Number of watch scopes (namespaces, or 1 for all) that must report a full list before `synced`.
    pub scopes: usize,
    /// The same for the Ingress watch (0 when Ingresses are not watched).
    pub ingress_scopes: usize,
}

pub struct Inventory<C: CloudApi> {
    cloud: Arc<C>,
    settings: InventorySettings,
    telemetry: Telemetry,
    services: HashMap<ServiceKey, Observed>,
    elbs: HashMap<Arc<str>, ElbState>,
    scopes_synced: HashSet<Scope>,
    /// Scopes whose list was refused (403); they do not hold back readiness, and clear on their next list.
    scopes_forbidden: BTreeMap<Scope, String>,
    /// ELBs that must be looked up once before the first publication counts as synced.
    initial_pending: Option<HashSet<Arc<str>>>,
    generation: u64,
    logged: HashMap<ServiceKey, Vec<String>>,
    ingresses: IngressBook,
    tx: watch::Sender<Arc<Targets>>,
}

impl<C: CloudApi> Inventory<C> {
    pub fn new(
        cloud: Arc<C>,
        settings: InventorySettings,
        telemetry: Telemetry,
    ) -> (Self, watch::Receiver<Arc<Targets>>) {
        let (tx, rx) = watch::channel(Arc::new(Targets::default()));
        (
            Inventory {
                cloud,
                settings,
                telemetry,
                services: HashMap::new(),
                elbs: HashMap::new(),
                scopes_synced: HashSet::new(),
                scopes_forbidden: BTreeMap::new(),
                initial_pending: None,
                generation: 0,
                logged: HashMap::new(),
                ingresses: IngressBook::default(),
                tx,
            },
            rx,
        )
    }

    /// Runs until the discovery channel closes.
    pub async fn run(mut self, mut events: mpsc::Receiver<DiscoveryEvent>) {
        let limit = Arc::new(Semaphore::new(RESOLVE_CONCURRENCY));
        let mut lookups: JoinSet<Vec<(Arc<str>, ElbClass, LookupResult)>> = JoinSet::new();
        let mut dirty = false;
        let mut publish_at: Option<Instant> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ev = events.recv() => {
                    let Some(ev) = ev else { return };
                    if self.apply(ev) {
                        dirty = true;
                    }
                }
                Some(done) = lookups.join_next(), if !lookups.is_empty() => {
                    if let Ok(results) = done {
                        for (id, class, result) in results {
                            self.record_lookup(&id, class, result);
                        }
                        dirty = true;
                    }
                }
                _ = tick.tick() => {}
                _ = sleep_until_opt(publish_at) => {
                    publish_at = None;
                    self.publish();
                }
            }
            // Start lookups that are due (new ELBs at once, refreshes and retries on schedule):
            // v3 ELBs share paged listings, up to V3_BATCH ids each; v2 ELBs are asked one by one.
            let now = Instant::now();
            let mut v3: Vec<(Arc<str>, ElbClass)> = Vec::new();
            for (id, st) in self.elbs.iter_mut() {
                if st.in_flight || st.next_resolve > now {
                    continue;
                }
                st.in_flight = true;
                let via_v3 = matches!(
                    (st.class, st.version),
                    (ElbClass::Dedicated, _) | (ElbClass::Unspecified, Some(ElbVersion::V3) | None)
                );
                if via_v3 {
                    v3.push((id.clone(), st.class));
                } else {
                    let (cloud, id, class, version, limit) = (
                        self.cloud.clone(),
                        id.clone(),
                        st.class,
                        st.version,
                        limit.clone(),
                    );
                    lookups.spawn(async move {
                        let _permit = limit.acquire_owned().await.ok();
                        let r = lookup(&*cloud, &id, class, version).await;
                        vec![(id, class, r)]
                    });
                }
            }
            for chunk in v3.chunks(V3_BATCH) {
                let (cloud, chunk, limit) = (self.cloud.clone(), chunk.to_vec(), limit.clone());
                lookups.spawn(async move {
                    let _permit = limit.acquire_owned().await.ok();
                    lookup_v3_batch(&*cloud, chunk).await
                });
            }
            if dirty && publish_at.is_none() {
                publish_at = Some(Instant::now() + COALESCE);
                dirty = false;
            }
        }
    }

    /// Applies a discovery event; returns whether anything changed.
    fn apply(&mut self, ev: DiscoveryEvent) -> bool {
        match ev {
            DiscoveryEvent::Upsert(o) => self.upsert(o),
            DiscoveryEvent::Delete(key) => {
                let removed = self.services.remove(&key).is_some();
                if removed {
                    info!(namespace = %key.0, service = %key.1, "service gone");
                    self.gc_elbs();
                }
                removed
            }
            DiscoveryEvent::Resync { scope, observed } => {
                let keep: HashSet<ServiceKey> = observed.iter().map(observed_key).collect();
                self.services.retain(|k, _| {
                    let in_scope = scope.as_ref().is_none_or(|ns| *ns == k.0);
                    !in_scope || keep.contains(k)
                });
                for o in observed {
                    self.upsert(o);
                }
                self.gc_elbs();
                if self.scopes_forbidden.remove(&scope).is_some() {
                    info!(
                        scope = super::scope_name(&scope),
                        "services may be listed again"
                    );
                }
                self.scopes_synced.insert(scope);
                self.start_initial_lookups();
                true
            }
            DiscoveryEvent::Forbidden { scope, message } => {
                self.telemetry
                    .watch_restarts
                    .with_label_values(&["forbidden"])
                    .inc();
                let new =
                    self.scopes_forbidden.insert(scope.clone(), message.clone()) != Some(message);
                if new {
                    warn!(
                        scope = super::scope_name(&scope),
                        "RBAC forbids listing services here; the other scopes are collected, this one is retried with backoff"
                    );
                }
                self.start_initial_lookups();
                new
            }
            DiscoveryEvent::Ingress(ev) => self.apply_ingress(ev),
            DiscoveryEvent::Error(kind) => {
                self.telemetry
                    .watch_restarts
                    .with_label_values(&[kind])
                    .inc();
                false
            }
        }
    }

    /// Scopes that have answered, with a list or a refusal: readiness waits for each configured one.
    fn scopes_answered(&self) -> usize {
        self.scopes_synced
            .iter()
            .chain(self.scopes_forbidden.keys())
            .collect::<HashSet<_>>()
            .len()
    }

    /// Once every scope has answered, the ELBs known then are looked up before the first sync.
    fn start_initial_lookups(&mut self) {
        if self.initial_pending.is_none() && self.all_answered() {
            self.initial_pending = Some(
                self.elbs
                    .iter()
                    .filter(|(_, s)| s.status == ElbStatus::Pending)
                    .map(|(id, _)| id.clone())
                    .collect(),
            );
        }
    }

    fn upsert(&mut self, o: Observed) -> bool {
        let key = observed_key(&o);
        if let Observed::Ignored(_) = o {
            let removed = self.services.remove(&key).is_some();
            if removed {
                info!(namespace = %key.0, service = %key.1, "service lost its ELB annotation");
                self.gc_elbs();
            }
            return removed;
        }
        if self.services.get(&key) == Some(&o) {
            return false;
        }
        if let Observed::Target(t) = &o {
            self.ensure_elb(&t.elb_id, t.class);
        }
        self.services.insert(key, o);
        self.gc_elbs();
        true
    }

    fn ensure_elb(&mut self, elb_id: &Arc<str>, class: ElbClass) {
        let st = self.elbs.entry(elb_id.clone()).or_insert_with(|| ElbState {
            class,
            version: None,
            listeners: Arc::new(Vec::new()),
            status: ElbStatus::Pending,
            in_flight: false,
            next_resolve: Instant::now(),
            failures: 0,
        });
        // A changed class (or a changed Service) re-resolves at once.
        if st.class != class {
            st.class = class;
            st.version = None;
        }
        st.next_resolve = Instant::now();
    }

    fn gc_elbs(&mut self) {
        let used: HashSet<&Arc<str>> = self
            .services
            .values()
            .filter_map(|o| match o {
                Observed::Target(t) => Some(&t.elb_id),
                _ => None,
            })
            .chain(self.ingresses.elbs().map(|(id, _)| id))
            .collect();
        self.elbs.retain(|id, _| used.contains(id));
    }

    fn record_lookup(&mut self, id: &Arc<str>, class: ElbClass, result: LookupResult) {
        if let Some(pending) = self.initial_pending.as_mut() {
            pending.remove(id);
        }
        let refresh = self.settings.listener_refresh;
        let Some(st) = self.elbs.get_mut(id) else {
            return;
        };
        st.in_flight = false;
        if st.class != class {
            // The Service changed while the lookup ran; the new lookup is already due.
            return;
        }
        match result {
            Ok((version, listeners)) => {
                st.failures = 0;
                st.next_resolve = Instant::now() + refresh;
                let status = if listeners.is_empty() {
                    ElbStatus::NotFound
                } else {
                    ElbStatus::Ok
                };
                if status != st.status || st.listeners.len() != listeners.len() {
                    info!(elb = %id, api = version.map(|v| v.as_str()).unwrap_or("v3+v2"), listeners = listeners.len(), "listeners resolved");
                }
                st.version = version;
                st.status = status;
                st.listeners = Arc::new(listeners);
            }
            Err(e) => {
                let backoff = if matches!(
                    e,
                    CloudError::AuthBackoff(..) | CloudError::Unauthorized(..)
                ) {
                    // The client's auth gate already keeps rejected credentials from reaching the cloud;
                    // asking again soon costs nothing and picks up rotated credentials at once.
                    AUTH_RETRY
                } else {
                    st.failures = st.failures.saturating_add(1);
                    RETRY_BASE
                        .saturating_mul(1u32 << st.failures.min(10).saturating_sub(1))
                        .min(refresh)
                };
                st.next_resolve = Instant::now() + backoff;
                warn!(elb = %id, error = %e, retry_in_ms = backoff.as_millis() as u64, "listener lookup failed; keeping the last known listeners");
                // The last good listeners keep being exported; only a never-resolved ELB is "failed".
                if st.status == ElbStatus::Pending || matches!(st.status, ElbStatus::Failed(_)) {
                    st.status = ElbStatus::Failed(e.to_string());
                }
            }
        }
    }

    fn publish(&mut self) {
        let mut keys: Vec<&ServiceKey> = self.services.keys().collect();
        keys.sort();
        let mut targets = Vec::new();
        let mut reports = Vec::with_capacity(keys.len());
        let mut problems: BTreeMap<Problem, usize> = BTreeMap::new();
        let mut new_logged: HashMap<ServiceKey, Vec<String>> = HashMap::new();
        for key in keys {
            let mut report = ServiceReport {
                namespace: key.0.clone(),
                name: key.1.clone(),
                elb_id: None,
                api: None,
                problems: Vec::new(),
                listeners: 0,
            };
            match &self.services[key] {
                Observed::Ignored(_) => continue,
                Observed::Invalid { problem, .. } => {
                    *problems.entry(*problem).or_default() += 1;
                    report.problems.push(problem.describe().to_string());
                }
                Observed::Target(t) => {
                    report.elb_id = Some(t.elb_id.clone());
                    if let Some(st) = self.elbs.get(&t.elb_id) {
                        report.api = st.version;
                        match &st.status {
                            ElbStatus::NotFound => {
                                *problems.entry(Problem::UnknownElb).or_default() += 1;
                                report.problems.push(format!(
                                    "ELB {} has no listener on the {} API (unknown id?)",
                                    t.elb_id,
                                    match t.class {
                                        ElbClass::Shared => "v2",
                                        ElbClass::Dedicated => "v3",
                                        ElbClass::Unspecified => "v3 or v2",
                                    }
                                ));
                            }
                            ElbStatus::Failed(e) => {
                                *problems.entry(Problem::ElbLookupFailed).or_default() += 1;
                                report.problems.push(format!("listener lookup failed: {e}"));
                            }
                            ElbStatus::Pending | ElbStatus::Ok => {}
                        }
                        let before = targets.len();
                        for &port in &t.ports {
                            let mut found = false;
                            for l in st.listeners.iter().filter(|l| l.port == port) {
                                found = true;
                                targets.push(Target {
                                    owner: Owner::Service,
                                    namespace: t.namespace.clone(),
                                    service: t.name.clone(),
                                    elb_id: t.elb_id.clone(),
                                    listener_id: l.id.as_str().into(),
                                    listener_name: l.name.as_str().into(),
                                    port: l.port,
                                    protocol: l.protocol.as_str().into(),
                                });
                            }
                            if !found && st.status == ElbStatus::Ok {
                                *problems.entry(Problem::PortWithoutListener).or_default() += 1;
                                report.problems.push(format!(
                                    "port {port} has no listener on ELB {}",
                                    t.elb_id
                                ));
                            }
                        }
                        report.listeners = targets.len() - before;
                    }
                }
            }
            if !report.problems.is_empty() {
                new_logged.insert(key.clone(), report.problems.clone());
            }
            reports.push(report);
        }
        // Log each Service's problems once per change, not on every publication.
        for (key, probs) in &new_logged {
            if self.logged.get(key) != Some(probs) {
                warn!(namespace = %key.0, service = %key.1, problems = %probs.join("; "), "service cannot be fully exported");
            }
        }
        for key in self.logged.keys() {
            if !new_logged.contains_key(key) && self.services.contains_key(key) {
                info!(namespace = %key.0, service = %key.1, "service problems resolved");
            }
        }
        self.logged = new_logged;

        if !self.scopes_forbidden.is_empty() {
            problems.insert(Problem::NamespaceForbidden, self.scopes_forbidden.len());
        }
        let (ingress_problems, routes) = self.ingress_targets(&mut targets, &mut problems);
        let synced =
            self.all_answered() && self.initial_pending.as_ref().is_some_and(|p| p.is_empty());
        self.generation += 1;
        let refresh_per_min = 60.0 / self.settings.listener_refresh.as_secs_f64().max(1.0);
        self.telemetry
            .planned_calls
            .with_label_values(&[crate::telemetry::Api::ElbListListeners.as_str()])
            .set((self.elbs.len() as f64 * refresh_per_min).ceil() as i64);
        let t = Targets {
            generation: self.generation,
            synced,
            services: reports.len(),
            targets,
            problems,
            forbidden: self
                .scopes_forbidden
                .iter()
                .map(|(s, m)| (s.clone(), m.clone()))
                .collect(),
            reports,
            elbs: self.elbs.len(),
            ingresses: self.ingresses.ingresses.len(),
            ingress_problems,
            routes,
            pools: Vec::new(),
        };
        self.tx.send_replace(Arc::new(t));
    }
}

// ---------------------------------------------------------------------------------------------------------
// Ingresses (attribution itself lives in `super::ingress`)

impl<C: CloudApi> Inventory<C> {
    /// Every Service scope and every Ingress scope has answered (a list or a refusal).
    fn all_answered(&self) -> bool {
        self.scopes_answered() >= self.settings.scopes
            && self.ingresses.answered.len() >= self.settings.ingress_scopes
    }

    fn apply_ingress(&mut self, ev: IngressEvent) -> bool {
        if !self.ingresses.apply(ev) {
            return false;
        }
        let elbs: Vec<(Arc<str>, ElbClass)> = self
            .ingresses
            .elbs()
            .filter(|(id, _)| !self.elbs.contains_key(*id))
            .map(|(id, c)| (id.clone(), c))
            .collect();
        for (id, class) in elbs {
            self.ensure_elb(&id, class);
        }
        self.gc_elbs();
        self.start_initial_lookups();
        true
    }

    /// Appends the Ingress listener targets and counts Ingress problems; returns them in words, and
    /// the routes the pool stage attributes pools along.
    fn ingress_targets(
        &self,
        targets: &mut Vec<Target>,
        problems: &mut BTreeMap<Problem, usize>,
    ) -> (Vec<(Problem, String)>, Vec<super::pools::IngressRoute>) {
        let a = super::ingress::attribute(&self.ingresses, |id| match self.elbs.get(id) {
            Some(st) if st.status == ElbStatus::Ok => Ok(st.listeners.as_slice()),
            Some(st) if st.status == ElbStatus::NotFound => Err(Some(Problem::UnknownElb)),
            Some(st) if matches!(st.status, ElbStatus::Failed(_)) => {
                Err(Some(Problem::ElbLookupFailed))
            }
            _ => Err(None),
        });
        let start = targets.len();
        for o in &a.owned {
            targets.push(Target {
                owner: Owner::Ingress,
                namespace: o.ingress.namespace.clone(),
                service: o.ingress.name.clone(),
                elb_id: o.ingress.elb_id.clone(),
                listener_id: o.listener.id.as_str().into(),
                listener_name: o.listener.name.as_str().into(),
                port: o.listener.port,
                protocol: o.listener.protocol.as_str().into(),
            });
        }
        targets[start..].sort_by(|x, y| {
            (&x.namespace, &x.service, x.port, &x.listener_id).cmp(&(
                &y.namespace,
                &y.service,
                y.port,
                &y.listener_id,
            ))
        });
        let mut words: Vec<(Problem, String)> = a
            .problems
            .iter()
            .map(|(key, problem, text)| {
                *problems.entry(*problem).or_default() += 1;
                (*problem, format!("ingress {}/{}: {text}", key.0, key.1))
            })
            .collect();
        for (scope, message) in &self.ingresses.forbidden {
            *problems.entry(Problem::IngressForbidden).or_default() += 1;
            words.push((
                Problem::IngressForbidden,
                format!(
                    "ingresses in {}: {message}; grant get/list/watch on ingresses.networking.k8s.io (deploy/clusterrole.yaml) or set discovery.ingresses: false",
                    super::scope_name(scope)
                ),
            ));
        }
        words.sort();
        let routes = a
            .routes
            .iter()
            .filter_map(|r| {
                let elb = &r.ingresses.first()?.elb_id;
                Some(super::pools::IngressRoute {
                    elb_id: elb.clone(),
                    version: self.elbs.get(elb).and_then(|st| st.version),
                    listener_id: r.listener.id.as_str().into(),
                    port: r.listener.port,
                    ingresses: r
                        .ingresses
                        .iter()
                        .map(|i| super::pools::RouteIngress {
                            namespace: i.namespace.clone(),
                            name: i.name.clone(),
                            uid: i.uid.clone(),
                            backends: i.backends.clone(),
                        })
                        .collect(),
                })
            })
            .collect();
        (words, routes)
    }
}

type LookupResult = Result<(Option<ElbVersion>, Vec<Listener>), CloudError>;

/// Looks up dedicated (and unclassified) ELBs in one paged v3 listing; an unclassified ELB the v3 API
/// does not know is then asked on v2.
async fn lookup_v3_batch<C: CloudApi + ?Sized>(
    cloud: &C,
    elbs: Vec<(Arc<str>, ElbClass)>,
) -> Vec<(Arc<str>, ElbClass, LookupResult)> {
    let ids: Vec<&str> = elbs.iter().map(|(id, _)| &**id).collect();
    let mut found = match cloud.list_listeners_many(ElbVersion::V3, &ids).await {
        Ok(f) => f,
        Err(e) => {
            return elbs
                .into_iter()
                .map(|(id, class)| (id, class, Err(e.clone())))
                .collect();
        }
    };
    let mut out = Vec::with_capacity(elbs.len());
    for (id, class) in elbs {
        let r = match (found.remove(&*id), class) {
            (Some(l), _) => Ok((Some(ElbVersion::V3), l)),
            (None, ElbClass::Dedicated) => Ok((Some(ElbVersion::V3), Vec::new())),
            (None, _) => match cloud.list_listeners(ElbVersion::V2, &id).await {
                Ok(l) if !l.is_empty() => Ok((Some(ElbVersion::V2), l)),
                Ok(_) => Ok((None, Vec::new())),
                Err(e) => Err(e),
            },
        };
        out.push((id, class, r));
    }
    out
}

/// Lists an ELB's listeners on the API its class names; unspecified: the known API, else v3 then v2.
async fn lookup<C: CloudApi + ?Sized>(
    cloud: &C,
    id: &str,
    class: ElbClass,
    known: Option<ElbVersion>,
) -> LookupResult {
    match (class, known) {
        (ElbClass::Shared, _) => Ok((
            Some(ElbVersion::V2),
            cloud.list_listeners(ElbVersion::V2, id).await?,
        )),
        (ElbClass::Dedicated, _) => Ok((
            Some(ElbVersion::V3),
            cloud.list_listeners(ElbVersion::V3, id).await?,
        )),
        (ElbClass::Unspecified, Some(v)) => {
            let l = cloud.list_listeners(v, id).await?;
            if !l.is_empty() {
                return Ok((Some(v), l));
            }
            // The ELB may have moved API or lost its listeners: ask both again.
            Box::pin(lookup(cloud, id, class, None)).await
        }
        (ElbClass::Unspecified, None) => {
            let v3 = cloud.list_listeners(ElbVersion::V3, id).await?;
            if !v3.is_empty() {
                return Ok((Some(ElbVersion::V3), v3));
            }
            let v2 = cloud.list_listeners(ElbVersion::V2, id).await?;
            if !v2.is_empty() {
                return Ok((Some(ElbVersion::V2), v2));
            }
            Ok((None, Vec::new()))
        }
    }
}

fn observed_key(o: &Observed) -> ServiceKey {
    match o {
        Observed::Target(t) => t.key(),
        Observed::Invalid { key, .. } | Observed::Ignored(key) => key.clone(),
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
