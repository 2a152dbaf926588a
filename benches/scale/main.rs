//! Scale benchmark (issue 6): the real `elb-exporter` binary (release build) against the in-process
//! simulated cloud (CES answers in ~50 ms) and fake Kubernetes API server, at 100, 1,000 and 10,000
//! listeners × 13 metrics; side by side in the same run with nginx serving the very same body as a static
//! file (the floor) and with the naive design (the `prometheus` crate's `GaugeVec` + `TextEncoder`
//! rendering every scrape). Prints Markdown tables, one row per size; see docs/PERFORMANCE.md.
//!
//! ```text
//! cargo bench --bench scale -- [--sizes 100,1000,10000] [--exporter PATH] [--wrk PATH] [--nginx PATH]
//!                              [--wrk-secs 10] [--concurrency 4] [--interval SECS] [--requests 200]
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
use elb_exporter::clock::now_ms;
use elb_exporter::demo::{config_for, service};
use elb_exporter::sim::cloud::{CloudSim, LbKind, SimApi, SimConfig, SimListener, SimRequest};
use elb_exporter::sim::kube::FakeApiServer;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod drivers;
mod http;
mod procstat;
mod report;

use drivers::{Exporter, Naive, Wrk, naive, run_wrk, start_nginx, tail};
use http::{Http, Lat, sequential};
use procstat::{RssSampler, clock_ticks_per_sec, loadavg, proc_stat_cpu_ticks, proc_status_kib};
use report::{describe_run, tables};

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
use elb_exporter::annotations::{ELB_CLASS as ELB_CLASS_ANNOTATION, ELB_ID as ELB_ID_ANNOTATION};
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

/// The options and the environment variables that stand for them, in `BenchOpts::parse`'s order.
const OPTIONS: [(&str, &str); 10] = [
    ("--sizes", "BENCH_SIZES"),
    ("--exporter", "ELB_EXPORTER_BIN"),
    ("--wrk", "WRK"),
    ("--nginx", "NGINX"),
    ("--wrk-secs", "BENCH_WRK_SECS"),
    ("--concurrency", "BENCH_CONCURRENCY"),
    ("--interval", "BENCH_INTERVAL_SECS"),
    ("--requests", "BENCH_REQUESTS"),
    ("--out", "BENCH_OUT"),
    ("--fixture", "BENCH_FIXTURE"),
];

/// Each option's raw value: the environment's, overridden by the command line (`--key value` or
/// `--key=value`; a positional argument, cargo bench's filter, is the sizes).
fn raw_options() -> Result<[Option<String>; 10]> {
    let mut raw = OPTIONS.map(|(_, env)| env_or(env));
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let (key, inline) = match a.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (a.clone(), None),
        };
        let slot = match key.as_str() {
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
            k => match OPTIONS.iter().position(|(o, _)| *o == k) {
                Some(i) => i,
                None if k.starts_with('-') => bail!("unknown option {k} (see --help)"),
                None => {
                    raw[0] = Some(a.clone());
                    continue;
                }
            },
        };
        raw[slot] = Some(match inline {
            Some(v) => v,
            None => args.next().ok_or_else(|| anyhow!("{key} needs a value"))?,
        });
    }
    Ok(raw)
}

