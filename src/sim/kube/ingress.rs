//! `networking.k8s.io/v1` Ingresses in the fake apiserver: list and watch as the exporter's watcher
//! uses them (cluster-wide or per namespace; watches replay the changes after the requested
//! resourceVersion, or synthesise `ADDED` for the current state when it is unset or `0`; honour
//! `timeoutSeconds`), RBAC refusals worded as kube-apiserver does, server-owned `uid`,
//! `creationTimestamp` and `resourceVersion`.
//!
//! Simpler than the Service store on purpose: no paging (`limit` is answered with the whole list,
//! which the apiserver's watch cache also does for `resourceVersion=0`), no selectors, no compaction,
//! no bookmarks. The Service store's fidelity is what the list/watch tests exercise.

use super::list::{Params, parse_bool};
use super::{ApiError, FakeApiServer, json_line, json_response, lock, now};
use axum::body::Body;
use axum::http::StatusCode;
use axum::response::Response;
use k8s_openapi::api::networking::v1::Ingress;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;
use tokio::sync::mpsc;

pub(super) const GROUP: &str = "networking.k8s.io";

#[derive(Default)]
pub(super) struct IngressStore {
    rv: u64,
    next_uid: u64,
    objects: BTreeMap<String, Ingress>,
    /// (rv, event type, object as of that event): replayed to watches that start from an older RV.
    history: Vec<(u64, &'static str, Ingress)>,
    watches: Vec<(Option<String>, mpsc::UnboundedSender<bytes::Bytes>)>,
    /// Namespaces refused by RBAC; `*` refuses the cluster-wide list too.
    forbidden: HashSet<String>,
}

impl IngressStore {
    fn record(&mut self, kind: &'static str, obj: Ingress) {
        let ns = obj.metadata.namespace.clone().unwrap_or_default();
        let line = json_line(&json!({"type": kind, "object": to_value(&obj)}));
        self.watches.retain(|(scope, tx)| {
            if scope.as_ref().is_some_and(|s| *s != ns) {
                return !tx.is_closed();
            }
            tx.send(line.clone()).is_ok()
        });
        self.history.push((self.rv, kind, obj));
    }
}

fn to_value(obj: &Ingress) -> Value {
    let mut v = serde_json::to_value(obj).unwrap_or(Value::Null);
    v["kind"] = json!("Ingress");
    v["apiVersion"] = json!("networking.k8s.io/v1");
    v
}

impl FakeApiServer {
    /// Creates or updates an Ingress (namespace defaults to "default") and notifies watches.
    pub fn apply_ingress(&self, mut ing: Ingress) -> Ingress {
        let mut st = lock(&self.inner.ingresses);
        let ns = ing
            .metadata
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".to_owned());
        ing.metadata.namespace = Some(ns.clone());
        let key = format!("{ns}/{}", ing.metadata.name.as_deref().unwrap_or_default());
        let old = st.objects.get(&key).cloned();
        match &old {
            Some(old) => {
                ing.metadata.uid.clone_from(&old.metadata.uid);
                ing.metadata
                    .creation_timestamp
                    .clone_from(&old.metadata.creation_timestamp);
                ing.metadata
                    .resource_version
                    .clone_from(&old.metadata.resource_version);
                if &ing == old {
                    return ing;
                }
            }
            None => {
                st.next_uid += 1;
                ing.metadata.uid = Some(format!("1a9e0000-0000-4000-8000-{:012x}", st.next_uid));
                // Tests may backdate an Ingress to make it the oldest; otherwise the server stamps it.
                if ing.metadata.creation_timestamp.is_none() {
                    ing.metadata.creation_timestamp = Some(now());
                }
            }
        }
        st.rv += 1;
        ing.metadata.resource_version = Some(st.rv.to_string());
        st.objects.insert(key, ing.clone());
        let kind = if old.is_some() { "MODIFIED" } else { "ADDED" };
        st.record(kind, ing.clone());
        ing
    }

    /// Deletes an Ingress; returns whether it existed.
    pub fn delete_ingress(&self, namespace: &str, name: &str) -> bool {
        let mut st = lock(&self.inner.ingresses);
        let Some(mut gone) = st.objects.remove(&format!("{namespace}/{name}")) else {
            return false;
        };
        st.rv += 1;
        gone.metadata.resource_version = Some(st.rv.to_string());
        st.record("DELETED", gone);
        true
    }

