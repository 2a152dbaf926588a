//! Wires the pipeline together: watch → inventory (targets) → collector (snapshot) → renderer (body) →
//! HTTP server. Used by the run mode and by `demo`.

use crate::cloud::CloudApi;
use crate::cloud::client::{ClientBuildError, HttpCloud};
use crate::collector::{Collector, CollectorSettings, Snapshot};
use crate::config::{Config, Credentials};
use crate::discovery::inventory::{Inventory, InventorySettings, Targets};
use crate::discovery::pools::PoolStage;
use crate::discovery::{self, DiscoveryEvent};
use crate::exposition::Renderer;
use crate::handover::{self, Layout, Mirror, Source};
use crate::leader::{Election, Holder, Lead, Leadership};
use crate::server::{self, AppState};
use crate::telemetry::Telemetry;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{error, info, warn};

/// Why the exporter could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The cloud client could not be built (CA file, TLS).
    #[error(transparent)]
    Client(#[from] ClientBuildError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// As configured or given on the command line.
        addr: String,
        /// Why binding failed (in use, permission, bad address).
        source: std::io::Error,
    },
    /// The HTTP server failed (TLS files, accept loop).
    #[error(transparent)]
    Serve(#[from] server::ServeError),
    /// The warm-copy client could not be built (the served certificate to trust).
    #[error(transparent)]
    Handover(#[from] handover::HandoverError),
}

/// Binds the configured (or given) address.
pub async fn bind(addr: &str) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AppError::Listen {
            addr: addr.to_string(),
            source,
        })
}

/// The background pipeline: returns the receivers of targets and snapshots.
pub struct Pipeline {
    /// The inventory's latest targets; the renderer labels series from them.
    pub targets: watch::Receiver<Arc<Targets>>,
    /// The collector's latest values; the renderer turns them into the body.
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    /// Under leader election: cloud series are served only while leading.
    pub leadership: Option<watch::Receiver<Leadership>>,
}

/// A long-running task of the exporter; none of them ends while the process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// The Service watch.
    Watch,
    /// The Ingress watch.
    IngressWatch,
    /// Binds Ingresses named by VIP or auto-created name to their ELB.
    IngressBinder,
    /// Resolves watched Services to ELB listeners.
    Inventory,
    /// Attributes Ingress backend pools to Services.
    Pools,
    /// Queries Cloud Eye.
    Collector,
    /// Renders the `/metrics` body.
    Renderer,
    /// Re-reads rotated AK/SK files.
    CredentialReload,
    /// Holds or watches the Lease.
    Leader,
    /// Numbers the leader's snapshots for followers, or mirrors the leader's.
    Handover,
}

impl Task {
    /// The `task` label of `elb_exporter_task_failures_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Watch => "watch",
            Task::IngressWatch => "ingress_watch",
            Task::IngressBinder => "ingress_binder",
            Task::Inventory => "inventory",
            Task::Pools => "pools",
            Task::Collector => "collector",
            Task::Renderer => "renderer",
            Task::CredentialReload => "credential_reload",
            Task::Leader => "leader_election",
            Task::Handover => "handover",
        }
    }
}

/// Owns the pipeline's tasks: one that ends or panics is logged, counted
/// (`elb_exporter_task_failures_total`) and turns `/healthz` to 503, so Kubernetes restarts a pod whose
/// `/metrics` would otherwise freeze behind a healthy probe. Dropping it aborts the tasks.
#[derive(Default)]
pub struct Supervisor {
    tasks: JoinSet<()>,
    names: HashMap<tokio::task::Id, Task>,
}

impl Supervisor {
    /// Runs `fut` as `task`, watched by [`Supervisor::watch`].
    pub fn spawn(&mut self, task: Task, fut: impl Future<Output = ()> + Send + 'static) {
        let handle = self.tasks.spawn(fut);
        self.names.insert(handle.id(), task);
    }

