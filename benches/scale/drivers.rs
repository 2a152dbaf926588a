//! Child processes the bench drives: the exporter, wrk, nginx, and the naive design it is compared with.

use super::{
    LABELS, POLL, PREFIX,
    http::{Http, median},
};
use anyhow::{Context, Result, anyhow, bail};
use prometheus::{Encoder, GaugeVec, Opts, Registry, TextEncoder};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Owns a child process; kills it (politely first when `term_first`) and reaps it on drop.
struct Guard {
    child: Child,
    term_first: bool,
}

impl Guard {
    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }
    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.term_first && self.exited().is_none() {
            // nginx: SIGTERM to the master stops its workers too; SIGKILL would orphan them.
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = wait_timeout(&mut self.child, Duration::from_secs(3));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(super) fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------------------------
// The exporter process

pub(super) struct Exporter {
    guard: Guard,
    pub(super) addr: String,
    pub(super) path: String,
    pub(super) log: PathBuf,
}

impl Exporter {
    pub(super) fn spawn(bin: &Path, cfg: &Path, kubeconfig: &Path, log: &Path) -> Result<Exporter> {
        let log_file = std::fs::File::create(log)?;
        let mut cmd = Command::new(bin);
        cmd.arg("--config")
            .arg(cfg)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file));
        for k in [
            "HTTPS_PROXY",
            "https_proxy",
            "HTTP_PROXY",
            "http_proxy",
            "ALL_PROXY",
            "all_proxy",
            "HUAWEICLOUD_SDK_AK",
            "HUAWEICLOUD_SDK_SK",
            "HUAWEICLOUD_SDK_SECURITY_TOKEN",
            "HUAWEICLOUD_SDK_PROJECT_ID",
        ] {
            cmd.env_remove(k);
        }
        let mut guard = Guard {
            child: cmd
                .spawn()
                .with_context(|| format!("spawn {}", bin.display()))?,
            term_first: false,
        };
        let stdout = guard
            .child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(i) = line.find("http://") {
                        break line[i + "http://".len()..].trim().to_string();
                    }
                }
                Err(_) => bail!(
                    "exporter did not announce its address; log:\n{}",
                    tail(log, 30)
                ),
            }
        };
        let (addr, path) = match url.find('/') {
            Some(i) => (url[..i].to_string(), url[i..].to_string()),
            None => (url.clone(), "/metrics".to_string()),
        };
        Ok(Exporter {
            guard,
            addr,
            path,
            log: log.to_path_buf(),
        })
    }

    pub(super) fn pid(&self) -> u32 {
        self.guard.pid()
    }

    pub(super) fn check_alive(&mut self) -> Result<()> {
        if let Some(s) = self.guard.exited() {
            bail!("exporter exited ({s}); log:\n{}", tail(&self.log, 30));
        }
        Ok(())
    }

    /// The plain body as text (the exporter's own metrics at its end).
    pub(super) fn scrape(&self, http: &mut Http) -> Result<String> {
        let status = http.get(&self.path, false)?;
        if status != 200 {
            bail!("GET {}: HTTP {status}", self.path);
        }
        Ok(String::from_utf8_lossy(http.body()).into_owned())
    }
}

// ---------------------------------------------------------------------------------------------------------
// wrk

#[derive(Debug, Clone, Copy)]
pub(super) struct Wrk {
    pub(super) rps: f64,
    pub(super) p50_ms: f64,
    pub(super) p99_ms: f64,
    requests: u64,
    pub(super) errors: u64,
}

fn parse_wrk_time(s: &str) -> Option<f64> {
    let s = s.trim();
    for (suffix, ms) in [
        ("us", 0.001),
        ("ms", 1.0),
        ("s", 1000.0),
        ("m", 60_000.0),
        ("h", 3_600_000.0),
    ] {
        if let Some(v) = s.strip_suffix(suffix) {
            return v.trim().parse::<f64>().ok().map(|v| v * ms);
        }
    }
    None
}

