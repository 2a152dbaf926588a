//! Issue 16: how long after Cloud Eye publishes a minute it first shows on /metrics, and what that costs
//! in CES calls, with `collection.align` false (a fixed phase) and true, side by side.
//!
//! Time is virtual: each run is one in-process tokio runtime on a paused clock (auto-advancing when idle),
//! so 25 simulated minutes take seconds. The real `Collector` (default config: 60 s interval, 13 metrics,
//! 500 per batch, max_concurrency 4) talks to `sim::fake::FakeCloud`, which answers after 50 ms of virtual
//! latency with the newest minute published by the call's time under `sim::publication::Publication`, and
//! each datapoint's value is its minute number. After every snapshot the real `exposition::Renderer`
//! renders the body; each series' value in it says which minute it shows, and the first virtual time a
//! (series, minute) is in a body, minus the minute's publication time, is its delay. Rendering costs no
//! virtual time (its CPU cost is in the `scale` bench).
//!
//! `cargo bench --bench align [-- --sizes 100,1000 --warmup 10 --minutes 15 --phase 20]`; `--phases
//! 0,5,10,20,30,45,55` runs each start phase in turn (one row per phase), since where in a minute the
//! exporter starts decides how its first minutes go.

use elb_exporter::collector::{Collector, CollectorSettings, Snapshot, WallClock};
use elb_exporter::config::Config;
use elb_exporter::discovery::Owner;
use elb_exporter::discovery::inventory::{Target, Targets};
use elb_exporter::exposition::Renderer;
use elb_exporter::sim::fake::FakeCloud;
use elb_exporter::sim::publication::Publication;
use elb_exporter::telemetry::Telemetry;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

const MIN: i64 = 60_000;
/// A round Unix minute to start from.
const T0: i64 = 1_800_000_000_000 - 1_800_000_000_000 % MIN;

struct Opts {
    sizes: Vec<usize>,
    warmup: i64,
    minutes: i64,
    /// Seconds into a minute the exporter starts, one run each.
    phases_s: Vec<i64>,
}

fn opts() -> Opts {
    let mut o = Opts {
        sizes: vec![100, 1000],
        warmup: 10,
        minutes: 15,
        phases_s: vec![20],
    };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--sizes" => o.sizes = v.split(',').filter_map(|s| s.parse().ok()).collect(),
            "--warmup" => o.warmup = v.parse().unwrap_or(o.warmup),
            "--minutes" => o.minutes = v.parse().unwrap_or(o.minutes),
            "--phase" => o.phases_s = v.parse().map_or(o.phases_s, |p| vec![p]),
            "--phases" => o.phases_s = v.split(',').filter_map(|s| s.parse().ok()).collect(),
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

fn config() -> Config {
    let yaml = "auth: {auth_url: 'https://iam.cn-east-3.myhuaweicloud.com/v3', region: cn-east-3, \
                project_id: p, access_key: a, secret_key: s}\n";
    Config::from_yaml(yaml, &|_: &str| None).expect("the default config loads")
}

#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    model: Publication,
}

fn cases() -> [Case; 2] {
    [
        Case {
            name: "constant 83 s",
            model: Publication::constant(Duration::from_secs(83)),
        },
        Case {
            name: "jittered 68-98 s, 1 in 10 +60 s",
            model: Publication {
                base: Duration::from_secs(68),
                jitter: Duration::from_secs(30),
                late_every: 10,
                late_by: Duration::from_secs(60),
                seed: 16,
            },
        },
    ]
}

/// What one run measured over its measured minutes.
struct Run {
    /// Delays (s) of (series, minute) pairs of on-time minutes.
    delays: Vec<f64>,
    /// Delays (s) of late minutes' pairs that were shown, and pairs never shown (a newer minute first).
    late: Vec<f64>,
    late_skipped: usize,
    /// On-time (series, minute) pairs never shown: a newer minute reached /metrics first.
    skipped: usize,
    calls_per_minute: f64,
    calls_per_minute_all: f64,
}

fn world(n: usize, cfg: &Config) -> (Arc<FakeCloud>, Arc<Targets>) {
    let cloud = Arc::new(FakeCloud::default());
    cloud.stamp_values();
    cloud.set_latency(Duration::from_millis(50));
    let targets = (0..n)
        .map(|i| {
            let listener = format!("l{i:05}");
            for m in &cfg.collection.metrics {
                cloud.set_value(&listener, m, 1.0);
            }
            Target {
                owner: Owner::Service,
                namespace: format!("ns{}", i % 20).into(),
                service: format!("svc{}", i / 5).into(),
                elb_id: format!("elb{}", i / 5).into(),
                listener_id: listener.into(),
                listener_name: format!("k8s_TCP_{}", 80 + i % 5).into(),
                port: 80 + (i % 5) as u16,
                protocol: "TCP".into(),
                uid: format!("uid-{}", i / 5).into(),
                elb_name: format!("elb-name-{}", i / 5).into(),
            }
        })
        .collect();
    let targets = Targets {
        synced: true,
        listeners: targets,
        services: n / 5,
        ..Targets::default()
    };
    (cloud, Arc::new(targets))
}

/// (series line, minute) pairs of a body.
fn shown<'b>(body: &'b [u8], family: &str) -> Vec<(&'b [u8], i64)> {
    body.split(|b| *b == b'\n')
        .filter(|l| l.starts_with(family.as_bytes()))
        .filter_map(|l| {
            let sp = l.iter().rposition(|b| *b == b' ')?;
            let v: f64 = std::str::from_utf8(&l[sp + 1..]).ok()?.parse().ok()?;
            Some((&l[..sp], v as i64 * MIN))
        })
        .collect()
}

