//! Soak: the real `elb-exporter` binary for `SOAK_SECONDS` (default 20; CI sets 60, `scripts/soak.sh 1800`
//! runs half an hour in release) against the simulated cloud and the fake apiserver, with
//!
//! * Service churn every ~200 ms: adds (a third of them on brand-new ELBs, some with hostile listener
//!   names, some without the class annotation), deletes, and annotation removals;
//! * random cloud faults on CES and both ELB APIs: 500/503, throttling (with and without
//!   `Retry-After`), truncated answers, delays beyond the request timeout;
//! * periodic watch disruptions: dropped watches, 410 Gone (compaction), short apiserver outages.
//!
//! Asserted throughout: the process never exits; `/metrics` always answers and parses; no series of a
//! Service deleted (or un-annotated) more than `SOAK_GRACE_SECS` (default 3) ago, and never again once
//! gone; RSS under `RSS_LIMIT_MIB`. At the end the faults stop and `up` settles at 1; a last CES outage
//! (every call throttled until it ends) shows as `up` 0, and once it ends `up` is 1 again within a few
//! cycles and the exported Services are exactly the live ones (nothing stale, nothing lost). A summary
//! is printed.
//!
//! `SOAK_SEED` picks the random sequence (printed, so a failure can be replayed).

mod common;

use common::*;
use elb_exporter::demo::service;
use elb_exporter::sim::cloud::{Fault, LbKind, SimApi, SimConfig, SimListener};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

const ID: &str = "kubernetes.io/elb.id";
const CLASS: &str = "kubernetes.io/elb.class";
/// A Service deleted longer ago than this (`SOAK_GRACE_SECS`, default 3) must have no series.
fn grace() -> Duration {
    Duration::from_secs(env_u64("SOAK_GRACE_SECS", 3))
}
const RSS_LIMIT_MIB: u64 = 100;
const MIN_SERVICES: usize = 8;
const MAX_SERVICES: usize = 40;
const MAX_ELBS: usize = 30;
const NAMESPACES: [&str; 3] = ["soak-a", "soak-b", "soak-c"];
const LISTENER_NAMES: [&str; 5] = [
    "k8s_TCP",
    "web \"quoted\"",
    "back\\slash",
    "multi\nline",
    "ünïcödé 名前",
];

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Elb {
    id: String,
    kind: LbKind,
    ports: Vec<u16>,
}

#[derive(Default)]
struct Stats {
    adds: u64,
    deletes: u64,
    unannotated: u64,
    new_elbs: u64,
    faults: BTreeMap<&'static str, u64>,
    disruptions: BTreeMap<&'static str, u64>,
    scrapes: u64,
    max_rss_kib: u64,
    max_deletion_lag: Duration,
    up_scrapes: u64,
}

/// (namespace, service) of every line carrying Service labels: cloud series and listener_info.
fn exported_services(body: &str, with_info: bool) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let cloud = line.starts_with("huaweicloud_sys_elb_listener_");
        let info = with_info && line.starts_with("elb_exporter_listener_info{");
        if !(cloud || info) {
            continue;
        }
        let (_, labels, _) = parse_sample(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        let get = |k: &str| {
            labels
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        out.insert((get("namespace"), get("service")));
    }
    out
}

