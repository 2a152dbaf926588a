//! The inventory joins discovered Services with their ELBs' listeners and publishes the current
//! [`Targets`]: one entry per (Service, listener) whose `protocol_port` equals one of the Service's ports.
//!
//! Listing plan (per ELB API, see [`plan`] and docs/PERFORMANCE.md): an API's ELBs are listed either by
//! filtered listings (v3: 50 load balancer ids per call; v2: one id per call) or by paging through every
//! listener of the project and attributing each by its `loadbalancers[].id` — whichever takes fewer
//! calls for what is known. A complete project-wide listing tells how many listeners the project has;
//! until then one is tried with a page budget equal to the filtered calls, and abandoned (falling back to
//! filtered listings, and remembering "at least this many") once it would cost more.
//!
//! Lanes: ELBs of new or changed Services (and the initial list) are looked up at once, on the rate
//! limiter's priority lane; periodic re-listing (every `listener_refresh`) goes on the background lane,
//! which yields to every priority call, paced over the period (filtered) or as one paged project-wide
//! listing. A new Service whose ports find no listener yet has its ELB re-listed after 2, 4, 8, 16 and
//! 32 s (CCE may still be creating the listener), not at the next refresh. After a failure a lookup is
//! retried with backoff (never a retry storm). Events are coalesced so a burst of Service changes
//! publishes one new target set.

use super::ingress::{IngressBook, IngressEvent};
use super::names::{NameJob, NameQuery, Names};
use super::plan::{Plan, ProjectSize, plan};
use super::{
    DiscoveryEvent, ElbClass, Observed, Owner, PortNames, Problem, Scope, ServiceKey, ServiceTarget,
};
use crate::cloud::Operation;
use crate::cloud::{CloudApi, CloudError, ElbVersion, Lane, LbListing, Listener, Listing};
use crate::telemetry::Telemetry;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{info, warn};

/// How long events are coalesced before a new target set is published.
const COALESCE: Duration = Duration::from_millis(100);
/// Priority listings in flight at once (the cloud client also caps total concurrency).
const PRIORITY_CONCURRENCY: usize = 8;
/// Background (refresh) listings in flight at once.
const BACKGROUND_CONCURRENCY: usize = 2;
/// Retry delay of a listing refused for credentials (no request is sent while the auth gate is closed).
const AUTH_RETRY: Duration = Duration::from_secs(2);
/// First retry delay after a failed listing; doubles up to `listener_refresh`.
const RETRY_BASE: Duration = Duration::from_secs(15);
/// Lookups wait this long at most for every watch scope's first list, so the initial ELBs are planned
/// together (one project-wide listing rather than one per scope).
const INITIAL_HOLD: Duration = Duration::from_secs(5);
/// Re-listing of an ELB whose new Service names a port without listener: 2, 4, 8, 16, 32 s.
const PORT_RETRY_BASE: Duration = Duration::from_secs(2);
const PORT_RETRIES: u32 = 5;
/// A Service counts as new for port retries this long after it appeared or changed.
const NEW_SERVICE_WINDOW: Duration = Duration::from_secs(120);
/// Longest pause between the pages of a background project-wide listing: spreads its calls without
/// letting the listing span so long that its paging marker is likely to be deleted meanwhile.
const MAX_PAGE_GAP: Duration = Duration::from_secs(1);

/// One exported listener of one Service (or Ingress).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Whether `service` names a Service or an Ingress.
    pub owner: Owner,
    /// The owner's namespace: the `namespace` label.
    pub namespace: Arc<str>,
    /// The owner's name: the `service` (or `ingress`) label.
    pub service: Arc<str>,
    /// The ELB the listener belongs to: CES dimension `lbaas_instance_id`.
    pub elb_id: Arc<str>,
    /// CES dimension `lbaas_listener_id`.
    pub listener_id: Arc<str>,
    /// The listener's name on the ELB.
    pub listener_name: Arc<str>,
    /// The listener (and Service) port.
    pub port: u16,
    /// The listener's protocol.
    pub protocol: Arc<str>,
    /// The Service's or Ingress's `metadata.uid` (`elb_exporter_listener_info` only).
    pub uid: Arc<str>,
    /// The ELB's name, empty while unknown (`elb_exporter_listener_info` only).
    pub elb_name: Arc<str>,
}

/// The state of one annotated Service, for `check` and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceReport {
    /// The Service's namespace.
    pub namespace: Arc<str>,
    /// The Service's name.
    pub name: Arc<str>,
    /// The annotated ELB, when the annotation is usable.
    pub elb_id: Option<Arc<str>>,
    /// The listener API that knows the ELB, once looked up.
    pub api: Option<ElbVersion>,
    /// Empty when fine; otherwise what is wrong, in words.
    pub problems: Vec<String>,
    /// Listeners attributed to its ports.
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
    pub listeners: Vec<Target>,
    /// CCE Ingresses watched (usable or not).
    pub ingresses: usize,
    /// Ingress problems for `check` and logs: the reason, and `ingress namespace/name: problem`.
    pub ingress_problems: Vec<(Problem, String)>,
    /// Every Ingress listener with the Ingresses routed through it (input of the pool stage).
    pub routes: Vec<IngressRoute>,
    /// Pools attributed to backend Services (filled by the pool stage).
    pub pools: Vec<PoolTarget>,
    /// Current problem counts by reason (`elb_exporter_discovery_problems`).
    pub problems: BTreeMap<Problem, usize>,
    /// Watch scopes the apiserver refuses to list (RBAC), with its message, for `check` and logs.
    pub forbidden: Vec<(Scope, String)>,
    /// Every annotated Service, for `check` and logs.
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
    /// Looked up on the priority lane (new or changed Service, or a new Service's missing port).
    urgent: bool,
    /// An unclassified ELB the v3 API did not know: ask v2 next.
    probe_v2: bool,
    /// Port retries done for new Services on this ELB, and whether one is scheduled.
    port_retries: u32,
    port_retry_pending: bool,
}

