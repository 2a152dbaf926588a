//! An in-process fake of the Kubernetes API server, limited to core/v1 Services and read-only over
//! HTTP (mutations go through [`FakeApiServer::apply`] / [`FakeApiServer::delete`]).
//!
//! The point is to exercise the real `kube` client and `kube::runtime::watcher` against the
//! apiserver's list/watch contract rather than against what the client happens to send, so the
//! behaviour follows upstream closely:
//!
//! * one cluster-global resourceVersion counter; lists carry it, items carry their own;
//! * paginated lists (`limit`/`continue`) are consistent snapshots at the first page's RV, rebuilt
//!   from the event history, and fail with 410 once that RV is compacted;
//! * `resourceVersion`/`resourceVersionMatch` semantics (unset, `0`, `NotOlderThan`, `Exact`,
//!   legacy `N`+`limit` = exact) and upstream's `ListOptions` validation (422 Invalid);
//! * watches replay history after the requested RV, answer a compacted RV with a 200 response holding
//!   one `ERROR` 410 event, emit synthetic `ADDED` events for RV unset/`0`, support bookmarks and
//!   streaming lists (`sendInitialEvents`, including upstream's defaulting of legacy watches when the
//!   WatchList feature is on), and translate selector transitions into `ADDED`/`DELETED` like the
//!   watch cache does;
//! * errors are `Status` objects with upstream's reasons and messages;
//! * `coordination.k8s.io/v1` Leases can be read, created and replaced (`get`/`create`/`update`, also
//!   listed), under optimistic concurrency: a replace carrying a stale `resourceVersion` gets upstream's
//!   409 Conflict Status, a create of an existing name 409 AlreadyExists. Leases share the cluster-global
//!   resourceVersion counter, as in etcd;
//! * each client can be told apart by its bearer token ([`FakeApiServer::write_kubeconfig_as`]) and one
//!   client's requests refused ([`FakeApiServer::set_refused`]), to cut one replica off the apiserver.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{Value, json};
use tokio::sync::oneshot;

mod ingress;

mod leases;
mod list;
mod selectors;
mod store;
#[cfg(test)]
mod tests;
mod watch;

use leases::{lease_group_list, lease_route};
use list::{Params, collection, parse_bool};
use store::Store;
use watch::{WatchMsg, watch_error_line};

/// How long a request for a resourceVersion newer than the store waits before giving up, as the
/// watch cache does (`resourceVersionTooHighRetrySeconds` is 1, the wait itself 3 s upstream).
const TOO_LARGE_RV_WAIT: Duration = Duration::from_secs(3);
const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);
const DEFAULT_HISTORY_LIMIT: usize = 10_000;

const REQUEST_LOG_LIMIT: usize = 100_000;

/// One HTTP request as seen by the fake, for tests to assert on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub watch: bool,
    pub status: u16,
}

/// Handle to the fake apiserver; clones share the same state.
#[derive(Clone)]
pub struct FakeApiServer {
    inner: Arc<Inner>,
}

struct Inner {
    store: Mutex<Store>,
    /// Mirrors `Store::rv` so requests for a future RV can wait for it without holding the lock.
    rv_tx: tokio::sync::watch::Sender<u64>,
    available: AtomicBool,
    /// Namespaces whose Services the client's RBAC does not allow it to read.
    forbidden: Mutex<HashSet<String>>,
    /// Bearer tokens whose requests are refused (one replica cut off the apiserver).
    refused: Mutex<HashSet<String>>,
    requests: Mutex<Vec<RequestRecord>>,
    listeners: Mutex<Vec<Listener>>,
    /// networking.k8s.io/v1 Ingresses (see [`ingress`]).
    ingresses: Mutex<ingress::IngressStore>,
}

struct Listener {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
}

impl Default for FakeApiServer {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeApiServer {
    pub fn new() -> Self {
        let (rv_tx, _) = tokio::sync::watch::channel(0);
        Self {
            inner: Arc::new(Inner {
                store: Mutex::new(Store {
                    rv: 0,
                    oldest_valid: 0,
                    objects: BTreeMap::new(),
                    leases: BTreeMap::new(),
                    history: VecDeque::new(),
                    history_limit: DEFAULT_HISTORY_LIMIT,
                    watches: HashMap::new(),
                    next_watch_id: 0,
                    next_uid: 0,
                    bookmark_interval: DEFAULT_BOOKMARK_INTERVAL,
                    streaming_lists: true,
                }),
                rv_tx,
                available: AtomicBool::new(true),
                forbidden: Mutex::new(HashSet::new()),
                refused: Mutex::new(HashSet::new()),
                requests: Mutex::new(Vec::new()),
                listeners: Mutex::new(Vec::new()),
                ingresses: Mutex::new(ingress::IngressStore::default()),
            }),
        }
    }

