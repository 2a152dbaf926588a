//! List requests: query parameters, `ListOptions` validation and consistent, paginated lists.

use super::{
    ApiError, FakeApiServer, json_response, lock, selectors::Filter, store::Key, to_value,
    watch::start_watch,
};
use axum::http::StatusCode;
use axum::response::Response;
use k8s_openapi::api::core::v1::Service;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;

/// Query parameters in order; like Go's `url.Values.Get`, lookups take the first occurrence.
pub(super) struct Params(Vec<(String, String)>);

impl Params {
    pub(super) fn parse(query: &str) -> Self {
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

    pub(super) fn get(&self, key: &str) -> Option<&str> {
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
pub(super) fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

pub(super) struct ListOptions {
    watch: bool,
    pub(super) resource_version: Option<String>,
    rv_match: Option<String>,
    limit: Option<u64>,
    continue_token: Option<String>,
    pub(super) timeout: Option<Duration>,
    pub(super) allow_bookmarks: bool,
    pub(super) send_initial_events: Option<bool>,
}

/// One cause of a 422: (field, reason, message).
type FieldError = (&'static str, &'static str, String);

fn forbidden(field: &'static str, detail: &str) -> FieldError {
    (field, "FieldValueForbidden", format!("Forbidden: {detail}"))
}

impl ListOptions {
    pub(super) fn parse(params: &Params, watch_path: bool) -> Result<Self, ApiError> {
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
        let errs = if self.watch {
            self.watch_errors(watch_list_enabled)
        } else {
            self.list_errors()
        };
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

    /// The validation errors of a watch: (field, reason, message).
    fn watch_errors(&self, watch_list_enabled: bool) -> Vec<FieldError> {
        let mut errs = Vec::new();
        let m = self.rv_match.as_deref();
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
        errs
    }

    /// The validation errors of a list: (field, reason, message).
    fn list_errors(&self) -> Vec<FieldError> {
        let mut errs = Vec::new();
        let m = self.rv_match.as_deref();
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
        errs
    }
}

#[derive(Clone, Copy)]
pub(super) enum Rv {
    Unset,
    Zero,
    At(u64),
}

pub(super) fn parse_rv(v: Option<&str>) -> Result<Rv, ApiError> {
    match v {
        None => Ok(Rv::Unset),
        Some(s) => match s.parse::<u64>() {
            Ok(0) => Ok(Rv::Zero),
            Ok(n) => Ok(Rv::At(n)),
            Err(_) => Err(ApiError::invalid_rv(s)),
        },
    }
}

pub(super) async fn collection(
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

pub(super) async fn list(
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
pub(super) fn encode_continue(rv: u64, last_key: &str) -> String {
    let token = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": format!("{last_key}\u{0}")});
    hex::encode(token.to_string())
}

pub(super) fn decode_continue(token: &str) -> Result<(u64, String), ApiError> {
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
