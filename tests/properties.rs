//! Property tests (issue 5) for the cloud response parsers (`cloud::parse`) and for the exposition:
//! label/HELP escaping, float formatting and the rendered body.
//!
//! 1. the four parsers never panic, on arbitrary bytes and arbitrary JSON trees;
//! 2. `batch_result` equals a reference model on shuffled, duplicated, noisy well-formed answers;
//! 3. `listener_page` keeps exactly the valid listeners of the asked load balancers;
//! 4. `error_fields` recovers code and message from every reference error shape;
//! 5. `escape_label` / `escape_help` produce valid escapes that unescape back to the input;
//! 6. `Renderer::render` output parses back to exactly the expected series, and gzip matches plain;
//! 7. `projects` returns exactly the non-empty ids of the projects with the asked name.
//!
//! Case counts are modest (256) and failures are not persisted to files.

mod common;

use common::{parse_sample, parse_value};
use elb_exporter::cloud::parse::{batch_result, error_fields, listener_page, projects};
use elb_exporter::cloud::{Listener, MetricQuery};
use elb_exporter::collector::{Sample, SeriesKey, Snapshot};
use elb_exporter::config::Filter;
use elb_exporter::discovery::inventory::{Target, Targets};
use elb_exporter::exposition::{FloatFmt, Renderer, escape_help, escape_label};
use proptest::collection::vec as pvec;
use proptest::option::weighted;
use proptest::prelude::*;
use proptest::sample::{Index, select};
use serde_json::{Map, Value, json};
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

const FILTERS: [Filter; 5] = [
    Filter::Average,
    Filter::Max,
    Filter::Min,
    Filter::Sum,
    Filter::Variance,
];

// ---------------------------------------------------------------------------------------------------
// Shared generators
// ---------------------------------------------------------------------------------------------------

/// Strings rich in what matters: escapes, quotes, newlines, JSON specials, control chars, unicode.
fn tricky_string() -> impl Strategy<Value = String> {
    let ch = prop_oneof![
        3 => any::<char>(),
        2 => proptest::char::range('a', 'z'),
        2 => select(vec![
            '\\', '"', '\n', '\r', '\t', '\0', '{', '}', ',', '=', ' ', '#', 'é', '名', '😀',
            '\u{2028}', '\u{feff}', '\u{a0}',
        ]),
    ];
    pvec(ch, 0..24).prop_map(String::from_iter)
}

fn nonempty_tricky() -> impl Strategy<Value = String> {
    tricky_string().prop_filter("non-empty", |s| !s.is_empty())
}

/// Keys the parsers look at, so arbitrary trees often hit the interesting paths.
const KEYS: &[&str] = &[
    "metrics",
    "listeners",
    "projects",
    "namespace",
    "metric_name",
    "dimensions",
    "name",
    "value",
    "datapoints",
    "timestamp",
    "average",
    "max",
    "min",
    "sum",
    "variance",
    "id",
    "protocol",
    "protocol_port",
    "loadbalancers",
    "page_info",
    "next_marker",
    "error",
    "error_code",
    "error_msg",
    "errorCode",
    "errorMsg",
    "code",
    "message",
    "details",
    "detail",
    "title",
];

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        // Non-finite floats become `null` in a `Value`.
        any::<f64>().prop_map(Value::from),
        select(vec![
            0.0,
            -0.0,
            f64::MAX,
            f64::MIN,
            f64::MIN_POSITIVE,
            5e-324,
            1e300,
            -1e300,
            1.5,
            80.0
        ])
        .prop_map(Value::from),
        select(vec![
            u64::MAX,
            i64::MAX as u64,
            i64::MAX as u64 + 1,
            0,
            1,
            80,
            65535,
            65536
        ])
        .prop_map(Value::from),
        select(vec![
            "NaN",
            "nan",
            "Infinity",
            "-Infinity",
            "inf",
            "+Inf",
            "1e999",
            "-1",
            "80",
            " 80 ",
            "",
            "ces.0014",
            "400",
            "SYS.ELB",
            "m1_cps",
            "lb",
            "l",
            "p",
            "average",
        ])
        .prop_map(|s| Value::String(s.to_string())),
        tricky_string().prop_map(Value::String),
    ]
}

