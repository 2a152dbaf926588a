//! HTTP endpoints. `/metrics` is served from memory: the pre-rendered cloud body plus the exporter's own
//! small registry, never waiting on a cloud call.

use crate::config::WebSettings;
use crate::exposition::{self, Body};
use crate::telemetry::Telemetry;
use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use sha2::Digest as _;
use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Shared state of the HTTP server.
#[derive(Clone)]
pub struct AppState {
    pub body: Arc<ArcSwap<Body>>,
    pub telemetry: Telemetry,
    /// Kubernetes watch synced (and the first ELB lookups done).
    pub synced: Arc<AtomicBool>,
    /// The first collection cycle finished, successfully or not.
    pub collected: Arc<AtomicBool>,
    pub metric_path: String,
    /// The exporter's own metrics, rendered at most once per `OWN_TTL` and per body.
    own: Arc<Mutex<Option<OwnPart>>>,
}

/// The exporter's own part of `/metrics`, plain and as a gzip member.
struct OwnPart {
    /// Address of the body it was rendered with: a new body (new collection) renders it anew.
    body: usize,
    at: Instant,
    plain: Bytes,
    gzip: Bytes,
}

/// Scrapes within this long of each other share one rendering of the exporter's own metrics, so 50
/// concurrent scrapers cost one registry gather and one small compression, not fifty.
pub const OWN_TTL: Duration = Duration::from_secs(1);

impl AppState {
    pub fn new(telemetry: Telemetry, metric_path: &str) -> Self {
        AppState {
            body: Arc::new(ArcSwap::from_pointee(Body::default())),
            telemetry,
            synced: Arc::new(AtomicBool::new(false)),
            collected: Arc::new(AtomicBool::new(false)),
            metric_path: metric_path.to_string(),
            own: Arc::new(Mutex::new(None)),
        }
    }

    /// The own part for `body`, from the cache when fresh.
    fn own_part(&self, body: &Arc<Body>) -> (Bytes, Bytes) {
        let key = Arc::as_ptr(body) as usize;
        let mut cache = match self.own.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(p) = cache.as_ref()
            && p.body == key
            && p.at.elapsed() < OWN_TTL
        {
            return (p.plain.clone(), p.gzip.clone());
        }
        let age = body.newest_ms.map(|ts| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_millis() as i64;
            (now - ts).max(0) as f64 / 1000.0
        });
        self.telemetry.newest_datapoint_age.set(age.unwrap_or(0.0));
        let plain = Bytes::from(self.telemetry.render());
        let gzip = Bytes::from(exposition::gzip(&plain));
        *cache = Some(OwnPart {
            body: key,
            at: Instant::now(),
            plain: plain.clone(),
            gzip: gzip.clone(),
        });
        (plain, gzip)
    }
}

/// The router: `/metrics` (or the configured path), `/healthz`, `/readyz`, `/`. With `auth`, the metrics
/// path and `/` require it; the probes stay open (they reveal nothing and kubelet cannot authenticate).
pub fn router(state: AppState, auth: Option<Arc<WebAuth>>) -> Router {
    let mut protected = Router::new()
        .route(&state.metric_path.clone(), get(metrics))
        .route("/", get(landing))
        .with_state(state.clone());
    if let Some(auth) = auth {
        protected = protected.route_layer(axum::middleware::from_fn_with_state(auth, require_auth));
    }
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
        .merge(protected)
}

/// Basic-auth users (bcrypt hashes) and/or a bearer token, checked on protected routes.
pub struct WebAuth {
    users: HashMap<String, String>,
    bearer: Option<String>,
    /// SHA-256 of recently verified `user:password` pairs: bcrypt is deliberately slow, scrapes are not.
    verified: Mutex<HashSet<[u8; 32]>>,
}

impl WebAuth {
    pub fn from_settings(w: &WebSettings) -> Option<Arc<WebAuth>> {
        if !w.auth_enabled() {
            return None;
        }
        Some(Arc::new(WebAuth {
            users: w
                .basic_auth_users
                .iter()
                .map(|(u, h)| (u.clone(), h.expose().to_string()))
                .collect(),
            bearer: w.bearer_token.as_ref().map(|t| t.expose().to_string()),
            verified: Mutex::new(HashSet::new()),
        }))
    }