impl ElbState {
    /// The API to ask next: the class's, else the one that knew it, else v3 then v2.
    fn api(&self) -> ElbVersion {
        match (self.class, self.version) {
            (ElbClass::Shared, _) => ElbVersion::V2,
            (ElbClass::Dedicated, _) => ElbVersion::V3,
            (ElbClass::Unspecified, Some(v)) => v,
            (ElbClass::Unspecified, None) if self.probe_v2 => ElbVersion::V2,
            (ElbClass::Unspecified, None) => ElbVersion::V3,
        }
    }
}

/// One Ingress on a listener, as pool attribution needs it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RouteIngress {
    /// The Ingress's namespace.
    pub namespace: Arc<str>,
    /// The Ingress's name.
    pub name: Arc<str>,
    /// The Ingress's uid.
    pub uid: Arc<str>,
    /// (Service, numeric port), sorted: named ports resolved through the Service's `spec.ports[]`.
    pub backends: Vec<(Arc<str>, u16)>,
    /// (Service, port name) of backends whose named port could not be resolved (the Service is not
    /// watched, or has no port of that name): its pool is `pool_unmatched`, with this as the reason.
    pub unresolved: Vec<(Arc<str>, Arc<str>)>,
}

/// An Ingress listener and the Ingresses routed through it, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IngressRoute {
    /// The ELB of the listener.
    pub elb_id: Arc<str>,
    /// The API that knows the ELB (its pools are listed there).
    pub version: Option<ElbVersion>,
    /// The Ingress listener.
    pub listener_id: Arc<str>,
    /// Its port.
    pub port: u16,
    /// Every Ingress routed through it, oldest first.
    pub ingresses: Vec<RouteIngress>,
}

/// One exported pool: labels of `<prefix>_sys_elb_pool_<metric>` and `elb_exporter_pool_info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolTarget {
    /// The namespace of the backend Service and its Ingress.
    pub namespace: Arc<str>,
    /// The backend Service the pool serves.
    pub service: Arc<str>,
    /// The oldest Ingress routing to that backend on that listener.
    pub ingress: Arc<str>,
    /// That Ingress's uid (`elb_exporter_pool_info` only).
    pub uid: Arc<str>,
    /// The ELB's name, empty while unknown (`elb_exporter_pool_info` only).
    pub elb_name: Arc<str>,
    /// The ELB of the pool.
    pub elb_id: Arc<str>,
    /// CES dimension `lbaas_pool_id`.
    pub pool_id: Arc<str>,
    /// CCE's name for it, `k8s_<namespace>_<service>-<port>_<protocol>-<port>`.
    pub pool_name: Arc<str>,
    /// The listener port the pool serves.
    pub port: u16,
}

/// Per ELB API state of the inventory.
#[derive(Debug)]
struct ApiState {
    size: ProjectSize,
    /// A project-wide listing is running.
    listing: bool,
    /// Earliest start of the next background filtered listing (paces the refresh over the period).
    background_next: Instant,
    plan: Plan,
}

/// Settings of the inventory.
#[derive(Debug, Clone)]
pub struct InventorySettings {
    /// `discovery.listener_refresh`: how often known ELBs are listed again.
    pub listener_refresh: Duration,
    /// Number of watch scopes (namespaces, or 1 for all) that must report a full list before `synced`.
    pub scopes: usize,
    /// The same for the Ingress watch (0 when Ingresses are not watched).
    pub ingress_scopes: usize,
}

/// A finished listing: which ELBs it covered (with the class they had when it started) and its answer.
struct Done {
    version: ElbVersion,
    project_wide: bool,
    covered: Vec<(Arc<str>, ElbClass)>,
    result: Result<Listing, CloudError>,
}

/// Resolves watched Services and Ingresses to ELB listeners and publishes them as [`Targets`].
pub struct Inventory<C: CloudApi> {
    cloud: Arc<C>,
    settings: InventorySettings,
    telemetry: Telemetry,
    services: HashMap<ServiceKey, Observed>,
    /// Named ports of every watched Service (see [`Self::set_port_names`]).
    port_names: HashMap<ServiceKey, PortNames>,
    elbs: HashMap<Arc<str>, ElbState>,
    apis: [ApiState; 2],
    scopes_synced: HashSet<Scope>,
    /// Scopes whose list was refused (403); they do not hold back readiness, and clear on their next list.
    scopes_forbidden: BTreeMap<Scope, String>,
    /// ELBs that must be looked up once before the first publication counts as synced.
    initial_pending: Option<HashSet<Arc<str>>>,
    /// Services that appeared or changed after the initial sync, and when.
    new_services: HashMap<ServiceKey, Instant>,
    /// (when, cloud call, ELB API, calls) of finished listings within the last `listener_refresh`.
    calls: VecDeque<(Instant, Operation, ElbVersion, u32)>,
    /// ELB names (`elb_name`), looked up by load balancer listings.
    names: Names,
    started: Instant,
    generation: u64,
    logged: HashMap<ServiceKey, Vec<String>>,
    ingresses: IngressBook,
    tx: watch::Sender<Arc<Targets>>,
}

fn api_index(v: ElbVersion) -> usize {
    match v {
        ElbVersion::V2 => 0,
        ElbVersion::V3 => 1,
    }
}