fn arb_json() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(10, 96, 6, |inner| {
        let key = prop_oneof![
            2 => select(KEYS).prop_map(str::to_string),
            1 => tricky_string(),
        ];
        prop_oneof![
            pvec(inner.clone(), 0..6).prop_map(Value::Array),
            pvec((key, inner), 0..6).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A tree wrapped in up to 200 levels (beyond serde_json's recursion limit of 128).
fn deep_json() -> impl Strategy<Value = Value> {
    (arb_json(), pvec(0..5usize, 0..200)).prop_map(|(v, wraps)| {
        wraps.into_iter().fold(v, |v, w| match w {
            0 => json!({ "error": v }),
            1 => json!({ "details": v, "code": "1" }),
            2 => json!({ "message": v }),
            3 => json!([v]),
            _ => json!({ "metrics": [v] }),
        })
    })
}

/// Arbitrary trees, often under the top-level key a parser expects.
fn shaped_json() -> impl Strategy<Value = Value> {
    prop_oneof![
        2 => arb_json(),
        3 => (
            select(&["metrics", "listeners", "projects", "error"][..]),
            pvec(arb_json(), 0..6),
            arb_json(),
        )
            .prop_map(|(k, items, extra)| {
                let mut m = Map::new();
                m.insert(k.to_string(), Value::Array(items));
                m.insert("page_info".into(), extra);
                Value::Object(m)
            }),
        1 => deep_json(),
    ]
}

/// Number literals a `Value` cannot produce: out of range, overlong, malformed.
const NUMBER_LITERALS: &[&str] = &[
    "1e400",
    "-1e400",
    "1e-400",
    "123456789012345678901234567890",
    "18446744073709551616",
    "-9223372036854775809",
    "9223372036854775807",
    "1.7976931348623157e308",
    "-0",
    "-0.0",
    "5e-324",
    "0.1e1",
    "1E2",
    "80.0",
    "00",
    "-",
    "1.",
    ".5",
    "NaN",
    "Infinity",
    "65536",
    "80",
];

const NUMBER_TEMPLATES: &[&str] = &[
    r#"{"metrics":[{"namespace":"SYS.ELB","metric_name":"m1_cps","dimensions":[{"name":"lbaas_listener_id","value":"l"}],"datapoints":[{"timestamp":#N,"average":#N,"max":#N,"min":#N,"sum":#N,"variance":#N}]}]}"#,
    r#"{"listeners":[{"id":"l","protocol":"TCP","protocol_port":#N,"loadbalancers":[{"id":"lb"}]}],"page_info":{"next_marker":#N}}"#,
    r#"{"code":#N,"message":"m","error":{"error_code":#N,"error_msg":#N}}"#,
    r#"{"projects":[{"name":"p","id":#N}]}"#,
];

fn number_literal_body() -> impl Strategy<Value = Vec<u8>> {
    (select(NUMBER_TEMPLATES), pvec(select(NUMBER_LITERALS), 6)).prop_map(|(t, nums)| {
        let mut out = String::new();
        for (i, part) in t.split("#N").enumerate() {
            if i > 0 {
                out.push_str(nums[(i - 1) % nums.len()]);
            }
            out.push_str(part);
        }
        out.into_bytes()
    })
}

fn arb_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        pvec(any::<u8>(), 0..256),
        // Valid JSON, then truncated or with one byte replaced.
        (shaped_json(), any::<Index>(), any::<u8>(), any::<bool>()).prop_map(|(v, at, b, cut)| {
            let mut t = serde_json::to_vec(&v).unwrap();
            if !t.is_empty() {
                let i = at.index(t.len());
                if cut {
                    t.truncate(i);
                } else {
                    t[i] = b;
                }
            }
            t
        }),
        number_literal_body(),
        (
            select(&["[", "{\"error\":", "{\"listeners\":[", "{\"a\":["][..]),
            0..5000usize
        )
            .prop_map(|(open, n)| open.repeat(n).into_bytes()),
        tricky_string().prop_map(String::into_bytes),
    ]
}

// ---------------------------------------------------------------------------------------------------
// 1. No panics
// ---------------------------------------------------------------------------------------------------

fn fuzz_request() -> Vec<MetricQuery> {
    vec![
        MetricQuery {
            namespace: "SYS.ELB".into(),
            metric_name: "m1_cps".into(),
            dimensions: vec![("lbaas_listener_id".into(), "l".into())],
        },
        MetricQuery {
            namespace: "SYS.ELB".into(),
            metric_name: "m1_cps".into(),
            dimensions: vec![],
        },
    ]
}

/// Calls all four parsers and checks the invariants that hold for any input.
fn call_all(body: &[u8], filter: Filter, project: &str) {
    let (code, msg) = error_fields(body);
    // 300 bytes (JSON) or 200 bytes (text), plus "…".
    assert!(msg.len() <= 300 + '…'.len_utf8(), "message too long");
    if let Some(c) = code {
        assert!(!c.is_empty());
    }
    if let Ok(ids) = projects(body, project) {
        assert!(ids.iter().all(|i| !i.is_empty()));
    }
    for asked in [&["lb"][..], &["lb", "other"][..], &[][..]] {
        if let Ok(p) = listener_page(body, asked) {
            assert_eq!(p.skipped + p.listeners.len(), p.raw_count);
            for (lb, l) in &p.listeners {
                assert!(asked.contains(&lb.as_str()));
                assert!(l.port > 0 && !l.id.is_empty());
            }
        }
    }
    let req = fuzz_request();
    if let Ok(r) = batch_result(body, &req, filter) {
        assert_eq!(r.newest.len(), req.len());
        for d in r.newest.iter().flatten() {
            assert!(d.timestamp_ms > 0 && d.value.is_finite() && d.value >= 0.0);
        }
        assert!(r.skipped.iter().all(|(_, n)| *n > 0));
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn parsers_never_panic_on_bytes(body in arb_bytes(), filter in select(FILTERS.to_vec()),
                                    project in prop_oneof![Just("p".to_string()), tricky_string()]) {
        call_all(&body, filter, &project);
    }

    #[test]
    fn parsers_never_panic_on_json(v in shaped_json(), filter in select(FILTERS.to_vec()),
                                   project in prop_oneof![Just("p".to_string()), tricky_string()]) {
        let body = serde_json::to_vec(&v).unwrap();
        call_all(&body, filter, &project);
    }
}

// ---------------------------------------------------------------------------------------------------
// 2. batch_result against a reference model
// ---------------------------------------------------------------------------------------------------

const NAMESPACES: &[&str] = &["SYS.ELB", "SYS.ECS", "sys.elb"];
const METRIC_NAMES: &[&str] = &["m1_cps", "m7_in_Bps", "mb_l7_qps", "m1_CPS"];
const DIM_NAMES: &[&str] = &["lbaas_instance_id", "lbaas_listener_id", "x"];
const DIM_VALUES: &[&str] = &["a", "b", "ü 名", "\"q\\", "", "a "];

type Key = (String, String, Vec<(String, String)>);

fn key(q: &MetricQuery) -> Key {
    let mut d = q.dimensions.clone();
    d.sort();
    (q.namespace.clone(), q.metric_name.clone(), d)
}

fn query() -> impl Strategy<Value = MetricQuery> {
    (
        select(NAMESPACES),
        select(METRIC_NAMES),
        pvec((select(DIM_NAMES), select(DIM_VALUES)), 0..4),
    )
        .prop_map(|(ns, name, dims)| MetricQuery {
            namespace: ns.into(),
            metric_name: name.into(),
            dimensions: dims
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
}

#[derive(Debug, Clone)]
enum Ts {
    Int(i64),
    /// Above `i64::MAX`.
    Big(u64),
    Float(f64),
    Str(String),
    Null,
    Missing,
}

#[derive(Debug, Clone)]
enum Val {
    /// A finite float (positive, zero, -0.0 or negative).
    Num(f64),
    UInt(u64),
    NegInt(i64),
    Str(String),
    Null,
    Bool(bool),
    Missing,
}

#[derive(Debug, Clone)]
struct Point {
    ts: Ts,
    val: Val,
    /// Values of the other statistics (ignored unless it is the asked one, which is skipped).
    others: Vec<(usize, f64)>,
    extra: Option<(String, Value)>,
}

fn extra_key() -> impl Strategy<Value = String> {
    tricky_string().prop_map(|s| format!("x_{s}"))
}

fn small_json() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(2, 8, 3, |inner| pvec(inner, 0..3).prop_map(Value::Array))
}

fn finite_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>().prop_filter("finite", |x| x.is_finite()),
        0.0..1e6f64,
        -1e6..0.0f64,
        select(vec![
            0.0,
            -0.0,
            5e-324,
            f64::MAX,
            f64::MIN_POSITIVE,
            1e21,
            0.1,
            -5e-324
        ]),
    ]
}

fn ts() -> impl Strategy<Value = Ts> {
    prop_oneof![
        14 => prop_oneof![
            3 => 1..6i64,
            3 => 1_700_000_000_000..1_700_000_600_000i64,
            1 => any::<i64>(),
            1 => Just(0i64),
            1 => Just(i64::MAX),
            1 => Just(i64::MIN),
            1 => -10..0i64,
        ]
        .prop_map(Ts::Int),
        1 => ((i64::MAX as u64 + 1)..=u64::MAX).prop_map(Ts::Big),
        1 => finite_f64().prop_map(Ts::Float),
        1 => select(vec!["1700000000000", "", "x", "-1"]).prop_map(|s| Ts::Str(s.into())),
        1 => Just(Ts::Null),
        1 => Just(Ts::Missing),
    ]
}

fn val() -> impl Strategy<Value = Val> {
    prop_oneof![
        8 => finite_f64().prop_map(Val::Num),
        8 => (0.0..1e6f64).prop_map(Val::Num),
        2 => prop_oneof![any::<u64>(), 0..100u64].prop_map(Val::UInt),
        1 => (i64::MIN..0).prop_map(Val::NegInt),
        2 => select(vec!["NaN", "Infinity", "-Infinity", "inf", "1.5", "1e999", ""])
            .prop_map(|s| Val::Str(s.into())),
        1 => Just(Val::Null),
        1 => any::<bool>().prop_map(Val::Bool),
        1 => Just(Val::Missing),
    ]
}

fn point() -> impl Strategy<Value = Point> {
    (
        ts(),
        val(),
        pvec((0..5usize, finite_f64()), 0..3),
        weighted(0.2, (extra_key(), small_json())),
    )
        .prop_map(|(ts, val, others, extra)| Point {
            ts,
            val,
            others,
            extra,
        })
}

/// What serde_json reads back from the text it writes for `x` (its default float parser is not
/// guaranteed to round-trip every float; that is serde_json's business, not the parser's).
fn json_f64(x: f64) -> f64 {
    serde_json::from_str(&serde_json::to_string(&x).unwrap()).unwrap()
}

/// The model: `Some((timestamp, value))` for a usable datapoint.
fn model_point(p: &Point) -> Option<(i64, f64)> {
    let Ts::Int(ts) = p.ts else { return None };
    let v = match p.val {
        Val::Num(x) => json_f64(x),
        Val::UInt(u) => u as f64,
        _ => return None,
    };
    (ts > 0 && v.is_finite() && v >= 0.0).then_some((ts, v))
}

fn point_json(p: &Point, filter: Filter) -> Value {
    let mut m = Map::new();
    match &p.ts {
        Ts::Int(t) => drop(m.insert("timestamp".into(), (*t).into())),
        Ts::Big(t) => drop(m.insert("timestamp".into(), (*t).into())),
        Ts::Float(t) => drop(m.insert("timestamp".into(), (*t).into())),
        Ts::Str(s) => drop(m.insert("timestamp".into(), s.clone().into())),
        Ts::Null => drop(m.insert("timestamp".into(), Value::Null)),
        Ts::Missing => {}
    }
    for (fi, x) in &p.others {
        if FILTERS[*fi] != filter {
            m.insert(FILTERS[*fi].as_str().into(), (*x).into());
        }
    }
    let stat = filter.as_str();
    match &p.val {
        Val::Num(x) => drop(m.insert(stat.into(), (*x).into())),
        Val::UInt(u) => drop(m.insert(stat.into(), (*u).into())),
        Val::NegInt(i) => drop(m.insert(stat.into(), (*i).into())),
        Val::Str(s) => drop(m.insert(stat.into(), s.clone().into())),
        Val::Null => drop(m.insert(stat.into(), Value::Null)),
        Val::Bool(b) => drop(m.insert(stat.into(), (*b).into())),
        Val::Missing => {}
    }
    m.insert("unit".into(), "Count".into());
    if let Some((k, v)) = &p.extra {
        m.insert(k.clone(), v.clone());
    }
    Value::Object(m)
}

#[derive(Debug, Clone)]
struct EntrySpec {
    /// `None`: `datapoints` missing (or `null` when `null_points`).
    points: Option<Vec<Point>>,
    null_points: bool,
    /// Dimension order: rotated, then maybe reversed (every order of up to three dimensions).
    rot: usize,
    rev: bool,
    extras: Vec<(String, Value)>,
}

fn entry_spec() -> impl Strategy<Value = EntrySpec> {
    (
        weighted(0.85, pvec(point(), 0..5)),
        any::<bool>(),
        0..3usize,
        any::<bool>(),
        pvec((extra_key(), small_json()), 0..2),
    )
        .prop_map(|(points, null_points, rot, rev, extras)| EntrySpec {
            points,
            null_points,
            rot,
            rev,
            extras,
        })
}

fn entry_json(q: &MetricQuery, s: &EntrySpec, filter: Filter) -> Value {
    let mut dims = q.dimensions.clone();
    if !dims.is_empty() {
        let n = dims.len();
        dims.rotate_left(s.rot % n);
    }
    if s.rev {
        dims.reverse();
    }
    let dims: Vec<Value> = dims
        .iter()
        .enumerate()
        .map(|(i, (k, v))| {
            if (i + s.rot) % 2 == 1 {
                json!({ "value": v, "name": k, "x_extra": i })
            } else {
                json!({ "name": k, "value": v })
            }
        })
        .collect();
    let mut m = Map::new();
    m.insert("namespace".into(), q.namespace.clone().into());
    m.insert("metric_name".into(), q.metric_name.clone().into());
    m.insert("dimensions".into(), Value::Array(dims));
    m.insert("unit".into(), "Count".into());
    for (k, v) in &s.extras {
        m.insert(k.clone(), v.clone());
    }
    match &s.points {
        Some(points) => drop(m.insert(
            "datapoints".into(),
            points.iter().map(|p| point_json(p, filter)).collect(),
        )),
        None if s.null_points => drop(m.insert("datapoints".into(), Value::Null)),
        None => {}
    }
    Value::Object(m)
}

/// A request altered slightly: usually no longer the same (namespace, name, dimension set).
fn near_miss(q: &MetricQuery, kind: usize) -> MetricQuery {
    let mut q = q.clone();
    match kind {
        0 => q.namespace.push('X'),
        1 => q.metric_name = q.metric_name.to_uppercase(),
        2 => {
            if q.dimensions.pop().is_none() {
                q.dimensions.push(("x".into(), "a".into()));
            }
        }
        3 => q
            .dimensions
            .push(("lbaas_listener_id".into(), "extra".into())),
        _ => match q.dimensions.first_mut() {
            Some(d) => d.1.push('\''),
            None => q.metric_name.push('_'),
        },
    }
    q
}

/// Entries that are not usable at all: a required field missing or of the wrong type.
fn malformed_json(q: &MetricQuery, kind: usize, points: &[Point], filter: Filter) -> Value {
    let spec = EntrySpec {
        points: Some(points.to_vec()),
        null_points: false,
        rot: 0,
        rev: false,
        extras: vec![],
    };
    let mut v = entry_json(q, &spec, filter);
    let m = v.as_object_mut().unwrap();
    match kind {
        0 => drop(m.remove("namespace")),
        1 => drop(m.insert("namespace".into(), 7.into())),
        2 => drop(m.remove("metric_name")),
        3 => drop(m.insert("metric_name".into(), Value::Null)),
        4 => drop(m.insert("dimensions".into(), json!({"name": "x", "value": "a"}))),
        5 => drop(m.remove("dimensions")),
        6 => return json!(null),
        _ => return json!(["namespace", q.namespace]),
    }
    v
}

#[derive(Debug, Clone)]
enum Tag {
    Requested(usize, Option<Vec<Point>>),
    Unrequested,
    Malformed,
}

#[derive(Debug, Clone)]
struct BatchCase {
    queries: Vec<MetricQuery>,
    filter: Filter,
    top_extras: Vec<(String, Value)>,
}

fn batch_case() -> impl Strategy<Value = (BatchCase, Vec<(Tag, Value)>)> {
    (pvec(query(), 0..10), select(FILTERS.to_vec()))
        .prop_flat_map(|(qs, filter)| {
            let mut seen = HashSet::new();
            let qs: Vec<MetricQuery> = qs.into_iter().filter(|q| seen.insert(key(q))).collect();
            let n = qs.len();
            (
                Just(qs),
                Just(filter),
                // Per request: 0 (no answer), 1, or several (duplicated) entries.
                pvec(pvec(entry_spec(), 0..4), n),
                pvec((query(), entry_spec()), 0..5),
                pvec((any::<Index>(), 0..5usize, entry_spec()), 0..4),
                pvec((query(), 0..8usize, pvec(point(), 0..3)), 0..3),
                pvec((extra_key(), small_json()), 0..3),
            )
        })
        .prop_map(|(qs, filter, per_req, unreq, near, bad, top_extras)| {
            let keys: HashSet<Key> = qs.iter().map(key).collect();
            let mut entries = Vec::new();
            for (i, specs) in per_req.iter().enumerate() {
                for s in specs {
                    entries.push((
                        Tag::Requested(i, s.points.clone()),
                        entry_json(&qs[i], s, filter),
                    ));
                }
            }
            for (q, s) in &unreq {
                if !keys.contains(&key(q)) {
                    entries.push((Tag::Unrequested, entry_json(q, s, filter)));
                }
            }
            if !qs.is_empty() {
                for (at, kind, s) in &near {
                    let q = near_miss(&qs[at.index(qs.len())], *kind);
                    if !keys.contains(&key(&q)) {
                        entries.push((Tag::Unrequested, entry_json(&q, s, filter)));
                    }
                }
            }
            for (q, kind, points) in &bad {
                entries.push((Tag::Malformed, malformed_json(q, *kind, points, filter)));
            }
            let case = BatchCase {
                queries: qs,
                filter,
                top_extras,
            };
            (case, entries)
        })
        .prop_flat_map(|(case, entries)| (Just(case), Just(entries).prop_shuffle()))
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn batch_result_matches_model((case, entries) in batch_case()) {
        let mut top = Map::new();
        for (k, v) in &case.top_extras {
            top.insert(k.clone(), v.clone());
        }
        top.insert(
            "metrics".into(),
            Value::Array(entries.iter().map(|(_, v)| v.clone()).collect()),
        );
        let body = serde_json::to_vec(&Value::Object(top)).unwrap();

        // The model.
        let n = case.queries.len();
        let mut candidates: Vec<Vec<(i64, f64)>> = vec![Vec::new(); n];
        let mut seen = vec![false; n];
        let (mut unmatched, mut duplicate, mut bad_point, mut bad_entry) = (0, 0, 0, 0);
        for (tag, _) in &entries {
            match tag {
                Tag::Malformed => bad_entry += 1,
                Tag::Unrequested => unmatched += 1,
                Tag::Requested(i, points) => {
                    if seen[*i] {
                        duplicate += 1;
                    }
                    seen[*i] = true;
                    for p in points.iter().flatten() {
                        match model_point(p) {
                            Some(tv) => candidates[*i].push(tv),
                            None => bad_point += 1,
                        }
                    }
                }
            }
        }
        let expected_skipped: Vec<(&str, usize)> = [
            ("unmatched_result", unmatched),
            ("duplicate_result", duplicate),
            ("invalid_datapoint", bad_point),
            ("invalid_result", bad_entry),
        ]
        .into_iter()
        .filter(|(_, c)| *c > 0)
        .collect();

        let r = batch_result(&body, &case.queries, case.filter).expect("well-formed body");
        prop_assert_eq!(r.newest.len(), n);
        for (i, got) in r.newest.iter().enumerate() {
            let max_ts = candidates[i].iter().map(|(t, _)| *t).max();
            match (max_ts, got) {
                (None, None) => {}
                (Some(t), Some(d)) => {
                    prop_assert_eq!(d.timestamp_ms, t, "request {}", i);
                    // Several usable points may share the newest timestamp: any of their values.
                    let values: Vec<u64> = candidates[i]
                        .iter()
                        .filter(|(ts, _)| *ts == t)
                        .map(|(_, v)| v.to_bits())
                        .collect();
                    prop_assert!(
                        values.contains(&d.value.to_bits()),
                        "request {}: value {} not among {:?}", i, d.value, values
                    );
                }
                (want, got) => prop_assert!(false, "request {}: want ts {:?}, got {:?}", i, want, got),
            }
        }
        prop_assert_eq!(r.skipped, expected_skipped);
    }
}

// ---------------------------------------------------------------------------------------------------
// 3. listener_page against a reference model
// ---------------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Field {
    Str(String),
    Num(i64),
    Null,
    Missing,
}

fn field(s: impl Strategy<Value = String>) -> impl Strategy<Value = Field> {
    prop_oneof![
        12 => s.prop_map(Field::Str),
        1 => any::<i64>().prop_map(Field::Num),
        1 => Just(Field::Null),
        1 => Just(Field::Missing),
    ]
}

fn put(m: &mut Map<String, Value>, k: &str, f: &Field) {
    match f {
        Field::Str(s) => drop(m.insert(k.into(), s.clone().into())),
        Field::Num(n) => drop(m.insert(k.into(), (*n).into())),
        Field::Null => drop(m.insert(k.into(), Value::Null)),
        Field::Missing => {}
    }
}

#[derive(Debug, Clone)]
enum Port {
    Num(i64),
    UNum(u64),
    Float(f64),
    /// Leading white space, ASCII digits, trailing white space.
    Digits(String, String, String),
    Junk(String),
    Null,
    Missing,
}

fn port() -> impl Strategy<Value = Port> {
    let ws = || select(vec!["", "", " ", "\t", "\n", "\u{a0}", "\u{3000}", "  "]);
    prop_oneof![
        10 => prop_oneof![
            1..65536i64,
            -10..70000i64,
            select(vec![0i64, 1, 65535, 65536, -1, i64::MIN, i64::MAX]),
        ]
        .prop_map(Port::Num),
        1 => prop_oneof![65536..=u64::MAX, 0..100u64].prop_map(Port::UNum),
        1 => select(vec![80.0, 80.5, -1.0, 1e10]).prop_map(Port::Float),
        4 => (ws(), "[0-9]{1,7}", ws()).prop_map(|(a, d, b)| Port::Digits(a.into(), d, b.into())),
        2 => select(vec!["", "80a", "-80", "8 0", "0x50", "80.0", "eighty", "+-80", "٨٠"])
            .prop_map(|s| Port::Junk(s.into())),
        1 => Just(Port::Null),
        1 => Just(Port::Missing),
    ]
}

fn model_port(p: &Port) -> Option<u16> {
    let n: u64 = match p {
        Port::Num(n) => u64::try_from(*n).ok()?,
        Port::UNum(n) => *n,
        Port::Digits(_, d, _) => d.parse().ok()?,
        _ => return None,
    };
    u16::try_from(n).ok().filter(|p| *p > 0)
}

fn port_json(p: &Port) -> Option<Value> {
    Some(match p {
        Port::Num(n) => (*n).into(),
        Port::UNum(n) => (*n).into(),
        Port::Float(f) => (*f).into(),
        Port::Digits(a, d, b) => format!("{a}{d}{b}").into(),
        Port::Junk(s) => s.clone().into(),
        Port::Null => Value::Null,
        Port::Missing => return None,
    })
}

#[derive(Debug, Clone)]
enum LbRef {
    /// `{"id": pool[i]}`, the pool being the asked ids then other ids.
    Id(Index),
    Empty,
    NoId,
    Junk,
}

#[derive(Debug, Clone)]
enum Lbs {
    Missing,
    NotArray,
    Array(Vec<LbRef>),
}

#[derive(Debug, Clone)]
enum Item {
    Listener {
        id: Field,
        name: Field,
        protocol: Field,
        port: Port,
        lbs: Lbs,
        extras: Vec<(String, Value)>,
    },
    NotObject(Value),
}

fn lb_ref() -> impl Strategy<Value = LbRef> {
    prop_oneof![
        6 => any::<Index>().prop_map(LbRef::Id),
        1 => Just(LbRef::Empty),
        1 => Just(LbRef::NoId),
        1 => Just(LbRef::Junk),
    ]
}

fn item() -> impl Strategy<Value = Item> {
    let lbs = prop_oneof![
        2 => Just(Lbs::Missing),
        1 => Just(Lbs::NotArray),
        6 => pvec(lb_ref(), 0..4).prop_map(Lbs::Array),
    ];
    let listener = (
        field(prop_oneof!["[0-9a-f-]{1,12}", tricky_string()]),
        field(tricky_string()),
        field(prop_oneof![
            select(vec!["TCP", "UDP", "HTTP", "HTTPS", "QUIC", ""]).prop_map(String::from),
            tricky_string(),
        ]),
        port(),
        lbs,
        pvec((extra_key(), small_json()), 0..2),
    )
        .prop_map(|(id, name, protocol, port, lbs, extras)| Item::Listener {
            id,
            name,
            protocol,
            port,
            lbs,
            extras,
        });
    prop_oneof![
        12 => listener,
        1 => json_leaf().prop_map(Item::NotObject),
    ]
}

fn item_json(it: &Item, pool: &[String]) -> Value {
    let (id, name, protocol, port, lbs, extras) = match it {
        Item::Listener {
            id,
            name,
            protocol,
            port,
            lbs,
            extras,
        } => (id, name, protocol, port, lbs, extras),
        Item::NotObject(v) => return v.clone(),
    };
    let mut m = Map::new();
    for (k, v) in extras {
        m.insert(k.clone(), v.clone());
    }
    put(&mut m, "id", id);
    put(&mut m, "name", name);
    put(&mut m, "protocol", protocol);
    if let Some(p) = port_json(port) {
        m.insert("protocol_port".into(), p);
    }
    match lbs {
        Lbs::Missing => {}
        Lbs::NotArray => drop(m.insert("loadbalancers".into(), json!({"id": pool[0]}))),
        Lbs::Array(refs) => {
            let a: Vec<Value> = refs
                .iter()
                .map(|r| match r {
                    LbRef::Id(i) => json!({ "id": pool[i.index(pool.len())] }),
                    LbRef::Empty => json!({ "id": "" }),
                    LbRef::NoId => json!({ "name": "lb" }),
                    LbRef::Junk => json!(5),
                })
                .collect();
            m.insert("loadbalancers".into(), Value::Array(a));
        }
    }
    Value::Object(m)
}

/// The model of one item: its id (if usable as a marker) and the listener it yields.
fn model_item(
    it: &Item,
    pool: &[String],
    asked: &[&str],
) -> (Option<String>, Option<(String, Listener)>) {
    let Item::Listener {
        id,
        name,
        protocol,
        port,
        lbs,
        ..
    } = it
    else {
        return (None, None);
    };
    let id = match id {
        Field::Str(s) if !s.is_empty() => s.clone(),
        _ => return (None, None),
    };
    let listener = (|| {
        let Field::Str(protocol) = protocol else {
            return None;
        };
        let port = model_port(port)?;
        let named: Vec<String> = match lbs {
            Lbs::Array(refs) => refs
                .iter()
                .filter_map(|r| match r {
                    LbRef::Id(i) => Some(pool[i.index(pool.len())].clone()),
                    LbRef::Empty => Some(String::new()),
                    _ => None,
                })
                .collect(),
            _ => vec![],
        };
        let lb = if named.is_empty() {
            if asked.len() == 1 {
                asked[0].to_string()
            } else {
                return None;
            }
        } else {
            named.into_iter().find(|n| asked.contains(&n.as_str()))?
        };
        let name = match name {
            Field::Str(s) => s.clone(),
            _ => String::new(),
        };
        Some((
            lb,
            Listener {
                id: id.clone(),
                name,
                protocol: protocol.clone(),
                port,
            },
        ))
    })();
    (Some(id), listener)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn listener_page_matches_model(
        asked in pvec(prop_oneof!["lb[a-z0-9-]{0,6}", "lb[ü名\"\\\\]{1,3}"], 1..4),
        others in pvec("zz[a-z0-9ü]{0,4}", 1..3),
        items in pvec(item(), 0..12),
        marker in weighted(0.7, field(tricky_string())),
        top_extras in pvec((extra_key(), small_json()), 0..2),
    ) {
        let mut asked_ids: Vec<String> = Vec::new();
        for a in asked {
            if !asked_ids.contains(&a) {
                asked_ids.push(a);
            }
        }
        let asked: Vec<&str> = asked_ids.iter().map(String::as_str).collect();
        let pool: Vec<String> = asked_ids.iter().chain(&others).cloned().collect();

        let mut top = Map::new();
        for (k, v) in &top_extras {
            top.insert(k.clone(), v.clone());
        }
        top.insert(
            "listeners".into(),
            items.iter().map(|it| item_json(it, &pool)).collect(),
        );
        if let Some(f) = &marker {
            let mut pi = Map::new();
            put(&mut pi, "next_marker", f);
            pi.insert("previous_marker".into(), "x".into());
            top.insert("page_info".into(), Value::Object(pi));
        }
        let body = serde_json::to_vec(&Value::Object(top)).unwrap();

        let mut want = Vec::new();
        let mut last_id = None;
        for it in &items {
            let (id, l) = model_item(it, &pool, &asked);
            if id.is_some() {
                last_id = id;
            }
            want.extend(l);
        }
        let want_marker = match &marker {
            Some(Field::Str(s)) if !s.is_empty() => Some(s.clone()),
            _ => None,
        };

        let p = listener_page(&body, &asked).expect("well-formed page");
        prop_assert_eq!(&p.listeners, &want);
        prop_assert_eq!(p.raw_count, items.len());
        prop_assert_eq!(p.skipped, items.len() - want.len());
        prop_assert_eq!(p.last_id, last_id);
        prop_assert_eq!(p.next_marker, want_marker);
    }
}

// ---------------------------------------------------------------------------------------------------
// 4. error_fields on the reference shapes
// ---------------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Code {
    Str(String),
    Num(u64),
}

