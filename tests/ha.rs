//! High availability, measured: two real `elb-exporter` processes elect one collector through a Lease on
//! the fake apiserver, against the simulated cloud. Prints the figures; asserts the bounds.
//!
//! Short settings keep it fast (interval 1 s, lease 3 s, renew deadline 2 s, retry 200 ms). With the
//! defaults (interval 60 s, lease 15 s, renew deadline 10 s, retry 2 s) the same protocol gives: SIGTERM →
//! the follower leads within one retry period (≤ 2 s, ~1 s on average); SIGKILL → within lease duration +
//! retry period (≤ 17 s); in both cases the new leader's first cycle starts at the later of that and the
//! previous leader's last cycle start + interval, so that no interval is collected twice.

mod common;

use common::*;
use elb_exporter::demo::service;
use elb_exporter::sim::cloud::{LbKind, SimApi, SimConfig, SimListener};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ELBS: usize = 4;
const PER_ELB: usize = 5;
/// 20 listeners x 13 default metrics = 260 series; batches of 100 -> 3 CES calls per cycle.
const SERIES: usize = ELBS * PER_ELB * 13;
const CALLS_PER_CYCLE: usize = 3;
const INTERVAL: Duration = Duration::from_secs(1);
const LEASE: Duration = Duration::from_secs(3);
const RENEW_DEADLINE: Duration = Duration::from_secs(2);
const RETRY: Duration = Duration::from_millis(200);
const NS: &str = "monitoring";
const LEASE_NAME: &str = "elb-exporter";
const CLOUD_PREFIX: &str = "huaweicloud_sys_elb_listener_";

const EXTRA: &str = "collection:\n  interval: \"1s\"\nleader_election:\n  enabled: true\n  lease_namespace: \"monitoring\"\n  lease_duration: \"3s\"\n  renew_deadline: \"2s\"\n  retry_period: \"200ms\"\n";

fn elb(i: usize) -> String {
    format!("e{i}000000-0000-4000-8000-000000000000")
}

