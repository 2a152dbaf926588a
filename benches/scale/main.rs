//! Scale benchmark (issue 6): the real `elb-exporter` binary (release build) against the in-process
//! simulated cloud (CES answers in ~50 ms) and fake Kubernetes API server, at 100, 1,000 and 10,000
//! listeners × 13 metrics; side by side in the same run with nginx serving the very same body as a static
//! file (the floor) and with the naive design (the `prometheus` crate's `GaugeVec` + `TextEncoder`
//! rendering every scrape). Prints Markdown tables, one row per size; see docs/PERFORMANCE.md.
//!
//! ```text
//! cargo bench --bench scale -- [--sizes 100,1000,10000] [--exporter PATH] [--wrk PATH] [--nginx PATH]
//!                              [--wrk-secs 10] [--concurrency 8] [--interval SECS] [--requests 200]
//!                              [--out FILE] [--fixture realistic|legacy]
//! scripts/bench.sh [sizes]     # installs wrk + nginx-light, builds, runs, writes target/bench/scale.md
//! ```
//! Environment equivalents: `BENCH_SIZES`, `ELB_EXPORTER_BIN`, `WRK`, `NGINX`, `BENCH_WRK_SECS`,
//! `BENCH_CONCURRENCY`, `BENCH_INTERVAL_SECS`, `BENCH_REQUESTS`, `BENCH_OUT`, `BENCH_FIXTURE`.
//!
//! Fixture (`--fixture`): `realistic` (the default) is what users run: the exporter's default configuration
//! (rate limits, `listener_refresh`, `max_concurrency`), `collection.interval` 60 s, ELBs with 4 listeners
//! each (ports 80, 443, 8080, 8443), half shared (`kubernetes.io/elb.class: union`, ELB v2) and half
//! dedicated (`performance`, v3), one Service per ELB with those ports, spread over 20 namespaces. It also
//! measures start → all series, ELB calls per refresh and a new Service while a refresh runs. `legacy` is
//! the issue-6 fixture (dedicated ELBs with 5 listeners, `listener_refresh: 1h`, raised rate limits); its
//! rows are labelled. Every loop is bounded in time and count; every child process (exporter, nginx, wrk)
//! is owned by a guard that kills it on drop, panics included.

use anyhow::{Context, Result, anyhow, bail};
use elb_exporter::demo::{config_for, service};
use elb_exporter::sim::cloud::{CloudSim, LbKind, SimApi, SimConfig, SimListener, SimRequest};
use elb_exporter::sim::kube::FakeApiServer;
use prometheus::{Encoder, GaugeVec, Opts, Registry, TextEncoder};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The default CES metric set of the exporter.
const METRICS: usize = 13;
/// CES batch limit (`global.scrape_batch_size` default).
const BATCH: usize = 500;
/// Sizes are multiples of this: 4 (realistic) and 5 (legacy) listeners per ELB.
const SIZE_STEP: usize = 20;
/// The exporter's default `discovery.listener_refresh` (the realistic fixture waits for one).
const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
const NEW_NS_REFRESH: &str = "zz-bench-refresh";
const NAMESPACES: usize = 20;
const PREFIX: &str = "huaweicloud_sys_elb_listener_";
const LABELS: [&str; 7] = [
    "namespace",
    "service",
    "lbaas_instance_id",
    "lbaas_listener_id",
    "listener_name",
    "port",
    "protocol",
];
const NEW_NS: &str = "zz-bench-new";
const NEW_SVC: &str = "new-svc";
const ELB_ID_ANNOTATION: &str = "kubernetes.io/elb.id";
const ELB_CLASS_ANNOTATION: &str = "kubernetes.io/elb.class";
/// Simulated CES service time per batch call.
const CES_LATENCY: Duration = Duration::from_millis(50);
/// Poll period of `/readyz` and of `/metrics` while waiting for a new Service's first series.
const POLL: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------------------------------------------------
// Options

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fixture {
    Realistic,
    Legacy,
}

impl Fixture {
    fn ports(self) -> &'static [u16] {
        match self {
            Fixture::Realistic => &[80, 443, 8080, 8443],
            Fixture::Legacy => &[80, 443, 8080, 8443, 9000],
        }
    }

    /// ELB `i` is shared (v2) in the realistic fixture when `i` is even.
    fn shared(self, i: usize) -> bool {
        self == Fixture::Realistic && i.is_multiple_of(2)
    }

    fn name(self) -> &'static str {
        match self {
            Fixture::Realistic => "realistic",
            Fixture::Legacy => "legacy",
        }
    }
}

struct BenchOpts {
    sizes: Vec<usize>,
    exporter: PathBuf,
    wrk: Option<PathBuf>,
    nginx: Option<PathBuf>,
    wrk_secs: u64,
    /// `cloud.max_concurrency`; `None`: the exporter's default (not written to the config).
    concurrency: Option<usize>,
    interval: Option<u64>,
    requests: usize,
    out: Option<PathBuf>,
    fixture: Fixture,
}

fn env_or(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.trim().is_empty())
}

fn parse_sizes(s: &str) -> Result<Vec<usize>> {
    s.split([',', ' '])
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let p = p.trim().replace('_', "");
            let n: usize = match p.strip_suffix(['k', 'K']) {
                Some(k) => k.parse::<usize>().map(|k| k * 1000),
                None => p.parse(),
            }
            .with_context(|| format!("bad size {p:?}"))?;
            if n == 0 || !n.is_multiple_of(SIZE_STEP) {
                bail!(
                    "size {n} must be a positive multiple of {SIZE_STEP} (4 or 5 listeners per ELB)"
                );
            }
            Ok(n)
        })
        .collect()
}

/// A program named explicitly, else found on PATH or in /usr/sbin, /usr/bin.
fn find_program(explicit: Option<String>, name: &str) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn default_exporter() -> PathBuf {
    if let Some(p) = option_env!("CARGO_BIN_EXE_elb-exporter") {
        return PathBuf::from(p);
    }
    // target/release/deps/scale-<hash> → target/release/elb-exporter
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent()?.parent().map(|d| d.join("elb-exporter")))
        .unwrap_or_else(|| PathBuf::from("target/release/elb-exporter"))
}

