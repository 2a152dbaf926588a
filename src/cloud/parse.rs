//! Tolerant parsers for cloud responses. Pure functions over bytes: they never panic, skip (and count)
//! the parts they cannot use, and ignore unknown fields.

use super::{Datapoint, Listener, MetricQuery};
use crate::config::Filter;
use serde_json::Value;
use std::borrow::Cow;
use std::collections::HashMap;

/// Pulls `(code, message)` out of any of the error shapes the reference lists: `error_code`/`error_msg`,
/// `errorCode`/`errorMsg`, `code`/`message`, nested objects (`error`, `details`, `message`).
pub fn error_fields(body: &[u8]) -> (Option<String>, String) {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        let text = String::from_utf8_lossy(body);
        return (None, truncate(text.trim(), 200));
    };
    match &v {
        Value::Object(_) => {}
        // A bare string is the message; any other JSON is shown as it came.
        Value::String(s) => return (None, truncate(s.trim(), 300)),
        _ => {
            let text = String::from_utf8_lossy(body);
            return (None, truncate(text.trim(), 200));
        }
    }
    let mut code = None;
    let mut msg = None;
    find_error(&v, &mut code, &mut msg, 0);
    (code, truncate(msg.as_deref().unwrap_or(""), 300))
}

fn scalar_str(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn find_error(v: &Value, code: &mut Option<String>, msg: &mut Option<String>, depth: usize) {
    let Value::Object(m) = v else { return };
    if depth > 8 {
        return;
    }
    for (ck, mk) in [
        ("error_code", "error_msg"),
        ("errorCode", "errorMsg"),
        ("code", "message"),
    ] {
        // A cloud code such as `ces.0014` beats a bare HTTP number such as `400`, wherever it sits.
        if let Some(c) = m.get(ck).and_then(scalar_str) {
            let better = match code.as_deref() {
                None => true,
                Some(old) => {
                    old.bytes().all(|b| b.is_ascii_digit())
                        && !c.bytes().all(|b| b.is_ascii_digit())
                }
            };
            if better {
                *code = Some(c);
            }
        }
        if msg.is_none()
            && let Some(s) = m.get(mk).and_then(|x| x.as_str())
            && !s.is_empty()
        {
            *msg = Some(s.to_string());
        }
    }
    if msg.is_none()
        && let Some(s) = m.get("details").and_then(|x| x.as_str())
        && !s.is_empty()
    {
        *msg = Some(s.to_string());
    }
    for key in ["error", "details", "message", "detail"] {
        if let Some(inner) = m.get(key) {
            find_error(inner, code, msg, depth + 1);
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The IAM project list: ids of projects whose name equals `name` exactly. Projects are read one at a
/// time from the body, so memory stays proportional to the matches, not to the answer.
pub fn projects(body: &[u8], name: &str) -> Result<Vec<String>, String> {
    #[derive(serde::Deserialize)]
    struct Answer<'a> {
        #[serde(borrow, default)]
        projects: Option<Raw<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct Project<'a> {
        #[serde(borrow, default)]
        id: Option<Cow<'a, str>>,
        #[serde(borrow, default)]
        name: Option<Cow<'a, str>>,
    }
    let answer: Answer<'_> =
        serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?;
    let list = answer.projects.ok_or("no `projects` array")?;
    let mut ids = Vec::new();
    for_each_item(list, |item| {
        if let Some(Project {
            id: Some(id),
            name: Some(n),
        }) = object::<Project<'_>>(item)
            && n == name
            && !id.is_empty()
            // More than a few is ambiguous anyway; keep what the error message needs.
            && ids.len() < MAX_MATCHING_PROJECTS
        {
            ids.push(id.into_owned());
        }
    })
    .map_err(|_| "no `projects` array".to_string())?;
    Ok(ids)
}

/// Projects kept from one IAM answer: enough to tell "one" from "ambiguous".
const MAX_MATCHING_PROJECTS: usize = 16;

/// A JSON object as `T`; `None` for anything else (derived structs would also take an array).
fn object<'a, T: serde::Deserialize<'a>>(raw: Raw<'a>) -> Option<T> {
    if !raw.get().starts_with('{') {
        return None;
    }
    serde_json::from_str(raw.get()).ok()
}

/// Calls `f` on each element of a JSON array, one at a time, without collecting them: a huge array of
/// tiny items costs no memory beyond the body. Errors when `array` is not an array.
fn for_each_item<'a>(array: Raw<'a>, f: impl FnMut(Raw<'a>)) -> Result<(), String> {
    for_each_item_until(array, usize::MAX, f).map(|_| ())
}

/// Like [`for_each_item`], stopping with an error after `max` items; returns the number of items.
fn for_each_item_until<'a>(
    array: Raw<'a>,
    max: usize,
    f: impl FnMut(Raw<'a>),
) -> Result<usize, String> {
    struct Each<F> {
        f: F,
        max: usize,
    }
    impl<'de, F: FnMut(Raw<'de>)> serde::de::Visitor<'de> for Each<F> {
        type Value = usize;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an array")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            mut self,
            mut seq: A,
        ) -> Result<usize, A::Error> {
            let mut n = 0;
            while let Some(item) = seq.next_element::<Raw<'de>>()? {
                n += 1;
                if n > self.max {
                    return Err(serde::de::Error::custom(format!(
                        "more than {} items",
                        self.max
                    )));
                }
                (self.f)(item);
            }
            Ok(n)
        }
    }
    let mut de = serde_json::Deserializer::from_str(array.get());
    serde::Deserializer::deserialize_seq(&mut de, Each { f, max }).map_err(|e| e.to_string())
}

