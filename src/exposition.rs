//! The exposition body of the cloud series, rendered once per collection or discovery change (never per
//! scrape) and kept as shared gzip-compressed bytes; the plain text is derived on the first plain scrape
//! of a body and kept with it.

use crate::collector::{MetricIndex, SeriesKey, Snapshot};
use crate::config::{Config, Filter, format_duration};
use crate::discovery::Problem;
use crate::discovery::inventory::{Target, Targets};
use crate::discovery::pools::PoolTarget;
use bytes::Bytes;
use std::fmt::Write as _;
use std::io::Read as _;
use std::io::Write as _;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::time::Instant;

/// Plain text is handed to the compressor in pieces of this size, so a render never holds the whole plain
/// body (34 MiB at 10,000 listeners) next to the one being served.
const RENDER_CHUNK: usize = 256 * 1024;

/// A rendered body. Cloning is cheap (reference-counted bytes; clones share the derived plain text).
#[derive(Debug, Clone, Default)]
pub struct Body {
    /// The cloud series as one complete gzip member; further members may be appended (RFC 1952 §2.2).
    pub gzip: Bytes,
    /// The plain text, decompressed from `gzip` when first asked for. Prometheus asks for gzip by
    /// default, so most bodies never hold their plain text (about 14 times the gzip size).
    plain: Arc<OnceLock<Bytes>>,
    /// Timestamp of the newest datapoint in the body.
    pub newest_ms: Option<i64>,
    /// Cloud series in the body.
    pub series: usize,
    /// When the first value in the body passes its staleness bound: the body must be rendered again.
    pub expires: Option<Instant>,
    /// What the targets behind this body were, so the exporter's own gauges that describe them are
    /// served from the same state as the series (one scrape never disagrees with itself).
    pub services: usize,
    /// Listeners attributed (`elb_exporter_listeners`).
    pub listeners: usize,
    /// Discovery problem counts (`elb_exporter_discovery_problems`).
    pub problems: Vec<(Problem, usize)>,
}

impl Body {
    /// A body holding `gzip`; the target counts start at zero.
    pub fn new(gzip: Bytes, newest_ms: Option<i64>, series: usize) -> Self {
        Body {
            gzip,
            plain: Arc::default(),
            newest_ms,
            series,
            ..Body::default()
        }
    }

    /// The plain text if it has been derived already.
    pub fn plain_ready(&self) -> Option<Bytes> {
        self.plain.get().cloned()
    }

    /// The plain text. The first call decompresses (about 0.1 s of one core at 10,000 listeners);
    /// concurrent callers wait for that one rather than decompressing again. Blocking: call it off the
    /// async workers.
    pub fn plain(&self) -> Bytes {
        self.plain.get_or_init(|| gunzip(&self.gzip)).clone()
    }
}

/// Decompresses gzip members we produced ourselves; the size comes from the trailer (ISIZE), so the
/// buffer is allocated once and exactly.
fn gunzip(gz: &[u8]) -> Bytes {
    if gz.is_empty() {
        return Bytes::new();
    }
    let isize_hint = gz
        .len()
        .checked_sub(4)
        .and_then(|i| gz.get(i..))
        .and_then(|t| <[u8; 4]>::try_from(t).ok())
        .map_or(0, |t| u32::from_le_bytes(t) as usize);
    let mut out = Vec::with_capacity(isize_hint);
    // Our own gzip cannot be corrupt; if it were, the scrape gets what decoded.
    let _ = flate2::read::MultiGzDecoder::new(gz).read_to_end(&mut out);
    Bytes::from(out)
}

/// Compresses text as it is written, a chunk at a time.
struct GzSink {
    buf: String,
    enc: flate2::write::GzEncoder<Vec<u8>>,
}

impl GzSink {
    fn new(expected_plain: usize) -> Self {
        GzSink {
            buf: String::with_capacity(RENDER_CHUNK + 4096),
            enc: flate2::write::GzEncoder::new(
                Vec::with_capacity(expected_plain / 12 + 64),
                flate2::Compression::fast(),
            ),
        }
    }