impl BenchOpts {
    fn parse() -> Result<BenchOpts> {
        let mut sizes = env_or("BENCH_SIZES");
        let mut exporter = env_or("ELB_EXPORTER_BIN");
        let mut wrk = env_or("WRK");
        let mut nginx = env_or("NGINX");
        let mut wrk_secs = env_or("BENCH_WRK_SECS");
        let mut concurrency = env_or("BENCH_CONCURRENCY");
        let mut interval = env_or("BENCH_INTERVAL_SECS");
        let mut requests = env_or("BENCH_REQUESTS");
        let mut out = env_or("BENCH_OUT");
        let mut fixture = env_or("BENCH_FIXTURE");
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            let (key, inline) = match a.split_once('=') {
                Some((k, v)) => (k.to_string(), Some(v.to_string())),
                None => (a.clone(), None),
            };
            let slot = match key.as_str() {
                "--sizes" => &mut sizes,
                "--exporter" => &mut exporter,
                "--wrk" => &mut wrk,
                "--nginx" => &mut nginx,
                "--wrk-secs" => &mut wrk_secs,
                "--concurrency" => &mut concurrency,
                "--interval" => &mut interval,
                "--requests" => &mut requests,
                "--out" => &mut out,
                "--fixture" => &mut fixture,
                // Passed by `cargo bench`.
                "--bench" => continue,
                "-h" | "--help" => {
                    println!(
                        "usage: scale [--sizes 100,1000,10000] [--exporter PATH] [--wrk PATH] [--nginx PATH] \
                         [--wrk-secs 10] [--concurrency N] [--interval SECS] [--requests 200] [--out FILE] \
                         [--fixture realistic|legacy]"
                    );
                    std::process::exit(0);
                }
                other if other.starts_with('-') => bail!("unknown option {other} (see --help)"),
                // A positional argument (cargo bench's filter): sizes.
                _ => {
                    sizes = Some(a.clone());
                    continue;
                }
            };
            *slot = Some(match inline {
                Some(v) => v,
                None => args.next().ok_or_else(|| anyhow!("{key} needs a value"))?,
            });
        }
        let num = |v: Option<String>, what: &str, default: u64| -> Result<u64> {
            v.map(|s| {
                s.parse::<u64>()
                    .with_context(|| format!("bad {what} {s:?}"))
            })
            .transpose()
            .map(|v| v.unwrap_or(default))
        };
        Ok(BenchOpts {
            sizes: parse_sizes(sizes.as_deref().unwrap_or("100,1000,10000"))?,
            exporter: exporter.map(PathBuf::from).unwrap_or_else(default_exporter),
            wrk: find_program(wrk, "wrk"),
            nginx: find_program(nginx, "nginx"),
            wrk_secs: num(wrk_secs, "wrk seconds", 10)?.max(1),
            concurrency: concurrency
                .map(|c| {
                    c.parse::<usize>()
                        .map(|c| c.clamp(1, 64))
                        .with_context(|| format!("bad concurrency {c:?}"))
                })
                .transpose()?,
            interval: interval
                .map(|s| {
                    s.parse::<u64>()
                        .with_context(|| format!("bad interval {s:?}"))
                })
                .transpose()?,
            requests: num(requests, "requests", 200)?.max(10) as usize,
            out: out.map(PathBuf::from),
            fixture: match fixture.as_deref() {
                None | Some("realistic") => Fixture::Realistic,
                Some("legacy") => Fixture::Legacy,
                Some(other) => bail!("unknown fixture {other:?} (realistic or legacy)"),
            },
        })
    }

    /// Collection interval for a size: long enough that no cycle starts while scrapes are measured.
    fn interval_for(&self, listeners: usize) -> u64 {
        let default = match self.fixture {
            Fixture::Realistic => 60,
            Fixture::Legacy if listeners > 2000 => 120,
            Fixture::Legacy => 60,
        };
        self.interval.unwrap_or(default).max(10)
    }

    /// The exporter config on top of the simulator's endpoints and credentials.
    fn extra_config(&self, interval: u64) -> String {
        let mut extra = String::new();
        if self.fixture == Fixture::Legacy {
            extra.push_str("discovery:\n  listener_refresh: \"1h\"\n");
        }
        let _ = write!(extra, "collection:\n  interval: \"{interval}s\"\n");
        let legacy = self.fixture == Fixture::Legacy;
        if self.concurrency.is_some() || legacy {
            extra.push_str("cloud:\n");
            if let Some(c) = self.concurrency {
                let _ = writeln!(extra, "  max_concurrency: {c}");
            }
            if legacy {
                extra.push_str(
                    "  rate_limit:\n    elb_per_minute: 10000\n    ces_per_minute: 10000\n",
                );
            }
        }
        extra
    }
}

// ---------------------------------------------------------------------------------------------------------
// Child processes

/// Owns a child process; kills it (politely first when `term_first`) and reaps it on drop.
struct Guard {
    child: Child,
    term_first: bool,
}

