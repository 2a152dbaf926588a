//! Command line: run the exporter, `check` a configuration against the cloud and cluster, or run the
//! `demo` on the built-in simulated cloud and cluster.

use crate::app;
use crate::cloud::client::HttpCloud;
use crate::cloud::{BatchQuery, CloudApi, Lane, MetricQuery};
use crate::collector::{CyclePlan, NAMESPACE, calls_per_cycle, distinct_listeners, distinct_pools};
use crate::config::{Config, ConfigError, LogFormat, format_duration};
use crate::discovery::inventory::{Inventory, InventorySettings, Targets};
use crate::discovery::pools::PoolStage;
use crate::discovery::{self, DiscoveryEvent, Observed, observe};
use crate::telemetry::Telemetry;
use clap::{Parser, Subcommand};
use k8s_openapi::api::core::v1::Service;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Huawei Cloud ELB listener metrics from Cloud Eye, labelled with Kubernetes Services, for Prometheus.
#[derive(Debug, Parser)]
#[command(name = "elb-exporter", version, about, long_about = None)]
pub struct Cli {
    /// Configuration file (cloudeye-exporter compatible clouds.yml).
    #[arg(long, global = true, default_value = "clouds.yml", value_name = "FILE")]
    pub config: PathBuf,
    /// Listen address, overriding global.port (e.g. 0.0.0.0:8087, :8087, 127.0.0.1:0).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the config, resolve the project, list discovered Services → ELB → listeners and the
    /// planned CES calls per interval; exit non-zero on any problem.
    Check,
    /// Run against a built-in simulated cloud and cluster, serving /metrics on 127.0.0.1:8087.
    #[cfg(feature = "sim")]
    Demo {
        /// Listen address for the demo exporter.
        #[arg(long, default_value = "127.0.0.1:8087", value_name = "ADDR")]
        listen: String,
        /// The public cloud to simulate: huawei-cn, huawei-eu or otc (10-metric CES batches).
        #[arg(long, default_value = "huawei-cn", value_name = "NAME", value_parser = crate::demo::parse_profile)]
        profile: crate::sim::cloud::SimProfile,
    },
}

/// Exit codes: 0 fine, 1 runtime problem, 2 bad flags or configuration.
pub const EXIT_CONFIG: u8 = 2;

/// Errors at the command line boundary.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    App(#[from] app::AppError),
    #[error("kubernetes client: {0}")]
    Kube(String),
    #[error("{0}")]
    Check(String),
    #[cfg(feature = "sim")]
    #[error(transparent)]
    Demo(#[from] crate::demo::DemoError),
}

impl CliError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Config(_) => ExitCode::from(EXIT_CONFIG),
            CliError::App(app::AppError::Client(_)) => ExitCode::from(EXIT_CONFIG),
            #[cfg(feature = "sim")]
            CliError::Demo(crate::demo::DemoError::Config(_)) => ExitCode::from(EXIT_CONFIG),
            _ => ExitCode::from(1),
        }
    }
}

/// Loads the config, applying `--listen`.
pub fn load_config(path: &Path, listen: Option<&str>) -> Result<Config, ConfigError> {
    let mut cfg = Config::load(path)?;
    if let Some(l) = listen {
        cfg.listen = crate::config::parse_listen(l).map_err(|e| match e {
            ConfigError::Invalid { value, reason, .. } => ConfigError::Invalid {
                field: "--listen".into(),
                value,
                reason,
            },
            other => other,
        })?;
    }
    Ok(cfg)
}

/// Installs the log subscriber (stderr). `RUST_LOG` wins over the configured level.
pub fn init_logging(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!(
            "{level},hyper=warn,hyper_util=warn,h2=warn,rustls=warn,tower=warn,kube_client=warn"
        ))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Runs the exporter from a loaded config (`path`: where it came from, watched for rotated credentials).
pub async fn run(cfg: Config, path: PathBuf) -> Result<(), CliError> {
    for w in cfg.transport_warnings() {
        tracing::warn!(warning = %w, "insecure transport to the cloud");
    }
    if let Some(w) = cfg.batch_size_warning() {
        tracing::warn!(warning = %w, "small CES batches");
    }
    let kube = kube_client().await?;
    let listener = app::bind(&cfg.listen).await?;
    announce(&listener, &cfg.metric_path);
    app::run(
        cfg,
        Some(path),
        kube,
        listener,
        crate::server::shutdown_signal(),
    )
    .await?;
    Ok(())
}

