//! Huawei Cloud access: IAM project lookup, ELB listener listing (v2 shared, v3 dedicated) and the CES
//! batch metric query, behind the [`CloudApi`] trait so the collector and its tests can use any
//! implementation. [`client::HttpCloud`] is the real one (AK/SK-signed HTTP with retries and rate limits).

pub mod auth;
pub mod client;
pub mod operation;
pub mod parse;
pub mod retry;

pub use operation::Operation;
use std::fmt;
use std::time::Duration;

/// Which ELB listener API to ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ElbVersion {
    /// `/v2/{project_id}/elb/listeners`: shared load balancers.
    V2,
    /// `/v3/{project_id}/elb/listeners`: dedicated load balancers.
    V3,
}

impl ElbVersion {
    /// The `version` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ElbVersion::V2 => "v2",
            ElbVersion::V3 => "v3",
        }
    }

    /// Listeners per page the client asks for: v3 allows up to 2000; v2 documents no maximum, so a
    /// moderate 500 keeps answers small.
    pub fn page_size(self) -> usize {
        match self {
            ElbVersion::V2 => 500,
            ElbVersion::V3 => 2000,
        }
    }

    /// Load balancer ids one filtered listing takes: v3 filters are multi-valued (50 ids keep the query
    /// string near 2 KB); v2 takes one.
    pub fn ids_per_listing(self) -> usize {
        match self {
            ElbVersion::V2 => 1,
            ElbVersion::V3 => 50,
        }
    }
}

/// An ELB listener, as far as the exporter needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// Listener id: the CES dimension `lbaas_listener_id` and the `listener_id` label.
    pub id: String,
    /// User-given name (CCE names them `k8s_<protocol>_<port>`), exported as a label.
    pub name: String,
    /// `TCP`, `UDP`, `HTTP`, `HTTPS`...: exported as a label.
    pub protocol: String,
    /// The frontend port, matched against the Service port.
    pub port: u16,
}

/// A backend server group (pool), as far as Ingress attribution needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// Pool id: the CES dimension `lbaas_pool_id`.
    pub id: String,
    /// User-given name, exported as a label.
    pub name: String,
    /// Backend protocol, exported as a label.
    pub protocol: String,
    /// `listeners[].id`: may be empty for a pool reached only through a forwarding policy.
    pub listeners: Vec<String>,
}

/// A load balancer of the v3 listing (`GET /v3/{project_id}/elb/loadbalancers`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadBalancer {
    /// ELB id, as in `kubernetes.io/elb.id`.
    pub id: String,
    /// CCE names auto-created ELBs `cce-lb-<ingress uid>`.
    pub name: String,
    /// Private address, as in `kubernetes.io/elb.ip`.
    pub vip_address: String,
    /// `true` dedicated, `false` shared (when the v3 API lists shared ones at all).
    pub guaranteed: Option<bool>,
}

/// The answer to a load balancer listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LbListing {
    /// The load balancers found.
    pub lbs: Vec<LoadBalancer>,
    /// False when a project-wide listing stopped at its page budget.
    pub complete: bool,
    /// Listing requests that returned a page.
    pub calls: u32,
}

/// A forwarding policy (`l7policies[]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L7Policy {
    /// Policy id.
    pub id: String,
    /// The listener it forwards from.
    pub listener_id: String,
    /// `REDIRECT_TO_POOL` policies route to a pool; others are ignored.
    pub action: String,
    /// The pool it forwards to.
    pub redirect_pool_id: Option<String>,
}

/// Which queue a call waits in at the rate limit: lookups and prompt CES collection of new or changed
/// Services go ahead of periodic re-listings and full collection cycles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    /// First: lookups and prompt collection that a new or changed Service waits for.
    Priority,
    /// After the priority lane: re-listings and full cycles.
    Background,
}

/// The answer to a listener listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// Listeners by the load balancer they name.
    pub by_lb: std::collections::HashMap<String, Vec<Listener>>,
    /// Listener items seen on all pages, usable or not (a project-wide listing counts the project).
    pub seen: usize,
    /// Listing requests that returned a page (retries not counted).
    pub calls: u32,
    /// False when a project-wide listing stopped at its page budget.
    pub complete: bool,
}