fn parse_wrk(out: &str) -> Option<Wrk> {
    let mut w = Wrk {
        rps: f64::NAN,
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
        requests: 0,
        errors: 0,
    };
    for line in out.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("50%") {
            w.p50_ms = parse_wrk_time(v)?;
        } else if let Some(v) = line.strip_prefix("99%") {
            w.p99_ms = parse_wrk_time(v)?;
        } else if let Some(v) = line.strip_prefix("Requests/sec:") {
            w.rps = v.trim().parse().ok()?;
        } else if line.contains(" requests in ") {
            w.requests = line.split_whitespace().next()?.parse().ok()?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // connect 0, read 0, write 0, timeout 0
            w.errors += v
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            w.errors += v.trim().parse::<u64>().unwrap_or(0);
        }
    }
    (w.rps.is_finite() && w.p50_ms.is_finite()).then_some(w)
}

/// `wrk -t2 -c50 -d{secs}s --latency` against `url`; killed if it overruns.
pub(super) fn run_wrk(wrk: &Path, url: &str, gzip: bool, secs: u64) -> Option<Wrk> {
    let mut cmd = Command::new(wrk);
    cmd.args([
        "-t2",
        "-c50",
        &format!("-d{secs}s"),
        "--latency",
        "--timeout",
        "30s",
    ]);
    if gzip {
        cmd.args(["-H", "Accept-Encoding: gzip"]);
    }
    cmd.arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut guard = Guard {
        child: cmd.spawn().ok()?,
        term_first: false,
    };
    // wrk's output is a few hundred bytes: the pipe cannot fill before it exits.
    let status = wait_timeout(&mut guard.child, Duration::from_secs(secs + 60));
    let mut out = String::new();
    if let Some(mut o) = guard.child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    let mut err = String::new();
    if let Some(mut e) = guard.child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let parsed = status.and_then(|_| parse_wrk(&out));
    if parsed.is_none() {
        eprintln!("    wrk {url} failed ({status:?}):\n{out}{err}");
    }
    parsed
}

// ---------------------------------------------------------------------------------------------------------
// nginx: the same bytes as a static file

pub(super) struct Nginx {
    _guard: Guard,
    pub(super) addr: String,
    _dir: tempfile::TempDir,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// An nginx config serving `dir`'s metrics.txt at /metrics and metrics.txt.gz at /metrics.gz (gzip) on
/// 127.0.0.1:`port`, everything else (pid, logs, temp files) inside `dir`.
fn nginx_conf(dir: &Path, port: u16) -> String {
    let ct = elb_exporter::server::CONTENT_TYPE;
    let dd = dir.display();
    format!(
        "# generated by benches/scale.rs\n\
         daemon off;\n\
         master_process on;\n\
         worker_processes auto;\n\
         pid {dd}/nginx.pid;\n\
         error_log {dd}/error.log warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n\
         \x20 access_log off;\n\
         \x20 client_body_temp_path {dd}/tmp/body;\n\
         \x20 proxy_temp_path {dd}/tmp/proxy;\n\
         \x20 fastcgi_temp_path {dd}/tmp/fastcgi;\n\
         \x20 uwsgi_temp_path {dd}/tmp/uwsgi;\n\
         \x20 scgi_temp_path {dd}/tmp/scgi;\n\
         \x20 sendfile on;\n\
         \x20 tcp_nopush on;\n\
         \x20 keepalive_requests 1000000;\n\
         \x20 keepalive_timeout 120s;\n\
         \x20 types {{ }}\n\
         \x20 server {{\n\
         \x20   listen 127.0.0.1:{port};\n\
         \x20   location = /metrics {{\n\
         \x20     default_type \"{ct}\";\n\
         \x20     alias {dd}/metrics.txt;\n\
         \x20   }}\n\
         \x20   location = /metrics.gz {{\n\
         \x20     default_type \"{ct}\";\n\
         \x20     add_header Content-Encoding gzip;\n\
         \x20     add_header Vary Accept-Encoding;\n\
         \x20     alias {dd}/metrics.txt.gz;\n\
         \x20   }}\n\
         \x20 }}\n\
         }}\n"
    )
}

pub(super) fn start_nginx(bin: &Path, plain: &[u8], gzip: &[u8]) -> Result<Nginx> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    // Workers may run as `nobody` when the master is root: the files must be world-readable.
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
    std::fs::write(d.join("metrics.txt"), plain)?;
    std::fs::write(d.join("metrics.txt.gz"), gzip)?;
    for f in ["metrics.txt", "metrics.txt.gz"] {
        std::fs::set_permissions(d.join(f), std::fs::Permissions::from_mode(0o644))?;
    }
    std::fs::create_dir_all(d.join("tmp"))?;
    let port = free_port()?;
    let conf = nginx_conf(d, port);
    let conf_path = d.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let log = std::fs::File::create(d.join("stderr.log"))?;
    let mut guard = Guard {
        child: Command::new(bin)
            .arg("-p")
            .arg(d)
            .arg("-e")
            .arg(d.join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?,
        term_first: true,
    };
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut http = Http::new(&addr);
    loop {
        if let Some(s) = guard.exited() {
            bail!(
                "nginx exited ({s}):\n{}\n{}",
                tail(&d.join("stderr.log"), 20),
                tail(&d.join("error.log"), 20)
            );
        }
        if let Ok(200) = http.get("/metrics", false) {
            if http.body() != plain {
                bail!("nginx serves a different body");
            }
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "nginx did not answer on {addr}:\n{}",
                tail(&d.join("error.log"), 20)
            );
        }
        std::thread::sleep(POLL);
    }
    Ok(Nginx {
        _guard: guard,
        addr,
        _dir: dir,
    })
}

