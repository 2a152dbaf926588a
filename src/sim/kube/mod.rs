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
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};

mod ingress;

/// How long a request for a resourceVersion newer than the store waits before giving up, as the
/// watch cache does (`resourceVersionTooHighRetrySeconds` is 1, the wait itself 3 s upstream).
const TOO_LARGE_RV_WAIT: Duration = Duration::from_secs(3);
const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);
const DEFAULT_HISTORY_LIMIT: usize = 10_000;
/// Per-watch queue. Like the cacher, a watcher that falls this far behind is closed rather than
/// buffered without bound; the client then resumes from its last RV.
const WATCH_QUEUE: usize = 1024;
const REQUEST_LOG_LIMIT: usize = 100_000;
const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

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
    rv_tx: watch::Sender<u64>,
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

/// Keys are `namespace/name`, which sorts like the etcd keys the real list walks.
type Key = String;

struct Store {
    rv: u64,
    /// Watches and exact reads may start from an RV `>= oldest_valid`; older ones are compacted.
    oldest_valid: u64,
    objects: BTreeMap<Key, Service>,
    leases: BTreeMap<Key, Lease>,
    history: VecDeque<Change>,
    history_limit: usize,
    watches: HashMap<u64, WatchSink>,
    next_watch_id: u64,
    next_uid: u64,
    bookmark_interval: Duration,
    streaming_lists: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

struct Change {
    rv: u64,
    kind: ChangeKind,
    /// State after the change; for a deletion, the last state stamped with the deletion RV.
    object: Service,
    prev: Option<Service>,
}

struct WatchSink {
    filter: Arc<Filter>,
    tx: mpsc::Sender<WatchMsg>,
    kill: Option<oneshot::Sender<()>>,
    start_rv: u64,
}

enum WatchMsg {
    Event {
        rv: u64,
        line: Bytes,
    },
    /// An event the watch's selector filtered out still advances the RV its bookmarks report.
    Progress(u64),
    /// Last line of the stream (the 410 error of `expire_watches`).
    Final(Bytes),
}

impl Default for FakeApiServer {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeApiServer {
    pub fn new() -> Self {
        let (rv_tx, _) = watch::channel(0);
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

    /// Creates or updates a Service (namespace defaults to "default") and notifies watches.
    /// Returns the stored object. An update that changes nothing is a no-op, as upstream.
    /// Removing the last finalizer of a terminating Service deletes it.
    pub fn apply(&self, mut svc: Service) -> Service {
        let mut st = lock(&self.inner.store);
        let ns = svc
            .metadata
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".to_owned());
        svc.metadata.namespace = Some(ns.clone());
        if svc.metadata.name.as_deref().unwrap_or_default().is_empty() {
            let prefix = svc
                .metadata
                .generate_name
                .clone()
                .unwrap_or_else(|| "service-".to_owned());
            st.next_uid += 1;
            svc.metadata.name = Some(format!("{prefix}{:05x}", st.next_uid));
        }
        let key = format!("{ns}/{}", svc.metadata.name.as_deref().unwrap_or_default());

        let stored = match st.objects.get(&key).cloned() {
            Some(old) => {
                // Server-owned metadata survives whatever the caller sent.
                svc.metadata.uid.clone_from(&old.metadata.uid);
                svc.metadata
                    .creation_timestamp
                    .clone_from(&old.metadata.creation_timestamp);
                svc.metadata
                    .deletion_timestamp
                    .clone_from(&old.metadata.deletion_timestamp);
                svc.metadata.deletion_grace_period_seconds =
                    old.metadata.deletion_grace_period_seconds;
                svc.metadata
                    .resource_version
                    .clone_from(&old.metadata.resource_version);
                if svc == old {
                    return old;
                }
                let rv = st.next_rv();
                svc.metadata.resource_version = Some(rv.to_string());
                st.objects.insert(key.clone(), svc.clone());
                st.record(Change {
                    rv,
                    kind: ChangeKind::Modified,
                    object: svc.clone(),
                    prev: Some(old),
                });
                let terminating = svc.metadata.deletion_timestamp.is_some();
                if terminating && svc.metadata.finalizers.as_ref().is_none_or(Vec::is_empty) {
                    st.remove(&key);
                }
                svc
            }
            None => {
                st.next_uid += 1;
                let n = st.next_uid;
                svc.metadata.uid = Some(format!("5e1f0000-0000-4000-8000-{n:012x}"));
                svc.metadata.creation_timestamp = Some(now());
                svc.metadata.deletion_timestamp = None;
                svc.metadata.deletion_grace_period_seconds = None;
                let rv = st.next_rv();
                svc.metadata.resource_version = Some(rv.to_string());
                st.objects.insert(key, svc.clone());
                st.record(Change {
                    rv,
                    kind: ChangeKind::Added,
                    object: svc.clone(),
                    prev: None,
                });
                svc
            }
        };
        let rv = st.rv;
        drop(st);
        self.inner.rv_tx.send_replace(rv);
        stored
    }

    /// Deletes a Service; returns whether it existed. With finalizers it only becomes terminating
    /// (MODIFIED with `deletionTimestamp`) until an `apply` removes them.
    pub fn delete(&self, namespace: &str, name: &str) -> bool {
        let key = format!("{namespace}/{name}");
        let mut st = lock(&self.inner.store);
        let Some(old) = st.objects.get(&key).cloned() else {
            return false;
        };
        if old
            .metadata
            .finalizers
            .as_ref()
            .is_some_and(|f| !f.is_empty())
        {
            if old.metadata.deletion_timestamp.is_none() {
                let mut svc = old.clone();
                svc.metadata.deletion_timestamp = Some(now());
                svc.metadata.deletion_grace_period_seconds = Some(0);
                let rv = st.next_rv();
                svc.metadata.resource_version = Some(rv.to_string());
                st.objects.insert(key, svc.clone());
                st.record(Change {
                    rv,
                    kind: ChangeKind::Modified,
                    object: svc,
                    prev: Some(old),
                });
            }
        } else {
            st.remove(&key);
        }
        let rv = st.rv;
        drop(st);
        self.inner.rv_tx.send_replace(rv);
        true
    }

    /// Expires every resourceVersion up to the current one. Open watches keep running (the watch
    /// cache is unaffected), but resuming from, or reading exactly at, an older RV gets 410.
    pub fn compact(&self) {
        let rv = lock(&self.inner.store).compact();
        self.inner.rv_tx.send_replace(rv);
    }

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

impl Store {
    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn compact(&mut self) -> u64 {
        // The real RV is etcd's global revision, which other resources keep advancing. Without that
        // bump, "everything up to now is expired" would also expire the RV a fresh list returns and
        // the watcher would relist forever.
        self.rv += 1;
        self.oldest_valid = self.rv;
        self.history.clear();
        self.rv
    }

    fn remove(&mut self, key: &str) {
        if let Some(old) = self.objects.remove(key) {
            let rv = self.next_rv();
            let mut gone = old.clone();
            gone.metadata.resource_version = Some(rv.to_string());
            self.record(Change {
                rv,
                kind: ChangeKind::Deleted,
                object: gone,
                prev: Some(old),
            });
        }
    }

    fn record(&mut self, change: Change) {
        let mut closed = Vec::new();
        for (id, w) in &self.watches {
            let (msg, essential) = match render_change(&change, &w.filter) {
                Some(line) => (
                    WatchMsg::Event {
                        rv: change.rv,
                        line,
                    },
                    true,
                ),
                None => (WatchMsg::Progress(change.rv), false),
            };
            match w.tx.try_send(msg) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) if !essential => {}
                Err(_) => closed.push(*id),
            }
        }
        for id in closed {
            // Dropping the sender ends the stream cleanly once the queue drains, which is what the
            // cacher does to a watcher that cannot keep up.
            tracing::debug!(id, "closing unresponsive watch");
            self.watches.remove(&id);
        }
        self.history.push_back(change);
        self.trim_history();
    }

