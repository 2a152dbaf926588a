//! A simulated Huawei Cloud: IAM project lookup, ELB v2/v3 listener listing and the CES batch metric query,
//! served by one axum app on one address (dispatch by path, as if every service endpoint pointed here).
//!
//! The simulator follows `shared/reference/HUAWEI_CLOUD_API.md`, not our client: it verifies every AK/SK
//! signature from the request as received, enforces the documented limits and error shapes, pages exactly as
//! the ELB APIs do, applies the CES result budget silently, returns CES results out of request order, and
//! serves deterministic, realistic data that tests can recompute with [`datapoint_value`].

pub use crate::sim::publication::Publication;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use serde_json::{Map, Value, json};

use crate::signer::{self, Algorithm, SignRequest};

mod pools;
pub use pools::{SimL7Policy, SimPool, cce_pool_name};

/// Bounded so a long benchmark or demo run cannot grow memory without limit.
const MAX_LOG: usize = 100_000;
/// Read limit for any request body; the CES 512 KB rule is checked separately so it can answer `ces.0014`.
const MAX_READ_BODY: usize = 4 * 1024 * 1024;
const CES_MAX_BODY: usize = 512 * 1024;
const CES_MAX_POINTS: i64 = 3000;
const CES_MAX_METRICS: usize = 500;
const MINUTE_MS: i64 = 60_000;
const V3_MAX_LIMIT: i64 = 2000;
const CES_PERIODS: [&str; 6] = ["1", "300", "1200", "3600", "14400", "86400"];
const CES_FILTERS: [&str; 5] = ["average", "max", "min", "sum", "variance"];

/// How the simulated cloud behaves. `Default` gives the reference's limits and a fixed account.
#[derive(Clone)]
pub struct SimConfig {
    pub ak: String,
    pub sk: String,
    /// When set, requests must carry a signed `X-Security-Token` equal to it (temporary credentials).
    pub security_token: Option<String>,
    pub region: String,
    /// 32 hex characters; the project named after `region` has this id.
    pub project_id: String,
    /// When each minute's datapoint becomes visible (default: one minute after it starts, every minute).
    pub publication: Publication,
    /// Added to every CES answer (benchmarks model network and service time with it).
    pub ces_latency: Duration,
    /// Sliding-minute CES call limit; beyond it 429 `ces.0429`. 0 disables the limit.
    pub ces_calls_per_minute: u32,
    pub max_clock_skew: Duration,
    /// Consecutive authentication failures of the configured AK that lock it; 0 disables locking.
    pub lock_after_failures: u32,
    pub lock_duration: Duration,
    /// Whether the v3 listener API also lists listeners of shared (v2) load balancers.
    pub v3_lists_shared: bool,
    /// Which public cloud this is: its service hosts (checked when a request names one) and limits.
    pub profile: SimProfile,
    /// Metrics per CES batch call; over it the call answers 400 `ces.0014` (10 on Open Telekom Cloud).
    pub ces_max_metrics: usize,
    /// The caller's permissions (IAM policies), changeable at run time with [`CloudSim::grant`].
    pub user: SimUser,
    /// Whether a v3 listing with a `loadbalancer_id` that is not a UUID answers 400 for the whole
    /// request (the real API may; off by default so tests can use short ids).
    pub v3_rejects_malformed_ids: bool,
    /// Whether `GET /v3/auth/projects` answers AK/SK callers (documented for tokens only); when not,
    /// it answers IAM's 403.
    pub auth_projects_with_aksk: bool,
}

/// The public clouds the simulator can stand in for (`demo --profile <name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimProfile {
    /// Huawei Cloud China/international: `<svc>.cn-east-3.myhuaweicloud.com`.
    HuaweiCn,
    /// Huawei Cloud Europe: `<svc>.eu-west-101.myhuaweicloud.eu`.
    HuaweiEu,
    /// Open Telekom Cloud: `<svc>.eu-de.otc.t-systems.com`, 10 metrics per CES batch call.
    Otc,
}

impl SimProfile {
    pub const ALL: [SimProfile; 3] = [SimProfile::HuaweiCn, SimProfile::HuaweiEu, SimProfile::Otc];

    pub fn as_str(self) -> &'static str {
        match self {
            SimProfile::HuaweiCn => "huawei-cn",
            SimProfile::HuaweiEu => "huawei-eu",
            SimProfile::Otc => "otc",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == name)
    }

    pub fn region(self) -> &'static str {
        match self {
            SimProfile::HuaweiCn => "cn-east-3",
            SimProfile::HuaweiEu => "eu-west-101",
            SimProfile::Otc => "eu-de",
        }
    }

    /// The DNS domain of the cloud's service hosts (HUAWEI_CLOUD_API.md section 1).
    pub fn domain(self) -> &'static str {
        match self {
            SimProfile::HuaweiCn => "myhuaweicloud.com",
            SimProfile::HuaweiEu => "myhuaweicloud.eu",
            SimProfile::Otc => "otc.t-systems.com",
        }
    }

    /// The regional IAM host, as an operator writes it in `auth.auth_url`.
    pub fn iam_host(self) -> String {
        format!("iam.{}.{}", self.region(), self.domain())
    }

    /// Whether `host` (without port) may carry calls of `service` (`iam`, `elb`, `ces`). IP addresses
    /// and `localhost` stand for any service (tests and the demo point every endpoint at the simulator).
    fn serves(self, host: &str, service: &str) -> bool {
        if host.is_empty() || host == "localhost" || host.parse::<std::net::IpAddr>().is_ok() {
            return true;
        }
        let regional = format!("{service}.{}.{}", self.region(), self.domain());
        // Huawei's global IAM host; Open Telekom Cloud documents regional IAM hosts only.
        let global = service == "iam" && self != SimProfile::Otc;
        host.eq_ignore_ascii_case(&regional)
            || (global && host.eq_ignore_ascii_case(&format!("iam.{}", self.domain())))
    }

    /// Whether the cloud's gateway has this route: Open Telekom Cloud documents shared-LB listeners only
    /// at `/v2.0/lbaas/listeners`, Huawei Cloud only at `/v2/{project_id}/elb/listeners`.
    fn publishes(self, ep: &Endpoint) -> bool {
        match ep {
            Endpoint::ListenersV2(_) => self != SimProfile::Otc,
            Endpoint::ListenersLbaas => self == SimProfile::Otc,
            _ => true,
        }
    }

    /// This cloud with an IAM user holding only "ELB ReadOnlyAccess" and "CES ReadOnlyAccess".
    pub fn least_privilege(self) -> SimConfig {
        SimConfig {
            user: SimUser::LeastPrivilege,
            ..self.config()
        }
    }

    /// This cloud with an account holding every permission.
    pub fn config(self) -> SimConfig {
        SimConfig {
            region: self.region().to_string(),
            profile: self,
            ces_max_metrics: match self {
                SimProfile::Otc => 10,
                _ => CES_MAX_METRICS,
            },
            ..SimConfig::default()
        }
    }
}

/// Who calls: the permissions their IAM policies grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimUser {
    /// The account itself, or an administrator: every action.
    Admin,
    /// An IAM user with the system policies "ELB ReadOnlyAccess" and "CES ReadOnlyAccess" only:
    /// no `iam:projects:list`.
    LeastPrivilege,
}

impl SimUser {
    /// Action patterns of the user's policies (`service:resource:verb`, `*` matches one part).
    fn policy(self) -> Vec<String> {
        let p: &[&str] = match self {
            SimUser::Admin => &["*:*:*"],
            SimUser::LeastPrivilege => &["elb:*:get", "elb:*:list", "ces:*:get", "ces:*:list"],
        };
        p.iter().map(|s| s.to_string()).collect()
    }
}

fn policy_allows(policy: &[String], action: &str) -> bool {
    policy.iter().any(|pattern| {
        let mut want = action.split(':');
        let mut have = pattern.split(':');
        loop {
            match (want.next(), have.next()) {
                (None, None) => return true,
                (Some(a), Some(p)) if p == "*" || p.eq_ignore_ascii_case(a) => {}
                _ => return false,
            }
        }
    })
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            ak: "SIMAK00000000000000001".to_string(),
            sk: "SimSecretKey0000000000000000000000000001".to_string(),
            security_token: None,
            region: "cn-east-3".to_string(),
            project_id: "0e5b7a1c2d3f4a5b8c9d0e1f2a3b4c5d".to_string(),
            publication: Publication::default(),
            ces_latency: Duration::ZERO,
            ces_calls_per_minute: 500,
            max_clock_skew: Duration::from_secs(15 * 60),
            lock_after_failures: 5,
            lock_duration: Duration::from_secs(5 * 60),
            v3_lists_shared: false,
            profile: SimProfile::HuaweiCn,
            ces_max_metrics: CES_MAX_METRICS,
            user: SimUser::Admin,
            auth_projects_with_aksk: true,
            v3_rejects_malformed_ids: false,
        }
    }
}

// The SK and token are fake here, but configs get printed in test failures: keep the habit of redacting.
impl std::fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimConfig")
            .field("ak", &self.ak)
            .field("region", &self.region)
            .field("project_id", &self.project_id)
            .field("publication", &self.publication)
            .field("ces_latency", &self.ces_latency)
            .field("ces_calls_per_minute", &self.ces_calls_per_minute)
            .field("v3_lists_shared", &self.v3_lists_shared)
            .field("profile", &self.profile)
            .field("ces_max_metrics", &self.ces_max_metrics)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// Shared load balancers are listed by ELB v2, dedicated ones by ELB v3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LbKind {
    Shared,
    Dedicated,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimListener {
    pub id: String,
    pub name: String,
    /// As the ELB API reports it: `TCP`, `UDP`, `HTTP`, `HTTPS`, `TERMINATED_HTTPS`, `QUIC`, …
    pub protocol: String,
    pub port: u16,
}

impl SimListener {
    pub fn new(
        id: impl Into<String>,
        name: impl Into<String>,
        protocol: impl Into<String>,
        port: u16,
    ) -> Self {
        SimListener {
            id: id.into(),
            name: name.into(),
            protocol: protocol.into(),
            port,
        }
    }
}

/// The simulated APIs; faults are queued per API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SimApi {
    Iam,
    ElbV2,
    /// Both v3 listeners and v3 load balancers.
    ElbV3,
    Ces,
}

/// A fault for the next well-signed calls of one API; `count` calls consume it (0 = ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and this body, verbatim.
    Status {
        status: u16,
        body: String,
        count: u32,
    },
    /// Sleep, then answer normally.
    Delay { delay: Duration, count: u32 },
    /// 200 with the normal body cut in half (invalid JSON).
    Malformed { count: u32 },
    /// 429 with `ces.0429` (CES) or `APIGW.0308` (others), and `Retry-After` when given.
    Throttle {
        retry_after_secs: Option<u64>,
        count: u32,
    },
    /// 503 (a service briefly unavailable: `ces.0007` on CES, the gateway's shape elsewhere), with
    /// `Retry-After` when given.
    Unavailable {
        retry_after_secs: Option<u64>,
        count: u32,
    },
}

impl Fault {
    fn count_mut(&mut self) -> &mut u32 {
        match self {
            Fault::Status { count, .. }
            | Fault::Delay { count, .. }
            | Fault::Malformed { count }
            | Fault::Throttle { count, .. }
            | Fault::Unavailable { count, .. } => count,
        }
    }
}

/// One request as the simulator saw it (requests to unknown paths are not recorded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimRequest {
    pub api: SimApi,
    /// The `Host` header, without port.
    pub host: String,
    pub method: String,
    pub path: String,
    /// The raw query string as received (no leading `?`).
    pub query: String,
    pub status: u16,
    /// Number of entries in a CES body's `metrics` (0 for other APIs or unparsable bodies).
    pub ces_metrics: usize,
    /// CES `from`/`to` as requested.
    pub from: Option<i64>,
    pub to: Option<i64>,
    /// The `from` CES silently used instead, when the result budget moved it (before period rounding).
    pub budget_from: Option<i64>,
    pub error_code: Option<String>,
    pub request_id: String,
    /// Unix milliseconds when the request arrived.
    pub time_ms: i64,
}

#[derive(Clone)]
pub struct CloudSim {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: SimConfig,
    domain_id: String,
    boot_nanos: u128,
    seq: AtomicU64,
    state: Mutex<SimState>,
    url: Mutex<Option<String>>,
}

struct Project {
    name: String,
    id: String,
}

struct LbRecord {
    kind: LbKind,
    seq: u64,
    /// Set by [`CloudSim::set_loadbalancer_name`] (CCE names auto-created Ingress ELBs `cce-lb-<uid>`).
    name: Option<String>,
}

struct ListenerRecord {
    lb_id: String,
    listener: SimListener,
    seq: u64,
}

#[derive(Default)]
struct AuthState {
    failures: u32,
    locked_until: Option<Instant>,
}

#[derive(Default)]
struct SimState {
    projects: Vec<Project>,
    lbs: BTreeMap<String, LbRecord>,
    listeners: BTreeMap<String, ListenerRecord>,
    next_seq: u64,
    faults: HashMap<SimApi, VecDeque<Fault>>,
    log: VecDeque<SimRequest>,
    auth: AuthState,
    ces_calls: VecDeque<Instant>,
    /// Pools and forwarding policies (see [`pools`]).
    pools: pools::PoolState,
    /// The caller's action patterns (from `SimConfig::user`, plus grants).
    policy: Vec<String>,
}

impl CloudSim {
    pub fn new(cfg: SimConfig) -> Self {
        let domain_id = signer::sha256_hex(format!("sim-domain/{}", cfg.ak).as_bytes())
            .get(..32)
            .unwrap_or_default()
            .to_string();
        let mut projects = Vec::new();
        // Real accounts list a project per enabled region plus `MOS`; the extra names make a client that
        // ignores the name filter, or takes the first project blindly, pick the wrong id.
        for name in ["MOS", "ap-southeast-1", "cn-north-4"] {
            if name != cfg.region {
                projects.push(Project {
                    name: name.to_string(),
                    id: derived_hex(&format!("project/{}/{name}", cfg.ak)),
                });
            }
        }
        projects.push(Project {
            name: cfg.region.clone(),
            id: cfg.project_id.clone(),
        });
        let policy = cfg.user.policy();
        let boot_nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        CloudSim {
            inner: Arc::new(Inner {
                cfg,
                domain_id,
                boot_nanos,
                seq: AtomicU64::new(0),
                state: Mutex::new(SimState {
                    projects,
                    policy,
                    ..SimState::default()
                }),
                url: Mutex::new(None),
            }),
        }
    }

    pub fn config(&self) -> &SimConfig {
        &self.inner.cfg
    }

    pub fn router(&self) -> Router {
        Router::new()
            .fallback(dispatch)
            .with_state(self.inner.clone())
    }

