//! High availability, measured: two real `elb-exporter` processes elect one collector through a Lease on
//! the fake apiserver, against the simulated cloud. Prints the figures; asserts the issue's bounds.
//!
//! `two_replicas_collect_once_and_fail_over_fast` (CI) uses short settings to stay fast: 20 listeners,
//! interval 1 s, lease 3 s, renew deadline 2 s, retry 200 ms. `measure_1000_listeners_default_timings`
//! (`#[ignore]`d, about 10 minutes) is the issue's measurement: 1,000 listeners, the shipped defaults
//! (interval 60 s aligned, lease 15 s, renew deadline 10 s, retry 2 s), each signal sent right after a cycle
//! start and late in the interval:
//!
//! ```sh
//! cargo test --release --test ha measure_1000 -- --ignored --nocapture
//! ```
//!
//! `a_successor_serves_the_mirrored_series_from_its_takeover` (CI) shows the warm copy at a 10 s interval.
//! In all, the new leader serves the series it mirrored as a follower from its takeover, and its own
//! first cycle starts at the later of its takeover and the previous leader's last
//! cycle start + interval, so that no interval is collected twice (docs/PERFORMANCE.md, *High
//! availability*, decomposes the failover times).

mod common;

use common::*;
use elb_exporter::demo::service;
use elb_exporter::leader::{LAST_CYCLE_ANNOTATION, Record, record_of};
use elb_exporter::sim::cloud::{LbKind, SimApi, SimConfig, SimListener};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NS: &str = "monitoring";

/// The failover times are the figures here: the tests of this file run one at a time, so two pairs of
/// exporters (plus simulators and apiservers) never share the 2-core machine's CPU.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const LEASE_NAME: &str = "elb-exporter";
const CLOUD_PREFIX: &str = "huaweicloud_sys_elb_listener_";
const METRICS: usize = 13;

/// The CI configuration: 20 listeners x 13 default metrics = 260 series; batches of 100 -> 3 CES calls.
const SMALL: Shape = Shape {
    elbs: 4,
    per_elb: 5,
    batch: 100,
    extra: "collection:\n  interval: \"1s\"\nleader_election:\n  enabled: true\n  lease_namespace: \"monitoring\"\n  lease_duration: \"3s\"\n  renew_deadline: \"2s\"\n  retry_period: \"200ms\"\n",
};
const INTERVAL: Duration = Duration::from_secs(1);
const LEASE: Duration = Duration::from_secs(3);
const RENEW_DEADLINE: Duration = Duration::from_secs(2);
const RETRY: Duration = Duration::from_millis(200);

/// The issue's measurement: 1,000 listeners x 13 = 13,000 series; batches of 500 (the default) -> 26 CES
/// calls. Everything else is the shipped default (interval 60 s, align on, lease 15 s / 10 s / 2 s).
const LARGE: Shape = Shape {
    elbs: 50,
    per_elb: 20,
    batch: 500,
    extra: "leader_election:\n  enabled: true\n  lease_namespace: \"monitoring\"\n",
};
const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);
const DEFAULT_LEASE: Duration = Duration::from_secs(15);
const DEFAULT_RETRY: Duration = Duration::from_secs(2);

/// A fixture's size and configuration.
struct Shape {
    elbs: usize,
    per_elb: usize,
    /// `global.scrape_batch_size`.
    batch: usize,
    /// YAML appended to the config.
    extra: &'static str,
}

impl Shape {
    fn series(&self) -> usize {
        self.elbs * self.per_elb * METRICS
    }

    /// The single-replica minimum: CES calls of one full cycle.
    fn calls_per_cycle(&self) -> usize {
        self.series().div_ceil(self.batch)
    }
}

fn elb(i: usize) -> String {
    format!("e{i:07}-0000-4000-8000-000000000000")
}

async fn fixture(sim: SimConfig, shape: &Shape) -> World {
    let w = World::start(sim).await;
    for e in 0..shape.elbs {
        w.sim.add_loadbalancer(&elb(e), LbKind::Dedicated);
        let ports: Vec<i32> = (0..shape.per_elb).map(|p| 8000 + p as i32).collect();
        for (p, port) in ports.iter().enumerate() {
            let id = format!("1{e:03}{p:04}-0000-4000-8000-000000000000");
            w.sim.add_listener(
                &elb(e),
                SimListener::new(id, format!("k8s_TCP_{port}"), "TCP", *port as u16),
            );
        }
        w.cluster.apply(service(
            "default",
            &format!("app{e}"),
            &[("kubernetes.io/elb.id", &elb(e))],
            &ports,
        ));
    }
    w
}