    /// How often watches that asked for `allowWatchBookmarks` get a BOOKMARK (upstream: ~1 min).
    /// Applies to watches opened afterwards.
    pub fn with_bookmark_interval(self, interval: Duration) -> Self {
        // A zero period would make tokio's interval panic.
        lock(&self.inner.store).bookmark_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Binds `addr`, serves on the current tokio runtime and returns the bound address.
    pub async fn serve(&self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let app = Router::new().fallback(handle).with_state(self.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            if let Err(err) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::warn!(%err, "fake apiserver stopped");
            }
        });
        lock(&self.inner.listeners).push(Listener { addr: local, stop });
        tracing::debug!(%local, "fake apiserver listening");
        Ok(local)
    }

    /// Stops accepting connections and cuts open watches; later requests see connection refused.
    /// `serve` may be called again (also on the old address) to simulate a restart.
    pub fn shutdown(&self) {
        self.drop_watches();
        for l in lock(&self.inner.listeners).drain(..) {
            let _ = l.stop.send(());
        }
    }

    pub fn addr(&self) -> Option<SocketAddr> {
        lock(&self.inner.listeners).last().map(|l| l.addr)
    }

    pub fn url(&self) -> Option<String> {
        self.addr().map(|a| format!("http://{a}"))
    }

    /// A kubeconfig whose current context points at this server (plain HTTP, dummy token).
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        self.write_kubeconfig_as(path, "fake-token")
    }

    /// Like [`FakeApiServer::write_kubeconfig`], for a client known by its own bearer `token`.
    pub fn write_kubeconfig_as(&self, path: &Path, token: &str) -> std::io::Result<()> {
        let url = self.url().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "fake apiserver is not serving; call serve() first",
            )
        })?;
        let doc = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "preferences": {},
            "clusters": [{"name": "fake", "cluster": {"server": url}}],
            "users": [{"name": "fake", "user": {"token": token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": "default"}}],
            "current-context": "fake",
        });
        let yaml = serde_yaml::to_string(&doc).map_err(std::io::Error::other)?;
        std::fs::write(path, yaml)
    }

    /// Client config for in-process use. Before `serve` it points at port 0, which refuses.
    /// Note kube retries 429/503/504 itself unless `default_retry` is turned off.
    pub fn client_config(&self) -> kube::Config {
        let url = self.url().unwrap_or_else(|| {
            tracing::warn!("client_config() before serve(); the client will not connect");
            "http://127.0.0.1:0".to_owned()
        });
        match url.parse() {
            Ok(uri) => kube::Config::new(uri),
            Err(_) => kube::Config::new(axum::http::Uri::from_static("http://127.0.0.1:0")),
        }
    }
}

impl FakeApiServer {
    /// Compacts and ends every open watch with the 410 `ERROR` event, as when etcd compaction
    /// overtakes a watch.
    pub fn expire_watches(&self) {
        let mut st = lock(&self.inner.store);
        let rv = st.compact();
        for (_, mut w) in st.watches.drain() {
            let line = watch_error_line(&ApiError::too_old(w.start_rv, rv));
            if w.tx.try_send(WatchMsg::Final(line)).is_err()
                && let Some(kill) = w.kill.take()
            {
                let _ = kill.send(());
            }
        }
        drop(st);
        self.inner.rv_tx.send_replace(rv);
    }

    /// Cuts every open watch mid-stream (no terminating chunk), like an apiserver restart.
    pub fn drop_watches(&self) {
        let mut st = lock(&self.inner.store);
        for (_, mut w) in st.watches.drain() {
            if let Some(kill) = w.kill.take() {
                let _ = kill.send(());
            }
        }
    }

    /// While unavailable every request gets 503 and open watches are cut, since a server that
    /// cannot answer cannot keep streaming either.
    pub fn set_available(&self, available: bool) {
        self.inner.available.store(available, Ordering::SeqCst);
        if !available {
            self.drop_watches();
        }
    }

    /// Models RBAC without the Role for `namespace`: every read of its Services gets the apiserver's
    /// 403 Status (list, watch, get); `false` grants it again.
    pub fn set_forbidden(&self, namespace: &str, forbidden: bool) {
        let mut f = lock(&self.inner.forbidden);
        if forbidden {
            f.insert(namespace.to_owned());
        } else {
            f.remove(namespace);
        }
    }