    /// Binds `addr` (tests: `127.0.0.1:0`), serves in a background task, and returns the bound address.
    pub async fn serve(&self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let router = self.router();
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::warn!(error = %e, "simulated cloud server stopped");
            }
        });
        *lock(&self.inner.url) = Some(format!("http://{local}"));
        Ok(local)
    }

    pub fn url(&self) -> Option<String> {
        lock(&self.inner.url).clone()
    }

    /// Adds an IAM project (a second project with an existing name makes the name ambiguous).
    pub fn add_project(&self, name: &str, id: &str) {
        let mut st = self.inner.state();
        if !st.projects.iter().any(|p| p.name == name && p.id == id) {
            st.projects.push(Project {
                name: name.to_string(),
                id: id.to_string(),
            });
        }
    }

    /// Adds (or re-kinds) a load balancer in the configured project.
    pub fn add_loadbalancer(&self, id: &str, kind: LbKind) {
        let mut st = self.inner.state();
        let seq = st.bump();
        st.lbs
            .entry(id.to_string())
            .and_modify(|lb| lb.kind = kind)
            .or_insert(LbRecord {
                kind,
                seq,
                name: None,
            });
    }

    /// Names a load balancer (the default is `sim-elb-<id prefix>`).
    pub fn set_loadbalancer_name(&self, id: &str, name: &str) {
        if let Some(lb) = self.inner.state().lbs.get_mut(id) {
            lb.name = Some(name.to_string());
        }
    }

    /// Removes a load balancer and its listeners.
    pub fn remove_loadbalancer(&self, id: &str) {
        let mut st = self.inner.state();
        st.lbs.remove(id);
        st.listeners.retain(|_, l| l.lb_id != id);
        st.pools.remove_lb(id);
    }

    /// Adds or replaces a listener; listeners of load balancers that do not exist are stored but not listed.
    pub fn add_listener(&self, lb_id: &str, l: SimListener) {
        let mut st = self.inner.state();
        let seq = match st.listeners.get(&l.id) {
            Some(existing) => existing.seq,
            None => st.bump(),
        };
        st.listeners.insert(
            l.id.clone(),
            ListenerRecord {
                lb_id: lb_id.to_string(),
                listener: l,
                seq,
            },
        );
    }

    pub fn remove_listener(&self, listener_id: &str) {
        self.inner.state().listeners.remove(listener_id);
    }

    /// Grants the caller an action (`iam:projects:list`), as an administrator attaching a policy does;
    /// it applies to the next request.
    pub fn grant(&self, action: &str) {
        self.inner.state().policy.push(action.to_string());
    }

    /// Queues a fault for the next well-signed calls of `api`.
    pub fn inject(&self, api: SimApi, fault: Fault) {
        self.inner
            .state()
            .faults
            .entry(api)
            .or_default()
            .push_back(fault);
    }

    pub fn requests(&self) -> Vec<SimRequest> {
        self.inner.state().log.iter().cloned().collect()
    }

    pub fn clear_requests(&self) {
        self.inner.state().log.clear();
    }

    /// The ms timestamp of the newest minute that has data at `now_ms`.
    pub fn newest_minute(&self, now_ms: i64) -> i64 {
        self.inner.newest_minute(now_ms)
    }
}

impl SimState {
    fn bump(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    fn project_exists(&self, id: &str) -> bool {
        self.projects.iter().any(|p| p.id == id)
    }
}

/// A poisoned lock only means a test panicked elsewhere; the state itself stays usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------------------
// Dispatch

enum Endpoint {
    Projects,
    AuthProjects,
    /// `/v2.0/lbaas/listeners`: shared-LB listeners, OpenStack style (the project from `X-Project-Id`).
    ListenersLbaas,
    ListenersV2(String),
    ListenersV3(String),
    LoadBalancersV3(String),
    BatchQuery(String),
    /// Pools and l7policies: `(v3, project id)`.
    Pools(bool, String),
    L7Policies(bool, String),
}

impl Endpoint {
    /// The service host label the call belongs to.
    fn service(&self) -> &'static str {
        match self.api() {
            SimApi::Iam => "iam",
            SimApi::ElbV2 | SimApi::ElbV3 => "elb",
            SimApi::Ces => "ces",
        }
    }

    /// The IAM action the call needs (`None`: no permission needed).
    fn action(&self) -> Option<&'static str> {
        match self {
            Endpoint::Projects => Some("iam:projects:list"),
            Endpoint::AuthProjects => None,
            Endpoint::ListenersV2(_) | Endpoint::ListenersV3(_) | Endpoint::ListenersLbaas => {
                Some("elb:listeners:list")
            }
            Endpoint::LoadBalancersV3(_) => Some("elb:loadbalancers:list"),
            Endpoint::Pools(..) => Some("elb:pools:list"),
            Endpoint::L7Policies(..) => Some("elb:l7policies:list"),
            Endpoint::BatchQuery(_) => Some("ces:metricData:list"),
        }
    }

    fn api(&self) -> SimApi {
        match self {
            Endpoint::Projects | Endpoint::AuthProjects => SimApi::Iam,
            Endpoint::ListenersV2(_) | Endpoint::ListenersLbaas => SimApi::ElbV2,
            Endpoint::ListenersV3(_) | Endpoint::LoadBalancersV3(_) => SimApi::ElbV3,
            Endpoint::BatchQuery(_) => SimApi::Ces,
            Endpoint::Pools(v3, _) | Endpoint::L7Policies(v3, _) => {
                if *v3 {
                    SimApi::ElbV3
                } else {
                    SimApi::ElbV2
                }
            }
        }
    }
}

/// The gateway matches method and path before authenticating; the wire path may end in `/` (it signs the same).
fn route(method: &Method, path: &str) -> Option<Endpoint> {
    let trimmed = match path.strip_suffix('/') {
        Some(p) if !p.is_empty() => p,
        _ => path,
    };
    let segs: Vec<&str> = trimmed.split('/').collect();
    let ep = match segs.as_slice() {
        ["", "v3", "projects"] if method == Method::GET => Endpoint::Projects,
        ["", "v3", "auth", "projects"] if method == Method::GET => Endpoint::AuthProjects,
        ["", "v2.0", "lbaas", "listeners"] if method == Method::GET => Endpoint::ListenersLbaas,
        ["", "v2", pid, "elb", "listeners"] if method == Method::GET => {
            Endpoint::ListenersV2(pid.to_string())
        }
        ["", "v3", pid, "elb", "listeners"] if method == Method::GET => {
            Endpoint::ListenersV3(pid.to_string())
        }
        ["", "v3", pid, "elb", "loadbalancers"] if method == Method::GET => {
            Endpoint::LoadBalancersV3(pid.to_string())
        }
        ["", "V1.0", pid, "batch-query-metric-data"] if method == Method::POST => {
            Endpoint::BatchQuery(pid.to_string())
        }
        ["", v @ ("v2" | "v3"), pid, "elb", "pools"] if method == Method::GET => {
            Endpoint::Pools(*v == "v3", pid.to_string())
        }
        ["", v @ ("v2" | "v3"), pid, "elb", "l7policies"] if method == Method::GET => {
            Endpoint::L7Policies(*v == "v3", pid.to_string())
        }
        _ => return None,
    };
    match &ep {
        Endpoint::ListenersV2(p)
        | Endpoint::ListenersV3(p)
        | Endpoint::LoadBalancersV3(p)
        | Endpoint::BatchQuery(p)
        | Endpoint::Pools(_, p)
        | Endpoint::L7Policies(_, p)
            if p.is_empty() =>
        {
            None
        }
        _ => Some(ep),
    }
}

struct Reply {
    status: StatusCode,
    body: Bytes,
    error_code: Option<String>,
    retry_after: Option<u64>,
}

impl Reply {
    fn ok(v: &Value) -> Self {
        Reply {
            status: StatusCode::OK,
            body: Bytes::from(v.to_string()),
            error_code: None,
            retry_after: None,
        }
    }

    fn error(status: StatusCode, code: &str, v: &Value) -> Self {
        Reply {
            status,
            body: Bytes::from(v.to_string()),
            error_code: Some(code.to_string()),
            retry_after: None,
        }
    }

    fn into_response(self, request_id: &str) -> Response {
        let mut resp = Response::new(Body::from(self.body));
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json;charset=UTF-8"),
        );
        if let Ok(v) = HeaderValue::from_str(request_id) {
            h.insert("x-request-id", v);
        }
        if let Some(secs) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

fn apigw_error(status: StatusCode, code: &str, msg: &str, rid: &str) -> Reply {
    Reply::error(
        status,
        code,
        &json!({"error_msg": msg, "error_code": code, "request_id": rid}),
    )
}

fn auth_error(detail: &str, rid: &str) -> Reply {
    apigw_error(
        StatusCode::UNAUTHORIZED,
        "APIGW.0301",
        &format!("Incorrect IAM authentication information: {detail}"),
        rid,
    )
}

fn ces_error(status: StatusCode, code: &str, msg: &str) -> Reply {
    Reply::error(status, code, &json!({"error_code": code, "error_msg": msg}))
}

fn ces_body_error(detail: &str) -> Reply {
    ces_error(
        StatusCode::BAD_REQUEST,
        "ces.0014",
        &format!("Some content in message body is not correct, error message: {detail}"),
    )
}

fn elb_error(status: StatusCode, code: &str, msg: &str, rid: &str) -> Reply {
    Reply::error(
        status,
        code,
        &json!({"error_msg": msg, "error_code": code, "request_id": rid}),
    )
}

fn elb_bad_input(msg: &str, rid: &str) -> Reply {
    elb_error(
        StatusCode::BAD_REQUEST,
        "ELB.8902",
        &format!("Invalid input for {msg}"),
        rid,
    )
}

fn keystone_error(status: StatusCode, msg: &str) -> Reply {
    Reply::error(
        status,
        &status.as_u16().to_string(),
        &json!({"error": {"code": status.as_u16(), "message": msg,
                          "title": status.canonical_reason().unwrap_or("Error")}}),
    )
}

async fn dispatch(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let rid = inner.request_id();
    let arrived = now_ms();
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let routed = route(&parts.method, &path);
    let Some(ep) = routed.filter(|ep| inner.cfg.profile.publishes(ep)) else {
        return apigw_error(
            StatusCode::NOT_FOUND,
            "APIGW.0101",
            "The API does not exist or has not been published in the environment",
            &rid,
        )
        .into_response(&rid);
    };
    let host = header_str(&parts.headers, "host").unwrap_or_default();
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h).to_string();
    let mut rec = SimRequest {
        api: ep.api(),
        host: host.clone(),
        method: parts.method.as_str().to_string(),
        path,
        query: parts.uri.query().unwrap_or_default().to_string(),
        status: 0,
        ces_metrics: 0,
        from: None,
        to: None,
        budget_from: None,
        error_code: None,
        request_id: rid.clone(),
        time_ms: arrived,
    };
    let reply = if inner.cfg.profile.serves(&host, ep.service()) {
        inner
            .process(&ep, &parts.method, &parts.headers, body, &rid, &mut rec)
            .await
    } else {
        // Stands in for the name a wrong host derivation produces: it does not exist in this cloud.
        apigw_error(
            StatusCode::NOT_FOUND,
            "APIGW.0101",
            &format!(
                "The API does not exist or has not been published in the environment (host {host} is not the {} host of {})",
                ep.service(),
                inner.cfg.profile.as_str()
            ),
            &rid,
        )
    };
    rec.status = reply.status.as_u16();
    rec.error_code = reply.error_code.clone();
    inner.record(rec);
    reply.into_response(&rid)
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, SimState> {
        lock(&self.state)
    }