    fn trim_history(&mut self) {
        while self.history.len() > self.history_limit {
            if let Some(evicted) = self.history.pop_front() {
                self.oldest_valid = self.oldest_valid.max(evicted.rv);
            }
        }
    }

    /// The object set as it was at `rv`, rebuilt by undoing newer history.
    fn snapshot_at(&self, rv: u64) -> Result<BTreeMap<Key, Service>, ApiError> {
        if rv < self.oldest_valid {
            return Err(ApiError::too_old(rv, self.oldest_valid));
        }
        let mut objects = self.objects.clone();
        for c in self.history.iter().rev().take_while(|c| c.rv > rv) {
            let key = key_of(&c.object);
            match &c.prev {
                Some(prev) => objects.insert(key, prev.clone()),
                None => objects.remove(&key),
            };
        }
        Ok(objects)
    }
}

fn key_of(svc: &Service) -> Key {
    format!(
        "{}/{}",
        svc.metadata.namespace.as_deref().unwrap_or_default(),
        svc.metadata.name.as_deref().unwrap_or_default()
    )
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not take every later request down with it.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn now() -> Time {
    let ts = k8s_openapi::jiff::Timestamp::now();
    Time(k8s_openapi::jiff::Timestamp::from_second(ts.as_second()).unwrap_or(ts))
}

// ---------------------------------------------------------------------------------------------
// Wire format

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

fn event_line(kind: &str, svc: &Service) -> Bytes {
    json_line(&json!({"type": kind, "object": to_value(svc)}))
}

fn bookmark_line(rv: u64, initial_events_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({INITIAL_EVENTS_END: "true"});
    }
    json_line(&json!({
        "type": "BOOKMARK",
        "object": {"kind": "Service", "apiVersion": "v1", "metadata": metadata},
    }))
}

fn watch_error_line(err: &ApiError) -> Bytes {
    json_line(&json!({"type": "ERROR", "object": err.status()}))
}

/// What one watch sees of a change, following the watch cache: an object entering the selector
/// is ADDED, one leaving it is DELETED (old content, new RV).
fn render_change(change: &Change, filter: &Filter) -> Option<Bytes> {
    let cur = change.kind != ChangeKind::Deleted && filter.matches(&change.object);
    let old = change.prev.as_ref().is_some_and(|p| filter.matches(p));
    match (cur, old) {
        (true, false) => Some(event_line("ADDED", &change.object)),
        (true, true) => Some(event_line("MODIFIED", &change.object)),
        (false, true) => {
            let mut gone = change.prev.clone()?;
            gone.metadata.resource_version = Some(change.rv.to_string());
            Some(event_line("DELETED", &gone))
        }
        (false, false) => None,
    }
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

// ---------------------------------------------------------------------------------------------
// Request handling

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
    if let ["api", "v1", "namespaces", ns, "services", ..]
    | ["api", "v1", "watch", "namespaces", ns, "services", ..] = segs.as_slice()
        && lock(&server.inner.forbidden).contains(*ns)
    {
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
        return Err(ApiError::forbidden(verb, ns));
    }
    match segs.as_slice() {
        ["version"] => Ok(json_response(StatusCode::OK, &version_info())),
        ["api"] => Ok(json_response(
            StatusCode::OK,
            &json!({
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [{
                    "clientCIDR": "0.0.0.0/0",
                    "serverAddress": server.addr().map(|a| a.to_string()).unwrap_or_default(),
                }],
            }),
        )),
        ["apis"] => Ok(json_response(StatusCode::OK, &lease_group_list())),
        ["api", "v1"] => Ok(json_response(
            StatusCode::OK,
            &json!({
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
            }),
        )),
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

// ---------------------------------------------------------------------------------------------
// coordination.k8s.io/v1 Leases

const LEASE_GROUP: &str = "coordination.k8s.io";

fn lease_group_list() -> Value {
    let gv = json!({"groupVersion": "coordination.k8s.io/v1", "version": "v1"});
    json!({
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [{"name": LEASE_GROUP, "versions": [gv.clone()], "preferredVersion": gv}],
    })
}

fn lease_resources() -> Value {
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": "coordination.k8s.io/v1",
        "resources": [{
            "name": "leases",
            "singularName": "lease",
            "namespaced": true,
            "kind": "Lease",
            "verbs": ["create", "delete", "get", "list", "update"],
        }],
    })
}

/// Upstream's Status for a Lease by name (404 NotFound, 409 AlreadyExists / Conflict).
fn lease_error(code: u16, reason: &'static str, name: &str) -> ApiError {
    let message = match reason {
        "NotFound" => format!("leases.coordination.k8s.io \"{name}\" not found"),
        "AlreadyExists" => format!("leases.coordination.k8s.io \"{name}\" already exists"),
        _ => format!(
            "Operation cannot be fulfilled on leases.coordination.k8s.io \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
        ),
    };
    ApiError {
        details: Some(json!({"name": name, "group": LEASE_GROUP, "kind": "leases"})),
        ..ApiError::new(code, reason, message)
    }
}

/// The Lease routes; `None` for any other path.
fn lease_route(
    server: &FakeApiServer,
    method: &Method,
    path: &str,
    body: &[u8],
) -> Option<Result<Response, ApiError>> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let not_allowed = || {
        Err(ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        ))
    };
    Some(match (segs.as_slice(), method.as_str()) {
        (["apis", LEASE_GROUP], "GET") => Ok(json_response(
            StatusCode::OK,
            &lease_group_list()["groups"][0],
        )),
        (["apis", LEASE_GROUP, "v1"], "GET") => {
            Ok(json_response(StatusCode::OK, &lease_resources()))
        }
        (["apis", LEASE_GROUP, "v1", "namespaces", ns, "leases"], "GET") => {
            let st = lock(&server.inner.store);
            let items: Vec<Value> = st
                .leases
                .iter()
                .filter(|(k, _)| k.split_once('/').is_some_and(|(n, _)| n == *ns))
                .map(|(_, l)| serde_json::to_value(l).unwrap_or(Value::Null))
                .collect();
            Ok(json_response(
                StatusCode::OK,
                &json!({"kind": "LeaseList", "apiVersion": "coordination.k8s.io/v1",
                        "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
            ))
        }
        (["apis", LEASE_GROUP, "v1", "namespaces", ns, "leases"], "POST") => {
            parse_lease(body).and_then(|l| server.write_lease(ns, None, l))
        }
        (["apis", LEASE_GROUP, "v1", "namespaces", ns, "leases", name], "GET") => server
            .lease(ns, name)
            .map(|l| json_response(StatusCode::OK, &lease_value(&l)))
            .ok_or_else(|| lease_error(404, "NotFound", name)),
        (["apis", LEASE_GROUP, "v1", "namespaces", ns, "leases", name], "PUT") => {
            parse_lease(body).and_then(|l| server.write_lease(ns, Some(name), l))
        }
        (["apis", LEASE_GROUP, ..], _) => not_allowed(),
        _ => return None,
    })
}

fn lease_value(l: &Lease) -> Value {
    let mut v = serde_json::to_value(l).unwrap_or(Value::Null);
    v["kind"] = json!("Lease");
    v["apiVersion"] = json!("coordination.k8s.io/v1");
    v
}

fn parse_lease(body: &[u8]) -> Result<Lease, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the body of the request was in an unknown format: {e}"
        ))
    })
}