/// Writes the config and a kubeconfig of its own for replica `name`, whose requests the fake apiserver
/// can then refuse by the token `name`.
fn files(w: &World, shape: &Shape, name: &str) -> (PathBuf, PathBuf) {
    let (cfg, _) = w.write_config(shape.extra);
    let text = std::fs::read_to_string(&cfg).expect("config").replace(
        "  prefix: \"huaweicloud\"\n",
        &format!(
            "  prefix: \"huaweicloud\"\n  scrape_batch_size: {}\n",
            shape.batch
        ),
    );
    let cfg_own = w.dir.path().join(format!("{name}.yml"));
    std::fs::write(&cfg_own, text).expect("write config");
    let kubeconfig = w.dir.path().join(format!("{name}.kubeconfig"));
    w.cluster
        .write_kubeconfig_as(&kubeconfig, name)
        .expect("kubeconfig");
    (cfg_own, kubeconfig)
}

fn spawn(w: &World, shape: &Shape, name: &str) -> Replica {
    let (cfg, kubeconfig) = files(w, shape, name);
    let exporter = Exporter::spawn_env(
        Command::new(BIN)
            .arg("--config")
            .arg(&cfg)
            .arg("--listen")
            .arg("127.0.0.1:0"),
        &kubeconfig,
        &[("POD_NAME", name), ("RUST_LOG", "info,elb_exporter=debug")],
    );
    Replica {
        name: name.to_string(),
        exporter,
    }
}

fn cloud_series(body: &str) -> usize {
    body.lines().filter(|l| l.starts_with(CLOUD_PREFIX)).count()
}

/// Whether a body holds any cloud series (cheaper than counting them in a 13,000-series body).
fn exports_cloud(body: &str) -> bool {
    body.starts_with(CLOUD_PREFIX) || body.contains(&format!("\n{CLOUD_PREFIX}"))
}

fn holder(w: &World) -> Option<String> {
    w.cluster
        .lease(NS, LEASE_NAME)
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty())
}

/// The Lease as the protocol sees it.
fn lease_record(w: &World) -> Record {
    record_of(&w.cluster.lease(NS, LEASE_NAME).expect("lease"))
}

/// The leader's last cycle start (Unix ms) as recorded on the Lease.
fn recorded_cycle(w: &World) -> Option<i64> {
    w.cluster
        .lease(NS, LEASE_NAME)?
        .metadata
        .annotations?
        .get(LAST_CYCLE_ANNOTATION)?
        .parse()
        .ok()
}

/// One replica slot of the test: its name and process, replaced on restart.
struct Replica {
    name: String,
    exporter: Exporter,
}

/// Every 200 ms, both replicas are scraped at once; a tick where both serve cloud series is a double
/// export. Holds the URLs of the current processes and the count of ticks and of double ticks.
#[derive(Default)]
struct Scrapes {
    urls: [String; 2],
    ticks: usize,
    both: Vec<String>,
}

async fn scraper(state: Arc<Mutex<Scrapes>>, stop: Arc<AtomicBool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let urls = state.lock().unwrap().urls.clone();
        let (a, b) = tokio::join!(get(&urls[0]), get(&urls[1]));
        let mut s = state.lock().unwrap();
        s.ticks += 1;
        if exports_cloud(&a.1) && exports_cloud(&b.1) {
            s.both.push(format!(
                "{}: {}, {}: {}",
                urls[0],
                cloud_series(&a.1),
                urls[1],
                cloud_series(&b.1)
            ));
        }
    }
}

/// Starts scraping both replicas every 200 ms.
fn start_scraping(
    rs: &[Replica; 2],
) -> (
    Arc<Mutex<Scrapes>>,
    Arc<AtomicBool>,
    tokio::task::JoinHandle<()>,
) {
    let state = Arc::new(Mutex::new(Scrapes {
        urls: [
            rs[0].exporter.metrics_url.clone(),
            rs[1].exporter.metrics_url.clone(),
        ],
        ..Scrapes::default()
    }));
    let stop = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(scraper(state.clone(), stop.clone()));
    (state, stop, task)
}

/// Stops the scraper; asserts that no tick found both replicas exporting cloud series (the issue's
/// "never exported twice"); returns the ticks.
async fn stop_scraping(
    state: &Mutex<Scrapes>,
    stop: &AtomicBool,
    scraping: tokio::task::JoinHandle<()>,
) -> usize {
    stop.store(true, Ordering::Relaxed);
    scraping.await.expect("scraper");
    let s = state.lock().unwrap();
    println!(
        "scrapes of both replicas every 200 ms: {} ticks, {} with both exporting",
        s.ticks,
        s.both.len()
    );
    assert!(
        s.both.is_empty(),
        "both replicas exported cloud series: {:?}",
        s.both
    );
    s.ticks
}

/// Waits until `r` leads with all `series`; returns the time that took from `since`.
async fn complete(r: &Replica, series: usize, since: Instant, limit: Duration) -> Duration {
    let ok = wait_for_fast(limit, || async {
        cloud_series(&get(&r.exporter.metrics_url).await.1) == series
    })
    .await;
    assert!(
        ok,
        "{} did not export all {series} series within {limit:?}; log:\n{}",
        r.name,
        r.exporter.logs()
    );
    since.elapsed()
}