impl Guard {
    fn pid(&self) -> u32 {
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

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 keep-alive client (one scraper; no decompression, the bytes are what is measured)

struct Http {
    addr: String,
    conn: Option<BufReader<TcpStream>>,
    buf: Vec<u8>,
    len: usize,
}

impl Http {
    fn new(addr: &str) -> Http {
        Http {
            addr: addr.to_string(),
            conn: None,
            buf: Vec::new(),
            len: 0,
        }
    }

    fn body(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// GET `path`; the body is left in [`Http::body`]. Retries once on a fresh connection.
    fn get(&mut self, path: &str, gzip: bool) -> std::io::Result<u16> {
        match self.try_get(path, gzip) {
            Ok(s) => Ok(s),
            Err(_) => {
                self.conn = None;
                let r = self.try_get(path, gzip);
                if r.is_err() {
                    self.conn = None;
                }
                r
            }
        }
    }

    fn try_get(&mut self, path: &str, gzip: bool) -> std::io::Result<u16> {
        use std::io::{Error, ErrorKind};
        if self.conn.is_none() {
            let addr: SocketAddr = self
                .addr
                .to_socket_addrs()?
                .next()
                .ok_or_else(|| Error::new(ErrorKind::InvalidInput, "no address"))?;
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(60)))?;
            s.set_write_timeout(Some(Duration::from_secs(10)))?;
            self.conn = Some(BufReader::with_capacity(64 * 1024, s));
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(Error::new(ErrorKind::NotConnected, "no connection"));
        };
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: elb-exporter-bench\r\nAccept: */*\r\n{}\r\n",
            self.addr,
            if gzip {
                "Accept-Encoding: gzip\r\n"
            } else {
                ""
            }
        );
        conn.get_mut().write_all(req.as_bytes())?;
        let mut line = String::new();
        if conn.read_line(&mut line)? == 0 {
            return Err(Error::new(ErrorKind::UnexpectedEof, "connection closed"));
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::new(ErrorKind::InvalidData, format!("status line {line:?}")))?;
        let (mut length, mut chunked, mut close) = (None::<usize>, false, false);
        for _ in 0..200 {
            line.clear();
            if conn.read_line(&mut line)? == 0 {
                return Err(Error::new(ErrorKind::UnexpectedEof, "in headers"));
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let v = v.trim();
                match k.trim().to_ascii_lowercase().as_str() {
                    "content-length" => length = v.parse().ok(),
                    "transfer-encoding" => chunked = v.eq_ignore_ascii_case("chunked"),
                    "connection" => close = v.eq_ignore_ascii_case("close"),
                    _ => {}
                }
            }
        }
        let ensure = |buf: &mut Vec<u8>, n: usize| {
            if buf.len() < n {
                buf.resize(n, 0);
            }
        };
        self.len = 0;
        if chunked {
            for _ in 0..1_000_000 {
                line.clear();
                conn.read_line(&mut line)?;
                let hex = line.trim().split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(hex, 16)
                    .map_err(|_| Error::new(ErrorKind::InvalidData, "chunk size"))?;
                if size == 0 {
                    for _ in 0..100 {
                        line.clear();
                        if conn.read_line(&mut line)? == 0 || line.trim().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                ensure(&mut self.buf, self.len + size);
                conn.read_exact(&mut self.buf[self.len..self.len + size])?;
                self.len += size;
                line.clear();
                conn.read_line(&mut line)?;
            }
        } else if let Some(n) = length {
            ensure(&mut self.buf, n);
            conn.read_exact(&mut self.buf[..n])?;
            self.len = n;
        } else {
            let mut v = Vec::new();
            conn.read_to_end(&mut v)?;
            self.len = v.len();
            self.buf = v;
            close = true;
        }
        if close {
            self.conn = None;
        }
        Ok(status)
    }
}

#[derive(Debug, Clone, Copy)]
struct Lat {
    p50_ms: f64,
    p99_ms: f64,
    n: usize,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

/// One scraper: sequential GETs on one keep-alive connection, `max_n` or `max_time`, after 3 warm-ups.
fn sequential(addr: &str, path: &str, gzip: bool, max_n: usize, max_time: Duration) -> Option<Lat> {
    let mut http = Http::new(addr);
    for _ in 0..3 {
        http.get(path, gzip).ok()?;
    }
    let mut samples = Vec::with_capacity(max_n);
    let deadline = Instant::now() + max_time;
    while samples.len() < max_n && Instant::now() < deadline {
        let t = Instant::now();
        let status = http.get(path, gzip).ok()?;
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
        if status != 200 {
            eprintln!("    GET {addr}{path}: HTTP {status}");
            return None;
        }
    }
    samples.sort_by(f64::total_cmp);
    Some(Lat {
        p50_ms: percentile(&samples, 0.5),
        p99_ms: percentile(&samples, 0.99),
        n: samples.len(),
    })
}

// ---------------------------------------------------------------------------------------------------------
// /proc

fn proc_stat_cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command: state is field 3, utime 14, stime 15.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn clock_ticks_per_sec() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .filter(|v| *v > 0.0)
        .unwrap_or(100.0)
}

fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Samples the exporter's VmRSS every 10 ms in a thread, so the peak can be attributed to a phase.
struct RssSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<Vec<(Instant, u64)>>>,
    marks: Vec<(&'static str, Instant)>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut v = Vec::new();
            // Bounded: 10 ms for at most ~3 hours.
            for _ in 0..1_000_000 {
                if flag.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                match proc_status_kib(pid, "VmRSS:") {
                    Some(k) => v.push((Instant::now(), k)),
                    None => break,
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            v
        });
        RssSampler {
            stop,
            handle: Some(handle),
            marks: vec![("startup", Instant::now())],
        }
    }

    /// Starts a new phase.
    fn mark(&mut self, phase: &'static str) {
        self.marks.push((phase, Instant::now()));
    }

    /// Peak sampled RSS (KiB) per phase, in phase order.
    fn finish(mut self) -> Vec<(&'static str, u64)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let samples = self
            .handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let mut out: Vec<(&'static str, u64)> = Vec::new();
        for (i, (name, from)) in self.marks.iter().enumerate() {
            let to = self.marks.get(i + 1).map(|m| m.1);
            let peak = samples
                .iter()
                .filter(|(t, _)| t >= from && to.is_none_or(|to| *t < to))
                .map(|(_, k)| *k)
                .max()
                .unwrap_or(0);
            match out.iter_mut().find(|(n, _)| n == name) {
                Some(e) => e.1 = e.1.max(peak),
                None => out.push((name, peak)),
            }
        }
        out
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Fixture

fn elb_id(i: usize) -> String {
    format!("{:08x}-5e1b-4c3d-9a7f-{:012x}", 0x6f00_0000 + i, i)
}

fn listener_id(i: usize, j: usize) -> String {
    format!(
        "{:08x}-{:04x}-4e5f-8a9b-{:012x}",
        0xa100_0000 + i,
        j,
        i * 8 + j
    )
}

/// Seeds the simulator and the cluster; returns the number of ELBs (= Services) and of shared ones.
fn seed(
    sim: &CloudSim,
    cluster: &FakeApiServer,
    listeners: usize,
    fixture: Fixture,
) -> (usize, usize) {
    let ports = fixture.ports();
    let elbs = listeners / ports.len();
    let mut shared = 0;
    for i in 0..elbs {
        let id = elb_id(i);
        let (kind, class) = if fixture.shared(i) {
            shared += 1;
            (LbKind::Shared, "union")
        } else {
            (LbKind::Dedicated, "performance")
        };
        sim.add_loadbalancer(&id, kind);
        for (j, port) in ports.iter().enumerate() {
            sim.add_listener(
                &id,
                SimListener::new(listener_id(i, j), format!("k8s_TCP_{port}"), "TCP", *port),
            );
        }
        let ports: Vec<i32> = ports.iter().map(|p| i32::from(*p)).collect();
        cluster.apply(service(
            &format!("team-{:02}", i % NAMESPACES),
            &format!("svc-{i:05}"),
            &[
                (ELB_ID_ANNOTATION, id.as_str()),
                (ELB_CLASS_ANNOTATION, class),
            ],
            &ports,
        ));
    }
    (elbs, shared)
}

/// A lookup of new Services' ELBs only: every `loadbalancer_id` it names is one of `skip`. (A refresh
/// listing may also name them, batched with others: it counts as refresh.)
fn only_names(r: &SimRequest, skip: &[&str]) -> bool {
    let named = r.query.matches("loadbalancer_id=").count();
    named > 0 && named == skip.iter().filter(|s| r.query.contains(*s)).count()
}

/// ELB listing calls in the log: (v2, v3), leaving out lookups of only the `skip` ELBs (new Services').
fn elb_calls(reqs: &[SimRequest], skip: &[&str]) -> (usize, usize) {
    let mut n = (0, 0);
    for r in reqs {
        if only_names(r, skip) {
            continue;
        }
        match r.api {
            SimApi::ElbV2 => n.0 += 1,
            SimApi::ElbV3 => n.1 += 1,
            _ => {}
        }
    }
    n
}

fn ces_requests(sim: &CloudSim) -> Vec<SimRequest> {
    sim.requests()
        .into_iter()
        .filter(|r| r.api == SimApi::Ces)
        .collect()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// The value of an unlabelled or labelled sample whose line starts with `prefix` followed by a space.
fn sample(body: &str, prefix: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(prefix)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Does the body hold a cloud series (not just `listener_info`) of namespace `ns`?
fn has_cloud_series(body: &str, ns: &str) -> bool {
    let needle = format!("{{namespace=\"{ns}\",");
    body.match_indices(&needle).any(|(i, _)| {
        let start = body[..i].rfind('\n').map_or(0, |n| n + 1);
        body[start..].starts_with(PREFIX)
    })
}

// ---------------------------------------------------------------------------------------------------------
// The exporter process

struct Exporter {
    guard: Guard,
    addr: String,
    path: String,
    log: PathBuf,
}

impl Exporter {
    fn spawn(bin: &Path, cfg: &Path, kubeconfig: &Path, log: &Path) -> Result<Exporter> {
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

    fn pid(&self) -> u32 {
        self.guard.pid()
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(s) = self.guard.exited() {
            bail!("exporter exited ({s}); log:\n{}", tail(&self.log, 30));
        }
        Ok(())
    }

    /// The plain body as text (the exporter's own metrics at its end).
    fn scrape(&self, http: &mut Http) -> Result<String> {
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
struct Wrk {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
    errors: u64,
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
fn run_wrk(wrk: &Path, url: &str, gzip: bool, secs: u64) -> Option<Wrk> {
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

struct Nginx {
    _guard: Guard,
    addr: String,
    _dir: tempfile::TempDir,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start_nginx(bin: &Path, plain: &[u8], gzip: &[u8]) -> Result<Nginx> {
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
    let ct = elb_exporter::server::CONTENT_TYPE;
    let dd = d.display();
    let conf = format!(
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
    );
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

struct Naive {
    series: usize,
    plain_ms: f64,
    gzip_ms: f64,
    bytes: usize,
    runs: usize,
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

fn naive(body: &str) -> Result<Naive> {
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

// ---------------------------------------------------------------------------------------------------------
// One size

#[derive(Default)]
struct Side {
    one: Option<Lat>,
    wrk: Option<Wrk>,
}

#[derive(Default)]
struct Row {
    listeners: usize,
    elbs: usize,
    /// Shared (v2) ELBs among them.
    shared: usize,
    fixture: Option<Fixture>,
    interval_s: u64,
    /// Start → every cloud series of the fixture on `/metrics`.
    all_series_s: Option<f64>,
    /// ELB listing calls to ready, (v2, v3).
    elb_ready: (usize, usize),
    /// The first periodic refresh: calls (v2, v3) and first → last call.
    elb_refresh: Option<(usize, usize)>,
    refresh_s: Option<f64>,
    /// A new Service applied as the refresh started: listener_info / first series, and whether the
    /// refresh still had calls to make when the Service's lookup was sent.
    refresh_new_info_s: Option<f64>,
    refresh_new_series_s: Option<f64>,
    refresh_running: Option<bool>,
    series: usize,
    elb_calls: usize,
    ces_min: usize,
    ces_first: usize,
    mpc_first: f64,
    ces_steady: Option<usize>,
    /// The steady cycle also collects the new Service's listener.
    ces_steady_min: usize,
    mpc_steady: Option<f64>,
    cycle_first_s: Option<f64>,
    cycle_steady_s: Option<f64>,
    ready_s: f64,
    cpu_per_cycle_s: Option<f64>,
    steady_cycle_no: u64,
    new_info_s: Option<f64>,
    new_series_s: Option<f64>,
    body_plain: usize,
    body_gzip: usize,
    exp_plain: Side,
    exp_gzip: Side,
    ngx_plain: Side,
    ngx_gzip: Side,
    peak_rss_kib: Option<u64>,
    /// Peak sampled VmRSS per phase (KiB).
    rss_phases: Vec<(&'static str, u64)>,
    rss_kib: Option<u64>,
    naive: Option<Naive>,
    /// /proc/loadavg (1-minute) when the size started and when it ended: other work on the machine.
    load: (f64, f64),
}

fn bench_size(opts: &BenchOpts, listeners: usize, clk: f64) -> Result<Row> {
    let tag = format!("[{listeners}]");
    let interval = opts.interval_for(listeners);
    let mut row = Row {
        listeners,
        interval_s: interval,
        ces_min: (listeners * METRICS).div_ceil(BATCH),
        ces_steady_min: ((listeners + 1 + usize::from(opts.fixture == Fixture::Realistic))
            * METRICS)
            .div_ceil(BATCH),
        fixture: Some(opts.fixture),
        load: (loadavg(), 0.0),
        ..Row::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let sim = CloudSim::new(SimConfig {
        ces_latency: CES_LATENCY,
        // The legacy fixture lifted every limit; the realistic one keeps the simulator's (500 per minute,
        // above the exporter's default 300).
        ces_calls_per_minute: match opts.fixture {
            Fixture::Legacy => 100_000,
            Fixture::Realistic => SimConfig::default().ces_calls_per_minute,
        },
        ..SimConfig::default()
    });
    let cluster = FakeApiServer::new();
    (row.elbs, row.shared) = seed(&sim, &cluster, listeners, opts.fixture);
    let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
    let sim_addr = rt.block_on(sim.serve(loopback))?;
    rt.block_on(cluster.serve(loopback))?;
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("clouds.yml");
    let extra = opts.extra_config(interval);
    std::fs::write(
        &cfg,
        config_for(&sim, &format!("http://{sim_addr}"), &extra),
    )?;
    let kubeconfig = dir.path().join("kubeconfig");
    cluster.write_kubeconfig(&kubeconfig)?;

    // Start → ready: Service list, every ELB's listeners, the first full collection cycle, the render.
    eprintln!(
        "{tag} {} fixture: {} Services/ELBs ({} shared), {listeners} listeners; starting the exporter (interval {interval}s, max_concurrency {})",
        opts.fixture.name(),
        row.elbs,
        row.shared,
        opts.concurrency.map_or("default".into(), |c| c.to_string())
    );
    let started = Instant::now();
    let mut exp = Exporter::spawn(
        &opts.exporter,
        &cfg,
        &kubeconfig,
        &dir.path().join("exporter.log"),
    )?;
    let mut rss = RssSampler::start(exp.pid());
    let mut http = Http::new(&exp.addr);
    let deadline = started + Duration::from_secs(900);
    loop {
        exp.check_alive()?;
        if let Ok(200) = http.get("/readyz", false) {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "exporter not ready after 15 min; log:\n{}",
                tail(&exp.log, 30)
            );
        }
        std::thread::sleep(POLL);
    }
    row.ready_s = started.elapsed().as_secs_f64();
    // Start → every series: usually the first cycle, which readiness waits for, has them all.
    let want = listeners * METRICS;
    while started.elapsed() < Duration::from_secs(900) {
        let n = exp
            .scrape(&mut http)
            .map(|b| b.lines().filter(|l| l.starts_with(PREFIX)).count())
            .unwrap_or(0);
        if n >= want {
            row.all_series_s = Some(started.elapsed().as_secs_f64());
            break;
        }
        exp.check_alive()?;
        std::thread::sleep(Duration::from_millis(100));
    }
    rss.mark("scrapes");
    let body = exp.scrape(&mut http)?;
    row.cycle_first_s = sample(&body, "elb_exporter_collection_duration_seconds");
    row.series = body.lines().filter(|l| l.starts_with(PREFIX)).count();
    let reqs = sim.requests();
    row.elb_ready = elb_calls(&reqs, &[]);
    row.elb_calls = row.elb_ready.0 + row.elb_ready.1;
    let ces: Vec<&SimRequest> = reqs.iter().filter(|r| r.api == SimApi::Ces).collect();
    row.ces_first = ces.len();
    row.mpc_first =
        ces.iter().map(|r| r.ces_metrics).sum::<usize>() as f64 / ces.len().max(1) as f64;
    let first_ces_ms = ces.iter().map(|r| r.time_ms).min().unwrap_or_else(now_ms);
    if row.series != listeners * METRICS {
        eprintln!(
            "{tag} warning: {} cloud series exported, expected {}",
            row.series,
            listeners * METRICS
        );
    }
    eprintln!(
        "{tag} ready in {:.2}s; first cycle {:?}s, {} CES calls (min {}), {} ELB calls",
        row.ready_s, row.cycle_first_s, row.ces_first, row.ces_min, row.elb_calls
    );

    // The bodies, byte for byte as served.
    http.get(&exp.path, false)?;
    let plain = http.body().to_vec();
    http.get(&exp.path, true)?;
    let gzip = http.body().to_vec();
    row.body_plain = plain.len();
    row.body_gzip = gzip.len();

    // One scraper, then 50 (wrk), exporter and nginx on the same bytes.
    let seq_time = Duration::from_secs(15);
    eprintln!(
        "{tag} one scraper: {} sequential GETs per case",
        opts.requests
    );
    row.exp_plain.one = sequential(&exp.addr, &exp.path, false, opts.requests, seq_time);
    row.exp_gzip.one = sequential(&exp.addr, &exp.path, true, opts.requests, seq_time);
    let nginx = match &opts.nginx {
        Some(bin) => match start_nginx(bin, &plain, &gzip) {
            Ok(n) => Some(n),
            Err(e) => {
                eprintln!("{tag} nginx: {e:#}");
                None
            }
        },
        None => None,
    };
    if let Some(n) = &nginx {
        row.ngx_plain.one = sequential(&n.addr, "/metrics", false, opts.requests, seq_time);
        row.ngx_gzip.one = sequential(&n.addr, "/metrics.gz", true, opts.requests, seq_time);
    }
    if let Some(wrk) = &opts.wrk {
        rss.mark("50 scrapers");
        eprintln!(
            "{tag} 50 scrapers: wrk -t2 -c50 -d{}s, 4 runs",
            opts.wrk_secs
        );
        let url = format!("http://{}{}", exp.addr, exp.path);
        row.exp_plain.wrk = run_wrk(wrk, &url, false, opts.wrk_secs);
        row.exp_gzip.wrk = run_wrk(wrk, &url, true, opts.wrk_secs);
        if let Some(n) = &nginx {
            row.ngx_plain.wrk = run_wrk(
                wrk,
                &format!("http://{}/metrics", n.addr),
                false,
                opts.wrk_secs,
            );
            row.ngx_gzip.wrk = run_wrk(
                wrk,
                &format!("http://{}/metrics.gz", n.addr),
                true,
                opts.wrk_secs,
            );
        }
    }
    drop(nginx);
    exp.check_alive()?;

    // A new annotated Service on a new ELB: its listener_info, then its first cloud series.
    rss.mark("new Service");
    let new_elb = elb_id(900_000);
    sim.add_loadbalancer(&new_elb, LbKind::Dedicated);
    sim.add_listener(
        &new_elb,
        SimListener::new(listener_id(900_000, 0), "k8s_TCP_80", "TCP", 80),
    );
    let info_needle = format!("elb_exporter_listener_info{{namespace=\"{NEW_NS}\",");
    let t0 = Instant::now();
    cluster.apply(service(
        NEW_NS,
        NEW_SVC,
        &[
            (ELB_ID_ANNOTATION, new_elb.as_str()),
            (ELB_CLASS_ANNOTATION, "performance"),
        ],
        &[80],
    ));
    let limit = Duration::from_secs(60);
    while t0.elapsed() < limit {
        if let Ok(b) = exp.scrape(&mut http) {
            if row.new_info_s.is_none() && b.contains(&info_needle) {
                row.new_info_s = Some(t0.elapsed().as_secs_f64());
            }
            if has_cloud_series(&b, NEW_NS) {
                row.new_series_s = Some(t0.elapsed().as_secs_f64());
                row.new_info_s.get_or_insert(t0.elapsed().as_secs_f64());
                break;
            }
        }
        std::thread::sleep(POLL);
    }
    eprintln!(
        "{tag} new Service: listener_info after {:?}s, first series after {:?}s",
        row.new_info_s, row.new_series_s
    );
    if opts.fixture == Fixture::Realistic {
        rss.mark("refresh");
        refresh_phase(
            &mut row, &sim, &cluster, &mut exp, &mut http, started, &new_elb,
        )?;
    }

    // CPU per steady-state cycle: the next full cycle that starts after now, measured with the exporter
    // otherwise idle. Cycle k starts about (k-1) intervals after the first cycle's first CES call.
    let interval_ms = interval as i64 * 1000;
    let mut k: i64 = 2;
    while first_ces_ms + (k - 1) * interval_ms - 1500 <= now_ms() && k < 100 {
        k += 1;
    }
    row.steady_cycle_no = k as u64;
    if k > 2 {
        eprintln!("{tag} note: cycle 2 overlapped the scrape measurements; measuring cycle {k}");
    }
    let start_ms = first_ces_ms + (k - 1) * interval_ms;
    let wait = Duration::from_millis((start_ms - 1500 - now_ms()).max(0) as u64);
    eprintln!(
        "{tag} waiting {:.0}s for collection cycle {k}",
        wait.as_secs_f64()
    );
    rss.mark("idle");
    std::thread::sleep(wait.min(Duration::from_secs(interval + 5)));
    rss.mark("cycle");
    exp.check_alive()?;
    let before_body = exp.scrape(&mut http)?;
    let collections_before = sample(
        &before_body,
        "elb_exporter_collections_total{result=\"success\"}",
    )
    .unwrap_or(0.0)
        + sample(
            &before_body,
            "elb_exporter_collections_total{result=\"failure\"}",
        )
        .unwrap_or(0.0);
    drop(before_body);
    // Let the scrape's own CPU settle before the baseline.
    std::thread::sleep(Duration::from_millis(200));
    let ces_before = ces_requests(&sim).len();
    let cpu0 = proc_stat_cpu_ticks(exp.pid());
    let deadline = Instant::now() + Duration::from_secs(interval + 120);
    let mut ces_after = ces_before;
    while Instant::now() < deadline {
        ces_after = ces_requests(&sim).len();
        if ces_after >= ces_before + row.ces_first.max(1) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // The cycle's last answers arrived; wait until the exporter's CPU time stops moving (render, gzip).
    let mut last = proc_stat_cpu_ticks(exp.pid());
    let mut still = 0;
    let settle_deadline = Instant::now() + Duration::from_secs(60);
    while still < 5 && Instant::now() < settle_deadline {
        std::thread::sleep(Duration::from_millis(100));
        let now = proc_stat_cpu_ticks(exp.pid());
        if now == last {
            still += 1;
        } else {
            still = 0;
            last = now;
        }
    }
    let cpu1 = last;
    let after_body = exp.scrape(&mut http)?;
    let collections_after = sample(
        &after_body,
        "elb_exporter_collections_total{result=\"success\"}",
    )
    .unwrap_or(0.0)
        + sample(
            &after_body,
            "elb_exporter_collections_total{result=\"failure\"}",
        )
        .unwrap_or(0.0);
    if collections_after > collections_before {
        row.cycle_steady_s = sample(&after_body, "elb_exporter_collection_duration_seconds");
        let cycles = collections_after - collections_before;
        if let (Some(a), Some(b)) = (cpu0, cpu1) {
            row.cpu_per_cycle_s = Some((b - a) as f64 / clk / cycles);
        }
        let reqs = ces_requests(&sim);
        let cyc = &reqs[ces_before.min(reqs.len())..];
        row.ces_steady = Some(cyc.len());
        row.mpc_steady =
            Some(cyc.iter().map(|r| r.ces_metrics).sum::<usize>() as f64 / cyc.len().max(1) as f64);
    } else {
        eprintln!("{tag} warning: no full cycle observed (CES calls {ces_before} → {ces_after})");
    }
    drop(after_body);
    row.peak_rss_kib = proc_status_kib(exp.pid(), "VmHWM:");
    row.rss_phases = rss.finish();
    row.rss_kib = proc_status_kib(exp.pid(), "VmRSS:");
    eprintln!(
        "{tag} cycle {k}: {:?}s, {:?} CES calls, {:?} CPU s; peak RSS {:?} KiB",
        row.cycle_steady_s, row.ces_steady, row.cpu_per_cycle_s, row.peak_rss_kib
    );
    drop(http);
    drop(exp);
    rt.shutdown_timeout(Duration::from_secs(2));

    row.load.1 = loadavg();
    // The naive design on the same data (the exporter is stopped: the bench process has the CPU).
    eprintln!("{tag} naive design: GaugeVec + TextEncoder per scrape");
    let text = String::from_utf8_lossy(&plain).into_owned();
    drop(plain);
    match naive(&text) {
        Ok(n) => row.naive = Some(n),
        Err(e) => eprintln!("{tag} naive: {e:#}"),
    }
    Ok(row)
}

/// Waits for the first periodic refresh (default `listener_refresh`, counted from start), applies a new
/// Service (shared ELB) as soon as its first call arrives, and measures that Service's first series and
/// the refresh's calls.
fn refresh_phase(
    row: &mut Row,
    sim: &CloudSim,
    cluster: &FakeApiServer,
    exp: &mut Exporter,
    http: &mut Http,
    started: Instant,
    idle_new_elb: &str,
) -> Result<()> {
    let tag = format!("[{}]", row.listeners);
    let refresh_elb = elb_id(900_001);
    let skip = [idle_new_elb, refresh_elb.as_str()];
    let is_refresh_call =
        |r: &SimRequest| matches!(r.api, SimApi::ElbV2 | SimApi::ElbV3) && !only_names(r, &skip);
    // The log only grows (it is capped far above what a run sends): the refresh is what follows `base`.
    let base = sim.requests().len();
    let wait = (DEFAULT_REFRESH + Duration::from_secs(60)).saturating_sub(started.elapsed());
    eprintln!(
        "{tag} waiting up to {:.0}s for the first listener refresh",
        wait.as_secs_f64()
    );
    let deadline = Instant::now() + wait;
    let refresh_started = loop {
        if let Some(r) = sim.requests()[base..].iter().find(|r| is_refresh_call(r)) {
            break r.time_ms;
        }
        if Instant::now() >= deadline {
            eprintln!("{tag} warning: no refresh observed");
            return Ok(());
        }
        exp.check_alive()?;
        std::thread::sleep(Duration::from_millis(10));
    };
    sim.add_loadbalancer(&refresh_elb, LbKind::Shared);
    let new_listener = listener_id(900_001, 0);
    sim.add_listener(
        &refresh_elb,
        SimListener::new(new_listener.clone(), "k8s_TCP_80", "TCP", 80),
    );
    let info_needle = format!("elb_exporter_listener_info{{namespace=\"{NEW_NS_REFRESH}\",");
    let t0 = Instant::now();
    cluster.apply(service(
        NEW_NS_REFRESH,
        NEW_SVC,
        &[
            (ELB_ID_ANNOTATION, refresh_elb.as_str()),
            (ELB_CLASS_ANNOTATION, "union"),
        ],
        &[80],
    ));
    while t0.elapsed() < Duration::from_secs(60) {
        if let Ok(b) = exp.scrape(http) {
            if row.refresh_new_info_s.is_none() && b.contains(&info_needle) {
                row.refresh_new_info_s = Some(t0.elapsed().as_secs_f64());
            }
            if has_cloud_series(&b, NEW_NS_REFRESH) {
                row.refresh_new_series_s = Some(t0.elapsed().as_secs_f64());
                row.refresh_new_info_s
                    .get_or_insert(t0.elapsed().as_secs_f64());
                break;
            }
        }
        std::thread::sleep(POLL);
    }
    // The refresh is over once no refresh call arrived for 5 s.
    let mut last = elb_calls(&sim.requests(), &skip);
    let mut quiet_since = Instant::now();
    let quiet_deadline = Instant::now() + Duration::from_secs(120);
    while quiet_since.elapsed() < Duration::from_secs(5) && Instant::now() < quiet_deadline {
        std::thread::sleep(Duration::from_millis(200));
        let now = elb_calls(&sim.requests(), &skip);
        if now != last {
            last = now;
            quiet_since = Instant::now();
        }
    }
    let reqs = sim.requests();
    let refresh: Vec<&SimRequest> = reqs[base..].iter().filter(|r| is_refresh_call(r)).collect();
    let lookup_ms = reqs
        .iter()
        .filter(|r| r.query.contains(refresh_elb.as_str()))
        .map(|r| r.time_ms)
        .min();
    let last_ms = refresh.iter().map(|r| r.time_ms).max();
    row.elb_refresh = Some((
        refresh.iter().filter(|r| r.api == SimApi::ElbV2).count(),
        refresh.iter().filter(|r| r.api == SimApi::ElbV3).count(),
    ));
    row.refresh_s = last_ms.map(|l| (l - refresh_started) as f64 / 1000.0);
    row.refresh_running = match (lookup_ms, last_ms) {
        (Some(a), Some(b)) => Some(a < b),
        _ => None,
    };
    eprintln!(
        "{tag} refresh: {:?} ELB calls (v2, v3) over {:?}s; new Service during it: listener_info {:?}s, first series {:?}s (lookup before the refresh's last call: {:?})",
        row.elb_refresh,
        row.refresh_s,
        row.refresh_new_info_s,
        row.refresh_new_series_s,
        row.refresh_running
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// Tables

fn ms(v: f64) -> String {
    if !v.is_finite() {
        "n/a".into()
    } else if v < 1.0 {
        format!("{v:.2}")
    } else if v < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

fn secs(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.2} s"))
}

fn size(bytes: usize) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

fn lat(l: &Option<Lat>) -> String {
    l.map_or("n/a".into(), |l| {
        format!("{} / {}", ms(l.p50_ms), ms(l.p99_ms))
    })
}

fn wrk_cell(w: &Option<Wrk>) -> String {
    w.map_or("n/a".into(), |w| {
        let mut s = format!("{:.0} ({} / {})", w.rps, ms(w.p50_ms), ms(w.p99_ms));
        if w.errors > 0 {
            let _ = write!(s, " ⚠{} errors", w.errors);
        }
        s
    })
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => {
            if a / b >= 10.0 {
                format!("{:.0}×", a / b)
            } else {
                format!("{:.2}×", a / b)
            }
        }
        _ => "n/a".into(),
    }
}

fn pct(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.0} %", 100.0 * a / b),
        _ => "n/a".into(),
    }
}

/// ceil(listeners in the project / page size) + 1 per API: the bound of a full refresh when every ELB is
/// annotated (pages of 500 on v2, 2000 on v3).
fn refresh_bound(r: &Row) -> (usize, usize) {
    let per_elb = r.listeners / r.elbs.max(1);
    let v2 = r.shared * per_elb;
    let v3 = r.listeners - v2;
    let bound = |n: usize, page: usize| if n == 0 { 0 } else { n.div_ceil(page) + 1 };
    (bound(v2, 500), bound(v3, 2000))
}

fn inventory_table(t: &mut String, rows: &[Row]) {
    let _ = writeln!(
        t,
        "#### Cold start and inventory (realistic fixture, default configuration)\n"
    );
    let _ = writeln!(
        t,
        "| listeners (ELBs: shared / dedicated) | start → ready | start → all series | ELB calls to ready: v2 / v3 | ELB calls per refresh: v2 / v3 (bound) | refresh: first → last call | new Service during the refresh → listener_info / first series |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|---|");
    for r in rows
        .iter()
        .filter(|r| r.fixture == Some(Fixture::Realistic))
    {
        let (b2, b3) = refresh_bound(r);
        let _ = writeln!(
            t,
            "| {} ({} / {}) | {:.2} s | {} | {} / {} | {} ({b2} / {b3}) | {} | {} / {}{} |",
            r.listeners,
            r.shared,
            r.elbs - r.shared,
            r.ready_s,
            secs(r.all_series_s),
            r.elb_ready.0,
            r.elb_ready.1,
            r.elb_refresh
                .map_or("n/a".into(), |(a, b)| format!("{a} / {b}")),
            secs(r.refresh_s),
            secs(r.refresh_new_info_s),
            secs(r.refresh_new_series_s),
            match r.refresh_running {
                Some(true) => "",
                Some(false) => " (the refresh had ended)",
                None => " (n/a)",
            },
        );
    }
    t.push('\n');
}

fn tables(rows: &[Row]) -> String {
    let mut t = String::new();
    inventory_table(&mut t, rows);
    let _ = writeln!(t, "#### Collection\n");
    let _ = writeln!(
        t,
        "| listeners (Services = ELBs), fixture | series | ELB API calls to ready | CES calls / cycle: first (min) / steady (min) | metrics / call: first / steady | cycle time: first / steady | start → ready | CPU / steady cycle | new Service → listener_info / first series |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let steady_calls = r.ces_steady.map_or("n/a".into(), |c| c.to_string());
        let _ = writeln!(
            t,
            "| {} ({}), {} | {} | {} | {} ({}) / {} ({}) | {:.1} / {} | {} / {} | {:.2} s | {} | {} / {} |",
            r.listeners,
            r.elbs,
            r.fixture.map_or("", Fixture::name),
            r.series,
            r.elb_calls,
            r.ces_first,
            r.ces_min,
            steady_calls,
            r.ces_steady_min,
            r.mpc_first,
            r.mpc_steady.map_or("n/a".into(), |m| format!("{m:.1}")),
            secs(r.cycle_first_s),
            secs(r.cycle_steady_s),
            r.ready_s,
            r.cpu_per_cycle_s
                .map_or("n/a".into(), |c| format!("{c:.2} s")),
            secs(r.new_info_s),
            secs(r.new_series_s),
        );
    }
    let _ = writeln!(
        t,
        "\n#### `/metrics`, one scraper (sequential keep-alive GETs; p50 / p99 in ms)\n"
    );
    let _ = writeln!(
        t,
        "| listeners | body plain / gzip | exporter plain | nginx plain | exporter gzip | nginx gzip | requests per case |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|---|");
    for r in rows {
        let _ = writeln!(
            t,
            "| {} | {} / {} | {} | {} | {} | {} | {} |",
            r.listeners,
            size(r.body_plain),
            size(r.body_gzip),
            lat(&r.exp_plain.one),
            lat(&r.ngx_plain.one),
            lat(&r.exp_gzip.one),
            lat(&r.ngx_gzip.one),
            r.exp_plain.one.map_or(0, |l| l.n),
        );
    }
    let _ = writeln!(
        t,
        "\n#### `/metrics`, 50 concurrent scrapers (`wrk -t2 -c50 --latency`; requests/s (p50 / p99 ms))\n"
    );
    let _ = writeln!(
        t,
        "| listeners | exporter plain | nginx plain | exporter / nginx plain: req/s, p99 | exporter gzip | nginx gzip | exporter / nginx gzip: req/s, p99 |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|---|");
    for r in rows {
        let rps = |s: &Side| s.wrk.map(|w| w.rps);
        let p99 = |s: &Side| s.wrk.map(|w| w.p99_ms);
        let _ = writeln!(
            t,
            "| {} | {} | {} | {}, {} | {} | {} | {}, {} |",
            r.listeners,
            wrk_cell(&r.exp_plain.wrk),
            wrk_cell(&r.ngx_plain.wrk),
            pct(rps(&r.exp_plain), rps(&r.ngx_plain)),
            ratio(p99(&r.exp_plain), p99(&r.ngx_plain)),
            wrk_cell(&r.exp_gzip.wrk),
            wrk_cell(&r.ngx_gzip.wrk),
            pct(rps(&r.exp_gzip), rps(&r.ngx_gzip)),
            ratio(p99(&r.exp_gzip), p99(&r.ngx_gzip)),
        );
    }
    let _ = writeln!(
        t,
        "\n#### Memory, and the naive design (render per scrape with `GaugeVec` + `TextEncoder`)\n"
    );
    let _ = writeln!(
        t,
        "| listeners | exporter peak RSS (VmHWM) | RSS at end | peak RSS by phase (sampled every 10 ms) | naive gather + encode (median) | exporter one-scraper p50 | naive ÷ exporter | naive + gzip per scrape | exporter gzip p50 | naive ÷ exporter, gzip |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let kib =
            |k: Option<u64>| k.map_or("n/a".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
        let np = r.naive.as_ref().map(|n| n.plain_ms);
        let ng = r.naive.as_ref().map(|n| n.gzip_ms);
        let ep = r.exp_plain.one.map(|l| l.p50_ms);
        let eg = r.exp_gzip.one.map(|l| l.p50_ms);
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} ms | {} ms | {} | {} ms | {} ms | {} |",
            r.listeners,
            kib(r.peak_rss_kib),
            kib(r.rss_kib),
            r.rss_phases
                .iter()
                .map(|(n, k)| format!("{n} {:.0}", *k as f64 / 1024.0))
                .collect::<Vec<_>>()
                .join(", ")
                + " MiB",
            np.map_or("n/a".into(), ms),
            ep.map_or("n/a".into(), ms),
            ratio(np, ep),
            ng.map_or("n/a".into(), ms),
            eg.map_or("n/a".into(), ms),
            ratio(ng, eg),
        );
    }
    t
}

fn describe_run(opts: &BenchOpts, rows: &[Row], elapsed: Duration) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let version = |bin: &Option<PathBuf>, arg: &str| {
        bin.as_ref().map_or("not found".to_string(), |b| {
            Command::new(b)
                .arg(arg)
                .output()
                .ok()
                .map(|o| {
                    let s = format!(
                        "{}{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    );
                    s.lines().next().unwrap_or("").trim().to_string()
                })
                .unwrap_or_default()
        })
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Run: {cores} cores ({cpu}); exporter `{}`; {}; {}; {} fixture; sim CES latency {} ms; cloud.max_concurrency {}; \
         collection.interval {}; wrk {} s per case; total {:.0} s.\n",
        opts.exporter.display(),
        version(&opts.wrk, "--version"),
        version(&opts.nginx, "-v"),
        opts.fixture.name(),
        CES_LATENCY.as_millis(),
        opts.concurrency
            .map_or("default (4)".into(), |c| c.to_string()),
        rows.iter()
            .map(|r| format!("{} s at {}", r.interval_s, r.listeners))
            .collect::<Vec<_>>()
            .join(", "),
        opts.wrk_secs,
        elapsed.as_secs_f64()
    );
    let _ = writeln!(
        s,
        "Load average (1 min) at start / end of each size: {}.\n",
        rows.iter()
            .map(|r| format!("{}: {:.2} / {:.2}", r.listeners, r.load.0, r.load.1))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for r in rows {
        if r.steady_cycle_no > 2 {
            let _ = writeln!(
                s,
                "Note: at {} listeners cycle 2 ran during the scrape measurements; the steady cycle is cycle {}.\n",
                r.listeners, r.steady_cycle_no
            );
        }
        if let Some(n) = &r.naive {
            let _ = writeln!(
                s,
                "Naive at {}: {} series registered, {} encoded per scrape, median of {} runs.",
                r.listeners,
                n.series,
                size(n.bytes),
                n.runs
            );
        }
    }
    s
}

fn main() -> Result<()> {
    let opts = BenchOpts::parse()?;
    if !opts.exporter.is_file() {
        bail!(
            "exporter binary {} not found: run `cargo build --release` or pass --exporter PATH",
            opts.exporter.display()
        );
    }
    if opts.wrk.is_none() {
        eprintln!("wrk not found (apt-get install -y wrk): the 50-scraper columns will read n/a");
    }
    if opts.nginx.is_none() {
        eprintln!(
            "nginx not found (apt-get install -y nginx-light): the nginx columns will read n/a"
        );
    }
    let clk = clock_ticks_per_sec();
    let started = Instant::now();
    let mut rows = Vec::new();
    for &n in &opts.sizes {
        match bench_size(&opts, n, clk) {
            Ok(r) => rows.push(r),
            Err(e) => {
                eprintln!("[{n}] failed: {e:#}");
                return Err(e);
            }
        }
    }
    let mut out = describe_run(&opts, &rows, started.elapsed());
    out.push('\n');
    out.push_str(&tables(&rows));
    println!("\n{out}");
    if let Some(path) = &opts.out {
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(path, &out)?;
        eprintln!("tables written to {}", path.display());
    }
    Ok(())
}