/// One page of listeners.
#[derive(Debug, Default)]
pub struct ListenerPage {
    /// (load balancer id, listener): a listener names its load balancer(s).
    pub listeners: Vec<(String, Listener)>,
    /// Items on the page, usable or not (paging goes on while a page is full).
    pub raw_count: usize,
    /// Id of the page's last item, usable or not: the next page's marker.
    pub last_id: Option<String>,
    /// `page_info.next_marker` (v3).
    pub next_marker: Option<String>,
    /// Items skipped because a required field was missing or wrong, or they belong to another LB.
    pub skipped: usize,
    /// Of `skipped`, valid listeners on port 0 (full-port / IP listeners of dedicated ELBs): they match
    /// no Service port, so they are attributed to none.
    pub unattributable: usize,
}

/// Parses a v2 or v3 listener page, keeping listeners of the asked load balancers. A listener that does
/// not name its load balancer is attributed to the one asked for, when only one was.
pub fn listener_page(body: &[u8], loadbalancer_ids: &[&str]) -> Result<ListenerPage, String> {
    listener_page_limited(body, loadbalancer_ids, usize::MAX)
}

/// [`listener_page`] for a request with `limit`: a page with more items than asked for is malformed
/// (and is not read further), so what a page keeps is bounded by the request.
pub fn listener_page_limited(
    body: &[u8],
    loadbalancer_ids: &[&str],
    limit: usize,
) -> Result<ListenerPage, String> {
    page_of(body, Some(loadbalancer_ids), limit)
}

/// Parses a page of a project-wide listing: each listener goes to the first load balancer it names; one
/// naming none cannot be attributed and is skipped.
pub fn listener_page_all(body: &[u8]) -> Result<ListenerPage, String> {
    page_of(body, None, usize::MAX)
}

/// [`listener_page_all`] bounded by the request's `limit`, like [`listener_page_limited`].
pub fn listener_page_all_limited(body: &[u8], limit: usize) -> Result<ListenerPage, String> {
    page_of(body, None, limit)
}