    /// Models RBAC without `ingresses` for `namespace` (`"*"`: the cluster-wide list as well).
    pub fn set_ingresses_forbidden(&self, namespace: &str, forbidden: bool) {
        let mut st = lock(&self.inner.ingresses);
        if forbidden {
            st.forbidden.insert(namespace.to_owned());
            st.watches.retain(|(scope, _)| {
                scope.as_deref().is_some_and(|s| s != namespace) && namespace != "*"
            });
        } else {
            st.forbidden.remove(namespace);
        }
    }

    pub fn ingresses(&self) -> Vec<Ingress> {
        lock(&self.inner.ingresses)
            .objects
            .values()
            .cloned()
            .collect()
    }
}

/// `true` for the Ingress paths this fake serves (under `/apis/networking.k8s.io/v1`).
pub(super) fn is_ingress_path(segs: &[&str]) -> bool {
    matches!(
        segs,
        ["apis", GROUP, "v1"]
            | ["apis", GROUP, "v1", "ingresses"]
            | ["apis", GROUP, "v1", "watch", "ingresses"]
            | ["apis", GROUP, "v1", "namespaces", _, "ingresses"]
            | ["apis", GROUP, "v1", "watch", "namespaces", _, "ingresses"]
    )
}

pub(super) fn route(
    server: &FakeApiServer,
    segs: &[&str],
    params: &Params,
) -> Result<Response, ApiError> {
    let (namespace, watch_path) = match segs {
        ["apis", GROUP, "v1"] => {
            return Ok(json_response(
                StatusCode::OK,
                &json!({"kind": "APIResourceList", "groupVersion": "networking.k8s.io/v1",
                        "resources": [{"name": "ingresses", "singularName": "ingress", "namespaced": true,
                                       "kind": "Ingress", "verbs": ["get", "list", "watch"], "shortNames": ["ing"]}]}),
            ));
        }
        ["apis", GROUP, "v1", "ingresses"] => (None, false),
        ["apis", GROUP, "v1", "watch", "ingresses"] => (None, true),
        ["apis", GROUP, "v1", "namespaces", ns, "ingresses"] => (Some(*ns), false),
        ["apis", GROUP, "v1", "watch", "namespaces", ns, "ingresses"] => (Some(*ns), true),
        _ => return Err(ApiError::not_found()),
    };
    let watch = watch_path || params.get("watch").and_then(parse_bool) == Some(true);
    let mut st = lock(&server.inner.ingresses);
    let scope = namespace.unwrap_or("*");
    if st.forbidden.contains(scope) || st.forbidden.contains("*") {
        return Err(forbidden(if watch { "watch" } else { "list" }, namespace));
    }
    let in_scope =
        |o: &Ingress| namespace.is_none_or(|n| o.metadata.namespace.as_deref() == Some(n));
    if !watch {
        let items: Vec<Value> = st
            .objects
            .values()
            .filter(|o| in_scope(o))
            .map(to_value)
            .collect();
        return Ok(json_response(
            StatusCode::OK,
            &json!({"kind": "IngressList", "apiVersion": "networking.k8s.io/v1",
                    "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
        ));
    }
    let since = match params.get("resourceVersion").filter(|v| !v.is_empty()) {
        None | Some("0") => None,
        Some(v) => Some(v.parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!("resourceVersion: Invalid value: \"{v}\""))
        })?),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let initial: Vec<bytes::Bytes> = match since {
        None => st
            .objects
            .values()
            .filter(|o| in_scope(o))
            .map(|o| json_line(&json!({"type": "ADDED", "object": to_value(o)})))
            .collect(),
        Some(rv) => st
            .history
            .iter()
            .filter(|(at, _, o)| *at > rv && in_scope(o))
            .map(|(_, kind, o)| json_line(&json!({"type": kind, "object": to_value(o)})))
            .collect(),
    };
    for line in initial {
        let _ = tx.send(line);
    }
    st.watches.push((namespace.map(str::to_owned), tx));
    drop(st);
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let deadline = tokio::time::Instant::now() + timeout;
    let stream = futures::stream::unfold(rx, move |mut rx| async move {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(line)) => Some((Ok::<_, std::io::Error>(line), rx)),
            _ => None,
        }
    });
    Ok(super::watch::watch_response(Body::from_stream(stream)))
}

fn forbidden(verb: &str, namespace: Option<&str>) -> ApiError {
    let place = match namespace {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".to_owned(),
    };
    ApiError {
        details: Some(json!({"group": GROUP, "kind": "ingresses"})),
        ..ApiError::new(
            403,
            "Forbidden",
            format!(
                "ingresses.networking.k8s.io is forbidden: User \"system:serviceaccount:monitoring:elb-exporter\" cannot {verb} resource \"ingresses\" in API group \"{GROUP}\" {place}"
            ),
        )
    }
}