/// One metric of a batch query: namespace, metric name and dimensions (order as sent).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MetricQuery {
    /// `SYS.ELB`.
    pub namespace: String,
    /// The CES metric, e.g. `m1_cps` or `l7e_qps`.
    pub metric_name: String,
    /// `lbaas_instance_id` and the listener or pool dimension.
    pub dimensions: Vec<(String, String)>,
}

/// A CES batch query (`POST /V1.0/{project_id}/batch-query-metric-data`).
#[derive(Debug, Clone)]
pub struct BatchQuery {
    /// At most 500 (CES's limit), fewer once CES refused a large batch.
    pub metrics: Vec<MetricQuery>,
    /// Window start, Unix ms.
    pub from_ms: i64,
    /// Window end, Unix ms.
    pub to_ms: i64,
    /// `"1"` = raw (1-minute) data.
    pub period: &'static str,
    /// Aggregation asked for (`collection.filter`).
    pub filter: crate::config::Filter,
    /// Full cycles ask in the background lane, so the CES rate limit lets a new Service's prompt
    /// collection (priority) go first.
    pub lane: Lane,
}

/// A datapoint: Unix milliseconds and value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Datapoint {
    /// The minute the value covers, Unix ms.
    pub timestamp_ms: i64,
    /// The value in the metric's unit.
    pub value: f64,
}

/// The answer to a [`BatchQuery`], matched back to the request by (namespace, metric, dimension set).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchResult {
    /// The newest usable datapoint for each requested metric, in request order.
    pub newest: Vec<Option<Datapoint>>,
    /// Response parts that could not be used (unmatched, duplicated, non-finite or negative values...).
    pub skipped: Vec<(&'static str, usize)>,
}

/// Cloud API access. Implemented by [`client::HttpCloud`]; tests may substitute anything.
#[async_trait::async_trait]
pub trait CloudApi: Send + Sync + 'static {
    /// The project id (configured, or resolved once through IAM and cached).
    async fn project_id(&self) -> Result<String, CloudError>;
    /// Every listener of the given load balancers, following all pages (v3 takes up to 50 ids per
    /// listing, v2 one per listing). Ids with no listener are absent from `by_lb`.
    async fn list_listeners_of(
        &self,
        version: ElbVersion,
        loadbalancer_ids: &[&str],
        lane: Lane,
    ) -> Result<Listing, CloudError>;
    /// Every listener of the project on one API (no `loadbalancer_id` filter), grouped by the load
    /// balancer each names. Stops after `max_pages` pages with `complete: false`; waits `page_gap`
    /// between pages so a long background listing does not burst.
    async fn list_all_listeners(
        &self,
        version: ElbVersion,
        lane: Lane,
        max_pages: u32,
        page_gap: Duration,
    ) -> Result<Listing, CloudError>;
    /// Every listener of one load balancer.
    async fn list_listeners(
        &self,
        version: ElbVersion,
        loadbalancer_id: &str,
    ) -> Result<Vec<Listener>, CloudError> {
        let mut l = self
            .list_listeners_of(version, &[loadbalancer_id], Lane::Priority)
            .await?;
        Ok(l.by_lb.remove(loadbalancer_id).unwrap_or_default())
    }
    /// Every pool of a load balancer. The default (for fakes without pools) has none.
    async fn list_pools(
        &self,
        _version: ElbVersion,
        _loadbalancer_id: &str,
        _lane: Lane,
    ) -> Result<Vec<Pool>, CloudError> {
        Ok(Vec::new())
    }
    /// Load balancers on one API: those with the given ids (v3 takes up to 50 per listing, v2 one), or
    /// every one of the project when `ids` is `None`, then at most `max_pages` pages (`complete:
    /// false` when stopped there). The default (for fakes without them) has none.
    async fn list_loadbalancers(
        &self,
        _version: ElbVersion,
        _ids: Option<&[&str]>,
        _lane: Lane,
        _max_pages: u32,
    ) -> Result<LbListing, CloudError> {
        Ok(LbListing {
            complete: true,
            ..LbListing::default()
        })
    }
    /// Every forwarding policy of the listeners. The default (for fakes without pools) has none.
    async fn list_l7policies(
        &self,
        _version: ElbVersion,
        _listener_ids: &[&str],
        _lane: Lane,
    ) -> Result<Vec<L7Policy>, CloudError> {
        Ok(Vec::new())
    }
    /// One CES batch call (the caller keeps it within 500 metrics and the datapoint budget).
    async fn batch_query(&self, query: &BatchQuery) -> Result<BatchResult, CloudError>;
    /// The metrics per batch CES was found to accept, once a larger batch was refused (see
    /// [`CES_SMALL_BATCH`]); `None` while nothing was learned.
    fn ces_batch_limit(&self) -> Option<usize> {
        None
    }
}

