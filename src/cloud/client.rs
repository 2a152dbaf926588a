//! The real cloud client: AK/SK-signed HTTPS (rustls) with explicit timeouts, per-API rate limits, a
//! concurrency cap, classified retries, and request metrics.

use super::auth::{AuthGate, Ticket, Verdict};
use super::retry::{RateLimiter, backoff};
use super::{
    BatchQuery, BatchResult, CES_SMALL_BATCH, CloudApi, CloudError, ElbVersion, ErrorBody,
    L7Policy, Lane, LbListing, Listing, LoadBalancer, Pool, parse,
};
use crate::cloud::Operation;
use crate::config::{Config, Credentials, Endpoint, RetrySettings};
use crate::signer::{self, Algorithm, SignRequest};
use crate::telemetry::Telemetry;
use serde::Serialize;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};
use tokio::sync::{OnceCell, Semaphore, SemaphorePermit};
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Answer size caps, sized from the request so that a huge but valid answer cannot exhaust memory:
/// a real listener is ~1 KB (8 KiB leaves room for tags and certificate lists), a CES entry ~0.5 KB
/// plus ~60 B per datapoint (CES returns at most 3000 datapoints per answer), an IAM project ~0.3 KB
/// (the name filter leaves one or two). Error answers are a few hundred bytes: only their start is read.
const LISTENER_BYTES: usize = 8 * 1024;
/// Listener ids per forwarding-policy listing (the filter is multi-valued; this keeps the URL short).
const POLICY_IDS_PER_CALL: usize = 50;
const CES_ENTRY_BYTES: usize = 2 * 1024;
const CES_POINT_BYTES: usize = 256;
const CES_MAX_POINTS: usize = 3000;
const IAM_MAX_BODY: usize = 1024 * 1024;
const ERROR_MAX_BODY: usize = 64 * 1024;
const BODY_SLACK: usize = 64 * 1024;
/// Answer bytes all requests in flight may hold at once (each reserves its Content-Length, or its cap
/// when the length is not announced): bounds memory whatever `max_concurrency` is.
const BODY_BUDGET: usize = 48 * 1024 * 1024;
/// A load balancer with more pages than this is treated as a paging bug rather than followed forever.
const MAX_PAGES: usize = 1000;

/// Could not build the HTTP client (bad CA file...).
#[derive(Debug, thiserror::Error)]
pub enum ClientBuildError {
    /// `cloud.ca_file` could not be read or holds no usable certificate.
    #[error("cloud.ca_file {path}: {reason}")]
    CaFile {
        /// The configured path.
        path: String,
        /// Why it is unusable.
        reason: String,
    },
    /// reqwest refused the client configuration.
    #[error("HTTP client: {0}")]
    Http(String),
}

/// The real cloud: AK/SK-signed HTTPS to IAM, ELB and CES with timeouts, retries, per-service rate
/// limits and the 401 gate that keeps a wrong key from being locked.
pub struct HttpCloud {
    http: reqwest::Client,
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
    body_budget: Semaphore,
    telemetry: Telemetry,
    project: std::sync::Mutex<Arc<ProjectCache>>,
    auth: AuthGate,
    /// `CES_SMALL_BATCH` once CES refused a larger batch and accepted that many; 0 before.
    ces_limit: AtomicUsize,
    /// Shared-LB objects answered under `V2_LBAAS_PREFIX` where the Huawei v2 routes do not exist.
    v2_lbaas: AtomicBool,
}

/// Where Open Telekom Cloud documents shared-LB listeners, pools and forwarding policies (same filters
/// and paging as v2).
const V2_LBAAS_PREFIX: &str = "/v2.0/lbaas/";

/// The project id resolved through IAM, for one access key (the region is the client's): rotated
/// credentials may belong to another account, so the cache goes with them.
struct ProjectCache {
    access_key: String,
    id: OnceCell<String>,
    /// The last failed lookup: every caller gets it until `retry_at`, so a hundred ELB listings do not
    /// each ask IAM (twice) while a permission is missing. The delay starts at `retry.initial_backoff`
    /// and doubles up to `retry.max_backoff`: a later grant heals without a restart.
    failure: std::sync::Mutex<Option<ProjectFailure>>,
}

struct ProjectFailure {
    retry_at: Instant,
    delay: Duration,
    error: CloudError,
}

