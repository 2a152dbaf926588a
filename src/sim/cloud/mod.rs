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
use serde_json::{Value, json};

use crate::clock::now_ms;
use crate::signer;

mod pools;
pub use pools::{SimL7Policy, SimPool, cce_pool_name};

mod auth;
mod ces;
mod data;
mod elb;
#[cfg(test)]
mod tests;

use auth::auth_error;
use ces::{CES_MAX_METRICS, ces_error, note_ces_body};
pub use data::datapoint_value;
use data::derived_hex;
pub use elb::vip_address;

/// Bounded so a long benchmark or demo run cannot grow memory without limit.
const MAX_LOG: usize = 100_000;
/// Read limit for any request body; the CES 512 KB rule is checked separately so it can answer `ces.0014`.
const MAX_READ_BODY: usize = 4 * 1024 * 1024;

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

    /// Whether the cloud's gateway has this route: Open Telekom Cloud documents shared-LB listeners,
    /// pools and forwarding policies (and load balancers) only at the OpenStack paths
    /// `/v2.0/lbaas/<collection>`, Huawei Cloud only at `/v2/{project_id}/elb/<collection>`.
    fn publishes(self, ep: &Endpoint) -> bool {
        match ep {
            Endpoint::ListenersV2(_)
            | Endpoint::LoadBalancers(false, _)
            | Endpoint::Pools(false, _)
            | Endpoint::L7Policies(false, _) => self != SimProfile::Otc,
            Endpoint::Lbaas(_) => self == SimProfile::Otc,
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

    /// Replaces the caller's policies with a custom policy allowing exactly these actions
    /// (`service:resource:verb`, `*` for any part), as an administrator attaching a custom policy
    /// instead of the system ones does; it applies to the next request.
    pub fn set_policy(&self, actions: &[&str]) {
        self.inner.state().policy = actions.iter().map(|a| a.to_string()).collect();
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

    /// Drops every fault still queued for `api`, so an outage injected with a large count ends now.
    pub fn clear_faults(&self, api: SimApi) {
        self.inner.state().faults.remove(&api);
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

// ---------------------------------------------------------------------------------------------------------
// Dispatch

/// The shared-LB collections Open Telekom Cloud serves at `/v2.0/lbaas/<collection>`.
#[derive(Clone, Copy)]
enum LbaasCollection {
    Listeners,
    LoadBalancers,
    Pools,
    L7Policies,
}

impl LbaasCollection {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "listeners" => Self::Listeners,
            "loadbalancers" => Self::LoadBalancers,
            "pools" => Self::Pools,
            "l7policies" => Self::L7Policies,
            _ => return None,
        })
    }
}

enum Endpoint {
    Projects,
    AuthProjects,
    /// `/v2.0/lbaas/<collection>`: shared-LB objects, OpenStack style (the project from `X-Project-Id`).
    Lbaas(LbaasCollection),
    ListenersV2(String),
    ListenersV3(String),
    /// Load balancers: `(v3, project id)`.
    LoadBalancers(bool, String),
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
            Endpoint::ListenersV2(_)
            | Endpoint::ListenersV3(_)
            | Endpoint::Lbaas(LbaasCollection::Listeners) => Some("elb:listeners:list"),
            Endpoint::LoadBalancers(..) | Endpoint::Lbaas(LbaasCollection::LoadBalancers) => {
                Some("elb:loadbalancers:list")
            }
            Endpoint::Pools(..) | Endpoint::Lbaas(LbaasCollection::Pools) => Some("elb:pools:list"),
            Endpoint::L7Policies(..) | Endpoint::Lbaas(LbaasCollection::L7Policies) => {
                Some("elb:l7policies:list")
            }
            Endpoint::BatchQuery(_) => Some("ces:metricData:list"),
        }
    }

    fn api(&self) -> SimApi {
        match self {
            Endpoint::Projects | Endpoint::AuthProjects => SimApi::Iam,
            Endpoint::ListenersV2(_) | Endpoint::Lbaas(_) => SimApi::ElbV2,
            Endpoint::ListenersV3(_) => SimApi::ElbV3,
            Endpoint::LoadBalancers(v3, _) if *v3 => SimApi::ElbV3,
            Endpoint::LoadBalancers(..) => SimApi::ElbV2,
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
        ["", "v2.0", "lbaas", c] if method == Method::GET => {
            Endpoint::Lbaas(LbaasCollection::parse(c)?)
        }
        ["", "v2", pid, "elb", "listeners"] if method == Method::GET => {
            Endpoint::ListenersV2(pid.to_string())
        }
        ["", "v3", pid, "elb", "listeners"] if method == Method::GET => {
            Endpoint::ListenersV3(pid.to_string())
        }
        ["", v @ ("v2" | "v3"), pid, "elb", "loadbalancers"] if method == Method::GET => {
            Endpoint::LoadBalancers(*v == "v3", pid.to_string())
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
        | Endpoint::LoadBalancers(_, p)
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

        let malformed = match self.apply_fault(ep.api(), rid).await {
            Ok(malformed) => malformed,
            Err(reply) => return reply,
        };
        if let Some(denied) = self.forbidden(ep, rid) {
            return denied;
        }
        let reply = self.answer(ep, headers, &body, rid, rec);
        if malformed { truncated(&reply) } else { reply }
    }

    /// Consumes the API's next queued fault: `Err` is the reply that replaces the call's, `Ok(true)`
    /// asks for the call's answer to be cut short (a delay has already been slept).
    async fn apply_fault(&self, api: SimApi, rid: &str) -> Result<bool, Reply> {
        match self.take_fault(api) {
            Some(Fault::Status { status, body, .. }) => Err(injected_status(status, body)),
            Some(Fault::Throttle {
                retry_after_secs, ..
            }) => {
                let mut reply = throttled(api, rid);
                reply.retry_after = retry_after_secs;
                Err(reply)
            }
            Some(Fault::Unavailable {
                retry_after_secs, ..
            }) => {
                let mut reply = unavailable(api, rid);
                reply.retry_after = retry_after_secs;
                Err(reply)
            }
            Some(Fault::Delay { delay, .. }) => {
                tokio::time::sleep(delay).await;
                Ok(false)
            }
            Some(Fault::Malformed { .. }) => Ok(true),
            None => Ok(false),
        }
    }

    /// The routing table: each endpoint to its handler.
    fn answer(
        &self,
        ep: &Endpoint,
        headers: &HeaderMap,
        body: &[u8],
        rid: &str,
        rec: &mut SimRequest,
    ) -> Reply {
        let query = parse_query(&rec.query);
        let host = header_str(headers, "host").unwrap_or("localhost");
        match ep {
            Endpoint::Projects => self.list_projects(&query, &rec.query, host),
            Endpoint::AuthProjects => self.list_projects(&[], &rec.query, host),
            Endpoint::ListenersV2(pid) => {
                self.list_listeners(false, pid, headers, &query, host, rid)
            }
            Endpoint::Lbaas(c) => {
                let pid = header_str(headers, "x-project-id").unwrap_or("").trim();
                let call = (false, pid, headers, &query[..], rid);
                match c {
                    LbaasCollection::Listeners => {
                        self.list_listeners(false, pid, headers, &query, host, rid)
                    }
                    LbaasCollection::LoadBalancers => self.list_loadbalancers(call),
                    LbaasCollection::Pools => self.list_pools(call),
                    LbaasCollection::L7Policies => self.list_l7policies(call),
                }
            }
            Endpoint::ListenersV3(pid) => {
                self.list_listeners(true, pid, headers, &query, host, rid)
            }
            Endpoint::LoadBalancers(v3, pid) => {
                self.list_loadbalancers((*v3, pid, headers, &query, rid))
            }
            Endpoint::BatchQuery(pid) => self.batch_query(pid, headers, body, rid, rec),
            Endpoint::Pools(v3, pid) => self.list_pools((*v3, pid, headers, &query, rid)),
            Endpoint::L7Policies(v3, pid) => self.list_l7policies((*v3, pid, headers, &query, rid)),
        }
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
}

/// The reply of a `Fault::Status`: its status and body as given.
fn injected_status(status: u16, body: String) -> Reply {
    // Only the code is read (other fields are skipped unparsed): bodies may be huge.
    #[derive(serde::Deserialize)]
    struct Code {
        error_code: Option<String>,
    }
    let code = (status >= 400)
        .then(|| serde_json::from_str::<Code>(&body).ok())
        .flatten()
        .and_then(|c| c.error_code);
    Reply {
        status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        body: Bytes::from(body),
        error_code: code,
        retry_after: None,
    }
}

/// A `Fault::Malformed` answer: 200 with the first half of the real body (at least one byte).
fn truncated(reply: &Reply) -> Reply {
    let cut = (reply.body.len() / 2).max(1);
    let body = if reply.body.len() > 1 {
        reply.body.slice(..cut)
    } else {
        Bytes::from_static(b"{")
    };
    Reply {
        status: StatusCode::OK,
        body,
        error_code: None,
        retry_after: None,
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