fn page_of(
    body: &[u8],
    loadbalancer_ids: Option<&[&str]>,
    limit: usize,
) -> Result<ListenerPage, String> {
    #[derive(serde::Deserialize)]
    struct Answer<'a> {
        #[serde(borrow, default)]
        listeners: Option<Raw<'a>>,
        #[serde(borrow, default)]
        page_info: Option<Raw<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct PageInfo<'a> {
        #[serde(borrow, default)]
        next_marker: Option<Cow<'a, str>>,
    }
    let answer: Answer<'_> =
        serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?;
    let items = answer.listeners.ok_or("no `listeners` array")?;
    let mut page = ListenerPage {
        next_marker: answer
            .page_info
            .and_then(object::<PageInfo<'_>>)
            .and_then(|p| p.next_marker)
            .filter(|m| !m.is_empty())
            .map(Cow::into_owned),
        ..Default::default()
    };
    let counted = for_each_item_until(items, limit, |item| {
        let raw: Option<ListenerItem<'_>> = object(item);
        let id = raw
            .as_ref()
            .and_then(|r| r.id.as_deref())
            .filter(|s| !s.is_empty());
        if let Some(id) = id {
            page.last_id = Some(id.to_string());
        }
        match raw
            .as_ref()
            .and_then(|r| listener(r, id?, loadbalancer_ids))
        {
            Some((_, l)) if l.port == 0 => {
                page.skipped += 1;
                page.unattributable += 1;
            }
            Some(pair) => page.listeners.push(pair),
            None => page.skipped += 1,
        }
    });
    page.raw_count = match counted {
        Ok(n) => n,
        Err(e) if e.starts_with("more than") => {
            return Err(format!("a page of listeners with {e} (limit {limit})"));
        }
        Err(_) => return Err("no `listeners` array".into()),
    };
    Ok(page)
}

/// The fields of a listener the exporter reads; the others are skipped without being stored.
#[derive(serde::Deserialize)]
struct ListenerItem<'a> {
    #[serde(borrow, default, deserialize_with = "lenient_str")]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "lenient_str")]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "lenient_str")]
    protocol: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    protocol_port: Option<Raw<'a>>,
    #[serde(borrow, default)]
    loadbalancers: Option<Raw<'a>>,
}

/// A string field, or `None` when it holds anything else (the item is then judged by what is missing).
fn lenient_str<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    let raw: Raw<'de> = serde::Deserialize::deserialize(d)?;
    Ok(serde_json::from_str::<Cow<'de, str>>(raw.get()).ok())
}

fn listener(
    item: &ListenerItem<'_>,
    id: &str,
    asked: Option<&[&str]>,
) -> Option<(String, Listener)> {
    let protocol = item.protocol.as_deref()?.to_string();
    let port: u64 = {
        let raw = item.protocol_port?.get();
        match serde_json::from_str::<Cow<'_, str>>(raw) {
            Ok(s) => s.trim().parse().ok()?,
            Err(_) => raw.parse().ok()?,
        }
    };
    let port = u16::try_from(port).ok()?;
    // The first named load balancer that was asked for (any, for a project-wide listing); none named
    // means the only one asked.
    let mut named = false;
    let mut hit: Option<String> = None;
    if let Some(list) = item.loadbalancers {
        #[derive(serde::Deserialize)]
        struct LbRef<'a> {
            #[serde(borrow, default, deserialize_with = "lenient_str")]
            id: Option<Cow<'a, str>>,
        }
        // Not an array: treated as naming none, as before.
        let _ = for_each_item(list, |lb| {
            if let Some(LbRef { id: Some(lb) }) = object::<LbRef<'_>>(lb) {
                named = true;
                let wanted = asked.is_none_or(|a| a.contains(&&*lb));
                if hit.is_none() && wanted {
                    hit = Some(lb.into_owned());
                }
            }
        });
    }
    let lb = if named {
        hit?
    } else {
        match asked {
            Some([only]) => only.to_string(),
            _ => return None,
        }
    };
    let name = item.name.as_deref().unwrap_or_default().to_string();
    Some((
        lb,
        Listener {
            id: id.to_string(),
            name,
            protocol,
            port,
        },
    ))
}

/// One page of an ELB collection other than listeners (`pools`, `l7policies`).
#[derive(Debug)]
pub struct ItemPage<T> {
    /// The items `parse` accepted.
    pub items: Vec<T>,
    /// Items in the page, accepted or not: a full page means another may follow.
    pub raw_count: usize,
    /// Id of the page's last item: the marker of the next page where no `next_marker` is given.
    pub last_id: Option<String>,
    /// `page_info.next_marker`, when the API gives one.
    pub next_marker: Option<String>,
    /// Items `parse` refused (counted in `elb_exporter_skipped_items_total`).
    pub skipped: usize,
}