fn fault(rng: &mut Rng) -> (&'static str, Fault) {
    let count = 1 + rng.below(4) as u32;
    match rng.below(6) {
        // A burst long enough to fail whole cycles (three attempts per call).
        5 => (
            "burst_500",
            Fault::Status {
                status: 500,
                body: r#"{"error_code":"SYS.0500","error_msg":"internal error"}"#.into(),
                count: 4 + rng.below(6) as u32,
            },
        ),
        0 => (
            "status_500",
            Fault::Status {
                status: 500,
                body: r#"{"error_code":"SYS.0500","error_msg":"internal error"}"#.into(),
                count,
            },
        ),
        1 => (
            "status_503",
            Fault::Status {
                status: 503,
                body: "<html>Service Unavailable</html>".into(),
                count,
            },
        ),
        2 => (
            "throttle",
            Fault::Throttle {
                retry_after_secs: if rng.chance(30) { Some(1) } else { None },
                count,
            },
        ),
        3 => ("malformed", Fault::Malformed { count }),
        _ => (
            "delay",
            Fault::Delay {
                delay: Duration::from_millis(50 + rng.below(900)),
                count,
            },
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak() {
    let secs = env_u64("SOAK_SECONDS", 20);
    let grace = grace();
    let seed = env_u64("SOAK_SEED", 0x5eed_e1b0_0000_0001).max(1);
    eprintln!("soak: {secs} s, SOAK_SEED={seed}");
    let mut rng = Rng(seed);
    let w = World::start(SimConfig {
        // The client-side limit is raised below; the simulator's own limit is not what is soaked here.
        ces_calls_per_minute: 0,
        ..SimConfig::default()
    })
    .await;

    let mut elbs: Vec<Elb> = Vec::new();
    let new_elb = |rng: &mut Rng, elbs: &mut Vec<Elb>, stats: &mut Stats| {
        let n = elbs.len();
        let kind = if rng.chance(50) {
            LbKind::Dedicated
        } else {
            LbKind::Shared
        };
        let id = format!("5ca1ab1e-0000-4000-8000-{n:012x}");
        w.sim.add_loadbalancer(&id, kind);
        let ports: Vec<u16> = if rng.chance(40) {
            vec![80, 443]
        } else {
            vec![*rng.pick(&[80u16, 8080, 9000])]
        };
        for p in &ports {
            let name = format!("{} {p}", rng.pick(&LISTENER_NAMES));
            w.sim.add_listener(
                &id,
                SimListener::new(
                    format!("1157e0e0-{n:04x}-4000-8000-{p:012}"),
                    name,
                    "TCP",
                    *p,
                ),
            );
        }
        stats.new_elbs += 1;
        elbs.push(Elb { id, kind, ports });
    };

    let mut stats = Stats::default();
    for _ in 0..4 {
        new_elb(&mut rng, &mut elbs, &mut stats);
    }
    // Live annotated Services, and when each gone one went away.
    let mut live: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut gone: HashMap<(String, String), Instant> = HashMap::new();
    let mut confirmed_gone: BTreeSet<(String, String)> = BTreeSet::new();
    // Services seen exported: only their absence shows that the exporter saw them go. One never exported
    // (its ELB lookup failed) may still appear until the exporter sees its deletion, within the grace.
    let mut ever_exported: BTreeSet<(String, String)> = BTreeSet::new();
    let mut next_name = 0u64;
    let mut add = |rng: &mut Rng,
                   elbs: &Vec<Elb>,
                   live: &mut BTreeMap<(String, String), usize>,
                   stats: &mut Stats| {
        let e = rng.below(elbs.len() as u64) as usize;
        let elb = &elbs[e];
        let ns = rng.pick(&NAMESPACES).to_string();
        let name = format!("svc-{next_name}");
        next_name += 1;
        let mut ann = vec![(ID, elb.id.as_str())];
        if rng.chance(80) {
            ann.push((
                CLASS,
                match elb.kind {
                    LbKind::Dedicated => "performance",
                    LbKind::Shared => "union",
                },
            ));
        }
        let ports: Vec<i32> = elb.ports.iter().map(|p| i32::from(*p)).collect();
        w.cluster.apply(service(&ns, &name, &ann, &ports));
        live.insert((ns, name), e);
        stats.adds += 1;
    };
    for _ in 0..MIN_SERVICES {
        add(&mut rng, &elbs, &mut live, &mut stats);
    }

    let extra = "collection:\n  interval: \"1s\"\n  metrics: [m1_cps, m7_in_Bps, m4_ncps]\n  stale_intervals: 2\n\
                 discovery:\n  listener_refresh: \"10s\"\n\
                 cloud:\n  request_timeout: \"500ms\"\n  retry:\n    initial_backoff: \"10ms\"\n    max_backoff: \"200ms\"\n    max_attempts: 3\n\
                 \x20 rate_limit:\n    ces_per_minute: 2000\n    elb_per_minute: 2000\n";
    let mut e = w.exporter_edited(extra, |t| {
        t.replace(
            "  prefix: \"huaweicloud\"\n",
            "  prefix: \"huaweicloud\"\n  scrape_batch_size: 40\n",
        )
    });
    e.wait_ready().await;

    let started = Instant::now();
    let end = started + Duration::from_secs(secs);
    let tick = Duration::from_millis(100);
    let mut ticks: u64 = 0;
    let mut outage_until: Option<Instant> = None;
    let mut next_fault = Instant::now() + Duration::from_millis(500);
    let mut next_disruption = Instant::now() + Duration::from_secs(2);
    let mut last_report = Instant::now();

    while Instant::now() < end {
        ticks += 1;
        let now = Instant::now();

        // Churn every 200 ms.
        if ticks.is_multiple_of(2) {
            let n = live.len();
            if n < MIN_SERVICES || (n < MAX_SERVICES && rng.chance(55)) {
                if elbs.len() < MAX_ELBS && rng.chance(33) {
                    new_elb(&mut rng, &mut elbs, &mut stats);
                }
                add(&mut rng, &elbs, &mut live, &mut stats);
            } else {
                let i = rng.below(n as u64) as usize;
                let key = live.keys().nth(i).cloned().expect("a live Service");
                let e = live.remove(&key).expect("live");
                if rng.chance(15) {
                    // Loses its annotation: counts as gone for the exporter.
                    let ports: Vec<i32> = elbs[e].ports.iter().map(|p| i32::from(*p)).collect();
                    w.cluster.apply(service(&key.0, &key.1, &[], &ports));
                    stats.unannotated += 1;
                } else {
                    w.cluster.delete(&key.0, &key.1);
                    stats.deletes += 1;
                }
                gone.insert(key, now);
            }
        }

        // Cloud faults at random times.
        if now >= next_fault {
            let api = *rng.pick(&[SimApi::Ces, SimApi::Ces, SimApi::ElbV3, SimApi::ElbV2]);
            let (kind, f) = fault(&mut rng);
            // Bursts go to CES, where they fail whole cycles and exercise the staleness bound.
            let api = if kind == "burst_500" {
                SimApi::Ces
            } else {
                api
            };
            w.sim.inject(api, f);
            *stats.faults.entry(kind).or_default() += 1;
            next_fault = now + Duration::from_millis(300 + rng.below(2000));
        }

        // Watch disruptions.
        if let Some(until) = outage_until
            && now >= until
        {
            w.cluster.set_available(true);
            outage_until = None;
        }
        if now >= next_disruption && outage_until.is_none() {
            let kind = match rng.below(4) {
                0 => {
                    w.cluster.drop_watches();
                    "drop_watches"
                }
                1 => {
                    w.cluster.expire_watches();
                    "410_gone"
                }
                2 => {
                    w.cluster.compact();
                    "compact"
                }
                _ => {
                    w.cluster.set_available(false);
                    outage_until = Some(now + Duration::from_millis(200 + rng.below(400)));
                    "outage"
                }
            };
            *stats.disruptions.entry(kind).or_default() += 1;
            next_disruption = now + Duration::from_millis(2000 + rng.below(2000));
        }

        // Checks every 300 ms.
        if ticks.is_multiple_of(3) {
            assert!(
                e.alive(),
                "the exporter exited after {:?}; logs:\n{}",
                started.elapsed(),
                tail(&e.logs())
            );
            let (status, body) = e.get("/metrics").await;
            assert_eq!(status, 200, "/metrics answers");
            stats.scrapes += 1;
            if let Err(err) = check_exposition(&body) {
                panic!("/metrics does not parse: {err}");
            }
            if sample(&body, "elb_exporter_up ") == Some(1.0) {
                stats.up_scrapes += 1;
            }
            let exported = exported_services(&body, true);
            ever_exported.extend(exported.iter().cloned());
            let now = Instant::now();
            for (key, at) in &gone {
                if exported.contains(key) {
                    assert!(
                        now.duration_since(*at) <= grace && !confirmed_gone.contains(key),
                        "{}/{} deleted {:?} ago still has series (or came back); logs:\n{}",
                        key.0,
                        key.1,
                        now.duration_since(*at),
                        tail(&e.logs())
                    );
                } else if ever_exported.contains(key) && confirmed_gone.insert(key.clone()) {
                    stats.max_deletion_lag = stats.max_deletion_lag.max(now.duration_since(*at));
                }
            }
            if let Some(rss) = e.rss_kib() {
                stats.max_rss_kib = stats.max_rss_kib.max(rss);
                assert!(
                    rss < RSS_LIMIT_MIB * 1024,
                    "RSS {} MiB over {RSS_LIMIT_MIB} MiB",
                    rss / 1024
                );
            }
        }
        if last_report.elapsed() >= Duration::from_secs(60) {
            last_report = Instant::now();
            eprintln!(
                "soak: {:?} in, {} live Services, max RSS {} KiB, max deletion lag {:?}",
                started.elapsed(),
                live.len(),
                stats.max_rss_kib,
                stats.max_deletion_lag
            );
        }
        tokio::time::sleep(tick).await;
    }

    // The faults stop: the queued ones are dropped and the apiserver is back. A listener lookup that a
    // fault failed keeps `up` at 0 by design until its retry (`listener_refresh`, 10 s here) succeeds,
    // so the exporter first settles at `up` 1; only then does the outage below say anything.
    if outage_until.is_some() {
        w.cluster.set_available(true);
    }
    for api in [SimApi::Ces, SimApi::ElbV3, SimApi::ElbV2] {
        w.sim.clear_faults(api);
    }
    let settled = wait_for(Duration::from_secs(25), || async {
        sample(&e.metrics().await, "elb_exporter_up ") == Some(1.0)
    })
    .await;
    assert!(
        settled,
        "up 1 once the faults stopped and failed lookups were retried; logs:\n{}",
        tail(&e.logs())
    );
    // A last CES outage: every CES call is throttled until it ends, whatever a cycle's call count and
    // whatever prompt collections of new listeners take, so no retry can ride it out.
    w.sim.inject(
        SimApi::Ces,
        Fault::Throttle {
            retry_after_secs: None,
            count: u32::MAX,
        },
    );
    *stats.faults.entry("final_outage").or_default() += 1;
    let down = wait_for(Duration::from_secs(10), || async {
        sample(&e.metrics().await, "elb_exporter_up ") == Some(0.0)
    })
    .await;
    assert!(
        down,
        "the final outage shows as up 0; logs:\n{}",
        tail(&e.logs())
    );
    w.sim.clear_faults(SimApi::Ces);
    let stop = Instant::now();
    let recovered = wait_for(Duration::from_secs(15), || async {
        sample(&e.metrics().await, "elb_exporter_up ") == Some(1.0)
    })
    .await;
    assert!(
        recovered,
        "up did not return to 1 after the outage ended; logs:\n{}",
        tail(&e.logs())
    );
    let up_after = stop.elapsed();
    assert!(
        up_after <= Duration::from_secs(8),
        "up 1 within a few cycles: {up_after:?}"
    );
    // Nothing stale, nothing lost: the exported Services are exactly the live ones, with data.
    let want: BTreeSet<(String, String)> = live.keys().cloned().collect();
    let converged = wait_for(Duration::from_secs(40), || async {
        let b = e.metrics().await;
        exported_services(&b, false) == want && exported_services(&b, true) == want
    })
    .await;
    let b = e.metrics().await;
    let got = exported_services(&b, true);
    assert!(
        converged,
        "exported != live\nmissing: {:?}\nstale: {:?}\nlogs:\n{}",
        want.difference(&got).collect::<Vec<_>>(),
        got.difference(&want).collect::<Vec<_>>(),
        tail(&e.logs())
    );
    let converged_after = stop.elapsed();
    assert!(e.alive());
    assert_eq!(
        sample(&b, "elb_exporter_services "),
        Some(want.len() as f64),
        "annotated Services"
    );
    let cycles = |r: &str| {
        sample(
            &b,
            &format!("elb_exporter_collections_total{{result=\"{r}\"}}"),
        )
        .unwrap_or(0.0)
    };
    eprintln!(
        "soak summary: {secs} s (seed {seed})\n  collection cycles: {} ok, {} failed; up in {}/{} scrapes\n  \
         churn: {} adds, {} deletes, {} annotation removals, {} ELBs created; {} Services live at the end\n  \
         cloud faults injected: {:?}\n  watch disruptions: {:?}\n  \
         max RSS: {:.1} MiB (limit {RSS_LIMIT_MIB}); max deletion -> series gone: {:?} (bound {grace:?})\n  \
         after the final outage: up 1 in {up_after:?}, exported == live in {converged_after:?}",
        cycles("success"),
        cycles("failure"),
        stats.up_scrapes,
        stats.scrapes,
        stats.adds,
        stats.deletes,
        stats.unannotated,
        stats.new_elbs,
        want.len(),
        stats.faults,
        stats.disruptions,
        stats.max_rss_kib as f64 / 1024.0,
        stats.max_deletion_lag,
    );
}

/// The last 80 lines of a log.
fn tail(logs: &str) -> String {
    let lines: Vec<&str> = logs.lines().collect();
    lines[lines.len().saturating_sub(80)..].join("\n")
}