    /// Watches the tasks until all have ended; returns when none is left.
    pub async fn watch(mut self, healthy: Arc<AtomicBool>, telemetry: Telemetry) {
        while let Some(done) = self.tasks.join_next_with_id().await {
            let (id, panic) = match &done {
                Ok((id, ())) => (*id, None),
                Err(e) => (e.id(), e.is_panic().then(|| e.to_string())),
            };
            let task = self.names.remove(&id).map_or("unknown", Task::as_str);
            healthy.store(false, Ordering::Release);
            telemetry.task_failures.with_label_values(&[task]).inc();
            error!(
                task,
                panic = panic.as_deref().unwrap_or(""),
                "pipeline task ended; /healthz now fails so the pod is restarted"
            );
        }
    }
}

/// Starts discovery, inventory and collector tasks under `tasks`.
pub fn start_pipeline<C: CloudApi>(
    cfg: &Config,
    cloud: Arc<C>,
    kube: kube::Client,
    telemetry: &Telemetry,
    tasks: &mut Supervisor,
    lead: Option<Lead>,
    warm: Option<watch::Receiver<Option<Arc<Snapshot>>>>,
) -> Pipeline {
    let (tx, rx) = mpsc::channel::<DiscoveryEvent>(1024);
    if cfg.discovery.ingresses {
        // Ingress watch -> binder (ELB by id, VIP address or CCE's name) -> inventory.
        let (itx, irx) = mpsc::channel(256);
        tasks.spawn(
            Task::IngressWatch,
            discovery::ingress::run_watch(kube.clone(), cfg.discovery.namespaces.clone(), itx),
        );
        tasks.spawn(
            Task::IngressBinder,
            discovery::ingress::run_binder(cloud.clone(), irx, tx.clone()),
        );
    }
    tasks.spawn(
        Task::Watch,
        discovery::run_watch(
            kube,
            cfg.discovery.namespaces.clone(),
            cfg.discovery.annotation.clone(),
            tx,
        ),
    );
    let (inventory, listed) = Inventory::new(
        cloud.clone(),
        InventorySettings {
            listener_refresh: cfg.discovery.listener_refresh,
            scopes: discovery::scopes(&cfg.discovery.namespaces).len(),
            ingress_scopes: if cfg.discovery.ingresses {
                discovery::scopes(&cfg.discovery.namespaces).len()
            } else {
                0
            },
        },
        telemetry.clone(),
    );
    tasks.spawn(Task::Inventory, inventory.run(rx));
    // Pools behind Ingress listeners, between the inventory and the collector.
    let (pool_stage, targets) = PoolStage::new(cloud.clone(), cfg.discovery.listener_refresh);
    tasks.spawn(Task::Pools, pool_stage.run(listed));
    let (collector, snapshots) = Collector::new(
        cloud,
        CollectorSettings::from_config(cfg),
        telemetry.clone(),
    );
    let leadership = lead.as_ref().map(|l| l.leadership.clone());
    let collector = match lead {
        Some(l) => collector.with_leadership(l),
        None => collector,
    };
    let collector = match warm {
        Some(w) => collector.with_warm_copy(w),
        None => collector,
    };
    tasks.spawn(Task::Collector, collector.run(targets.clone()));
    Pipeline {
        targets,
        snapshots,
        leadership,
    }
}

