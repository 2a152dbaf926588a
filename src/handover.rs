//! Warm handover: a follower keeps a copy of the leader's cloud series, so that from the moment it takes
//! over it serves them, instead of nothing until its own first cycle (which waits for the previous
//! leader's interval to end, so that no minute is collected twice and the CES budget holds).
//!
//! The leader serves its snapshot on [`PATH`], long-polled (an answer as soon as a newer snapshot is
//! published) and gzip-compressed; a follower mirrors it ([`Mirror`]) from the address the leader
//! advertises on the Lease, and the collector adopts the copy when a term begins. Both sides prove that
//! they hold the same AK/SK: the request and the answer carry an HMAC-SHA256 keyed with the SK over what
//! they say and when, so the copy is readable only by whoever could read CES itself and cannot be
//! forged on the way. The values keep their age, so the adopted copy goes stale exactly as the
//! leader's would have.

use crate::clock::now_ms;
use crate::collector::{MetricIndex, Sample, SeriesKey, Snapshot};
use crate::config::{Config, Credentials};
use crate::leader::{Holder, Leadership};
use crate::schedule::Aligner;
use crate::telemetry::Telemetry;
use arc_swap::ArcSwap;
use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use hmac::{KeyInit, Mac};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Where the leader serves its warm copy.
pub const PATH: &str = crate::config::WARM_COPY_PATH;
/// Carries `<unix ms>:<hex HMAC>` on the request and on the answer.
pub const HEADER: &str = "x-elb-exporter-peer";
/// The answer's snapshot number (`<epoch>.<seq>`), covered by the answer's HMAC.
pub const VERSION_HEADER: &str = "x-elb-exporter-version";
/// A request signed further from the answering replica's clock than this is refused (replays, skew).
const MAX_SKEW_MS: i64 = 300_000;
/// How long the leader holds a request for a snapshot newer than the one the follower has.
const LONG_POLL: Duration = Duration::from_secs(30);
/// Prompt collections publish often; the copy needs to be current to a cycle, not to each of them.
const MIN_GAP: Duration = Duration::from_secs(5);
/// A copy larger than this, uncompressed, is refused (10,000 listeners take about 10 MiB).
const MAX_COPY_BYTES: u64 = 512 << 20;
/// A compressed copy larger than this is refused while it is read (10,000 listeners send about 4 MiB).
const MAX_SENT_BYTES: usize = 256 << 20;
const FORMAT: &str = "elb-exporter-warm-copy 1";

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Why a warm copy was not given or not taken.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// The request or the answer does not prove the same AK/SK.
    #[error("peer authentication failed: {0}")]
    Refused(&'static str),
    /// Asked a replica that does not lead (any more).
    #[error("the peer does not lead; it has no cloud series to give")]
    NotLeading,
    /// The copy does not parse.
    #[error("warm copy line {line}: {what}")]
    Format {
        /// 1-based line of the uncompressed copy.
        line: usize,
        /// What is wrong with it.
        what: &'static str,
    },
    /// The replicas collect different metric lists (a rollout changing `collection.metrics`).
    #[error("the warm copy has another metric layout (collection.metrics or pool_metrics differ)")]
    Layout,
    /// The leader could not be reached or the transfer broke.
    #[error("warm copy request failed: {0}")]
    Http(String),
    /// The leader answered with an unexpected status.
    #[error("the peer answered HTTP {0}")]
    Status(u16),
}

impl HandoverError {
    /// The `reason` label of `elb_exporter_warm_copy_failures_total`.
    pub fn as_str(&self) -> &'static str {
        match self {
            HandoverError::Refused(_) => "refused",
            HandoverError::NotLeading => "not_leading",
            HandoverError::Format { .. } => "format",
            HandoverError::Layout => "layout",
            HandoverError::Http(_) => "unreachable",
            HandoverError::Status(_) => "status",
        }
    }
}

/// The metric lists a copy's indices refer to; replicas exchange copies only when theirs are equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout(String);

impl Layout {
    /// `collection.metrics`, then `collection.pool_metrics` (the order of [`MetricIndex`]).
    pub fn of(cfg: &Config) -> Self {
        let c = &cfg.collection;
        Layout(format!(
            "{};{}",
            c.metrics.join(","),
            c.pool_metrics.join(",")
        ))
    }

    fn metrics(&self) -> usize {
        self.0.split([',', ';']).filter(|m| !m.is_empty()).count()
    }
}

fn mac(creds: &Credentials, parts: &[&str]) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(creds.secret_key.expose().as_bytes())
        .expect("HMAC takes any key length");
    mac.update(creds.access_key.as_bytes());
    for p in parts {
        mac.update(b"\n");
        mac.update(p.as_bytes());
    }
    mac
}

fn token(creds: &Credentials, wall_ms: i64, parts: &[&str]) -> String {
    let ms = wall_ms.to_string();
    let parts: Vec<&str> = [ms.as_str()]
        .into_iter()
        .chain(parts.iter().copied())
        .collect();
    format!(
        "{ms}:{}",
        hex::encode(mac(creds, &parts).finalize().into_bytes())
    )
}