async fn run(o: &Opts, phase_s: i64, n: usize, case: Case, align: bool) -> Run {
    let cfg = config();
    let (cloud, targets) = world(n, &cfg);
    cloud.set_publication(case.model);
    let start_ms = T0 + phase_s * 1000;
    let clock = WallClock::virtual_from(start_ms);
    let settings = CollectorSettings {
        align,
        clock,
        ..CollectorSettings::from_config(&cfg)
    };
    let renderer = Renderer::from_config(&cfg);
    let family = format!("{}_sys_elb_listener_", cfg.prefix);
    let (collector, mut rx) = Collector::new(cloud.clone(), settings, Telemetry::new());
    let (_tx, trx) = watch::channel(targets.clone());
    tokio::spawn(collector.run(trx));

    let measure_from = start_ms + o.warmup * MIN;
    let end = measure_from + o.minutes * MIN;
    // First time each (series, minute) was in a body.
    let mut first: HashMap<(Vec<u8>, i64), i64> = HashMap::new();
    while clock.now_ms() < end + 3 * MIN {
        let changed = tokio::time::timeout(Duration::from_secs(60), rx.changed()).await;
        if matches!(changed, Ok(Err(_))) {
            break;
        }
        let snap: Arc<Snapshot> = rx.borrow_and_update().clone();
        let body = renderer.render(&targets, &snap);
        let now = clock.now_ms();
        for (line, minute) in shown(&body.plain(), &family) {
            first.entry((line.to_vec(), minute)).or_insert(now);
        }
    }
    let mut lines: Vec<Vec<u8>> = first.keys().map(|(l, _)| l.clone()).collect();
    lines.sort();
    lines.dedup();
    let mut r = Run {
        delays: Vec::new(),
        late: Vec::new(),
        late_skipped: 0,
        skipped: 0,
        calls_per_minute: 0.0,
        calls_per_minute_all: 0.0,
    };
    // Minutes published inside the measured window.
    let m0 = (measure_from / MIN + 1) * MIN;
    let mut m = m0;
    while case.model.published_at(m) < end {
        let published = case.model.published_at(m);
        if published >= measure_from {
            let late = case.model.is_late(m);
            for line in &lines {
                match first.get(&(line.clone(), m)) {
                    Some(t) => {
                        let d = (t - published) as f64 / 1000.0;
                        if late {
                            r.late.push(d)
                        } else {
                            r.delays.push(d)
                        }
                    }
                    None if late => r.late_skipped += 1,
                    None => r.skipped += 1,
                }
            }
        }
        m += MIN;
    }
    let calls = cloud.calls();
    let first_call = calls.first().map_or(start_ms, |c| c.to_ms);
    let in_window = calls
        .iter()
        .filter(|c| c.to_ms >= measure_from && c.to_ms < end)
        .count();
    r.calls_per_minute = in_window as f64 / o.minutes as f64;
    let all = calls.iter().filter(|c| c.to_ms < end).count();
    r.calls_per_minute_all = all as f64 * MIN as f64 / (end - first_call) as f64;
    r
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn fmt(v: f64) -> String {
    if v.is_infinite() {
        "never".into()
    } else if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.1}")
    }
}

/// One table row: a run of `case` at `n` listeners started `phase_s` into a minute.
fn row(o: &Opts, phase_s: i64, n: usize, case: Case, align: bool) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a runtime");
    let mut r = rt.block_on(run(o, phase_s, n, case, align));
    let (p50, p90, max) = (
        pct(&mut r.delays, 0.5),
        pct(&mut r.delays, 0.9),
        pct(&mut r.delays, 1.0),
    );
    let late = if r.late.is_empty() && r.late_skipped == 0 {
        "-".to_string()
    } else {
        format!(
            "{} / {}, {} of {} pairs",
            fmt(pct(&mut r.late, 0.5)),
            fmt(pct(&mut r.late, 1.0)),
            r.late_skipped,
            r.late_skipped + r.late.len()
        )
    };
    let shown = r.delays.len() + r.skipped;
    format!(
        "| {phase_s} | {n} | {} | {align} | {} | {} | {} | {:.1} % | {late} | {:.2} ; {:.2} |",
        case.name,
        fmt(p50),
        fmt(p90),
        fmt(max),
        100.0 * r.skipped as f64 / shown.max(1) as f64,
        r.calls_per_minute,
        r.calls_per_minute_all
    )
}

fn main() {
    let o = opts();
    println!(
        "# collection.align: delay from a minute's publication to its first appearance on /metrics\n"
    );
    println!(
        "Virtual time (tokio paused clock, in-process): real Collector + Renderer, FakeCloud with 50 ms \
         per CES call; default config (60 s interval, 13 metrics, 500 per batch). Started {:?} s into a \
         minute; {} minutes of warm-up, then {} measured minutes. Delays per (series, minute), seconds.\n",
        o.phases_s, o.warmup, o.minutes
    );
    println!(
        "| start phase s | listeners | lag | align | p50 | p90 | max | overtaken | late minutes: p50 / max, overtaken | CES calls/min (measured; whole run) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for &phase_s in &o.phases_s {
        for &n in &o.sizes {
            for case in cases() {
                for align in [false, true] {
                    println!("{}", row(&o, phase_s, n, case, align));
                }
            }
        }
    }
}