/// The batch size Open Telekom Cloud and some Huawei regions document for the CES batch query.
pub const CES_SMALL_BATCH: usize = 10;

/// What a 403 of `api` means the user lacks, and the fix.
pub fn permission_hint(api: Operation) -> &'static str {
    match api {
        Operation::IamListProjects => {
            "the IAM user lacks iam:projects:list: set auth.project_id, or grant iam:projects:list (e.g. the system policy IAM ReadOnlyAccess)"
        }
        Operation::IamListAuthProjects => {
            "IAM refused to list the projects of this user: set auth.project_id"
        }
        Operation::ElbListListeners => {
            "the IAM user lacks elb:listeners:list (e.g. the system policy ELB ReadOnlyAccess) in this region's project"
        }
        Operation::ElbListPools => {
            "the IAM user lacks elb:pools:list (e.g. the system policy ELB ReadOnlyAccess) in this region's project"
        }
        Operation::ElbListL7policies => {
            "the IAM user lacks elb:l7policies:list (e.g. the system policy ELB ReadOnlyAccess) in this region's project"
        }
        Operation::ElbListLoadbalancers => {
            "the IAM user lacks elb:loadbalancers:list (e.g. the system policy ELB ReadOnlyAccess) in this region's project"
        }
        Operation::CesBatchQuery => {
            "the IAM user lacks ces:metricData:list (e.g. the system policy CES ReadOnlyAccess), granted in this region's project (a global grant does not take effect for Cloud Eye)"
        }
    }
}

/// What a failed cloud call said: HTTP status, the cloud's error code and message, the request id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorBody {
    /// HTTP status.
    pub status: u16,
    /// The service's error code (`APIGW.0301`, `ces.0017`...).
    pub code: Option<String>,
    /// The service's message.
    pub message: String,
    /// `X-Request-Id`, which support asks for.
    pub request_id: Option<String>,
}

impl fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HTTP {}", self.status)?;
        if let Some(c) = &self.code {
            write!(f, " {c}")?;
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        if let Some(r) = &self.request_id {
            write!(f, " (request id {r})")?;
        }
        Ok(())
    }
}

