//! `coordination.k8s.io/v1` Leases: get, list, create and replace under optimistic concurrency.

use super::{ApiError, FakeApiServer, json_response, lock, now};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use k8s_openapi::api::coordination::v1::Lease;
use serde_json::{Value, json};

const LEASE_GROUP: &str = "coordination.k8s.io";

pub(super) fn lease_group_list() -> Value {
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
pub(super) fn lease_route(
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
