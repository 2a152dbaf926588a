//! Synthetic, deterministic data: metric values, timestamps and identifiers derived from seeds.

use super::pools;
use super::{ces::MetricQuery, elb::is_l7};
use crate::signer;
use std::time::{Duration, UNIX_EPOCH};

pub(super) const MINUTE_MS: i64 = 60_000;

pub(super) fn created_secs(id: &str) -> u64 {
    // Somewhere in 2022–2023, stable per id.
    1_640_995_200 + hash_u64(&[id, "created"]) % (2 * 365 * 86_400)
}

pub(super) fn iso8601(secs: u64) -> String {
    let d = signer::sdk_date(UNIX_EPOCH + Duration::from_secs(secs));
    // `YYYYMMDDTHHMMSSZ` → `YYYY-MM-DDTHH:MM:SSZ`
    match (
        d.get(0..4),
        d.get(4..6),
        d.get(6..8),
        d.get(9..11),
        d.get(11..13),
        d.get(13..15),
    ) {
        (Some(y), Some(mo), Some(da), Some(h), Some(mi), Some(s)) => {
            format!("{y}-{mo}-{da}T{h}:{mi}:{s}Z")
        }
        _ => d,
    }
}

pub(super) fn derived_hex(seed: &str) -> String {
    signer::sha256_hex(seed.as_bytes())
        .get(..32)
        .unwrap_or_default()
        .to_string()
}