    /// Hands the text written so far to the compressor once a chunk is full.
    fn flush_if_full(&mut self) {
        if self.buf.len() >= RENDER_CHUNK {
            // Writing into a Vec cannot fail.
            let _ = self.enc.write_all(self.buf.as_bytes());
            self.buf.clear();
        }
    }

    fn finish(mut self) -> Vec<u8> {
        let _ = self.enc.write_all(self.buf.as_bytes());
        let mut out = self.enc.finish().unwrap_or_default();
        // Kept for a whole interval: do not hold the growth slack.
        out.shrink_to_fit();
        out
    }
}

/// Unit and meaning of the documented SYS.ELB listener metrics, for HELP.
pub fn describe(metric: &str) -> (&'static str, &'static str) {
    match metric {
        "m1_cps" => ("concurrent connections", "Count"),
        "m2_act_conn" => ("active connections", "Count"),
        "m3_inact_conn" => ("inactive connections", "Count"),
        "m4_ncps" => ("new connections per second", "Count/s"),
        "m5_in_pps" => ("incoming packets per second", "Count/s"),
        "m6_out_pps" => ("outgoing packets per second", "Count/s"),
        "m7_in_Bps" => ("inbound rate", "Byte/s"),
        "m8_out_Bps" => ("outbound rate", "Byte/s"),
        "m22_in_bandwidth" => ("inbound bandwidth", "bit/s"),
        "m23_out_bandwidth" => ("outbound bandwidth", "bit/s"),
        "m1e_server_rps" => ("TCP resets sent by backend servers per second", "Count/s"),
        "m1f_lvs_rps" => (
            "TCP resets generated by the load balancer per second",
            "Count/s",
        ),
        "m21_client_rps" => ("TCP resets sent by clients per second", "Count/s"),
        "mb_l7_qps" => ("layer-7 requests per second", "Count/s"),
        "m14_l7_rt" | "m1c_l7_rt_max" | "m1d_l7_rt_min" => ("layer-7 response time", "ms"),
        "m17_l7_upstream_rt" | "m1a_l7_upstream_rt_max" | "m1b_l7_upstream_rt_min" => {
            ("backend response time", "ms")
        }
        m if m.starts_with("m17_l7_upstream_rt_p") => ("backend response time percentile", "ms"),
        "m24_l7_req_Bps" => ("layer-7 request bandwidth", "bit/s"),
        "m25_l7_resp_Bps" => ("layer-7 response bandwidth", "bit/s"),
        "m9_abnormal_servers" => ("unhealthy backend servers", "Count"),
        "ma_normal_servers" => ("healthy backend servers", "Count"),
        m if m.contains("_l7_http_") || m.contains("_l7_upstream_") => {
            ("layer-7 status codes per second", "Count/s")
        }
        _ => ("Cloud Eye listener metric", "unit as reported by Cloud Eye"),
    }
}

/// Renders the cloud families and `elb_exporter_listener_info` (and the pool ones).
#[derive(Debug, Clone)]
pub struct Renderer {
    metrics: Arc<Vec<String>>,
    /// A value older than this (since CES last returned it) is not served.
    stale_after: Duration,
    /// `# HELP`/`# TYPE` header and family name per metric.
    headers: Vec<(String, String)>,
    /// The same for `collection.pool_metrics` (`<prefix>_sys_elb_pool_<metric>`).
    pool_headers: Vec<(String, String)>,
}

/// `# HELP`/`# TYPE` header and family name of each metric of `object` (`listener` or `pool`).
fn family_headers(
    prefix: &str,
    object: &str,
    metrics: &[String],
    filter: Filter,
    interval: Duration,
    lookback: Duration,
) -> Vec<(String, String)> {
    metrics
        .iter()
        .map(|m| {
            let family = format!("{prefix}_sys_elb_{object}_{m}");
            let (what, unit) = describe(m);
            let help = format!(
                "Cloud Eye SYS.ELB {object} metric {m}: {what} ({unit}); newest {} datapoint of the last {}, collected in the background every {}.",
                filter.as_str(),
                format_duration(lookback),
                format_duration(interval)
            );
            (
                format!(
                    "# HELP {family} {}\n# TYPE {family} gauge\n",
                    escape_help(&help)
                ),
                family,
            )
        })
        .collect()
}