/// Parses a v2 or v3 page of `collection`, keeping the items `parse` accepts. Items are read one at
/// a time (only one is ever held as a JSON tree); a page with more than `limit` items is malformed.
pub fn item_page<T>(
    body: &[u8],
    collection: &str,
    limit: usize,
    parse: fn(&Value) -> Option<T>,
) -> Result<ItemPage<T>, String> {
    #[derive(serde::Deserialize)]
    struct PageInfo<'a> {
        #[serde(borrow, default)]
        next_marker: Option<Cow<'a, str>>,
    }
    let answer: HashMap<Cow<'_, str>, Raw<'_>> =
        serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?;
    let items = *answer
        .get(collection)
        .ok_or_else(|| format!("no `{collection}` array"))?;
    let mut page = ItemPage {
        items: Vec::new(),
        raw_count: 0,
        last_id: None,
        next_marker: answer
            .get("page_info")
            .and_then(|p| object::<PageInfo<'_>>(p))
            .and_then(|p| p.next_marker)
            .filter(|m| !m.is_empty())
            .map(Cow::into_owned),
        skipped: 0,
    };
    let counted = for_each_item_until(items, limit, |raw| {
        let item: Value = object(raw).unwrap_or(Value::Null);
        if let Some(id) = item
            .get("id")
            .and_then(|i| i.as_str())
            .filter(|s| !s.is_empty())
        {
            page.last_id = Some(id.to_string());
        }
        match parse(&item) {
            Some(t) => page.items.push(t),
            None => page.skipped += 1,
        }
    });
    page.raw_count = match counted {
        Ok(n) => n,
        Err(e) if e.starts_with("more than") => {
            return Err(format!("a page of {collection} with {e} (limit {limit})"));
        }
        Err(_) => return Err(format!("no `{collection}` array")),
    };
    Ok(page)
}

fn nonempty_str(item: &Value, key: &str) -> Option<String> {
    item.get(key)
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// A pool needs an id; `listeners[]` may be empty or absent.
pub fn pool(item: &Value) -> Option<crate::cloud::Pool> {
    Some(crate::cloud::Pool {
        id: nonempty_str(item, "id")?,
        name: nonempty_str(item, "name").unwrap_or_default(),
        protocol: nonempty_str(item, "protocol").unwrap_or_default(),
        listeners: item
            .get("listeners")
            .and_then(|l| l.as_array())
            .map(|a| a.iter().filter_map(|x| nonempty_str(x, "id")).collect())
            .unwrap_or_default(),
    })
}

/// A load balancer needs an id.
pub fn loadbalancer(item: &Value) -> Option<crate::cloud::LoadBalancer> {
    Some(crate::cloud::LoadBalancer {
        id: nonempty_str(item, "id")?,
        name: nonempty_str(item, "name").unwrap_or_default(),
        vip_address: nonempty_str(item, "vip_address").unwrap_or_default(),
        guaranteed: item.get("guaranteed").and_then(|g| g.as_bool()),
    })
}

/// A policy needs an id and its listener.
pub fn l7policy(item: &Value) -> Option<crate::cloud::L7Policy> {
    Some(crate::cloud::L7Policy {
        id: nonempty_str(item, "id")?,
        listener_id: nonempty_str(item, "listener_id")?,
        action: nonempty_str(item, "action").unwrap_or_default(),
        redirect_pool_id: nonempty_str(item, "redirect_pool_id"),
    })
}

/// The match key of a metric: namespace, metric name and the dimension set in sorted order, joined with
/// separators that cannot occur in them (one allocation per entry, not one per dimension).
fn match_key<'k>(ns: &str, name: &str, dims: impl Iterator<Item = (&'k str, &'k str)>) -> String {
    let mut d: Vec<(&str, &str)> = dims.collect();
    d.sort_unstable();
    let mut key = String::with_capacity(ns.len() + name.len() + d.len() * 64 + 8);
    key.push_str(ns);
    key.push('\0');
    key.push_str(name);
    for (k, v) in d {
        key.push('\0');
        key.push_str(k);
        key.push('\u{1}');
        key.push_str(v);
    }
    key
}