/// Re-renders the body whenever the targets, the data or the leadership change, and tracks readiness.
/// A follower serves no cloud series; it is ready, and `up`, once its watch and inventory are current.
pub async fn run_renderer(renderer: Renderer, mut p: Pipeline, state: AppState) {
    let renderer = Arc::new(renderer);
    let mut expires: Option<tokio::time::Instant> = None;
    loop {
        let leading = p
            .leadership
            .as_mut()
            .is_none_or(|l| l.borrow_and_update().leading);
        let t = p.targets.borrow_and_update().clone();
        let s = p.snapshots.borrow_and_update().clone();
        let s = if leading { s } else { Arc::default() };
        let r = renderer.clone();
        let done = s.first_cycle_done || !leading;
        let synced = t.synced;
        if !leading {
            // The collector sets `up` per cycle; a follower has none, so its readiness is its `up`.
            let lookups_failed = t
                .problems
                .contains_key(&discovery::Problem::ElbLookupFailed);
            state.telemetry.up.set(i64::from(synced && !lookups_failed));
        }
        match tokio::task::spawn_blocking(move || {
            let body = r.render(&t, &s);
            drop((t, s));
            body
        })
        .await
        {
            Ok(body) => {
                expires = body.expires;
                state.body.store(Arc::new(body));
                tokio::task::spawn_blocking(crate::memory::release_memory);
            }
            Err(e) => {
                error!(error = %e, "rendering the exposition body failed; keeping the previous one")
            }
        }
        state.synced.store(synced, Ordering::Release);
        // Once ready, a replica stays ready across leadership changes (a new leader has no cycle yet).
        state.first_cycle_done.fetch_or(done, Ordering::AcqRel);
        // Values pass their staleness bound with time, not only with new data: render again then.
        let stale = async {
            match expires {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let lead_changed = async {
            match p.leadership.as_mut() {
                Some(l) => l.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = p.targets.changed() => if r.is_err() { return },
            r = p.snapshots.changed() => if r.is_err() { return },
            r = lead_changed => if !r { return },
            _ = stale => {}
        }
    }
}

/// Runs the exporter until `shutdown` resolves. With `config_path`, rotated credentials in that file
/// (a re-mounted Secret) are picked up without a restart.
pub async fn run(
    cfg: Config,
    config_path: Option<PathBuf>,
    kube: kube::Client,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AppError> {
    let telemetry = Telemetry::new();
    let cloud = Arc::new(HttpCloud::new(&cfg, telemetry.clone())?);
    let mut shared = Shared::new(&cfg, telemetry);
    if let Some(path) = config_path {
        shared.tasks.spawn(
            Task::CredentialReload,
            reload_credentials(
                path,
                cfg.auth.credentials_reload,
                cfg.auth.credentials.clone(),
                cloud.clone(),
                shared.credentials.clone(),
            ),
        );
    }
    serve_supervised(cfg, cloud, kube, listener, shared, shutdown).await
}

/// What the serving exporter shares with the tasks started before it.
struct Shared {
    telemetry: Telemetry,
    /// The running AK/SK (reloaded ones included): the warm copy's requests and answers are signed
    /// with them.
    credentials: Arc<ArcSwap<Credentials>>,
    tasks: Supervisor,
}

impl Shared {
    fn new(cfg: &Config, telemetry: Telemetry) -> Self {
        Shared {
            telemetry,
            credentials: Arc::new(ArcSwap::from_pointee(cfg.auth.credentials.clone())),
            tasks: Supervisor::default(),
        }
    }
}

/// Re-reads the config file when its content changes; new valid credentials replace the old ones.
/// An invalid file is reported and the running credentials stay.
async fn reload_credentials(
    path: PathBuf,
    every: Duration,
    mut current: Credentials,
    cloud: Arc<HttpCloud>,
    shared: Arc<ArcSwap<Credentials>>,
) {
    let mut last = std::fs::read(&path).ok();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(text) = tokio::fs::read(&path).await else {
            continue;
        };
        if last.as_ref() == Some(&text) {
            continue;
        }
        last = Some(text.clone());
        let loaded = std::str::from_utf8(&text)
            .map_err(|e| e.to_string())
            .and_then(|t| {
                Config::from_yaml(t, &|k| std::env::var(k).ok()).map_err(|e| e.to_string())
            });
        match loaded {
            Ok(cfg) if cfg.auth.credentials != current => {
                current = cfg.auth.credentials.clone();
                shared.store(Arc::new(cfg.auth.credentials.clone()));
                cloud.set_credentials(cfg.auth.credentials);
                info!(path = %path.display(), "credentials reloaded");
            }
            Ok(_) => {
                info!(path = %path.display(), "config file changed; credentials unchanged (other changes need a restart)")
            }
            Err(e) => {
                warn!(path = %path.display(), error = %e, "config file changed but is invalid; keeping the running credentials")
            }
        }
    }
}

/// Runs the exporter on any cloud implementation.
pub async fn serve_with<C: CloudApi>(
    cfg: Config,
    cloud: Arc<C>,
    kube: kube::Client,
    listener: TcpListener,
    telemetry: Telemetry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AppError> {
    let shared = Shared::new(&cfg, telemetry);
    serve_supervised(cfg, cloud, kube, listener, shared, shutdown).await
}

async fn serve_supervised<C: CloudApi>(
    cfg: Config,
    cloud: Arc<C>,
    kube: kube::Client,
    listener: TcpListener,
    shared: Shared,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AppError> {
    let Shared {
        telemetry,
        credentials,
        mut tasks,
    } = shared;
    for key in &cfg.ignored_keys {
        warn!(key = %key, "cloudeye-exporter key has no effect here; ignored");
    }
    // Resolve the project early so a wrong account shows in the log at once; collection retries anyway.
    let c = cloud.clone();
    tokio::spawn(async move {
        match c.project_id().await {
            Ok(id) => info!(project_id = %id, "project resolved"),
            Err(e) => {
                error!(error = %e, "project lookup failed; collection retries every interval")
            }
        }
    });
    let (stop, stopped) = watch::channel(false);
    let peer_url = match (&cfg.leader_election, listener.local_addr()) {
        (Some(le), Ok(bound)) => handover::advertised_url(le.pod_ip, bound, cfg.web.tls.is_some()),
        _ => None,
    };
    let elected = start_election(&cfg, &kube, &telemetry, &mut tasks, stopped, peer_url);
    let (lead, released, warm) = match elected {
        Some(e) => {
            let warm = start_mirror(&cfg, &e, &credentials, &telemetry, &mut tasks)?;
            (Some(e.lead), Some(e.released), Some(warm))
        }
        None => (None, None, None),
    };
    let pipeline = start_pipeline(&cfg, cloud, kube, &telemetry, &mut tasks, lead, warm);
    let mut state = AppState::new(telemetry.clone(), &cfg.metric_path);
    if let Some(leadership) = pipeline.leadership.clone() {
        let layout = Layout::of(&cfg);
        let snapshots = pipeline.snapshots.clone();
        let (source, numbering) = Source::new(snapshots, leadership, credentials, layout);
        tasks.spawn(Task::Handover, numbering);
        state.peer = Some(Arc::new(source));
    }
    tasks.spawn(
        Task::Renderer,
        run_renderer(Renderer::from_config(&cfg), pipeline, state.clone()),
    );
    // Dropped (and the tasks aborted) when serving ends.
    let _supervisor = AbortOnDrop(tokio::spawn(
        tasks.watch(state.healthy.clone(), telemetry.clone()),
    ));
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    info!(addr = %addr, path = %cfg.metric_path, "serving metrics");
    let app = server::router(state, server::WebAuth::from_settings(&cfg.web));
    // The Lease is released as soon as the signal comes, while open connections drain.
    let shutdown = async move {
        shutdown.await;
        let _ = stop.send(true);
    };
    server::serve(listener, app, &cfg.web, &telemetry, shutdown).await?;
    if let Some(released) = released {
        let _ = tokio::time::timeout(Duration::from_secs(3), released).await;
    }
    info!("shut down");
    Ok(())
}

/// A running election: the collector's side, the Lease's holder as followers see it, and a signal that
/// the Lease was released after `stop`.
struct Elected {
    lead: Lead,
    holder: watch::Receiver<Option<Holder>>,
    released: oneshot::Receiver<()>,
}

/// Starts leader election when configured, advertising `peer_url` while leading. Without it this
/// replica leads alone.
fn start_election(
    cfg: &Config,
    kube: &kube::Client,
    telemetry: &Telemetry,
    tasks: &mut Supervisor,
    stop: watch::Receiver<bool>,
    peer_url: Option<String>,
) -> Option<Elected> {
    let Some(le) = cfg.leader_election.clone() else {
        telemetry.leader.set(1);
        return None;
    };
    let (leadership, lead_rx) = watch::channel(Leadership::default());
    let (started, cycles) = watch::channel(None);
    let (recorded_tx, recorded) = watch::channel(None);
    let (released, released_rx) = oneshot::channel();
    let (holder, holder_rx) = watch::channel(None);
    let election = Election {
        api: kube::Api::namespaced(kube.clone(), &le.lease_namespace),
        config: le,
        interval: cfg.collection.interval,
        telemetry: telemetry.clone(),
        leadership,
        cycles,
        recorded: recorded_tx,
        stop,
        released,
        peer_url,
        holder,
    };
    tasks.spawn(Task::Leader, election.run());
    let lead = Lead {
        leadership: lead_rx,
        started,
        recorded,
    };
    Some(Elected {
        lead,
        holder: holder_rx,
        released: released_rx,
    })
}

/// Mirrors the leader's series while following; returns the copy the collector adopts on taking over.
fn start_mirror(
    cfg: &Config,
    e: &Elected,
    credentials: &Arc<ArcSwap<Credentials>>,
    telemetry: &Telemetry,
    tasks: &mut Supervisor,
) -> Result<watch::Receiver<Option<Arc<Snapshot>>>, AppError> {
    let (copy, warm) = watch::channel(None);
    let mirror = Mirror {
        client: handover::client(cfg.web.tls.as_ref().map(|(cert, _)| cert.as_path()))?,
        holder: e.holder.clone(),
        leadership: e.lead.leadership.clone(),
        credentials: credentials.clone(),
        layout: Layout::of(cfg),
        copy,
        telemetry: telemetry.clone(),
        retry: cfg
            .leader_election
            .as_ref()
            .map_or(Duration::from_secs(2), |le| le.retry_period),
    };
    tasks.spawn(Task::Handover, mirror.run());
    Ok(warm)
}

/// Aborts the task when dropped, so a returning caller takes its background work with it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_dead_task_is_counted_and_fails_health() {
        let telemetry = Telemetry::new();
        let healthy = Arc::new(AtomicBool::new(true));
        let mut tasks = Supervisor::default();
        tasks.spawn(Task::Collector, async { panic!("injected") });
        tasks.spawn(Task::Inventory, async {});
        tasks.watch(healthy.clone(), telemetry.clone()).await;
        assert!(!healthy.load(Ordering::Acquire));
        for task in [Task::Collector, Task::Inventory] {
            let n = telemetry
                .task_failures
                .with_label_values(&[task.as_str()])
                .get();
            assert_eq!(n, 1, "{task:?}");
        }
    }

    #[tokio::test]
    async fn healthz_follows_the_supervisor() {
        use tower::ServiceExt as _;
        let state = AppState::new(Telemetry::new(), "/metrics");
        let mut tasks = Supervisor::default();
        tasks.spawn(Task::Watch, async {});
        tasks.watch(state.healthy.clone(), Telemetry::new()).await;
        let app = server::router(state, None);
        let req = axum::http::Request::get("/healthz")
            .body(axum::body::Body::empty())
            .unwrap();
        let status = app.oneshot(req).await.unwrap().status();
        assert_eq!(status, axum::http::StatusCode::SERVICE_UNAVAILABLE);
    }

    /// The gauges that describe the targets come from the body being served, not from whatever the
    /// inventory published since, so one scrape never disagrees with itself.
    #[tokio::test]
    async fn own_gauges_describe_the_served_body() {
        use tower::ServiceExt as _;
        let telemetry = Telemetry::new();
        let state = AppState::new(telemetry.clone(), "/metrics");
        let mut body = crate::exposition::Body::new(bytes::Bytes::new(), None, 12);
        body.services = 4;
        body.listeners = 6;
        body.problems = vec![(discovery::Problem::UnknownElb, 1)];
        state.body.store(Arc::new(body));
        telemetry.services.set(5);
        let app = server::router(state, None);
        let req = axum::http::Request::get("/metrics")
            .body(axum::body::Body::empty())
            .unwrap();
        let resp = app.oneshot(req).await.unwrap();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&bytes);
        for line in [
            "elb_exporter_services 4",
            "elb_exporter_listeners 6",
            "elb_exporter_series 12",
            "elb_exporter_discovery_problems{reason=\"unknown_elb\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn living_tasks_keep_health() {
        let healthy = Arc::new(AtomicBool::new(true));
        let mut tasks = Supervisor::default();
        tasks.spawn(Task::Renderer, std::future::pending());
        let watch = tokio::spawn(tasks.watch(healthy.clone(), Telemetry::new()));
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(healthy.load(Ordering::Acquire));
        watch.abort();
    }
}