impl FakeApiServer {
    /// Create (`name` None: POST) or replace (PUT) a Lease with upstream's checks: namespace and name
    /// must match the path, `leaseDurationSeconds` > 0, and a `resourceVersion` other than the stored
    /// one is a 409 Conflict. Leases allow create-on-update and unconditional update, as upstream.
    fn write_lease(
        &self,
        ns: &str,
        name: Option<&str>,
        mut lease: Lease,
    ) -> Result<Response, ApiError> {
        if lease.metadata.namespace.as_deref().is_some_and(|n| n != ns) {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let obj_name = lease.metadata.name.clone().unwrap_or_default();
        if name.is_some_and(|n| n != obj_name) {
            return Err(ApiError::bad_request(
                "the name of the object does not match the name on the URL",
            ));
        }
        if let Some(d) = lease.spec.as_ref().and_then(|s| s.lease_duration_seconds)
            && d <= 0
        {
            return Err(ApiError {
                details: Some(json!({"name": obj_name, "group": LEASE_GROUP, "kind": "Lease"})),
                ..ApiError::new(
                    422,
                    "Invalid",
                    format!(
                        "Lease.coordination.k8s.io \"{obj_name}\" is invalid: spec.leaseDurationSeconds: Invalid value: {d}: must be greater than 0"
                    ),
                )
            });
        }
        let key = format!("{ns}/{obj_name}");
        let mut st = lock(&self.inner.store);
        let sent_rv = lease
            .metadata
            .resource_version
            .take()
            .filter(|v| !v.is_empty());
        let status = match (st.leases.get(&key), name) {
            (Some(_), None) => return Err(lease_error(409, "AlreadyExists", &obj_name)),
            (None, Some(_)) if sent_rv.is_some() => {
                return Err(lease_error(404, "NotFound", &obj_name));
            }
            (Some(old), Some(_)) => {
                if sent_rv.is_some() && sent_rv != old.metadata.resource_version {
                    return Err(lease_error(409, "Conflict", &obj_name));
                }
                lease.metadata.uid.clone_from(&old.metadata.uid);
                lease
                    .metadata
                    .creation_timestamp
                    .clone_from(&old.metadata.creation_timestamp);
                lease
                    .metadata
                    .resource_version
                    .clone_from(&old.metadata.resource_version);
                if lease == *old {
                    return Ok(json_response(StatusCode::OK, &lease_value(old)));
                }
                StatusCode::OK
            }
            (None, _) => {
                st.next_uid += 1;
                lease.metadata.uid = Some(format!("1ea5e000-0000-4000-8000-{:012x}", st.next_uid));
                lease.metadata.creation_timestamp = Some(now());
                StatusCode::CREATED
            }
        };
        lease.metadata.namespace = Some(ns.to_owned());
        let rv = st.next_rv();
        lease.metadata.resource_version = Some(rv.to_string());
        st.leases.insert(key, lease.clone());
        drop(st);
        self.inner.rv_tx.send_replace(rv);
        Ok(json_response(status, &lease_value(&lease)))
    }
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

/// Query parameters in order; like Go's `url.Values.Get`, lookups take the first occurrence.
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(query: &str) -> Self {
        let decode = |s: &str| {
            let s = s.replace('+', " ");
            percent_encoding::percent_decode_str(&s)
                .decode_utf8_lossy()
                .into_owned()
        };
        Self(
            query
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (decode(k), decode(v))
                })
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Empty values count as unset, as in the apiserver's query decoding.
    fn get_set(&self, key: &str) -> Option<&str> {
        self.get(key).filter(|v| !v.is_empty())
    }
}

/// Go's `strconv.ParseBool`.
fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

struct ListOptions {
    watch: bool,
    resource_version: Option<String>,
    rv_match: Option<String>,
    limit: Option<u64>,
    continue_token: Option<String>,
    timeout: Option<Duration>,
    allow_bookmarks: bool,
    send_initial_events: Option<bool>,
}

impl ListOptions {
    fn parse(params: &Params, watch_path: bool) -> Result<Self, ApiError> {
        let boolean = |key: &str| -> Result<Option<bool>, ApiError> {
            params
                .get_set(key)
                .map(|v| {
                    parse_bool(v).ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "{key}: strconv.ParseBool: parsing \"{v}\": invalid syntax"
                        ))
                    })
                })
                .transpose()
        };
        let int = |key: &str| -> Result<Option<i64>, ApiError> {
            params
                .get_set(key)
                .map(|v| {
                    v.parse::<i64>().map_err(|_| {
                        ApiError::bad_request(format!(
                            "{key}: strconv.ParseInt: parsing \"{v}\": invalid syntax"
                        ))
                    })
                })
                .transpose()
        };
        Ok(Self {
            watch: watch_path || boolean("watch")?.unwrap_or(false),
            resource_version: params.get_set("resourceVersion").map(str::to_owned),
            rv_match: params.get_set("resourceVersionMatch").map(str::to_owned),
            limit: int("limit")?
                .and_then(|l| u64::try_from(l).ok())
                .filter(|&l| l > 0),
            continue_token: params.get_set("continue").map(str::to_owned),
            timeout: int("timeoutSeconds")?
                .and_then(|t| u64::try_from(t).ok())
                .filter(|&t| t > 0)
                .map(Duration::from_secs),
            allow_bookmarks: boolean("allowWatchBookmarks")?.unwrap_or(false),
            send_initial_events: boolean("sendInitialEvents")?,
        })
    }

    /// Upstream `SetListOptionsDefaults`: with WatchList on, a legacy watch from RV unset/"0" is
    /// served as a streaming list.
    fn apply_defaults(&mut self, watch_list_enabled: bool) {
        let legacy = matches!(self.resource_version.as_deref(), None | Some("0"));
        if watch_list_enabled
            && self.watch
            && legacy
            && self.send_initial_events.is_none()
            && self.rv_match.is_none()
        {
            self.send_initial_events = Some(true);
            self.rv_match = Some("NotOlderThan".to_owned());
        }
    }

    /// Upstream `ValidateListOptions`, reported as a 422 on `ListOptions.meta.k8s.io`.
    fn validate(&self, watch_list_enabled: bool) -> Result<(), ApiError> {
        let mut errs: Vec<(&str, &str, String)> = Vec::new();
        let forbidden = |field: &'static str, detail: &str| {
            (field, "FieldValueForbidden", format!("Forbidden: {detail}"))
        };
        let m = self.rv_match.as_deref();
        if self.watch {
            if self.send_initial_events.is_some() {
                if m != Some("NotOlderThan") {
                    errs.push(forbidden(
                        "resourceVersionMatch",
                        "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
                    ));
                }
                if !watch_list_enabled {
                    errs.push(forbidden(
                        "sendInitialEvents",
                        "sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled",
                    ));
                }
            }
            if let Some(m) = m {
                if self.send_initial_events.is_none() {
                    errs.push(forbidden(
                        "resourceVersionMatch",
                        "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
                    ));
                }
                if m != "NotOlderThan" {
                    errs.push((
                        "resourceVersionMatch",
                        "FieldValueNotSupported",
                        format!("Unsupported value: \"{m}\": supported values: \"NotOlderThan\""),
                    ));
                }
                if self.continue_token.is_some() {
                    errs.push(forbidden(
                        "resourceVersionMatch",
                        "resourceVersionMatch is forbidden when continue is provided",
                    ));
                }
            }
        } else {
            if let Some(m) = m {
                if self.resource_version.is_none() {
                    errs.push(forbidden(
                        "resourceVersionMatch",
                        "resourceVersionMatch is forbidden unless resourceVersion is provided",
                    ));
                }
                if self.continue_token.is_some() {
                    errs.push(forbidden(
                        "resourceVersionMatch",
                        "resourceVersionMatch is forbidden when continue is provided",
                    ));
                }
                if m != "Exact" && m != "NotOlderThan" {
                    errs.push((
                        "resourceVersionMatch",
                        "FieldValueNotSupported",
                        format!(
                            "Unsupported value: \"{m}\": supported values: \"Exact\", \"NotOlderThan\", \"\""
                        ),
                    ));
                }
                if m == "Exact" && self.resource_version.as_deref() == Some("0") {
                    errs.push(forbidden(
                        "resourceVersionMatch",
                        "resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
                    ));
                }
            }
            if self.send_initial_events.is_some() {
                errs.push(forbidden(
                    "sendInitialEvents",
                    "sendInitialEvents is forbidden for list",
                ));
            }
        }
        if errs.is_empty() {
            return Ok(());
        }
        let texts: Vec<String> = errs.iter().map(|(f, _, m)| format!("{f}: {m}")).collect();
        let joined = if texts.len() == 1 {
            texts.join("")
        } else {
            format!("[{}]", texts.join(", "))
        };
        let causes: Vec<Value> = errs
            .iter()
            .map(|(f, r, m)| json!({"reason": r, "message": m, "field": f}))
            .collect();
        Err(ApiError {
            details: Some(json!({"group": "meta.k8s.io", "kind": "ListOptions", "causes": causes})),
            ..ApiError::new(
                422,
                "Invalid",
                format!("ListOptions.meta.k8s.io \"\" is invalid: {joined}"),
            )
        })
    }
}