async fn fixture() -> World {
    let w = World::start(SimConfig::default()).await;
    for e in 0..ELBS {
        w.sim.add_loadbalancer(&elb(e), LbKind::Dedicated);
        let ports: Vec<i32> = (0..PER_ELB).map(|p| 8000 + p as i32).collect();
        for (p, port) in ports.iter().enumerate() {
            let id = format!("1{e}{p:02}0000-0000-4000-8000-000000000000");
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

/// Writes the config (batch size 100) and a kubeconfig of its own for replica `name`, whose requests
/// the fake apiserver can then refuse by the token `name`.
fn files(w: &World, name: &str) -> (PathBuf, PathBuf) {
    let (cfg, _) = w.write_config(EXTRA);
    let text = std::fs::read_to_string(&cfg).expect("config").replace(
        "  prefix: \"huaweicloud\"\n",
        "  prefix: \"huaweicloud\"\n  scrape_batch_size: 100\n",
    );
    let cfg_own = w.dir.path().join(format!("{name}.yml"));
    std::fs::write(&cfg_own, text).expect("write config");
    let kubeconfig = w.dir.path().join(format!("{name}.kubeconfig"));
    w.cluster
        .write_kubeconfig_as(&kubeconfig, name)
        .expect("kubeconfig");
    (cfg_own, kubeconfig)
}

fn spawn(w: &World, name: &str) -> Exporter {
    let (cfg, kubeconfig) = files(w, name);
    Exporter::spawn_env(
        Command::new(BIN)
            .arg("--config")
            .arg(&cfg)
            .arg("--listen")
            .arg("127.0.0.1:0"),
        &kubeconfig,
        &[("POD_NAME", name), ("RUST_LOG", "info,elb_exporter=debug")],
    )
}

fn cloud_series(body: &str) -> usize {
    body.lines().filter(|l| l.starts_with(CLOUD_PREFIX)).count()
}

fn holder(w: &World) -> Option<String> {
    w.cluster
        .lease(NS, LEASE_NAME)
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty())
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

async fn scraper(state: Arc<Mutex<Scrapes>>, stop: Arc<std::sync::atomic::AtomicBool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        tick.tick().await;
        let urls = state.lock().unwrap().urls.clone();
        let (a, b) = tokio::join!(get(&urls[0]), get(&urls[1]));
        let (na, nb) = (cloud_series(&a.1), cloud_series(&b.1));
        let mut s = state.lock().unwrap();
        s.ticks += 1;
        if na > 0 && nb > 0 {
            s.both.push(format!("{}: {na}, {}: {nb}", urls[0], urls[1]));
        }
    }
}

/// Waits until `r` leads with all its series; returns the time that took from `since`.
async fn complete(r: &Replica, since: Instant, limit: Duration) -> Duration {
    let ok = wait_for_fast(limit, || async {
        cloud_series(&get(&r.exporter.metrics_url).await.1) == SERIES
    })
    .await;
    assert!(
        ok,
        "{} did not export all {SERIES} series within {limit:?}; log:\n{}",
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
    let ok = wait_for(Duration::from_secs(10), || {
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

fn signal(e: &Exporter, sig: i32) {
    // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped.
    let rc = unsafe { libc::kill(e.child.id() as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({sig})");
}

/// CES calls grouped into cycles (calls less than 400 ms apart; cycles are 1 s apart and take ms).
fn cycles(w: &World, from_ms: i64) -> Vec<(i64, usize)> {
    let mut groups: Vec<(i64, usize)> = Vec::new();
    for r in w
        .sim
        .requests()
        .into_iter()
        .filter(|r| matches!(r.api, SimApi::Ces) && r.time_ms >= from_ms)
    {
        match groups.last_mut() {
            Some((start, n)) if r.time_ms - *start < 400 => *n += 1,
            _ => groups.push((r.time_ms, 1)),
        }
    }
    groups
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_collect_once_and_fail_over_fast() {
    let w = fixture().await;
    let mut rs = [
        Replica {
            name: "exp-a".into(),
            exporter: spawn(&w, "exp-a"),
        },
        Replica {
            name: "exp-b".into(),
            exporter: spawn(&w, "exp-b"),
        },
    ];
    for r in &rs {
        r.exporter.wait_ready().await;
    }
    let (l, f) = roles(&w, &rs).await;
    complete(&rs[l], Instant::now(), Duration::from_secs(10)).await;
    let started_ms = now_ms();

    // The follower is ready and up, leads nothing and exports no cloud series.
    let body = rs[f].exporter.metrics().await;
    assert_eq!(sample(&body, "elb_exporter_leader "), Some(0.0), "{body}");
    assert_eq!(sample(&body, "elb_exporter_up "), Some(1.0), "{body}");
    assert_eq!(cloud_series(&body), 0);
    assert_eq!(rs[f].exporter.get("/readyz").await.0, 200);
    let lbody = rs[l].exporter.metrics().await;
    assert_eq!(sample(&lbody, "elb_exporter_leader "), Some(1.0));
    let (code, out, err) = w.run(EXTRA, &["check"]);
    assert!(
        out.contains(&format!(
            "leader: {} (lease monitoring/elb-exporter",
            rs[l].name
        )),
        "check shows who leads (exit {code}):\n{out}\n{err}"
    );

    let state = Arc::new(Mutex::new(Scrapes {
        urls: [
            rs[0].exporter.metrics_url.clone(),
            rs[1].exporter.metrics_url.clone(),
        ],
        ..Scrapes::default()
    }));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scraping = tokio::spawn(scraper(state.clone(), stop.clone()));
    tokio::time::sleep(4 * INTERVAL).await;

    // 1. SIGTERM: the leader releases the Lease; the follower takes over at its next try.
    let (l, f) = roles(&w, &rs).await;
    let t0 = Instant::now();
    signal(&rs[l].exporter, libc::SIGTERM);
    let sigterm = complete(&rs[f], t0, Duration::from_secs(10)).await;
    let exit = rs[l].exporter.child.wait().expect("wait");
    assert!(exit.success(), "graceful exit: {exit:?}");
    println!("SIGTERM: new leader's {SERIES} series complete after {sigterm:?}");
    // Handed over by the release, not by expiry (which would take the lease duration).
    assert!(
        sigterm <= Duration::from_secs(3) && sigterm < LEASE / 2,
        "{sigterm:?}"
    );
    let name = format!("{}-2", rs[l].name);
    rs[l] = Replica {
        exporter: spawn(&w, &name),
        name,
    };
    state.lock().unwrap().urls[l] = rs[l].exporter.metrics_url.clone();
    rs[l].exporter.wait_ready().await;
    tokio::time::sleep(3 * INTERVAL).await;

    // 2. SIGKILL: the Lease expires for the follower after the lease duration.
    let (l, f) = roles(&w, &rs).await;
    let t0 = Instant::now();
    signal(&rs[l].exporter, libc::SIGKILL);
    let sigkill = complete(&rs[f], t0, Duration::from_secs(15)).await;
    println!(
        "SIGKILL: new leader's {SERIES} series complete after {sigkill:?} (lease {LEASE:?} + retry {RETRY:?} + interval {INTERVAL:?} bound)"
    );
    assert!(sigkill <= LEASE + RETRY + INTERVAL, "{sigkill:?}");
    let name = format!("{}-3", rs[l].name);
    rs[l] = Replica {
        exporter: spawn(&w, &name),
        name,
    };
    state.lock().unwrap().urls[l] = rs[l].exporter.metrics_url.clone();
    rs[l].exporter.wait_ready().await;
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
    let cutoff = complete(&rs[f], t0, Duration::from_secs(15)).await;
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
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    scraping.await.expect("scraper");

    // Never two exporters of cloud series at one scrape.
    let s = state.lock().unwrap();
    println!(
        "scrapes of both replicas every 200 ms: {} ticks, {} with both exporting",
        s.ticks,
        s.both.len()
    );
    assert!(s.ticks > 50, "{}", s.ticks);
    assert!(
        s.both.is_empty(),
        "both replicas exported cloud series: {:?}",
        s.both
    );

    // CES calls: every whole cycle is the packed minimum, cycles are an interval apart across all three
    // handovers (a cycle cut by a kill may be partial, never doubled).
    let groups = cycles(&w, started_ms);
    // The first and last groups may be cut by the observation window.
    let whole = &groups[1..groups.len() - 1];
    let calls: usize = whole.iter().map(|(_, n)| n).sum();
    let span_ms = whole.last().unwrap().0 - whole[0].0;
    let intervals = span_ms as f64 / INTERVAL.as_millis() as f64 + 1.0;
    let min_gap = whole.windows(2).map(|p| p[1].0 - p[0].0).min().unwrap();
    println!(
        "CES: {calls} calls in {} cycles over {intervals:.1} intervals = {:.2} calls/interval (single-replica minimum {CALLS_PER_CYCLE}); closest cycle starts {min_gap} ms apart; per cycle {:?}",
        whole.len(),
        calls as f64 / intervals,
        whole.iter().map(|(_, n)| n).collect::<Vec<_>>()
    );
    assert!(whole.len() >= 10, "{groups:?}");
    assert!(
        whole.iter().all(|(_, n)| *n <= CALLS_PER_CYCLE),
        "{groups:?}"
    );
    assert!(
        whole.iter().filter(|(_, n)| *n == CALLS_PER_CYCLE).count() >= whole.len() - 2,
        "only the cycles cut by SIGTERM/SIGKILL may be partial: {groups:?}"
    );
    assert!(
        min_gap >= 800,
        "a cycle started {min_gap} ms after another: {groups:?}"
    );
    assert!(
        calls as f64 / intervals <= CALLS_PER_CYCLE as f64,
        "{groups:?}"
    );
    let lease = w
        .cluster
        .lease(NS, LEASE_NAME)
        .expect("lease")
        .spec
        .unwrap();
    println!("lease transitions: {:?}", lease.lease_transitions);
    assert!(lease.lease_transitions.unwrap_or(0) >= 3, "{lease:?}");
}