// Typed views of a CES answer, borrowing from the body. Entries and datapoints are parsed one by one from
// raw slices, so a bad one is skipped and counted instead of failing the whole answer.
#[derive(serde::Deserialize)]
struct CesAnswer<'a> {
    #[serde(borrow, default)]
    metrics: Option<&'a serde_json::value::RawValue>,
}

#[derive(serde::Deserialize)]
struct CesEntry<'a> {
    #[serde(borrow, default)]
    namespace: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    metric_name: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    dimensions: Option<Vec<CesDimension<'a>>>,
    #[serde(borrow, default)]
    datapoints: Option<&'a serde_json::value::RawValue>,
}

#[derive(serde::Deserialize)]
struct CesDimension<'a> {
    #[serde(borrow)]
    name: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    value: std::borrow::Cow<'a, str>,
}

#[derive(serde::Deserialize)]
struct CesPoint {
    timestamp: Option<i64>,
    average: Option<f64>,
    max: Option<f64>,
    min: Option<f64>,
    sum: Option<f64>,
    variance: Option<f64>,
}

impl CesPoint {
    fn value(&self, filter: Filter) -> Option<f64> {
        match filter {
            Filter::Average => self.average,
            Filter::Max => self.max,
            Filter::Min => self.min,
            Filter::Sum => self.sum,
            Filter::Variance => self.variance,
        }
    }
}

type Raw<'a> = &'a serde_json::value::RawValue;