impl ProjectCache {
    fn new(access_key: String) -> Self {
        ProjectCache {
            access_key,
            id: OnceCell::new(),
            failure: std::sync::Mutex::new(None),
        }
    }

    fn failure(&self) -> std::sync::MutexGuard<'_, Option<ProjectFailure>> {
        self.failure.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl HttpCloud {
    /// Builds the client from `cfg` (endpoints, credentials, timeouts, limits); fails only on TLS setup.
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
        telemetry
            .ces_batch_size
            .set(i64::try_from(cfg.effective_batch_size()).unwrap_or(i64::MAX));
        Ok(HttpCloud {
            http,
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
            body_budget: Semaphore::new(BODY_BUDGET),
            telemetry,
            project: std::sync::Mutex::new(Arc::new(ProjectCache::new(
                cfg.auth.credentials.access_key.clone(),
            ))),
            auth: AuthGate::new(cfg.auth.credentials.clone()),
            ces_limit: AtomicUsize::new(0),
            v2_lbaas: AtomicBool::new(false),
        })
    }

    /// Swaps in rotated credentials; calls already signed finish with the old ones, and their answers
    /// do not judge the new ones. The resolved project id is forgotten (it belongs to the old key).
    pub fn set_credentials(&self, c: Credentials) {
        *self.project_cache() = Arc::new(ProjectCache::new(c.access_key.clone()));
        self.auth.set_credentials(c);
    }