    fn request_id(&self) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        derived_hex(&format!("rid/{}/{n}", self.boot_nanos))
    }

    fn record(&self, rec: SimRequest) {
        let mut st = self.state();
        if st.log.len() >= MAX_LOG {
            st.log.pop_front();
        }
        st.log.push_back(rec);
    }

    fn newest_minute(&self, now_ms: i64) -> i64 {
        self.cfg.publication.newest(now_ms)
    }

    async fn process(
        &self,
        ep: &Endpoint,
        method: &Method,
        headers: &HeaderMap,
        body: Body,
        rid: &str,
        rec: &mut SimRequest,
    ) -> Reply {
        let Ok(body) = axum::body::to_bytes(body, MAX_READ_BODY).await else {
            return apigw_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "APIGW.0201",
                "Request entity too large",
                rid,
            );
        };
        if let Endpoint::BatchQuery(_) = ep {
            note_ces_body(&body, rec);
            if !self.cfg.ces_latency.is_zero() {
                tokio::time::sleep(self.cfg.ces_latency).await;
            }
        }
        if let Err(detail) = self.authenticate(method, &rec.path, &rec.query, headers, &body) {
            tracing::debug!(%detail, path = %rec.path, "simulated cloud: authentication failed");
            return auth_error(&detail, rid);
        }

        let mut malformed = false;
        match self.take_fault(ep.api()) {
            Some(Fault::Status { status, body, .. }) => {
                // Only the code is read (other fields are skipped unparsed): bodies may be huge.
                #[derive(serde::Deserialize)]
                struct Code {
                    error_code: Option<String>,
                }
                let code = (status >= 400)
                    .then(|| serde_json::from_str::<Code>(&body).ok())
                    .flatten()
                    .and_then(|c| c.error_code);
                return Reply {
                    status: StatusCode::from_u16(status)
                        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    body: Bytes::from(body),
                    error_code: code,
                    retry_after: None,
                };
            }
            Some(Fault::Throttle {
                retry_after_secs, ..
            }) => {
                let mut reply = throttled(ep.api(), rid);
                reply.retry_after = retry_after_secs;
                return reply;
            }
            Some(Fault::Unavailable {
                retry_after_secs, ..
            }) => {
                let mut reply = unavailable(ep.api(), rid);
                reply.retry_after = retry_after_secs;
                return reply;
            }
            Some(Fault::Delay { delay, .. }) => tokio::time::sleep(delay).await,
            Some(Fault::Malformed { .. }) => malformed = true,
            None => {}
        }

        if let Some(denied) = self.forbidden(ep, rid) {
            return denied;
        }
        let query = parse_query(&rec.query);
        let host = header_str(headers, "host").unwrap_or("localhost");
        let reply = match ep {
            Endpoint::Projects => self.list_projects(&query, &rec.query, host),
            Endpoint::AuthProjects => self.list_projects(&[], &rec.query, host),
            Endpoint::ListenersV2(pid) => {
                self.list_listeners(false, pid, headers, &query, host, rid)
            }
            Endpoint::ListenersLbaas => {
                let pid = header_str(headers, "x-project-id").unwrap_or("").trim();
                self.list_listeners(false, pid, headers, &query, host, rid)
            }
            Endpoint::ListenersV3(pid) => {
                self.list_listeners(true, pid, headers, &query, host, rid)
            }
            Endpoint::LoadBalancersV3(pid) => self.list_loadbalancers(pid, headers, &query, rid),
            Endpoint::BatchQuery(pid) => self.batch_query(pid, headers, &body, rid, rec),
            Endpoint::Pools(v3, pid) => self.list_pools(*v3, pid, headers, &query, rid),
            Endpoint::L7Policies(v3, pid) => self.list_l7policies(*v3, pid, headers, &query, rid),
        };
        if malformed {
            let cut = (reply.body.len() / 2).max(1);
            let body = if reply.body.len() > 1 {
                reply.body.slice(..cut)
            } else {
                Bytes::from_static(b"{")
            };
            return Reply {
                status: StatusCode::OK,
                body,
                error_code: None,
                retry_after: None,
            };
        }
        reply
    }

    fn take_fault(&self, api: SimApi) -> Option<Fault> {
        let mut st = self.state();
        let queue = st.faults.get_mut(&api)?;
        loop {
            let front = queue.front_mut()?;
            let count = front.count_mut();
            if *count == 0 {
                queue.pop_front();
                continue;
            }
            *count -= 1;
            let fault = front.clone();
            if *front.count_mut() == 0 {
                queue.pop_front();
            }
            return Some(fault);
        }
    }

    // -----------------------------------------------------------------------------------------------------
    // Authentication

    /// Recomputes the signature from the request as received; failures of the configured AK count towards
    /// the lock, whatever their cause, because the gateway cannot tell a bad clock from a guessing attacker.
    fn authenticate(
        &self,
        method: &Method,
        path: &str,
        raw_query: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<(), String> {
        let auth = header_str(headers, "authorization")
            .ok_or_else(|| "the Authorization header is missing".to_string())?;
        let parsed = parse_authorization(auth)
            .ok_or_else(|| "the Authorization header is malformed".to_string())?;
        if parsed.access != self.cfg.ak {
            return Err("verify aksk signature fail, the access key does not exist".to_string());
        }
        let now = Instant::now();
        {
            let mut st = self.state();
            match st.auth.locked_until {
                Some(until) if until > now => {
                    return Err(
                        "the access key is locked after too many failed attempts, retry later"
                            .to_string(),
                    );
                }
                Some(_) => st.auth.locked_until = None,
                None => {}
            }
        }
        let result = self.check_signature(&parsed, method, path, raw_query, headers, body);
        let mut st = self.state();
        match &result {
            Ok(()) => st.auth.failures = 0,
            Err(_) => {
                st.auth.failures += 1;
                if self.cfg.lock_after_failures > 0
                    && st.auth.failures >= self.cfg.lock_after_failures
                {
                    st.auth.failures = 0;
                    st.auth.locked_until = now.checked_add(self.cfg.lock_duration);
                }
            }
        }
        result
    }

    fn check_signature(
        &self,
        auth: &ParsedAuth<'_>,
        method: &Method,
        path: &str,
        raw_query: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<(), String> {
        let names: Vec<String> = auth
            .signed_headers
            .split(';')
            .map(|n| n.trim().to_ascii_lowercase())
            .filter(|n| !n.is_empty())
            .collect();
        for required in ["host", "x-sdk-date"] {
            if !names.iter().any(|n| n == required) {
                return Err(format!(
                    "verify aksk signature fail, {required} is not a signed header"
                ));
            }
        }
        let mut signed = Vec::with_capacity(names.len());
        for name in &names {
            if signed.iter().any(|(k, _): &(String, String)| k == name) {
                continue;
            }
            let value = header_str(headers, name).ok_or_else(|| {
                format!("verify aksk signature fail, signed header {name} is missing")
            })?;
            signed.push((name.clone(), value.to_string()));
        }
        let date = header_str(headers, "x-sdk-date").unwrap_or_default().trim();
        let when = signer::parse_sdk_date(date)
            .ok_or_else(|| format!("verify aksk signature fail, invalid X-Sdk-Date {date:?}"))?;
        let now = SystemTime::now();
        let skew = now
            .duration_since(when)
            .or_else(|_| when.duration_since(now))
            .unwrap_or(Duration::MAX);
        if skew > self.cfg.max_clock_skew {
            return Err(format!(
                "verify aksk signature fail, the request time {date} differs from the server time by more than {} s",
                self.cfg.max_clock_skew.as_secs()
            ));
        }
        if let Some(token) = &self.cfg.security_token {
            let sent = signed
                .iter()
                .find(|(k, _)| k == "x-security-token")
                .map(|(_, v)| v.trim());
            if sent != Some(token.trim()) {
                return Err(
                    "verify security token fail, X-Security-Token is missing, unsigned or invalid"
                        .to_string(),
                );
            }
        }
        let host = header_str(headers, "host").unwrap_or_default().trim();
        let query = parse_query(raw_query);
        let expected = signer::sign(
            &SignRequest {
                method: method.as_str(),
                host,
                path,
                query: &query,
                headers: &signed,
                body,
            },
            &self.cfg.ak,
            &self.cfg.sk,
            &Algorithm::SdkHmacSha256,
        );
        if ct_eq(expected.signature.as_bytes(), auth.signature.as_bytes()) {
            Ok(())
        } else {
            Err("verify aksk signature fail".to_string())
        }
    }

    fn project_check(
        &self,
        api: SimApi,
        pid: &str,
        headers: &HeaderMap,
        rid: &str,
    ) -> Result<(), Reply> {
        let sent = header_str(headers, "x-project-id").map(str::trim);
        let exists = self.state().project_exists(pid);
        match api {
            SimApi::Ces => match sent {
                None => Err(ces_error(
                    StatusCode::BAD_REQUEST,
                    "ces.0003",
                    "The project id is not correct: the X-Project-Id header is missing",
                )),
                Some(p) if p != pid => Err(ces_error(
                    StatusCode::BAD_REQUEST,
                    "ces.0003",
                    &format!(
                        "The project id is not correct: X-Project-Id {p} does not match the URL's {pid}"
                    ),
                )),
                Some(_) if !exists => Err(ces_error(
                    StatusCode::NOT_FOUND,
                    "ces.0016",
                    &format!("The project {pid} does not exist"),
                )),
                Some(_) => Ok(()),
            },
            _ => match sent {
                None => Err(elb_error(
                    StatusCode::UNAUTHORIZED,
                    "ELB.1102",
                    "Token is error, Authentication required. (no X-Project-Id: a project-scoped credential is needed)",
                    rid,
                )),
                Some(p) if p != pid || !exists => Err(Reply::error(
                    StatusCode::FORBIDDEN,
                    "403",
                    &json!({"http_code": "403", "message": {
                        "details": format!("Forbidden: project {pid} in the URL is not the credential's project ({p})"),
                        "code": "403"}}),
                )),
                Some(_) => Ok(()),
            },
        }
    }

    /// The 403 a caller without the call's permission gets, in the service's own shape.
    fn forbidden(&self, ep: &Endpoint, rid: &str) -> Option<Reply> {
        let action = match ep.action() {
            Some(a) => a,
            None if matches!(ep, Endpoint::AuthProjects) && !self.cfg.auth_projects_with_aksk => {
                "iam:projects:listAuth"
            }
            None => return None,
        };
        if !matches!(ep, Endpoint::AuthProjects) && policy_allows(&self.state().policy, action) {
            return None;
        }
        let denied = format!("Policy doesn't allow {action} to be performed.");
        Some(match ep.api() {
            // IAM API reference, status 403: IAM.0002.
            SimApi::Iam => Reply::error(
                StatusCode::FORBIDDEN,
                "IAM.0002",
                &json!({"error_msg": "You are not authorized to perform the requested action.",
                        "error_code": "IAM.0002"}),
            ),
            // HUAWEI_CLOUD_API.md section 7: 403 ces.0017.
            SimApi::Ces => ces_error(StatusCode::FORBIDDEN, "ces.0017", &denied),
            // One of the error shapes HUAWEI_CLOUD_API.md section 7 lists.
            SimApi::ElbV2 | SimApi::ElbV3 => Reply::error(
                StatusCode::FORBIDDEN,
                "403",
                &json!({"http_code": "403", "message": {"details": denied, "code": "403"},
                        "request_id": rid}),
            ),
        })
    }

    // -----------------------------------------------------------------------------------------------------
    // IAM

    fn list_projects(&self, query: &[(String, String)], raw_query: &str, host: &str) -> Reply {
        let bool_param = |key: &str| -> Result<Option<bool>, Reply> {
            match first(query, key) {
                None => Ok(None),
                Some(v) if v.eq_ignore_ascii_case("true") => Ok(Some(true)),
                Some(v) if v.eq_ignore_ascii_case("false") => Ok(Some(false)),
                Some(v) => Err(keystone_error(
                    StatusCode::BAD_REQUEST,
                    &format!("Invalid input for field '{key}': {v:?} is not a boolean"),
                )),
            }
        };
        let (enabled, is_domain) = match (bool_param("enabled"), bool_param("is_domain")) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return e,
        };
        let page = match paging_param(query, "page", 1, u32::MAX as u64) {
            Ok(v) => v,
            Err(e) => return e,
        };
        let per_page = match paging_param(query, "per_page", 1, 5000) {
            Ok(v) => v,
            Err(e) => return e,
        };
        if page.is_some() != per_page.is_some() {
            return keystone_error(
                StatusCode::BAD_REQUEST,
                "Invalid input: page and per_page must be given together",
            );
        }
        let name = first(query, "name");
        let domain = first(query, "domain_id");
        let parent = first(query, "parent_id");
        let base = format!("http://{host}");
        let mut all: Vec<Value> = {
            let st = self.state();
            let mut projects: Vec<&Project> = st.projects.iter().collect();
            projects.sort_by(|a, b| a.name.cmp(&b.name));
            projects
                .into_iter()
                .filter(|p| name.is_none_or(|n| n == p.name))
                .filter(|_| enabled.is_none_or(|e| e))
                .filter(|_| is_domain.is_none_or(|d| !d))
                .filter(|_| domain.is_none_or(|d| d == self.domain_id))
                .filter(|_| parent.is_none_or(|d| d == self.domain_id))
                .map(|p| {
                    json!({"id": p.id, "name": p.name, "domain_id": self.domain_id,
                           "parent_id": self.domain_id, "enabled": true, "is_domain": false,
                           "description": "", "links": {"self": format!("{base}/v3/projects/{}", p.id)}})
                })
                .collect()
        };
        let (mut previous, mut next) = (Value::Null, Value::Null);
        if let (Some(page), Some(per_page)) = (page, per_page) {
            let total = all.len() as u64;
            let start = (page - 1).saturating_mul(per_page);
            all = all
                .into_iter()
                .skip(usize::try_from(start).unwrap_or(usize::MAX))
                .take(usize::try_from(per_page).unwrap_or(usize::MAX))
                .collect();
            let link = |p: u64| {
                let mut pairs: Vec<(String, String)> = query
                    .iter()
                    .filter(|(k, _)| k != "page" && k != "per_page")
                    .cloned()
                    .collect();
                pairs.push(("page".to_string(), p.to_string()));
                pairs.push(("per_page".to_string(), per_page.to_string()));
                Value::String(format!(
                    "{base}/v3/projects?{}",
                    signer::canonical_query(&pairs)
                ))
            };
            if page > 1 {
                previous = link(page - 1);
            }
            if page.saturating_mul(per_page) < total {
                next = link(page + 1);
            }
        }
        let self_link = if raw_query.is_empty() {
            format!("{base}/v3/projects")
        } else {
            format!("{base}/v3/projects?{raw_query}")
        };
        Reply::ok(&json!({
            "links": {"self": self_link, "previous": previous, "next": next},
            "projects": all,
        }))
    }

    // -----------------------------------------------------------------------------------------------------
    // ELB

    fn list_listeners(
        &self,
        v3: bool,
        pid: &str,
        headers: &HeaderMap,
        query: &[(String, String)],
        host: &str,
        rid: &str,
    ) -> Reply {
        let api = if v3 { SimApi::ElbV3 } else { SimApi::ElbV2 };
        if let Err(e) = self.project_check(api, pid, headers, rid) {
            return e;
        }
        let paging = match Paging::parse(v3, query, rid) {
            Ok(p) => p,
            Err(e) => return e,
        };
        let filter = match ListenerFilter::parse(query, rid) {
            Ok(f) => f,
            Err(e) => return e,
        };
        if v3
            && self.cfg.v3_rejects_malformed_ids
            && let Some(bad) = filter.lb_ids.iter().find(|id| !is_uuid(id))
        {
            return elb_bad_input(&format!("loadbalancer_id: {bad:?} is not a UUID"), rid);
        }
        let in_project = pid == self.cfg.project_id;
        let (page, more) = {
            let st = self.state();
            let marker_seq = match &paging.marker {
                None => None,
                Some(m) => match st.listeners.get(m) {
                    Some(l) if in_project => Some(l.seq),
                    _ => {
                        return elb_bad_input(
                            &format!("marker: listener {m} could not be found"),
                            rid,
                        );
                    }
                },
            };
            let candidates: Vec<(u64, &ListenerRecord)> = st
                .listeners
                .values()
                .filter(|_| in_project)
                .filter_map(|l| {
                    let lb = st.lbs.get(&l.lb_id)?;
                    let visible = match lb.kind {
                        LbKind::Shared => !v3 || self.cfg.v3_lists_shared,
                        LbKind::Dedicated => v3,
                    };
                    (visible && filter.matches(l)).then_some((l.seq, l))
                })
                .collect();
            // Only the page is rendered: a project-wide listing pages through every listener.
            let (page, more) = paging.apply(candidates, marker_seq);
            let page: Vec<Value> = page.iter().map(|l| listener_json(l, pid, v3)).collect();
            (page, more)
        };
        if v3 {
            Reply::ok(&json!({
                "request_id": rid,
                "page_info": page_info(&page, |v| v["id"].as_str()),
                "listeners": page,
            }))
        } else {
            let mut body = json!({});
            let mut links = Vec::new();
            let href = |marker: &str, reverse: bool| {
                let mut pairs = vec![("marker".to_string(), marker.to_string())];
                if let Some(limit) = paging.limit {
                    pairs.push(("limit".to_string(), limit.to_string()));
                }
                if reverse {
                    pairs.push(("page_reverse".to_string(), "true".to_string()));
                }
                format!(
                    "http://{host}/v2/{pid}/elb/listeners?{}",
                    signer::canonical_query(&pairs)
                )
            };
            if let Some(last) = page.last().and_then(|v| v["id"].as_str())
                && more
            {
                links.push(json!({"href": href(last, paging.reverse), "rel": "next"}));
            }
            if let Some(first) = page.first().and_then(|v| v["id"].as_str())
                && paging.marker.is_some()
            {
                links.push(json!({"href": href(first, !paging.reverse), "rel": "previous"}));
            }
            body["listeners"] = Value::Array(page);
            if !links.is_empty() {
                body["listeners_links"] = Value::Array(links);
            }
            Reply::ok(&body)
        }
    }

    fn list_loadbalancers(
        &self,
        pid: &str,
        headers: &HeaderMap,
        query: &[(String, String)],
        rid: &str,
    ) -> Reply {
        if let Err(e) = self.project_check(SimApi::ElbV3, pid, headers, rid) {
            return e;
        }
        let paging = match Paging::parse(true, query, rid) {
            Ok(p) => p,
            Err(e) => return e,
        };
        let ids = all(query, "id");
        let names = all(query, "name");
        let in_project = pid == self.cfg.project_id;
        let (page, _) = {
            let st = self.state();
            let marker_seq = match &paging.marker {
                None => None,
                Some(m) => match st.lbs.get(m) {
                    Some(lb) if in_project => Some(lb.seq),
                    _ => {
                        return elb_bad_input(
                            &format!("marker: loadbalancer {m} could not be found"),
                            rid,
                        );
                    }
                },
            };
            let candidates: Vec<(u64, Value)> = st
                .lbs
                .iter()
                .filter(|_| in_project)
                .filter(|(_, lb)| lb.kind == LbKind::Dedicated || self.cfg.v3_lists_shared)
                .filter(|(id, _)| ids.is_empty() || ids.contains(&id.as_str()))
                .filter(|(id, lb)| {
                    names.is_empty() || names.contains(&lb_display_name(id, lb).as_str())
                })
                .map(|(id, lb)| {
                    let mut listeners: Vec<(&u64, &String)> = st
                        .listeners
                        .values()
                        .filter(|l| &l.lb_id == id)
                        .map(|l| (&l.seq, &l.listener.id))
                        .collect();
                    listeners.sort();
                    let listeners: Vec<&String> = listeners.into_iter().map(|(_, l)| l).collect();
                    let mut v = loadbalancer_json(id, lb.kind, &listeners, pid);
                    v["name"] = Value::String(lb_display_name(id, lb));
                    (lb.seq, v)
                })
                .collect();
            paging.apply(candidates, marker_seq)
        };
        Reply::ok(&json!({
            "request_id": rid,
            "page_info": page_info(&page, |v| v["id"].as_str()),
            "loadbalancers": page,
        }))
    }

    // -----------------------------------------------------------------------------------------------------
    // CES

    /// Answers 429 when the sliding minute is full; only admitted calls count, so a client that backs off
    /// recovers after a minute.
    fn ces_admit(&self) -> bool {
        let limit = self.cfg.ces_calls_per_minute as usize;
        if limit == 0 {
            return true;
        }
        let now = Instant::now();
        let mut st = self.state();
        while let Some(front) = st.ces_calls.front() {
            if now.duration_since(*front) >= Duration::from_secs(60) {
                st.ces_calls.pop_front();
            } else {
                break;
            }
        }
        if st.ces_calls.len() >= limit {
            return false;
        }
        st.ces_calls.push_back(now);
        true
    }

    fn batch_query(
        &self,
        pid: &str,
        headers: &HeaderMap,
        body: &[u8],
        rid: &str,
        rec: &mut SimRequest,
    ) -> Reply {
        if !self.ces_admit() {
            return throttled(SimApi::Ces, rid);
        }
        if let Err(e) = self.project_check(SimApi::Ces, pid, headers, rid) {
            return e;
        }
        if body.len() > CES_MAX_BODY {
            return ces_body_error(&format!(
                "request body is {} bytes, the limit is {CES_MAX_BODY} bytes (512 KB)",
                body.len()
            ));
        }
        let q = match serde_json::from_slice::<Value>(body)
            .map_err(|e| format!("request body is not valid JSON: {e}"))
            .and_then(|v| parse_ces_query(&v))
        {
            Ok(q) => q,
            Err(detail) => return ces_body_error(&detail),
        };
        if q.metrics.len() > self.cfg.ces_max_metrics {
            return ces_body_error(&format!(
                "metrics: must contain 1 to {} items, got {}",
                self.cfg.ces_max_metrics,
                q.metrics.len()
            ));
        }

        let n = q.metrics.len() as i64;
        let mut from = q.from;
        if n.saturating_mul(q.to - from) > CES_MAX_POINTS.saturating_mul(q.period_ms) {
            from = q.to - (CES_MAX_POINTS / n) * q.period_ms;
            rec.budget_from = Some(from);
        }
        let from = from.div_euclid(q.period_ms) * q.period_ms;
        let now = now_ms();
        let newest = self.newest_minute(now);
        let published = |t: i64| self.cfg.publication.is_published(t, now);

        // Resolve listeners under the lock, generate data outside it.
        let targets: Vec<Option<String>> = {
            let st = self.state();
            q.metrics
                .iter()
                .map(|m| {
                    if let Some((lb, pool)) = m.pool_target() {
                        // Pools have the L7 metrics only, and only when they are HTTP(S).
                        let protocol = st.pools.pool_protocol(lb, pool)?;
                        let spec = metric_spec(&m.metric_name)?;
                        let ok = pid == self.cfg.project_id
                            && m.namespace == "SYS.ELB"
                            && st.lbs.contains_key(lb)
                            && matches!(spec.family, Family::L7 | Family::PoolOnly)
                            && is_l7(protocol);
                        return ok.then(|| pool.to_string());
                    }
                    let (lb, listener) = m.listener_target()?;
                    let known = st.listeners.get(listener)?;
                    let spec = metric_spec(&m.metric_name)?;
                    let ok = pid == self.cfg.project_id
                        && m.namespace == "SYS.ELB"
                        && known.lb_id == lb
                        && st.lbs.contains_key(lb)
                        && spec.family.applies_to(&known.listener.protocol);
                    ok.then(|| listener.to_string())
                })
                .collect()
        };

        let mut series: Vec<Vec<(i64, f64)>> = targets
            .iter()
            .zip(&q.metrics)
            .map(|(target, m)| match target {
                Some(listener) => {
                    let mut p = points(listener, m, from, q.to, newest, q.period_ms, &q.filter);
                    // A late minute is missing below newer ones until it is published.
                    if q.period_ms == MINUTE_MS {
                        p.retain(|(t, _)| published(*t));
                    }
                    p
                }
                None => Vec::new(),
            })
            .collect();
        let total: usize = series.iter().map(Vec::len).sum();
        if total as i64 > CES_MAX_POINTS {
            // Trim the oldest points evenly so every series keeps its newest data.
            let quota = usize::try_from(CES_MAX_POINTS / n).unwrap_or(0);
            for s in &mut series {
                if s.len() > quota {
                    s.drain(..s.len() - quota);
                }
            }
        }

        let entries: Vec<Value> = q
            .metrics
            .iter()
            .zip(series)
            .map(|(m, s)| {
                let mut e = Map::new();
                e.insert("namespace".into(), Value::String(m.namespace.clone()));
                e.insert("metric_name".into(), Value::String(m.metric_name.clone()));
                e.insert(
                    "dimensions".into(),
                    Value::Array(
                        m.dimensions
                            .iter()
                            .map(|(k, v)| json!({"name": k, "value": v}))
                            .collect(),
                    ),
                );
                if let Some(spec) = metric_spec(&m.metric_name) {
                    e.insert("unit".into(), Value::String(spec.unit.to_string()));
                }
                let dps = s
                    .into_iter()
                    .map(|(t, v)| {
                        let mut dp = Map::new();
                        dp.insert(q.filter.clone(), json!(v));
                        dp.insert("timestamp".into(), json!(t));
                        Value::Object(dp)
                    })
                    .collect();
                e.insert("datapoints".into(), Value::Array(dps));
                Value::Object(e)
            })
            .collect();
        let order = response_order(&q.metrics);
        let mut slots: Vec<Option<Value>> = entries.into_iter().map(Some).collect();
        let shuffled: Vec<Value> = order
            .into_iter()
            .filter_map(|i| slots.get_mut(i).and_then(Option::take))
            .collect();
        Reply::ok(&json!({"metrics": shuffled}))
    }
}

