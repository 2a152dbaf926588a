//! Backend server groups (pools) and forwarding policies (l7policies) of the simulated ELB, as
//! reference §4b/§4c describe them: v3 `GET /v3/{project_id}/elb/pools` and `/l7policies` (multi-valued
//! filters, `limit`/`marker` paging, `page_info`), the shared-ELB `/v2/{project_id}/elb/…` equivalents
//! (`limit` optional), and CCE's naming. A pool reached only through a forwarding policy lists no
//! listener in `listeners[]`, so a `listener_id` filter does not find it — join through
//! `l7policies[].redirect_pool_id`, as the reference warns.

use super::data::uuid_from;
use super::elb::ListCall;
use super::{Inner, Reply, all, json};
use serde_json::Value;
use std::collections::BTreeMap;

/// A backend server group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimPool {
    pub id: String,
    pub name: String,
    /// `HTTP`, `HTTPS`, `TCP`, …: pool L7 metrics exist only for HTTP(S) pools.
    pub protocol: String,
    /// Listeners the pool lists in `listeners[]` (a listener's default pool); empty for a pool that
    /// only a forwarding policy reaches.
    pub listeners: Vec<String>,
}

/// A forwarding policy (`action: REDIRECT_TO_POOL`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimL7Policy {
    pub id: String,
    pub name: String,
    pub listener_id: String,
    pub redirect_pool_id: String,
    /// The PATH rule's value.
    pub path: String,
    /// CCE writes `{"ingress_id": "<uid>"}` here.
    pub description: String,
}

struct PoolRecord {
    lb_id: String,
    pool: SimPool,
    seq: u64,
}

struct PolicyRecord {
    policy: SimL7Policy,
    seq: u64,
}

#[derive(Default)]
pub(super) struct PoolState {
    pools: BTreeMap<String, PoolRecord>,
    policies: BTreeMap<String, PolicyRecord>,
}

impl PoolState {
    /// The pool `id` on load balancer `lb`, with its protocol, if it exists.
    pub(super) fn pool_protocol(&self, lb: &str, id: &str) -> Option<&str> {
        self.pools
            .get(id)
            .filter(|p| p.lb_id == lb)
            .map(|p| p.pool.protocol.as_str())
    }

    pub(super) fn remove_lb(&mut self, lb: &str) {
        self.pools.retain(|_, p| p.lb_id != lb);
        let pools = &self.pools;
        self.policies
            .retain(|_, p| pools.contains_key(&p.policy.redirect_pool_id));
    }
}

/// CCE's pool name for a backend Service port behind a listener (cce_faq_00493's example:
/// `k8s_default_nginx-80_HTTP-8000`).
pub fn cce_pool_name(
    ns: &str,
    service: &str,
    service_port: u16,
    protocol: &str,
    port: u16,
) -> String {
    format!("k8s_{ns}_{service}-{service_port}_{protocol}-{port}")
}

impl super::CloudSim {
    /// Adds or replaces a pool of load balancer `lb_id`.
    pub fn add_pool(&self, lb_id: &str, pool: SimPool) {
        let mut st = self.inner.state();
        let seq = match st.pools.pools.get(&pool.id) {
            Some(p) => p.seq,
            None => st.bump(),
        };
        st.pools.pools.insert(
            pool.id.clone(),
            PoolRecord {
                lb_id: lb_id.to_owned(),
                pool,
                seq,
            },
        );
    }

    /// Adds or replaces a forwarding policy.
    pub fn add_l7policy(&self, policy: SimL7Policy) {
        let mut st = self.inner.state();
        let seq = match st.pools.policies.get(&policy.id) {
            Some(p) => p.seq,
            None => st.bump(),
        };
        st.pools
            .policies
            .insert(policy.id.clone(), PolicyRecord { policy, seq });
    }

    /// Removes a pool and the policies that redirect to it.
    pub fn remove_pool(&self, id: &str) {
        let mut st = self.inner.state();
        st.pools.pools.remove(id);
        st.pools
            .policies
            .retain(|_, p| p.policy.redirect_pool_id != id);
    }

