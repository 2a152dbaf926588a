//! The real cloud client: AK/SK-signed HTTPS (rustls) with explicit timeouts, per-API rate limits, a
//! concurrency cap, classified retries, and request metrics.

use super::retry::{RateLimiter, backoff};
use super::{
    BatchQuery, BatchResult, CloudApi, CloudError, ElbVersion, ErrorBody, Lane, Listing, parse,
};
use crate::config::{Config, Credentials, Endpoint, RetrySettings};
use crate::signer::{self, Algorithm, SignRequest};
use crate::telemetry::{Api, Telemetry};
use arc_swap::ArcSwap;
use serde::Serialize;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{OnceCell, Semaphore};
use tokio::time::Instant;
use tracing::{debug, warn};

/// Cap on a response body: a listener page of 2000 items is ~2 MB, a 500-metric CES answer ~1 MB.
const MAX_BODY: usize = 32 * 1024 * 1024;
/// A load balancer with more pages than this is treated as a paging bug rather than followed forever.
const MAX_PAGES: usize = 1000;

/// Could not build the HTTP client (bad CA file...).
#[derive(Debug, thiserror::Error)]
pub enum ClientBuildError {
    #[error("cloud.ca_file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("HTTP client: {0}")]
    Http(String),
}

pub struct HttpCloud {
    http: reqwest::Client,
    credentials: ArcSwap<Credentials>,
    region: String,
    project_name: String,
    configured_project: String,
    domain_id: String,
    iam: Endpoint,
    elb: Endpoint,
    ces: Endpoint,
    retry: RetrySettings,
    request_timeout: Duration,
    limiters: [RateLimiter; 3],
    in_flight: Semaphore,
    telemetry: Telemetry,
    project: OnceCell<String>,
    auth: AuthGate,
}

/// Keeps the exporter from hammering the cloud with credentials it rejected: five bad signatures in a
/// row lock an AK for five minutes. Until a request has been accepted, only one is in flight (the probe);
/// after a 401 nothing is sent until a growing cooldown has passed (or new credentials arrive), and then
/// again a single probe goes first.
#[derive(Debug)]
struct AuthGate {
    state: std::sync::Mutex<AuthState>,
}

#[derive(Debug, Clone, Copy)]
enum AuthState {
    Unverified { probing: bool, strikes: u32 },
    Verified,
    Blocked { until: Instant, strikes: u32 },
}

/// Reopens the gate if a probing request is cancelled before it records its answer.
struct ProbeGuard<'a> {
    gate: &'a AuthGate,
    armed: bool,
}

impl ProbeGuard<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.gate.abandon();
        }
    }
}

/// First cooldown after a 401; doubles per consecutive rejection up to `AUTH_COOLDOWN_MAX`.
const AUTH_COOLDOWN: Duration = Duration::from_secs(60);
const AUTH_COOLDOWN_MAX: Duration = Duration::from_secs(15 * 60);

impl AuthGate {
    fn new() -> Self {
        AuthGate {
            state: std::sync::Mutex::new(AuthState::Unverified {
                probing: false,
                strikes: 0,
            }),
        }
    }

    fn reset(&self) {
        if let Ok(mut s) = self.state.lock() {
            *s = AuthState::Unverified {
                probing: false,
                strikes: 0,
            };
        }
    }