#[derive(Clone, Copy)]
enum Rv {
    Unset,
    Zero,
    At(u64),
}

fn parse_rv(v: Option<&str>) -> Result<Rv, ApiError> {
    match v {
        None => Ok(Rv::Unset),
        Some(s) => match s.parse::<u64>() {
            Ok(0) => Ok(Rv::Zero),
            Ok(n) => Ok(Rv::At(n)),
            Err(_) => Err(ApiError::invalid_rv(s)),
        },
    }
}

async fn collection(
    server: &FakeApiServer,
    namespace: Option<&str>,
    watch_path: bool,
    params: &Params,
) -> Result<Response, ApiError> {
    let mut opts = ListOptions::parse(params, watch_path)?;
    let streaming = lock(&server.inner.store).streaming_lists;
    opts.apply_defaults(streaming);
    opts.validate(streaming)?;
    let filter = Filter::parse(
        namespace,
        params.get_set("labelSelector"),
        params.get_set("fieldSelector"),
    )?;
    for (k, _) in &params.0 {
        if !KNOWN_PARAMS.contains(&k.as_str()) {
            tracing::debug!(param = %k, "fake apiserver ignores query parameter");
        }
    }
    if opts.watch {
        start_watch(server, filter, &opts).await
    } else {
        list(server, &filter, &opts).await
    }
}