impl Code {
    fn json(&self) -> Value {
        match self {
            Code::Str(s) => s.clone().into(),
            Code::Num(n) => (*n).into(),
        }
    }
    fn text(&self) -> String {
        match self {
            Code::Str(s) => s.clone(),
            Code::Num(n) => n.to_string(),
        }
    }
}

fn code() -> impl Strategy<Value = Code> {
    prop_oneof![
        3 => "[A-Za-z]{2,6}\\.[0-9]{4}".prop_map(Code::Str),
        2 => nonempty_tricky().prop_map(Code::Str),
        1 => "[0-9]{1,4}".prop_map(Code::Str),
        2 => any::<u64>().prop_map(Code::Num),
    ]
}

fn message() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => nonempty_tricky(),
        // Around the 300-byte truncation limit, multi-byte characters included.
        1 => pvec(prop_oneof![Just('a'), Just('é'), Just('名'), Just('😀')], 70..320)
            .prop_map(String::from_iter),
    ]
}

/// Reference truncation: at most `max` bytes on a character boundary, then "…".
fn truncated(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let end = (0..=max).rev().find(|i| s.is_char_boundary(*i)).unwrap();
    format!("{}…", &s[..end])
}

/// The reference error shapes (see the unit tests in src/cloud/parse.rs) and the code to expect.
fn reference_error(shape: usize, c: &Code, msg: &str) -> (Value, String) {
    match shape {
        0 => (
            json!({"error_code": c.json(), "error_msg": msg, "request_id": "r"}),
            c.text(),
        ),
        1 => (json!({"errorCode": c.json(), "errorMsg": msg}), c.text()),
        2 => (json!({"code": c.json(), "message": msg}), c.text()),
        3 => (
            json!({"error": {"code": c.json(), "message": msg, "title": "Unauthorized"}}),
            c.text(),
        ),
        4 => (
            json!({"http_code": "403", "message": {"details": msg, "code": c.json()}}),
            c.text(),
        ),
        5 => {
            // A nested cloud code beats the top-level HTTP number; a nested number does not.
            let want = if all_digits(&c.text()) {
                "400".to_string()
            } else {
                c.text()
            };
            (
                json!({"code": 400, "element": "Bad Request", "message": msg,
                       "details": {"details": "x", "code": c.json()}}),
                want,
            )
        }
        _ => (
            json!({"error": {"error_code": c.json(), "error_msg": msg}, "code": 500}),
            if all_digits(&c.text()) {
                "500".to_string()
            } else {
                c.text()
            },
        ),
    }
}

