//! Wires the pipeline together: watch → inventory (targets) → collector (snapshot) → renderer (body) →
//! HTTP server. Used by the run mode and by `demo`.

use crate::cloud::CloudApi;
use crate::cloud::client::{ClientBuildError, HttpCloud};
use crate::collector::{Collector, CollectorSettings, Snapshot};
use crate::config::{Config, Credentials};
use crate::discovery::inventory::{Inventory, InventorySettings, Targets};
use crate::discovery::{self, DiscoveryEvent};
use crate::exposition::Renderer;
use crate::server::{self, AppState};
use crate::telemetry::Telemetry;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

/// Why the exporter could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Client(#[from] ClientBuildError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Serve(#[from] server::ServeError),
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
    pub targets: watch::Receiver<Arc<Targets>>,
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
}

/// Starts discovery, inventory and collector tasks on the current runtime.
pub fn start_pipeline<C: CloudApi>(
    cfg: &Config,
    cloud: Arc<C>,
    kube: kube::Client,
    telemetry: &Telemetry,
) -> Pipeline {
    let (tx, rx) = mpsc::channel::<DiscoveryEvent>(1024);
    tokio::spawn(discovery::run_watch(
        kube,
        cfg.discovery.namespaces.clone(),
        cfg.discovery.annotation.clone(),
        tx,
    ));
    let (inventory, targets) = Inventory::new(
        cloud.clone(),
        InventorySettings {
            listener_refresh: cfg.discovery.listener_refresh,
            scopes: cfg.discovery.namespaces.len().max(1),
        },
        telemetry.clone(),
    );
    tokio::spawn(inventory.run(rx));
    let (collector, snapshots) = Collector::new(
        cloud,
        CollectorSettings::from_config(cfg),
        telemetry.clone(),
    );
    tokio::spawn(collector.run(targets.clone()));
    Pipeline { targets, snapshots }
}

/// Caps glibc's per-thread malloc arenas: each arena keeps its own high-water mark, and the collector's
/// bursts of short-lived allocations on several worker threads otherwise multiply peak RSS.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; it is called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Hands memory freed by a render or a cycle back to the OS, so RSS follows the live set.
pub fn release_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Re-renders the body whenever the targets or the data change, and tracks readiness.
pub async fn run_renderer(renderer: Renderer, mut p: Pipeline, state: AppState) {
    let renderer = Arc::new(renderer);
    loop {
        let t = p.targets.borrow_and_update().clone();
        let s = p.snapshots.borrow_and_update().clone();
        let r = renderer.clone();
        let finished = s.finished;
        let synced = t.synced;
        match tokio::task::spawn_blocking(move || {
            let body = r.render(&t, &s);
            drop((t, s));
            body
        })
        .await
        {
            Ok(body) => {
                state.body.store(Arc::new(body));
                tokio::task::spawn_blocking(release_memory);
            }
            Err(e) => {
                error!(error = %e, "rendering the exposition body failed; keeping the previous one")
            }
        }
        state.synced.store(synced, Ordering::Release);
        state.collected.store(finished, Ordering::Release);
        tokio::select! {
            r = p.targets.changed() => if r.is_err() { return },
            r = p.snapshots.changed() => if r.is_err() { return },
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
    if let Some(path) = config_path {
        tokio::spawn(reload_credentials(
            path,
            cfg.auth.credentials_reload,
            cfg.auth.credentials.clone(),
            cloud.clone(),
        ));
    }
    serve_with(cfg, cloud, kube, listener, telemetry, shutdown).await
}

/// Re-reads the config file when its content changes; new valid credentials replace the old ones.
/// An invalid file is reported and the running credentials stay.
async fn reload_credentials(
    path: PathBuf,
    every: Duration,
    mut current: Credentials,
    cloud: Arc<HttpCloud>,
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
    let pipeline = start_pipeline(&cfg, cloud, kube, &telemetry);
    let state = AppState::new(telemetry.clone(), &cfg.metric_path);
    tokio::spawn(run_renderer(
        Renderer::from_config(&cfg),
        pipeline,
        state.clone(),
    ));
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    info!(addr = %addr, path = %cfg.metric_path, "serving metrics");
    let app = server::router(state, server::WebAuth::from_settings(&cfg.web));
    server::serve(listener, app, &cfg.web, &telemetry, shutdown).await?;
    info!("shut down");
    Ok(())
}