const KNOWN_PARAMS: &[&str] = &[
    "watch",
    "resourceVersion",
    "resourceVersionMatch",
    "limit",
    "continue",
    "timeoutSeconds",
    "allowWatchBookmarks",
    "sendInitialEvents",
    "labelSelector",
    "fieldSelector",
];

// ---------------------------------------------------------------------------------------------
// List

async fn list(
    server: &FakeApiServer,
    filter: &Filter,
    opts: &ListOptions,
) -> Result<Response, ApiError> {
    let rv = parse_rv(opts.resource_version.as_deref())?;
    if let Some(token) = &opts.continue_token {
        if matches!(rv, Rv::At(_)) {
            return Err(ApiError::bad_request(
                "specifying resource version is not allowed when using continue",
            ));
        }
        let (snapshot_rv, start) = decode_continue(token)?;
        let st = lock(&server.inner.store);
        if snapshot_rv > st.rv {
            return Err(ApiError::bad_request(
                "continue key is not valid: resource version is in the future",
            ));
        }
        let snapshot = st.snapshot_at(snapshot_rv).map_err(|_| {
            ApiError::new(
                410,
                "Expired",
                "The provided continue parameter is too old to display a consistent list result. \
                 You can start a new list without the continue parameter, or use the continue value \
                 from the response to get the next page of results.",
            )
        })?;
        drop(st);
        return Ok(page(
            &snapshot,
            Some(&start),
            filter,
            opts.limit,
            snapshot_rv,
        ));
    }

    let exact = match (rv, opts.rv_match.as_deref()) {
        (Rv::At(n), Some("Exact")) => Some(n),
        // Legacy semantics: a non-zero RV with a limit reads exactly at that RV.
        (Rv::At(n), None) if opts.limit.is_some() => Some(n),
        _ => None,
    };
    if let Rv::At(n) = rv {
        server.wait_for_rv(n).await?;
    }
    let st = lock(&server.inner.store);
    Ok(match (exact, rv) {
        (Some(n), _) => {
            let snapshot = st.snapshot_at(n)?;
            drop(st);
            page(&snapshot, None, filter, opts.limit, n)
        }
        // "Any" is served by the watch cache, which ignores limit.
        (None, Rv::Zero) => page(&st.objects, None, filter, None, st.rv),
        (None, _) => page(&st.objects, None, filter, opts.limit, st.rv),
    })
}

fn page(
    objects: &BTreeMap<Key, Service>,
    after: Option<&str>,
    filter: &Filter,
    limit: Option<u64>,
    list_rv: u64,
) -> Response {
    use std::ops::Bound;
    let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
    let mut matching = objects
        .range::<str, _>((lower, Bound::Unbounded))
        .filter(|(_, svc)| filter.matches(svc));
    let limit = limit.map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
    let mut items = Vec::new();
    let mut last_key = None;
    for (key, svc) in matching.by_ref().take(limit) {
        let mut v = to_value(svc);
        // List items carry no kind/apiVersion on the wire; the list does.
        if let Some(obj) = v.as_object_mut() {
            obj.remove("kind");
            obj.remove("apiVersion");
        }
        items.push(v);
        last_key = Some(key.clone());
    }
    let remaining = matching.count();
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if remaining > 0
        && let Some(last) = last_key
    {
        metadata["continue"] = Value::String(encode_continue(list_rv, &last));
        // Upstream only counts when no selector forces a filtered walk.
        if filter.labels.is_empty() && filter.fields.is_empty() {
            metadata["remainingItemCount"] = json!(remaining);
        }
    }
    json_response(
        StatusCode::OK,
        &json!({"kind": "ServiceList", "apiVersion": "v1", "metadata": metadata, "items": items}),
    )
}