/// Checks `token` (`<unix ms>:<hex>`) against `parts` signed at its time; returns that time.
fn verify(
    creds: &Credentials,
    token: &str,
    parts: &[&str],
    now: i64,
) -> Result<i64, HandoverError> {
    if creds.secret_key.is_empty() {
        return Err(HandoverError::Refused(
            "no secret key configured to check it with",
        ));
    }
    let (ms, sig) = token
        .split_once(':')
        .ok_or(HandoverError::Refused("malformed token"))?;
    let at: i64 = ms
        .parse()
        .map_err(|_| HandoverError::Refused("malformed time"))?;
    // Saturating: the time comes off the wire, and i64::MIN must not overflow the subtraction.
    if now.saturating_sub(at).unsigned_abs() > MAX_SKEW_MS.unsigned_abs() {
        return Err(HandoverError::Refused(
            "signed more than 5 minutes away from now",
        ));
    }
    let sig = hex::decode(sig).map_err(|_| HandoverError::Refused("malformed signature"))?;
    let parts: Vec<&str> = [ms].into_iter().chain(parts.iter().copied()).collect();
    mac(creds, &parts)
        .verify_slice(&sig)
        .map_err(|_| HandoverError::Refused("signature does not match this replica's AK/SK"))?;
    Ok(at)
}

/// The request's token: the path and query it asks, at `wall_ms`.
pub fn request_token(creds: &Credentials, path_and_query: &str, wall_ms: i64) -> String {
    token(creds, wall_ms, &["request", path_and_query])
}

/// The answer's token: bound to the request's time, the version and the body's hash.
pub fn answer_token(creds: &Credentials, request_ms: i64, version: &str, body: &[u8]) -> String {
    let (req, hash) = (request_ms.to_string(), crate::signer::sha256_hex(body));
    token(creds, now_ms(), &["answer", &req, version, &hash])
}

/// Serialises the cloud series of `s` with their ages at `now`, gzip-compressed.
pub fn encode(s: &Snapshot, layout: &Layout, now: Instant) -> Vec<u8> {
    let mut text = String::with_capacity(64 * s.len() + 256);
    let stale = s
        .stale_after
        .map_or_else(|| "-".to_string(), |d| d.as_millis().to_string());
    let up = u8::from(s.up);
    let schedule = s
        .schedule
        .as_ref()
        .map_or_else(|| "-".into(), |a| a.to_line());
    let _ = write!(
        text,
        "{FORMAT}\nlayout {}\nup {up}\nstale_after_ms {stale}\nschedule {schedule}\n",
        layout.0
    );
    // A prompt value overrides the cycle's, as in `Snapshot::get`: it comes later and wins on decode.
    for (key, sample) in s.values.iter().chain(s.extra.iter()) {
        let age = now.saturating_duration_since(sample.fetched).as_millis();
        let _ = writeln!(
            text,
            "{}\t{}\t{}\t{}\t{age}",
            key.id, key.metric.0, sample.value, sample.timestamp_ms
        );
    }
    let mut gz = GzEncoder::new(Vec::with_capacity(text.len() / 4), Compression::fast());
    let _ = gz.write_all(text.as_bytes());
    gz.finish().unwrap_or_default()
}

fn header_value<'a>(
    lines: &mut impl Iterator<Item = (usize, &'a str)>,
    name: &'static str,
) -> Result<&'a str, HandoverError> {
    let (i, line) = lines.next().ok_or(HandoverError::Format {
        line: 0,
        what: "truncated",
    })?;
    line.strip_prefix(name)
        .and_then(|v| v.strip_prefix(' '))
        .ok_or(HandoverError::Format {
            line: i + 1,
            what: name,
        })
}

/// The snapshot a copy describes, its values fetched as long before `now` as they were old when sent.
pub fn decode(gz: &[u8], layout: &Layout, now: Instant) -> Result<Snapshot, HandoverError> {
    let mut text = String::new();
    GzDecoder::new(gz)
        .take(MAX_COPY_BYTES)
        .read_to_string(&mut text)
        .map_err(|_| HandoverError::Format {
            line: 0,
            what: "not gzip-compressed UTF-8",
        })?;
    let mut lines = text.lines().enumerate();
    if lines.next().map(|(_, l)| l) != Some(FORMAT) {
        return Err(HandoverError::Format {
            line: 1,
            what: "not a warm copy of this version",
        });
    }
    if header_value(&mut lines, "layout")? != layout.0 {
        return Err(HandoverError::Layout);
    }
    let up = header_value(&mut lines, "up")? == "1";
    let stale_after = header_value(&mut lines, "stale_after_ms")?
        .parse()
        .ok()
        .map(Duration::from_millis);
    let schedule = match header_value(&mut lines, "schedule")? {
        "-" => None,
        line => Some(Arc::new(Aligner::from_line(line).ok_or(
            HandoverError::Format {
                line: 5,
                what: "schedule",
            },
        )?)),
    };
    let metrics = layout.metrics();
    let mut values = HashMap::new();
    for (i, line) in lines {
        let (key, sample) = parse_series(line, now).ok_or(HandoverError::Format {
            line: i + 1,
            what: "expected id, metric, value, timestamp and age",
        })?;
        if usize::from(key.metric.0) >= metrics {
            return Err(HandoverError::Format {
                line: i + 1,
                what: "metric index out of layout",
            });
        }
        if let Some(sample) = sample {
            values.insert(key, sample);
        }
    }
    Ok(Snapshot {
        values: Arc::new(values),
        up,
        stale_after,
        schedule,
        first_cycle_done: true,
        ..Snapshot::default()
    })
}

