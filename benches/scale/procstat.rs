//! Figures read from /proc: CPU ticks, load average, VmRSS/VmHWM and a peak-RSS sampler.

use std::process::Command;
use std::time::{Duration, Instant};

pub(super) fn proc_stat_cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command: state is field 3, utime 14, stime 15.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

pub(super) fn clock_ticks_per_sec() -> f64 {
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

pub(super) fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

pub(super) fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Samples the exporter's VmRSS every 10 ms in a thread, so the peak can be attributed to a phase.
pub(super) struct RssSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<Vec<(Instant, u64)>>>,
    marks: Vec<(&'static str, Instant)>,
}

impl RssSampler {
    pub(super) fn start(pid: u32) -> RssSampler {
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
    pub(super) fn mark(&mut self, phase: &'static str) {
        self.marks.push((phase, Instant::now()));
    }

    /// Peak sampled RSS (KiB) per phase, in phase order.
    pub(super) fn finish(mut self) -> Vec<(&'static str, u64)> {
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