fn throttled(api: SimApi, rid: &str) -> Reply {
    if api == SimApi::Ces {
        ces_error(
            StatusCode::TOO_MANY_REQUESTS,
            "ces.0429",
            "Too Many Requests",
        )
    } else {
        apigw_error(
            StatusCode::TOO_MANY_REQUESTS,
            "APIGW.0308",
            "The throttling threshold has been reached: policy user over ratelimit,limit:20,time:1 second",
            rid,
        )
    }
}

fn unavailable(api: SimApi, rid: &str) -> Reply {
    if api == SimApi::Ces {
        ces_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "ces.0007",
            "Internal service error.",
        )
    } else {
        apigw_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "APIGW.0202",
            "The API is unavailable",
            rid,
        )
    }
}

// ---------------------------------------------------------------------------------------------------------
// Request parsing helpers

struct ParsedAuth<'a> {
    access: &'a str,
    signed_headers: &'a str,
    signature: &'a str,
}

fn parse_authorization(value: &str) -> Option<ParsedAuth<'_>> {
    let rest = value.trim().strip_prefix("SDK-HMAC-SHA256 ")?;
    let (mut access, mut signed_headers, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let (k, v) = part.trim().split_once('=')?;
        match k.trim() {
            "Access" => access = Some(v.trim()),
            "SignedHeaders" => signed_headers = Some(v.trim()),
            "Signature" => signature = Some(v.trim()),
            _ => {}
        }
    }
    Some(ParsedAuth {
        access: access.filter(|s| !s.is_empty())?,
        signed_headers: signed_headers.filter(|s| !s.is_empty())?,
        signature: signature.filter(|s| !s.is_empty())?,
    })
}

fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Query pairs percent-decoded, in wire order, repeated keys kept (the signer sorts them itself).
fn parse_query(raw: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    raw.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn first<'q>(query: &'q [(String, String)], key: &str) -> Option<&'q str> {
    query
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn all<'q>(query: &'q [(String, String)], key: &str) -> Vec<&'q str> {
    query
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

fn paging_param(
    query: &[(String, String)],
    key: &str,
    min: u64,
    max: u64,
) -> Result<Option<u64>, Reply> {
    match first(query, key) {
        None => Ok(None),
        Some(v) => match v.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(keystone_error(
                StatusCode::BAD_REQUEST,
                &format!(
                    "Invalid input for field '{key}': {v:?} must be an integer in {min}..={max}"
                ),
            )),
        },
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn note_ces_body(body: &[u8], rec: &mut SimRequest) {
    if body.len() > CES_MAX_BODY {
        return;
    }
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        rec.ces_metrics = v
            .get("metrics")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        rec.from = v.get("from").and_then(Value::as_i64);
        rec.to = v.get("to").and_then(Value::as_i64);
    }
}

// ---------------------------------------------------------------------------------------------------------
// ELB paging and JSON

struct Paging {
    /// `None`: everything (v2 without `limit`, or `limit=0`, which neutron treats as no limit).
    limit: Option<usize>,
    marker: Option<String>,
    reverse: bool,
}

impl Paging {
    fn parse(v3: bool, query: &[(String, String)], rid: &str) -> Result<Self, Reply> {
        let limit = match first(query, "limit") {
            None if v3 => Some(V3_MAX_LIMIT as usize),
            None => None,
            Some(raw) => match raw.trim().parse::<i64>() {
                Ok(n) if v3 && (0..=V3_MAX_LIMIT).contains(&n) => Some(n as usize),
                Ok(0) if !v3 => None,
                Ok(n) if !v3 && n > 0 => Some(usize::try_from(n).unwrap_or(usize::MAX)),
                _ => {
                    let range = if v3 {
                        "0 to 2000"
                    } else {
                        "a positive integer"
                    };
                    return Err(elb_bad_input(
                        &format!("limit: {raw:?} must be {range}"),
                        rid,
                    ));
                }
            },
        };
        let reverse = match first(query, "page_reverse") {
            None => false,
            Some(v) if v.eq_ignore_ascii_case("true") => true,
            Some(v) if v.eq_ignore_ascii_case("false") => false,
            Some(v) => {
                return Err(elb_bad_input(
                    &format!("page_reverse: {v:?} is not a boolean"),
                    rid,
                ));
            }
        };
        let marker = first(query, "marker")
            .filter(|m| !m.is_empty())
            .map(String::from);
        Ok(Paging {
            limit,
            marker,
            reverse,
        })
    }

    /// Sorts by creation order (reversed with `page_reverse`), starts after the marker, and returns the
    /// page plus whether more items follow it.
    fn apply<T>(&self, mut items: Vec<(u64, T)>, marker_seq: Option<u64>) -> (Vec<T>, bool) {
        items.sort_by_key(|(seq, _)| *seq);
        if self.reverse {
            items.reverse();
        }
        let after: Vec<T> = items
            .into_iter()
            .filter(|(seq, _)| match marker_seq {
                None => true,
                Some(m) if self.reverse => *seq < m,
                Some(m) => *seq > m,
            })
            .map(|(_, v)| v)
            .collect();
        match self.limit {
            Some(limit) if after.len() > limit => {
                let mut page = after;
                page.truncate(limit);
                (page, true)
            }
            _ => (after, false),
        }
    }
}

fn page_info<'v>(page: &'v [Value], id: impl Fn(&'v Value) -> Option<&'v str>) -> Value {
    let mut info = Map::new();
    if let (Some(f), Some(l)) = (page.first().and_then(&id), page.last().and_then(&id)) {
        info.insert("previous_marker".into(), Value::String(f.to_string()));
        info.insert("next_marker".into(), Value::String(l.to_string()));
    }
    info.insert("current_count".into(), json!(page.len()));
    Value::Object(info)
}

struct ListenerFilter<'q> {
    lb_ids: Vec<&'q str>,
    ids: Vec<&'q str>,
    names: Vec<&'q str>,
    protocols: Vec<&'q str>,
    ports: Vec<u32>,
    descriptions: Vec<&'q str>,
    admin_state_up: Option<bool>,
}

impl<'q> ListenerFilter<'q> {
    /// Repeated keys are alternatives (OR), as in v3 and in the neutron API shared ELB v2 grew from.
    fn parse(query: &'q [(String, String)], rid: &str) -> Result<Self, Reply> {
        let mut ports = Vec::new();
        for p in all(query, "protocol_port") {
            match p.trim().parse::<u32>() {
                Ok(n) if n <= 65_535 => ports.push(n),
                _ => {
                    return Err(elb_bad_input(
                        &format!("protocol_port: {p:?} is not a port number"),
                        rid,
                    ));
                }
            }
        }
        let admin_state_up = match first(query, "admin_state_up") {
            None => None,
            Some(v) if v.eq_ignore_ascii_case("true") => Some(true),
            Some(v) if v.eq_ignore_ascii_case("false") => Some(false),
            Some(v) => {
                return Err(elb_bad_input(
                    &format!("admin_state_up: {v:?} is not a boolean"),
                    rid,
                ));
            }
        };
        Ok(ListenerFilter {
            lb_ids: all(query, "loadbalancer_id"),
            ids: all(query, "id"),
            names: all(query, "name"),
            protocols: all(query, "protocol"),
            ports,
            descriptions: all(query, "description"),
            admin_state_up,
        })
    }

    fn matches(&self, l: &ListenerRecord) -> bool {
        let any = |wanted: &[&str], have: &str| wanted.is_empty() || wanted.contains(&have);
        any(&self.lb_ids, &l.lb_id)
            && any(&self.ids, &l.listener.id)
            && any(&self.names, &l.listener.name)
            && any(&self.protocols, &l.listener.protocol)
            && any(&self.descriptions, "")
            && (self.ports.is_empty() || self.ports.contains(&u32::from(l.listener.port)))
            && self.admin_state_up.is_none_or(|a| a)
    }
}