/// One series line; the sample is `None` when it is older than this process's clock can express.
fn parse_series(line: &str, now: Instant) -> Option<(SeriesKey, Option<Sample>)> {
    let mut f = line.split('\t');
    let (id, metric, value, ts, age) = (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
    if id.is_empty() || f.next().is_some() {
        return None;
    }
    let key = SeriesKey {
        id: Arc::from(id),
        metric: MetricIndex(metric.parse().ok()?),
    };
    let (value, timestamp_ms) = (value.parse().ok()?, ts.parse().ok()?);
    let sample = now
        .checked_sub(Duration::from_millis(age.parse().ok()?))
        .map(|fetched| Sample {
            value,
            timestamp_ms,
            fetched,
        });
    Some((key, sample))
}

/// The leader's side: numbers the collector's snapshots and answers followers' requests.
pub struct Source {
    versions: watch::Receiver<(u64, Arc<Snapshot>)>,
    leadership: watch::Receiver<Leadership>,
    credentials: Arc<ArcSwap<Credentials>>,
    layout: Layout,
    /// Distinguishes this process's numbering from a previous leader's.
    epoch: u64,
    /// The last encoded copy, (seq, when, body): followers asking within [`REUSE`] share one encoding.
    encoded: std::sync::Mutex<Option<(u64, Instant, bytes::Bytes)>>,
}

/// How long an encoded copy is reused for the same snapshot (its ages are then up to this much short).
const REUSE: Duration = Duration::from_secs(1);

/// What a follower already has: `<epoch>.<seq>` of the last copy it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    /// The answering process's numbering.
    pub epoch: u64,
    /// The snapshot's number in it.
    pub seq: u64,
}

impl Version {
    fn parse(s: &str) -> Option<Version> {
        let (e, q) = s.split_once('.')?;
        Some(Version {
            epoch: e.parse().ok()?,
            seq: q.parse().ok()?,
        })
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.epoch, self.seq)
    }
}

/// A copy to send.
#[derive(Debug)]
pub struct Answer {
    /// [`HEADER`] of the answer.
    pub token: String,
    /// [`VERSION_HEADER`].
    pub version: Version,
    /// The gzip-compressed copy.
    pub body: bytes::Bytes,
}

impl Source {
    /// Numbers every snapshot `snapshots` publishes; the returned future does the numbering and runs
    /// until the collector is gone.
    pub fn new(
        mut snapshots: watch::Receiver<Arc<Snapshot>>,
        leadership: watch::Receiver<Leadership>,
        credentials: Arc<ArcSwap<Credentials>>,
        layout: Layout,
    ) -> (Self, impl std::future::Future<Output = ()> + Send + 'static) {
        let first = snapshots.borrow_and_update().clone();
        let (tx, versions) = watch::channel((0, first));
        let numbering = async move {
            let mut seq = 0;
            while snapshots.changed().await.is_ok() {
                seq += 1;
                let s = snapshots.borrow_and_update().clone();
                tx.send_replace((seq, s));
            }
        };
        let epoch = rand::random::<u64>() >> 12;
        let source = Source {
            versions,
            leadership,
            credentials,
            layout,
            epoch,
            encoded: std::sync::Mutex::default(),
        };
        (source, numbering)
    }

    /// Answers a request for a copy newer than `have` (`?have=<epoch>.<seq>`): at once when there is
    /// one, else as soon as one is published, or `None` after the long poll.
    pub async fn answer(
        &self,
        token: Option<&str>,
        path_and_query: &str,
        have: Option<&str>,
    ) -> Result<Option<Answer>, HandoverError> {
        let creds = self.credentials.load_full();
        let token = token.ok_or(HandoverError::Refused("no token"))?;
        let request_ms = verify(&creds, token, &["request", path_and_query], now_ms())?;
        let mut versions = self.versions.clone();
        let mut leadership = self.leadership.clone();
        let have = have
            .and_then(Version::parse)
            .filter(|v| v.epoch == self.epoch);
        if let Some(have) = have {
            let newer = versions.wait_for(|(seq, _)| *seq > have.seq);
            let lost = leadership.wait_for(|l| !l.leading);
            tokio::select! {
                r = newer => if r.is_err() { return Ok(None) },
                _ = lost => return Err(HandoverError::NotLeading),
                _ = tokio::time::sleep(LONG_POLL) => return Ok(None),
            }
        }
        if !self.leadership.borrow().leading {
            return Err(HandoverError::NotLeading);
        }
        let (seq, snapshot) = versions.borrow().clone();
        let body = self.encoded(seq, snapshot).await?;
        let version = Version {
            epoch: self.epoch,
            seq,
        };
        let token = answer_token(&creds, request_ms, &version.to_string(), &body);
        Ok(Some(Answer {
            token,
            version,
            body,
        }))
    }
}