/// Like `wait_for`, polling every 20 ms (the failover times are the figure here).
async fn wait_for_fast<F, Fut>(limit: Duration, check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait_for_every(limit, Duration::from_millis(20), check).await
}

/// The leader's and the follower's index, once exactly one leads.
async fn roles(w: &World, rs: &[Replica; 2]) -> (usize, usize) {
    let mut found = None;
    let ok = wait_for(Duration::from_secs(30), || {
        let h = holder(w);
        let i = rs.iter().position(|r| Some(&r.name) == h.as_ref());
        found = i;
        async move { i.is_some() }
    })
    .await;
    assert!(ok, "no replica holds the lease");
    let l = found.unwrap();
    (l, 1 - l)
}

/// Waits until the Lease names `name` as holder; returns the time from `since`.
async fn takeover(w: &World, name: &str, since: Instant, limit: Duration) -> Duration {
    let ok = wait_for_fast(limit, || {
        let h = holder(w);
        async move { h.as_deref() == Some(name) }
    })
    .await;
    assert!(ok, "{name} did not take the lease within {limit:?}");
    since.elapsed()
}

/// What `check` prints about the Lease.
fn check_says_leader(w: &World, shape: &Shape, name: &str) {
    let (code, out, err) = w.run(shape.extra, &["check"]);
    assert!(
        out.contains(&format!("leader: {name} (lease monitoring/elb-exporter")),
        "check shows who leads ({name}; exit {code}):\n{out}\n{err}"
    );
    assert!(
        out.contains("warm copy for followers at http://127.0.0.1:"),
        "check shows where followers mirror the leader:\n{out}"
    );
}