    /// Refuses (503, as an apiserver behind a failing load balancer) every request that carries bearer
    /// `token`, or serves it again; other clients are unaffected.
    pub fn set_refused(&self, token: &str, refused: bool) {
        let mut r = lock(&self.inner.refused);
        if refused {
            r.insert(token.to_owned());
        } else {
            r.remove(token);
        }
    }

    /// The stored Lease `namespace/name`.
    pub fn lease(&self, namespace: &str, name: &str) -> Option<Lease> {
        lock(&self.inner.store)
            .leases
            .get(&format!("{namespace}/{name}"))
            .cloned()
    }

    /// Requests in arrival order of their responses (watches: when the stream started). Past 100k
    /// entries the oldest half is discarded.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.inner.requests).clone()
    }

    pub fn clear_requests(&self) {
        lock(&self.inner.requests).clear();
    }

    pub fn resource_version(&self) -> u64 {
        lock(&self.inner.store).rv
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<Service> {
        lock(&self.inner.store)
            .objects
            .get(&format!("{namespace}/{name}"))
            .cloned()
    }

    pub fn services(&self) -> Vec<Service> {
        lock(&self.inner.store).objects.values().cloned().collect()
    }

    pub fn open_watches(&self) -> usize {
        lock(&self.inner.store).watches.len()
    }

    fn record_request(&self, rec: RequestRecord) {
        tracing::debug!(
            method = %rec.method,
            path = %rec.path,
            query = rec.query.as_deref().unwrap_or(""),
            watch = rec.watch,
            status = rec.status,
            "fake apiserver request"
        );
        let mut log = lock(&self.inner.requests);
        // Bounded so a long-running `demo` does not grow without limit.
        if log.len() >= REQUEST_LOG_LIMIT {
            log.drain(..REQUEST_LOG_LIMIT / 2);
        }
        log.push(rec);
    }

    async fn wait_for_rv(&self, want: u64) -> Result<(), ApiError> {
        let mut rx = self.inner.rv_tx.subscribe();
        let reached = tokio::time::timeout(TOO_LARGE_RV_WAIT, rx.wait_for(|rv| *rv >= want))
            .await
            .is_ok_and(|r| r.is_ok());
        if reached {
            Ok(())
        } else {
            Err(ApiError::too_large(want, *self.inner.rv_tx.borrow()))
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not take every later request down with it.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn now() -> Time {
    let ts = k8s_openapi::jiff::Timestamp::now();
    Time(k8s_openapi::jiff::Timestamp::from_second(ts.as_second()).unwrap_or(ts))
}

fn json_line(v: &Value) -> Bytes {
    let mut buf = serde_json::to_vec(v).unwrap_or_else(|err| {
        tracing::error!(%err, "cannot serialize watch event");
        b"{}".to_vec()
    });
    buf.push(b'\n');
    Bytes::from(buf)
}

fn to_value(svc: &Service) -> Value {
    serde_json::to_value(svc).unwrap_or_else(|err| {
        tracing::error!(%err, "cannot serialize Service");
        Value::Null
    })
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut resp = (status, body.to_string()).into_response();
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    resp
}

#[derive(Debug)]
struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
    details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    /// RBAC's answer, as kube-apiserver words it for a service account.
    fn forbidden(verb: &str, namespace: &str) -> Self {
        Self {
            details: Some(json!({"kind": "services"})),
            ..Self::new(
                403,
                "Forbidden",
                format!(
                    "services is forbidden: User \"system:serviceaccount:monitoring:elb-exporter\" cannot {verb} resource \"services\" in API group \"\" in the namespace \"{namespace}\""
                ),
            )
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    fn too_old(requested: u64, oldest: u64) -> Self {
        Self::new(
            410,
            "Expired",
            format!("too old resource version: {requested} ({oldest})"),
        )
    }

    fn too_large(requested: u64, current: u64) -> Self {
        Self {
            details: Some(json!({
                "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                "retryAfterSeconds": 1,
            })),
            ..Self::new(
                504,
                "Timeout",
                format!("Too large resource version: {requested}, current: {current}"),
            )
        }
    }

    fn invalid_rv(value: &str) -> Self {
        Self::bad_request(format!(
            "resourceVersion: Invalid value: \"{value}\": strconv.ParseUint: parsing \"{value}\": invalid syntax"
        ))
    }

    fn not_found() -> Self {
        Self {
            details: Some(json!({})),
            ..Self::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            )
        }
    }

    fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_response(status, &self.status())
    }
}

async fn handle(State(server): State<FakeApiServer>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let params = Params::parse(query.as_deref().unwrap_or(""));
    let watch = path.starts_with("/api/v1/watch/")
        || params
            .get("watch")
            .is_some_and(|v| parse_bool(v) == Some(true));
    let refused = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| lock(&server.inner.refused).contains(t));
    let body = axum::body::to_bytes(req.into_body(), 3 << 20)
        .await
        .unwrap_or_default();

    let resp = if server.inner.available.load(Ordering::SeqCst) && !refused {
        match lease_route(&server, &method, &path, &body) {
            Some(r) => r.unwrap_or_else(IntoResponse::into_response),
            None => route(&server, &method, &path, &params)
                .await
                .unwrap_or_else(IntoResponse::into_response),
        }
    } else {
        ApiError::new(
            503,
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
        )
        .into_response()
    };
    server.record_request(RequestRecord {
        method: method.to_string(),
        path,
        query,
        watch,
        status: resp.status().as_u16(),
    });
    resp
}

async fn route(
    server: &FakeApiServer,
    method: &Method,
    path: &str,
    params: &Params,
) -> Result<Response, ApiError> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if ingress::is_ingress_path(&segs) && method == Method::GET {
        return ingress::route(server, &segs, params);
    }
    let known = matches!(
        segs.as_slice(),
        ["version" | "api" | "apis" | "healthz" | "readyz" | "livez"]
            | ["api", "v1"]
            | ["api", "v1", "services"]
            | ["api", "v1", "watch", "services"]
            | ["api", "v1", "namespaces", _, "services"]
            | ["api", "v1", "watch", "namespaces", _, "services"]
            | ["api", "v1", "namespaces", _, "services", _]
    );
    if !known {
        return Err(ApiError::not_found());
    }
    if method != Method::GET {
        return Err(ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        ));
    }
    if let Some(err) = rbac_refusal(server, &segs, params) {
        return Err(err);
    }
    match segs.as_slice() {
        ["version"] => Ok(json_response(StatusCode::OK, &version_info())),
        ["api"] => Ok(json_response(StatusCode::OK, &api_versions(server))),
        ["apis"] => Ok(json_response(StatusCode::OK, &lease_group_list())),
        ["api", "v1"] => Ok(json_response(StatusCode::OK, &core_v1_resources())),
        ["healthz" | "readyz" | "livez"] => Ok((StatusCode::OK, "ok").into_response()),
        ["api", "v1", "namespaces", ns, "services", name] => get_one(server, ns, name),
        ["api", "v1", "services"] => collection(server, None, false, params).await,
        ["api", "v1", "watch", "services"] => collection(server, None, true, params).await,
        ["api", "v1", "namespaces", ns, "services"] => {
            collection(server, Some(ns), false, params).await
        }
        ["api", "v1", "watch", "namespaces", ns, "services"] => {
            collection(server, Some(ns), true, params).await
        }
        _ => Err(ApiError::not_found()),
    }
}

