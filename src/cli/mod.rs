//! Command line: run the exporter, `check` a configuration against the cloud and cluster, or run the
//! `demo` on the built-in simulated cloud and cluster.

mod check;

pub use check::check;

use crate::app;
#[cfg(feature = "sim")]
use crate::config::LogFormat;
use crate::config::{Config, ConfigError};
use crate::logging::init_logging;
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

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
    #[allow(missing_docs)] // A doc comment here would change the `--help` text.
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
#[allow(missing_docs)] // A doc comment here would change the `--help` text.
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
    /// The configuration was refused (exit code 2).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The exporter could not start or stopped.
    #[error(transparent)]
    App(#[from] app::AppError),
    /// The Kubernetes client could not be built.
    #[error("kubernetes client: {0}")]
    Kube(String),
    /// `check` found problems (the report says which).
    #[error("{0}")]
    Check(String),
    /// The demo could not run.
    #[cfg(feature = "sim")]
    #[error(transparent)]
    Demo(#[from] crate::demo::DemoError),
}

impl CliError {
    /// The process exit code for this error: 2 for configuration, 1 for runtime problems.
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