impl Source {
    /// The copy of snapshot `seq`, encoded once for all the requests within [`REUSE`].
    async fn encoded(
        &self,
        seq: u64,
        snapshot: Arc<Snapshot>,
    ) -> Result<bytes::Bytes, HandoverError> {
        let lock = || self.encoded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((s, at, body)) = lock().as_ref()
            && *s == seq
            && at.elapsed() < REUSE
        {
            return Ok(body.clone());
        }
        let layout = self.layout.clone();
        let body = tokio::task::spawn_blocking(move || encode(&snapshot, &layout, Instant::now()))
            .await
            .map_err(|e| HandoverError::Http(e.to_string()))?;
        let body = bytes::Bytes::from(body);
        *lock() = Some((seq, Instant::now(), body.clone()));
        Ok(body)
    }
}

/// The follower's side: mirrors the holder's copy while this replica does not lead.
pub struct Mirror {
    /// Plain HTTP, or HTTPS trusting exactly the certificate this replica serves itself.
    pub client: reqwest::Client,
    /// The Lease's holder as last read.
    pub holder: watch::Receiver<Option<Holder>>,
    /// Mirroring stops while this replica leads.
    pub leadership: watch::Receiver<Leadership>,
    /// The AK/SK the requests are signed with (reloaded ones included).
    pub credentials: Arc<ArcSwap<Credentials>>,
    /// This replica's metric lists; a copy of another layout is not taken.
    pub layout: Layout,
    /// The newest copy, adopted by the collector when a term begins.
    pub copy: watch::Sender<Option<Arc<Snapshot>>>,
    /// `elb_exporter_warm_copy_series` and `elb_exporter_warm_copy_failures_total`.
    pub telemetry: Telemetry,
    /// Pause after a failed request (`leader_election.retry_period`).
    pub retry: Duration,
}

/// What a request brought: a newer copy, or nothing newer within the long poll.
enum Fetched {
    Copy(Version, Vec<u8>),
    Unchanged,
}

impl Mirror {
    /// Runs for the life of the process.
    pub async fn run(mut self) {
        let mut have: Option<(String, Version)> = None;
        let mut failures: u32 = 0;
        loop {
            let url = self.target().await;
            let since = have.as_ref().filter(|(u, _)| *u == url).map(|(_, v)| *v);
            let started = Instant::now();
            // A closed channel (the election ended at shutdown) is never "leading": no busy loop.
            let leads = async {
                if self
                    .leadership
                    .clone()
                    .wait_for(|l| l.leading)
                    .await
                    .is_err()
                {
                    std::future::pending::<()>().await;
                }
            };
            let result = tokio::select! {
                r = self.fetch(&url, since) => r,
                () = leads => continue,
            };
            match result.and_then(|f| self.take(f)) {
                Ok(Some(v)) => {
                    have = Some((url, v));
                    failures = 0;
                }
                Ok(None) => {}
                Err(e) => {
                    failures += 1;
                    self.failed(&e, &url, failures);
                    tokio::time::sleep(self.retry).await;
                }
            }
            tokio::time::sleep_until(started + MIN_GAP).await;
        }
    }

    /// Waits until this replica follows a holder that advertises an address; returns it.
    async fn target(&mut self) -> String {
        loop {
            let leading = self.leadership.borrow().leading;
            let url = self
                .holder
                .borrow()
                .as_ref()
                .and_then(|h| h.peer_url.clone())
                // The address comes off the Lease: only an http(s) base is asked.
                .filter(|u| u.starts_with("http://") || u.starts_with("https://"));
            match url {
                Some(url) if !leading => return url,
                _ => {}
            }
            if leading {
                self.telemetry.warm_copy_series.set(0);
            }
            tokio::select! {
                r = self.holder.changed() => if r.is_err() { std::future::pending::<()>().await },
                r = self.leadership.changed() => if r.is_err() { std::future::pending::<()>().await },
            }
        }
    }

    async fn fetch(&self, base: &str, since: Option<Version>) -> Result<Fetched, HandoverError> {
        let path = match since {
            Some(v) => format!("{PATH}?have={v}"),
            None => PATH.to_string(),
        };
        let creds = self.credentials.load_full();
        let request_ms = now_ms();
        let resp = self
            .client
            .get(format!("{base}{path}"))
            .header(HEADER, request_token(&creds, &path, request_ms))
            .send()
            .await
            .map_err(|e| HandoverError::Http(e.without_url().to_string()))?;
        match resp.status().as_u16() {
            200 => {}
            204 => return Ok(Fetched::Unchanged),
            409 => return Err(HandoverError::NotLeading),
            401 => return Err(HandoverError::Refused("the leader refused our token")),
            s => return Err(HandoverError::Status(s)),
        }
        let text = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (token, version) = (text(HEADER), text(VERSION_HEADER));
        let body = read_bounded(resp, MAX_SENT_BYTES).await?;
        let version = version.as_deref().and_then(Version::parse);
        let (Some(token), Some(v)) = (token, version) else {
            return Err(HandoverError::Refused(
                "the answer carries no token or version",
            ));
        };
        let hash = crate::signer::sha256_hex(&body);
        let req = request_ms.to_string();
        verify(
            &creds,
            &token,
            &["answer", &req, &v.to_string(), &hash],
            now_ms(),
        )?;
        Ok(Fetched::Copy(v, body))
    }