/// The 403 of a namespace refused by RBAC ([`FakeApiServer::set_forbidden`]), for its verb.
fn rbac_refusal(server: &FakeApiServer, segs: &[&str], params: &Params) -> Option<ApiError> {
    let (["api", "v1", "namespaces", ns, "services", ..]
    | ["api", "v1", "watch", "namespaces", ns, "services", ..]) = segs
    else {
        return None;
    };
    if !lock(&server.inner.forbidden).contains(*ns) {
        return None;
    }
    let verb = match (
        segs.len(),
        segs.get(2) == Some(&"watch")
            || params
                .get("watch")
                .is_some_and(|v| parse_bool(v) == Some(true)),
    ) {
        (_, true) => "watch",
        (6, _) => "get",
        _ => "list",
    };
    Some(ApiError::forbidden(verb, ns))
}

/// `GET /api`.
fn api_versions(server: &FakeApiServer) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{
            "clientCIDR": "0.0.0.0/0",
            "serverAddress": server.addr().map(|a| a.to_string()).unwrap_or_default(),
        }],
    })
}

/// `GET /api/v1`: the one resource served.
fn core_v1_resources() -> Value {
    json!({
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": [{
            "name": "services",
            "singularName": "service",
            "namespaced": true,
            "kind": "Service",
            "verbs": ["get", "list", "watch"],
            "shortNames": ["svc"],
        }],
    })
}

fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": "35",
        "gitVersion": "v1.35.0-fake",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn get_one(server: &FakeApiServer, ns: &str, name: &str) -> Result<Response, ApiError> {
    match server.get(ns, name) {
        Some(svc) => Ok(json_response(StatusCode::OK, &to_value(&svc))),
        None => Err(ApiError {
            details: Some(json!({"name": name, "kind": "services"})),
            ..ApiError::new(404, "NotFound", format!("services \"{name}\" not found"))
        }),
    }
}