/// Opaque to clients; shaped like upstream's token (`{"v","rv","start"}`), hex- rather than
/// base64-encoded.
fn encode_continue(rv: u64, last_key: &str) -> String {
    let token = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": format!("{last_key}\u{0}")});
    hex::encode(token.to_string())
}

fn decode_continue(token: &str) -> Result<(u64, String), ApiError> {
    let invalid = |why: &str| ApiError::bad_request(format!("continue key is not valid: {why}"));
    let raw = hex::decode(token).map_err(|_| invalid("not a continue token"))?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| invalid("not a continue token"))?;
    if v["v"] != "meta.k8s.io/v1" {
        return Err(invalid(
            "incorrect encoded start resourceVersion (version meta.k8s.io/v1)",
        ));
    }
    let rv = v["rv"]
        .as_u64()
        .filter(|&rv| rv > 0)
        .ok_or_else(|| invalid("incorrect encoded start resourceVersion"))?;
    let start = v["start"]
        .as_str()
        .and_then(|s| s.strip_suffix('\u{0}'))
        .filter(|s| s.contains('/'))
        .ok_or_else(|| invalid("invalid start key"))?;
    Ok((rv, start.to_owned()))
}

// ---------------------------------------------------------------------------------------------
// Watch

async fn start_watch(
    server: &FakeApiServer,
    filter: Filter,
    opts: &ListOptions,
) -> Result<Response, ApiError> {
    let rv = parse_rv(opts.resource_version.as_deref())?;
    if let Rv::At(n) = rv {
        server.wait_for_rv(n).await?;
    }
    let filter = Arc::new(filter);
    let (tx, rx) = mpsc::channel(WATCH_QUEUE);
    let (kill_tx, kill_rx) = oneshot::channel();

    let mut st = lock(&server.inner.store);
    let mut pre = VecDeque::new();
    let start_rv = match (opts.send_initial_events, rv) {
        (Some(true), _) | (None, Rv::Unset | Rv::Zero) => {
            for svc in st.objects.values().filter(|s| filter.matches(s)) {
                pre.push_back(event_line("ADDED", svc));
            }
            if opts.send_initial_events == Some(true) && opts.allow_bookmarks {
                pre.push_back(bookmark_line(st.rv, true));
            }
            st.rv
        }
        (Some(false), _) => st.rv,
        (None, Rv::At(n)) => {
            if n < st.oldest_valid {
                let err = ApiError::too_old(n, st.oldest_valid);
                drop(st);
                let body = futures::stream::once(async move {
                    Ok::<_, std::io::Error>(watch_error_line(&err))
                });
                return Ok(watch_response(Body::from_stream(body)));
            }
            for c in st.history.iter().filter(|c| c.rv > n) {
                if let Some(line) = render_change(c, &filter) {
                    pre.push_back(line);
                }
            }
            st.rv
        }
    };
    st.next_watch_id += 1;
    let id = st.next_watch_id;
    st.watches.insert(
        id,
        WatchSink {
            filter,
            tx,
            kill: Some(kill_tx),
            start_rv: match rv {
                Rv::At(n) => n,
                _ => start_rv,
            },
        },
    );
    let bookmark_interval = st.bookmark_interval;
    drop(st);

    let bookmarks = opts.allow_bookmarks.then(|| {
        let mut i = tokio::time::interval_at(
            tokio::time::Instant::now() + bookmark_interval,
            bookmark_interval,
        );
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    let stream = WatchStream {
        pre,
        rx,
        kill: Some(kill_rx),
        // `timeoutSeconds` is client input; one too large to represent means no deadline.
        deadline: opts
            .timeout
            .and_then(|t| tokio::time::Instant::now().checked_add(t)),
        bookmarks,
        progress: start_rv,
        finished: false,
        _guard: WatchGuard {
            inner: Arc::downgrade(&server.inner),
            id,
        },
    };
    let body = futures::stream::unfold(stream, |mut s| async move {
        let item = s.next_item().await?;
        Some((item, s))
    });
    Ok(watch_response(Body::from_stream(body)))
}

fn watch_response(body: Body) -> Response {
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    resp
}

/// Deregisters the watch when hyper drops the body (client went away or stream ended).
struct WatchGuard {
    inner: Weak<Inner>,
    id: u64,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            lock(&inner.store).watches.remove(&self.id);
        }
    }
}

struct WatchStream {
    pre: VecDeque<Bytes>,
    rx: mpsc::Receiver<WatchMsg>,
    kill: Option<oneshot::Receiver<()>>,
    deadline: Option<tokio::time::Instant>,
    bookmarks: Option<tokio::time::Interval>,
    /// Newest RV this watch has caught up with; what its bookmarks report.
    progress: u64,
    finished: bool,
    _guard: WatchGuard,
}

enum Wake {
    Killed,
    KillGone,
    Timeout,
    Msg(Option<WatchMsg>),
    Bookmark,
}

