//! The simulated ELB: v2/v3 listener and load balancer listings, their paging, filters and JSON.

use super::{
    Inner, LbKind, LbRecord, ListenerRecord, Reply, SimApi, SimState, all,
    data::{created_secs, derived_hex, hash_u64, iso8601, uuid_from},
    first,
};
use crate::signer;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Map, Value, json};

const V3_MAX_LIMIT: i64 = 2000;

pub(super) fn elb_error(status: StatusCode, code: &str, msg: &str, rid: &str) -> Reply {
    Reply::error(
        status,
        code,
        &json!({"error_msg": msg, "error_code": code, "request_id": rid}),
    )
}

pub(super) fn elb_bad_input(msg: &str, rid: &str) -> Reply {
    elb_error(
        StatusCode::BAD_REQUEST,
        "ELB.8902",
        &format!("Invalid input for {msg}"),
        rid,
    )
}

impl Inner {
    pub(super) fn list_listeners(
        &self,
        v3: bool,
        pid: &str,
        headers: &HeaderMap,
        query: &[(String, String)],
        host: &str,
        rid: &str,
    ) -> Reply {
        let paging = match self.open_listing(v3, pid, headers, query, rid) {
            Ok(p) => p,
            Err(e) => return e,
        };
        let filter = match ListenerFilter::parse(query, rid) {
            Ok(f) => f,
            Err(e) => return e,
        };
        if let Some(bad) = self.malformed_id(v3, &filter.lb_ids) {
            return elb_bad_input(&format!("loadbalancer_id: {bad:?} is not a UUID"), rid);
        }
        let in_project = pid == self.cfg.project_id;
        let (page, more) = {
            let st = self.state();
            let seq = |m: &str| st.listeners.get(m).map(|l| l.seq);
            let marker_seq = match paging.marker_seq(in_project, "listener", seq, rid) {
                Ok(s) => s,
                Err(e) => return e,
            };
            let candidates: Vec<(u64, &ListenerRecord)> = st
                .listeners
                .values()
                .filter(|_| in_project)
                .filter_map(|l| {
                    let lb = st.lbs.get(&l.lb_id)?;
                    (self.lists(lb.kind, v3) && filter.matches(l)).then_some((l.seq, l))
                })
                .collect();
            // Only the page is rendered: a project-wide listing pages through every listener.
            let (page, more) = paging.apply(candidates, marker_seq);
            let page: Vec<Value> = page.iter().map(|l| listener_json(l, pid, v3)).collect();
            (page, more)
        };
        if v3 {
            listing_reply((true, pid, rid), "listeners", page, false)
        } else {
            Reply::ok(&v2_listeners_body(page, more, &paging, host, pid))
        }
    }

    pub(super) fn list_loadbalancers(&self, call: ListCall<'_>) -> Reply {
        let (v3, pid, _, query, _) = call;
        let ids = all(query, "id");
        let names = all(query, "name");
        self.listing(
            call,
            ("loadbalancers", "loadbalancer"),
            &ids,
            |st, m| st.lbs.get(m).map(|lb| lb.seq),
            |st| {
                st.lbs
                    .iter()
                    .filter(|(_, lb)| self.lists(lb.kind, v3))
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
                        let listeners: Vec<&String> =
                            listeners.into_iter().map(|(_, l)| l).collect();
                        let mut v = loadbalancer_json(id, lb.kind, &listeners, pid, v3);
                        v["name"] = Value::String(lb_display_name(id, lb));
                        (lb.seq, v)
                    })
                    .collect()
            },
        )
    }

    /// A v2/v3 listing of `key` items (`what` names one in the marker error): the project check, the
    /// paging, the id filters `checked` (a v3 API that refuses malformed ids refuses the whole listing),
    /// and the page after the marker (`seq` looks an id up) of the project's `candidates`.
    pub(super) fn listing(
        &self,
        (v3, pid, headers, query, rid): ListCall<'_>,
        (key, what): (&str, &str),
        checked: &[&str],
        seq: impl Fn(&SimState, &str) -> Option<u64>,
        candidates: impl FnOnce(&SimState) -> Vec<(u64, Value)>,
    ) -> Reply {
        let paging = match self.open_listing(v3, pid, headers, query, rid) {
            Ok(p) => p,
            Err(e) => return e,
        };
        if let Some(bad) = self.malformed_id(v3, checked) {
            return elb_bad_input(&format!("{bad:?} is not a UUID"), rid);
        }
        let in_project = pid == self.cfg.project_id;
        let (page, more) = {
            let st = self.state();
            let marker_seq = match paging.marker_seq(in_project, what, |m| seq(&st, m), rid) {
                Ok(s) => s,
                Err(e) => return e,
            };
            let items = if in_project {
                candidates(&st)
            } else {
                Vec::new()
            };
            paging.apply(items, marker_seq)
        };
        listing_reply((v3, pid, rid), key, page, more)
    }

    /// The project check and the paging of an ELB listing (v2 or v3).
    pub(super) fn open_listing(
        &self,
        v3: bool,
        pid: &str,
        headers: &HeaderMap,
        query: &[(String, String)],
        rid: &str,
    ) -> Result<Paging, Reply> {
        let api = if v3 { SimApi::ElbV3 } else { SimApi::ElbV2 };
        self.project_check(api, pid, headers, rid)?;
        Paging::parse(v3, query, rid)
    }

    /// The first id of a v3 filter that is not a UUID, when this cloud refuses the whole listing for it.
    pub(super) fn malformed_id<'q>(&self, v3: bool, ids: &[&'q str]) -> Option<&'q str> {
        (v3 && self.cfg.v3_rejects_malformed_ids)
            .then(|| ids.iter().find(|id| !is_uuid(id)).copied())
            .flatten()
    }

    /// Whether the v2 or v3 API lists load balancers (and what hangs off them) of this kind.
    pub(super) fn lists(&self, kind: LbKind, v3: bool) -> bool {
        match kind {
            LbKind::Shared => !v3 || self.cfg.v3_lists_shared,
            LbKind::Dedicated => v3,
        }
    }
}