    /// What CCE creates for one Ingress path to a backend Service port on a listener: an HTTP pool
    /// named by [`cce_pool_name`], reached only by a `REDIRECT_TO_POOL` policy with a PATH rule
    /// (the pool lists no listener). The same backend on the same listener reuses its pool. Returns
    /// the pool id.
    #[allow(clippy::too_many_arguments)]
    pub fn add_cce_route(
        &self,
        lb_id: &str,
        listener_id: &str,
        listener_port: u16,
        ns: &str,
        service: &str,
        service_port: u16,
        ingress_uid: &str,
    ) -> String {
        let name = cce_pool_name(ns, service, service_port, "HTTP", listener_port);
        let pool_id = uuid_from(&format!("pool/{listener_id}/{name}"));
        self.add_pool(
            lb_id,
            SimPool {
                id: pool_id.clone(),
                name,
                protocol: "HTTP".into(),
                listeners: Vec::new(),
            },
        );
        self.add_l7policy(SimL7Policy {
            id: uuid_from(&format!(
                "policy/{listener_id}/{ingress_uid}/{service}/{service_port}"
            )),
            name: format!("k8s_{ns}_{service}_{}", &uuid_from(ingress_uid)[..8]),
            listener_id: listener_id.into(),
            redirect_pool_id: pool_id.clone(),
            path: format!("/{service}"),
            description: json!({"ingress_id": ingress_uid}).to_string(),
        });
        pool_id
    }
}

fn pool_json(rec: &PoolRecord, pid: &str, v3: bool) -> Value {
    let p = &rec.pool;
    let mut v = json!({
        "id": p.id,
        "name": p.name,
        "description": "",
        "protocol": p.protocol,
        "lb_algorithm": "ROUND_ROBIN",
        "admin_state_up": true,
        "listeners": p.listeners.iter().map(|l| json!({"id": l})).collect::<Vec<_>>(),
        "loadbalancers": [{"id": rec.lb_id}],
        "members": [{"id": uuid_from(&format!("member/{}", p.id))}],
        "healthmonitor_id": uuid_from(&format!("hm/{}", p.id)),
        "project_id": pid,
        "session_persistence": Value::Null,
    });
    if v3 {
        v["ip_version"] = json!("v4");
        v["slow_start"] = Value::Null;
        v["type"] = json!("");
    } else {
        v["tenant_id"] = json!(pid);
    }
    v
}

fn policy_json(rec: &PolicyRecord, pid: &str) -> Value {
    let p = &rec.policy;
    json!({
        "id": p.id,
        "name": p.name,
        "description": p.description,
        "listener_id": p.listener_id,
        "action": "REDIRECT_TO_POOL",
        "redirect_pool_id": p.redirect_pool_id,
        "redirect_listener_id": Value::Null,
        "position": 1,
        "priority": 1,
        "admin_state_up": true,
        "project_id": pid,
        "provisioning_status": "ACTIVE",
        "rules": [{"id": uuid_from(&format!("rule/{}", p.id)), "type": "PATH",
                   "compare_type": "STARTS_WITH", "value": p.path, "invert": false}],
    })
}

impl Inner {
    /// `GET /v{2,3}/{project_id}/elb/pools`.
    pub(super) fn list_pools(&self, call: ListCall<'_>) -> Reply {
        let (v3, pid, _, query, _) = call;
        let (lbs, listeners, ids, names) = (
            all(query, "loadbalancer_id"),
            all(query, "listener_id"),
            all(query, "id"),
            all(query, "name"),
        );
        let checked: Vec<&str> = lbs.iter().chain(&listeners).copied().collect();
        self.listing(
            call,
            ("pools", "pool"),
            &checked,
            |st, m| st.pools.pools.get(m).map(|p| p.seq),
            |st| {
                st.pools
                    .pools
                    .values()
                    .filter(|p| {
                        st.lbs
                            .get(&p.lb_id)
                            .is_some_and(|lb| self.lists(lb.kind, v3))
                    })
                    .filter(|p| lbs.is_empty() || lbs.contains(&p.lb_id.as_str()))
                    .filter(|p| {
                        listeners.is_empty()
                            || p.pool
                                .listeners
                                .iter()
                                .any(|l| listeners.contains(&l.as_str()))
                    })
                    .filter(|p| ids.is_empty() || ids.contains(&p.pool.id.as_str()))
                    .filter(|p| names.is_empty() || names.contains(&p.pool.name.as_str()))
                    .map(|p| (p.seq, pool_json(p, pid, v3)))
                    .collect()
            },
        )
    }

