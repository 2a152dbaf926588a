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
                    let log = std::fs::read_to_string(&path).unwrap_or_default();
                    panic!("exporter did not announce its address; stderr:\n{log}");
                }
            }
        };
        let base = url
            .trim_end_matches("/metrics")
            .trim_end_matches('/')
            .to_string();
        Exporter {
            child,
            metrics_url: url,
            base,
            stderr_path: Some(path),
            stdout: captured,
        }
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
pub async fn wait_for<F, Fut>(limit: Duration, mut check: F) -> bool
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
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of the first sample line starting with `prefix` (name plus labels), if any.
pub fn sample(body: &str, prefix: &str) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Sample lines of a family (exact name match before `{` or space).
pub fn family_lines<'a>(body: &'a str, family: &str) -> Vec<&'a str> {
    body.lines()
        .filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .collect()
}

#[allow(unused_imports)] // Like the helpers above: each test file uses a part.
pub use elb_exporter::clock::now_ms;

/// Checks a text exposition body line by line: every line is a `# HELP`/`# TYPE` comment or a sample
/// `name{label="value",...} value` with correctly escaped label values. Returns the first bad line.
pub fn check_exposition(body: &str) -> Result<usize, String> {
    let mut samples = 0;
    for (i, line) in body.lines().enumerate() {
        if line.is_empty() {
            return Err(format!("line {}: empty line", i + 1));
        }
        if let Some(rest) = line.strip_prefix('#') {
            let ok = rest.starts_with(" HELP ") || rest.starts_with(" TYPE ");
            if !ok {
                return Err(format!("line {}: unknown comment {line:?}", i + 1));
            }
            continue;
        }
        parse_sample(line).map_err(|e| format!("line {}: {e}: {line:?}", i + 1))?;
        samples += 1;
    }
    Ok(samples)
}

/// A parsed sample line: name, labels (name, unescaped value) in order, value.
pub type ParsedSample = (String, Vec<(String, String)>, f64);

/// Parses one sample line into (name, [(label, unescaped value)], value).
pub fn parse_sample(line: &str) -> Result<ParsedSample, String> {
    let mut chars = line.char_indices().peekable();
    let mut name = String::new();
    while let Some(&(_, c)) = chars.peek() {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            name.push(c);
            chars.next();
        } else {
            break;
        }
    }
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err("bad metric name".into());
    }
    let mut labels = Vec::new();
    if let Some(&(_, '{')) = chars.peek() {
        chars.next();
        loop {
            let mut key = String::new();
            while let Some(&(_, c)) = chars.peek() {
                if c.is_ascii_alphanumeric() || c == '_' {
                    key.push(c);
                    chars.next();
                } else {
                    break;
                }
            }
            if key.is_empty() {
                if let Some(&(_, '}')) = chars.peek() {
                    chars.next();
                    break;
                }
                return Err("bad label name".into());
            }
            if chars.next().map(|c| c.1) != Some('=') || chars.next().map(|c| c.1) != Some('"') {
                return Err(format!("label {key}: expected =\""));
            }
            let mut value = String::new();
            loop {
                match chars.next().map(|c| c.1) {
                    None => return Err(format!("label {key}: unterminated value")),
                    Some('"') => break,
                    Some('\\') => match chars.next().map(|c| c.1) {
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        Some('n') => value.push('\n'),
                        other => return Err(format!("label {key}: bad escape {other:?}")),
                    },
                    Some('\n') => return Err(format!("label {key}: raw newline")),
                    Some(c) => value.push(c),
                }
            }
            labels.push((key, value));
            match chars.next().map(|c| c.1) {
                Some(',') => continue,
                Some('}') => break,
                other => return Err(format!("after a label: {other:?}")),
            }
        }
    }
    if chars.next().map(|c| c.1) != Some(' ') {
        return Err("expected one space before the value".into());
    }
    let rest: String = chars.map(|c| c.1).collect();
    let value = match rest.as_str() {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v
            .parse::<f64>()
            .map_err(|_| format!("bad value {v:?} (no timestamps expected)"))?,
    };
    Ok((name, labels, value))
}