/// Where one render accumulates its series.
struct Acc {
    sink: GzSink,
    newest: Option<i64>,
    expires: Option<Instant>,
    series: usize,
}

impl Renderer {
    /// A renderer writing `<prefix>_<metric>` families for `metrics`.
    pub fn new(
        prefix: &str,
        metrics: Arc<Vec<String>>,
        filter: Filter,
        interval: Duration,
        lookback: Duration,
    ) -> Self {
        let headers = family_headers(prefix, "listener", &metrics, filter, interval, lookback);
        Renderer {
            metrics,
            headers,
            pool_headers: Vec::new(),
            stale_after: interval.saturating_mul(DEFAULT_STALE_INTERVALS),
        }
    }

    /// Also render `<prefix>_sys_elb_pool_<metric>` for `pool_metrics` (series key indices after the
    /// listener metrics, as the collector numbers them).
    pub fn with_pool_metrics(
        mut self,
        prefix: &str,
        pool_metrics: &[String],
        filter: Filter,
        interval: Duration,
        lookback: Duration,
    ) -> Self {
        self.pool_headers =
            family_headers(prefix, "pool", pool_metrics, filter, interval, lookback);
        self
    }

    /// Serve values for at most `d` after CES last returned them.
    pub fn with_stale_after(mut self, d: Duration) -> Self {
        self.stale_after = d;
        self
    }

    /// The renderer of `c`: prefix, metrics, filter, staleness.
    pub fn from_config(c: &Config) -> Self {
        Renderer::new(
            &c.prefix,
            Arc::new(c.collection.metrics.clone()),
            c.collection.filter,
            c.collection.interval,
            c.collection.lookback,
        )
        .with_stale_after(
            c.collection
                .interval
                .saturating_mul(c.collection.stale_intervals),
        )
        .with_pool_metrics(
            &c.prefix,
            &c.collection.pool_metrics,
            c.collection.filter,
            c.collection.interval,
            c.collection.lookback,
        )
    }

    /// The body for the current targets joined with the current data, now.
    pub fn render(&self, targets: &Targets, snap: &Snapshot) -> Body {
        self.render_at(targets, snap, Instant::now())
    }

    /// The body at `now`: a target without data has no series; data without a target (a deleted
    /// Service) is not shown; a value older than the staleness bound is not shown.
    pub fn render_at(&self, targets: &Targets, snap: &Snapshot, now: Instant) -> Body {
        let labels: Vec<String> = targets.listeners.iter().map(label_set).collect();
        let pool_labels: Vec<String> = targets.pools.iter().map(pool_label_set).collect();
        let mut acc = Acc {
            sink: GzSink::new(
                (targets.listeners.len() * (self.metrics.len() + 1)
                    + targets.pools.len() * (self.pool_headers.len() + 1))
                    * 260
                    + 4096,
            ),
            newest: None,
            expires: None,
            series: 0,
        };
        let stale_after = snap.stale_after.unwrap_or(self.stale_after);
        let keys = targets.listeners.iter().map(|t| t.listener_id.clone());
        self.families(
            &mut acc,
            &self.headers,
            0,
            keys,
            &labels,
            snap,
            (now, stale_after),
        );
        if !targets.listeners.is_empty() {
            acc.sink.buf.push_str("# HELP elb_exporter_listener_info ELB listeners attributed to a Kubernetes Service port or Ingress (uid: the Service's or Ingress's; elb_name: empty until known); always 1.\n# TYPE elb_exporter_listener_info gauge\n");
            for (l, t) in labels.iter().zip(&targets.listeners) {
                let _ = write!(acc.sink.buf, "elb_exporter_listener_info{{{l},");
                push_labels(
                    &mut acc.sink.buf,
                    &[("uid", &t.uid), ("elb_name", &t.elb_name)],
                );
                acc.sink.buf.push_str("} 1\n");
                acc.sink.flush_if_full();
            }
        }
        let keys = targets.pools.iter().map(|p| p.pool_id.clone());
        let first = self.metrics.len();
        self.families(
            &mut acc,
            &self.pool_headers,
            first,
            keys,
            &pool_labels,
            snap,
            (now, stale_after),
        );
        if !targets.pools.is_empty() {
            acc.sink.buf.push_str("# HELP elb_exporter_pool_info ELB backend server groups behind Ingress listeners attributed to their backend Service (uid: the Ingress's; elb_name: empty until known); always 1.\n# TYPE elb_exporter_pool_info gauge\n");
            for (l, p) in pool_labels.iter().zip(&targets.pools) {
                let _ = write!(acc.sink.buf, "elb_exporter_pool_info{{{l},");
                push_labels(
                    &mut acc.sink.buf,
                    &[("uid", &p.uid), ("elb_name", &p.elb_name)],
                );
                acc.sink.buf.push_str("} 1\n");
                acc.sink.flush_if_full();
            }
        }
        let Acc {
            sink,
            newest,
            expires,
            series,
        } = acc;
        Body {
            expires,
            services: targets.services,
            listeners: targets.listeners.len(),
            problems: Problem::ALL
                .iter()
                .map(|p| (*p, targets.problems.get(p).copied().unwrap_or(0)))
                .collect(),
            ..Body::new(Bytes::from(sink.finish()), newest, series)
        }
    }
}