// ---------------------------------------------------------------------------------------------------------
// The naive design: GaugeVec + TextEncoder per scrape

pub(super) struct Naive {
    pub(super) series: usize,
    pub(super) plain_ms: f64,
    pub(super) gzip_ms: f64,
    pub(super) bytes: usize,
    pub(super) runs: usize,
}

fn unescape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut it = v.chars();
    while let Some(c) = it.next() {
        if c == '\\' {
            match it.next() {
                Some('n') => out.push('\n'),
                Some(o) => out.push(o),
                None => {}
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `k="v",k="v"` → values in order.
fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::with_capacity(LABELS.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let Some(eq) = s[i..].find("=\"") else { break };
        let key = s[i..i + eq].trim_start_matches(',').to_string();
        let start = i + eq + 2;
        let mut j = start;
        while j < b.len() && b[j] != b'"' {
            j += if b[j] == b'\\' { 2 } else { 1 };
        }
        out.push((key, unescape(&s[start..j.min(b.len())])));
        i = j + 1;
    }
    out
}

pub(super) fn naive(body: &str) -> Result<Naive> {
    let registry = Registry::new();
    let mut families: HashMap<String, GaugeVec> = HashMap::new();
    let mut helps: HashMap<&str, &str> = HashMap::new();
    let mut series = 0;
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some((name, help)) = rest.split_once(' ') {
                helps.insert(name, help);
            }
            continue;
        }
        if !line.starts_with(PREFIX) {
            continue;
        }
        let (Some(open), Some(close)) = (line.find('{'), line.rfind('}')) else {
            continue;
        };
        let name = &line[..open];
        let value: f64 = line[close + 1..].trim().parse().context("sample value")?;
        let labels = parse_labels(&line[open + 1..close]);
        let values: Vec<&str> = LABELS
            .iter()
            .map(|k| {
                labels
                    .iter()
                    .find(|(n, _)| n == k)
                    .map_or("", |(_, v)| v.as_str())
            })
            .collect();
        if !families.contains_key(name) {
            let help = helps.get(name).copied().unwrap_or("ELB listener metric");
            let g = GaugeVec::new(Opts::new(name, help), &LABELS)?;
            registry.register(Box::new(g.clone()))?;
            families.insert(name.to_string(), g);
        }
        families[name].with_label_values(&values).set(value);
        series += 1;
    }
    let budget = Duration::from_secs(40);
    let mut plain = Vec::new();
    let mut bytes = 0;
    let started = Instant::now();
    while plain.len() < 20 && (plain.len() < 3 || started.elapsed() < budget) {
        let t = Instant::now();
        let mut buf = Vec::new();
        TextEncoder::new().encode(&registry.gather(), &mut buf)?;
        plain.push(t.elapsed().as_secs_f64() * 1000.0);
        bytes = buf.len();
    }
    // The usual handler (Go's promhttp, most clients) compresses per scrape at the default level.
    let mut gz = Vec::new();
    let started = Instant::now();
    while gz.len() < 10 && (gz.len() < 3 || started.elapsed() < budget) {
        let t = Instant::now();
        let mut buf = Vec::new();
        TextEncoder::new().encode(&registry.gather(), &mut buf)?;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&buf)?;
        let _ = enc.finish()?;
        gz.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(Naive {
        series,
        runs: plain.len(),
        plain_ms: median(plain),
        gzip_ms: median(gz),
        bytes,
    })
}