impl<C: CloudApi> Inventory<C> {
    /// An inventory and the receiver of its targets (empty, unsynced, until the watch lists).
    pub fn new(
        cloud: Arc<C>,
        settings: InventorySettings,
        telemetry: Telemetry,
    ) -> (Self, watch::Receiver<Arc<Targets>>) {
        let (tx, rx) = watch::channel(Arc::new(Targets::default()));
        let now = Instant::now();
        let names = Names::new(settings.listener_refresh);
        let api = || ApiState {
            size: ProjectSize::Unknown,
            listing: false,
            background_next: now,
            plan: Plan::Idle,
        };
        (
            Inventory {
                cloud,
                settings,
                telemetry,
                services: HashMap::new(),
                port_names: HashMap::new(),
                elbs: HashMap::new(),
                apis: [api(), api()],
                scopes_synced: HashSet::new(),
                scopes_forbidden: BTreeMap::new(),
                initial_pending: None,
                new_services: HashMap::new(),
                calls: VecDeque::new(),
                names,
                started: now,
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
        let lanes = Lanes {
            priority: Arc::new(Semaphore::new(PRIORITY_CONCURRENCY)),
            background: Arc::new(Semaphore::new(BACKGROUND_CONCURRENCY)),
        };
        let mut lookups: JoinSet<Done> = JoinSet::new();
        let mut name_lookups: JoinSet<(NameJob, Result<LbListing, CloudError>)> = JoinSet::new();
        let mut dirty = false;
        let mut publish_at: Option<Instant> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(250));
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
                    if let Ok(done) = done {
                        self.record_done(done);
                        dirty = true;
                    }
                }
                Some(done) = name_lookups.join_next(), if !name_lookups.is_empty() => {
                    if let Ok((job, result)) = done {
                        if let Ok(l) = &result {
                            self.count_calls(Operation::ElbListLoadbalancers, job.version, l.calls);
                        }
                        // Published even when no name changed: readiness may wait for it.
                        self.names.record(&job, result, Instant::now());
                        dirty = true;
                    }
                }
                _ = tick.tick() => {}
                _ = sleep_until_opt(publish_at) => {
                    publish_at = None;
                    self.publish();
                }
            }
            let all_scopes = self.scopes_synced.len() >= self.settings.scopes
                && self.ingresses.answered.len() >= self.settings.ingress_scopes;
            if all_scopes || self.started.elapsed() >= INITIAL_HOLD {
                self.schedule(Instant::now(), &mut lookups, &lanes);
                self.schedule_names(Instant::now(), &mut name_lookups, &lanes);
            }
            if dirty && publish_at.is_none() {
                publish_at = Some(Instant::now() + COALESCE);
                dirty = false;
            }
        }
    }

    /// Starts the listings that are due: per API, urgent ELBs on the priority lane (project-wide when
    /// that is cheaper for them), then the periodic refresh on the background lane.
    fn schedule(&mut self, now: Instant, lookups: &mut JoinSet<Done>, lanes: &Lanes) {
        for version in [ElbVersion::V3, ElbVersion::V2] {
            let mut all = 0usize;
            let (mut urgent, mut background) = (Vec::new(), Vec::new());
            for (id, st) in &self.elbs {
                if st.api() != version {
                    continue;
                }
                all += 1;
                if st.in_flight || st.next_resolve > now {
                    continue;
                }
                let entry = (st.next_resolve, id.clone());
                if st.urgent {
                    urgent.push(entry);
                } else {
                    background.push(entry);
                }
            }
            let api = &mut self.apis[api_index(version)];
            let whole = plan(version, all, api.size);
            if whole != api.plan {
                if whole.calls() != api.plan.calls()
                    || !matches!(
                        (whole, api.plan),
                        (Plan::ProjectWide { .. }, Plan::ProjectWide { .. })
                    )
                {
                    info!(
                        api = version.as_str(),
                        elbs = all,
                        plan = whole.describe(),
                        calls = whole.calls(),
                        "listing plan"
                    );
                }
                api.plan = whole;
            }
            if !urgent.is_empty() {
                let lane_plan = plan(version, urgent.len(), api.size);
                if let (Plan::ProjectWide { budget, .. }, false) = (lane_plan, api.listing) {
                    self.start_project_wide(
                        version,
                        Lane::Priority,
                        budget,
                        Duration::ZERO,
                        lookups,
                        lanes,
                    );
                } else {
                    self.start_filtered(version, Lane::Priority, urgent, lookups, lanes);
                }
            }
            if !background.is_empty() {
                self.schedule_refresh(version, whole, background, now, lookups, lanes);
            }
        }
    }

    /// Starts the periodic re-listing of `version` that is due, on the background lane, spread out.
    fn schedule_refresh(
        &mut self,
        version: ElbVersion,
        whole: Plan,
        mut background: Vec<(Instant, Arc<str>)>,
        now: Instant,
        lookups: &mut JoinSet<Done>,
        lanes: &Lanes,
    ) {
        match whole {
            Plan::ProjectWide { calls, budget } if !self.apis[api_index(version)].listing => {
                // Pages spread up to a second apart: the listing is a handful of calls by construction
                // (it is only chosen when cheaper than the filtered listings).
                let gap =
                    (self.settings.listener_refresh / (4 * calls.max(1) as u32)).min(MAX_PAGE_GAP);
                self.start_project_wide(version, Lane::Background, budget, gap, lookups, lanes);
            }
            Plan::ProjectWide { .. } | Plan::Idle => {}
            Plan::Filtered { calls } => {
                // Paced at a little more than calls per period, so one refresh takes about a period and a
                // backlog (after an outage, or the switch from a project-wide plan) never bursts.
                let gap = self.settings.listener_refresh / (calls + calls / 4 + 1) as u32;
                background.sort();
                let per_call = version.ids_per_listing();
                let mut due = background.into_iter().map(|(_, id)| id);
                while self.apis[api_index(version)].background_next <= now {
                    let mut chunk: Vec<Arc<str>> = due.by_ref().take(per_call).collect();
                    if chunk.is_empty() {
                        break;
                    }
                    if chunk.len() < per_call {
                        self.fill_chunk(version, &mut chunk, per_call);
                    }
                    self.start_filtered_chunk(version, Lane::Background, chunk, lookups, lanes);
                    let next = &mut self.apis[api_index(version)].background_next;
                    *next = (*next).max(now) + gap;
                }
            }
        }
    }

    /// Tops a v3 chunk up with the ELBs due soonest, so the refresh lists 50 per call however their due
    /// times are spread.
    fn fill_chunk(&self, version: ElbVersion, chunk: &mut Vec<Arc<str>>, per_call: usize) {
        let mut soon: Vec<(Instant, &Arc<str>)> = self
            .elbs
            .iter()
            .filter(|(id, st)| st.api() == version && !st.in_flight && !chunk.contains(id))
            .map(|(id, st)| (st.next_resolve, id))
            .collect();
        soon.sort();
        chunk.extend(
            soon.into_iter()
                .take(per_call - chunk.len())
                .map(|(_, id)| id.clone()),
        );
    }

    fn start_filtered(
        &mut self,
        version: ElbVersion,
        lane: Lane,
        mut due: Vec<(Instant, Arc<str>)>,
        lookups: &mut JoinSet<Done>,
        lanes: &Lanes,
    ) {
        due.sort();
        let ids: Vec<Arc<str>> = due.into_iter().map(|(_, id)| id).collect();
        for chunk in ids.chunks(version.ids_per_listing()) {
            self.start_filtered_chunk(version, lane, chunk.to_vec(), lookups, lanes);
        }
    }

    fn start_filtered_chunk(
        &mut self,
        version: ElbVersion,
        lane: Lane,
        ids: Vec<Arc<str>>,
        lookups: &mut JoinSet<Done>,
        lanes: &Lanes,
    ) {
        let covered = self.take_in_flight(ids);
        let (cloud, permits) = (self.cloud.clone(), lanes.of(lane));
        lookups.spawn(async move {
            let _permit = permits.acquire_owned().await.ok();
            let ids: Vec<&str> = covered.iter().map(|(id, _)| &**id).collect();
            let result = cloud.list_listeners_of(version, &ids, lane).await;
            Done {
                version,
                project_wide: false,
                covered,
                result,
            }
        });
    }

    /// Lists every listener of the project on `version`, covering all its ELBs not already in flight.
    fn start_project_wide(
        &mut self,
        version: ElbVersion,
        lane: Lane,
        budget: usize,
        gap: Duration,
        lookups: &mut JoinSet<Done>,
        lanes: &Lanes,
    ) {
        let ids: Vec<Arc<str>> = self
            .elbs
            .iter()
            .filter(|(_, st)| st.api() == version && !st.in_flight)
            .map(|(id, _)| id.clone())
            .collect();
        let covered = self.take_in_flight(ids);
        self.apis[api_index(version)].listing = true;
        let (cloud, permits) = (self.cloud.clone(), lanes.of(lane));
        let budget = u32::try_from(budget).unwrap_or(u32::MAX);
        lookups.spawn(async move {
            let _permit = permits.acquire_owned().await.ok();
            let result = cloud.list_all_listeners(version, lane, budget, gap).await;
            Done {
                version,
                project_wide: true,
                covered,
                result,
            }
        });
    }

    fn take_in_flight(&mut self, ids: Vec<Arc<str>>) -> Vec<(Arc<str>, ElbClass)> {
        ids.into_iter()
            .filter_map(|id| {
                let st = self.elbs.get_mut(&id)?;
                st.in_flight = true;
                Some((id, st.class))
            })
            .collect()
    }

    fn record_done(&mut self, done: Done) {
        let Done {
            version,
            project_wide,
            covered,
            result,
        } = done;
        if project_wide {
            self.apis[api_index(version)].listing = false;
        }
        let mut listing = match result {
            Ok(l) => l,
            Err(e) => {
                for (id, class) in covered {
                    self.record_error(&id, class, &e);
                }
                return;
            }
        };
        self.count_calls(Operation::ElbListListeners, version, listing.calls);
        if project_wide {
            let api = &mut self.apis[api_index(version)];
            if !listing.complete {
                // Over budget: the project is too large to page through for these ELBs. They are due again
                // at once (same lane) and the plan now picks filtered listings.
                api.size = ProjectSize::AtLeast(listing.seen);
                info!(
                    api = version.as_str(),
                    listeners_at_least = listing.seen,
                    pages = listing.calls,
                    "project-wide listing over budget; listing by load balancer"
                );
                for (id, _) in covered {
                    if let Some(st) = self.elbs.get_mut(&id) {
                        st.in_flight = false;
                    }
                }
                return;
            }
            api.size = ProjectSize::Exactly(listing.seen);
        }
        for (id, class) in covered {
            let found = listing.by_lb.remove(&*id).unwrap_or_default();
            self.record(&id, class, version, found);
        }
    }

    fn count_calls(&mut self, api: Operation, version: ElbVersion, calls: u32) {
        let now = Instant::now();
        self.calls.push_back((now, api, version, calls));
        self.update_calls_gauge(now);
    }

    /// The ELBs with listeners on `version` (those that get a name).
    fn listed_elbs(&self, version: ElbVersion) -> Vec<Arc<str>> {
        let mut elbs: Vec<Arc<str>> = self
            .elbs
            .iter()
            .filter(|(_, st)| st.status == ElbStatus::Ok && st.version == Some(version))
            .map(|(id, _)| id.clone())
            .collect();
        elbs.sort();
        elbs
    }

    /// Some ELB with listeners still waits for its first name listing.
    fn names_pending(&self) -> bool {
        [ElbVersion::V2, ElbVersion::V3]
            .into_iter()
            .any(|v| self.names.pending(v, &self.listed_elbs(v)))
    }

    /// Starts the ELB name listings that are due (see [`super::names`]).
    fn schedule_names(
        &mut self,
        now: Instant,
        lookups: &mut JoinSet<(NameJob, Result<LbListing, CloudError>)>,
        lanes: &Lanes,
    ) {
        for version in [ElbVersion::V3, ElbVersion::V2] {
            let elbs = self.listed_elbs(version);
            let busy = self.elbs.values().any(|st| {
                st.api() == version
                    && st.urgent
                    && (st.in_flight || st.status == ElbStatus::Pending)
            });
            let Some(job) = self.names.due(version, &elbs, busy, now) else {
                continue;
            };
            let (cloud, permits) = (self.cloud.clone(), lanes.of(job.lane));
            lookups.spawn(async move {
                let _permit = permits.acquire_owned().await.ok();
                let result = match &job.query {
                    NameQuery::ProjectWide { budget } => {
                        cloud
                            .list_loadbalancers(job.version, None, job.lane, *budget)
                            .await
                    }
                    NameQuery::Ids(ids) => {
                        let ids: Vec<&str> = ids.iter().map(|id| &**id).collect();
                        cloud
                            .list_loadbalancers(job.version, Some(&ids), job.lane, u32::MAX)
                            .await
                    }
                };
                (job, result)
            });
        }
    }

    fn update_calls_gauge(&mut self, now: Instant) {
        let window = self.settings.listener_refresh;
        while self
            .calls
            .front()
            .is_some_and(|(t, ..)| now.duration_since(*t) > window)
        {
            self.calls.pop_front();
        }
        for api in [Operation::ElbListListeners, Operation::ElbListLoadbalancers] {
            for v in [ElbVersion::V2, ElbVersion::V3] {
                let n: u32 = self
                    .calls
                    .iter()
                    .filter(|(_, ca, cv, _)| *ca == api && *cv == v)
                    .map(|(.., c)| c)
                    .sum();
                self.telemetry
                    .inventory_calls
                    .with_label_values(&[api.as_str(), v.as_str()])
                    .set(i64::from(n));
            }
        }
    }

    /// Applies a discovery event; returns whether anything changed.
    fn apply(&mut self, ev: DiscoveryEvent) -> bool {
        match ev {
            DiscoveryEvent::Upsert(o) => self.upsert(o),
            DiscoveryEvent::Delete(key) => {
                let named = self.port_names.remove(&key).is_some();
                let removed = self.services.remove(&key).is_some() || named;
                if removed {
                    info!(namespace = %key.0, service = %key.1, "service gone");
                    self.new_services.remove(&key);
                    self.gc_elbs();
                }
                removed
            }
            DiscoveryEvent::Resync { scope, observed } => {
                let keep: HashSet<ServiceKey> = observed.iter().map(observed_key).collect();
                let stays = |k: &ServiceKey| {
                    let in_scope = scope.as_ref().is_none_or(|ns| *ns == k.0);
                    !in_scope || keep.contains(k)
                };
                self.services.retain(|k, _| stays(k));
                self.port_names.retain(|k, _| stays(k));
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
                    .watch_errors
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
                self.telemetry.watch_errors.with_label_values(&[kind]).inc();
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
        let names_changed = self.set_port_names(&key, o.port_names());
        if let Observed::Ignored(..) = o {
            let removed = self.services.remove(&key).is_some();
            if removed {
                info!(namespace = %key.0, service = %key.1, "service lost its ELB annotation");
                self.new_services.remove(&key);
                self.gc_elbs();
            }
            return removed || names_changed;
        }
        if self.services.get(&key) == Some(&o) {
            return names_changed;
        }
        if let Observed::Target(t) = &o {
            self.ensure_elb(&t.elb_id, t.class);
            // Services of the initial list are not "new": only later ones get quick port retries.
            if self.initial_pending.is_some() {
                self.new_services.insert(key.clone(), Instant::now());
            }
        }
        self.services.insert(key, o);
        self.gc_elbs();
        true
    }

    /// Keeps the named ports of every watched Service (annotated or not) for Ingress backends that
    /// name their Service port; returns whether they changed.
    fn set_port_names(&mut self, key: &ServiceKey, names: &[(Arc<str>, u16)]) -> bool {
        if names.is_empty() {
            return self.port_names.remove(key).is_some();
        }
        if self
            .port_names
            .get(key)
            .is_some_and(|n| n.as_slice() == names)
        {
            return false;
        }
        self.port_names.insert(key.clone(), names.to_vec());
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
            urgent: true,
            probe_v2: false,
            port_retries: 0,
            port_retry_pending: false,
        });
        // A changed class (or a changed Service) re-resolves at once, ahead of any refresh.
        if st.class != class {
            st.class = class;
            st.version = None;
            st.probe_v2 = false;
        }
        st.next_resolve = Instant::now();
        st.urgent = true;
        st.port_retries = 0;
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
        let elbs = &self.elbs;
        self.names.retain(|id| elbs.contains_key(id));
    }

    /// Records what a complete listing said of one ELB (`listeners` empty: it has none on `asked`).
    fn record(
        &mut self,
        id: &Arc<str>,
        class: ElbClass,
        asked: ElbVersion,
        listeners: Vec<Listener>,
    ) {
        let now = Instant::now();
        let refresh = self.settings.listener_refresh;
        let Some(st) = self.elbs.get_mut(id) else {
            return;
        };
        st.in_flight = false;
        st.port_retry_pending = false;
        if st.class != class {
            // The Service changed while the listing ran; the new lookup is already due.
            return;
        }
        st.failures = 0;
        if listeners.is_empty() && st.class == ElbClass::Unspecified {
            let next = match (asked, st.version) {
                // v3 does not know it: ask v2 (keeping the lane).
                (ElbVersion::V3, _) => Some(true),
                // It was a v2 ELB and lost its listeners: ask both again.
                (ElbVersion::V2, Some(ElbVersion::V2)) => Some(false),
                (ElbVersion::V2, _) => None,
            };
            st.version = None;
            if let Some(probe_v2) = next {
                st.probe_v2 = probe_v2;
                st.next_resolve = now;
                return;
            }
            st.probe_v2 = false;
        } else {
            st.version = Some(asked);
            st.probe_v2 = false;
        }
        if let Some(pending) = self.initial_pending.as_mut() {
            pending.remove(id);
        }
        st.urgent = false;
        st.next_resolve = now + refresh;
        let status = if listeners.is_empty() {
            ElbStatus::NotFound
        } else {
            ElbStatus::Ok
        };
        if status != st.status || st.listeners.len() != listeners.len() {
            info!(elb = %id, api = st.version.map(|v| v.as_str()).unwrap_or("v3+v2"), listeners = listeners.len(), "listeners resolved");
        }
        st.status = status;
        st.listeners = Arc::new(listeners);
    }

    fn record_error(&mut self, id: &Arc<str>, class: ElbClass, e: &CloudError) {
        if let Some(pending) = self.initial_pending.as_mut() {
            pending.remove(id);
        }
        let refresh = self.settings.listener_refresh;
        let Some(st) = self.elbs.get_mut(id) else {
            return;
        };
        st.in_flight = false;
        st.port_retry_pending = false;
        if st.class != class {
            return;
        }
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

    /// Re-lists soon the ELBs whose new Services name a port without listener (CCE may still be creating
    /// it): 2, 4, 8, 16, 32 s after each answer, on the priority lane.
    fn schedule_port_retries(&mut self, elbs: Vec<Arc<str>>) {
        let now = Instant::now();
        for id in elbs {
            let Some(st) = self.elbs.get_mut(&id) else {
                continue;
            };
            if st.in_flight || st.port_retry_pending || st.port_retries >= PORT_RETRIES {
                continue;
            }
            let delay = PORT_RETRY_BASE.saturating_mul(1 << st.port_retries);
            st.next_resolve = st.next_resolve.min(now + delay);
            st.urgent = true;
            st.port_retries += 1;
            st.port_retry_pending = true;
        }
    }

    fn publish(&mut self) {
        let now = Instant::now();
        self.new_services
            .retain(|_, at| now.duration_since(*at) < NEW_SERVICE_WINDOW);
        let ServiceScan {
            mut targets,
            reports,
            mut problems,
            port_retries,
        } = self.scan_services();
        self.log_problem_changes(&reports);
        if !self.scopes_forbidden.is_empty() {
            problems.insert(Problem::NamespaceForbidden, self.scopes_forbidden.len());
        }
        let (ingress_problems, routes) = self.ingress_targets(&mut targets, &mut problems);
        let synced = self.all_answered()
            && self.initial_pending.as_ref().is_some_and(|p| p.is_empty())
            && !self.names_pending();
        self.set_planned_calls();
        self.update_calls_gauge(now);
        self.schedule_port_retries(port_retries);
        let t = Targets {
            generation: self.generation + 1,
            synced,
            services: reports.len(),
            listeners: targets,
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
        // A refresh that finds nothing new publishes nothing: every publication re-renders the whole body
        // (tens of MiB at 10,000 listeners) and wakes the collector.
        if self.tx.borrow().same_content(&t) {
            return;
        }
        self.generation += 1;
        self.tx.send_replace(Arc::new(t));
    }

    /// Every watched Service in key order: its report, its listeners as targets, its problems counted.
    fn scan_services(&self) -> ServiceScan {
        let mut keys: Vec<&ServiceKey> = self.services.keys().collect();
        keys.sort();
        let mut scan = ServiceScan {
            targets: Vec::new(),
            reports: Vec::with_capacity(keys.len()),
            problems: BTreeMap::new(),
            port_retries: Vec::new(),
        };
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
                Observed::Ignored(..) => continue,
                Observed::Invalid { problem, .. } => {
                    *scan.problems.entry(*problem).or_default() += 1;
                    report.problems.push(problem.describe().to_string());
                }
                Observed::Target(t) => self.scan_target(key, t, &mut report, &mut scan),
            }
            scan.reports.push(report);
        }
        scan
    }

    /// The listeners of one annotated Service on its ELB, and what keeps any port from being exported.
    fn scan_target(
        &self,
        key: &ServiceKey,
        t: &ServiceTarget,
        report: &mut ServiceReport,
        scan: &mut ServiceScan,
    ) {
        report.elb_id = Some(t.elb_id.clone());
        let Some(st) = self.elbs.get(&t.elb_id) else {
            return;
        };
        report.api = st.version;
        match &st.status {
            ElbStatus::NotFound => {
                *scan.problems.entry(Problem::UnknownElb).or_default() += 1;
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
                *scan.problems.entry(Problem::ElbLookupFailed).or_default() += 1;
                report.problems.push(format!("listener lookup failed: {e}"));
            }
            ElbStatus::Pending | ElbStatus::Ok => {}
        }
        let before = scan.targets.len();
        for &port in &t.ports {
            let mut found = false;
            for l in st.listeners.iter().filter(|l| l.port == port) {
                found = true;
                scan.targets.push(Target {
                    owner: Owner::Service,
                    namespace: t.namespace.clone(),
                    service: t.name.clone(),
                    elb_id: t.elb_id.clone(),
                    listener_id: l.id.as_str().into(),
                    listener_name: l.name.as_str().into(),
                    port: l.port,
                    protocol: l.protocol.as_str().into(),
                    uid: t.uid.clone(),
                    elb_name: self.names.name(&t.elb_id),
                });
            }
            if !found && st.status == ElbStatus::Ok {
                if self.new_services.contains_key(key) {
                    scan.port_retries.push(t.elb_id.clone());
                }
                *scan
                    .problems
                    .entry(Problem::PortWithoutListener)
                    .or_default() += 1;
                report
                    .problems
                    .push(format!("port {port} has no listener on ELB {}", t.elb_id));
            }
        }
        report.listeners = scan.targets.len() - before;
    }

    /// Logs each Service's problems once per change, not on every publication.
    fn log_problem_changes(&mut self, reports: &[ServiceReport]) {
        let new_logged: HashMap<ServiceKey, Vec<String>> = reports
            .iter()
            .filter(|r| !r.problems.is_empty())
            .map(|r| ((r.namespace.clone(), r.name.clone()), r.problems.clone()))
            .collect();
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
    }

    /// The listing calls a minute that the current plans take (listeners, and ELB names).
    fn set_planned_calls(&self) {
        let refresh_per_min = 60.0 / self.settings.listener_refresh.as_secs_f64().max(1.0);
        let per_refresh: usize = self.apis.iter().map(|a| a.plan.calls()).sum();
        self.telemetry
            .planned_calls
            .with_label_values(&[Operation::ElbListListeners.as_str()])
            .set((per_refresh as f64 * refresh_per_min).ceil() as i64);
        let names_per_refresh: usize = [ElbVersion::V2, ElbVersion::V3]
            .into_iter()
            .map(|v| self.names.planned_calls(v, self.listed_elbs(v).len()))
            .sum();
        self.telemetry
            .planned_calls
            .with_label_values(&[Operation::ElbListLoadbalancers.as_str()])
            .set((names_per_refresh as f64 * refresh_per_min).ceil() as i64);
    }
}

