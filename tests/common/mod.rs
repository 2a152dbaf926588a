//! Shared helpers for end-to-end tests: a simulated cloud and cluster on loopback, and the real
//! `elb-exporter` binary run against them through a config file and a kubeconfig.
#![allow(dead_code)]

use elb_exporter::sim::cloud::{CloudSim, SimConfig};
use elb_exporter::sim::kube::FakeApiServer;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod exposition;
pub use exposition::*;

pub const BIN: &str = env!("CARGO_BIN_EXE_elb-exporter");

pub fn loopback() -> SocketAddr {
    ([127, 0, 0, 1], 0).into()
}

/// A simulated cloud and cluster, serving on loopback, plus a temp dir for config files.
pub struct World {
    pub sim: CloudSim,
    pub cluster: FakeApiServer,
    pub cloud_url: String,
    pub dir: tempfile::TempDir,
}

impl World {
    pub async fn start(sim_config: SimConfig) -> World {
        let sim = CloudSim::new(sim_config);
        let addr = sim.serve(loopback()).await.expect("simulator serves");
        let cluster = FakeApiServer::new().with_bookmark_interval(Duration::from_millis(500));
        cluster
            .serve(loopback())
            .await
            .expect("fake apiserver serves");
        World {
            sim,
            cluster,
            cloud_url: format!("http://{addr}"),
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// Writes a clouds.yml pointing at the simulator (plus `extra` YAML) and a kubeconfig.
    pub fn write_config(&self, extra: &str) -> (PathBuf, PathBuf) {
        let cfg = self.dir.path().join("clouds.yml");
        std::fs::write(
            &cfg,
            elb_exporter::demo::config_for(&self.sim, &self.cloud_url, extra),
        )
        .expect("write config");
        let kubeconfig = self.dir.path().join("kubeconfig");
        self.cluster
            .write_kubeconfig(&kubeconfig)
            .expect("write kubeconfig");
        (cfg, kubeconfig)
    }

    /// Starts the exporter binary on 127.0.0.1:0 and waits for its address.
    pub fn exporter(&self, extra: &str) -> Exporter {
        self.exporter_edited(extra, |t| t)
    }

    /// Like [`World::exporter`], with the config text passed through `edit` first.
    pub fn exporter_edited(&self, extra: &str, edit: impl FnOnce(String) -> String) -> Exporter {
        self.exporter_env(extra, edit, &[])
    }

    /// Like [`World::exporter_edited`], with extra environment variables set after the defaults (so
    /// `RUST_LOG` or `HUAWEICLOUD_SDK_*` given here win).
    pub fn exporter_env(
        &self,
        extra: &str,
        edit: impl FnOnce(String) -> String,
        env: &[(&str, &str)],
    ) -> Exporter {
        let (cfg, kubeconfig) = self.write_config(extra);
        let text = std::fs::read_to_string(&cfg).expect("read config");
        std::fs::write(&cfg, edit(text)).expect("write config");
        Exporter::spawn_env(
            Command::new(BIN)
                .arg("--config")
                .arg(&cfg)
                .arg("--listen")
                .arg("127.0.0.1:0"),
            &kubeconfig,
            env,
        )
    }

    /// Runs the binary with `args` and a config file holding exactly `config_text` (no templating),
    /// with extra environment variables; returns (exit code, stdout, stderr).
    pub fn run_raw(
        &self,
        config_text: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> (i32, String, String) {
        let (cfg, kubeconfig) = self.write_config("");
        std::fs::write(&cfg, config_text).expect("write config");
        let c = &mut Command::new(BIN);
        c.args(args).arg("--config").arg(&cfg);
        cmd(c, &kubeconfig);
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().expect("run binary");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs a one-shot subcommand (e.g. `check`) and returns (exit code, stdout, stderr).
    pub fn run(&self, extra: &str, args: &[&str]) -> (i32, String, String) {
        let (cfg, kubeconfig) = self.write_config(extra);
        let out = cmd(
            Command::new(BIN).args(args).arg("--config").arg(&cfg),
            &kubeconfig,
        )
        .output()
        .expect("run binary");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

fn cmd<'a>(c: &'a mut Command, kubeconfig: &std::path::Path) -> &'a mut Command {
    c.env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info")
        // Loopback only: a proxy from the environment must not capture the test traffic.
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .env_remove("HUAWEICLOUD_SDK_AK")
        .env_remove("HUAWEICLOUD_SDK_SK")
        .env_remove("HUAWEICLOUD_SDK_SECURITY_TOKEN")
        .env_remove("HUAWEICLOUD_SDK_PROJECT_ID")
}

/// A running exporter process; killed on drop.
pub struct Exporter {
    pub child: Child,
    pub base: String,
    pub metrics_url: String,
    stderr_path: Option<PathBuf>,
    stdout: Arc<Mutex<String>>,
}

impl Exporter {
    pub fn spawn(c: &mut Command, kubeconfig: &std::path::Path) -> Exporter {
        Exporter::spawn_env(c, kubeconfig, &[])
    }

    /// Like [`Exporter::spawn`], with environment variables applied after the defaults.
    pub fn spawn_env(
        c: &mut Command,
        kubeconfig: &std::path::Path,
        env: &[(&str, &str)],
    ) -> Exporter {
        Exporter::try_spawn(c, kubeconfig, env).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Exporter::spawn_env`], but `Err` (with its stderr) when the process ends or stays silent
    /// for 20 s instead of announcing its address, e.g. because the address to listen on is taken.
    pub fn try_spawn(
        c: &mut Command,
        kubeconfig: &std::path::Path,
        env: &[(&str, &str)],
    ) -> Result<Exporter, String> {
        let log = tempfile::NamedTempFile::new().expect("log file");
        let (file, path) = log.keep().expect("keep log");
        cmd(c, kubeconfig);
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c
            .stdout(Stdio::piped())
            .stderr(Stdio::from(file))
            .spawn()
            .expect("spawn exporter");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        let captured = Arc::new(Mutex::new(String::new()));
        let sink = captured.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&line);
                    s.push('\n');
                }
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let url = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(i) = line.find("http://") {
                        break line[i..].trim().to_string();
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
                    let log = std::fs::read_to_string(&path).unwrap_or_default();
                    let _ = std::fs::remove_file(&path);
                    return Err(format!(
                        "exporter did not announce its address ({status}); stderr:\n{log}"
                    ));
                }
            }
        };
        let base = url
            .trim_end_matches("/metrics")
            .trim_end_matches('/')
            .to_string();
        Ok(Exporter {
            child,
            metrics_url: url,
            base,
            stderr_path: Some(path),
            stdout: captured,
        })
    }

    /// Everything the process printed on stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Whether the process is still running (it has not exited, crashed or been killed).
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Resident set size of the process in KiB (`VmRSS` in /proc/PID/status), if readable.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    pub fn logs(&self) -> String {
        self.stderr_path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        get(&format!("{}{path}", self.base)).await
    }

    pub async fn metrics(&self) -> String {
        let (status, body) = get(&self.metrics_url).await;
        assert_eq!(status, 200, "GET /metrics");
        body
    }

    /// Waits until /readyz answers 200.
    pub async fn wait_ready(&self) {
        let ok = wait_for(Duration::from_secs(20), || async {
            self.get("/readyz").await.0 == 200
        })
        .await;
        assert!(ok, "exporter not ready in time; logs:\n{}", self.logs());
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(p) = self.stderr_path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

pub async fn get(url: &str) -> (u16, String) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    match client.get(url).send().await {
        Ok(r) => {
            let s = r.status().as_u16();
            (s, r.text().await.unwrap_or_default())
        }
        Err(_) => (0, String::new()),
    }
}

/// Polls `check` every 100 ms until it holds or `limit` passes.
pub async fn wait_for<F, Fut>(limit: Duration, check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait_for_every(limit, Duration::from_millis(100), check).await
}

/// Polls `check` every `every` until it holds or `limit` passes.
pub async fn wait_for_every<F, Fut>(limit: Duration, every: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}

/// The number of CES calls of each collection cycle, in order: the calls split where more than 1 s
/// passes between two (cycles are seconds apart and take milliseconds). The first and last groups
/// may be cut by the observation window.
pub fn calls_per_cycle(ces: &[elb_exporter::sim::cloud::SimRequest]) -> Vec<usize> {
    let mut groups: Vec<usize> = Vec::new();
    let mut last: Option<i64> = None;
    for r in ces {
        if last.is_none_or(|t| r.time_ms - t > 1000) {
            groups.push(0);
        }
        if let Some(g) = groups.last_mut() {
            *g += 1;
        }
        last = Some(r.time_ms);
    }
    groups
}

#[allow(unused_imports)] // Like the helpers above: each test file uses a part.
pub use elb_exporter::clock::now_ms;
