//! The simulated Cloud Eye: the batch metric query, its validation, limits and budget.

use super::{
    Inner, Reply, SimApi, SimRequest,
    data::{Family, MINUTE_MS, hash_u64, metric_spec, points},
    elb::is_l7,
    now_ms, throttled,
};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Map, Value, json};
use std::time::{Duration, Instant};

pub(super) const CES_MAX_BODY: usize = 512 * 1024;
const CES_MAX_POINTS: i64 = 3000;
pub(super) const CES_MAX_METRICS: usize = 500;

const CES_PERIODS: [&str; 6] = ["1", "300", "1200", "3600", "14400", "86400"];
const CES_FILTERS: [&str; 5] = ["average", "max", "min", "sum", "variance"];

pub(super) fn ces_error(status: StatusCode, code: &str, msg: &str) -> Reply {
    Reply::error(status, code, &json!({"error_code": code, "error_msg": msg}))
}

fn ces_body_error(detail: &str) -> Reply {
    ces_error(
        StatusCode::BAD_REQUEST,
        "ces.0014",
        &format!("Some content in message body is not correct, error message: {detail}"),
    )
}

impl Inner {
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

    pub(super) fn batch_query(
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
        let q = match self.valid_query(body) {
            Ok(q) => q,
            Err(reply) => return reply,
        };
        let n = q.metrics.len() as i64;
        let mut from = q.from;
        if n.saturating_mul(q.to - from) > CES_MAX_POINTS.saturating_mul(q.period_ms) {
            from = q.to - (CES_MAX_POINTS / n) * q.period_ms;
            rec.budget_from = Some(from);
        }
        let from = from.div_euclid(q.period_ms) * q.period_ms;
        let targets = self.resolve_targets(pid, &q.metrics);
        let series = self.series(&q, &targets, from);
        let entries: Vec<Value> = q
            .metrics
            .iter()
            .zip(series)
            .map(|(m, s)| metric_entry(m, s, &q.filter))
            .collect();
        let order = response_order(&q.metrics);
        let mut slots: Vec<Option<Value>> = entries.into_iter().map(Some).collect();
        let shuffled: Vec<Value> = order
            .into_iter()
            .filter_map(|i| slots.get_mut(i).and_then(Option::take))
            .collect();
        Reply::ok(&json!({"metrics": shuffled}))
    }

    /// The body's query, within the size and metric-count limits; else the `ces.0014` reply.
    fn valid_query(&self, body: &[u8]) -> Result<CesQuery, Reply> {
        if body.len() > CES_MAX_BODY {
            return Err(ces_body_error(&format!(
                "request body is {} bytes, the limit is {CES_MAX_BODY} bytes (512 KB)",
                body.len()
            )));
        }
        let q = serde_json::from_slice::<Value>(body)
            .map_err(|e| format!("request body is not valid JSON: {e}"))
            .and_then(|v| parse_ces_query(&v))
            .map_err(|detail| ces_body_error(&detail))?;
        if q.metrics.len() > self.cfg.ces_max_metrics {
            return Err(ces_body_error(&format!(
                "metrics: must contain 1 to {} items, got {}",
                self.cfg.ces_max_metrics,
                q.metrics.len()
            )));
        }
        Ok(q)
    }

    /// The listener (or pool) each metric's data comes from; `None` where CES has no data for it.
    /// Resolved under the lock; the data is generated outside it.
    fn resolve_targets(&self, pid: &str, metrics: &[MetricQuery]) -> Vec<Option<String>> {
        let st = self.state();
        metrics
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
    }

    /// Each metric's datapoints from `from`, published ones only, trimmed to the point budget.
    fn series(&self, q: &CesQuery, targets: &[Option<String>], from: i64) -> Vec<Vec<(i64, f64)>> {
        let now = now_ms();
        let newest = self.newest_minute(now);
        let published = |t: i64| self.cfg.publication.is_published(t, now);
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
            let quota = usize::try_from(CES_MAX_POINTS / q.metrics.len() as i64).unwrap_or(0);
            for s in &mut series {
                if s.len() > quota {
                    s.drain(..s.len() - quota);
                }
            }
        }
        series
    }
}

/// One `metrics[]` entry of the answer: the query's identity, the unit and the datapoints.
fn metric_entry(m: &MetricQuery, points: Vec<(i64, f64)>, filter: &str) -> Value {
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
    let dps = points
        .into_iter()
        .map(|(t, v)| {
            let mut dp = Map::new();
            dp.insert(filter.to_string(), json!(v));
            dp.insert("timestamp".into(), json!(t));
            Value::Object(dp)
        })
        .collect();
    e.insert("datapoints".into(), Value::Array(dps));
    Value::Object(e)
}

pub(super) fn note_ces_body(body: &[u8], rec: &mut SimRequest) {
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

pub(super) struct MetricQuery {
    namespace: String,
    pub(super) metric_name: String,
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
    let parsed = metrics
        .iter()
        .enumerate()
        .map(|(i, m)| parse_metric(i, m))
        .collect::<Result<Vec<_>, _>>()?;
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

/// `metrics[i]`: namespace, metric name and 1 to 4 dimensions.
fn parse_metric(i: usize, m: &Value) -> Result<MetricQuery, String> {
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
    let dimensions = dims
        .iter()
        .enumerate()
        .map(|(j, d)| parse_dimension(&format!("metrics[{i}].dimensions[{j}]"), d))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(MetricQuery {
        namespace: namespace.to_string(),
        metric_name: metric_name.to_string(),
        dimensions,
    })
}

/// One dimension at path `at`: a name of 1 to 32 and a value of 1 to 256 characters.
fn parse_dimension(at: &str, d: &Value) -> Result<(String, String), String> {
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
    Ok((name.to_string(), value.to_string()))
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
