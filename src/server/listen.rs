//! The listener: connection cap, per-connection deadlines, optional TLS (reloaded when its files change)
//! and the graceful drain.

use crate::config::WebSettings;
use crate::telemetry::Telemetry;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The certificate or key files could not be loaded.
    #[error("web.tls_cert_file / web.tls_key_file: {0}")]
    Tls(String),
    /// Accepting or serving failed.
    #[error("HTTP server: {0}")]
    Io(#[from] std::io::Error),
}

/// Builds the TLS acceptor from PEM files.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, ServeError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| ServeError::Tls(format!("{}: {e}", cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| ServeError::Tls(format!("{}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(ServeError::Tls(format!(
            "{}: no certificate",
            cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| ServeError::Tls(format!("{}: {e}", key.display())))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServeError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Why the server closed a connection; the `reason` label of `elb_exporter_http_connections_dropped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// No complete request within `web.read_header_timeout` of accept (silent, `PRI`, an HTTP/2 preface
    /// alone, a TLS handshake and nothing after it, headers trickling in).
    HeaderTimeout,
    /// No request started for `web.idle_timeout` (HTTP/1 keep-alive or HTTP/2).
    IdleTimeout,
    /// The TLS handshake failed.
    TlsHandshake,
    /// `web.max_connections` connections were open already.
    ConnectionLimit,
}

impl DropReason {
    /// Every reason, for pre-created series.
    pub const ALL: [DropReason; 4] = [
        DropReason::HeaderTimeout,
        DropReason::IdleTimeout,
        DropReason::TlsHandshake,
        DropReason::ConnectionLimit,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::HeaderTimeout => "header_timeout",
            DropReason::IdleTimeout => "idle_timeout",
            DropReason::TlsHandshake => "tls_handshake",
            DropReason::ConnectionLimit => "connection_limit",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One log line per reason per `every` at most, carrying how many drops it stands for: a flood of idle
/// connections must not become a flood of log lines.
pub struct DropLog {
    every: Duration,
    state: Mutex<[(Option<Instant>, u64); 4]>,
}

impl DropLog {
    /// A log that writes each reason at most once per `every`.
    pub fn new(every: Duration) -> Self {
        DropLog {
            every,
            state: Mutex::new([(None, 0); 4]),
        }
    }

    /// Notes one drop at `now`; `Some(n)` when a line is due, for `n` drops since the last line.
    pub fn note(&self, reason: DropReason, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (last, pending) = &mut state[reason.index()];
        *pending += 1;
        if last.is_some_and(|l| now.duration_since(l) < self.every) {
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(pending))
    }
}

/// How often a drop reason may be logged.
const DROP_LOG_EVERY: Duration = Duration::from_secs(30);

/// Counts and logs dropped connections.
#[derive(Clone)]
struct Drops {
    telemetry: Telemetry,
    log: Arc<DropLog>,
}

impl Drops {
    fn new(telemetry: &Telemetry) -> Self {
        for r in DropReason::ALL {
            telemetry.http_dropped.with_label_values(&[r.as_str()]);
        }
        Drops {
            telemetry: telemetry.clone(),
            log: Arc::new(DropLog::new(DROP_LOG_EVERY)),
        }
    }

    fn record(&self, reason: DropReason, web: &Limits) {
        self.telemetry
            .http_dropped
            .with_label_values(&[reason.as_str()])
            .inc();
        let Some(count) = self.log.note(reason, Instant::now()) else {
            return;
        };
        if reason == DropReason::IdleTimeout {
            // Routine for keep-alive connections that outlive their scraper.
            tracing::debug!(reason = reason.as_str(), count, "closed idle connections");
        } else {
            tracing::warn!(
                reason = reason.as_str(),
                count,
                read_header_timeout = ?web.read_header,
                max_connections = web.max_connections,
                "dropped connections (logged at most every 30s)"
            );
        }
    }
}

/// The TLS acceptor, rebuilt when the certificate or key file changes (cert-manager rotates them in
/// place). Checked on each new connection: two `stat` calls, and a reload only when the files changed.
pub struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    state: Mutex<(FilesStamp, tokio_rustls::TlsAcceptor)>,
}

/// What identifies a file version: a Kubernetes Secret volume swaps in new files (new inode), an
/// in-place write changes the length or modification time.
type FileStamp = Option<(u64, u64, Option<std::time::SystemTime>)>;
type FilesStamp = (FileStamp, FileStamp);

fn file_stamp(p: &Path) -> FileStamp {
    let m = std::fs::metadata(p).ok()?;
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(&m);
    #[cfg(not(unix))]
    let ino = 0;
    Some((ino, m.len(), m.modified().ok()))
}

impl TlsFiles {
    /// Loads the PEM files and remembers their stamps, so a changed certificate is reloaded.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, ServeError> {
        let stamp = (file_stamp(cert), file_stamp(key));
        let acceptor = tls_acceptor(cert, key)?;
        Ok(TlsFiles {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            state: Mutex::new((stamp, acceptor)),
        })
    }

    /// The acceptor for a new connection. New files that do not load (say the key is not written yet)
    /// keep the previous certificate in use until the files change again.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let stamp = (file_stamp(&self.cert), file_stamp(&self.key));
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.0 != stamp {
            state.0 = stamp;
            match tls_acceptor(&self.cert, &self.key) {
                Ok(a) => {
                    state.1 = a;
                    tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    "TLS files changed but do not load; serving the previous certificate"
                ),
            }
        }
        state.1.clone()
    }
}

/// The deadlines every connection lives under.
#[derive(Clone, Copy)]
struct Limits {
    read_header: Duration,
    idle: Duration,
    max_connections: usize,
}

/// Requests started on one connection, and when the last one started (ms after accept). The service
/// wrapper writes it; the connection's supervisor reads it when a deadline passes.
#[derive(Default)]
struct Activity {
    requests: AtomicU64,
    last_ms: AtomicU64,
}

/// Serves `app` until `shutdown`. Every connection must deliver a complete request within
/// `web.read_header_timeout` of accept (the TLS handshake included) and is closed once no request started
/// for `web.idle_timeout`, whatever protocol it speaks, so idle sockets cannot hold the `max_connections`
/// slots. Optional TLS; a bounded graceful drain.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    web: &WebSettings,
    telemetry: &Telemetry,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let tls = match &web.tls {
        Some((c, k)) => Some(Arc::new(TlsFiles::load(c, k)?)),
        None => None,
    };
    let builder = http_builder(web);
    let limits = Limits {
        read_header: web.read_header_timeout,
        idle: web.idle_timeout,
        max_connections: web.max_connections,
    };
    let drops = Drops::new(telemetry);
    let slots = Arc::new(tokio::sync::Semaphore::new(web.max_connections));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let accepted = Instant::now();
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drops.record(DropReason::ConnectionLimit, &limits);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (app, builder, tls, drops, stop) = (
            app.clone(),
            builder.clone(),
            tls.clone(),
            drops.clone(),
            stop_rx.clone(),
        );
        tokio::spawn(async move {
            let conn = Conn {
                app,
                builder,
                limits,
                accepted,
                stop,
                drops,
                slot: Some(slot),
            };
            match tls {
                None => conn.serve(stream).await,
                Some(tls) => conn.serve_tls(&tls, stream).await,
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let all = u32::try_from(web.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(Duration::from_secs(10), slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("connections still open after 10s; closing them");
    }
    Ok(())
}

/// HTTP/1 and HTTP/2 (negotiated per connection) with bounded buffers and headers.
fn http_builder(web: &WebSettings) -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    // hyper starts its HTTP/1 header timer as soon as it waits for the next request, so it also bounds
    // keep-alive idleness; at `read_header_timeout` it would defeat keep-alive for scrape intervals above
    // it. `Conn::serve` enforces both deadlines for every protocol (and counts them); hyper's timer is only
    // a backstop after them.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(web.idle_timeout + web.read_header_timeout)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(64)
        .max_header_list_size(64 * 1024);
    builder
}

/// One accepted connection and what it needs to be served.
struct Conn {
    app: Router,
    builder: Builder<TokioExecutor>,
    limits: Limits,
    accepted: Instant,
    stop: tokio::sync::watch::Receiver<bool>,
    drops: Drops,
    /// Its `max_connections` slot, held until the connection ends.
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Conn {
    /// Counts the drop and frees the slot while the socket is still open, so that a client that sees the
    /// close and connects again at once finds both done.
    fn give_up(&mut self, reason: DropReason) {
        self.drops.record(reason, &self.limits);
        self.slot.take();
    }

    /// Completes the TLS handshake within what is left of `read_header_timeout`, then serves HTTP.
    async fn serve_tls(mut self, tls: &TlsFiles, stream: tokio::net::TcpStream) {
        let handshake = tls.acceptor().accept(stream);
        let mut handshake = std::pin::pin!(handshake);
        let deadline = self.accepted + self.limits.read_header;
        match tokio::time::timeout_at(deadline, handshake.as_mut()).await {
            Err(_) => self.give_up(DropReason::HeaderTimeout),
            Ok(Err(_)) => self.give_up(DropReason::TlsHandshake),
            Ok(Ok(tls_stream)) => self.serve(tls_stream).await,
        }
    }

    /// Serves HTTP on `io` until the client closes, a deadline passes, or the server stops.
    async fn serve<I>(mut self, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity::default());
        let seen = activity.clone();
        let accepted = self.accepted;
        let service = tower::ServiceExt::map_request(self.app.clone(), move |req| {
            let ms = u64::try_from(accepted.elapsed().as_millis()).unwrap_or(u64::MAX);
            seen.last_ms.store(ms, Ordering::Relaxed);
            seen.requests.fetch_add(1, Ordering::Release);
            req
        });
        let service = hyper_util::service::TowerToHyperService::new(service);
        let builder = self.builder.clone();
        let conn = builder.serve_connection(TokioIo::new(io), service);
        let mut conn = std::pin::pin!(conn);
        let mut seen_requests = 0;
        let mut deadline = accepted + self.limits.read_header;
        let mut stop = self.stop.clone();
        loop {
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = tokio::time::sleep_until(deadline) => {
                    let n = activity.requests.load(Ordering::Acquire);
                    if n > seen_requests {
                        seen_requests = n;
                        let last = Duration::from_millis(activity.last_ms.load(Ordering::Relaxed));
                        deadline = accepted + last + self.limits.idle;
                        continue;
                    }
                    if seen_requests == 0 {
                        // Nothing worth finishing: close at once.
                        self.give_up(DropReason::HeaderTimeout);
                        return;
                    }
                    self.give_up(DropReason::IdleTimeout);
                    break;
                }
                _ = stop.wait_for(|stop| *stop) => break,
            }
        }
        // HTTP/2 gets a GOAWAY, HTTP/1 finishes its response; a peer that does not cooperate is cut.
        conn.as_mut().graceful_shutdown();
        let _ = tokio::time::timeout(self.limits.read_header, conn).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_log_is_rate_limited_per_reason_and_counts_what_it_skipped() {
        let log = DropLog::new(Duration::from_secs(30));
        let t0 = Instant::now();
        assert_eq!(log.note(DropReason::HeaderTimeout, t0), Some(1));
        assert_eq!(log.note(DropReason::HeaderTimeout, t0), None);
        assert_eq!(
            log.note(DropReason::HeaderTimeout, t0 + Duration::from_secs(29)),
            None
        );
        // Another reason has its own budget.
        assert_eq!(log.note(DropReason::ConnectionLimit, t0), Some(1));
        assert_eq!(
            log.note(DropReason::HeaderTimeout, t0 + Duration::from_secs(30)),
            Some(3)
        );
    }
}