    async fn allows(self: &Arc<Self>, headers: &HeaderMap) -> bool {
        let Some(value) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        else {
            return false;
        };
        if let Some(token) = value.strip_prefix("Bearer ") {
            return self
                .bearer
                .as_deref()
                .is_some_and(|b| constant_time_eq(b.as_bytes(), token.trim().as_bytes()));
        }
        let Some(encoded) = value.strip_prefix("Basic ") else {
            return false;
        };
        use base64::Engine as _;
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
            return false;
        };
        let Ok(pair) = String::from_utf8(decoded) else {
            return false;
        };
        let Some((user, password)) = pair.split_once(':') else {
            return false;
        };
        let Some(hash) = self.users.get(user).cloned() else {
            return false;
        };
        let key: [u8; 32] = sha2::Sha256::digest(pair.as_bytes()).into();
        if self
            .verified
            .lock()
            .map(|v| v.contains(&key))
            .unwrap_or(false)
        {
            return true;
        }
        let password = password.to_string();
        let ok =
            tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
                .await
                .unwrap_or(false);
        if ok && let Ok(mut v) = self.verified.lock() {
            if v.len() >= 64 {
                v.clear();
            }
            v.insert(key);
        }
        ok
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_auth(
    State(auth): State<Arc<WebAuth>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if auth.allows(req.headers()).await {
        next.run(req).await
    } else {
        let mut r = (StatusCode::UNAUTHORIZED, "unauthorized\n").into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"elb-exporter\""),
        );
        r
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("web.tls_cert_file / web.tls_key_file: {0}")]
    Tls(String),
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

/// Serves `app` until `shutdown`, with a header-read timeout (slow clients cannot hold connections), a
/// connection cap, optional TLS, and a bounded graceful drain.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    web: &WebSettings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;

    let tls = match &web.tls {
        Some((c, k)) => Some(tls_acceptor(c, k)?),
        None => None,
    };
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(web.read_header_timeout)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(64)
        .max_header_list_size(64 * 1024);
    let handshake_timeout = web.read_header_timeout;
    let slots = Arc::new(tokio::sync::Semaphore::new(web.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
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
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                max = web.max_connections,
                "connection limit reached; closing a new connection"
            );
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        match &tls {
            None => {
                let conn = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                    drop(slot);
                });
            }
            Some(acceptor) => {
                let (acceptor, builder, watcher) =
                    (acceptor.clone(), builder.clone(), graceful.watcher());
                tokio::spawn(async move {
                    let Ok(Ok(tls_stream)) =
                        tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await
                    else {
                        return;
                    };
                    let conn = builder
                        .serve_connection(TokioIo::new(tls_stream), service)
                        .into_owned();
                    let _ = watcher.watch(conn).await;
                    drop(slot);
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after 10s; closing them");
    }
    Ok(())
}

fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|part| {
            let mut it = part.split(';');
            let coding = it.next().unwrap_or("").trim();
            let q_zero = it.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !q_zero
        })
}

async fn metrics(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let body = s.body.load_full();
    let (own_plain, own_gzip) = s.own_part(&body);
    let gzip = accepts_gzip(&headers);
    // Concatenated gzip members decode as one stream, so the large body is compressed once per
    // collection and the small exporter part once per second at most.
    let (first, second) = if gzip {
        (body.gzip.clone(), own_gzip)
    } else {
        // Derived once per body, off the async workers; concurrent plain scrapes wait for that one.
        let plain = match body.plain_ready() {
            Some(p) => p,
            None => {
                let b = body.clone();
                tokio::task::spawn_blocking(move || b.plain())
                    .await
                    .unwrap_or_default()
            }
        };
        (plain, own_plain)
    };
    let len = first.len() + second.len();
    let stream = futures::stream::iter([Ok::<Bytes, Infallible>(first), Ok(second)]);
    let mut resp = axum::body::Body::from_stream(stream).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    if gzip {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    resp
}

async fn readyz(State(s): State<AppState>) -> Response {
    let synced = s.synced.load(Ordering::Acquire);
    let collected = s.collected.load(Ordering::Acquire);
    if synced && collected {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        let why = if !synced {
            "waiting for the Kubernetes Service list to sync\n"
        } else {
            "waiting for the first collection to finish\n"
        };
        (StatusCode::SERVICE_UNAVAILABLE, why).into_response()
    }
}

async fn landing(State(s): State<AppState>) -> Html<String> {
    let path = exposition::escape_label(&s.metric_path).replace('<', "&lt;");
    Html(format!(
        "<!doctype html><html><head><title>elb-exporter</title></head><body>\
         <h1>elb-exporter {}</h1><p>Huawei Cloud ELB listener metrics from Cloud Eye, labelled with \
         Kubernetes Services.</p><ul><li><a href=\"{path}\">{path}</a></li>\
         <li><a href=\"/healthz\">/healthz</a></li><li><a href=\"/readyz\">/readyz</a></li></ul>\
         </body></html>\n",
        env!("CARGO_PKG_VERSION")
    ))
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_negotiation() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
            accepts_gzip(&m)
        };
        assert!(h("gzip"));
        assert!(h("deflate, gzip;q=0.8"));
        assert!(h("*"));
        assert!(!h("gzip;q=0"));
        assert!(!h("identity"));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }
}