    /// Waits for permission to send; `Ok(true)` when this request is the probe.
    async fn admit(&self, api: Api) -> Result<bool, CloudError> {
        loop {
            {
                let Ok(mut s) = self.state.lock() else {
                    return Ok(false);
                };
                match *s {
                    AuthState::Verified => return Ok(false),
                    AuthState::Unverified {
                        probing: false,
                        strikes,
                    } => {
                        *s = AuthState::Unverified {
                            probing: true,
                            strikes,
                        };
                        return Ok(true);
                    }
                    AuthState::Unverified { probing: true, .. } => {}
                    AuthState::Blocked { until, strikes } => {
                        let now = Instant::now();
                        if now < until {
                            return Err(CloudError::AuthBackoff(api, until - now));
                        }
                        *s = AuthState::Unverified {
                            probing: true,
                            strikes,
                        };
                        return Ok(true);
                    }
                }
            }
            // Another request is probing the credentials: its answer decides for this one.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A probe ended without a verdict (its future was dropped): let the next request probe.
    fn abandon(&self) {
        if let Ok(mut s) = self.state.lock()
            && let AuthState::Unverified {
                probing: true,
                strikes,
            } = *s
        {
            *s = AuthState::Unverified {
                probing: false,
                strikes,
            };
        }
    }

    fn record(&self, probe: bool, result: &Result<Vec<u8>, CloudError>) {
        let Ok(mut s) = self.state.lock() else {
            return;
        };
        let strikes = match *s {
            AuthState::Unverified { strikes, .. } | AuthState::Blocked { strikes, .. } => strikes,
            AuthState::Verified => 0,
        };
        *s = match result {
            // Requests already in flight when the gate closed: one rejection is one strike.
            Err(CloudError::Unauthorized(..))
                if !probe && matches!(*s, AuthState::Blocked { .. }) =>
            {
                *s
            }
            Err(CloudError::Unauthorized(..)) => {
                let strikes = strikes.saturating_add(1);
                let cooldown = AUTH_COOLDOWN
                    .saturating_mul(1 << (strikes - 1).min(8))
                    .min(AUTH_COOLDOWN_MAX);
                warn!(
                    cooldown_s = cooldown.as_secs(),
                    strikes,
                    "credentials rejected (401); pausing cloud calls so the AK is not locked"
                );
                AuthState::Blocked {
                    until: Instant::now() + cooldown,
                    strikes,
                }
            }
            // Any other HTTP answer passed authentication.
            Ok(_)
            | Err(
                CloudError::Forbidden(..)
                | CloudError::NotFound(..)
                | CloudError::BadRequest(..)
                | CloudError::Throttled(..)
                | CloudError::Http(..)
                | CloudError::Malformed(..),
            ) => AuthState::Verified,
            // No verdict (timeout, connect error, 5xx): let the next request probe.
            Err(_) if probe => AuthState::Unverified {
                probing: false,
                strikes,
            },
            Err(_) => *s,
        };
    }
}

impl HttpCloud {
    pub fn new(cfg: &Config, telemetry: Telemetry) -> Result<Self, ClientBuildError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(cfg.cloud.connect_timeout)
            .timeout(cfg.cloud.request_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("elb-exporter/", env!("CARGO_PKG_VERSION")))
            .danger_accept_invalid_certs(cfg.cloud.insecure_skip_verify);
        if let Some(path) = &cfg.cloud.ca_file {
            let err = |reason: String| ClientBuildError::CaFile {
                path: path.display().to_string(),
                reason,
            };
            let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| err(e.to_string()))?;
            if certs.is_empty() {
                return Err(err("no PEM certificate in the file".into()));
            }
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let http = builder
            .build()
            .map_err(|e| ClientBuildError::Http(e.to_string()))?;
        let rl = &cfg.cloud.rate_limit;
        Ok(HttpCloud {
            http,
            credentials: ArcSwap::from_pointee(cfg.auth.credentials.clone()),
            region: cfg.auth.region.clone(),
            project_name: cfg.auth.project_name.clone(),
            configured_project: cfg.auth.project_id.clone(),
            domain_id: cfg.auth.domain_id.clone(),
            iam: cfg.endpoints.iam.clone(),
            elb: cfg.endpoints.elb.clone(),
            ces: cfg.endpoints.ces.clone(),
            retry: cfg.cloud.retry.clone(),
            request_timeout: cfg.cloud.request_timeout,
            limiters: [
                RateLimiter::new(rl.iam_per_minute),
                RateLimiter::new(rl.elb_per_minute),
                RateLimiter::new(rl.ces_per_minute),
            ],
            in_flight: Semaphore::new(cfg.cloud.max_concurrency),
            telemetry,
            project: OnceCell::new(),
            auth: AuthGate::new(),
        })
    }

    /// Swaps in rotated credentials; calls already signed finish with the old ones.
    pub fn set_credentials(&self, c: Credentials) {
        self.credentials.store(Arc::new(c));
        self.auth.reset();
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    fn limiter(&self, api: Api) -> &RateLimiter {
        match api {
            Api::IamListProjects => &self.limiters[0],
            Api::ElbListListeners => &self.limiters[1],
            Api::CesBatchQuery => &self.limiters[2],
        }
    }

    /// Sends one logical call and parses its answer, retrying transient failures within the retry budget.
    /// A 2xx body that does not parse is `Malformed` (a truncated or garbled answer) and is retried like
    /// any other transient failure, and counted as a failed request.
    async fn call<T>(
        &self,
        call: &Call<'_>,
        parse: impl Fn(&[u8]) -> Result<T, String>,
    ) -> Result<T, CloudError> {
        let start = Instant::now();
        let mut attempt = 0u32;
        loop {
            let probe = match self.auth.admit(call.api).await {
                Ok(p) => p,
                Err(e) => {
                    self.telemetry
                        .paused_calls
                        .with_label_values(&[call.api.as_str()])
                        .inc();
                    return Err(e);
                }
            };
            // If this future is dropped mid-probe (a caller's timeout), the guard reopens the gate so
            // the next call probes instead of every call waiting for a verdict that never comes.
            let guard = ProbeGuard {
                gate: &self.auth,
                armed: probe,
            };
            self.limiter(call.api).acquire_in(call.lane).await;
            let sent = {
                // The semaphore is never closed, so acquire cannot fail; treat it as "no cap" if it did.
                let _permit = self.in_flight.acquire().await.ok();
                self.attempt(call).await
            };
            guard.disarm();
            self.auth.record(probe, &sent);
            let result =
                sent.and_then(|body| parse(&body).map_err(|e| CloudError::Malformed(call.api, e)));
            let err = match result {
                Ok(parsed) => return Ok(parsed),
                Err(e) => e,
            };
            self.telemetry
                .cloud_failures
                .with_label_values(&[call.api.as_str(), err.metric_code()])
                .inc();
            attempt += 1;
            if !err.is_retryable() || attempt >= self.retry.max_attempts {
                return Err(err);
            }
            let delay = backoff(
                &self.retry,
                attempt - 1,
                err.retry_after(),
                rand::random::<f64>(),
            );
            if start.elapsed() + delay > self.retry.max_elapsed {
                return Err(err);
            }
            warn!(
                api = call.api.as_str(),
                attempt,
                code = err.metric_code(),
                cloud_code = err.cloud_code().unwrap_or(""),
                delay_ms = delay.as_millis() as u64,
                error = %err,
                "cloud call failed, retrying"
            );
            tokio::time::sleep(delay).await;
        }
    }

    /// One signed HTTP request.
    async fn attempt(&self, call: &Call<'_>) -> Result<Vec<u8>, CloudError> {
        let api = call.api;
        let creds = self.credentials.load();
        let mut headers: Vec<(String, String)> = vec![
            ("Content-Type".into(), "application/json".into()),
            ("X-Sdk-Date".into(), signer::sdk_date(SystemTime::now())),
        ];
        if let Some(p) = call.project {
            headers.push(("X-Project-Id".into(), p.to_string()));
        }
        if api == Api::IamListProjects && !self.domain_id.is_empty() {
            headers.push(("X-Domain-Id".into(), self.domain_id.clone()));
        }
        if let Some(t) = &creds.security_token {
            headers.push(("X-Security-Token".into(), t.expose().to_string()));
        }
        let signed = signer::sign(
            &SignRequest {
                method: call.method.as_str(),
                host: &call.endpoint.authority,
                path: &call.path,
                query: &call.query,
                headers: &headers,
                body: &call.body,
            },
            &creds.access_key,
            creds.secret_key.expose(),
            &Algorithm::SdkHmacSha256,
        );
        let mut url = format!("{}{}", call.endpoint.base_url(), call.path);
        if !signed.query_string.is_empty() {
            url.push('?');
            url.push_str(&signed.query_string);
        }
        let mut req = self.http.request(call.method.clone(), &url);
        for (k, v) in &signed.headers {
            let Ok(mut value) = reqwest::header::HeaderValue::from_str(v) else {
                return Err(CloudError::Connect(
                    call.api,
                    format!("header {k} has characters HTTP cannot carry"),
                ));
            };
            // Sensitive values are redacted by the HTTP stack's Debug, so even trace logs cannot show them.
            if k.eq_ignore_ascii_case("x-security-token") || k.eq_ignore_ascii_case("authorization")
            {
                value.set_sensitive(true);
            }
            req = req.header(k.as_str(), value);
        }
        if !call.body.is_empty() {
            req = req.body(call.body.clone());
        }

        self.telemetry
            .cloud_requests
            .with_label_values(&[api.as_str()])
            .inc();
        let started = Instant::now();
        let result = self.exchange(api, req).await;
        self.telemetry
            .cloud_duration
            .with_label_values(&[api.as_str()])
            .observe(started.elapsed().as_secs_f64());
        debug!(
            api = api.as_str(),
            path = %call.path,
            elapsed_ms = started.elapsed().as_millis() as u64,
            ok = result.is_ok(),
            "cloud request"
        );
        result
    }

    async fn exchange(
        &self,
        api: Api,
        req: reqwest::RequestBuilder,
    ) -> Result<Vec<u8>, CloudError> {
        let transport = |e: reqwest::Error| -> CloudError {
            if e.is_timeout() {
                CloudError::Timeout(api, self.request_timeout)
            } else {
                // Without the URL: it is ours, and the chain says enough.
                CloudError::Connect(api, error_chain(&e.without_url()))
            }
        };
        let mut resp = req.send().await.map_err(transport)?;
        let status = resp.status().as_u16();
        let request_id = resp
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(128).collect::<String>());
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let mut body = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > MAX_BODY {
                        return Err(CloudError::Malformed(
                            api,
                            format!("response body over {MAX_BODY} bytes"),
                        ));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) if e.is_timeout() => {
                    return Err(CloudError::Timeout(api, self.request_timeout));
                }
                Err(e) => {
                    return Err(CloudError::Malformed(
                        api,
                        format!("body read failed: {}", error_chain(&e.without_url())),
                    ));
                }
            }
        }
        if (200..300).contains(&status) {
            return Ok(body);
        }
        let (code, message) = parse::error_fields(&body);
        Err(CloudError::from_status(
            api,
            ErrorBody {
                status,
                code,
                message,
                request_id,
            },
            retry_after,
        ))
    }

    /// Lists the listeners of `ids` (one id on v2), or of the whole project when `ids` is `None`,
    /// following every page until a short one, at most `max_pages`.
    async fn list_paged(
        &self,
        version: ElbVersion,
        ids: Option<&[&str]>,
        lane: Lane,
        max_pages: u32,
        page_gap: Duration,
    ) -> Result<Listing, CloudError> {
        let api = Api::ElbListListeners;
        let project = self.project_id().await?;
        let limit = version.page_size();
        let path = format!("/{}/{project}/elb/listeners", version.as_str());
        let mut out = Listing::default();
        let mut seen: HashSet<String> = HashSet::new();
        let mut marker: Option<String> = None;
        for page_no in 0..max_pages.min(MAX_PAGES as u32) {
            if page_no > 0 && !page_gap.is_zero() {
                tokio::time::sleep(page_gap).await;
            }
            let mut query: Vec<(String, String)> = ids
                .unwrap_or_default()
                .iter()
                .map(|id| ("loadbalancer_id".to_string(), id.to_string()))
                .collect();
            query.push(("limit".to_string(), limit.to_string()));
            if let Some(m) = &marker {
                query.push(("marker".to_string(), m.clone()));
            }
            let call = Call {
                api,
                endpoint: &self.elb,
                method: reqwest::Method::GET,
                path: path.clone(),
                query,
                body: Vec::new(),
                project: Some(&project),
                lane,
            };
            let page = self
                .call(&call, |body| match ids {
                    Some(ids) => parse::listener_page(body, ids),
                    None => parse::listener_page_all(body),
                })
                .await?;
            out.calls += 1;
            out.seen += page.raw_count;
            if page.skipped > 0 {
                self.telemetry
                    .skipped
                    .with_label_values(&["invalid_listener"])
                    .inc_by(page.skipped as u64);
            }
            for (lb, l) in page.listeners {
                if seen.insert(l.id.clone()) {
                    out.by_lb.entry(lb).or_default().push(l);
                }
            }
            if page.raw_count < limit {
                out.complete = true;
                return Ok(out);
            }
            let next = page.next_marker.or(page.last_id).ok_or_else(|| {
                CloudError::Malformed(api, "a full page without listener ids".into())
            })?;
            if marker.as_deref() == Some(next.as_str()) {
                return Err(CloudError::Malformed(
                    api,
                    format!("paging marker {next:?} did not advance"),
                ));
            }
            marker = Some(next);
        }
        if ids.is_none() && max_pages < MAX_PAGES as u32 {
            // The caller's budget, not a paging bug: it falls back to filtered listings.
            return Ok(out);
        }
        Err(CloudError::Malformed(
            api,
            format!("more than {MAX_PAGES} pages of listeners"),
        ))
    }

    async fn resolve_project(&self) -> Result<String, CloudError> {
        let call = Call {
            api: Api::IamListProjects,
            endpoint: &self.iam,
            method: reqwest::Method::GET,
            path: "/v3/projects".into(),
            query: vec![("name".into(), self.project_name.clone())],
            body: Vec::new(),
            project: None,
            lane: Lane::Priority,
        };
        let ids = self
            .call(&call, |body| parse::projects(body, &self.project_name))
            .await?;
        match ids.as_slice() {
            [id] if id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
            {
                Ok(id.clone())
            }
            [id] => Err(CloudError::Project(format!(
                "IAM returned an unusable project id {id:?} for {:?}",
                self.project_name
            ))),
            [] => Err(CloudError::Project(format!(
                "no project named {:?} (is the region enabled for this account?); set auth.project_id",
                self.project_name
            ))),
            many => Err(CloudError::Project(format!(
                "{} projects are named {:?}; set auth.project_id to the one to use",
                many.len(),
                self.project_name
            ))),
        }
    }
}