fn is_uuid(id: &str) -> bool {
    id.len() == 36
        && id.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

fn is_l7(protocol: &str) -> bool {
    matches!(protocol, "HTTP" | "HTTPS" | "QUIC" | "TERMINATED_HTTPS")
}

fn is_tls(protocol: &str) -> bool {
    matches!(protocol, "HTTPS" | "TERMINATED_HTTPS" | "TLS" | "QUIC")
}

/// The realistic field set of the reference, so the client's parser meets fields it does not know.
fn listener_json(rec: &ListenerRecord, pid: &str, v3: bool) -> Value {
    let l = &rec.listener;
    let created = created_secs(&l.id);
    let tls = is_tls(&l.protocol);
    let mut v = json!({
        "id": l.id,
        "name": l.name,
        "description": "",
        "protocol": l.protocol,
        "protocol_port": l.port,
        "loadbalancers": [{"id": rec.lb_id}],
        "project_id": pid,
        "admin_state_up": true,
        "connection_limit": -1,
        "default_pool_id": uuid_from(&format!("pool/{}", l.id)),
        "http2_enable": false,
        "default_tls_container_ref": if tls { json!(derived_hex(&format!("cert/{}", l.id))) } else { Value::Null },
        "client_ca_tls_container_ref": Value::Null,
        "sni_container_refs": [],
        "tags": [{"key": "sim", "value": "elb-exporter"}],
        "created_at": iso8601(created),
        "updated_at": iso8601(created + 3_600 * (1 + hash_u64(&[&l.id, "updated"]) % 500)),
        "insert_headers": if is_l7(&l.protocol) {
            json!({"X-Forwarded-ELB-IP": true, "X-Forwarded-Host": true})
        } else {
            json!({})
        },
        "tls_ciphers_policy": if tls { json!("tls-1-2") } else { Value::Null },
        "protection_status": "nonProtection",
        "protection_reason": "",
    });
    if v3 {
        let extra = json!({
            "enterprise_project_id": "0",
            "client_timeout": 60,
            "member_timeout": 60,
            "keepalive_timeout": if is_l7(&l.protocol) { 60 } else { 300 },
            "enable_member_retry": true,
            "transparent_client_ip_enable": !is_l7(&l.protocol),
            "enhance_l7policy_enable": false,
            "sni_match_algo": "wildcard",
            "security_policy_id": Value::Null,
            "ipgroup": Value::Null,
            "quic_config": Value::Null,
            "port_ranges": Value::Null,
            "ssl_early_data_enable": false,
            "nat64_enable": false,
            "cps": 0,
            "connection": 0,
        });
        if let (Some(obj), Value::Object(extra)) = (v.as_object_mut(), extra) {
            obj.extend(extra);
        }
    } else {
        v["tenant_id"] = Value::String(pid.to_string());
    }
    v
}

fn lb_display_name(id: &str, lb: &LbRecord) -> String {
    lb.name.clone().unwrap_or_else(|| lb_name(id))
}

/// The `vip_address` the simulator reports for load balancer `id` (tests annotate `kubernetes.io/elb.ip`).
pub fn vip_address(id: &str) -> String {
    let h = hash_u64(&[id, "vip"]);
    format!("192.168.{}.{}", (h >> 8) % 256, 2 + h % 252)
}

fn lb_name(id: &str) -> String {
    format!("sim-elb-{}", id.chars().take(8).collect::<String>())
}

fn loadbalancer_json(id: &str, kind: LbKind, listeners: &[&String], pid: &str) -> Value {
    let created = created_secs(id);
    json!({
        "id": id,
        "name": lb_name(id),
        "description": "",
        "provisioning_status": "ACTIVE",
        "operating_status": "ONLINE",
        "admin_state_up": true,
        "provider": "vlb",
        "guaranteed": kind == LbKind::Dedicated,
        "vpc_id": uuid_from(&format!("vpc/{pid}")),
        "vip_address": vip_address(id),
        "vip_port_id": uuid_from(&format!("port/{id}")),
        "vip_subnet_cidr_id": uuid_from(&format!("subnet/{pid}")),
        "ipv6_vip_address": Value::Null,
        "listeners": listeners.iter().map(|l| json!({"id": l})).collect::<Vec<_>>(),
        "pools": [],
        "project_id": pid,
        "enterprise_project_id": "0",
        "availability_zone_list": ["cn-east-3a", "cn-east-3b"],
        "eips": [],
        "publicips": [],
        "tags": [],
        "ip_target_enable": false,
        "deletion_protection_enable": false,
        "elb_virsubnet_ids": [],
        "l4_flavor_id": if kind == LbKind::Dedicated { json!(uuid_from(&format!("l4/{id}"))) } else { Value::Null },
        "l7_flavor_id": Value::Null,
        "billing_info": Value::Null,
        "created_at": iso8601(created),
        "updated_at": iso8601(created + 86_400),
    })
}

fn created_secs(id: &str) -> u64 {
    // Somewhere in 2022–2023, stable per id.
    1_640_995_200 + hash_u64(&[id, "created"]) % (2 * 365 * 86_400)
}

fn iso8601(secs: u64) -> String {
    let d = signer::sdk_date(UNIX_EPOCH + Duration::from_secs(secs));
    // `YYYYMMDDTHHMMSSZ` → `YYYY-MM-DDTHH:MM:SSZ`
    match (
        d.get(0..4),
        d.get(4..6),
        d.get(6..8),
        d.get(9..11),
        d.get(11..13),
        d.get(13..15),
    ) {
        (Some(y), Some(mo), Some(da), Some(h), Some(mi), Some(s)) => {
            format!("{y}-{mo}-{da}T{h}:{mi}:{s}Z")
        }
        _ => d,
    }
}

fn derived_hex(seed: &str) -> String {
    signer::sha256_hex(seed.as_bytes())
        .get(..32)
        .unwrap_or_default()
        .to_string()
}

fn uuid_from(seed: &str) -> String {
    let h = derived_hex(seed);
    match (
        h.get(0..8),
        h.get(8..12),
        h.get(12..16),
        h.get(16..20),
        h.get(20..32),
    ) {
        (Some(a), Some(b), Some(c), Some(d), Some(e)) => format!("{a}-{b}-{c}-{d}-{e}"),
        _ => h,
    }
}

// ---------------------------------------------------------------------------------------------------------
// CES parsing and data

struct MetricQuery {
    namespace: String,
    metric_name: String,
    dimensions: Vec<(String, String)>,
}

impl MetricQuery {
    /// `(lb, listener)` when the dimensions are exactly `[lbaas_instance_id, lbaas_listener_id]`.
    fn listener_target(&self) -> Option<(&str, &str)> {
        match self.dimensions.as_slice() {
            [(a, lb), (b, listener)] if a == "lbaas_instance_id" && b == "lbaas_listener_id" => {
                Some((lb.as_str(), listener.as_str()))
            }
            _ => None,
        }
    }

    /// `(lb, pool)` when the dimensions are exactly `[lbaas_instance_id, lbaas_pool_id]`.
    fn pool_target(&self) -> Option<(&str, &str)> {
        match self.dimensions.as_slice() {
            [(a, lb), (b, pool)] if a == "lbaas_instance_id" && b == "lbaas_pool_id" => {
                Some((lb.as_str(), pool.as_str()))
            }
            _ => None,
        }
    }
}

struct CesQuery {
    metrics: Vec<MetricQuery>,
    from: i64,
    to: i64,
    period_ms: i64,
    filter: String,
}

/// Validates as CES documents it; every message starts with the offending field's path.
fn parse_ces_query(v: &Value) -> Result<CesQuery, String> {
    let obj = v
        .as_object()
        .ok_or_else(|| "body: must be a JSON object".to_string())?;
    let metrics = obj
        .get("metrics")
        .and_then(Value::as_array)
        .ok_or_else(|| "metrics: required, must be an array".to_string())?;
    if !(1..=CES_MAX_METRICS).contains(&metrics.len()) {
        return Err(format!(
            "metrics: must contain 1 to {CES_MAX_METRICS} items, got {}",
            metrics.len()
        ));
    }
    let mut parsed = Vec::with_capacity(metrics.len());
    for (i, m) in metrics.iter().enumerate() {
        let field = |name: &str| format!("metrics[{i}].{name}");
        let m = m
            .as_object()
            .ok_or_else(|| format!("metrics[{i}]: must be an object"))?;
        let namespace = m
            .get("namespace")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{}: required string", field("namespace")))?;
        if !valid_namespace(namespace) {
            return Err(format!(
                "{}: {namespace:?} must be service.item, 3 to 32 characters of [0-9A-Za-z_], each part starting with a letter",
                field("namespace")
            ));
        }
        let metric_name = m
            .get("metric_name")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{}: required string", field("metric_name")))?;
        if !valid_metric_name(metric_name) {
            return Err(format!(
                "{}: {metric_name:?} must be 1 to 96 characters of [0-9A-Za-z_-] starting with a letter",
                field("metric_name")
            ));
        }
        let dims = m
            .get("dimensions")
            .and_then(Value::as_array)
            .ok_or_else(|| format!("{}: required array", field("dimensions")))?;
        if !(1..=4).contains(&dims.len()) {
            return Err(format!(
                "{}: must contain 1 to 4 items, got {}",
                field("dimensions"),
                dims.len()
            ));
        }
        let mut dimensions = Vec::with_capacity(dims.len());
        for (j, d) in dims.iter().enumerate() {
            let at = format!("metrics[{i}].dimensions[{j}]");
            let name = d
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("{at}.name: required string"))?;
            let value = d
                .get("value")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("{at}.value: required string"))?;
            if !(1..=32).contains(&name.chars().count()) {
                return Err(format!("{at}.name: must be 1 to 32 characters"));
            }
            if !(1..=256).contains(&value.chars().count()) {
                return Err(format!("{at}.value: must be 1 to 256 characters"));
            }
            dimensions.push((name.to_string(), value.to_string()));
        }
        parsed.push(MetricQuery {
            namespace: namespace.to_string(),
            metric_name: metric_name.to_string(),
            dimensions,
        });
    }
    let period = obj
        .get("period")
        .and_then(Value::as_str)
        .filter(|p| CES_PERIODS.contains(p))
        .ok_or_else(|| {
            format!(
                "period: must be one of the strings \"1\", \"300\", \"1200\", \"3600\", \"14400\", \"86400\", got {}",
                obj.get("period").map_or("nothing".to_string(), Value::to_string)
            )
        })?;
    let period_ms = match period.parse::<i64>() {
        Ok(1) | Err(_) => MINUTE_MS,
        Ok(secs) => secs * 1000,
    };
    let filter = obj
        .get("filter")
        .and_then(Value::as_str)
        .filter(|f| CES_FILTERS.contains(f))
        .ok_or_else(|| {
            format!(
                "filter: must be one of average, max, min, sum, variance, got {}",
                obj.get("filter")
                    .map_or("nothing".to_string(), Value::to_string)
            )
        })?;
    let millis = |key: &str| -> Result<i64, String> {
        obj.get(key)
            .and_then(Value::as_i64)
            .filter(|t| (1_000_000_000_000..=9_999_999_999_999).contains(t))
            .ok_or_else(|| {
                format!(
                    "{key}: must be epoch milliseconds (13 digits), got {}",
                    obj.get(key).map_or("nothing".to_string(), Value::to_string)
                )
            })
    };
    let (from, to) = (millis("from")?, millis("to")?);
    if from >= to {
        return Err(format!("from: must be earlier than to ({from} >= {to})"));
    }
    Ok(CesQuery {
        metrics: parsed,
        from,
        to,
        period_ms,
        filter: filter.to_string(),
    })
}

fn valid_namespace(ns: &str) -> bool {
    let part_ok = |p: &str| {
        p.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    (3..=32).contains(&ns.len())
        && matches!(ns.split_once('.'), Some((s, i)) if part_ok(s) && part_ok(i))
}

fn valid_metric_name(name: &str) -> bool {
    (1..=96).contains(&name.len())
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// A deterministic permutation that differs from request order for two or more entries, so a client
/// matching results by position fails.
fn response_order(metrics: &[MetricQuery]) -> Vec<usize> {
    let mut order: Vec<(u64, usize)> = metrics
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let idx = i.to_string();
            let mut parts: Vec<&str> = vec![&m.metric_name, &idx];
            parts.extend(m.dimensions.iter().map(|(_, v)| v.as_str()));
            (hash_u64(&parts), i)
        })
        .collect();
    order.sort();
    let mut order: Vec<usize> = order.into_iter().map(|(_, i)| i).collect();
    if order.windows(2).all(|w| w[0] < w[1]) {
        order.reverse();
    }
    order
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    L4,
    TcpResets,
    L7,
    /// Backend server group metrics that listeners do not have.
    PoolOnly,
}

impl Family {
    fn applies_to(self, protocol: &str) -> bool {
        match self {
            Family::L4 => true,
            Family::TcpResets => protocol == "TCP",
            Family::L7 => is_l7(protocol),
            Family::PoolOnly => false,
        }
    }
}

struct MetricSpec {
    unit: &'static str,
    family: Family,
}

/// Listener-level SYS.ELB metrics of the reference's catalogue.
fn metric_spec(name: &str) -> Option<MetricSpec> {
    let (unit, family) = match name {
        "m1_cps" | "m2_act_conn" | "m3_inact_conn" => ("Count", Family::L4),
        "m4_ncps" | "m5_in_pps" | "m6_out_pps" => ("Count/s", Family::L4),
        "m7_in_Bps" | "m8_out_Bps" => ("Byte/s", Family::L4),
        "m22_in_bandwidth" | "m23_out_bandwidth" => ("bit/s", Family::L4),
        "m1e_server_rps" | "m1f_lvs_rps" | "m21_client_rps" => ("Count/s", Family::TcpResets),
        "mb_l7_qps"
        | "mc_l7_http_2xx"
        | "md_l7_http_3xx"
        | "me_l7_http_4xx"
        | "mf_l7_http_5xx"
        | "m10_l7_http_other_status"
        | "m11_l7_http_404"
        | "m12_l7_http_499"
        | "m13_l7_http_502"
        | "m15_l7_upstream_4xx"
        | "m16_l7_upstream_5xx" => ("Count/s", Family::L7),
        "m14_l7_rt"
        | "m1c_l7_rt_max"
        | "m1d_l7_rt_min"
        | "m17_l7_upstream_rt"
        | "m1a_l7_upstream_rt_max"
        | "m1b_l7_upstream_rt_min"
        | "m17_l7_upstream_rt_p90"
        | "m17_l7_upstream_rt_p95"
        | "m17_l7_upstream_rt_p99" => ("ms", Family::L7),
        other => (pools::pool_only_unit(other)?, Family::PoolOnly),
    };
    Some(MetricSpec { unit, family })
}

/// Datapoints of one series: every minute (or period bucket) from `from` up to `to` and the newest minute
/// with data, both inclusive. Buckets aggregate the minute values with the requested statistic.
fn points(
    listener: &str,
    m: &MetricQuery,
    from: i64,
    to: i64,
    newest: i64,
    period_ms: i64,
    filter: &str,
) -> Vec<(i64, f64)> {
    let mut out = Vec::new();
    let mut t = from;
    if period_ms == MINUTE_MS {
        while t <= to.min(newest) {
            out.push((t, datapoint_value(listener, &m.metric_name, t)));
            t += MINUTE_MS;
        }
        return out;
    }
    while t <= to && t + period_ms - MINUTE_MS <= newest {
        let values: Vec<f64> = (0..period_ms / MINUTE_MS)
            .map(|k| datapoint_value(listener, &m.metric_name, t + k * MINUTE_MS))
            .collect();
        out.push((t, round2(aggregate(&values, filter))));
        t += period_ms;
    }
    out
}