/// A failed cloud call, classified so retries and metrics can act on the kind.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CloudError {
    /// 401: the signature or key was rejected; calls pause (see [`auth`]).
    #[error(
        "{0}: authentication failed (check AK/SK, clock skew; 5 failures lock the AK for 5 minutes): {1}"
    )]
    Unauthorized(Operation, ErrorBody),
    /// 403: the IAM user lacks a permission; not retried.
    #[error("{0}: permission denied ({hint}): {1}", hint = permission_hint(*.0))]
    Forbidden(Operation, ErrorBody),
    /// 404: wrong project or resource.
    #[error("{0}: not found (project or resource): {1}")]
    NotFound(Operation, ErrorBody),
    /// 429 or a throttling code; retried after the given delay or a backoff.
    #[error("{0}: throttled: {1}")]
    Throttled(Operation, ErrorBody, Option<Duration>),
    /// 400: the request itself was refused; not retried.
    #[error("{0}: request rejected: {1}")]
    BadRequest(Operation, ErrorBody),
    /// 5xx; retried after the given delay or a backoff.
    #[error("{0}: server error: {1}")]
    Server(Operation, ErrorBody, Option<Duration>),
    /// Any other status.
    #[error("{0}: unexpected answer: {1}")]
    Http(Operation, ErrorBody),
    /// No answer within the request timeout; retried.
    #[error("{0}: timed out after {1:?}")]
    Timeout(Operation, Duration),
    /// No connection (DNS, TCP, TLS); retried.
    #[error("{0}: connection failed: {1}")]
    Connect(Operation, String),
    /// An answer that does not parse or breaks its size bound; retried.
    #[error("{0}: malformed response: {1}")]
    Malformed(Operation, String),
    /// The project id for the region could not be determined.
    #[error("project lookup: {0}")]
    Project(String),
    /// Not sent: the credential was rejected and calls pause, so the AK is not locked.
    #[error(
        "{0}: not sent: the credentials were rejected (401); cloud calls pause until a probe succeeds (next probe in {1:?} at the earliest) so the AK is not locked"
    )]
    AuthBackoff(Operation, Duration),
}

impl CloudError {
    /// Transient failures worth another attempt.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            CloudError::Throttled(..)
                | CloudError::Server(..)
                | CloudError::Timeout(..)
                | CloudError::Connect(..)
                | CloudError::Malformed(..)
        )
    }

    /// `Retry-After` the server asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            CloudError::Throttled(_, _, d) | CloudError::Server(_, _, d) => *d,
            _ => None,
        }
    }

    /// The `code` label for the failure counter: a fixed set, never text from the response.
    pub fn metric_code(&self) -> &'static str {
        match self {
            CloudError::Unauthorized(..) => "401",
            CloudError::Forbidden(..) => "403",
            CloudError::NotFound(..) => "404",
            CloudError::Throttled(..) => "429",
            CloudError::BadRequest(..) => "400",
            CloudError::Server(_, b, _) => match b.status {
                500 => "500",
                502 => "502",
                503 => "503",
                504 => "504",
                _ => "5xx",
            },
            CloudError::Http(_, b) if (400..500).contains(&b.status) => "4xx",
            CloudError::Http(..) => "other",
            CloudError::Timeout(..) => "timeout",
            CloudError::Connect(..) => "connect",
            CloudError::Malformed(..) => "malformed",
            CloudError::Project(..) => "project",
            CloudError::AuthBackoff(..) => "auth_backoff",
        }
    }

    /// The cloud's error code (`ces.0429`, `APIGW.0301`...), for logs.
    pub fn cloud_code(&self) -> Option<&str> {
        match self {
            CloudError::Unauthorized(_, b)
            | CloudError::Forbidden(_, b)
            | CloudError::NotFound(_, b)
            | CloudError::Throttled(_, b, _)
            | CloudError::BadRequest(_, b)
            | CloudError::Server(_, b, _)
            | CloudError::Http(_, b) => b.code.as_deref(),
            _ => None,
        }
    }

    /// Classifies an HTTP error answer.
    pub fn from_status(api: Operation, body: ErrorBody, retry_after: Option<Duration>) -> Self {
        let throttling_code = body.code.as_deref().is_some_and(|c| {
            c.eq_ignore_ascii_case("ces.0429")
                || c.eq_ignore_ascii_case("APIG.0308")
                || c.eq_ignore_ascii_case("APIGW.0308")
        });
        match body.status {
            429 => CloudError::Throttled(api, body, retry_after),
            _ if throttling_code => CloudError::Throttled(api, body, retry_after),
            401 => CloudError::Unauthorized(api, body),
            403 => CloudError::Forbidden(api, body),
            404 => CloudError::NotFound(api, body),
            400 | 405..=428 | 430..=499 => match body.status {
                400 | 409 | 413 | 422 => CloudError::BadRequest(api, body),
                _ => CloudError::Http(api, body),
            },
            // A 503 may say when to come back, as a 429 does.
            500..=599 => CloudError::Server(api, body, retry_after),
            _ => CloudError::Http(api, body),
        }
    }
}