    /// Decodes and publishes a fetched copy; returns its version.
    fn take(&self, fetched: Fetched) -> Result<Option<Version>, HandoverError> {
        let Fetched::Copy(version, body) = fetched else {
            return Ok(None);
        };
        let snapshot = decode(&body, &self.layout, Instant::now())?;
        let series = snapshot.len();
        // A leader that just took over without a copy of its own has nothing yet; the older copy's values
        // still hold (they go stale by their own age), so they are kept rather than emptied.
        if series == 0 && self.copy.borrow().as_ref().is_some_and(|c| !c.is_empty()) {
            return Ok(Some(version));
        }
        self.telemetry.warm_copy_series.set(series as i64);
        self.copy.send_replace(Some(Arc::new(snapshot)));
        debug!(series, version = %version, "warm copy of the leader's series updated");
        Ok(Some(version))
    }

    fn failed(&self, e: &HandoverError, url: &str, failures: u32) {
        self.telemetry
            .warm_copy_failures
            .with_label_values(&[e.as_str()])
            .inc();
        // The leader stepping down is part of every handover; anything else repeats until fixed.
        if matches!(e, HandoverError::NotLeading) || failures % 30 != 1 {
            debug!(error = %e, peer = %url, failures, "warm copy request failed");
        } else {
            warn!(error = %e, peer = %url, failures, "warm copy request failed; a takeover would serve no series until its first cycle");
        }
    }
}