fn aggregate(values: &[f64], filter: &str) -> f64 {
    let n = values.len().max(1) as f64;
    let sum: f64 = values.iter().sum();
    let mean = sum / n;
    match filter {
        "max" => values.iter().copied().fold(f64::MIN, f64::max),
        "min" => values.iter().copied().fold(f64::MAX, f64::min),
        "sum" => sum,
        "variance" => values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n,
        _ => mean,
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// FNV-1a with a fixed basis (never std's randomized hasher), then a splitmix finish so nearby inputs spread.
fn hash_u64(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.as_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Uniform in [0, 1).
fn unit(parts: &[&str]) -> f64 {
    (hash_u64(parts) >> 11) as f64 / (1u64 << 53) as f64
}

/// Per-listener traffic level, 1× to 10×.
fn level(listener: &str) -> f64 {
    10f64.powf(unit(&[listener, "level"]))
}

/// A smooth daily curve in [0.2, 1.0], peaking around 12:00 UTC (evening in China) ± 2 h per listener.
fn diurnal(listener: &str, minute_ms: i64) -> f64 {
    let day = minute_ms.rem_euclid(86_400_000) as f64 / 86_400_000.0;
    let peak = 0.5 + (unit(&[listener, "phase"]) - 0.5) * (4.0 / 24.0);
    0.6 + 0.4 * (std::f64::consts::TAU * (day - peak)).cos()
}

/// Uniform in [-1, 1), per (listener, metric, minute).
fn noise(listener: &str, metric: &str, minute_ms: i64) -> f64 {
    unit(&[listener, metric, &minute_ms.to_string()]) * 2.0 - 1.0
}

fn traffic(listener: &str, metric: &str, minute_ms: i64, base: f64) -> f64 {
    base * level(listener)
        * diurnal(listener, minute_ms)
        * (1.0 + 0.1 * noise(listener, metric, minute_ms))
}

/// The value the simulator serves for one listener, metric and minute (any ms inside the minute gives the
/// minute's value). Connection counts and resets are whole numbers; everything is rounded to 2 decimals.
/// Unknown metrics give 0.
pub fn datapoint_value(listener_id: &str, metric: &str, minute_ms: i64) -> f64 {
    let t = minute_ms.div_euclid(MINUTE_MS) * MINUTE_MS;
    let l = listener_id;
    let qps = || traffic(l, "mb_l7_qps", t, 100.0);
    let share = |ratio: f64| qps() * ratio * (1.0 + 0.2 * noise(l, metric, t));
    let rt = || {
        (5.0 + 45.0 * unit(&[l, "rt"]))
            * (0.8 + 0.4 * diurnal(l, t))
            * (1.0 + 0.1 * noise(l, "rt", t))
    };
    let resets = || {
        let base = 2.0 + 18.0 * unit(&[l, metric, "resets"]);
        (base * diurnal(l, t) * (1.0 + 0.5 * noise(l, metric, t)))
            .round()
            .clamp(0.0, 50.0)
    };
    let v = match metric {
        "m1_cps" => traffic(l, metric, t, 250.0).round(),
        "m2_act_conn" => traffic(l, metric, t, 180.0).round(),
        "m3_inact_conn" => traffic(l, metric, t, 70.0).round(),
        "m4_ncps" => traffic(l, metric, t, 40.0),
        "m5_in_pps" => traffic(l, metric, t, 8_000.0),
        "m6_out_pps" => traffic(l, metric, t, 9_000.0),
        "m7_in_Bps" => traffic(l, metric, t, 700_000.0),
        "m8_out_Bps" => traffic(l, metric, t, 1_000_000.0),
        "m22_in_bandwidth" => {
            8.0 * traffic(l, "m7_in_Bps", t, 700_000.0) * (1.0 + 0.02 * noise(l, metric, t))
        }
        "m23_out_bandwidth" => {
            8.0 * traffic(l, "m8_out_Bps", t, 1_000_000.0) * (1.0 + 0.02 * noise(l, metric, t))
        }
        "m1e_server_rps" | "m1f_lvs_rps" | "m21_client_rps" => resets(),
        "mb_l7_qps" => qps(),
        "mc_l7_http_2xx" => share(0.92),
        "md_l7_http_3xx" => share(0.03),
        "me_l7_http_4xx" => share(0.04),
        "mf_l7_http_5xx" => share(0.008),
        "m10_l7_http_other_status" => share(0.002),
        "m11_l7_http_404" => share(0.025),
        "m12_l7_http_499" => share(0.004),
        "m13_l7_http_502" => share(0.002),
        "m15_l7_upstream_4xx" => share(0.035),
        "m16_l7_upstream_5xx" => share(0.006),
        "m14_l7_rt" => rt(),
        "m1c_l7_rt_max" => rt() * 8.0,
        "m1d_l7_rt_min" => rt() * 0.1,
        "m17_l7_upstream_rt" => rt() * 0.85,
        "m1a_l7_upstream_rt_max" => rt() * 7.0,
        "m1b_l7_upstream_rt_min" => rt() * 0.08,
        "m17_l7_upstream_rt_p90" => rt() * 0.85 * 1.6,
        "m17_l7_upstream_rt_p95" => rt() * 0.85 * 2.0,
        "m17_l7_upstream_rt_p99" => rt() * 0.85 * 3.2,
        m if pools::pool_only_unit(m).is_some() => pools::pool_only_value(qps(), m, noise(l, m, t)),
        _ => 0.0,
    };
    round2(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signer::{SignRequest, sdk_date, sign};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    struct Resp {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Resp {
        fn json(&self) -> Value {
            serde_json::from_slice(&self.body).unwrap_or(Value::Null)
        }
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
        fn code(&self) -> String {
            self.json()["error_code"].as_str().unwrap_or("").to_string()
        }
        fn msg(&self) -> String {
            self.json()["error_msg"].as_str().unwrap_or("").to_string()
        }
    }

    /// A request to sign and send; defaults: signed with the configured credentials, now, X-Project-Id set.
    struct Call {
        method: &'static str,
        path: String,
        query: Vec<(String, String)>,
        body: Vec<u8>,
        project: Option<String>,
        sk: Option<String>,
        date: Option<SystemTime>,
        extra: Vec<(String, String)>,
        tamper_query: Option<String>,
        /// The `Host` to sign and send (default: the address).
        host: Option<String>,
    }

    impl Call {
        fn get(path: impl Into<String>) -> Self {
            Call {
                method: "GET",
                path: path.into(),
                query: Vec::new(),
                body: Vec::new(),
                project: Some(SimConfig::default().project_id),
                sk: None,
                date: None,
                extra: Vec::new(),
                tamper_query: None,
                host: None,
            }
        }
        fn post(path: impl Into<String>, body: Vec<u8>) -> Self {
            Call {
                method: "POST",
                body,
                ..Call::get(path)
            }
        }
        fn q(mut self, k: &str, v: impl ToString) -> Self {
            self.query.push((k.to_string(), v.to_string()));
            self
        }
    }

    async fn start(cfg: SimConfig) -> (CloudSim, SocketAddr) {
        let sim = CloudSim::new(cfg);
        let addr = sim
            .serve(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind");
        (sim, addr)
    }

    async fn send(sim: &CloudSim, addr: SocketAddr, call: Call) -> Resp {
        let cfg = sim.config();
        let host = call.host.clone().unwrap_or_else(|| addr.to_string());
        let mut headers = vec![
            ("Content-Type".to_string(), "application/json".to_string()),
            (
                "X-Sdk-Date".to_string(),
                sdk_date(call.date.unwrap_or_else(SystemTime::now)),
            ),
        ];
        if let Some(p) = &call.project {
            headers.push(("X-Project-Id".to_string(), p.clone()));
        }
        headers.extend(call.extra.iter().cloned());
        let signed = sign(
            &SignRequest {
                method: call.method,
                host: &host,
                path: &call.path,
                query: &call.query,
                headers: &headers,
                body: &call.body,
            },
            &cfg.ak,
            call.sk.as_deref().unwrap_or(&cfg.sk),
            &Algorithm::SdkHmacSha256,
        );
        let qs = call.tamper_query.unwrap_or(signed.query_string);
        let target = if qs.is_empty() {
            call.path.clone()
        } else {
            format!("{}?{qs}", call.path)
        };
        let mut headers = signed.headers;
        if call.host.is_some() {
            headers.push(("Host".to_string(), host));
        }
        http(addr, call.method, &target, &headers, &call.body).await
    }

    /// A minimal HTTP/1.1 client: it sends exactly the signed headers and nothing an HTTP library would add.
    async fn http(
        addr: SocketAddr,
        method: &str,
        target: &str,
        headers: &[(String, String)],
        body: &[u8],
    ) -> Resp {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let mut head = format!("{method} {target} HTTP/1.1\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        ));
        s.write_all(head.as_bytes()).await.expect("write head");
        s.write_all(body).await.expect("write body");
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.expect("read");
        let split = buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("header end");
        let head = String::from_utf8_lossy(&buf[..split]).to_string();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .expect("status");
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let mut body = buf[split + 4..].to_vec();
        let chunked = headers.iter().any(|(k, v)| {
            k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
        });
        if chunked {
            let mut out = Vec::new();
            let mut rest = &body[..];
            while let Some(p) = rest.windows(2).position(|w| w == b"\r\n") {
                let size = usize::from_str_radix(&String::from_utf8_lossy(&rest[..p]), 16)
                    .expect("chunk size");
                if size == 0 {
                    break;
                }
                out.extend_from_slice(&rest[p + 2..p + 2 + size]);
                rest = &rest[p + 2 + size + 2..];
            }
            body = out;
        }
        Resp {
            status,
            headers,
            body,
        }
    }

    fn pid() -> String {
        SimConfig::default().project_id
    }

    fn ces_path() -> String {
        format!("/V1.0/{}/batch-query-metric-data", pid())
    }

    fn metric(lb: &str, listener: &str, name: &str) -> Value {
        json!({"namespace": "SYS.ELB", "metric_name": name,
               "dimensions": [{"name": "lbaas_instance_id", "value": lb},
                              {"name": "lbaas_listener_id", "value": listener}]})
    }

    fn ces_body(metrics: Vec<Value>, from: i64, to: i64) -> Vec<u8> {
        json!({"metrics": metrics, "from": from, "to": to, "period": "1", "filter": "average"})
            .to_string()
            .into_bytes()
    }

    fn with_listeners(sim: &CloudSim) {
        sim.add_loadbalancer("lb-shared-a", LbKind::Shared);
        sim.add_loadbalancer("lb-shared-b", LbKind::Shared);
        sim.add_loadbalancer("lb-ded-c", LbKind::Dedicated);
        sim.add_loadbalancer("lb-ded-d", LbKind::Dedicated);
        for i in 0..4 {
            sim.add_listener(
                "lb-shared-a",
                SimListener::new(
                    format!("sa-{i}"),
                    format!("k8s_TCP_{}", 80 + i),
                    "TCP",
                    80 + i,
                ),
            );
        }
        for i in 0..3 {
            sim.add_listener(
                "lb-shared-b",
                SimListener::new(format!("sb-{i}"), "web", "HTTP", 8080 + i),
            );
        }
        for i in 0..5 {
            sim.add_listener(
                "lb-ded-c",
                SimListener::new(format!("dc-{i}"), "https", "HTTPS", 443 + i),
            );
        }
        for i in 0..4 {
            sim.add_listener(
                "lb-ded-d",
                SimListener::new(format!("dd-{i}"), "udp", "UDP", 53 + i),
            );
        }
    }

    /// Pages until a short page; returns every id seen, in order.
    async fn walk(
        sim: &CloudSim,
        addr: SocketAddr,
        v3: bool,
        limit: usize,
        lbs: &[&str],
    ) -> Vec<String> {
        let path = format!("/{}/{}/elb/listeners", if v3 { "v3" } else { "v2" }, pid());
        let mut seen = Vec::new();
        let mut marker: Option<String> = None;
        for _ in 0..50 {
            let mut call = Call::get(path.clone()).q("limit", limit);
            for lb in lbs {
                call = call.q("loadbalancer_id", lb);
            }
            if let Some(m) = &marker {
                call = call.q("marker", m);
            }
            let r = send(sim, addr, call).await;
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
            let page = r.json()["listeners"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if v3 {
                assert_eq!(r.json()["page_info"]["current_count"], json!(page.len()));
            }
            seen.extend(
                page.iter()
                    .filter_map(|l| l["id"].as_str().map(String::from)),
            );
            if page.len() < limit {
                return seen;
            }
            marker = if v3 {
                r.json()["page_info"]["next_marker"]
                    .as_str()
                    .map(String::from)
            } else {
                seen.last().cloned()
            };
        }
        panic!("paging did not end");
    }

    #[test]
    fn default_config_shapes() {
        let cfg = SimConfig::default();
        assert_eq!(cfg.sk.len(), 40);
        assert_eq!(cfg.project_id.len(), 32);
        assert!(cfg.project_id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(!format!("{cfg:?}").contains(&cfg.sk));
    }

    #[tokio::test]
    async fn well_signed_request_passes() {
        let (sim, addr) = start(SimConfig::default()).await;
        assert_eq!(sim.url(), Some(format!("http://{addr}")));
        let r = send(&sim, addr, Call::get("/v3/projects").q("name", "cn-east-3")).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.header("x-request-id").map(str::len), Some(32));
        let projects = r.json()["projects"].as_array().cloned().unwrap_or_default();
        assert_eq!(projects.len(), 1);
        assert_eq!(projects[0]["id"], json!(pid()));
        assert_eq!(projects[0]["enabled"], json!(true));
        assert!(projects[0]["domain_id"].is_string());
        assert!(r.json()["links"]["next"].is_null());
        // The trailing-slash form of the path signs the same and is served the same.
        let r = send(&sim, addr, Call::get("/v3/projects/")).await;
        assert_eq!(r.status, 200);
        let log = sim.requests();
        assert_eq!(log.len(), 2);
        assert_eq!(log[0].api, SimApi::Iam);
        assert_eq!(log[0].query, "name=cn-east-3");
    }

    #[tokio::test]
    async fn authentication_failures_are_401() {
        let (sim, addr) = start(SimConfig::default()).await;
        let mut wrong = Call::get("/v3/projects");
        wrong.sk = Some("x".repeat(40));
        let r = send(&sim, addr, wrong).await;
        assert_eq!(r.status, 401);
        assert_eq!(r.code(), "APIGW.0301");
        assert!(
            r.msg()
                .starts_with("Incorrect IAM authentication information")
        );
        assert_eq!(r.json()["request_id"].as_str(), r.header("x-request-id"));

        let mut skewed = Call::get("/v3/projects");
        skewed.date = Some(SystemTime::now() - Duration::from_secs(16 * 60));
        let r = send(&sim, addr, skewed).await;
        assert_eq!((r.status, r.code().as_str()), (401, "APIGW.0301"));
        let mut fine = Call::get("/v3/projects");
        fine.date = Some(SystemTime::now() - Duration::from_secs(10 * 60));
        assert_eq!(send(&sim, addr, fine).await.status, 200);

        // The query is verified as received: a changed value breaks the signature.
        let mut tampered = Call::get("/v3/projects").q("name", "cn-east-3");
        tampered.tamper_query = Some("name=cn-north-4".to_string());
        assert_eq!(send(&sim, addr, tampered).await.status, 401);

        let r = http(addr, "GET", "/v3/projects", &[], &[]).await;
        assert_eq!((r.status, r.code().as_str()), (401, "APIGW.0301"));

        let r = http(addr, "GET", "/v9/nothing", &[], &[]).await;
        assert_eq!((r.status, r.code().as_str()), (404, "APIGW.0101"));
        assert!(r.header("x-request-id").is_some());
    }

    #[tokio::test]
    async fn ak_locks_after_consecutive_failures() {
        let cfg = SimConfig {
            lock_duration: Duration::from_millis(300),
            ..SimConfig::default()
        };
        let (sim, addr) = start(cfg).await;
        for _ in 0..5 {
            let mut bad = Call::get("/v3/projects");
            bad.sk = Some("y".repeat(40));
            assert_eq!(send(&sim, addr, bad).await.status, 401);
        }
        let r = send(&sim, addr, Call::get("/v3/projects")).await;
        assert_eq!((r.status, r.code().as_str()), (401, "APIGW.0301"));
        assert!(r.msg().contains("locked"), "{}", r.msg());
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(
            send(&sim, addr, Call::get("/v3/projects")).await.status,
            200
        );
    }

    #[tokio::test]
    async fn security_token_must_be_signed_and_equal() {
        let cfg = SimConfig {
            security_token: Some("sts-token-1".to_string()),
            ..SimConfig::default()
        };
        let (sim, addr) = start(cfg).await;
        assert_eq!(
            send(&sim, addr, Call::get("/v3/projects")).await.status,
            401
        );
        let mut wrong = Call::get("/v3/projects");
        wrong.extra = vec![("X-Security-Token".to_string(), "other".to_string())];
        assert_eq!(send(&sim, addr, wrong).await.status, 401);
        let mut good = Call::get("/v3/projects");
        good.extra = vec![("X-Security-Token".to_string(), "sts-token-1".to_string())];
        assert_eq!(send(&sim, addr, good).await.status, 200);
    }

    #[tokio::test]
    async fn project_header_is_checked() {
        let (sim, addr) = start(SimConfig::default()).await;
        with_listeners(&sim);
        let body = ces_body(
            vec![metric("lb-ded-c", "dc-0", "m1_cps")],
            1_705_306_800_000,
            1_705_307_400_000,
        );

        let mut none = Call::post(ces_path(), body.clone());
        none.project = None;
        let r = send(&sim, addr, none).await;
        assert_eq!((r.status, r.code().as_str()), (400, "ces.0003"));

        let mut other = Call::post(ces_path(), body.clone());
        other.project = Some("f".repeat(32));
        let r = send(&sim, addr, other).await;
        assert_eq!((r.status, r.code().as_str()), (400, "ces.0003"));

        let ghost = "a".repeat(32);
        let mut missing = Call::post(format!("/V1.0/{ghost}/batch-query-metric-data"), body);
        missing.project = Some(ghost);
        let r = send(&sim, addr, missing).await;
        assert_eq!((r.status, r.code().as_str()), (404, "ces.0016"));

        let mut none = Call::get(format!("/v3/{}/elb/listeners", pid()));
        none.project = None;
        let r = send(&sim, addr, none).await;
        assert_eq!((r.status, r.code().as_str()), (401, "ELB.1102"));

        let mut other = Call::get(format!("/v2/{}/elb/listeners", pid()));
        other.project = Some("f".repeat(32));
        let r = send(&sim, addr, other).await;
        assert_eq!(r.status, 403);
        assert_eq!(r.json()["message"]["code"], json!("403"));

        // An existing project of the account without load balancers lists nothing.
        let second = "b".repeat(32);
        sim.add_project("cn-south-1", &second);
        let mut call = Call::get(format!("/v3/{second}/elb/listeners"));
        call.project = Some(second);
        let r = send(&sim, addr, call).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["listeners"], json!([]));
    }

    #[tokio::test]
    async fn iam_filters_pages_and_ambiguity() {
        let (sim, addr) = start(SimConfig::default()).await;
        let r = send(&sim, addr, Call::get("/v3/projects")).await;
        let names: Vec<String> = r.json()["projects"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["name"].as_str().map(String::from))
            .collect();
        assert!(names.len() >= 3 && names[0] != "cn-east-3", "{names:?}");

        let r = send(
            &sim,
            addr,
            Call::get("/v3/projects").q("page", 1).q("per_page", 2),
        )
        .await;
        assert_eq!(r.json()["projects"].as_array().map(Vec::len), Some(2));
        assert!(
            r.json()["links"]["next"]
                .as_str()
                .is_some_and(|l| l.ends_with("/v3/projects?page=2&per_page=2"))
        );
        let r = send(
            &sim,
            addr,
            Call::get("/v3/projects").q("per_page", 0).q("page", 1),
        )
        .await;
        assert_eq!(r.status, 400);
        assert_eq!(r.json()["error"]["code"], json!(400));

        let r = send(
            &sim,
            addr,
            Call::get("/v3/projects")
                .q("name", "cn-east-3")
                .q("enabled", false),
        )
        .await;
        assert_eq!(r.json()["projects"], json!([]));

        sim.add_project("cn-east-3", &"c".repeat(32));
        let r = send(&sim, addr, Call::get("/v3/projects").q("name", "cn-east-3")).await;
        assert_eq!(r.json()["projects"].as_array().map(Vec::len), Some(2));
    }

    #[tokio::test]
    async fn v2_paging_reaches_every_shared_listener_once() {
        let (sim, addr) = start(SimConfig::default()).await;
        with_listeners(&sim);
        let mut all_shared: Vec<String> = (0..4)
            .map(|i| format!("sa-{i}"))
            .chain((0..3).map(|i| format!("sb-{i}")))
            .collect();
        all_shared.sort();
        for limit in [1, 3, 7] {
            let mut seen = walk(&sim, addr, false, limit, &[]).await;
            seen.sort();
            assert_eq!(seen, all_shared, "limit {limit}");
        }
        // Without limit: everything at once, no dedicated listeners, realistic v2 fields.
        let r = send(
            &sim,
            addr,
            Call::get(format!("/v2/{}/elb/listeners", pid())),
        )
        .await;
        let ls = r.json()["listeners"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(ls.len(), 7);
        assert!(r.json().get("listeners_links").is_none());
        for key in [
            "tenant_id",
            "admin_state_up",
            "connection_limit",
            "default_pool_id",
            "http2_enable",
            "sni_container_refs",
            "tags",
            "created_at",
            "updated_at",
            "insert_headers",
        ] {
            assert!(ls[0].get(key).is_some(), "{key}");
        }
        assert_eq!(ls[0]["loadbalancers"][0]["id"], json!("lb-shared-a"));

        let r = send(
            &sim,
            addr,
            Call::get(format!("/v2/{}/elb/listeners", pid())).q("limit", 2),
        )
        .await;
        assert_eq!(r.json()["listeners_links"][0]["rel"], json!("next"));

        let r = send(
            &sim,
            addr,
            Call::get(format!("/v2/{}/elb/listeners", pid()))
                .q("loadbalancer_id", "lb-shared-b")
                .q("protocol_port", 8081),
        )
        .await;
        assert_eq!(r.json()["listeners"][0]["id"], json!("sb-1"));
        assert_eq!(r.json()["listeners"].as_array().map(Vec::len), Some(1));

        let r = send(
            &sim,
            addr,
            Call::get(format!("/v2/{}/elb/listeners", pid())).q("loadbalancer_id", "no-such-lb"),
        )
        .await;
        assert_eq!((r.status, r.json()["listeners"].clone()), (200, json!([])));

        let r = send(
            &sim,
            addr,
            Call::get(format!("/v2/{}/elb/listeners", pid()))
                .q("limit", 2)
                .q("marker", "no-such-listener"),
        )
        .await;
        assert_eq!((r.status, r.code().as_str()), (400, "ELB.8902"));
        assert!(r.msg().contains("marker"));
    }

    #[tokio::test]
    async fn v3_paging_filters_and_limits() {
        let (sim, addr) = start(SimConfig::default()).await;
        with_listeners(&sim);
        let mut expected: Vec<String> = (0..5)
            .map(|i| format!("dc-{i}"))
            .chain((0..4).map(|i| format!("dd-{i}")))
            .collect();
        expected.sort();
        for limit in [2, 4, 9] {
            let mut seen = walk(
                &sim,
                addr,
                true,
                limit,
                &["lb-ded-c", "lb-ded-d", "lb-shared-a"],
            )
            .await;
            seen.sort();
            assert_eq!(seen, expected, "limit {limit}");
        }
        let mut seen = walk(&sim, addr, true, 2000, &[]).await;
        seen.sort();
        assert_eq!(seen, expected);

        let path = format!("/v3/{}/elb/listeners", pid());
        for bad in ["2001", "-1", "ten"] {
            let r = send(&sim, addr, Call::get(path.clone()).q("limit", bad)).await;
            assert_eq!((r.status, r.code().as_str()), (400, "ELB.8902"), "{bad}");
        }
        let r = send(
            &sim,
            addr,
            Call::get(path.clone()).q("limit", 2).q("marker", "sa-0"),
        )
        .await;
        assert_eq!(r.status, 200, "a marker names any existing listener");
        let r = send(&sim, addr, Call::get(path.clone()).q("marker", "gone")).await;
        assert_eq!(r.status, 400);
        let r = send(
            &sim,
            addr,
            Call::get(path.clone()).q("id", "dc-1").q("id", "dd-2"),
        )
        .await;
        assert_eq!(r.json()["listeners"].as_array().map(Vec::len), Some(2));
        assert!(r.json()["request_id"].is_string());
        let r = send(&sim, addr, Call::get(path.clone()).q("protocol", "UDP")).await;
        assert_eq!(r.json()["page_info"]["current_count"], json!(4));

        let r = send(
            &sim,
            addr,
            Call::get(format!("/v3/{}/elb/loadbalancers", pid())),
        )
        .await;
        let lbs = r.json()["loadbalancers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(lbs.len(), 2);
        assert!(lbs.iter().all(|lb| lb["guaranteed"] == json!(true)));
        assert_eq!(lbs[0]["listeners"].as_array().map(Vec::len), Some(5));

        sim.remove_loadbalancer("lb-ded-d");
        sim.remove_listener("dc-0");
        let seen = walk(&sim, addr, true, 100, &[]).await;
        assert_eq!(seen, ["dc-1", "dc-2", "dc-3", "dc-4"]);
    }

    #[tokio::test]
    async fn v3_can_list_shared_load_balancers() {
        let cfg = SimConfig {
            v3_lists_shared: true,
            ..SimConfig::default()
        };
        let (sim, addr) = start(cfg).await;
        with_listeners(&sim);
        let seen = walk(&sim, addr, true, 5, &["lb-shared-a"]).await;
        assert_eq!(seen.len(), 4);
        let r = send(
            &sim,
            addr,
            Call::get(format!("/v3/{}/elb/loadbalancers", pid())).q("id", "lb-shared-a"),
        )
        .await;
        assert_eq!(r.json()["loadbalancers"][0]["guaranteed"], json!(false));
    }

    #[tokio::test]
    async fn ces_validation_errors_name_their_field() {
        let (sim, addr) = start(SimConfig::default()).await;
        let (from, to) = (1_705_306_800_000_i64, 1_705_307_400_000_i64);
        let one = metric("lb", "l", "m1_cps");
        let five_dims = json!({"namespace": "SYS.ELB", "metric_name": "m1_cps",
            "dimensions": (0..5).map(|i| json!({"name": format!("d{i}"), "value": "v"})).collect::<Vec<_>>()});
        let base = |metrics: Vec<Value>| json!({"metrics": metrics, "from": from, "to": to, "period": "1", "filter": "average"});
        let mut cases: Vec<(Value, &str)> = vec![
            (base(vec![]), "metrics"),
            (base(vec![one.clone(); 501]), "metrics"),
            (base(vec![five_dims]), "metrics[0].dimensions"),
            (
                base(vec![
                    json!({"namespace": "SYS", "metric_name": "m1_cps", "dimensions": [{"name": "a", "value": "b"}]}),
                ]),
                "metrics[0].namespace",
            ),
            (
                base(vec![
                    json!({"namespace": "SYS.ELB", "metric_name": "1abc", "dimensions": [{"name": "a", "value": "b"}]}),
                ]),
                "metrics[0].metric_name",
            ),
            (
                base(vec![
                    json!({"namespace": "SYS.ELB", "metric_name": "m1_cps", "dimensions": [{"name": "x".repeat(33), "value": "b"}]}),
                ]),
                "metrics[0].dimensions[0].name",
            ),
        ];
        let mut bad = base(vec![one.clone()]);
        bad["period"] = json!("60");
        cases.push((bad.clone(), "period"));
        bad["period"] = json!(1);
        cases.push((bad, "period"));
        let mut bad = base(vec![one.clone()]);
        bad["filter"] = json!("avg");
        cases.push((bad, "filter"));
        let mut bad = base(vec![one.clone()]);
        bad["from"] = json!(to);
        cases.push((bad, "from"));
        let mut bad = base(vec![one.clone()]);
        bad["to"] = json!(1_705_307_400);
        cases.push((bad, "to"));
        for (body, field) in cases {
            let r = send(
                &sim,
                addr,
                Call::post(ces_path(), body.to_string().into_bytes()),
            )
            .await;
            assert_eq!((r.status, r.code().as_str()), (400, "ces.0014"), "{field}");
            assert!(
                r.msg().contains(&format!(": {field}:")),
                "{field}: {}",
                r.msg()
            );
        }
        // Over 512 KB, even when otherwise valid.
        let mut big = base(vec![one]);
        big["padding"] = json!("p".repeat(CES_MAX_BODY));
        let r = send(
            &sim,
            addr,
            Call::post(ces_path(), big.to_string().into_bytes()),
        )
        .await;
        assert_eq!((r.status, r.code().as_str()), (400, "ces.0014"));
        assert!(r.msg().contains("body"), "{}", r.msg());
        let r = send(
            &sim,
            addr,
            Call::post(ces_path(), b"{\"metrics\": [".to_vec()),
        )
        .await;
        assert_eq!((r.status, r.code().as_str()), (400, "ces.0014"));
        let log = sim.requests();
        assert_eq!(log[1].ces_metrics, 501);
        assert_eq!((log[1].from, log[1].to), (Some(from), Some(to)));
        assert!(
            log.iter()
                .all(|r| r.error_code.as_deref() == Some("ces.0014"))
        );
    }

    #[tokio::test]
    async fn ces_serves_the_value_function_out_of_order() {
        let (sim, addr) = start(SimConfig::default()).await;
        with_listeners(&sim);
        let newest = sim.newest_minute(now_ms());
        let to = newest - 10 * MINUTE_MS + 30_000;
        let from = to - 5 * MINUTE_MS;
        let metrics = vec![
            metric("lb-shared-a", "sa-0", "m1_cps"),
            metric("lb-shared-a", "sa-0", "m7_in_Bps"),
            metric("lb-shared-a", "sa-0", "mb_l7_qps"),
            metric("lb-shared-b", "sb-0", "mb_l7_qps"),
            metric("lb-shared-b", "sa-0", "m1_cps"),
            metric("lb-shared-a", "nope", "m1_cps"),
            metric("lb-shared-a", "sa-0", "m99_unknown"),
            json!({"namespace": "SYS.ELB", "metric_name": "m1_cps",
                   "dimensions": [{"name": "lbaas_instance_id", "value": "lb-shared-a"}]}),
        ];
        let r = send(
            &sim,
            addr,
            Call::post(ces_path(), ces_body(metrics.clone(), from, to)),
        )
        .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let got = r.json()["metrics"].as_array().cloned().unwrap_or_default();
        assert_eq!(got.len(), metrics.len());
        let key = |v: &Value| (v["metric_name"].clone(), v["dimensions"].clone());
        let requested: Vec<_> = metrics.iter().map(key).collect();
        let returned: Vec<_> = got.iter().map(key).collect();
        assert_ne!(
            requested, returned,
            "results must not come back in request order"
        );
        let find = |lb: &str, l: &str, m: &str| {
            got.iter()
                .find(|e| key(e) == key(&metric(lb, l, m)))
                .cloned()
                .unwrap_or(Value::Null)
        };
        let cps = find("lb-shared-a", "sa-0", "m1_cps");
        assert_eq!(cps["unit"], json!("Count"));
        let dps = cps["datapoints"].as_array().cloned().unwrap_or_default();
        let first = from.div_euclid(MINUTE_MS) * MINUTE_MS;
        let stamps: Vec<i64> = dps.iter().filter_map(|d| d["timestamp"].as_i64()).collect();
        let want: Vec<i64> = (0..6).map(|k| first + k * MINUTE_MS).collect();
        assert_eq!(stamps, want);
        for d in &dps {
            let t = d["timestamp"].as_i64().unwrap_or_default();
            assert_eq!(
                d["average"].as_f64(),
                Some(datapoint_value("sa-0", "m1_cps", t))
            );
        }
        assert_eq!(
            find("lb-shared-a", "sa-0", "m7_in_Bps")["unit"],
            json!("Byte/s")
        );
        assert_eq!(
            find("lb-shared-a", "sa-0", "mb_l7_qps")["datapoints"],
            json!([]),
            "no L7 data on TCP"
        );
        assert_eq!(
            find("lb-shared-b", "sb-0", "mb_l7_qps")["datapoints"]
                .as_array()
                .map(Vec::len),
            Some(6)
        );
        assert_eq!(
            find("lb-shared-b", "sa-0", "m1_cps")["datapoints"],
            json!([]),
            "listener on another LB"
        );
        assert_eq!(
            find("lb-shared-a", "nope", "m1_cps")["datapoints"],
            json!([])
        );
        let unknown = find("lb-shared-a", "sa-0", "m99_unknown");
        assert_eq!(unknown["datapoints"], json!([]));
        assert!(unknown.get("unit").is_none());

        // Data stops at the newest minute; other statistics and periods aggregate minute values.
        let body = json!({"metrics": [metric("lb-shared-a", "sa-1", "m4_ncps")],
                          "from": newest - 3 * MINUTE_MS, "to": newest + 5 * MINUTE_MS,
                          "period": "1", "filter": "max"})
        .to_string()
        .into_bytes();
        let r = send(&sim, addr, Call::post(ces_path(), body)).await;
        let dps = r.json()["metrics"][0]["datapoints"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(dps.len() == 4 || dps.len() == 5, "{}", dps.len());
        assert!(dps[0]["max"].is_number() && dps[0].get("average").is_none());
        let bucket = (newest - 60 * MINUTE_MS).div_euclid(300_000) * 300_000;
        let body = json!({"metrics": [metric("lb-shared-a", "sa-1", "m4_ncps")],
                          "from": bucket + 1, "to": bucket + 1000,
                          "period": "300", "filter": "sum"})
        .to_string()
        .into_bytes();
        let r = send(&sim, addr, Call::post(ces_path(), body)).await;
        let dp = r.json()["metrics"][0]["datapoints"][0].clone();
        let sum: f64 = (0..5)
            .map(|k| datapoint_value("sa-1", "m4_ncps", bucket + k * MINUTE_MS))
            .sum();
        assert_eq!(dp["timestamp"], json!(bucket));
        assert!((dp["sum"].as_f64().unwrap_or_default() - sum).abs() < 0.011);
    }

    #[tokio::test]
    async fn ces_budget_moves_from_silently() {
        let (sim, addr) = start(SimConfig::default()).await;
        with_listeners(&sim);
        let newest = sim.newest_minute(now_ms());
        let to = newest - 60 * MINUTE_MS;

        // 7 metrics × 600 minutes exceeds 3000: from moves to to − floor(3000/7) minutes.
        let metrics: Vec<Value> = [
            "m1_cps",
            "m2_act_conn",
            "m3_inact_conn",
            "m4_ncps",
            "m5_in_pps",
            "m6_out_pps",
            "m7_in_Bps",
        ]
        .iter()
        .map(|m| metric("lb-ded-c", "dc-0", m))
        .collect();
        let r = send(
            &sim,
            addr,
            Call::post(ces_path(), ces_body(metrics, to - 600 * MINUTE_MS, to)),
        )
        .await;
        assert_eq!(r.status, 200);
        let entries = r.json()["metrics"].as_array().cloned().unwrap_or_default();
        for e in &entries {
            let dps = e["datapoints"].as_array().cloned().unwrap_or_default();
            assert_eq!(dps.len(), 428);
            assert_eq!(dps.last().map(|d| d["timestamp"].clone()), Some(json!(to)));
        }
        let log = sim.requests();
        assert_eq!(log[0].from, Some(to - 600 * MINUTE_MS));
        assert_eq!(log[0].budget_from, Some(to - 428 * MINUTE_MS));

        // 500 metrics × 10 minutes → to − 6 minutes, and never more than 3000 points.
        let names = [
            "m1_cps",
            "m2_act_conn",
            "m3_inact_conn",
            "m4_ncps",
            "m5_in_pps",
        ];
        let metrics: Vec<Value> = (0..500)
            .map(|i| metric("lb-ded-c", &format!("dc-{}", i % 5), names[i / 5 % 5]))
            .collect();
        let r = send(
            &sim,
            addr,
            Call::post(ces_path(), ces_body(metrics, to - 10 * MINUTE_MS, to)),
        )
        .await;
        assert_eq!(r.status, 200);
        let entries = r.json()["metrics"].as_array().cloned().unwrap_or_default();
        let counts: Vec<usize> = entries
            .iter()
            .map(|e| e["datapoints"].as_array().map_or(0, Vec::len))
            .collect();
        assert_eq!(counts.len(), 500);
        assert!(counts.iter().all(|&c| c == 6), "{counts:?}");
        assert_eq!(sim.requests()[1].budget_from, Some(to - 6 * MINUTE_MS));
        assert_eq!(sim.requests()[1].ces_metrics, 500);

        // Within budget: untouched.
        let r = send(
            &sim,
            addr,
            Call::post(
                ces_path(),
                ces_body(
                    vec![metric("lb-ded-c", "dc-0", "m1_cps")],
                    to - 10 * MINUTE_MS,
                    to,
                ),
            ),
        )
        .await;
        assert_eq!(
            r.json()["metrics"][0]["datapoints"]
                .as_array()
                .map(Vec::len),
            Some(11)
        );
        assert_eq!(sim.requests()[2].budget_from, None);
    }

    #[tokio::test]
    async fn ces_throttles_per_minute() {
        let cfg = SimConfig {
            ces_calls_per_minute: 3,
            ..SimConfig::default()
        };
        let (sim, addr) = start(cfg).await;
        let body = ces_body(
            vec![metric("lb", "l", "m1_cps")],
            1_705_306_800_000,
            1_705_307_400_000,
        );
        for _ in 0..3 {
            assert_eq!(
                send(&sim, addr, Call::post(ces_path(), body.clone()))
                    .await
                    .status,
                200
            );
        }
        let r = send(&sim, addr, Call::post(ces_path(), body)).await;
        assert_eq!((r.status, r.code().as_str()), (429, "ces.0429"));
        // Other APIs are not throttled by the CES limit.
        assert_eq!(
            send(&sim, addr, Call::get("/v3/projects")).await.status,
            200
        );
    }

    #[tokio::test]
    async fn faults_apply_to_well_signed_calls_in_order() {
        let cfg = SimConfig {
            ces_latency: Duration::from_millis(20),
            ..SimConfig::default()
        };
        let (sim, addr) = start(cfg).await;
        with_listeners(&sim);
        let v2 = || Call::get(format!("/v2/{}/elb/listeners", pid()));
        sim.inject(
            SimApi::ElbV2,
            Fault::Status {
                status: 503,
                body: r#"{"error_code":"ELB.9999","error_msg":"busy"}"#.to_string(),
                count: 2,
            },
        );
        sim.inject(SimApi::ElbV2, Fault::Malformed { count: 1 });
        sim.inject(
            SimApi::ElbV2,
            Fault::Throttle {
                retry_after_secs: Some(7),
                count: 1,
            },
        );
        sim.inject(
            SimApi::ElbV2,
            Fault::Delay {
                delay: Duration::from_millis(120),
                count: 1,
            },
        );
        // A badly signed call is rejected before faults and does not consume one.
        let mut bad = v2();
        bad.sk = Some("z".repeat(40));
        assert_eq!(send(&sim, addr, bad).await.status, 401);
        for _ in 0..2 {
            let r = send(&sim, addr, v2()).await;
            assert_eq!((r.status, r.code().as_str()), (503, "ELB.9999"));
            assert_eq!(r.body, br#"{"error_code":"ELB.9999","error_msg":"busy"}"#);
        }
        let r = send(&sim, addr, v2()).await;
        assert_eq!(r.status, 200);
        assert!(serde_json::from_slice::<Value>(&r.body).is_err());
        let r = send(&sim, addr, v2()).await;
        assert_eq!((r.status, r.code().as_str()), (429, "APIGW.0308"));
        assert_eq!(r.header("retry-after"), Some("7"));
        let t = Instant::now();
        let r = send(&sim, addr, v2()).await;
        assert!(t.elapsed() >= Duration::from_millis(120));
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["listeners"].as_array().map(Vec::len), Some(7));
        assert_eq!(send(&sim, addr, v2()).await.status, 200);

        // CES throttle faults carry the CES code; latency applies to every CES answer.
        sim.inject(
            SimApi::Ces,
            Fault::Throttle {
                retry_after_secs: None,
                count: 1,
            },
        );
        let body = ces_body(
            vec![metric("lb", "l", "m1_cps")],
            1_705_306_800_000,
            1_705_307_400_000,
        );
        let t = Instant::now();
        let r = send(&sim, addr, Call::post(ces_path(), body)).await;
        assert!(t.elapsed() >= Duration::from_millis(20));
        assert_eq!((r.status, r.code().as_str()), (429, "ces.0429"));
        assert!(r.header("retry-after").is_none());
        let statuses: Vec<u16> = sim.requests().iter().map(|r| r.status).collect();
        assert_eq!(statuses, [401, 503, 503, 200, 429, 200, 200, 429]);
        sim.clear_requests();
        assert!(sim.requests().is_empty());
    }

    #[test]
    fn values_are_deterministic_and_realistic() {
        let day = 1_705_276_800_000_i64;
        for l in ["l-1", "l-2", "9b1e4a5b"] {
            for k in (0..1440).step_by(7) {
                let t = day + k * MINUTE_MS;
                let v = |m| datapoint_value(l, m, t);
                assert_eq!(v("m1_cps"), datapoint_value(l, "m1_cps", t + 59_999));
                assert!((10.0..=5_000.0).contains(&v("m1_cps")) && v("m1_cps").fract() == 0.0);
                assert!((100.0..=200_000.0).contains(&v("m5_in_pps")));
                assert!((1e3..=1.2e7).contains(&v("m7_in_Bps")));
                let ratio = v("m22_in_bandwidth") / v("m7_in_Bps");
                assert!((7.5..=8.5).contains(&ratio), "{ratio}");
                assert!(
                    (0.0..=50.0).contains(&v("m21_client_rps"))
                        && v("m21_client_rps").fract() == 0.0
                );
                assert!(v("m1c_l7_rt_max") > v("m14_l7_rt") && v("m14_l7_rt") > v("m1d_l7_rt_min"));
                let x = v("m4_ncps");
                assert_eq!(x, (x * 100.0).round() / 100.0);
            }
        }
        assert_eq!(datapoint_value("l-1", "nope", day), 0.0);
        assert_ne!(
            datapoint_value("l-1", "m1_cps", day),
            datapoint_value("l-2", "m1_cps", day)
        );
    }

    #[tokio::test]
    async fn a_profile_answers_on_its_own_hosts_with_its_limits_and_policies() {
        let (sim, addr) = start(SimProfile::Otc.least_privilege()).await;
        let on = |host: &str, c: Call| Call {
            host: Some(host.to_string()),
            ..c
        };
        // The service's own host; a wrong service, a global IAM host (none on OTC), another cloud.
        let r = send(
            &sim,
            addr,
            on(
                "iam.eu-de.otc.t-systems.com",
                Call::get("/v3/auth/projects"),
            ),
        )
        .await;
        assert_eq!(r.status, 200);
        for host in [
            "elb.eu-de.otc.t-systems.com",
            "iam.otc.t-systems.com",
            "iam.eu-de.myhuaweicloud.com",
        ] {
            let r = send(&sim, addr, on(host, Call::get("/v3/auth/projects"))).await;
            assert_eq!((r.status, r.code().as_str()), (404, "APIGW.0101"), "{host}");
        }
        // The least-privilege user may not list projects by name, until granted.
        let r = send(&sim, addr, Call::get("/v3/projects").q("name", "eu-de")).await;
        assert_eq!((r.status, r.code().as_str()), (403, "IAM.0002"));
        sim.grant("iam:projects:list");
        let r = send(&sim, addr, Call::get("/v3/projects").q("name", "eu-de")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["projects"][0]["id"].as_str(), Some(pid().as_str()));
        // 10 metrics per CES call; 11 is a 400 with the body-error shape.
        with_listeners(&sim);
        let to = now_ms();
        let metrics = |n: usize| {
            (0..n)
                .map(|_| metric("lb-ded-c", "dc-0", "m1_cps"))
                .collect()
        };
        let r = send(
            &sim,
            addr,
            Call::post(ces_path(), ces_body(metrics(11), to - 300_000, to)),
        )
        .await;
        assert_eq!((r.status, r.code().as_str()), (400, "ces.0014"));
        assert!(r.msg().contains("1 to 10 items, got 11"), "{}", r.msg());
        let r = send(
            &sim,
            addr,
            Call::post(ces_path(), ces_body(metrics(10), to - 300_000, to)),
        )
        .await;
        assert_eq!(r.status, 200);
    }
}