fn all_digits(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn error_fields_recovers_reference_shapes(
        shape in 0..7usize,
        c in code(),
        msg in message(),
        extras in pvec((extra_key(), small_json()), 0..3),
    ) {
        let (mut body, want_code) = reference_error(shape, &c, &msg);
        for (k, v) in extras {
            body.as_object_mut().unwrap().insert(k, v);
        }
        let bytes = serde_json::to_vec(&body).unwrap();
        let (got_code, got_msg) = error_fields(&bytes);
        prop_assert_eq!(got_code.as_deref(), Some(want_code.as_str()));
        prop_assert_eq!(got_msg, truncated(&msg, 300));
    }

    /// An empty string is treated as absent for `message`/`error_msg`/`errorMsg`, but not for `details`:
    /// an empty top-level `details` hides the nested message of shapes 3, 4 and 6.
    /// Minimal: `{"details":"","error":{"code":401,"message":"m"}}` gives `(Some("401"), "")`, not "m".
    #[test]
    fn error_fields_ignores_empty_details(shape in 0..7usize, c in code(), msg in message()) {
        let (mut body, _) = reference_error(shape, &c, &msg);
        let plain = error_fields(&serde_json::to_vec(&body).unwrap());
        let m = body.as_object_mut().unwrap();
        if !m.contains_key("details") {
            m.insert("details".into(), "".into());
        }
        let with_empty = error_fields(&serde_json::to_vec(&body).unwrap());
        prop_assert_eq!(with_empty, plain);
    }

    #[test]
    fn error_fields_on_text(text in tricky_string(), long in pvec(Just('名'), 0..100)) {
        let body = format!("<html>{text}{}</html>", String::from_iter(long));
        let (code, msg) = error_fields(body.as_bytes());
        prop_assert_eq!(code, None);
        prop_assert_eq!(msg, truncated(body.trim(), 200));
    }
}