/// The answer's body, refused once it passes `limit` ([`MAX_SENT_BYTES`]): it is read before its HMAC is
/// checked, from whatever address the Lease names.
async fn read_bounded(mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, HandoverError> {
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| HandoverError::Http(e.without_url().to_string()))?
    {
        if body.len() + chunk.len() > limit {
            return Err(HandoverError::Format {
                line: 0,
                what: "the compressed copy is larger than its limit",
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The address this replica advertises to followers: `pod_ip` (else the listen address, when it names
/// one host) and the bound port; `None` when neither names a host.
pub fn advertised_url(
    pod_ip: Option<std::net::IpAddr>,
    bound: std::net::SocketAddr,
    tls: bool,
) -> Option<String> {
    let ip = pod_ip.or_else(|| (!bound.ip().is_unspecified()).then(|| bound.ip()))?;
    let scheme = if tls { "https" } else { "http" };
    let url = format!("{scheme}://{}", std::net::SocketAddr::new(ip, bound.port()));
    info!(url = %url, "warm copy served to followers at this address while leading");
    Some(url)
}

/// The follower's HTTP client: plain when `/metrics` is plain; over TLS it trusts exactly the leaf
/// certificate this replica serves itself (the replicas mount the same Secret), whatever name or IP it
/// carries, so no CA or pod-IP SAN is needed.
/// `tls_cert` is `web.tls`'s certificate file. Each request opens its own connection (one a minute),
/// so a rotated certificate is checked on the next one.
pub fn client(tls_cert: Option<&std::path::Path>) -> Result<reqwest::Client, HandoverError> {
    let builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(3))
        .timeout(LONG_POLL + Duration::from_secs(60))
        .pool_max_idle_per_host(0)
        .no_proxy()
        // The token is for the address on the Lease only; a redirect elsewhere is a failed request.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("elb-exporter/", env!("CARGO_PKG_VERSION")));
    let builder = match tls_cert {
        Some(cert) => builder.use_preconfigured_tls(pinned::config(cert)?),
        None => builder,
    };
    builder
        .build()
        .map_err(|e| HandoverError::Http(e.to_string()))
}

mod pinned {
    use super::HandoverError;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex};
    use tokio_rustls::rustls::client::danger::{
        HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
    };
    use tokio_rustls::rustls::crypto::{CryptoProvider, ring};
    use tokio_rustls::rustls::{
        CertificateError, ClientConfig, DigitallySignedStruct, Error, SignatureScheme,
    };

    /// Accepts the one certificate in `cert` (its first, the leaf), re-read when a handshake presents
    /// another one, so a rotated Secret is followed.
    #[derive(Debug)]
    struct Pinned {
        cert: PathBuf,
        leaf: Mutex<Vec<u8>>,
        provider: Arc<CryptoProvider>,
    }

    fn leaf(cert: &Path) -> Result<Vec<u8>, HandoverError> {
        let tls = |what: String| HandoverError::Http(format!("{}: {what}", cert.display()));
        let first = CertificateDer::pem_file_iter(cert)
            .map_err(|e| tls(e.to_string()))?
            .next()
            .ok_or_else(|| tls("no certificate".into()))?;
        Ok(first.map_err(|e| tls(e.to_string()))?.to_vec())
    }

    pub(super) fn config(cert: &Path) -> Result<ClientConfig, HandoverError> {
        let provider = Arc::new(ring::default_provider());
        let verifier = Pinned {
            cert: cert.to_path_buf(),
            leaf: Mutex::new(leaf(cert)?),
            provider: provider.clone(),
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| HandoverError::Http(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        Ok(config)
    }

    impl ServerCertVerifier for Pinned {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            let mut pinned = self.leaf.lock().unwrap_or_else(|p| p.into_inner());
            if end_entity.as_ref() != pinned.as_slice()
                && let Ok(current) = leaf(&self.cert)
            {
                *pinned = current;
            }
            if end_entity.as_ref() == pinned.as_slice() {
                Ok(ServerCertVerified::assertion())
            } else {
                Err(Error::InvalidCertificate(CertificateError::UnknownIssuer))
            }
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            let algs = &self.provider.signature_verification_algorithms;
            tokio_rustls::rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            let algs = &self.provider.signature_verification_algorithms;
            tokio_rustls::rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn creds(ak: &str, sk: &str) -> Credentials {
        Credentials {
            access_key: ak.into(),
            secret_key: Secret::new(sk),
            security_token: None,
        }
    }

    fn layout() -> Layout {
        Layout("m1_cps,m7_in_Bps;mb_l7_qps".into())
    }

    fn sample(value: f64, timestamp_ms: i64, fetched: Instant) -> Sample {
        Sample {
            value,
            timestamp_ms,
            fetched,
        }
    }

    fn key(id: &str, metric: u16) -> SeriesKey {
        SeriesKey {
            id: Arc::from(id),
            metric: MetricIndex(metric),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_copy_round_trips_with_its_ages() {
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(100)).await;
        let now = Instant::now();
        let values = HashMap::from([
            (
                key("l1", 0),
                sample(10312.5, 1_700_000_040_000, t0 + Duration::from_secs(40)),
            ),
            (
                key("l1", 1),
                sample(f64::MAX, 1_700_000_040_000, t0 + Duration::from_secs(40)),
            ),
            (key("p1", 2), sample(-0.25, 1_700_000_000_000, t0)),
        ]);
        let extra = HashMap::from([(key("l1", 0), sample(7.0, 1_700_000_100_000, now))]);
        let mut aligner = Aligner::default();
        aligner.set_budget(26.0, 300.0);
        for m in 0..4 {
            let minute = 1_700_000_000_000 + m * 60_000;
            aligner.observe(minute + 80_000, minute - 60_000);
            aligner.observe(minute + 85_000, minute);
            aligner.settle(minute, minute + 80_000, Some(minute + 85_000));
        }
        assert!(aligner.spend(1));
        let s = Snapshot {
            cycle: 9,
            values: Arc::new(values),
            extra: Arc::new(extra),
            first_cycle_done: true,
            up: true,
            stale_after: Some(Duration::from_secs(180)),
            schedule: Some(Arc::new(aligner.clone())),
        };
        let gz = encode(&s, &layout(), now);
        // Received 3 s later: every value is as old as it was, plus the 3 s.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let got = decode(&gz, &layout(), Instant::now()).expect("decodes");
        let later = Duration::from_secs(3);
        let want = HashMap::from([
            (key("l1", 0), sample(7.0, 1_700_000_100_000, now + later)),
            (
                key("l1", 1),
                sample(f64::MAX, 1_700_000_040_000, t0 + Duration::from_secs(43)),
            ),
            (key("p1", 2), sample(-0.25, 1_700_000_000_000, t0 + later)),
        ]);
        assert_eq!(*got.values, want, "the prompt value wins, ages kept");
        assert!(got.up && got.extra.is_empty());
        assert_eq!(got.stale_after, Some(Duration::from_secs(180)));
        let schedule = got.schedule.expect("the schedule travels with the copy");
        assert_eq!(schedule.to_line(), aligner.to_line());
        assert_eq!(schedule.tokens(), aligner.tokens(), "the bucket as left");
        assert_eq!(
            schedule.first_attempt(1_700_000_300_000),
            aligner.first_attempt(1_700_000_300_000)
        );
        assert!(
            aligner.to_line().split(' ').count() > 6,
            "{}",
            aligner.to_line()
        );
    }

    #[test]
    fn a_copy_of_another_layout_or_malformed_is_refused_with_its_line() {
        let s = Snapshot {
            values: Arc::new(HashMap::from([(
                key("l1", 1),
                sample(1.0, 60_000, Instant::now()),
            )])),
            ..Snapshot::default()
        };
        let gz = encode(&s, &layout(), Instant::now());
        let other = Layout("m1_cps;mb_l7_qps".into());
        assert!(matches!(
            decode(&gz, &other, Instant::now()),
            Err(HandoverError::Layout)
        ));
        let mut text = String::new();
        GzDecoder::new(gz.as_slice())
            .read_to_string(&mut text)
            .unwrap();
        let gzip = |t: &str| {
            let mut e = GzEncoder::new(Vec::new(), Compression::fast());
            e.write_all(t.as_bytes()).unwrap();
            e.finish().unwrap()
        };
        for (bad, line) in [
            (text.replace("\t1\t1\t", "\t1\tx\t"), 6),
            (text.replace("\t1\t1\t", "\t3\t1\t"), 6),
            (text.replace("schedule -", "schedule 1 2"), 5),
            (text.replace("up 0", "up"), 3),
        ] {
            match decode(&gzip(&bad), &layout(), Instant::now()) {
                Err(HandoverError::Format { line: l, .. }) => assert_eq!(l, line, "{bad}"),
                other => panic!("{other:?} for {bad}"),
            }
        }
        assert!(decode(b"plain text", &layout(), Instant::now()).is_err());
    }

    #[test]
    fn tokens_prove_the_same_ak_sk_for_what_was_asked_and_when() {
        let c = creds("AK1", "sk-secret");
        let now = 1_700_000_000_000;
        let t = request_token(&c, "/internal/warm-copy?have=1.2", now);
        let check = |c: &Credentials, pq: &str, at: i64| {
            verify(c, &t, &["request", pq], at).map_err(|e| e.to_string())
        };
        assert_eq!(
            check(&c, "/internal/warm-copy?have=1.2", now + 1_000),
            Ok(now)
        );
        for (c, pq, at, why) in [
            (
                creds("AK1", "other"),
                "/internal/warm-copy?have=1.2",
                now,
                "match",
            ),
            (
                creds("AK2", "sk-secret"),
                "/internal/warm-copy?have=1.2",
                now,
                "match",
            ),
            (c.clone(), "/internal/warm-copy?have=1.3", now, "match"),
            (
                c.clone(),
                "/internal/warm-copy?have=1.2",
                now + 300_001,
                "5 minutes",
            ),
            (
                c.clone(),
                "/internal/warm-copy?have=1.2",
                now - 300_001,
                "5 minutes",
            ),
            (
                creds("AK1", ""),
                "/internal/warm-copy?have=1.2",
                now,
                "no secret key",
            ),
        ] {
            let e = check(&c, pq, at).expect_err(why);
            assert!(e.contains(why), "{e}");
        }
        // A time at the edge of i64 is refused, not an overflow.
        for edge in [i64::MIN, i64::MAX] {
            let t = format!("{edge}:{}", "00".repeat(32));
            assert!(verify(&c, &t, &["request", "/x"], now).is_err());
        }
        let forged = format!("{}:{}", now, "00".repeat(32));
        assert!(verify(&c, &forged, &["request", "/internal/warm-copy"], now).is_err());
        // The answer is bound to the body: one changed byte is refused.
        // The answer is bound to the body, the version and the request's time: any other is refused.
        let a = answer_token(&c, now, "5.6", b"body");
        let ok = |body: &[u8], version: &str, asked: i64| {
            let hash = crate::signer::sha256_hex(body);
            verify(
                &c,
                &a,
                &["answer", &asked.to_string(), version, &hash],
                now_ms(),
            )
            .is_ok()
        };
        assert!(ok(b"body", "5.6", now));
        assert!(!ok(b"bodY", "5.6", now), "another body");
        assert!(!ok(b"body", "5.7", now), "another version");
        assert!(!ok(b"body", "5.6", now + 1), "an answer to another request");
    }

    fn source(
        leading: bool,
    ) -> (
        Source,
        watch::Sender<Arc<Snapshot>>,
        watch::Sender<Leadership>,
        impl std::future::Future<Output = ()>,
    ) {
        let (snap_tx, snap_rx) = watch::channel(Arc::new(Snapshot::default()));
        let (lead_tx, lead_rx) = watch::channel(Leadership {
            leading,
            not_before: None,
        });
        let c = Arc::new(ArcSwap::from_pointee(creds("AK1", "sk")));
        let (src, numbering) = Source::new(snap_rx, lead_rx, c, layout());
        (src, snap_tx, lead_tx, numbering)
    }

    /// The leader answers a follower that already has its newest copy only when a newer one is
    /// published (or after the long poll), and a replica that stops leading answers at once with
    /// `NotLeading`, so a follower never mirrors a replica that does not collect.
    #[tokio::test(start_paused = true)]
    async fn the_source_long_polls_for_a_newer_snapshot_and_only_while_leading() {
        let (src, snap_tx, lead_tx, numbering) = source(true);
        tokio::spawn(numbering);
        let c = creds("AK1", "sk");
        let ask = |have: Option<String>| {
            let pq = match &have {
                Some(h) => format!("{PATH}?have={h}"),
                None => PATH.to_string(),
            };
            let t = request_token(&c, &pq, now_ms());
            let src = &src;
            async move { src.answer(Some(&t), &pq, have.as_deref()).await }
        };
        let first = ask(None).await.expect("answers").expect("a copy at once");
        let have = Some(first.version.to_string());
        let t0 = Instant::now();
        let waiting = ask(have.clone());
        let publish = async {
            tokio::time::sleep(Duration::from_secs(7)).await;
            let values = HashMap::from([(key("l1", 0), sample(1.0, 60_000, Instant::now()))]);
            snap_tx.send_replace(Arc::new(Snapshot {
                values: Arc::new(values),
                ..Snapshot::default()
            }));
        };
        let (second, ()) = tokio::join!(waiting, publish);
        let second = second.expect("answers").expect("the newer copy");
        assert_eq!(
            t0.elapsed(),
            Duration::from_secs(7),
            "answered when published"
        );
        assert_eq!(second.version.seq, first.version.seq + 1);
        assert_eq!(
            decode(&second.body, &layout(), Instant::now())
                .unwrap()
                .len(),
            1
        );
        let idle = ask(Some(second.version.to_string()))
            .await
            .expect("answers");
        assert!(idle.is_none(), "nothing newer within the long poll");
        let stepping_down = ask(Some(second.version.to_string()));
        let lose = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            lead_tx.send_replace(Leadership::default());
        };
        let t1 = Instant::now();
        let (r, ()) = tokio::join!(stepping_down, lose);
        assert!(matches!(r, Err(HandoverError::NotLeading)), "{r:?}");
        assert_eq!(
            t1.elapsed(),
            Duration::from_secs(1),
            "answered when it stopped leading"
        );
        assert!(matches!(ask(None).await, Err(HandoverError::NotLeading)));
        let no_token = src.answer(None, PATH, None).await;
        assert!(
            matches!(no_token, Err(HandoverError::Refused(_))),
            "{no_token:?}"
        );
    }

    /// Followers asking for the same snapshot within a second share one encoding (at 10,000 listeners an
    /// encoding is ~80 ms of CPU); later, the copy is encoded again with its ages current.
    #[tokio::test(start_paused = true)]
    async fn one_encoding_serves_the_requests_of_a_second() {
        let (src, snap_tx, _lead, numbering) = source(true);
        tokio::spawn(numbering);
        let values = HashMap::from([(key("l1", 0), sample(1.0, 60_000, Instant::now()))]);
        snap_tx.send_replace(Arc::new(Snapshot {
            values: Arc::new(values),
            ..Snapshot::default()
        }));
        tokio::task::yield_now().await;
        let c = creds("AK1", "sk");
        let ask = || {
            let t = request_token(&c, PATH, now_ms());
            let src = &src;
            async move { src.answer(Some(&t), PATH, None).await.unwrap().unwrap() }
        };
        let first = ask().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let second = ask().await;
        assert_eq!(first.version, second.version);
        assert_eq!(first.body, second.body, "the same encoding");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let third = ask().await;
        assert_ne!(third.body, first.body, "encoded again, ages 2 s older");
    }

    /// An empty copy (a leader that took over without one and has not collected yet) does not empty the
    /// follower's older copy, whose values still hold until they are stale.
    #[tokio::test]
    async fn an_empty_copy_does_not_replace_a_held_one() {
        let (_h, holder) = watch::channel(None);
        let (_l, leadership) = watch::channel(Leadership::default());
        let (copy, held) = watch::channel(None);
        let telemetry = Telemetry::new();
        let m = Mirror {
            client: reqwest::Client::new(),
            holder,
            leadership,
            credentials: Arc::new(ArcSwap::from_pointee(creds("AK1", "sk"))),
            layout: layout(),
            copy,
            telemetry: telemetry.clone(),
            retry: Duration::from_secs(2),
        };
        let now = Instant::now();
        let full = Snapshot {
            values: Arc::new(HashMap::from([(key("l1", 0), sample(1.0, 60_000, now))])),
            ..Snapshot::default()
        };
        let v = |seq| Version { epoch: 1, seq };
        let took = m.take(Fetched::Copy(v(1), encode(&full, &layout(), now)));
        assert_eq!(took.unwrap(), Some(v(1)));
        let empty = encode(&Snapshot::default(), &layout(), now);
        assert_eq!(m.take(Fetched::Copy(v(2), empty)).unwrap(), Some(v(2)));
        assert_eq!(held.borrow().as_ref().map(|c| c.len()), Some(1), "kept");
        assert_eq!(telemetry.warm_copy_series.get(), 1);
    }

    /// An answer larger than the limit is refused while it is read, before it is all in memory.
    #[tokio::test]
    async fn an_oversized_answer_is_refused_while_read() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let n = sock.read(&mut buf).await.unwrap_or(0);
                if buf[..n].starts_with(b"GET /moved") {
                    let to = format!(
                        "HTTP/1.1 302 Found\r\nlocation: http://{addr}/\r\ncontent-length: 0\r\n\r\n"
                    );
                    let _ = sock.write_all(to.as_bytes()).await;
                    continue;
                }
                let body = vec![b'x'; 4096];
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(&body).await;
            }
        });
        let c = client(None).unwrap();
        let get = || c.get(format!("http://{addr}/")).send();
        // A redirect is not followed (the token is for the Lease's address only).
        let moved = c.get(format!("http://{addr}/moved")).send().await.unwrap();
        assert_eq!(moved.status(), 302);
        let small = read_bounded(get().await.unwrap(), 1000).await;
        assert!(
            matches!(small, Err(HandoverError::Format { .. })),
            "{small:?}"
        );
        let fits = read_bounded(get().await.unwrap(), 4096).await;
        assert_eq!(fits.unwrap().len(), 4096);
    }

    #[test]
    fn the_advertised_address_is_the_pod_ip_or_a_named_listen_host() {
        let any: std::net::SocketAddr = "0.0.0.0:8087".parse().unwrap();
        let local: std::net::SocketAddr = "127.0.0.1:40123".parse().unwrap();
        let pod = Some("10.1.2.3".parse().unwrap());
        assert_eq!(
            advertised_url(pod, any, false).as_deref(),
            Some("http://10.1.2.3:8087")
        );
        assert_eq!(
            advertised_url(None, local, true).as_deref(),
            Some("https://127.0.0.1:40123")
        );
        assert_eq!(advertised_url(None, any, false), None);
        let v6 = Some("fd00::7".parse().unwrap());
        assert_eq!(
            advertised_url(v6, any, false).as_deref(),
            Some("http://[fd00::7]:8087")
        );
    }
}