/// Matches a CES batch answer to the request by (namespace, metric name, dimension set) and keeps the
/// newest usable datapoint per requested metric. Returns it in request order, plus skip counts.
pub fn batch_result(
    body: &[u8],
    request: &[MetricQuery],
    filter: Filter,
) -> Result<super::BatchResult, String> {
    let answer: CesAnswer<'_> =
        serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?;
    let items = answer.metrics.ok_or("no `metrics` array")?;
    let mut index: HashMap<String, usize> = HashMap::with_capacity(request.len());
    for (i, q) in request.iter().enumerate() {
        let dims = q.dimensions.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        index.insert(match_key(&q.namespace, &q.metric_name, dims), i);
    }
    let mut newest: Vec<Option<Datapoint>> = vec![None; request.len()];
    let mut seen = vec![false; request.len()];
    let (mut unmatched, mut duplicate, mut bad_point, mut bad_entry) = (0, 0, 0, 0);
    for_each_item(items, |item| {
        // A dimension that is not a {name, value} pair of strings makes the entry unusable, rather than
        // silently matching a request with fewer dimensions.
        let entry: Option<CesEntry<'_>> = serde_json::from_str(item.get()).ok();
        let Some((ns, name, dims, points)) =
            entry.and_then(|e| Some((e.namespace?, e.metric_name?, e.dimensions?, e.datapoints)))
        else {
            bad_entry += 1;
            return;
        };
        let key = match_key(&ns, &name, dims.iter().map(|d| (&*d.name, &*d.value)));
        let Some(&i) = index.get(&key) else {
            unmatched += 1;
            return;
        };
        if seen[i] {
            duplicate += 1;
        }
        seen[i] = true;
        let Some(points) = points else {
            return;
        };
        // Not an array: no usable point, as an absent list.
        let _ = for_each_item(points, |p| {
            let point: Option<CesPoint> = serde_json::from_str(p.get()).ok();
            let (ts, val) = match &point {
                Some(p) => (p.timestamp, p.value(filter)),
                None => (None, None),
            };
            match (ts, val) {
                (Some(ts), Some(val)) if ts > 0 && val.is_finite() && val >= 0.0 => {
                    if newest[i].is_none_or(|d| ts > d.timestamp_ms) {
                        newest[i] = Some(Datapoint {
                            timestamp_ms: ts,
                            value: val,
                        });
                    }
                }
                _ => bad_point += 1,
            }
        });
    })
    .map_err(|_| "no `metrics` array".to_string())?;
    let skipped = [
        ("unmatched_result", unmatched),
        ("duplicate_result", duplicate),
        ("invalid_datapoint", bad_point),
        ("invalid_result", bad_entry),
    ]
    .into_iter()
    .filter(|(_, n)| *n > 0)
    .collect();
    Ok(super::BatchResult { newest, skipped })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_shapes_from_the_reference() {
        let cases: &[(&str, Option<&str>, &str)] = &[
            (
                r#"{"error_code":"ces.0014","error_msg":"Some content in message body is not correct"}"#,
                Some("ces.0014"),
                "Some content in message body is not correct",
            ),
            (
                r#"{"error_msg":"Incorrect IAM authentication information","error_code":"APIGW.0301","request_id":"r"}"#,
                Some("APIGW.0301"),
                "Incorrect IAM authentication information",
            ),
            (
                r#"{"http_code":"403","message":{"details":"no permission","code":"403"}}"#,
                Some("403"),
                "no permission",
            ),
            (
                r#"{"code":400,"element":"Bad Request","message":"bad","details":{"details":"x","code":"ces.0014"}}"#,
                Some("ces.0014"),
                "bad",
            ),
            (
                r#"{"error":{"code":401,"message":"The request you have made requires authentication.","title":"Unauthorized"}}"#,
                Some("401"),
                "The request you have made requires authentication.",
            ),
            (
                r#"{"errorCode":"APIG.0308","errorMsg":"throttled"}"#,
                Some("APIG.0308"),
                "throttled",
            ),
            ("<html>bad gateway</html>", None, "<html>bad gateway</html>"),
            (r#""throttled""#, None, "throttled"),
            ("503", None, "503"),
            (
                r#"{"details":"","error":{"code":401,"message":"m"}}"#,
                Some("401"),
                "m",
            ),
            ("", None, ""),
        ];
        for (body, code, msg) in cases {
            let (c, m) = error_fields(body.as_bytes());
            assert_eq!(c.as_deref(), *code, "{body}");
            assert_eq!(m, *msg, "{body}");
        }
    }

    #[test]
    fn a_dimension_that_is_not_a_string_pair_makes_the_entry_invalid() {
        let req = vec![MetricQuery {
            namespace: "SYS.ELB".into(),
            metric_name: "m1_cps".into(),
            dimensions: vec![("lbaas_instance_id".into(), "a".into())],
        }];
        let body = br#"{"metrics":[{"namespace":"SYS.ELB","metric_name":"m1_cps","dimensions":[
            {"name":"lbaas_instance_id","value":"a"},{"name":"lbaas_listener_id","value":5}],
            "datapoints":[{"average":1.0,"timestamp":1}]}]}"#;
        let r = batch_result(body, &req, Filter::Average).unwrap();
        assert_eq!(r.newest, vec![None]);
        assert_eq!(r.skipped, vec![("invalid_result", 1)]);
    }

    #[test]
    fn an_out_of_range_number_skips_only_its_datapoint() {
        let req = vec![MetricQuery {
            namespace: "SYS.ELB".into(),
            metric_name: "m1_cps".into(),
            dimensions: vec![("lbaas_instance_id".into(), "a".into())],
        }];
        let body = br#"{"metrics":[{"namespace":"SYS.ELB","metric_name":"m1_cps",
            "dimensions":[{"name":"lbaas_instance_id","value":"a"}],
            "datapoints":[{"average":1e999,"timestamp":2},{"average":7.5,"timestamp":1}]}]}"#;
        let r = batch_result(body, &req, Filter::Average).unwrap();
        assert_eq!(
            r.newest,
            vec![Some(Datapoint {
                timestamp_ms: 1,
                value: 7.5
            })]
        );
        assert_eq!(r.skipped, vec![("invalid_datapoint", 1)]);
    }

    #[test]
    fn a_port_0_listener_is_unattributable_not_invalid() {
        let body = br#"{"listeners":[
            {"id":"a","protocol":"IP","protocol_port":0,"loadbalancers":[{"id":"lb"}]},
            {"id":"b","protocol":"TCP","protocol_port":"0"},
            {"id":"c","protocol":"TCP","protocol_port":80},
            {"id":"d","protocol":"TCP","protocol_port":-1}
        ]}"#;
        let p = listener_page(body, &["lb"]).unwrap();
        assert_eq!(p.listeners.len(), 1);
        assert_eq!((p.skipped, p.unattributable), (3, 2));
    }

    #[test]
    fn listener_page_skips_bad_items_and_tracks_marker() {
        let body = br#"{"listeners":[
            {"id":"a","name":"n1","protocol":"TCP","protocol_port":80,"loadbalancers":[{"id":"lb"}],"extra":{"x":1}},
            {"id":"b","protocol":"HTTP","protocol_port":"8080"},
            {"id":"c","protocol":"TCP","protocol_port":70000},
            {"id":"d","protocol":"TCP","protocol_port":81,"loadbalancers":[{"id":"other"}]},
            {"name":"no id","protocol":"TCP","protocol_port":1}
        ], "page_info": {"next_marker": "d"}}"#;
        let p = listener_page(body, &["lb"]).unwrap();
        assert_eq!(p.raw_count, 5);
        assert_eq!(p.skipped, 3);
        assert_eq!(p.last_id.as_deref(), Some("d"));
        assert_eq!(p.next_marker.as_deref(), Some("d"));
        assert_eq!(p.listeners.len(), 2);
        assert_eq!(p.listeners[1].1.port, 8080);
        assert_eq!(p.listeners[1].1.name, "");
        assert_eq!(p.listeners[1].0, "lb");
        assert_eq!(p.unattributable, 0);
        // Several load balancers asked: a listener must name its own.
        let p = listener_page(body, &["lb", "other"]).unwrap();
        assert_eq!(p.listeners.len(), 2);
        assert_eq!(p.listeners[1].0, "other");
    }

    #[test]
    fn project_wide_page_attributes_each_listener_to_its_own_load_balancer() {
        let body = br#"{"listeners":[
            {"id":"a","protocol":"TCP","protocol_port":80,"loadbalancers":[{"id":"lb1"}]},
            {"id":"b","protocol":"TCP","protocol_port":81,"loadbalancers":[{"id":"lb2"},{"id":"lb1"}]},
            {"id":"c","protocol":"TCP","protocol_port":82}
        ]}"#;
        let p = listener_page_all(body).unwrap();
        assert_eq!(p.raw_count, 3);
        let got: Vec<(&str, &str)> = p
            .listeners
            .iter()
            .map(|(lb, l)| (lb.as_str(), l.id.as_str()))
            .collect();
        assert_eq!(got, [("lb1", "a"), ("lb2", "b")]);
        assert_eq!(
            p.skipped, 1,
            "a listener naming no load balancer cannot be attributed"
        );
        assert_eq!(p.last_id.as_deref(), Some("c"));
    }

    #[test]
    fn pool_page_is_bounded_by_its_limit_and_skips_bad_items() {
        let body = br#"{"pools":[
            {"id":"p1","name":"k8s_default_web-80_HTTP-80","protocol":"HTTP","listeners":[{"id":"l1"}]},
            {"name":"no id"},
            "not an object",
            {"id":"p4","listeners":[]}
        ],"page_info":{"next_marker":"p4"}}"#;
        let p = item_page(body, "pools", 4, pool).unwrap();
        assert_eq!(p.raw_count, 4);
        let ids: Vec<&str> = p.items.iter().map(|x| x.id.as_str()).collect();
        assert_eq!(ids, ["p1", "p4"]);
        assert_eq!(p.items[0].listeners, ["l1"]);
        assert_eq!(p.skipped, 2);
        assert_eq!(p.last_id.as_deref(), Some("p4"));
        assert_eq!(p.next_marker.as_deref(), Some("p4"));
        // More items than the request asked for: malformed, not read further.
        let err = item_page(body, "pools", 3, pool).unwrap_err();
        assert!(err.contains("more than 3"), "{err}");
        assert!(item_page(br#"{"l7policies":[]}"#, "pools", 3, pool).is_err());
        assert!(item_page(br#"{"pools":{}}"#, "pools", 3, pool).is_err());
    }
}