// ---------------------------------------------------------------------------------------------------
// 5. Label and HELP escaping
// ---------------------------------------------------------------------------------------------------

/// Reference unescaping of a label value: `\\`, `\"`, `\n`; anything else after `\`, a trailing `\`
/// or a bare `"` is invalid.
fn unescape_label(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next()? {
                '\\' => out.push('\\'),
                '"' => out.push('"'),
                'n' => out.push('\n'),
                _ => return None,
            },
            '"' | '\n' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

/// Reference unescaping of HELP text: `\\` and `\n` only.
fn unescape_help(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next()? {
                '\\' => out.push('\\'),
                'n' => out.push('\n'),
                _ => return None,
            },
            '\n' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

/// Every `"` is preceded by an odd run of backslashes (so it is escaped).
fn quotes_escaped(s: &str) -> bool {
    let b = s.as_bytes();
    (0..b.len()).filter(|i| b[*i] == b'"').all(|i| {
        let run = b[..i].iter().rev().take_while(|c| **c == b'\\').count();
        run % 2 == 1
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn escape_label_round_trips(s in prop_oneof![tricky_string(), any::<String>()]) {
        let e = escape_label(&s);
        prop_assert!(!e.contains('\n'));
        prop_assert!(quotes_escaped(&e), "{:?}", e);
        prop_assert_eq!(unescape_label(&e), Some(s));
    }

    #[test]
    fn escape_help_round_trips(s in prop_oneof![tricky_string(), any::<String>()]) {
        let e = escape_help(&s);
        prop_assert!(!e.contains('\n'));
        prop_assert_eq!(e.matches('"').count(), s.matches('"').count());
        prop_assert_eq!(unescape_help(&e), Some(s));
    }

    #[test]
    fn float_fmt_round_trips(x in prop_oneof![any::<f64>(), finite_f64()]) {
        let t = FloatFmt(x).to_string();
        let back = parse_value(&t).expect("parses");
        prop_assert_eq!(canonical_bits(back), canonical_bits(x), "{}", t);
    }
}

// ---------------------------------------------------------------------------------------------------
// 6. Rendering
// ---------------------------------------------------------------------------------------------------

/// Bits, with every NaN the same.
fn canonical_bits(x: f64) -> u64 {
    if x.is_nan() {
        f64::NAN.to_bits()
    } else {
        x.to_bits()
    }
}

/// A sample with its value as canonical bits, so that samples compare and sort (NaN included).
type Series = (String, Vec<(String, String)>, u64);

const KNOWN_METRICS: &[&str] = &[
    "m1_cps",
    "m7_in_Bps",
    "mb_l7_qps",
    "m14_l7_rt",
    "m17_l7_upstream_rt_p99",
    "m22_in_bandwidth",
];

const MAX_LISTENERS: usize = 5;
const MAX_METRICS: usize = 5;

#[derive(Debug, Clone)]
struct RenderCase {
    prefix: String,
    metrics: Vec<String>,
    filter: Filter,
    targets: Vec<Target>,
    /// (listener id, metric index) -> (value, timestamp).
    samples: Vec<((String, u16), (f64, i64))>,
}

fn dns_label() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?"
}

fn sample_value() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>(),
        finite_f64(),
        (0..100_000u32).prop_map(f64::from),
        select(vec![
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            1e22,
            1e-7,
            0.1 + 0.2
        ]),
    ]
}

fn render_case() -> impl Strategy<Value = RenderCase> {
    let metrics = pvec(
        prop_oneof![
            select(KNOWN_METRICS).prop_map(String::from),
            "[a-zA-Z][a-zA-Z0-9_]{0,12}",
        ],
        1..=MAX_METRICS,
    );
    let listeners = pvec(
        prop_oneof!["[0-9a-f]{8}", nonempty_tricky()],
        1..=MAX_LISTENERS,
    );
    let target = (
        dns_label(),
        dns_label(),
        prop_oneof!["[0-9a-f-]{1,12}", tricky_string()],
        any::<Index>(),
        tricky_string(),
        any::<u16>(),
        prop_oneof![
            select(vec!["TCP", "UDP", "HTTP", "HTTPS"]).prop_map(String::from),
            tricky_string(),
        ],
    );
    (
        "[a-zA-Z_:][a-zA-Z0-9_:]{0,10}",
        metrics,
        select(FILTERS.to_vec()),
        listeners,
        pvec(target, 0..7),
        pvec(
            weighted(0.6, (sample_value(), any::<i64>())),
            MAX_LISTENERS * MAX_METRICS,
        ),
        // Samples of listeners no target has (a deleted Service) and of unknown metric indexes.
        pvec(
            (nonempty_tricky(), 0..8u16, sample_value(), any::<i64>()),
            0..3,
        ),
    )
        .prop_map(
            |(prefix, metrics, filter, listeners, targets, grid, stray)| {
                let mut ms: Vec<String> = Vec::new();
                for m in metrics {
                    if !ms.contains(&m) {
                        ms.push(m);
                    }
                }
                let mut ls: Vec<String> = Vec::new();
                for l in listeners {
                    if !ls.contains(&l) {
                        ls.push(l);
                    }
                }
                let targets: Vec<Target> = targets
                    .into_iter()
                    .map(|(ns, svc, elb, li, name, port, proto)| Target {
                        owner: elb_exporter::discovery::Owner::Service,
                        namespace: ns.into(),
                        service: svc.as_str().into(),
                        elb_id: elb.into(),
                        listener_id: ls[li.index(ls.len())].as_str().into(),
                        listener_name: name.as_str().into(),
                        port,
                        protocol: proto.into(),
                        uid: format!("uid-{svc}").into(),
                        // Any label value, escaped like the others (empty while unknown).
                        elb_name: name.into(),
                    })
                    .collect();
                let mut samples = Vec::new();
                for (li, l) in ls.iter().enumerate() {
                    for m in 0..ms.len() {
                        if let Some(s) = grid[li * MAX_METRICS + m] {
                            samples.push(((l.clone(), m as u16), s));
                        }
                    }
                }
                for (l, m, v, t) in stray {
                    if !ls.contains(&l) {
                        samples.push(((l, m), (v, t)));
                    }
                    samples.push(((ls[0].clone(), ms.len() as u16 + m), (v, t)));
                }
                RenderCase {
                    prefix,
                    metrics: ms,
                    filter,
                    targets,
                    samples,
                }
            },
        )
}

fn labels_of(t: &Target) -> Vec<(String, String)> {
    [
        ("namespace", t.namespace.to_string()),
        ("service", t.service.to_string()),
        ("lbaas_instance_id", t.elb_id.to_string()),
        ("lbaas_listener_id", t.listener_id.to_string()),
        ("listener_name", t.listener_name.to_string()),
        ("port", t.port.to_string()),
        ("protocol", t.protocol.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn render_parses_back(case in render_case()) {
        let renderer = Renderer::new(
            &case.prefix,
            Arc::new(case.metrics.clone()),
            case.filter,
            Duration::from_secs(60),
            Duration::from_secs(300),
        );
        let targets = Targets {
            listeners: case.targets.clone(),
            ..Targets::default()
        };
        let values: HashMap<SeriesKey, Sample> = case
            .samples
            .iter()
            .map(|((l, m), (v, ts))| {
                (
                    SeriesKey::new(Arc::from(l.as_str()), usize::from(*m)),
                    Sample { value: *v, timestamp_ms: *ts, fetched: tokio::time::Instant::now() },
                )
            })
            .collect();
        let snap = Snapshot {
            cycle: 1,
            values: std::sync::Arc::new(values),
            extra: Default::default(),
            first_cycle_done: true,
            up: true,
            stale_after: None,
            schedule: None,
        };
        let body = renderer.render(&targets, &snap);

        // The expected series.
        let family = |m: &str| format!("{}_sys_elb_listener_{m}", case.prefix);
        let lookup: HashMap<(&str, u16), (f64, i64)> = case
            .samples
            .iter()
            .map(|((l, m), s)| ((l.as_str(), *m), *s))
            .collect();
        let mut want: Vec<Series> = Vec::new();
        let mut newest: Option<i64> = None;
        let mut families: Vec<String> = Vec::new();
        for (mi, m) in case.metrics.iter().enumerate() {
            for t in &case.targets {
                if let Some((v, ts)) = lookup.get(&(&*t.listener_id, mi as u16)) {
                    want.push((family(m), labels_of(t), canonical_bits(*v)));
                    newest = newest.max(Some(*ts));
                    if !families.contains(&family(m)) {
                        families.push(family(m));
                    }
                }
            }
        }
        let cloud_series = want.len();
        for t in &case.targets {
            let mut labels = labels_of(t);
            labels.push(("uid".into(), t.uid.to_string()));
            labels.push(("elb_name".into(), t.elb_name.to_string()));
            want.push(("elb_exporter_listener_info".into(), labels, 1f64.to_bits()));
        }
        if !case.targets.is_empty() {
            families.push("elb_exporter_listener_info".into());
        }

        // Parse the plain body back.
        let plain_bytes = body.plain();
        let plain = std::str::from_utf8(&plain_bytes).expect("UTF-8 body");
        prop_assert!(plain.is_empty() || plain.ends_with('\n'));
        let mut got: Vec<Series> = Vec::new();
        let mut typed: Vec<String> = Vec::new();
        let mut helped: Option<String> = None;
        let mut current: Option<String> = None;
        for line in plain.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, text) = rest.split_once(' ').expect("HELP text");
                prop_assert!(helped.is_none(), "HELP twice: {}", line);
                prop_assert!(unescape_help(text).is_some(), "HELP escapes: {}", line);
                helped = Some(name.to_string());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.strip_suffix(" gauge").expect("gauge");
                let help = helped.take();
                prop_assert_eq!(help.as_deref(), Some(name), "HELP before TYPE");
                prop_assert!(!typed.iter().any(|t| t == name), "family {} twice", name);
                typed.push(name.to_string());
                current = Some(name.to_string());
            } else {
                prop_assert!(!line.starts_with('#'), "unknown comment {:?}", line);
                let s = parse_sample(line)
                    .map(|(name, labels, v)| (name, labels, canonical_bits(v)))
                    .map_err(|e| TestCaseError::fail(format!("{e}: {line:?}")))?;
                prop_assert_eq!(Some(&s.0), current.as_ref(), "sample outside its family");
                got.push(s);
            }
        }
        prop_assert!(helped.is_none());
        prop_assert_eq!(&typed, &families);
        let mut want_sorted = want.clone();
        want_sorted.sort();
        got.sort();
        prop_assert_eq!(got, want_sorted);
        prop_assert_eq!(body.series, cloud_series);
        prop_assert_eq!(body.newest_ms, newest);

        // The gzip body is the plain body.
        let mut unzipped = Vec::new();
        flate2::read::MultiGzDecoder::new(&body.gzip[..])
            .read_to_end(&mut unzipped)
            .expect("valid gzip");
        prop_assert_eq!(&unzipped[..], &plain_bytes[..]);
    }
}

// ---------------------------------------------------------------------------------------------------
// 7. projects against a reference model
// ---------------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn projects_matches_model(
        asked in prop_oneof![Just("cn-north-4".to_string()), tricky_string()],
        items in pvec(
            (
                field(prop_oneof![Just("cn-north-4".to_string()), tricky_string()]),
                field(prop_oneof!["[0-9a-f]{32}", tricky_string()]),
                any::<bool>(),
            ),
            0..8,
        ),
    ) {
        let mut want = Vec::new();
        let list: Vec<Value> = items
            .iter()
            .map(|(name, id, junk)| {
                if *junk && matches!(name, Field::Missing) {
                    return json!(["name", asked]);
                }
                let mut m = Map::new();
                put(&mut m, "name", name);
                put(&mut m, "id", id);
                m.insert("domain_id".into(), "d".into());
                if let (Field::Str(n), Field::Str(i)) = (name, id)
                    && *n == asked
                    && !i.is_empty()
                {
                    want.push(i.clone());
                }
                Value::Object(m)
            })
            .collect();
        let body = serde_json::to_vec(&json!({"projects": list, "links": {"self": "x"}})).unwrap();
        prop_assert_eq!(projects(&body, &asked), Ok(want));
    }
}