struct Call<'a> {
    api: Api,
    endpoint: &'a Endpoint,
    method: reqwest::Method,
    path: String,
    query: Vec<(String, String)>,
    body: Vec<u8>,
    project: Option<&'a str>,
    lane: Lane,
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// `Retry-After` as seconds or an HTTP date.
fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[derive(Serialize)]
struct CesDimension<'a> {
    name: &'a str,
    value: &'a str,
}

#[derive(Serialize)]
struct CesMetric<'a> {
    namespace: &'a str,
    metric_name: &'a str,
    dimensions: Vec<CesDimension<'a>>,
}

#[derive(Serialize)]
struct CesBody<'a> {
    metrics: Vec<CesMetric<'a>>,
    from: i64,
    to: i64,
    period: &'a str,
    filter: &'a str,
}

/// The CES request body, compact JSON in the documented field order.
pub fn ces_body(q: &BatchQuery) -> Vec<u8> {
    let body = CesBody {
        metrics: q
            .metrics
            .iter()
            .map(|m| CesMetric {
                namespace: &m.namespace,
                metric_name: &m.metric_name,
                dimensions: m
                    .dimensions
                    .iter()
                    .map(|(n, v)| CesDimension { name: n, value: v })
                    .collect(),
            })
            .collect(),
        from: q.from_ms,
        to: q.to_ms,
        period: q.period,
        filter: q.filter.as_str(),
    };
    // Serializing plain strings and integers cannot fail.
    serde_json::to_vec(&body).unwrap_or_default()
}