    /// `GET /v{2,3}/{project_id}/elb/l7policies`.
    pub(super) fn list_l7policies(&self, call: ListCall<'_>) -> Reply {
        let (v3, pid, _, query, _) = call;
        let (listeners, pools, ids, actions) = (
            all(query, "listener_id"),
            all(query, "redirect_pool_id"),
            all(query, "id"),
            all(query, "action"),
        );
        let checked: Vec<&str> = listeners.iter().chain(&pools).copied().collect();
        self.listing(
            call,
            ("l7policies", "l7policy"),
            &checked,
            |st, m| st.pools.policies.get(m).map(|p| p.seq),
            |st| {
                st.pools
                    .policies
                    .values()
                    .filter(|p| {
                        // Listed by the API of the load balancer its listener belongs to.
                        st.listeners
                            .get(&p.policy.listener_id)
                            .and_then(|l| st.lbs.get(&l.lb_id))
                            .is_some_and(|lb| self.lists(lb.kind, v3))
                    })
                    .filter(|p| {
                        listeners.is_empty() || listeners.contains(&p.policy.listener_id.as_str())
                    })
                    .filter(|p| {
                        pools.is_empty() || pools.contains(&p.policy.redirect_pool_id.as_str())
                    })
                    .filter(|p| ids.is_empty() || ids.contains(&p.policy.id.as_str()))
                    .filter(|_| actions.is_empty() || actions.contains(&"REDIRECT_TO_POOL"))
                    .map(|p| (p.seq, policy_json(p, pid)))
                    .collect()
            },
        )
    }
}

/// Pool-only SYS.ELB metrics (reference §6: `m18_l7_upstream_2xx`, `m19_l7_upstream_3xx`,
/// `m24_l7_req_Bps`, `m25_l7_resp_Bps`, `m9_abnormal_servers`, `ma_normal_servers`): unit and value.
pub(super) fn pool_only_unit(metric: &str) -> Option<&'static str> {
    match metric {
        "m18_l7_upstream_2xx" | "m19_l7_upstream_3xx" => Some("Count/s"),
        "m24_l7_req_Bps" | "m25_l7_resp_Bps" => Some("bit/s"),
        "m9_abnormal_servers" | "ma_normal_servers" => Some("Count"),
        _ => None,
    }
}

/// Values of the pool-only metrics, derived from the pool's own QPS like the listener L7 ones.
pub(super) fn pool_only_value(qps: f64, metric: &str, jitter: f64) -> f64 {
    match metric {
        "m18_l7_upstream_2xx" => qps * 0.93 * (1.0 + 0.2 * jitter),
        "m19_l7_upstream_3xx" => qps * 0.03 * (1.0 + 0.2 * jitter),
        "m24_l7_req_Bps" => qps * 8.0 * 900.0 * (1.0 + 0.05 * jitter),
        "m25_l7_resp_Bps" => qps * 8.0 * 6_000.0 * (1.0 + 0.05 * jitter),
        "m9_abnormal_servers" => 0.0,
        "ma_normal_servers" => 2.0,
        _ => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cce_names_follow_the_documented_example() {
        assert_eq!(
            cce_pool_name("default", "nginx", 80, "HTTP", 8000),
            "k8s_default_nginx-80_HTTP-8000"
        );
    }
}