impl WatchStream {
    async fn next_item(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        if self.finished {
            return None;
        }
        if let Some(line) = self.pre.pop_front() {
            return Some(Ok(line));
        }
        loop {
            let wake = {
                let Self {
                    rx,
                    kill,
                    deadline,
                    bookmarks,
                    ..
                } = self;
                tokio::select! {
                    biased;
                    r = async {
                        match kill.as_mut() {
                            Some(k) => k.await,
                            None => std::future::pending().await,
                        }
                    } => if r.is_ok() { Wake::Killed } else { Wake::KillGone },
                    () = async {
                        match deadline {
                            Some(d) => tokio::time::sleep_until(*d).await,
                            None => std::future::pending().await,
                        }
                    } => Wake::Timeout,
                    m = rx.recv() => Wake::Msg(m),
                    () = async {
                        match bookmarks.as_mut() {
                            Some(i) => { i.tick().await; }
                            None => std::future::pending::<()>().await,
                        }
                    } => Wake::Bookmark,
                }
            };
            match wake {
                Wake::Killed => {
                    self.finished = true;
                    // An error makes hyper drop the connection without the final chunk, which is
                    // what a client sees when the apiserver goes away mid-watch.
                    return Some(Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "watch dropped by fake apiserver",
                    )));
                }
                Wake::KillGone => self.kill = None,
                Wake::Timeout | Wake::Msg(None) => return None,
                Wake::Msg(Some(WatchMsg::Event { rv, line })) => {
                    self.progress = rv;
                    return Some(Ok(line));
                }
                Wake::Msg(Some(WatchMsg::Progress(rv))) => self.progress = rv,
                Wake::Msg(Some(WatchMsg::Final(line))) => {
                    self.finished = true;
                    return Some(Ok(line));
                }
                Wake::Bookmark => return Some(Ok(bookmark_line(self.progress, false))),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Selectors

#[derive(Default)]
struct Filter {
    namespace: Option<String>,
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
}

impl Filter {
    fn parse(
        namespace: Option<&str>,
        labels: Option<&str>,
        fields: Option<&str>,
    ) -> Result<Self, ApiError> {
        Ok(Self {
            namespace: namespace.map(str::to_owned),
            labels: labels
                .map(parse_label_selector)
                .transpose()
                .map_err(|e| ApiError::bad_request(format!("unable to parse requirement: {e}")))?
                .unwrap_or_default(),
            fields: fields
                .map(parse_field_selector)
                .transpose()?
                .unwrap_or_default(),
        })
    }

    fn matches(&self, svc: &Service) -> bool {
        let ns = svc.metadata.namespace.as_deref().unwrap_or_default();
        self.namespace.as_deref().is_none_or(|want| want == ns)
            && self
                .labels
                .iter()
                .all(|r| r.matches(svc.metadata.labels.as_ref()))
            && self.fields.iter().all(|r| r.matches(svc))
    }
}

enum LabelOp {
    Exists,
    NotExists,
    Eq(String),
    NotEq(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Gt(i64),
    Lt(i64),
}

struct LabelReq {
    key: String,
    op: LabelOp,
}

impl LabelReq {
    fn matches(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        let v = labels.and_then(|l| l.get(&self.key));
        let int = || v.and_then(|v| v.parse::<i64>().ok());
        match &self.op {
            LabelOp::Exists => v.is_some(),
            LabelOp::NotExists => v.is_none(),
            LabelOp::Eq(x) => v == Some(x),
            LabelOp::NotEq(x) => v != Some(x),
            LabelOp::In(set) => v.is_some_and(|v| set.contains(v)),
            LabelOp::NotIn(set) => v.is_none_or(|v| !set.contains(v)),
            LabelOp::Gt(n) => int().is_some_and(|x| x > *n),
            LabelOp::Lt(n) => int().is_some_and(|x| x < *n),
        }
    }
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')
}

fn label_value(v: &str) -> Result<String, String> {
    let v = v.trim();
    if v.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        Ok(v.to_owned())
    } else {
        Err(format!("invalid label value: \"{v}\""))
    }
}

fn label_set(v: &str) -> Result<Vec<String>, String> {
    let inner = v
        .trim()
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| {
            format!(
                "expected a parenthesised set of values, found \"{}\"",
                v.trim()
            )
        })?;
    let values = inner
        .split(',')
        .map(label_value)
        .collect::<Result<Vec<_>, _>>()?;
    if values.iter().all(String::is_empty) {
        return Err("for 'in', 'notin' operators, values set can't be empty".to_owned());
    }
    Ok(values)
}

fn strip_word<'a>(s: &'a str, word: &str) -> Option<&'a str> {
    let rest = s.strip_prefix(word)?;
    rest.starts_with(|c: char| c.is_whitespace() || c == '(')
        .then_some(rest)
}

fn parse_label_selector(s: &str) -> Result<Vec<LabelReq>, String> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts.into_iter().map(parse_label_requirement).collect()
}

fn parse_label_requirement(p: &str) -> Result<LabelReq, String> {
    let p = p.trim();
    let valid_key = |k: &str| -> Result<String, String> {
        if k.is_empty() || !k.chars().all(is_key_char) {
            Err(format!("invalid label key: \"{k}\""))
        } else {
            Ok(k.to_owned())
        }
    };
    if let Some(rest) = p.strip_prefix('!') {
        return Ok(LabelReq {
            key: valid_key(rest.trim())?,
            op: LabelOp::NotExists,
        });
    }
    let end = p.find(|c: char| !is_key_char(c)).unwrap_or(p.len());
    let key = valid_key(&p[..end])?;
    let rest = p[end..].trim_start();
    let int = |v: &str| {
        v.trim().parse::<i64>().map_err(|_| {
            format!(
                "for 'Gt', 'Lt' operators, the value must be an integer: \"{}\"",
                v.trim()
            )
        })
    };
    let op = if rest.is_empty() {
        LabelOp::Exists
    } else if let Some(v) = rest.strip_prefix("!=") {
        LabelOp::NotEq(label_value(v)?)
    } else if let Some(v) = rest.strip_prefix("==") {
        LabelOp::Eq(label_value(v)?)
    } else if let Some(v) = rest.strip_prefix('=') {
        LabelOp::Eq(label_value(v)?)
    } else if let Some(v) = rest.strip_prefix('>') {
        LabelOp::Gt(int(v)?)
    } else if let Some(v) = rest.strip_prefix('<') {
        LabelOp::Lt(int(v)?)
    } else if let Some(v) = strip_word(rest, "notin") {
        LabelOp::NotIn(label_set(v)?)
    } else if let Some(v) = strip_word(rest, "in") {
        LabelOp::In(label_set(v)?)
    } else {
        return Err(format!("unexpected operator in \"{p}\""));
    };
    Ok(LabelReq { key, op })
}