impl Renderer {
    /// Writes one family per header, each with the fresh values of `ids` (metric index `first` + the
    /// header's): one lookup key per object, its metric index set per family, so an id is cloned once
    /// per render, not once per datapoint.
    #[allow(clippy::too_many_arguments)]
    fn families(
        &self,
        acc: &mut Acc,
        headers: &[(String, String)],
        first: usize,
        ids: impl Iterator<Item = Arc<str>>,
        labels: &[String],
        snap: &Snapshot,
        (now, stale_after): (Instant, Duration),
    ) {
        let mut keys: Vec<SeriesKey> = ids.map(|id| SeriesKey::new(id, 0)).collect();
        for (m, (header, family)) in headers.iter().enumerate() {
            let mut wrote_header = false;
            for (key, l) in keys.iter_mut().zip(labels) {
                key.metric = MetricIndex::new(first + m);
                let Some(s) = snap.get(key) else {
                    continue;
                };
                let Some(until) = s.fetched.checked_add(stale_after) else {
                    continue;
                };
                if until <= now {
                    continue;
                }
                acc.expires = Some(acc.expires.map_or(until, |e| e.min(until)));
                if !wrote_header {
                    acc.sink.buf.push_str(header);
                    wrote_header = true;
                }
                let _ = writeln!(acc.sink.buf, "{family}{{{l}}} {}", FloatFmt(s.value));
                acc.sink.flush_if_full();
                acc.series += 1;
                acc.newest = acc.newest.max(Some(s.timestamp_ms));
            }
        }
    }
}

/// `collection.stale_intervals`' default, for renderers built without a config.
const DEFAULT_STALE_INTERVALS: u32 = 3;

/// Compresses one gzip member (fast level: the body is re-rendered every interval).
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(data.len() / 10 + 64),
        flate2::Compression::fast(),
    );
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(data);
    let mut out = enc.finish().unwrap_or_default();
    // Kept for a whole interval: do not hold the growth slack.
    out.shrink_to_fit();
    out
}

fn label_set(t: &Target) -> String {
    let mut s = String::with_capacity(256);
    push_labels(
        &mut s,
        &[
            ("namespace", &t.namespace),
            (t.owner.label(), &t.service),
            ("lbaas_instance_id", &t.elb_id),
            ("lbaas_listener_id", &t.listener_id),
            ("listener_name", &t.listener_name),
        ],
    );
    let _ = write!(s, ",port=\"{}\",protocol=\"", t.port);
    escape_label_into(&mut s, &t.protocol);
    s.push('"');
    s
}

fn pool_label_set(p: &PoolTarget) -> String {
    let mut s = String::with_capacity(256);
    push_labels(
        &mut s,
        &[
            ("namespace", &p.namespace),
            ("service", &p.service),
            ("ingress", &p.ingress),
            ("lbaas_instance_id", &p.elb_id),
            ("lbaas_pool_id", &p.pool_id),
            ("pool_name", &p.pool_name),
        ],
    );
    let _ = write!(s, ",port=\"{}\"", p.port);
    s
}

