//! HTTP endpoints. `/metrics` is served from memory: the pre-rendered cloud body plus the exporter's own
//! small registry, never waiting on a cloud call.

use crate::exposition::{self, Body};
use crate::handover::{self, HandoverError};
use crate::telemetry::Telemetry;
use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod auth;
mod listen;

pub use auth::{MAX_CONCURRENT_VERIFICATIONS, Verdict, WebAuth};
pub use listen::{DropLog, DropReason, ServeError, TlsFiles, serve, tls_acceptor};

/// The Prometheus text format, version 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Shared state of the HTTP server.
#[derive(Clone)]
pub struct AppState {
    /// The current body, swapped whole by the renderer.
    pub body: Arc<ArcSwap<Body>>,
    /// The exporter's own metrics, appended to each body.
    pub telemetry: Telemetry,
    /// Kubernetes watch synced (and the first ELB lookups done).
    pub synced: Arc<AtomicBool>,
    /// The first collection cycle finished, successfully or not.
    pub first_cycle_done: Arc<AtomicBool>,
    /// Every pipeline task is alive; `/healthz` fails otherwise, so Kubernetes restarts the pod.
    pub healthy: Arc<AtomicBool>,
    /// The configured `web.metric_path`.
    pub metric_path: String,
    /// Under leader election: the warm copy followers mirror (served on [`handover::PATH`]).
    pub peer: Option<Arc<handover::Source>>,
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
    /// Not ready, healthy, serving an empty body.
    pub fn new(telemetry: Telemetry, metric_path: &str) -> Self {
        AppState {
            body: Arc::new(ArcSwap::from_pointee(Body::default())),
            telemetry,
            synced: Arc::new(AtomicBool::new(false)),
            first_cycle_done: Arc::new(AtomicBool::new(false)),
            healthy: Arc::new(AtomicBool::new(true)),
            metric_path: metric_path.to_string(),
            peer: None,
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
        describe_body(&self.telemetry, body);
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

/// Sets the gauges that describe the targets and data behind `body` from the body itself, so a
/// scrape's own metrics never disagree with its series.
fn describe_body(telemetry: &Telemetry, body: &Body) {
    telemetry.services.set(body.services as i64);
    telemetry.listeners.set(body.listeners as i64);
    telemetry.series.set(body.series as i64);
    for (problem, n) in &body.problems {
        telemetry
            .discovery_problems
            .with_label_values(&[problem.as_str()])
            .set(*n as i64);
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
        protected = protected.route_layer(axum::middleware::from_fn_with_state(
            auth,
            auth::require_auth,
        ));
    }
    // The warm copy proves the AK/SK itself (followers cannot answer basic auth: only hashes are
    // configured), so it stays outside the basic-auth layer.
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route(handover::PATH, get(warm_copy))
        .with_state(state)
        .merge(protected)
}

#[derive(serde::Deserialize)]
struct Have {
    have: Option<String>,
}

/// The leader's series for a follower (see [`handover`]); 404 without leader election.
async fn warm_copy(
    State(s): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<Have>,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Response {
    let Some(source) = s.peer.clone() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let token = headers.get(handover::HEADER).and_then(|v| v.to_str().ok());
    let pq = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    match source.answer(token, pq, q.have.as_deref()).await {
        Ok(Some(a)) => {
            let mut resp = a.body.into_response();
            let h = resp.headers_mut();
            let text = |s: String| HeaderValue::try_from(s).unwrap_or(HeaderValue::from_static(""));
            h.insert(handover::HEADER, text(a.token));
            h.insert(handover::VERSION_HEADER, text(a.version.to_string()));
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/gzip"),
            );
            resp
        }
        Ok(None) => StatusCode::NO_CONTENT.into_response(),
        Err(e @ HandoverError::Refused(_)) => {
            (StatusCode::UNAUTHORIZED, e.to_string()).into_response()
        }
        Err(e @ HandoverError::NotLeading) => (StatusCode::CONFLICT, e.to_string()).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
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

async fn healthz(State(s): State<AppState>) -> Response {
    if s.healthy.load(Ordering::Acquire) {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "a pipeline task died; see the log\n",
        )
            .into_response()
    }
}

async fn readyz(State(s): State<AppState>) -> Response {
    let synced = s.synced.load(Ordering::Acquire);
    let first_cycle_done = s.first_cycle_done.load(Ordering::Acquire);
    if synced && first_cycle_done {
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