#[derive(Clone, Copy)]
enum Field {
    Name,
    Namespace,
    Type,
    ClusterIp,
}

struct FieldReq {
    field: Field,
    value: String,
    negate: bool,
}

impl FieldReq {
    fn matches(&self, svc: &Service) -> bool {
        let spec = svc.spec.as_ref();
        let actual = match self.field {
            Field::Name => svc.metadata.name.as_deref(),
            Field::Namespace => svc.metadata.namespace.as_deref(),
            // The apiserver defaults the type on create; objects here are stored as given.
            Field::Type => Some(spec.and_then(|s| s.type_.as_deref()).unwrap_or("ClusterIP")),
            Field::ClusterIp => spec.and_then(|s| s.cluster_ip.as_deref()),
        }
        .unwrap_or_default();
        (actual == self.value) != self.negate
    }
}

/// `field=value`, `field==value`, `field!=value`, comma-separated, with `\` escapes in values.
/// The fields are the ones the Services registry makes selectable.
fn parse_field_selector(s: &str) -> Result<Vec<FieldReq>, ApiError> {
    let mut terms = vec![String::new()];
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let term = terms.last_mut();
                if let Some(t) = term {
                    t.push('\\');
                    if let Some(n) = chars.next() {
                        t.push(n);
                    }
                }
            }
            ',' => terms.push(String::new()),
            _ => {
                if let Some(t) = terms.last_mut() {
                    t.push(c);
                }
            }
        }
    }
    let mut reqs = Vec::new();
    for term in terms {
        if term.is_empty() && s.trim().is_empty() {
            continue;
        }
        let Some(eq) = term.find('=') else {
            return Err(ApiError::bad_request(format!(
                "invalid selector: '{s}'; can't understand '{term}'"
            )));
        };
        let (field, negate, value) = if term[..eq].ends_with('!') {
            (&term[..eq - 1], true, &term[eq + 1..])
        } else {
            let v = &term[eq + 1..];
            (&term[..eq], false, v.strip_prefix('=').unwrap_or(v))
        };
        let field = match field.trim() {
            "metadata.name" => Field::Name,
            "metadata.namespace" => Field::Namespace,
            "spec.type" => Field::Type,
            "spec.clusterIP" => Field::ClusterIp,
            other => {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {other}"
                )));
            }
        };
        let mut unescaped = String::new();
        let mut vc = value.chars();
        while let Some(c) = vc.next() {
            if c == '\\' {
                if let Some(n) = vc.next() {
                    unescaped.push(n);
                }
            } else {
                unescaped.push(c);
            }
        }
        reqs.push(FieldReq {
            field,
            value: unescaped,
            negate,
        });
    }
    Ok(reqs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(ns: &str, name: &str, labels: &[(&str, &str)]) -> Service {
        let mut s = Service::default();
        s.metadata.namespace = Some(ns.to_owned());
        s.metadata.name = Some(name.to_owned());
        s.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        );
        s
    }

    #[test]
    fn label_selectors() {
        let s = svc("a", "x", &[("app", "web"), ("tier", "3")]);
        let ok = |sel: &str| {
            let f = Filter {
                labels: parse_label_selector(sel).unwrap(),
                ..Filter::default()
            };
            f.matches(&s)
        };
        assert!(ok("app=web"));
        assert!(ok("app==web,tier"));
        assert!(ok("app in (web, api),!missing"));
        assert!(ok("app notin (api),tier>2,tier<4"));
        assert!(ok("missing!=x"));
        assert!(!ok("app!=web"));
        assert!(!ok("app in (api)"));
        assert!(parse_label_selector("app=web,").is_err());
        assert!(parse_label_selector("app in ()").is_err());
        assert!(parse_label_selector("a b").is_err());
    }

    #[test]
    fn field_selectors() {
        let s = svc("ns1", "x", &[]);
        let f = |sel: &str| parse_field_selector(sel).map(|r| r.iter().all(|r| r.matches(&s)));
        assert!(f("metadata.name=x,metadata.namespace==ns1").unwrap());
        assert!(f("metadata.name!=y,spec.type=ClusterIP").unwrap());
        assert!(!f("metadata.name=y").unwrap());
        assert_eq!(f("spec.ports=1").err().map(|e| e.code), Some(400));
        assert_eq!(f("nonsense").err().map(|e| e.code), Some(400));
    }

    #[test]
    fn continue_tokens_round_trip_and_reject_garbage() {
        let t = encode_continue(42, "ns/name");
        let (rv, start) = decode_continue(&t).unwrap();
        assert_eq!((rv, start.as_str()), (42, "ns/name"));
        assert_eq!(decode_continue("zz").err().map(|e| e.code), Some(400));
        assert_eq!(
            decode_continue(&hex::encode("{}")).err().map(|e| e.code),
            Some(400)
        );
    }

    #[test]
    fn snapshots_undo_newer_history() {
        let server = FakeApiServer::new();
        server.apply(svc("a", "x", &[]));
        let rv1 = server.resource_version();
        server.apply(svc("a", "y", &[]));
        server.apply(svc("a", "x", &[("v", "2")]));
        server.delete("a", "y");
        let st = lock(&server.inner.store);
        let snap = st.snapshot_at(rv1).unwrap();
        assert_eq!(snap.keys().collect::<Vec<_>>(), ["a/x"]);
        assert!(snap["a/x"].metadata.labels.as_ref().unwrap().is_empty());
        drop(st);
        server.compact();
        let st = lock(&server.inner.store);
        assert_eq!(st.snapshot_at(rv1).err().map(|e| e.code), Some(410));
    }
}