/// `k1="v1",k2="v2"…` with the values escaped.
fn push_labels(s: &mut String, pairs: &[(&str, &str)]) {
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(k);
        s.push_str("=\"");
        escape_label_into(s, v);
        s.push('"');
    }
}

/// Label value escaping of the text format: `\` → `\\`, `"` → `\"`, newline → `\n`.
pub fn escape_label_into(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Escapes a label value for the text format (`\`, `"`, newline).
pub fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    escape_label_into(&mut s, v);
    s
}

/// HELP escaping: `\` → `\\`, newline → `\n`.
pub fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Prometheus float formatting: shortest round-trip decimal; `+Inf`, `-Inf`, `NaN` spelled out.
pub struct FloatFmt(pub f64);

impl std::fmt::Display for FloatFmt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = self.0;
        if v.is_nan() {
            f.write_str("NaN")
        } else if v.is_infinite() {
            f.write_str(if v > 0.0 { "+Inf" } else { "-Inf" })
        } else {
            write!(f, "{v}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping() {
        assert_eq!(escape_label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label("line\nbreak"), "line\\nbreak");
        assert_eq!(escape_label("ünï 名"), "ünï 名");
        assert_eq!(escape_help("a\\b\nc"), "a\\\\b\\nc");
    }

    #[test]
    fn values_past_their_staleness_bound_are_not_served() {
        use crate::collector::Sample;
        use crate::discovery::inventory::Target;
        let minute = Duration::from_secs(60);
        let r = Renderer::new(
            "p",
            Arc::new(vec!["m1_cps".into()]),
            Filter::Average,
            minute,
            5 * minute,
        )
        .with_stale_after(3 * minute);
        let target = Target {
            owner: crate::discovery::Owner::Service,
            namespace: "ns".into(),
            service: "svc".into(),
            elb_id: "elb".into(),
            listener_id: "l1".into(),
            listener_name: "n".into(),
            port: 80,
            protocol: "TCP".into(),
            uid: "u".into(),
            elb_name: "".into(),
        };
        let targets = Targets {
            services: 1,
            listeners: vec![target],
            ..Targets::default()
        };
        let fetched = Instant::now();
        let sample = Sample {
            value: 7.0,
            timestamp_ms: 1,
            fetched,
        };
        let snap = Snapshot {
            values: Arc::new(
                [(SeriesKey::new("l1".into(), 0), sample)]
                    .into_iter()
                    .collect(),
            ),
            ..Snapshot::default()
        };
        let fresh = r.render_at(
            &targets,
            &snap,
            fetched + 3 * minute - Duration::from_millis(1),
        );
        assert_eq!(fresh.series, 1);
        assert_eq!(fresh.expires, Some(fetched + 3 * minute));
        assert_eq!((fresh.services, fresh.listeners), (1, 1));
        let stale = r.render_at(&targets, &snap, fetched + 3 * minute);
        assert_eq!(stale.series, 0);
        assert!(!String::from_utf8_lossy(&stale.plain()).contains("p_sys_elb_listener_m1_cps{"));
        assert_eq!(stale.expires, None);
    }

    #[test]
    fn floats() {
        assert_eq!(FloatFmt(10312.5).to_string(), "10312.5");
        assert_eq!(FloatFmt(12.0).to_string(), "12");
        assert_eq!(FloatFmt(0.1).to_string(), "0.1");
        assert_eq!(FloatFmt(f64::INFINITY).to_string(), "+Inf");
    }

    #[test]
    fn plain_text_is_derived_from_the_gzip_body_once() {
        let text = "a 1\n".repeat(100_000);
        let body = Body::new(Bytes::from(gzip(text.as_bytes())), None, 0);
        assert_eq!(
            body.plain_ready(),
            None,
            "not derived before it is asked for"
        );
        let clone = body.clone();
        assert_eq!(&body.plain()[..], text.as_bytes());
        let derived = clone.plain_ready().expect("clones share the derived text");
        assert_eq!(derived.as_ptr(), body.plain().as_ptr(), "derived once");
        assert_eq!(&Body::default().plain()[..], b"");
    }
}