/// A listing call as routed: (v3, project id, headers, query, request id).
pub(super) type ListCall<'a> = (
    bool,
    &'a str,
    &'a HeaderMap,
    &'a [(String, String)],
    &'a str,
);

/// A listing page: v3 `{request_id, page_info, <key>: page}`, v2 `{<key>: page}` with neutron's
/// `<key>_links` next link where there is more.
pub(super) fn listing_reply(
    (v3, pid, rid): (bool, &str, &str),
    key: &str,
    page: Vec<Value>,
    more: bool,
) -> Reply {
    let mut body = Map::new();
    if v3 {
        body.insert("request_id".into(), json!(rid));
        body.insert("page_info".into(), page_info(&page, |v| v["id"].as_str()));
    } else if let (true, Some(last)) = (more, page.last().and_then(|v| v["id"].as_str())) {
        let href = format!("/v2/{pid}/elb/{key}?marker={last}");
        body.insert(
            format!("{key}_links"),
            json!([{"rel": "next", "href": href}]),
        );
    }
    body.insert(key.into(), Value::Array(page));
    Reply::ok(&Value::Object(body))
}

/// A v2 listener page: `listeners` and, where there is more, neutron's `listeners_links`.
fn v2_listeners_body(
    page: Vec<Value>,
    more: bool,
    paging: &Paging,
    host: &str,
    pid: &str,
) -> Value {
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
    body
}

pub(super) struct Paging {
    /// `None`: everything (v2 without `limit`, or `limit=0`, which neutron treats as no limit).
    limit: Option<usize>,
    pub(super) marker: Option<String>,
    reverse: bool,
}

impl Paging {
    /// The sequence number of the item `marker` names (`seq` looks it up); one the project does not
    /// hold is ELB.8902 `marker: <what> <id> could not be found`.
    pub(super) fn marker_seq(
        &self,
        in_project: bool,
        what: &str,
        seq: impl Fn(&str) -> Option<u64>,
        rid: &str,
    ) -> Result<Option<u64>, Reply> {
        let Some(m) = &self.marker else {
            return Ok(None);
        };
        match seq(m) {
            Some(s) if in_project => Ok(Some(s)),
            _ => Err(elb_bad_input(
                &format!("marker: {what} {m} could not be found"),
                rid,
            )),
        }
    }

    pub(super) fn parse(v3: bool, query: &[(String, String)], rid: &str) -> Result<Self, Reply> {
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
    pub(super) fn apply<T>(
        &self,
        mut items: Vec<(u64, T)>,
        marker_seq: Option<u64>,
    ) -> (Vec<T>, bool) {
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

pub(super) fn page_info<'v>(page: &'v [Value], id: impl Fn(&'v Value) -> Option<&'v str>) -> Value {
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
    pub(super) fn parse(query: &'q [(String, String)], rid: &str) -> Result<Self, Reply> {
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

pub(super) fn is_l7(protocol: &str) -> bool {
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

/// A load balancer as v3 (`v3`) or v2 lists it: v2 objects have no `guaranteed`, flavors or zones,
/// and carry `tenant_id`.
fn loadbalancer_json(id: &str, kind: LbKind, listeners: &[&String], pid: &str, v3: bool) -> Value {
    let created = created_secs(id);
    let mut v = json!({
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
    });
    if !v3 {
        if let Some(o) = v.as_object_mut() {
            for k in [
                "guaranteed",
                "availability_zone_list",
                "l4_flavor_id",
                "l7_flavor_id",
                "elb_virsubnet_ids",
                "ip_target_enable",
                "deletion_protection_enable",
                "billing_info",
                "publicips",
                "eips",
                "ipv6_vip_address",
            ] {
                o.remove(k);
            }
        }
        v["tenant_id"] = Value::String(pid.to_string());
    }
    v
}