pub(super) fn uuid_from(seed: &str) -> String {
    let h = derived_hex(seed);
    match (
        h.get(0..8),
        h.get(8..12),
        h.get(12..16),
        h.get(16..20),
        h.get(20..32),
    ) {
        (Some(a), Some(b), Some(c), Some(d), Some(e)) => format!("{a}-{b}-{c}-{d}-{e}"),
        _ => h,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Family {
    L4,
    TcpResets,
    L7,
    /// Backend server group metrics that listeners do not have.
    PoolOnly,
}

impl Family {
    pub(super) fn applies_to(self, protocol: &str) -> bool {
        match self {
            Family::L4 => true,
            Family::TcpResets => protocol == "TCP",
            Family::L7 => is_l7(protocol),
            Family::PoolOnly => false,
        }
    }
}

pub(super) struct MetricSpec {
    pub(super) unit: &'static str,
    pub(super) family: Family,
}

/// Listener-level SYS.ELB metrics of the reference's catalogue.
pub(super) fn metric_spec(name: &str) -> Option<MetricSpec> {
    let (unit, family) = match name {
        "m1_cps" | "m2_act_conn" | "m3_inact_conn" => ("Count", Family::L4),
        "m4_ncps" | "m5_in_pps" | "m6_out_pps" => ("Count/s", Family::L4),
        "m7_in_Bps" | "m8_out_Bps" => ("Byte/s", Family::L4),
        "m22_in_bandwidth" | "m23_out_bandwidth" => ("bit/s", Family::L4),
        "m1e_server_rps" | "m1f_lvs_rps" | "m21_client_rps" => ("Count/s", Family::TcpResets),
        "mb_l7_qps"
        | "mc_l7_http_2xx"
        | "md_l7_http_3xx"
        | "me_l7_http_4xx"
        | "mf_l7_http_5xx"
        | "m10_l7_http_other_status"
        | "m11_l7_http_404"
        | "m12_l7_http_499"
        | "m13_l7_http_502"
        | "m15_l7_upstream_4xx"
        | "m16_l7_upstream_5xx" => ("Count/s", Family::L7),
        "m14_l7_rt"
        | "m1c_l7_rt_max"
        | "m1d_l7_rt_min"
        | "m17_l7_upstream_rt"
        | "m1a_l7_upstream_rt_max"
        | "m1b_l7_upstream_rt_min"
        | "m17_l7_upstream_rt_p90"
        | "m17_l7_upstream_rt_p95"
        | "m17_l7_upstream_rt_p99" => ("ms", Family::L7),
        other => (pools::pool_only_unit(other)?, Family::PoolOnly),
    };
    Some(MetricSpec { unit, family })
}

/// Datapoints of one series: every minute (or period bucket) from `from` up to `to` and the newest minute
/// with data, both inclusive. Buckets aggregate the minute values with the requested statistic.
pub(super) fn points(
    listener: &str,
    m: &MetricQuery,
    from: i64,
    to: i64,
    newest: i64,
    period_ms: i64,
    filter: &str,
) -> Vec<(i64, f64)> {
    let mut out = Vec::new();
    let mut t = from;
    if period_ms == MINUTE_MS {
        while t <= to.min(newest) {
            out.push((t, datapoint_value(listener, &m.metric_name, t)));
            t += MINUTE_MS;
        }
        return out;
    }
    while t <= to && t + period_ms - MINUTE_MS <= newest {
        let values: Vec<f64> = (0..period_ms / MINUTE_MS)
            .map(|k| datapoint_value(listener, &m.metric_name, t + k * MINUTE_MS))
            .collect();
        out.push((t, round2(aggregate(&values, filter))));
        t += period_ms;
    }
    out
}

fn aggregate(values: &[f64], filter: &str) -> f64 {
    let n = values.len().max(1) as f64;
    let sum: f64 = values.iter().sum();
    let mean = sum / n;
    match filter {
        "max" => values.iter().copied().fold(f64::MIN, f64::max),
        "min" => values.iter().copied().fold(f64::MAX, f64::min),
        "sum" => sum,
        "variance" => values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n,
        _ => mean,
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// FNV-1a with a fixed basis (never std's randomized hasher), then a splitmix finish so nearby inputs spread.
pub(super) fn hash_u64(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.as_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Uniform in [0, 1).
fn unit(parts: &[&str]) -> f64 {
    (hash_u64(parts) >> 11) as f64 / (1u64 << 53) as f64
}

/// Per-listener traffic level, 1× to 10×.
fn level(listener: &str) -> f64 {
    10f64.powf(unit(&[listener, "level"]))
}

/// A smooth daily curve in [0.2, 1.0], peaking around 12:00 UTC (evening in China) ± 2 h per listener.
fn diurnal(listener: &str, minute_ms: i64) -> f64 {
    let day = minute_ms.rem_euclid(86_400_000) as f64 / 86_400_000.0;
    let peak = 0.5 + (unit(&[listener, "phase"]) - 0.5) * (4.0 / 24.0);
    0.6 + 0.4 * (std::f64::consts::TAU * (day - peak)).cos()
}

/// Uniform in [-1, 1), per (listener, metric, minute).
fn noise(listener: &str, metric: &str, minute_ms: i64) -> f64 {
    unit(&[listener, metric, &minute_ms.to_string()]) * 2.0 - 1.0
}

fn traffic(listener: &str, metric: &str, minute_ms: i64, base: f64) -> f64 {
    base * level(listener)
        * diurnal(listener, minute_ms)
        * (1.0 + 0.1 * noise(listener, metric, minute_ms))
}

/// The value the simulator serves for one listener, metric and minute (any ms inside the minute gives the
/// minute's value). Connection counts and resets are whole numbers; everything is rounded to 2 decimals.
/// Unknown metrics give 0.
pub fn datapoint_value(listener_id: &str, metric: &str, minute_ms: i64) -> f64 {
    let t = minute_ms.div_euclid(MINUTE_MS) * MINUTE_MS;
    let l = listener_id;
    let qps = || traffic(l, "mb_l7_qps", t, 100.0);
    let share = |ratio: f64| qps() * ratio * (1.0 + 0.2 * noise(l, metric, t));
    let rt = || {
        (5.0 + 45.0 * unit(&[l, "rt"]))
            * (0.8 + 0.4 * diurnal(l, t))
            * (1.0 + 0.1 * noise(l, "rt", t))
    };
    let resets = || {
        let base = 2.0 + 18.0 * unit(&[l, metric, "resets"]);
        (base * diurnal(l, t) * (1.0 + 0.5 * noise(l, metric, t)))
            .round()
            .clamp(0.0, 50.0)
    };
    let v = match metric {
        "m1_cps" => traffic(l, metric, t, 250.0).round(),
        "m2_act_conn" => traffic(l, metric, t, 180.0).round(),
        "m3_inact_conn" => traffic(l, metric, t, 70.0).round(),
        "m4_ncps" => traffic(l, metric, t, 40.0),
        "m5_in_pps" => traffic(l, metric, t, 8_000.0),
        "m6_out_pps" => traffic(l, metric, t, 9_000.0),
        "m7_in_Bps" => traffic(l, metric, t, 700_000.0),
        "m8_out_Bps" => traffic(l, metric, t, 1_000_000.0),
        "m22_in_bandwidth" => {
            8.0 * traffic(l, "m7_in_Bps", t, 700_000.0) * (1.0 + 0.02 * noise(l, metric, t))
        }
        "m23_out_bandwidth" => {
            8.0 * traffic(l, "m8_out_Bps", t, 1_000_000.0) * (1.0 + 0.02 * noise(l, metric, t))
        }
        "m1e_server_rps" | "m1f_lvs_rps" | "m21_client_rps" => resets(),
        "mb_l7_qps" => qps(),
        "mc_l7_http_2xx" => share(0.92),
        "md_l7_http_3xx" => share(0.03),
        "me_l7_http_4xx" => share(0.04),
        "mf_l7_http_5xx" => share(0.008),
        "m10_l7_http_other_status" => share(0.002),
        "m11_l7_http_404" => share(0.025),
        "m12_l7_http_499" => share(0.004),
        "m13_l7_http_502" => share(0.002),
        "m15_l7_upstream_4xx" => share(0.035),
        "m16_l7_upstream_5xx" => share(0.006),
        "m14_l7_rt" => rt(),
        "m1c_l7_rt_max" => rt() * 8.0,
        "m1d_l7_rt_min" => rt() * 0.1,
        "m17_l7_upstream_rt" => rt() * 0.85,
        "m1a_l7_upstream_rt_max" => rt() * 7.0,
        "m1b_l7_upstream_rt_min" => rt() * 0.08,
        "m17_l7_upstream_rt_p90" => rt() * 0.85 * 1.6,
        "m17_l7_upstream_rt_p95" => rt() * 0.85 * 2.0,
        "m17_l7_upstream_rt_p99" => rt() * 0.85 * 3.2,
        m if pools::pool_only_unit(m).is_some() => pools::pool_only_value(qps(), m, noise(l, m, t)),
        _ => 0.0,
    };
    round2(v)
}