fn signal(e: &Exporter, sig: i32) {
    // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped.
    let rc = unsafe { libc::kill(e.child.id() as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({sig})");
}

/// Replaces the replica in slot `i` by a new process under a new name (a new pod), scraped from now.
async fn replace(
    w: &World,
    shape: &Shape,
    rs: &mut [Replica; 2],
    i: usize,
    state: &Mutex<Scrapes>,
) {
    let name = format!("{}+", rs[i].name);
    rs[i] = spawn(w, shape, &name);
    state.lock().unwrap().urls[i] = rs[i].exporter.metrics_url.clone();
    rs[i].exporter.wait_ready().await;
}

/// CES calls from `from_ms` on, grouped into cycles: (first call's Unix ms, calls, metrics asked, last
/// call's Unix ms). Calls less than `gap_ms` after a group's first call belong to it.
fn cycles(w: &World, from_ms: i64, gap_ms: i64) -> Vec<(i64, usize, usize, i64)> {
    let mut groups: Vec<(i64, usize, usize, i64)> = Vec::new();
    for r in w
        .sim
        .requests()
        .into_iter()
        .filter(|r| matches!(r.api, SimApi::Ces) && r.time_ms >= from_ms)
    {
        match groups.last_mut() {
            Some((start, n, m, last)) if r.time_ms - *start < gap_ms => {
                *n += 1;
                *m += r.ces_metrics;
                *last = r.time_ms;
            }
            _ => groups.push((r.time_ms, 1, r.ces_metrics, r.time_ms)),
        }
    }
    groups
}

/// The first CES call at or after `from_ms` (Unix ms).
fn first_ces_call(w: &World, from_ms: i64) -> Option<i64> {
    w.sim
        .requests()
        .into_iter()
        .find(|r| matches!(r.api, SimApi::Ces) && r.time_ms >= from_ms)
        .map(|r| r.time_ms)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_collect_once_and_fail_over_fast() {
    let _one_at_a_time = SERIAL.lock().await;
    let shape = &SMALL;
    let series = shape.series();
    let w = fixture(SimConfig::default(), shape).await;
    let mut rs = [spawn(&w, shape, "exp-a"), spawn(&w, shape, "exp-b")];
    for r in &rs {
        r.exporter.wait_ready().await;
    }
    let (l, f) = roles(&w, &rs).await;
    complete(&rs[l], series, Instant::now(), Duration::from_secs(10)).await;
    let started_ms = now_ms();

    // The follower is ready and up, leads nothing and exports no cloud series.
    let body = rs[f].exporter.metrics().await;
    assert_eq!(sample(&body, "elb_exporter_leader "), Some(0.0), "{body}");
    assert_eq!(sample(&body, "elb_exporter_up "), Some(1.0), "{body}");
    assert_eq!(cloud_series(&body), 0);
    assert_eq!(rs[f].exporter.get("/readyz").await.0, 200);
    let lbody = rs[l].exporter.metrics().await;
    assert_eq!(sample(&lbody, "elb_exporter_leader "), Some(1.0));
    check_says_leader(&w, shape, &rs[l].name);

    let (state, stop, scraping) = start_scraping(&rs);
    tokio::time::sleep(4 * INTERVAL).await;

    // 1. SIGTERM: the leader releases the Lease; the follower takes over at its next try, long before
    // the Lease could expire (one lease duration after the last renewal, at most a retry period before
    // the signal).
    let (l, f) = roles(&w, &rs).await;
    let t0 = Instant::now();
    signal(&rs[l].exporter, libc::SIGTERM);
    let took = takeover(&w, &rs[f].name, t0, Duration::from_secs(10)).await;
    let sigterm = complete(&rs[f], series, t0, Duration::from_secs(10)).await;
    let exit = rs[l].exporter.child.wait().expect("wait");
    assert!(exit.success(), "graceful exit: {exit:?}");
    println!(
        "SIGTERM: lease taken after {took:?}, new leader's {series} series complete after {sigterm:?}"
    );
    assert!(
        rs[l].exporter.logs().contains("lease released"),
        "handed over by a release:\n{}",
        rs[l].exporter.logs()
    );
    assert!(
        took < LEASE - RETRY,
        "taken by expiry, not release: {took:?}"
    );
    // The issue's bound (at this interval the wait for the old leader's interval is at most 1 s).
    assert!(sigterm <= Duration::from_secs(3), "{sigterm:?}");
    replace(&w, shape, &mut rs, l, &state).await;
    tokio::time::sleep(3 * INTERVAL).await;

    // 2. SIGKILL: the Lease expires for the follower after the lease duration, counted from the last
    // renewal it saw: taken over no earlier than LEASE after the last renewal, and seen at most two
    // retry periods late; then at most one interval to the first complete cycle.
    let (l, f) = roles(&w, &rs).await;
    let t0 = Instant::now();
    signal(&rs[l].exporter, libc::SIGKILL);
    // A renewal in flight may still land: it only moves the bound later.
    let renewed = lease_record(&w).renew_ms.expect("renewed");
    let took = takeover(&w, &rs[f].name, t0, Duration::from_secs(15)).await;
    let acquired = lease_record(&w).acquire_ms.expect("acquired");
    let sigkill = complete(&rs[f], series, t0, Duration::from_secs(15)).await;
    println!(
        "SIGKILL: lease taken after {took:?}, new leader's {series} series complete after {sigkill:?} (bound: lease {LEASE:?} + 2 x retry {RETRY:?} + interval {INTERVAL:?})"
    );
    let after = acquired - renewed;
    println!(
        "SIGKILL: the successor acquired the Lease {after} ms after the last renewal (lease {LEASE:?})"
    );
    assert!(
        after >= LEASE.as_millis() as i64,
        "taken {after} ms after the last renewal, before the lease expired"
    );
    assert!(sigkill <= LEASE + 2 * RETRY + INTERVAL, "{sigkill:?}");
    replace(&w, shape, &mut rs, l, &state).await;
    tokio::time::sleep(3 * INTERVAL).await;

    // 3. The leader is cut off the apiserver: it drops its series at the renew deadline, before the
    // Lease expires for the follower, which then takes over.
    let (l, f) = roles(&w, &rs).await;
    let t0 = Instant::now();
    w.cluster.set_refused(&rs[l].name, true);
    let ok = wait_for_fast(LEASE + Duration::from_secs(2), || async {
        cloud_series(&get(&rs[l].exporter.metrics_url).await.1) == 0
    })
    .await;
    let dropped = t0.elapsed();
    assert!(ok, "a cut-off leader keeps exporting");
    let cutoff = complete(&rs[f], series, t0, Duration::from_secs(15)).await;
    println!(
        "cut off: old leader dropped its series after {dropped:?} (renew deadline {RENEW_DEADLINE:?}), new leader complete after {cutoff:?}"
    );
    // The safety property itself: gone before the lease can expire for the others, which is one
    // lease duration after its last renewal (at most one retry period before the cut).
    assert!(dropped < LEASE - RETRY, "{dropped:?}");
    let b = rs[l].exporter.metrics().await;
    assert_eq!(sample(&b, "elb_exporter_leader "), Some(0.0), "{b}");
    w.cluster.set_refused(&rs[l].name, false);
    tokio::time::sleep(3 * INTERVAL).await;
    let ticks = stop_scraping(&state, &stop, scraping).await;
    assert!(ticks > 50, "{ticks}");

    // CES calls: every whole cycle is the packed minimum, cycles are an interval apart across all three
    // handovers (a cycle cut by a kill may be partial, never doubled).
    let per_cycle = shape.calls_per_cycle();
    let groups = cycles(&w, started_ms, 400);
    // The first and last groups may be cut by the observation window.
    let whole = &groups[1..groups.len() - 1];
    let calls: usize = whole.iter().map(|g| g.1).sum();
    let span_ms = whole.last().unwrap().0 - whole[0].0;
    let intervals = span_ms as f64 / INTERVAL.as_millis() as f64 + 1.0;
    let min_gap = whole.windows(2).map(|p| p[1].0 - p[0].0).min().unwrap();
    println!(
        "CES: {calls} calls in {} cycles over {intervals:.1} intervals = {:.2} calls/interval (single-replica minimum {per_cycle}); closest cycle starts {min_gap} ms apart; per cycle {:?}",
        whole.len(),
        calls as f64 / intervals,
        whole.iter().map(|g| g.1).collect::<Vec<_>>()
    );
    assert!(whole.len() >= 10, "{groups:?}");
    assert!(whole.iter().all(|g| g.1 <= per_cycle), "{groups:?}");
    assert!(
        whole.iter().filter(|g| g.1 == per_cycle).count() >= whole.len() - 2,
        "only the cycles cut by SIGTERM/SIGKILL may be partial: {groups:?}"
    );
    assert!(
        min_gap >= 800,
        "a cycle started {min_gap} ms after another: {groups:?}"
    );
    assert!(calls as f64 / intervals <= per_cycle as f64, "{groups:?}");
    let lease = w
        .cluster
        .lease(NS, LEASE_NAME)
        .expect("lease")
        .spec
        .unwrap();
    println!("lease transitions: {:?}", lease.lease_transitions);
    assert!(lease.lease_transitions.unwrap_or(0) >= 3, "{lease:?}");
    // After three handovers `check` names the current holder (its CES probe is outside the counts).
    check_says_leader(&w, shape, &rs[f].name);
}

/// The warm handover at an interval long enough to matter (20 s; lease 3 s): the follower mirrors the
/// leader's series, so a successor serves them from its takeover, while its own first cycle still waits
/// for the old leader's last cycle start + interval. Signals go right after a cycle start, the worst
/// case without the copy (a gap of almost an interval).
const WARM: Shape = Shape {
    elbs: 4,
    per_elb: 5,
    batch: 100,
    extra: "collection:\n  interval: \"10s\"\nleader_election:\n  enabled: true\n  lease_namespace: \"monitoring\"\n  lease_duration: \"3s\"\n  renew_deadline: \"2s\"\n  retry_period: \"200ms\"\n",
};
const WARM_INTERVAL: Duration = Duration::from_secs(10);

/// Kills (or stops) the leader right after a cycle start and times the successor: Lease taken, series
/// complete from the copy, first own CES call. Returns the time to complete series.
async fn warm_handover(
    w: &World,
    rs: &mut [Replica; 2],
    sig: i32,
    state: &Mutex<Scrapes>,
) -> Duration {
    let shape = &WARM;
    let series = shape.series();
    let (l, f) = roles(w, rs).await;
    // The follower holds the leader's series before the signal.
    assert_mirrored_within(&rs[f], series, Duration::from_secs(10)).await;
    let tc = cycle_ahead_by(w, Duration::from_millis(500), WARM_INTERVAL).await;
    let wait = tc + 500 - now_ms();
    tokio::time::sleep(Duration::from_millis(wait.max(0) as u64)).await;
    let (t0, t0_ms) = (Instant::now(), now_ms());
    signal(&rs[l].exporter, sig);
    let took = takeover(w, &rs[f].name, t0, Duration::from_secs(10)).await;
    let done = complete(&rs[f], series, t0, Duration::from_secs(10)).await;
    let b = rs[f].exporter.metrics().await;
    assert_eq!(sample(&b, "elb_exporter_up "), Some(1.0), "{b}");
    let due = tc + WARM_INTERVAL.as_millis() as i64;
    let ok = wait_for(WARM_INTERVAL, || async {
        first_ces_call(w, t0_ms).is_some()
    })
    .await;
    assert!(ok, "the successor never called CES");
    let first = first_ces_call(w, t0_ms).unwrap();
    println!(
        "warm handover, signal {sig} {} ms after a cycle start: Lease taken {took:?}, {series} series complete {done:?} (from the copy), first own CES call {:.2} s (old start + interval {:.2} s)",
        t0_ms - tc,
        (first - t0_ms) as f64 / 1000.0,
        (due - t0_ms) as f64 / 1000.0
    );
    assert!(
        first >= due - 50,
        "collected the old leader's interval again"
    );
    if sig == libc::SIGKILL {
        assert!(rs[l].exporter.child.wait().is_ok());
    } else {
        assert!(rs[l].exporter.child.wait().expect("wait").success());
    }
    replace(w, shape, rs, l, state).await;
    done
}

/// The leader's container is killed and restarted at once under the same name (an OOM kill): the
/// restarted process waits out the Lease it no longer holds in memory, so the warm follower takes over and
/// serves its copy; the restarted one follows. Returns the time to complete series on the follower.
async fn restart_in_place(w: &World, rs: &mut [Replica; 2], state: &Mutex<Scrapes>) -> Duration {
    let shape = &WARM;
    let (l, f) = roles(w, rs).await;
    assert_mirrored_within(&rs[f], shape.series(), Duration::from_secs(10)).await;
    let t0 = Instant::now();
    signal(&rs[l].exporter, libc::SIGKILL);
    let _ = rs[l].exporter.child.wait();
    let name = rs[l].name.clone();
    rs[l] = spawn(w, shape, &name);
    state.lock().unwrap().urls[l] = rs[l].exporter.metrics_url.clone();
    let took = takeover(w, &rs[f].name, t0, Duration::from_secs(10)).await;
    let done = complete(&rs[f], shape.series(), t0, Duration::from_secs(10)).await;
    rs[l].exporter.wait_ready().await;
    let b = rs[l].exporter.metrics().await;
    assert_eq!(
        sample(&b, "elb_exporter_leader "),
        Some(0.0),
        "the restarted one follows: {b}"
    );
    println!(
        "leader killed and restarted as {name}: the warm follower took the Lease after {took:?}, series complete after {done:?}"
    );
    done
}

/// Both handovers right after a cycle start: without the copy the successor would serve nothing until
/// the old leader's start + 10 s; with it, series are complete once the Lease is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_serves_the_mirrored_series_from_its_takeover() {
    let _one_at_a_time = SERIAL.lock().await;
    let shape = &WARM;
    let w = fixture(SimConfig::default(), shape).await;
    let mut rs = [spawn(&w, shape, "warm-a"), spawn(&w, shape, "warm-b")];
    for r in &rs {
        r.exporter.wait_ready().await;
    }
    let (l, _) = roles(&w, &rs).await;
    complete(
        &rs[l],
        shape.series(),
        Instant::now(),
        Duration::from_secs(10),
    )
    .await;
    let (state, stop, scraping) = start_scraping(&rs);
    let sigterm = warm_handover(&w, &mut rs, libc::SIGTERM, &state).await;
    assert!(sigterm <= Duration::from_secs(3), "SIGTERM: {sigterm:?}");
    let sigkill = warm_handover(&w, &mut rs, libc::SIGKILL, &state).await;
    assert!(
        sigkill <= LEASE + 2 * RETRY + Duration::from_secs(1),
        "SIGKILL: {sigkill:?}"
    );
    let restarted = restart_in_place(&w, &mut rs, &state).await;
    assert!(
        restarted <= LEASE + 2 * RETRY + Duration::from_secs(1),
        "restart: {restarted:?}"
    );
    let ticks = stop_scraping(&state, &stop, scraping).await;
    // About 30 s of scraping every 200 ms: a scraper that hardly ran proves nothing.
    assert!(ticks > 50, "{ticks}");
}

/// A recorded cycle start `tc` (Unix ms) with `tc + phase` still at least 200 ms ahead: the current one
/// if there is time, else the next.
async fn cycle_ahead(w: &World, phase: Duration) -> i64 {
    cycle_ahead_by(w, phase, DEFAULT_INTERVAL).await
}

/// [`cycle_ahead`] at `interval`.
async fn cycle_ahead_by(w: &World, phase: Duration, interval: Duration) -> i64 {
    let deadline = Instant::now() + 3 * interval;
    let phase_ms = phase.as_millis() as i64;
    while Instant::now() < deadline {
        match recorded_cycle(w) {
            Some(tc) if now_ms() + 200 < tc + phase_ms => return tc,
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    panic!("no cycle start recorded on the Lease in {:?}", 3 * interval);
}

/// One handover of the measurement, in seconds from the signal.
struct Handover {
    what: &'static str,
    /// When the signal went out, after the old leader's last cycle start.
    phase: f64,
    /// The old leader's last renewal on the Lease (before the signal: negative).
    renewed: f64,
    /// The successor's acquireTime on the Lease.
    acquired: f64,
    /// The Lease names the successor.
    taken: f64,
    /// The old leader's last cycle start + interval: the successor's earliest first cycle.
    due: f64,
    /// The successor's first CES call.
    first_call: f64,
    /// All its series are on its /metrics (from the warm copy, then its own cycles).
    complete: f64,
    /// Its own first cycle succeeded (`elb_exporter_last_collection_success_timestamp_seconds`).
    own: f64,
}

/// Waits until the follower holds a warm copy of all `series`.
async fn assert_mirrored(r: &Replica, series: usize) {
    assert_mirrored_within(r, series, DEFAULT_INTERVAL).await
}

async fn assert_mirrored_within(r: &Replica, series: usize, limit: Duration) {
    let ok = wait_for(limit, || async {
        let b = r.exporter.metrics().await;
        sample(&b, "elb_exporter_warm_copy_series ") == Some(series as f64)
    })
    .await;
    assert!(ok, "{} holds no warm copy:\n{}", r.name, r.exporter.logs());
}

/// When `r`'s own first cycle after `since_ms` succeeded (Unix ms, as it reports it).
async fn own_cycle_done(r: &Replica, since_ms: i64, limit: Duration) -> i64 {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let b = get(&r.exporter.metrics_url).await.1;
        let s = sample(
            &b,
            "elb_exporter_last_collection_success_timestamp_seconds ",
        );
        if let Some(t) = s.map(|t| (t * 1000.0) as i64).filter(|t| *t >= since_ms) {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{}: no own cycle within {limit:?}", r.name);
}

/// The issue's measurement at 1,000 listeners with every timing at its shipped default. Prints the
/// figures (docs/PERFORMANCE.md, *High availability*) and asserts the issue's bounds: series complete
/// within 3 s of a SIGTERM and 20 s of a SIGKILL, at any phase of the interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, about 10 minutes: cargo test --release --test ha measure_1000 -- --ignored --nocapture"]
async fn measure_1000_listeners_default_timings() {
    let _one_at_a_time = SERIAL.lock().await;
    let shape = &LARGE;
    let series = shape.series();
    let interval_ms = DEFAULT_INTERVAL.as_millis() as i64;
    // The scale bench's CES service time.
    let sim = SimConfig {
        ces_latency: Duration::from_millis(50),
        ..SimConfig::default()
    };
    let w = fixture(sim, shape).await;
    let mut rs = [spawn(&w, shape, "pod-a"), spawn(&w, shape, "pod-b")];
    for r in &rs {
        r.exporter.wait_ready().await;
    }
    let (l, _) = roles(&w, &rs).await;
    let cold = complete(&rs[l], series, Instant::now(), DEFAULT_INTERVAL).await;
    println!(
        "{} leads; {series} series complete {cold:?} after both were ready",
        rs[l].name
    );
    check_says_leader(&w, shape, &rs[l].name);
    let started_ms = now_ms();
    let (state, stop, scraping) = start_scraping(&rs);
    // Steady intervals first, so that the counted span has at least 10.
    tokio::time::sleep(3 * DEFAULT_INTERVAL).await;

    let plan = [
        ("SIGKILL right after a cycle start", libc::SIGKILL, 1),
        ("SIGKILL late in the interval", libc::SIGKILL, 48),
        ("SIGTERM right after a cycle start", libc::SIGTERM, 1),
        ("SIGTERM late in the interval", libc::SIGTERM, 50),
        // An OOM kill: the container restarts at once in the same pod, under the same identity.
        (
            "SIGKILL + restart in place right after a cycle start",
            libc::SIGKILL,
            1,
        ),
    ];
    let mut rows = Vec::new();
    for (what, sig, phase_s) in plan {
        let in_place = what.contains("in place");
        let (l, f) = roles(&w, &rs).await;
        assert_mirrored(&rs[f], series).await;
        let tc = cycle_ahead(&w, Duration::from_secs(phase_s)).await;
        let wait = tc + phase_s as i64 * 1000 - now_ms();
        tokio::time::sleep(Duration::from_millis(wait.max(0) as u64)).await;
        let (t0, t0_ms) = (Instant::now(), now_ms());
        signal(&rs[l].exporter, sig);
        let renewed = lease_record(&w).renew_ms.expect("renewed");
        if in_place {
            let _ = rs[l].exporter.child.wait();
            let name = rs[l].name.clone();
            rs[l] = spawn(&w, shape, &name);
            state.lock().unwrap().urls[l] = rs[l].exporter.metrics_url.clone();
        }
        let taken = takeover(&w, &rs[f].name, t0, DEFAULT_LEASE + 4 * DEFAULT_RETRY).await;
        let acquired = lease_record(&w).acquire_ms.expect("acquired");
        let done = complete(&rs[f], series, t0, DEFAULT_INTERVAL + DEFAULT_LEASE).await;
        let own = own_cycle_done(&rs[f], t0_ms, DEFAULT_INTERVAL + DEFAULT_LEASE).await;
        let first = first_ces_call(&w, t0_ms).expect("the successor called CES");
        if sig == libc::SIGTERM {
            let exit = rs[l].exporter.child.wait().expect("wait");
            assert!(exit.success(), "graceful exit: {exit:?}");
            assert!(
                rs[l].exporter.logs().contains("lease released"),
                "{}",
                rs[l].exporter.logs()
            );
        }
        let s = |ms: i64| (ms - t0_ms) as f64 / 1000.0;
        let row = Handover {
            what,
            renewed: s(renewed),
            acquired: s(acquired),
            phase: (t0_ms - tc) as f64 / 1000.0,
            taken: taken.as_secs_f64(),
            due: s(tc + interval_ms),
            first_call: s(first),
            complete: done.as_secs_f64(),
            own: s(own),
        };
        println!(
            "{what}: signal {:.1} s after the cycle start; last renewal {:.2} s, acquired {:.2} s, lease seen taken {:.2} s, series complete {:.2} s (warm copy), first CES call {:.2} s (old start + interval: {:.2} s), own first cycle done {:.2} s",
            row.phase,
            row.renewed,
            row.acquired,
            row.taken,
            row.complete,
            row.first_call,
            row.due,
            row.own
        );
        // No interval twice: the successor's first call waits for the old start + interval (the sim
        // stamps a request when it arrives, after the exporter's clock read the start).
        assert!(
            first >= tc + interval_ms - 50,
            "{what}: first call {first}, due {}",
            tc + interval_ms
        );
        // ... and not longer than needed: once the later of takeover and that time has come.
        assert!(
            row.first_call <= row.taken.max(row.due) + 1.0,
            "{what}: first call late"
        );
        rows.push(row);
        if in_place {
            rs[l].exporter.wait_ready().await;
        } else {
            replace(&w, shape, &mut rs, l, &state).await;
        }
    }
    // Whole intervals after the last handover, inside the counted span.
    tokio::time::sleep(2 * DEFAULT_INTERVAL + Duration::from_secs(5)).await;
    let ticks = stop_scraping(&state, &stop, scraping).await;
    // About 11 minutes of scraping every 200 ms.
    assert!(ticks > 1_500, "{ticks}");

    let per_cycle = shape.calls_per_cycle();
    let groups = cycles(&w, started_ms, interval_ms / 3);
    let calls: usize = groups.iter().map(|g| g.1).sum();
    let reasks: usize = groups.iter().map(|g| g.1.saturating_sub(per_cycle)).sum();
    // The simulator publishes a minute 60 s after it starts, so a cycle whose last call went out in
    // minute k shows minute k - 1: one cycle per clock minute is one collection per published minute.
    let minutes: Vec<i64> = groups.iter().map(|g| g.3 / 60_000).collect();
    let spanned = (minutes.last().unwrap() - minutes[0] + 1) as f64;
    let min_gap = groups.windows(2).map(|p| p[1].0 - p[0].0).min().unwrap();
    println!(
        "CES: {calls} calls in {} cycles over {spanned} minutes = {:.2} calls/minute, {:.2} without the {reasks} re-ask(s) of an aligned cycle's probe batch (collection.align) (single-replica minimum {per_cycle} = {series} series / {}); cycle starts {:.1}-{:.1} s apart; calls per cycle {:?}; metrics per cycle {:?}",
        groups.len(),
        calls as f64 / spanned,
        (calls - reasks) as f64 / spanned,
        shape.batch,
        min_gap as f64 / 1000.0,
        groups.windows(2).map(|p| p[1].0 - p[0].0).max().unwrap() as f64 / 1000.0,
        groups.iter().map(|g| g.1).collect::<Vec<_>>(),
        groups.iter().map(|g| g.2).collect::<Vec<_>>(),
    );
    assert!(groups.len() >= 10, "{groups:?}");
    // Every cycle asks each series once (an aligned cycle may ask its probe batch again) ...
    assert!(
        groups
            .iter()
            .all(|g| g.2 <= series + (g.1 - per_cycle.min(g.1)) * shape.batch),
        "{groups:?}"
    );
    // ... and no minute is collected twice, handovers included.
    assert!(
        minutes.windows(2).all(|p| p[1] > p[0]),
        "two cycles in one minute: {groups:?}"
    );
    assert!(
        (calls - reasks) as f64 / spanned <= per_cycle as f64,
        "{groups:?}"
    );

    println!(
        "\n| handover (interval 60 s) | signal after the cycle start | Lease taken | series complete (warm copy) | successor's first CES call | old leader's start + interval | its own first cycle done |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.1} s | {:.2} s | **{:.2} s** | {:.2} s | {:.2} s | {:.2} s |",
            r.what, r.phase, r.taken, r.complete, r.first_call, r.due, r.own
        );
    }
    for r in &rows {
        if r.what.starts_with("SIGTERM") {
            assert!(
                r.taken <= 3.0 && r.complete <= 3.0,
                "{}: Lease taken after {:.2} s, complete after {:.2} s",
                r.what,
                r.taken,
                r.complete
            );
        }
        if r.what.starts_with("SIGKILL") {
            let after = r.acquired - r.renewed;
            assert!(
                after >= DEFAULT_LEASE.as_secs_f64(),
                "{}: acquired {after:.2} s after the last renewal",
                r.what
            );
        }
        if r.what.starts_with("SIGKILL") {
            assert!(r.complete <= 20.0, "{}: {:.2} s", r.what, r.complete);
        }
    }
    // After five handovers `check` names the current holder (its CES probe is outside the counts).
    let (l, _) = roles(&w, &rs).await;
    check_says_leader(&w, shape, &rs[l].name);
}