/// The Kubernetes client (in-cluster or KUBECONFIG). The client's own retry of 429/503 is off: the watcher
/// retries with its backoff and counts each error, so an outage shows in the metrics instead of hiding
/// behind up to 15 silent retries.
pub async fn kube_client() -> Result<kube::Client, CliError> {
    let mut config = kube::Config::infer()
        .await
        .map_err(|e| CliError::Kube(e.to_string()))?;
    config.default_retry = false;
    kube::Client::try_from(config).map_err(|e| CliError::Kube(e.to_string()))
}

fn announce(listener: &tokio::net::TcpListener, path: &str) {
    if let Ok(a) = listener.local_addr() {
        // On stdout, so scripts and tests can find a port chosen by the OS.
        println!("listening on http://{a}{path}");
    }
}

/// Text from the cloud (listener names, error messages) with control characters and bidirectional
/// overrides escaped (`\u{1b}`, `\n`), so it cannot move the cursor, clear or reorder the terminal.
fn escape_controls(s: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| {
        c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !s.chars().any(unsafe_char) {
        return s.into();
    }
    s.chars()
        .map(|c| {
            if unsafe_char(c) {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// `check`: one pass of discovery, listener resolution and a CES probe; prints what would be collected.
pub async fn check(cfg: Config) -> Result<(), CliError> {
    let mut problems: Vec<String> = Vec::new();
    println!("config: ok");
    for k in &cfg.ignored_keys {
        println!("  note: {k} is a cloudeye-exporter key with no effect here");
    }
    for w in cfg
        .transport_warnings()
        .into_iter()
        .chain(cfg.batch_size_warning())
    {
        println!("  warning: {w}");
    }
    let telemetry = Telemetry::new();
    let cloud = Arc::new(HttpCloud::new(&cfg, telemetry.clone()).map_err(app::AppError::from)?);
    match cloud.project_id().await {
        Ok(id) if cfg.auth.project_id.is_empty() => println!(
            "project: {} -> {id} (resolved through IAM at {})",
            cfg.auth.project_name,
            cfg.endpoints.iam.base_url()
        ),
        Ok(id) => println!("project: {id} (configured)"),
        Err(e) => {
            println!("project: FAILED: {e}");
            return Err(CliError::Check(format!("project lookup failed: {e}")));
        }
    }
    let kube = kube_client().await?;
    if let Err(p) = print_leader(&cfg, &kube).await {
        problems.push(p);
    }
    let targets = resolve_once(&cfg, cloud.clone(), kube, &telemetry).await?;

    println!(
        "\n{:<20} {:<24} {:<38} {:<4} {:<38} {:>5} {:<17} NAME",
        "NAMESPACE", "SERVICE", "ELB", "API", "LISTENER", "PORT", "PROTOCOL"
    );
    for r in &targets.reports {
        let elb = r.elb_id.as_deref().unwrap_or("-");
        let api = r.api.map(|v| v.as_str()).unwrap_or("-");
        let mine: Vec<_> = targets
            .targets
            .iter()
            .filter(|t| {
                t.owner == discovery::Owner::Service
                    && t.namespace == r.namespace
                    && t.service == r.name
            })
            .collect();
        if mine.is_empty() {
            println!(
                "{:<20} {:<24} {:<38} {:<4} {:<38} {:>5} {:<17} -",
                r.namespace, r.name, elb, api, "-", "-", "-"
            );
        }
        for t in mine {
            println!(
                "{:<20} {:<24} {:<38} {:<4} {:<38} {:>5} {:<17} {}",
                t.namespace,
                t.service,
                t.elb_id,
                api,
                escape_controls(&t.listener_id),
                t.port,
                escape_controls(&t.protocol),
                escape_controls(&t.listener_name)
            );
        }
        for p in &r.problems {
            problems.push(format!("{}/{}: {p}", r.namespace, r.name));
        }
    }
    for (scope, message) in &targets.forbidden {
        problems.push(format!(
            "namespace {}: {message}; grant get/list/watch on services (deploy/clusterrole.yaml)",
            discovery::scope_name(scope)
        ));
    }
    if targets.reports.is_empty() {
        println!(
            "(no Service carries the annotation {})",
            cfg.discovery.annotation
        );
    }

    print_ingresses(&targets, &mut problems);
    // The first batch of a cycle proves the AK may read metrics (ces:metricData:list) and finds out
    // whether this cloud takes batches of that size.
    let listeners = distinct_listeners(&targets);
    if let Some(q) = first_batch(&cfg, &listeners) {
        let (_, listener) = &listeners[0];
        match cloud.batch_query(&q).await {
            Ok(r) => println!(
                "ces: ok ({} metrics in one call; {} for listener {listener}: {})",
                q.metrics.len(),
                cfg.collection.metrics[0],
                r.newest
                    .first()
                    .copied()
                    .flatten()
                    .map(|d| d.value.to_string())
                    .unwrap_or_else(|| "no datapoint in the window".into())
            ),
            Err(e) => problems.push(format!("CES probe failed: {e}")),
        }
    }
    let batch = match cloud.ces_batch_limit() {
        Some(limit) if limit < cfg.effective_batch_size() => {
            println!(
                "ces: batch size {limit}: CES refused a larger batch and accepted {limit} metrics per call (the limit of Open Telekom Cloud and some Huawei regions)"
            );
            limit
        }
        _ => cfg.effective_batch_size(),
    };
    let pools = distinct_pools(&targets);
    let metrics = cfg.collection.metrics.len();
    let pool_metrics = cfg.collection.pool_metrics.len();
    // Listener and pool series are packed into the same batches.
    let series = listeners.len() * metrics + pools.len() * pool_metrics;
    let calls = calls_per_cycle(series, 1, batch);
    let per_min = calls as f64 * 60.0 / cfg.collection.interval.as_secs_f64();
    // Pools only when there are some: the line stays as it was for Service-only clusters.
    let pool_part = if pools.is_empty() {
        String::new()
    } else {
        format!(" + {} pools x {pool_metrics} pool metrics", pools.len())
    };
    println!(
        "\nplan: {} listeners x {} metrics{pool_part} = {} series -> {} CES batch call(s) per {} interval (batch size {}), {:.1} calls/minute (limit {}/minute); {} ELB(s) re-listed every {}",
        listeners.len(),
        metrics,
        series,
        calls,
        format_duration(cfg.collection.interval),
        batch,
        per_min,
        cfg.cloud.rate_limit.ces_per_minute,
        targets.elbs,
        format_duration(cfg.discovery.listener_refresh),
    );
    let plan = CyclePlan::new(
        calls,
        cfg.collection.interval,
        cfg.cloud.rate_limit.ces_per_minute,
    );
    if plan.over_budget {
        problems.push(format!(
            "{per_min:.0} CES calls/minute exceed cloud.rate_limit.ces_per_minute ({}): cycles will be paced to one every {} instead of {}; collect fewer metrics or raise collection.interval",
            cfg.cloud.rate_limit.ces_per_minute,
            format_duration(plan.period),
            format_duration(cfg.collection.interval),
        ));
    }
    if problems.is_empty() {
        println!("\ncheck: ok");
        Ok(())
    } else {
        println!("\nproblems:");
        for p in &problems {
            // Problems quote cloud answers (error messages).
            println!("  - {}", escape_controls(p));
        }
        Err(CliError::Check(format!(
            "{} problem(s) found",
            problems.len()
        )))
    }
}

/// The first CES batch a cycle would send for `listeners` (None without listeners).
fn first_batch(cfg: &Config, listeners: &[(Arc<str>, Arc<str>)]) -> Option<BatchQuery> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64;
    let metrics: Vec<MetricQuery> = listeners
        .iter()
        .flat_map(|(elb, listener)| {
            cfg.collection.metrics.iter().map(move |m| MetricQuery {
                namespace: NAMESPACE.into(),
                metric_name: m.clone(),
                dimensions: vec![
                    ("lbaas_instance_id".into(), elb.to_string()),
                    ("lbaas_listener_id".into(), listener.to_string()),
                ],
            })
        })
        .take(cfg.effective_batch_size())
        .collect();
    (!metrics.is_empty()).then(|| BatchQuery {
        metrics,
        from_ms: now - cfg.collection.lookback.as_millis() as i64,
        to_ms: now,
        period: "1",
        filter: cfg.collection.filter,
        lane: Lane::Priority,
    })
}

/// `check`: who holds the Lease, read from the apiserver, or that election is off.
async fn print_leader(cfg: &Config, kube: &kube::Client) -> Result<(), String> {
    let Some(le) = &cfg.leader_election else {
        println!("leader election: off (this process collects on its own)");
        return Ok(());
    };
    let api = kube::Api::namespaced(kube.clone(), &le.lease_namespace);
    let lease = format!("lease {}/{}", le.lease_namespace, le.lease_name);
    match crate::leader::describe(&api, &le.lease_name).await {
        Ok(Some(r)) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as i64;
            let age = r.renew_ms.map_or_else(
                || "never".into(),
                |ms| format!("{:.1}s ago", (now - ms) as f64 / 1000.0),
            );
            match r.holder {
                Some(h) => println!(
                    "leader: {h} ({lease}, renewed {age}, lease {}s, {} transition(s)); this process would be {}",
                    r.lease_duration_s, r.transitions, le.identity
                ),
                None => println!(
                    "leader: none ({lease} released {age}); the next replica to try takes it"
                ),
            }
            Ok(())
        }
        Ok(None) => {
            println!("leader: none yet ({lease} does not exist; the first replica creates it)");
            Ok(())
        }
        Err(e) => {
            println!("leader: UNKNOWN ({lease}: {e})");
            Err(format!(
                "{lease}: {e}; grant get/create/update on leases in {} (deploy/role.yaml)",
                le.lease_namespace
            ))
        }
    }
}

/// The Ingress → listener table of `check`; a shared listener is a note, anything else a problem.
fn print_ingresses(targets: &Targets, problems: &mut Vec<String>) {
    if targets.ingresses == 0 && targets.ingress_problems.is_empty() {
        return;
    }
    println!(
        "\n{:<20} {:<24} {:<38} {:<38} {:>5} {:<17} NAME",
        "NAMESPACE", "INGRESS", "ELB", "LISTENER", "PORT", "PROTOCOL"
    );
    for t in targets
        .targets
        .iter()
        .filter(|t| t.owner == discovery::Owner::Ingress)
    {
        println!(
            "{:<20} {:<24} {:<38} {:<38} {:>5} {:<17} {}",
            t.namespace, t.service, t.elb_id, t.listener_id, t.port, t.protocol, t.listener_name
        );
    }
    if !targets.pools.is_empty() {
        println!(
            "\n{:<20} {:<24} {:<24} {:<38} {:>5} POOL NAME",
            "NAMESPACE", "INGRESS", "BACKEND SERVICE", "POOL", "PORT"
        );
    }
    for p in &targets.pools {
        println!(
            "{:<20} {:<24} {:<24} {:<38} {:>5} {}",
            p.namespace, p.ingress, p.service, p.pool_id, p.port, p.pool_name
        );
    }
    for (problem, text) in &targets.ingress_problems {
        match problem {
            discovery::Problem::SharedListener => {
                println!("  note: {} (its traffic is in the pool series)", text)
            }
            _ => problems.push(text.clone()),
        }
    }
}

/// Lists CCE Ingresses once per scope into the inventory (before the Services, so their ELBs are
/// looked up before the inventory reports itself synced).
async fn list_ingresses_once<C: CloudApi>(
    kube: &kube::Client,
    binder: &mut discovery::ingress::Binder<C>,
    scopes: &[discovery::Scope],
    tx: &mpsc::Sender<DiscoveryEvent>,
) -> Result<(), CliError> {
    use discovery::ingress::{IngressEvent, ObservedIngress};
    for scope in scopes {
        let api: kube::Api<k8s_openapi::api::networking::v1::Ingress> = match scope {
            None => kube::Api::all(kube.clone()),
            Some(ns) => kube::Api::namespaced(kube.clone(), ns),
        };
        let ev = match api.list(&kube::api::ListParams::default()).await {
            Ok(list) => IngressEvent::Resync {
                scope: scope.clone(),
                observed: list
                    .items
                    .iter()
                    .map(discovery::ingress::observe)
                    .filter(|o| !matches!(o, ObservedIngress::Ignored(_)))
                    .collect(),
            },
            Err(kube::Error::Api(s)) if s.code == 403 => IngressEvent::Forbidden {
                scope: scope.clone(),
                message: s.message.clone(),
            },
            Err(e) => return Err(CliError::Kube(format!("listing ingresses: {e}"))),
        };
        let ev = binder.bind(ev).await;
        let _ = tx.send(DiscoveryEvent::Ingress(ev)).await;
    }
    Ok(())
}

/// Lists the Services once and resolves their ELBs through the same inventory the exporter runs.
async fn resolve_once<C: CloudApi>(
    cfg: &Config,
    cloud: Arc<C>,
    kube: kube::Client,
    telemetry: &Telemetry,
) -> Result<Arc<Targets>, CliError> {
    let scopes = discovery::scopes(&cfg.discovery.namespaces);
    let (tx, rx) = mpsc::channel(scopes.len() + 1);
    let (inventory, mut targets) = Inventory::new(
        cloud.clone(),
        InventorySettings {
            listener_refresh: cfg.discovery.listener_refresh,
            scopes: scopes.len(),
            ingress_scopes: if cfg.discovery.ingresses {
                scopes.len()
            } else {
                0
            },
        },
        telemetry.clone(),
    );
    let task = tokio::spawn(inventory.run(rx));
    if cfg.discovery.ingresses {
        let mut binder = discovery::ingress::Binder::new(cloud.clone());
        list_ingresses_once(&kube, &mut binder, &scopes, &tx).await?;
    }
    for scope in scopes {
        let api: kube::Api<Service> = match &scope {
            None => kube::Api::all(kube.clone()),
            Some(ns) => kube::Api::namespaced(kube.clone(), ns),
        };
        let list = match api.list(&kube::api::ListParams::default()).await {
            Ok(l) => l,
            // One refused namespace is a problem to report, not a reason to check nothing else.
            Err(e) if discovery::is_forbidden(&e) => {
                let message = match &e {
                    kube::Error::Api(s) => s.message.clone(),
                    other => other.to_string(),
                };
                let _ = tx.send(DiscoveryEvent::Forbidden { scope, message }).await;
                continue;
            }
            Err(e) => return Err(CliError::Kube(format!("listing services: {e}"))),
        };
        let observed: Vec<Observed> = list
            .items
            .iter()
            .map(|s| observe(s, &cfg.discovery.annotation))
            .filter(Observed::worth_keeping)
            .collect();
        let _ = tx.send(DiscoveryEvent::Resync { scope, observed }).await;
    }
    let wait = async {
        loop {
            if targets.borrow_and_update().synced {
                return targets.borrow().clone();
            }
            if targets.changed().await.is_err() {
                return targets.borrow().clone();
            }
        }
    };
    let limit = cfg.cloud.request_timeout * cfg.cloud.retry.max_attempts + Duration::from_secs(30);
    let result = tokio::time::timeout(limit, wait)
        .await
        .map_err(|_| CliError::Check("listener lookups did not finish in time".into()));
    drop(tx);
    task.abort();
    let listed = result?;
    // Pools behind Ingress listeners: one listing per Ingress ELB.
    let (mut stage, out) = PoolStage::new(cloud, cfg.discovery.listener_refresh);
    tokio::time::timeout(limit, stage.update(&listed))
        .await
        .map_err(|_| CliError::Check("pool lookups did not finish in time".into()))?;
    let resolved = out.borrow().clone();
    Ok(resolved)
}

/// Entry point used by the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    crate::memory::tune_allocator();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("elb-exporter: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = match cli.command {
        #[cfg(feature = "sim")]
        Some(Command::Demo { listen, profile }) => {
            init_logging("info", LogFormat::Text);
            runtime
                .block_on(crate::demo::run(&listen, profile))
                .map_err(CliError::from)
        }
        command => {
            let cfg = match load_config(&cli.config, cli.listen.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("elb-exporter: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            init_logging(&cfg.log.level, cfg.log.format);
            match command {
                Some(Command::Check) => runtime.block_on(check(cfg)),
                _ => runtime.block_on(run(cfg, cli.config.clone())),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("elb-exporter: {e}");
            e.exit_code()
        }
    }
}
