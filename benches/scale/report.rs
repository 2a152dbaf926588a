//! The Markdown tables and the run description the bench prints.

use super::{BenchOpts, CES_LATENCY, Fixture, Row, Side, drivers::Wrk, http::Lat};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

pub(super) fn ms(v: f64) -> String {
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

pub(super) fn secs(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.2} s"))
}

pub(super) fn size(bytes: usize) -> String {
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

/// floor(ELBs of the API / page size) + 1 per API: the load balancer (name) listings of a refresh when the
/// project holds only the fixture's ELBs (pages of 500 on v2, 2000 on v3).
fn names_bound(r: &Row) -> (usize, usize) {
    let bound = |n: usize, page: usize| if n == 0 { 0 } else { n / page + 1 };
    (bound(r.shared, 500), bound(r.elbs - r.shared, 2000))
}

fn inventory_table(t: &mut String, rows: &[Row]) {
    let _ = writeln!(
        t,
        "#### Cold start and inventory (realistic fixture, default configuration)\n"
    );
    let _ = writeln!(
        t,
        "| listeners (ELBs: shared / dedicated) | start → ready | start → all series | ELB calls to ready: v2 / v3 | ELB calls per refresh: v2 / v3 (bound) | refresh: first → last call | new Service during the refresh → listener_info / first series | ELB name listings (load balancers): to ready v2 / v3, per refresh v2 / v3 (bound), new Services' |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|---|---|");
    for r in rows
        .iter()
        .filter(|r| r.fixture == Some(Fixture::Realistic))
    {
        let (b2, b3) = refresh_bound(r);
        let (n2, n3) = names_bound(r);
        let _ = writeln!(
            t,
            "| {} ({} / {}) | {:.2} s | {} | {} / {} | {} ({b2} / {b3}) | {} | {} / {}{} | {} / {}, {} ({n2} / {n3}), {} |",
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
            r.names_ready.0,
            r.names_ready.1,
            r.names_refresh
                .map_or("n/a".into(), |(a, b)| format!("{a} / {b}")),
            r.names_new.map_or("n/a".into(), |n| n.to_string()),
        );
    }
    t.push('\n');
}

pub(super) fn tables(rows: &[Row]) -> String {
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

pub(super) fn describe_run(opts: &BenchOpts, rows: &[Row], elapsed: Duration) -> String {
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