/// What [`Inventory::scan_services`] found: targets, reports and problems of the Services, and the
/// ELBs to look at again soon for a new Service whose port has no listener yet.
struct ServiceScan {
    targets: Vec<Target>,
    reports: Vec<ServiceReport>,
    problems: BTreeMap<Problem, usize>,
    port_retries: Vec<Arc<str>>,
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
    ) -> (Vec<(Problem, String)>, Vec<IngressRoute>) {
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
                uid: o.ingress.uid.clone(),
                elb_name: self.names.name(&o.ingress.elb_id),
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
                Some(IngressRoute {
                    elb_id: elb.clone(),
                    version: self.elbs.get(elb).and_then(|st| st.version),
                    listener_id: r.listener.id.as_str().into(),
                    port: r.listener.port,
                    ingresses: r.ingresses.iter().map(|i| self.route_ingress(i)).collect(),
                })
            })
            .collect();
        (words, routes)
    }
}

impl<C: CloudApi> Inventory<C> {
    /// An Ingress as pool attribution needs it: backends naming their Service port resolved to its
    /// number through that Service's `spec.ports[]` (CCE's pool name holds the number).
    fn route_ingress(&self, i: &super::ingress::IngressTarget) -> RouteIngress {
        let mut backends = i.backends.clone();
        let mut unresolved = Vec::new();
        for (svc, port) in &i.named_backends {
            let names = self.port_names.get(&(i.namespace.clone(), svc.clone()));
            match names.and_then(|n| n.iter().find(|(name, _)| name == port)) {
                Some((_, number)) => backends.push((svc.clone(), *number)),
                None => unresolved.push((svc.clone(), port.clone())),
            }
        }
        backends.sort();
        backends.dedup();
        RouteIngress {
            namespace: i.namespace.clone(),
            name: i.name.clone(),
            uid: i.uid.clone(),
            backends,
            unresolved,
        }
    }
}

