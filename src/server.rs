//! HTTP endpoints. `/metrics` is served from memory: the pre-rendered cloud body plus the exporter's own
//! small registry, never waiting on a cloud call.

use crate::exposition::{self, Body};
use crate::telemetry::Telemetry;
use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
}

impl AppState {
    pub fn new(telemetry: Telemetry, metric_path: &str) -> Self {
        AppState {
            body: Arc::new(ArcSwap::from_pointee(Body::default())),
            telemetry,
            synced: Arc::new(AtomicBool::new(false)),
            collected: Arc::new(AtomicBool::new(false)),
            metric_path: metric_path.to_string(),
        }
    }
}

/// The router: `/metrics` (or the configured path), `/healthz`, `/readyz`, `/`.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route(&state.metric_path.clone(), get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/", get(landing))
        .with_state(state)
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
    let age = body.newest_ms.map(|ts| {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_millis() as i64;
        (now - ts).max(0) as f64 / 1000.0
    });
    s.telemetry.newest_datapoint_age.set(age.unwrap_or(0.0));
    let own = s.telemetry.render();
    let gzip = accepts_gzip(&headers);
    let (first, second) = if gzip {
        // Concatenated gzip members decode as one stream, so the large body is compressed once per
        // collection and only the small exporter part per scrape.
        (body.gzip.clone(), Bytes::from(exposition::gzip(&own)))
    } else {
        (body.plain.clone(), Bytes::from(own))
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