#[async_trait::async_trait]
impl CloudApi for HttpCloud {
    async fn project_id(&self) -> Result<String, CloudError> {
        if !self.configured_project.is_empty() {
            return Ok(self.configured_project.clone());
        }
        // Failures are not cached: the next call asks IAM again.
        self.project
            .get_or_try_init(|| self.resolve_project())
            .await
            .cloned()
    }

    async fn list_listeners_of(
        &self,
        version: ElbVersion,
        loadbalancer_ids: &[&str],
        lane: Lane,
    ) -> Result<Listing, CloudError> {
        // v3 filters are multi-valued (`loadbalancer_id=A&loadbalancer_id=B`); v2 takes one id.
        let per_call = version.ids_per_listing();
        let mut out = Listing {
            complete: true,
            ..Listing::default()
        };
        for chunk in loadbalancer_ids.chunks(per_call) {
            let part = self
                .list_paged(version, Some(chunk), lane, MAX_PAGES as u32, Duration::ZERO)
                .await?;
            out.by_lb.extend(part.by_lb);
            out.seen += part.seen;
            out.calls += part.calls;
        }
        Ok(out)
    }

    async fn list_all_listeners(
        &self,
        version: ElbVersion,
        lane: Lane,
        max_pages: u32,
        page_gap: Duration,
    ) -> Result<Listing, CloudError> {
        self.list_paged(version, None, lane, max_pages, page_gap)
            .await
    }

    async fn batch_query(&self, query: &BatchQuery) -> Result<BatchResult, CloudError> {
        let api = Api::CesBatchQuery;
        let project = self.project_id().await?;
        let call = Call {
            api,
            endpoint: &self.ces,
            method: reqwest::Method::POST,
            path: format!("/V1.0/{project}/batch-query-metric-data"),
            query: Vec::new(),
            body: ces_body(query),
            project: Some(&project),
            lane: Lane::Priority,
        };
        let result = self
            .call(&call, |body| {
                parse::batch_result(body, &query.metrics, query.filter)
            })
            .await?;
        for (reason, n) in &result.skipped {
            self.telemetry
                .skipped
                .with_label_values(&[reason])
                .inc_by(*n as u64);
        }
        Ok(result)
    }
}