impl BenchOpts {
    fn parse() -> Result<BenchOpts> {
        let [
            sizes,
            exporter,
            wrk,
            nginx,
            wrk_secs,
            concurrency,
            interval,
            requests,
            out,
            fixture,
        ] = raw_options()?;
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
    only_ids(r, "loadbalancer_id=", skip)
}

/// Does the query name ELBs (`key` parameters), every one of them in `skip`?
fn only_ids(r: &SimRequest, key: &str, skip: &[&str]) -> bool {
    let named = r.query.matches(key).count();
    named > 0 && named == skip.iter().filter(|s| r.query.contains(*s)).count()
}

/// ELB listener listing calls in the log: (v2, v3), leaving out lookups of only the `skip` ELBs (new
/// Services'). Load balancer listings (the ELB names) are not listener listings: not counted here.
fn elb_calls(reqs: &[SimRequest], skip: &[&str]) -> (usize, usize) {
    elb_listings(reqs, "/listeners", "loadbalancer_id=", skip)
}

/// ELB load balancer listings (the ELB names, `discovery::names`) in the log: (v2, v3), leaving out
/// listings by `id` of only the `skip` ELBs (new Services'). Counted apart from the listener listings:
/// their bound is their own (floor(load balancers of the API / page size) + 1 per refresh).
fn name_calls(reqs: &[SimRequest], skip: &[&str]) -> (usize, usize) {
    elb_listings(reqs, "/loadbalancers", "id=", skip)
}

/// ELB requests whose path ends with `resource`: (v2, v3), leaving out those whose `key` parameters
/// name only `skip` ELBs.
fn elb_listings(reqs: &[SimRequest], resource: &str, key: &str, skip: &[&str]) -> (usize, usize) {
    let mut n = (0, 0);
    for r in reqs {
        if only_ids(r, key, skip) || !r.path.ends_with(resource) {
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
    /// Load balancer (name) listings to ready, (v2, v3).
    names_ready: (usize, usize),
    /// The first periodic refresh: calls (v2, v3) and first → last call.
    elb_refresh: Option<(usize, usize)>,
    /// Load balancer (name) listings from the refresh's start until ELB calls are quiet, (v2, v3), and
    /// those naming only the new Services' ELBs over the whole run.
    names_refresh: Option<(usize, usize)>,
    names_new: Option<usize>,
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
    let mut row = new_row(opts, listeners, interval);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let sim = CloudSim::new(sim_config(opts.fixture));
    let cluster = FakeApiServer::new();
    (row.elbs, row.shared) = seed(&sim, &cluster, listeners, opts.fixture);
    let dir = tempfile::tempdir()?;
    let (cfg, kubeconfig) = serve(
        &rt,
        &sim,
        &cluster,
        dir.path(),
        &opts.extra_config(interval),
    )?;

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
    wait_ready(&mut exp, &mut http, started)?;
    row.ready_s = started.elapsed().as_secs_f64();
    row.all_series_s = wait_all_series(&mut exp, &mut http, started, listeners * METRICS)?;
    rss.mark("scrapes");
    let first_ces_ms = first_cycle(&sim, &exp, &mut http, &mut row, &tag)?;

    let plain = scrapes(opts, &exp, &mut http, &mut rss, &mut row, &tag)?;
    exp.check_alive()?;

    // A new annotated Service on a new ELB: its listener_info, then its first cloud series.
    rss.mark("new Service");
    let new_elb = new_service(&sim, &cluster, &exp, &mut http, &mut row);
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

    let k = wait_for_cycle(first_ces_ms, interval, &mut rss, &tag);
    row.steady_cycle_no = k as u64;
    rss.mark("cycle");
    exp.check_alive()?;
    steady_cycle(&sim, &exp, &mut http, &mut row, clk, interval, &tag)?;
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
    row.naive = naive_figures(plain, &tag);
    Ok(row)
}

/// The naive design on the same data (the exporter is stopped: the bench process has the CPU).
fn naive_figures(plain: Vec<u8>, tag: &str) -> Option<Naive> {
    eprintln!("{tag} naive design: GaugeVec + TextEncoder per scrape");
    let text = String::from_utf8_lossy(&plain).into_owned();
    drop(plain);
    match naive(&text) {
        Ok(n) => Some(n),
        Err(e) => {
            eprintln!("{tag} naive: {e:#}");
            None
        }
    }
}

/// A size's row before measuring: its parameters and the CES call minimums.
fn new_row(opts: &BenchOpts, listeners: usize, interval: u64) -> Row {
    Row {
        listeners,
        interval_s: interval,
        ces_min: (listeners * METRICS).div_ceil(BATCH),
        ces_steady_min: ((listeners + 1 + usize::from(opts.fixture == Fixture::Realistic))
            * METRICS)
            .div_ceil(BATCH),
        fixture: Some(opts.fixture),
        load: (loadavg(), 0.0),
        ..Row::default()
    }
}

fn sim_config(fixture: Fixture) -> SimConfig {
    SimConfig {
        ces_latency: CES_LATENCY,
        // The legacy fixture lifted every limit; the realistic one keeps the simulator's (500 per minute,
        // above the exporter's default 300).
        ces_calls_per_minute: match fixture {
            Fixture::Legacy => 100_000,
            Fixture::Realistic => SimConfig::default().ces_calls_per_minute,
        },
        ..SimConfig::default()
    }
}

/// Serves the simulators on loopback; writes the exporter's config and kubeconfig into `dir`.
fn serve(
    rt: &tokio::runtime::Runtime,
    sim: &CloudSim,
    cluster: &FakeApiServer,
    dir: &Path,
    extra: &str,
) -> Result<(PathBuf, PathBuf)> {
    let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
    let sim_addr = rt.block_on(sim.serve(loopback))?;
    rt.block_on(cluster.serve(loopback))?;
    let cfg = dir.join("clouds.yml");
    std::fs::write(&cfg, config_for(sim, &format!("http://{sim_addr}"), extra))?;
    let kubeconfig = dir.join("kubeconfig");
    cluster.write_kubeconfig(&kubeconfig)?;
    Ok((cfg, kubeconfig))
}

/// Waits (15 min at most) until /readyz answers 200.
fn wait_ready(exp: &mut Exporter, http: &mut Http, started: Instant) -> Result<()> {
    let deadline = started + Duration::from_secs(900);
    loop {
        exp.check_alive()?;
        if let Ok(200) = http.get("/readyz", false) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "exporter not ready after 15 min; log:\n{}",
                tail(&exp.log, 30)
            );
        }
        std::thread::sleep(POLL);
    }
}

/// Start → every series (`want` cloud series), in seconds; usually the first cycle, which readiness
/// waits for, has them all.
fn wait_all_series(
    exp: &mut Exporter,
    http: &mut Http,
    started: Instant,
    want: usize,
) -> Result<Option<f64>> {
    while started.elapsed() < Duration::from_secs(900) {
        let n = exp
            .scrape(http)
            .map(|b| b.lines().filter(|l| l.starts_with(PREFIX)).count())
            .unwrap_or(0);
        if n >= want {
            return Ok(Some(started.elapsed().as_secs_f64()));
        }
        exp.check_alive()?;
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(None)
}

/// The first cycle's figures: series, its duration, ELB and CES calls; returns its first CES call's time.
fn first_cycle(
    sim: &CloudSim,
    exp: &Exporter,
    http: &mut Http,
    row: &mut Row,
    tag: &str,
) -> Result<i64> {
    let body = exp.scrape(http)?;
    row.cycle_first_s = sample(&body, "elb_exporter_collection_duration_seconds");
    row.series = body.lines().filter(|l| l.starts_with(PREFIX)).count();
    let reqs = sim.requests();
    row.elb_ready = elb_calls(&reqs, &[]);
    row.names_ready = name_calls(&reqs, &[]);
    row.elb_calls = row.elb_ready.0 + row.elb_ready.1;
    let ces: Vec<&SimRequest> = reqs.iter().filter(|r| r.api == SimApi::Ces).collect();
    row.ces_first = ces.len();
    row.mpc_first =
        ces.iter().map(|r| r.ces_metrics).sum::<usize>() as f64 / ces.len().max(1) as f64;
    let first_ces_ms = ces.iter().map(|r| r.time_ms).min().unwrap_or_else(now_ms);
    if row.series != row.listeners * METRICS {
        eprintln!(
            "{tag} warning: {} cloud series exported, expected {}",
            row.series,
            row.listeners * METRICS
        );
    }
    eprintln!(
        "{tag} ready in {:.2}s; first cycle {:?}s, {} CES calls (min {}), {} ELB listener calls, {:?} ELB name listings (v2, v3)",
        row.ready_s, row.cycle_first_s, row.ces_first, row.ces_min, row.elb_calls, row.names_ready
    );
    Ok(first_ces_ms)
}

/// The bodies byte for byte as served, then one scraper and 50 (wrk), exporter and nginx on the same
/// bytes; returns the plain body.
fn scrapes(
    opts: &BenchOpts,
    exp: &Exporter,
    http: &mut Http,
    rss: &mut RssSampler,
    row: &mut Row,
    tag: &str,
) -> Result<Vec<u8>> {
    http.get(&exp.path, false)?;
    let plain = http.body().to_vec();
    http.get(&exp.path, true)?;
    let gzip = http.body().to_vec();
    row.body_plain = plain.len();
    row.body_gzip = gzip.len();

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
    Ok(plain)
}

/// Applies a new annotated Service on a new ELB and times its listener_info and first cloud series
/// (60 s at most); returns the new ELB's id.
fn new_service(
    sim: &CloudSim,
    cluster: &FakeApiServer,
    exp: &Exporter,
    http: &mut Http,
    row: &mut Row,
) -> String {
    let new_elb = elb_id(900_000);
    sim.add_loadbalancer(&new_elb, LbKind::Dedicated);
    sim.add_listener(
        &new_elb,
        SimListener::new(listener_id(900_000, 0), "k8s_TCP_80", "TCP", 80),
    );
    (row.new_info_s, row.new_series_s) =
        time_new_service(cluster, exp, http, NEW_NS, &new_elb, "performance");
    new_elb
}

/// Applies Service `<ns>/new-svc` (annotated with `elb` and `class`, port 80) and times, from then on,
/// its listener_info and its first cloud series (60 s at most).
fn time_new_service(
    cluster: &FakeApiServer,
    exp: &Exporter,
    http: &mut Http,
    ns: &str,
    elb: &str,
    class: &str,
) -> (Option<f64>, Option<f64>) {
    let info_needle = format!("elb_exporter_listener_info{{namespace=\"{ns}\",");
    let (mut info, mut series) = (None, None);
    let t0 = Instant::now();
    cluster.apply(service(
        ns,
        NEW_SVC,
        &[(ELB_ID_ANNOTATION, elb), (ELB_CLASS_ANNOTATION, class)],
        &[80],
    ));
    while t0.elapsed() < Duration::from_secs(60) {
        if let Ok(b) = exp.scrape(http) {
            if info.is_none() && b.contains(&info_needle) {
                info = Some(t0.elapsed().as_secs_f64());
            }
            if has_cloud_series(&b, ns) {
                series = Some(t0.elapsed().as_secs_f64());
                info.get_or_insert(t0.elapsed().as_secs_f64());
                break;
            }
        }
        std::thread::sleep(POLL);
    }
    (info, series)
}

/// Waits until no ELB listing call, listeners or names (but lookups of the `skip` ELBs), arrived for 5 s
/// (120 s at most): the refresh is over.
fn wait_quiet(sim: &CloudSim, skip: &[&str]) {
    let count = |reqs: &[SimRequest]| (elb_calls(reqs, skip), name_calls(reqs, skip));
    let mut last = count(&sim.requests());
    let mut quiet_since = Instant::now();
    let quiet_deadline = Instant::now() + Duration::from_secs(120);
    while quiet_since.elapsed() < Duration::from_secs(5) && Instant::now() < quiet_deadline {
        std::thread::sleep(Duration::from_millis(200));
        let now = count(&sim.requests());
        if now != last {
            last = now;
            quiet_since = Instant::now();
        }
    }
}

/// Sleeps until shortly before the next full cycle that starts after now, so that its CPU is measured
/// with the exporter otherwise idle; returns its number. Cycle k starts about (k-1) intervals after
/// the first cycle's first CES call.
fn wait_for_cycle(first_ces_ms: i64, interval: u64, rss: &mut RssSampler, tag: &str) -> i64 {
    let interval_ms = interval as i64 * 1000;
    let mut k: i64 = 2;
    while first_ces_ms + (k - 1) * interval_ms - 1500 <= now_ms() && k < 100 {
        k += 1;
    }
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
    k
}

/// Collections so far (successful and failed), from a body.
fn collections(body: &str) -> f64 {
    sample(body, "elb_exporter_collections_total{result=\"success\"}").unwrap_or(0.0)
        + sample(body, "elb_exporter_collections_total{result=\"failure\"}").unwrap_or(0.0)
}

/// The exporter's CPU ticks once they stop moving (five 100 ms samples alike, 60 s at most).
fn settled_cpu_ticks(pid: u32) -> Option<u64> {
    let mut last = proc_stat_cpu_ticks(pid);
    let mut still = 0;
    let settle_deadline = Instant::now() + Duration::from_secs(60);
    while still < 5 && Instant::now() < settle_deadline {
        std::thread::sleep(Duration::from_millis(100));
        let now = proc_stat_cpu_ticks(pid);
        if now == last {
            still += 1;
        } else {
            still = 0;
            last = now;
        }
    }
    last
}

/// One steady-state cycle: its duration, CES calls, metrics per call and CPU time.
fn steady_cycle(
    sim: &CloudSim,
    exp: &Exporter,
    http: &mut Http,
    row: &mut Row,
    clk: f64,
    interval: u64,
    tag: &str,
) -> Result<()> {
    let collections_before = collections(&exp.scrape(http)?);
    // Let the scrape's own CPU settle before the baseline.
    std::thread::sleep(Duration::from_millis(200));
    let ces_before = ces_requests(sim).len();
    let cpu0 = proc_stat_cpu_ticks(exp.pid());
    let deadline = Instant::now() + Duration::from_secs(interval + 120);
    let mut ces_after = ces_before;
    while Instant::now() < deadline {
        ces_after = ces_requests(sim).len();
        if ces_after >= ces_before + row.ces_first.max(1) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // The cycle's last answers arrived; wait until the exporter's CPU time stops moving (render, gzip).
    let cpu1 = settled_cpu_ticks(exp.pid());
    let after_body = exp.scrape(http)?;
    let collections_after = collections(&after_body);
    if collections_after > collections_before {
        row.cycle_steady_s = sample(&after_body, "elb_exporter_collection_duration_seconds");
        let cycles = collections_after - collections_before;
        if let (Some(a), Some(b)) = (cpu0, cpu1) {
            row.cpu_per_cycle_s = Some((b - a) as f64 / clk / cycles);
        }
        let reqs = ces_requests(sim);
        let cyc = &reqs[ces_before.min(reqs.len())..];
        row.ces_steady = Some(cyc.len());
        row.mpc_steady =
            Some(cyc.iter().map(|r| r.ces_metrics).sum::<usize>() as f64 / cyc.len().max(1) as f64);
    } else {
        eprintln!("{tag} warning: no full cycle observed (CES calls {ces_before} → {ces_after})");
    }
    Ok(())
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
    let is_refresh_call = |r: &SimRequest| {
        matches!(r.api, SimApi::ElbV2 | SimApi::ElbV3)
            && r.path.ends_with("/listeners")
            && !only_names(r, &skip)
    };
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
    (row.refresh_new_info_s, row.refresh_new_series_s) =
        time_new_service(cluster, exp, http, NEW_NS_REFRESH, &refresh_elb, "union");
    wait_quiet(sim, &skip);
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
    row.names_refresh = Some(name_calls(&reqs[base..], &skip));
    let all_names = name_calls(&reqs, &[]);
    let named = name_calls(&reqs, &skip);
    row.names_new = Some(all_names.0 + all_names.1 - named.0 - named.1);
    row.refresh_s = last_ms.map(|l| (l - refresh_started) as f64 / 1000.0);
    row.refresh_running = match (lookup_ms, last_ms) {
        (Some(a), Some(b)) => Some(a < b),
        _ => None,
    };
    eprintln!(
        "{tag} refresh: {:?} ELB listener calls (v2, v3) over {:?}s, {:?} name listings; new Service during it: listener_info {:?}s, first series {:?}s (lookup before the refresh's last call: {:?})",
        row.elb_refresh,
        row.refresh_s,
        row.names_refresh,
        row.refresh_new_info_s,
        row.refresh_new_series_s,
        row.refresh_running
    );
    Ok(())
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