    fn project_cache(&self) -> std::sync::MutexGuard<'_, Arc<ProjectCache>> {
        self.project.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn limiter(&self, api: Operation) -> &RateLimiter {
        match api {
            Operation::IamListProjects | Operation::IamListAuthProjects => &self.limiters[0],
            // One ELB budget for every ELB listing.
            Operation::ElbListListeners
            | Operation::ElbListPools
            | Operation::ElbListL7policies
            | Operation::ElbListLoadbalancers => &self.limiters[1],
            Operation::CesBatchQuery => &self.limiters[2],
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
        let mut last: Option<CloudError> = None;
        loop {
            let ticket = match last.take() {
                None => self.admit(call.api, call.lane).await?,
                // A retry that would start after max_elapsed (the gate or the rate limit held it) is not
                // sent: the last failure stands.
                Some(err) => {
                    let left = self.retry.max_elapsed.saturating_sub(start.elapsed());
                    match tokio::time::timeout(left, self.admit(call.api, call.lane)).await {
                        Ok(ticket) => ticket?,
                        Err(_) => return Err(err),
                    }
                }
            };
            let sent = self.send_admitted(call, ticket).await;
            // The body's share of the budget is held until it is parsed.
            let result = sent.and_then(|(body, _held)| {
                parse(&body).map_err(|e| CloudError::Malformed(call.api, e))
            });
            let err = match result {
                Ok(parsed) => return Ok(parsed),
                Err(e) => e,
            };
            self.telemetry
                .cloud_failures
                .with_label_values(&[call.api.as_str(), err.metric_code()])
                .inc();
            attempt += 1;
            let Some(delay) = self.retry_delay(call, &err, attempt, start) else {
                return Err(err);
            };
            tokio::time::sleep(delay).await;
            last = Some(err);
        }
    }

    /// Sends one admitted attempt within the in-flight cap and hands its outcome to the auth gate.
    async fn send_admitted(
        &self,
        call: &Call<'_>,
        ticket: Ticket<'_>,
    ) -> Result<(Vec<u8>, SemaphorePermit<'_>), CloudError> {
        let sent = {
            // The semaphore is never closed, so acquire cannot fail; treat it as "no cap" if it did.
            let _permit = self.in_flight.acquire().await.ok();
            self.attempt(call, &ticket.credentials).await
        };
        let probe = ticket.probe;
        let verdict = match (call.api, &sent) {
            // The fallback is sent only after IAM accepted the key (a 403): its 401 means this
            // API takes no AK/SK here (documented for tokens only), not a bad key, so it must not
            // close the gate for every API.
            (Operation::IamListAuthProjects, Err(CloudError::Unauthorized(..))) => Verdict::Unknown,
            _ => Verdict::of(&sent),
        };
        if let Some(cooldown) = ticket.finish(verdict) {
            warn!(
                api = call.api.as_str(),
                cooldown_s = cooldown.as_secs(),
                probe,
                "credentials rejected (401); pausing cloud calls so the AK is not locked"
            );
        }
        sent
    }

    /// How long to wait before retrying after failed attempt number `attempt` (1-based), or `None`
    /// when the failure is final: not retryable, attempts used up, or the wait would pass max_elapsed.
    fn retry_delay(
        &self,
        call: &Call<'_>,
        err: &CloudError,
        attempt: u32,
        start: Instant,
    ) -> Option<Duration> {
        if !err.is_retryable() || attempt >= self.retry.max_attempts {
            return None;
        }
        let delay = backoff(
            &self.retry,
            attempt - 1,
            err.retry_after(),
            rand::random::<f64>(),
        );
        if start.elapsed() + delay > self.retry.max_elapsed {
            return None;
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
        Some(delay)
    }

    /// Permission from the auth gate to send one request. Refused calls are refused before they take
    /// a place in the rate limit; a call waiting for the limiter is not yet at risk, so it takes its
    /// ticket only afterwards. If the caller drops the future while the ticket is out (its timeout),
    /// the ticket frees its place, so the next call probes instead of waiting for a verdict that never
    /// comes.
    async fn admit(&self, api: Operation, lane: Lane) -> Result<Ticket<'_>, CloudError> {
        let admitted = match self.auth.refusal(api) {
            Some(e) => Err(e),
            None => {
                self.limiter(api).acquire_in(lane).await;
                self.auth.admit(api).await
            }
        };
        if admitted.is_err() {
            self.telemetry
                .paused_calls
                .with_label_values(&[api.as_str()])
                .inc();
        }
        admitted
    }

    /// One signed HTTP request.
    async fn attempt(
        &self,
        call: &Call<'_>,
        creds: &Credentials,
    ) -> Result<(Vec<u8>, SemaphorePermit<'_>), CloudError> {
        let api = call.api;
        let mut headers: Vec<(String, String)> = vec![
            ("Content-Type".into(), "application/json".into()),
            ("X-Sdk-Date".into(), signer::sdk_date(SystemTime::now())),
        ];
        if let Some(p) = call.project {
            headers.push(("X-Project-Id".into(), p.to_string()));
        }
        if api == Operation::IamListProjects && !self.domain_id.is_empty() {
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
        let result = self.exchange(api, req, call.max_body).await;
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
        api: Operation,
        req: reqwest::RequestBuilder,
        max_body: usize,
    ) -> Result<(Vec<u8>, SemaphorePermit<'_>), CloudError> {
        let transport = |e: reqwest::Error| -> CloudError {
            if e.is_timeout() {
                CloudError::Timeout(api, self.request_timeout)
            } else {
                // Without the URL: it is ours, and the chain says enough.
                CloudError::Connect(api, error_chain(&e.without_url()))
            }
        };
        let resp = req.send().await.map_err(transport)?;
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
        let success = (200..300).contains(&status);
        let cap = if success {
            max_body.min(BODY_BUDGET)
        } else {
            ERROR_MAX_BODY
        };
        let (body, held) = self.read_body(api, resp, cap, success).await?;
        if success {
            return Ok((body, held));
        }
        drop(held);
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

    /// Reads at most `cap` bytes of an answer, holding that many bytes of the shared budget. A success
    /// over the cap is `Malformed`; an error answer is only cut (its start carries code and message).
    async fn read_body(
        &self,
        api: Operation,
        mut resp: reqwest::Response,
        cap: usize,
        strict: bool,
    ) -> Result<(Vec<u8>, SemaphorePermit<'_>), CloudError> {
        let over = || CloudError::Malformed(api, format!("response body over {cap} bytes"));
        let announced = resp.content_length().map(|n| n as usize);
        if strict && announced.is_some_and(|n| n > cap) {
            return Err(over());
        }
        let reserve = announced.unwrap_or(cap).min(cap);
        // The budget is never closed and `cap` never exceeds it, so this only waits.
        let held = self
            .body_budget
            .acquire_many(u32::try_from(reserve.max(1)).unwrap_or(u32::MAX))
            .await
            .map_err(|_| over())?;
        let mut body = Vec::with_capacity(reserve);
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    let room = reserve - body.len();
                    if chunk.len() > room {
                        if strict {
                            return Err(over());
                        }
                        body.extend_from_slice(&chunk[..room]);
                        break;
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
        Ok((body, held))
    }

    /// One CES batch call, as given.
    async fn batch_once(&self, query: &BatchQuery) -> Result<BatchResult, CloudError> {
        let api = Operation::CesBatchQuery;
        let project = self.project_id().await?;
        let call = Call {
            api,
            endpoint: &self.ces,
            method: reqwest::Method::POST,
            path: format!("/V1.0/{project}/batch-query-metric-data"),
            query: Vec::new(),
            body: ces_body(query),
            project: Some(&project),
            max_body: ces_max_body(query),
            lane: query.lane,
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

    /// `query` in calls of at most `size` metrics, appended to `acc` in request order.
    async fn batch_in_parts(
        &self,
        query: &BatchQuery,
        size: usize,
        mut acc: BatchResult,
    ) -> Result<BatchResult, CloudError> {
        for part in query.metrics.chunks(size.max(1)) {
            let q = BatchQuery {
                metrics: part.to_vec(),
                ..query.clone()
            };
            let r = self.batch_once(&q).await?;
            acc.newest.extend(r.newest);
            acc.skipped.extend(r.skipped);
        }
        Ok(acc)
    }

    /// Lists the listeners of `ids`, isolating an id the cloud refuses (see [`isolating`]).
    async fn list_isolating(
        &self,
        version: ElbVersion,
        ids: &[&str],
        lane: Lane,
    ) -> Result<Listing, CloudError> {
        let list = |ids: &[&str]| {
            let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
            async move {
                let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
                self.list_paged(version, Some(&ids), lane, MAX_PAGES as u32, Duration::ZERO)
                    .await
            }
        };
        let merge = |out: &mut Listing, part: Listing| {
            out.by_lb.extend(part.by_lb);
            out.seen += part.seen;
            out.calls += part.calls;
        };
        isolating(ids, false, &list, &merge).await
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
        let project = self.project_id().await?;
        let at = |path: String| {
            self.list_paged_at(version, path, &project, ids, lane, max_pages, page_gap)
        };
        self.with_v2_fallback(version, "listeners", &project, at)
            .await
    }

    /// Asks `at` the Huawei path of an ELB collection; on v2, where that route does not exist (404),
    /// the OpenStack path Open Telekom Cloud documents shared-LB objects at
    /// (`/v2.0/lbaas/<collection>`, same filters and paging), and keeps asking that one once it answers.
    async fn with_v2_fallback<T, F, Fut>(
        &self,
        version: ElbVersion,
        collection: &str,
        project: &str,
        at: F,
    ) -> Result<T, CloudError>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<T, CloudError>>,
    {
        let lbaas = format!("{V2_LBAAS_PREFIX}{collection}");
        if version == ElbVersion::V2 && self.v2_lbaas.load(Ordering::Relaxed) {
            return at(lbaas).await;
        }
        let result = at(format!("/{}/{project}/elb/{collection}", version.as_str())).await;
        match result {
            Err(CloudError::NotFound(..)) if version == ElbVersion::V2 => {
                let fallback = at(lbaas.clone()).await;
                if fallback.is_err() {
                    return result;
                }
                if !self.v2_lbaas.swap(true, Ordering::Relaxed) {
                    info!(
                        path = %lbaas,
                        "shared-LB objects are listed at the OpenStack paths: /v2/{{project_id}}/elb/{collection} does not exist on this cloud"
                    );
                }
                fallback
            }
            other => other,
        }
    }

    /// One listing at `path`, following every page until a short one, at most `max_pages`.
    #[allow(clippy::too_many_arguments)]
    async fn list_paged_at(
        &self,
        version: ElbVersion,
        path: String,
        project: &str,
        ids: Option<&[&str]>,
        lane: Lane,
        max_pages: u32,
        page_gap: Duration,
    ) -> Result<Listing, CloudError> {
        let api = Operation::ElbListListeners;
        let limit = version.page_size();
        let mut out = Listing::default();
        let mut seen: HashSet<String> = HashSet::new();
        let mut pager = Pager::default();
        for page_no in 0..max_pages.min(MAX_PAGES as u32) {
            if page_no > 0 && !page_gap.is_zero() {
                tokio::time::sleep(page_gap).await;
            }
            let filters = ids
                .unwrap_or_default()
                .iter()
                .map(|id| ("loadbalancer_id".to_string(), id.to_string()))
                .collect();
            let query = pager.query(filters, limit);
            let max_body = limit * LISTENER_BYTES + BODY_SLACK;
            let call = self.elb_page_call(api, &path, query, project, max_body, lane);
            let page = self
                .call(&call, |body| match ids {
                    Some(ids) => parse::listener_page_limited(body, ids, limit),
                    None => parse::listener_page_all_limited(body, limit),
                })
                .await?;
            out.calls += 1;
            out.seen += page.raw_count;
            self.count_skipped("invalid_listener", page.skipped - page.unattributable);
            self.count_skipped("unattributable_listener", page.unattributable);
            for (lb, l) in page.listeners {
                if seen.insert(l.id.clone()) {
                    out.by_lb.entry(lb).or_default().push(l);
                }
            }
            if page.raw_count < limit {
                out.complete = true;
                return Ok(out);
            }
            let next = page.next_marker.or(page.last_id);
            pager.advance(api, next, || "a full page without listener ids".into())?;
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

    /// A GET of one page of an ELB listing at `path`.
    fn elb_page_call<'a>(
        &'a self,
        api: Operation,
        path: &str,
        query: Vec<(String, String)>,
        project: &'a str,
        max_body: usize,
        lane: Lane,
    ) -> Call<'a> {
        Call {
            api,
            endpoint: &self.elb,
            method: reqwest::Method::GET,
            path: path.to_string(),
            query,
            body: Vec::new(),
            project: Some(project),
            max_body,
            lane,
        }
    }

    /// Counts `n` listed items left out for `reason` (nothing when `n` is 0).
    fn count_skipped(&self, reason: &'static str, n: usize) {
        if n > 0 {
            self.telemetry
                .skipped
                .with_label_values(&[reason])
                .inc_by(n as u64);
        }
    }

    /// Lists every item of an ELB collection matching `filters` (v2 at the OpenStack path where the
    /// Huawei one does not exist), following pages as [`Self::list_paged`] does, at most `max_pages`.
    async fn list_collection<T>(
        &self,
        c: &Collection<T>,
        version: ElbVersion,
        filters: &[(&str, &str)],
        lane: Lane,
        max_pages: usize,
    ) -> Result<Collected<T>, CloudError> {
        let project = self.project_id().await?;
        let at = |path: String| {
            self.list_collection_at(c, version, path, &project, filters, lane, max_pages)
        };
        self.with_v2_fallback(version, c.name, &project, at).await
    }

    /// One collection listing at `path`: each answer capped at the collection's bytes per item asked
    /// for; items its parser rejects are counted as skipped.
    #[allow(clippy::too_many_arguments)]
    async fn list_collection_at<T>(
        &self,
        c: &Collection<T>,
        version: ElbVersion,
        path: String,
        project: &str,
        filters: &[(&str, &str)],
        lane: Lane,
        max_pages: usize,
    ) -> Result<Collected<T>, CloudError> {
        let Collection {
            api,
            name: collection,
            item_bytes,
            parse,
        } = *c;
        let limit = version.page_size();
        let mut out = Collected {
            items: Vec::new(),
            complete: false,
            calls: 0,
        };
        let mut pager = Pager::default();
        for _ in 0..max_pages.min(MAX_PAGES) {
            let filters = filters
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let query = pager.query(filters, limit);
            let max_body = limit * item_bytes + BODY_SLACK;
            let call = self.elb_page_call(api, &path, query, project, max_body, lane);
            let page = self
                .call(&call, |body| {
                    parse::item_page(body, collection, limit, parse)
                })
                .await?;
            out.calls += 1;
            self.count_skipped("invalid_elb_item", page.skipped);
            out.items.extend(page.items);
            if page.raw_count < limit {
                out.complete = true;
                return Ok(out);
            }
            let next = page.next_marker.or(page.last_id);
            pager.advance(api, next, || {
                format!("a full page of {collection} without ids")
            })?;
        }
        if max_pages < MAX_PAGES {
            // The caller's budget, not a paging bug.
            return Ok(out);
        }
        Err(CloudError::Malformed(
            api,
            format!("more than {MAX_PAGES} pages of {collection}"),
        ))
    }

    /// Every item of a collection whose `key` is one of `ids`, `per_call` ids per listing (a
    /// multi-valued filter: repeated keys). A listing the cloud refuses (400: a malformed id) is split
    /// to isolate that id, as for listener listings.
    async fn list_by_ids<T>(
        &self,
        c: &Collection<T>,
        version: ElbVersion,
        ids: &[&str],
        key: &str,
        per_call: usize,
        lane: Lane,
    ) -> Result<Collected<T>, CloudError> {
        let list = |ids: &[&str]| {
            let filters: Vec<(String, String)> = ids
                .iter()
                .map(|id| (key.to_string(), id.to_string()))
                .collect();
            async move {
                let filters: Vec<(&str, &str)> = filters
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                self.list_collection(c, version, &filters, lane, MAX_PAGES)
                    .await
            }
        };
        let mut out = Collected::default();
        for chunk in ids.chunks(per_call.max(1)) {
            let part = isolating(chunk, false, &list, &Collected::absorb).await?;
            out.absorb(part);
        }
        out.complete = true;
        Ok(out)
    }

    /// The project id of `project_name`: by name (`iam:projects:list`), else, when that is refused,
    /// among the projects the user may access (`GET /v3/auth/projects`, no permission needed).
    async fn resolve_project(&self) -> Result<String, CloudError> {
        let by_name = self.list_projects(Operation::IamListProjects).await;
        let (api, ids) = match by_name {
            Ok(ids) => (Operation::IamListProjects, ids),
            Err(refused @ CloudError::Forbidden(..)) => {
                match self.list_projects(Operation::IamListAuthProjects).await {
                    Ok(ids) if !ids.is_empty() => (Operation::IamListAuthProjects, ids),
                    Ok(_) => {
                        return Err(self.no_project(&refused, "lists no project of that name"));
                    }
                    Err(CloudError::Forbidden(_, body) | CloudError::Unauthorized(_, body)) => {
                        return Err(self.no_project(&refused, &format!("was refused too ({body})")));
                    }
                    Err(e) => {
                        return Err(self.no_project(&refused, &format!("failed too ({e})")));
                    }
                }
            }
            Err(e) => return Err(e),
        };
        let id = self.one_project(ids)?;
        info!(
            project_name = %self.project_name,
            project_id = %id,
            via = api.as_str(),
            "project id resolved"
        );
        Ok(id)
    }

    /// Both lookups failed: the error says what to do.
    fn no_project(&self, refused: &CloudError, fallback: &str) -> CloudError {
        let answer = match refused {
            CloudError::Forbidden(_, body) => body.to_string(),
            other => other.to_string(),
        };
        CloudError::Project(format!(
            "IAM refused to list projects by name ({answer}: the IAM user lacks iam:projects:list) and GET /v3/auth/projects {fallback}. Fix: set auth.project_id to the id of project {:?}, or grant the IAM user iam:projects:list (e.g. the system policy IAM ReadOnlyAccess)",
            self.project_name
        ))
    }

    async fn list_projects(&self, api: Operation) -> Result<Vec<String>, CloudError> {
        let (path, query) = match api {
            Operation::IamListAuthProjects => ("/v3/auth/projects", Vec::new()),
            _ => (
                "/v3/projects",
                vec![("name".to_string(), self.project_name.clone())],
            ),
        };
        let call = Call {
            api,
            endpoint: &self.iam,
            method: reqwest::Method::GET,
            path: path.into(),
            query,
            body: Vec::new(),
            project: None,
            max_body: IAM_MAX_BODY,
            lane: Lane::Priority,
        };
        self.call(&call, |body| parse::projects(body, &self.project_name))
            .await
    }

    fn one_project(&self, ids: Vec<String>) -> Result<String, CloudError> {
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

/// What a collection listing found, and whether it went through every page.
struct Collected<T> {
    items: Vec<T>,
    complete: bool,
    calls: u32,
}

impl<T> Default for Collected<T> {
    fn default() -> Self {
        Collected {
            items: Vec::new(),
            complete: false,
            calls: 0,
        }
    }
}

impl<T> Collected<T> {
    fn absorb(&mut self, part: Collected<T>) {
        self.items.extend(part.items);
        self.calls += part.calls;
    }
}

/// An ELB collection other than listeners: its API, name, answer cap per item and item parser.
struct Collection<T> {
    api: Operation,
    name: &'static str,
    item_bytes: usize,
    parse: fn(&serde_json::Value) -> Option<T>,
}

impl<T> Clone for Collection<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Collection<T> {}

// A pool lists its members' and listeners' ids (a large pool has hundreds), a load balancer its
// listeners', pools' ids and tags, a forwarding policy its rules' ids.
const POOLS: Collection<Pool> = Collection {
    api: Operation::ElbListPools,
    name: "pools",
    item_bytes: 16 * 1024,
    parse: parse::pool,
};
const LOADBALANCERS: Collection<LoadBalancer> = Collection {
    api: Operation::ElbListLoadbalancers,
    name: "loadbalancers",
    item_bytes: 16 * 1024,
    parse: parse::loadbalancer,
};
const L7POLICIES: Collection<L7Policy> = Collection {
    api: Operation::ElbListL7policies,
    name: "l7policies",
    item_bytes: 4 * 1024,
    parse: parse::l7policy,
};

/// The paging state of one ELB listing: the marker for the next page and every marker seen.
#[derive(Default)]
struct Pager {
    marker: Option<String>,
    markers: HashSet<String>,
}

impl Pager {
    /// `filters`, then the page `limit` and the marker of the next page, if any.
    fn query(&self, mut filters: Vec<(String, String)>, limit: usize) -> Vec<(String, String)> {
        filters.push(("limit".to_string(), limit.to_string()));
        if let Some(m) = &self.marker {
            filters.push(("marker".to_string(), m.clone()));
        }
        filters
    }

    /// Moves to the page after a full one; `next` is its marker (`missing` names the fault when
    /// there is none).
    fn advance(
        &mut self,
        api: Operation,
        next: Option<String>,
        missing: impl FnOnce() -> String,
    ) -> Result<(), CloudError> {
        let next = next.ok_or_else(|| CloudError::Malformed(api, missing()))?;
        // A marker seen before (A→B→A) would page in a circle.
        if !self.markers.insert(next.clone()) {
            return Err(CloudError::Malformed(
                api,
                format!("paging marker {next:?} came back"),
            ));
        }
        self.marker = Some(next);
        Ok(())
    }
}

struct Call<'a> {
    api: Operation,
    endpoint: &'a Endpoint,
    method: reqwest::Method,
    path: String,
    query: Vec<(String, String)>,
    body: Vec<u8>,
    project: Option<&'a str>,
    /// The largest answer this request can legitimately get.
    max_body: usize,
    lane: Lane,
}

/// Lists `ids` with `list`; a 400 for several ids is split in halves until the id the cloud refuses is
/// alone, so one malformed id does not fail the others (it is left out: nothing listed for it). A
/// listing of one id that is refused stays an error unless it came out of a split.
async fn isolating<T, F, Fut>(
    ids: &[&str],
    split: bool,
    list: &F,
    merge: &impl Fn(&mut T, T),
) -> Result<T, CloudError>
where
    T: Default,
    F: Fn(&[&str]) -> Fut,
    Fut: std::future::Future<Output = Result<T, CloudError>>,
{
    match list(ids).await {
        Err(CloudError::BadRequest(_, body)) if ids.len() == 1 && split => {
            warn!(id = %ids[0], error = %body, "the ELB API refuses this id in a filter; nothing is listed for it");
            Ok(T::default())
        }
        Err(CloudError::BadRequest(..)) if ids.len() > 1 => {
            let (a, b) = ids.split_at(ids.len() / 2);
            let mut out = Box::pin(isolating(a, true, list, merge)).await?;
            let part = Box::pin(isolating(b, true, list, merge)).await?;
            merge(&mut out, part);
            Ok(out)
        }
        other => other,
    }
}

/// The largest valid CES answer to `q`: one entry per metric and at most `CES_MAX_POINTS` datapoints
/// in all (plus the extra point a period boundary can add per metric).
fn ces_max_body(q: &BatchQuery) -> usize {
    let n = q.metrics.len();
    BODY_SLACK + n * CES_ENTRY_BYTES + (CES_MAX_POINTS + 2 * n) * CES_POINT_BYTES
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
        // Cached per access key (the region is fixed); failures are not cached: the next call asks
        // IAM again.
        let cache = {
            let mut c = self.project_cache();
            let ak = self.auth.access_key();
            if c.access_key != ak {
                *c = Arc::new(ProjectCache::new(ak));
            }
            c.clone()
        };
        if let Some(id) = cache.id.get() {
            return Ok(id.clone());
        }
        let init = || async {
            if let Some(f) = cache.failure().as_ref()
                && Instant::now() < f.retry_at
            {
                return Err(f.error.clone());
            }
            let result = self.resolve_project().await;
            if let Err(e) = &result {
                let mut f = cache.failure();
                let delay = f.as_ref().map_or(self.retry.initial_backoff, |f| {
                    (f.delay * 2).min(self.retry.max_backoff)
                });
                warn!(
                    project_name = %self.project_name,
                    retry_in_ms = delay.as_millis() as u64,
                    error = %e,
                    "project id not resolved; ELB and CES calls wait for it"
                );
                *f = Some(ProjectFailure {
                    retry_at: Instant::now() + delay,
                    delay,
                    error: e.clone(),
                });
            }
            result
        };
        cache.id.get_or_try_init(init).await.cloned()
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
            let part = self.list_isolating(version, chunk, lane).await?;
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

    async fn list_pools(
        &self,
        version: ElbVersion,
        loadbalancer_id: &str,
        lane: Lane,
    ) -> Result<Vec<Pool>, CloudError> {
        // One id per listing: nothing to split when the cloud refuses it.
        let filters = [("loadbalancer_id", loadbalancer_id)];
        let listed = self
            .list_collection(&POOLS, version, &filters, lane, MAX_PAGES)
            .await?;
        Ok(listed.items)
    }

    async fn list_loadbalancers(
        &self,
        version: ElbVersion,
        ids: Option<&[&str]>,
        lane: Lane,
        max_pages: u32,
    ) -> Result<LbListing, CloudError> {
        let listed = match ids {
            None => {
                self.list_collection(&LOADBALANCERS, version, &[], lane, max_pages as usize)
                    .await?
            }
            // `id` is multi-valued on v3 (repeated keys), one id on v2, as for listener listings.
            Some(ids) => {
                self.list_by_ids(
                    &LOADBALANCERS,
                    version,
                    ids,
                    "id",
                    version.ids_per_listing(),
                    lane,
                )
                .await?
            }
        };
        Ok(LbListing {
            lbs: listed.items,
            complete: listed.complete,
            calls: listed.calls,
        })
    }

    async fn list_l7policies(
        &self,
        version: ElbVersion,
        listener_ids: &[&str],
        lane: Lane,
    ) -> Result<Vec<L7Policy>, CloudError> {
        let listed = self
            .list_by_ids(
                &L7POLICIES,
                version,
                listener_ids,
                "listener_id",
                POLICY_IDS_PER_CALL,
                lane,
            )
            .await?;
        Ok(listed.items)
    }

    async fn batch_query(&self, query: &BatchQuery) -> Result<BatchResult, CloudError> {
        let limit = self.ces_limit.load(Ordering::Relaxed);
        if limit > 0 && query.metrics.len() > limit {
            return self
                .batch_in_parts(query, limit, BatchResult::default())
                .await;
        }
        let refused = match self.batch_once(query).await {
            Err(e @ CloudError::BadRequest(..)) if query.metrics.len() > CES_SMALL_BATCH => e,
            other => return other,
        };
        // The reference gives no error code for an oversized batch: decide by experiment. If the
        // first CES_SMALL_BATCH metrics alone are accepted, the size was the problem.
        let head = BatchQuery {
            metrics: query.metrics[..CES_SMALL_BATCH].to_vec(),
            ..query.clone()
        };
        let Ok(first) = self.batch_once(&head).await else {
            return Err(refused);
        };
        if self.ces_limit.swap(CES_SMALL_BATCH, Ordering::Relaxed) == 0 {
            self.telemetry.ces_batch_size.set(CES_SMALL_BATCH as i64);
            warn!(
                refused = query.metrics.len(),
                accepted = CES_SMALL_BATCH,
                cloud_code = refused.cloud_code().unwrap_or(""),
                "CES refused a batch and accepted {CES_SMALL_BATCH} metrics: this cloud's limit is {CES_SMALL_BATCH} metrics per call, used for the rest of the process (more calls per cycle; see DEPLOY.md)"
            );
        }
        let rest = BatchQuery {
            metrics: query.metrics[CES_SMALL_BATCH..].to_vec(),
            ..query.clone()
        };
        self.batch_in_parts(&rest, CES_SMALL_BATCH, first).await
    }

    fn ces_batch_limit(&self) -> Option<usize> {
        Some(self.ces_limit.load(Ordering::Relaxed)).filter(|l| *l > 0)
    }
}