impl Targets {
    /// Equal apart from the generation.
    fn same_content(&self, other: &Targets) -> bool {
        self.synced == other.synced
            && self.services == other.services
            && self.elbs == other.elbs
            && self.listeners == other.listeners
            && self.problems == other.problems
            && self.reports == other.reports
            && self.ingresses == other.ingresses
            && self.ingress_problems == other.ingress_problems
            && self.routes == other.routes
    }
}

/// Concurrency caps of the two lanes: refresh work never takes the slots of priority lookups.
struct Lanes {
    priority: Arc<Semaphore>,
    background: Arc<Semaphore>,
}

impl Lanes {
    fn of(&self, lane: Lane) -> Arc<Semaphore> {
        match lane {
            Lane::Priority => self.priority.clone(),
            Lane::Background => self.background.clone(),
        }
    }
}

impl Plan {
    fn describe(self) -> &'static str {
        match self {
            Plan::Idle => "idle",
            Plan::Filtered { .. } => "by load balancer",
            Plan::ProjectWide { .. } => "project-wide",
        }
    }
}

fn observed_key(o: &Observed) -> ServiceKey {
    match o {
        Observed::Target(t) => t.key(),
        Observed::Invalid { key, .. } | Observed::Ignored(key, _) => key.clone(),
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::ServiceTarget;

    #[test]
    fn plan_picks_the_fewest_calls_per_api() {
        use ElbVersion::{V2, V3};
        use ProjectSize::{AtLeast, Exactly, Unknown};
        // The realistic 10k fixture: 5,000 listeners per API on 1,250 ELBs each.
        assert_eq!(
            plan(V2, 1250, Exactly(5000)),
            Plan::ProjectWide {
                calls: 11,
                budget: 1250
            }
        );
        assert_eq!(
            plan(V3, 1250, Exactly(5000)),
            Plan::ProjectWide {
                calls: 3,
                budget: 25
            }
        );
        // 100,000 listeners and 10 annotated ELBs: never paged through.
        assert_eq!(plan(V2, 10, Exactly(100_000)), Plan::Filtered { calls: 10 });
        assert_eq!(plan(V3, 10, Exactly(100_000)), Plan::Filtered { calls: 1 });
        // Unknown size: tried, within the filtered cost; a stopped listing's lower bound then rules.
        assert_eq!(
            plan(V2, 10, Unknown),
            Plan::ProjectWide {
                calls: 1,
                budget: 10
            }
        );
        assert_eq!(plan(V2, 10, AtLeast(5000)), Plan::Filtered { calls: 10 });
        // One ELB, or a tie: filtered (it does not grow with unannotated listeners).
        assert_eq!(plan(V3, 1, Unknown), Plan::Filtered { calls: 1 });
        assert_eq!(plan(V2, 2, Exactly(500)), Plan::Filtered { calls: 2 });
        assert_eq!(plan(V2, 0, Unknown), Plan::Idle);
    }

    #[test]
    fn an_unclassified_elb_is_asked_on_v3_then_v2() {
        let mut st = ElbState {
            class: ElbClass::Unspecified,
            version: None,
            listeners: Arc::new(Vec::new()),
            status: ElbStatus::Pending,
            in_flight: false,
            next_resolve: Instant::now(),
            failures: 0,
            urgent: true,
            probe_v2: false,
            port_retries: 0,
            port_retry_pending: false,
        };
        assert_eq!(st.api(), ElbVersion::V3);
        st.probe_v2 = true;
        assert_eq!(st.api(), ElbVersion::V2);
        st.class = ElbClass::Dedicated;
        assert_eq!(st.api(), ElbVersion::V3, "the class wins");
    }

    /// Answers every listing with one listener per asked (or, project-wide, known) ELB, and counts calls.
    struct FakeCloud {
        elbs: Vec<&'static str>,
        calls: std::sync::atomic::AtomicUsize,
    }

    impl FakeCloud {
        fn listing(&self, ids: &[&str]) -> Listing {
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let by_lb = ids
                .iter()
                .map(|id| {
                    let l = Listener {
                        id: format!("{id}-80"),
                        name: "k8s_TCP_80".into(),
                        protocol: "TCP".into(),
                        port: 80,
                    };
                    (id.to_string(), vec![l])
                })
                .collect();
            Listing {
                by_lb,
                seen: ids.len(),
                calls: 1,
                complete: true,
            }
        }
    }

    #[async_trait::async_trait]
    impl CloudApi for FakeCloud {
        async fn project_id(&self) -> Result<String, CloudError> {
            Ok("p".into())
        }
        async fn list_listeners_of(
            &self,
            _: ElbVersion,
            ids: &[&str],
            _: Lane,
        ) -> Result<Listing, CloudError> {
            Ok(self.listing(ids))
        }
        async fn list_all_listeners(
            &self,
            _: ElbVersion,
            _: Lane,
            _: u32,
            _: Duration,
        ) -> Result<Listing, CloudError> {
            Ok(self.listing(&self.elbs))
        }
        async fn batch_query(
            &self,
            _: &crate::cloud::BatchQuery,
        ) -> Result<crate::cloud::BatchResult, CloudError> {
            Err(CloudError::Project("not used".into()))
        }
    }

    fn target(name: &str, elb: &str) -> Observed {
        Observed::Target(ServiceTarget {
            namespace: "ns".into(),
            name: name.into(),
            uid: "".into(),
            elb_id: elb.into(),
            class: ElbClass::Dedicated,
            ports: vec![80],
            port_names: Vec::new(),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresh_that_finds_nothing_new_publishes_nothing() {
        let cloud = Arc::new(FakeCloud {
            elbs: vec!["a", "b"],
            calls: Default::default(),
        });
        let refresh = Duration::from_secs(60);
        let (inv, mut rx) = Inventory::new(
            cloud.clone(),
            InventorySettings {
                listener_refresh: refresh,
                scopes: 1,
                ingress_scopes: 0,
            },
            Telemetry::new(),
        );
        let (tx, events) = mpsc::channel(8);
        let task = tokio::spawn(inv.run(events));
        tx.send(DiscoveryEvent::Resync {
            scope: None,
            observed: vec![target("s1", "a"), target("s2", "b")],
        })
        .await
        .unwrap();
        while !rx.borrow_and_update().synced {
            rx.changed().await.unwrap();
        }
        assert_eq!(rx.borrow().listeners.len(), 2);
        let generation = rx.borrow().generation;
        let calls = cloud.calls.load(std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(refresh * 3).await;
        assert!(
            cloud.calls.load(std::sync::atomic::Ordering::SeqCst) > calls,
            "refreshes ran"
        );
        assert_eq!(
            rx.borrow().generation,
            generation,
            "nothing changed, nothing published"
        );
        task.abort();
    }
}

#[cfg(all(test, feature = "sim"))]
mod fake_cloud_tests;
