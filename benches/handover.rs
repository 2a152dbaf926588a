//! Issue 15's warm copy: what mirroring the leader's series costs per cycle and per follower, at 1,000
//! and 10,000 listeners with the default 13 metrics: the copy's size (plain and gzip, as sent), the
//! leader's time to encode it and the follower's to decode it. Ids are 36-character UUIDs as the ELB API
//! returns them, values a mix of counts and fractional rates, every value with its own age, and the
//! aligned schedule's state as a busy leader carries it.
//!
//! `cargo bench --bench handover`

use elb_exporter::collector::{Sample, SeriesKey, Snapshot};
use elb_exporter::config::Config;
use elb_exporter::handover::{Layout, decode, encode};
use elb_exporter::schedule::Aligner;
use std::collections::HashMap;
use std::io::Read as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

const METRICS: usize = 13;
const RUNS: usize = 5;

fn config() -> Config {
    let yaml = "auth: {auth_url: 'https://iam.cn-east-3.myhuaweicloud.com/v3', region: cn-east-3, \
                project_id: p, access_key: a, secret_key: s}\n";
    Config::from_yaml(yaml, &|_: &str| None).expect("the default config loads")
}

/// A deterministic stream of numbers, so every run encodes the same copy.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 11
    }
}

fn uuid(r: &mut Lcg) -> String {
    let h = format!("{:016x}{:016x}", r.next(), r.next());
    format!(
        "{}-{}-4{}-8{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

fn snapshot(cfg: &Config, listeners: usize, now: tokio::time::Instant) -> Snapshot {
    let mut r = Lcg(7);
    let mut values = HashMap::with_capacity(listeners * METRICS);
    for _ in 0..listeners {
        let id: Arc<str> = Arc::from(uuid(&mut r));
        for m in 0..METRICS {
            let value = if m % 3 == 0 {
                (r.next() % 5_000) as f64
            } else {
                (r.next() % 100_000_000) as f64 / 100.0
            };
            let age = Duration::from_millis(r.next() % 60_000);
            let sample = Sample {
                value,
                timestamp_ms: 1_800_000_000_000 - (r.next() % 2) as i64 * 60_000,
                fetched: now.checked_sub(age).unwrap_or(now),
            };
            values.insert(SeriesKey::new(id.clone(), m), sample);
        }
    }
    let mut aligner = Aligner::default();
    // The default plan's calls (packed batches) under the default CES limit.
    let calls = (listeners * METRICS).div_ceil(cfg.scrape_batch_size) as f64;
    aligner.set_budget(calls, f64::from(cfg.cloud.rate_limit.ces_per_minute));
    for m in 0..20 {
        let minute = 1_800_000_000_000 + m * 60_000;
        aligner.observe(minute + 80_000, minute - 60_000);
        aligner.observe(minute + 88_000, minute);
        aligner.settle(minute, minute + 80_000, Some(minute + 88_000));
    }
    Snapshot {
        values: Arc::new(values),
        up: true,
        stale_after: Some(Duration::from_secs(180)),
        schedule: Some(Arc::new(aligner)),
        first_cycle_done: true,
        ..Snapshot::default()
    }
}

fn median(mut d: Vec<Duration>) -> Duration {
    d.sort();
    d[d.len() / 2]
}

fn main() {
    let cfg = config();
    let layout = Layout::of(&cfg);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    println!(
        "| listeners | series | copy plain | copy gzip (sent) | encode (leader, median of {RUNS}) | decode (follower) |"
    );
    println!("|---|---|---|---|---|---|");
    for listeners in [1_000, 10_000] {
        let now = tokio::time::Instant::now();
        let s = snapshot(&cfg, listeners, now);
        let (mut enc, mut dec) = (Vec::new(), Vec::new());
        let mut gz = Vec::new();
        for _ in 0..RUNS {
            let t = Instant::now();
            gz = encode(&s, &layout, now);
            enc.push(t.elapsed());
            let t = Instant::now();
            let back = decode(&gz, &layout, tokio::time::Instant::now()).expect("decodes");
            dec.push(t.elapsed());
            assert_eq!(back.len(), s.len(), "every series comes back");
        }
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(gz.as_slice())
            .read_to_end(&mut plain)
            .expect("gzip");
        println!(
            "| {listeners} | {} | {:.2} MB | {:.2} MB | {:.0} ms | {:.0} ms |",
            s.len(),
            plain.len() as f64 / 1e6,
            gz.len() as f64 / 1e6,
            median(enc).as_secs_f64() * 1000.0,
            median(dec).as_secs_f64() * 1000.0
        );
    }
}
