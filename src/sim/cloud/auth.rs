//! Authentication of the simulated cloud: AK/SK signature verification, the key lock, project scoping,
//! IAM permissions and the IAM project listing.

use super::{
    Endpoint, Inner, Project, Reply, SimApi, apigw_error, ces::ces_error, elb::elb_error, first,
    header_str, parse_query,
};
use crate::signer::{self, Algorithm, SignRequest};
use axum::http::{HeaderMap, Method, StatusCode};
use serde_json::{Value, json};
use std::time::{Duration, Instant, SystemTime};

fn policy_allows(policy: &[String], action: &str) -> bool {
    policy.iter().any(|pattern| {
        let mut want = action.split(':');
        let mut have = pattern.split(':');
        loop {
            match (want.next(), have.next()) {
                (None, None) => return true,
                (Some(a), Some(p)) if p == "*" || p.eq_ignore_ascii_case(a) => {}
                _ => return false,
            }
        }
    })
}

pub(super) fn auth_error(detail: &str, rid: &str) -> Reply {
    apigw_error(
        StatusCode::UNAUTHORIZED,
        "APIGW.0301",
        &format!("Incorrect IAM authentication information: {detail}"),
        rid,
    )
}

fn keystone_error(status: StatusCode, msg: &str) -> Reply {
    Reply::error(
        status,
        &status.as_u16().to_string(),
        &json!({"error": {"code": status.as_u16(), "message": msg,
                          "title": status.canonical_reason().unwrap_or("Error")}}),
    )
}

impl Inner {
    /// Recomputes the signature from the request as received; failures of the configured AK count towards
    /// the lock, whatever their cause, because the gateway cannot tell a bad clock from a guessing attacker.
    pub(super) fn authenticate(
        &self,
        method: &Method,
        path: &str,
        raw_query: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<(), String> {
        let auth = header_str(headers, "authorization")
            .ok_or_else(|| "the Authorization header is missing".to_string())?;
        let parsed = parse_authorization(auth)
            .ok_or_else(|| "the Authorization header is malformed".to_string())?;
        if parsed.access != self.cfg.ak {
            return Err("verify aksk signature fail, the access key does not exist".to_string());
        }
        let now = Instant::now();
        {
            let mut st = self.state();
            match st.auth.locked_until {
                Some(until) if until > now => {
                    return Err(
                        "the access key is locked after too many failed attempts, retry later"
                            .to_string(),
                    );
                }
                Some(_) => st.auth.locked_until = None,
                None => {}
            }
        }
        let result = self.check_signature(&parsed, method, path, raw_query, headers, body);
        let mut st = self.state();
        match &result {
            Ok(()) => st.auth.failures = 0,
            Err(_) => {
                st.auth.failures += 1;
                if self.cfg.lock_after_failures > 0
                    && st.auth.failures >= self.cfg.lock_after_failures
                {
                    st.auth.failures = 0;
                    st.auth.locked_until = now.checked_add(self.cfg.lock_duration);
                }
            }
        }
        result
    }

    fn check_signature(
        &self,
        auth: &ParsedAuth<'_>,
        method: &Method,
        path: &str,
        raw_query: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<(), String> {
        let names: Vec<String> = auth
            .signed_headers
            .split(';')
            .map(|n| n.trim().to_ascii_lowercase())
            .filter(|n| !n.is_empty())
            .collect();
        for required in ["host", "x-sdk-date"] {
            if !names.iter().any(|n| n == required) {
                return Err(format!(
                    "verify aksk signature fail, {required} is not a signed header"
                ));
            }
        }
        let mut signed = Vec::with_capacity(names.len());
        for name in &names {
            if signed.iter().any(|(k, _): &(String, String)| k == name) {
                continue;
            }
            let value = header_str(headers, name).ok_or_else(|| {
                format!("verify aksk signature fail, signed header {name} is missing")
            })?;
            signed.push((name.clone(), value.to_string()));
        }
        let date = header_str(headers, "x-sdk-date").unwrap_or_default().trim();
        let when = signer::parse_sdk_date(date)
            .ok_or_else(|| format!("verify aksk signature fail, invalid X-Sdk-Date {date:?}"))?;
        let now = SystemTime::now();
        let skew = now
            .duration_since(when)
            .or_else(|_| when.duration_since(now))
            .unwrap_or(Duration::MAX);
        if skew > self.cfg.max_clock_skew {
            return Err(format!(
                "verify aksk signature fail, the request time {date} differs from the server time by more than {} s",
                self.cfg.max_clock_skew.as_secs()
            ));
        }
        if let Some(token) = &self.cfg.security_token {
            let sent = signed
                .iter()
                .find(|(k, _)| k == "x-security-token")
                .map(|(_, v)| v.trim());
            if sent != Some(token.trim()) {
                return Err(
                    "verify security token fail, X-Security-Token is missing, unsigned or invalid"
                        .to_string(),
                );
            }
        }
        let host = header_str(headers, "host").unwrap_or_default().trim();
        let query = parse_query(raw_query);
        let expected = signer::sign(
            &SignRequest {
                method: method.as_str(),
                host,
                path,
                query: &query,
                headers: &signed,
                body,
            },
            &self.cfg.ak,
            &self.cfg.sk,
            &Algorithm::SdkHmacSha256,
        );
        if ct_eq(expected.signature.as_bytes(), auth.signature.as_bytes()) {
            Ok(())
        } else {
            Err("verify aksk signature fail".to_string())
        }
    }

    pub(super) fn project_check(
        &self,
        api: SimApi,
        pid: &str,
        headers: &HeaderMap,
        rid: &str,
    ) -> Result<(), Reply> {
        let sent = header_str(headers, "x-project-id").map(str::trim);
        let exists = self.state().project_exists(pid);
        match api {
            SimApi::Ces => match sent {
                None => Err(ces_error(
                    StatusCode::BAD_REQUEST,
                    "ces.0003",
                    "The project id is not correct: the X-Project-Id header is missing",
                )),
                Some(p) if p != pid => Err(ces_error(
                    StatusCode::BAD_REQUEST,
                    "ces.0003",
                    &format!(
                        "The project id is not correct: X-Project-Id {p} does not match the URL's {pid}"
                    ),
                )),
                Some(_) if !exists => Err(ces_error(
                    StatusCode::NOT_FOUND,
                    "ces.0016",
                    &format!("The project {pid} does not exist"),
                )),
                Some(_) => Ok(()),
            },
            _ => match sent {
                None => Err(elb_error(
                    StatusCode::UNAUTHORIZED,
                    "ELB.1102",
                    "Token is error, Authentication required. (no X-Project-Id: a project-scoped credential is needed)",
                    rid,
                )),
                Some(p) if p != pid || !exists => Err(Reply::error(
                    StatusCode::FORBIDDEN,
                    "403",
                    &json!({"http_code": "403", "message": {
                        "details": format!("Forbidden: project {pid} in the URL is not the credential's project ({p})"),
                        "code": "403"}}),
                )),
                Some(_) => Ok(()),
            },
        }
    }

    /// The 403 a caller without the call's permission gets, in the service's own shape.
    pub(super) fn forbidden(&self, ep: &Endpoint, rid: &str) -> Option<Reply> {
        let action = match ep.action() {
            Some(a) => a,
            None if matches!(ep, Endpoint::AuthProjects) && !self.cfg.auth_projects_with_aksk => {
                "iam:projects:listAuth"
            }
            None => return None,
        };
        if !matches!(ep, Endpoint::AuthProjects) && policy_allows(&self.state().policy, action) {
            return None;
        }
        let denied = format!("Policy doesn't allow {action} to be performed.");
        Some(match ep.api() {
            // IAM API reference, status 403: IAM.0002.
            SimApi::Iam => Reply::error(
                StatusCode::FORBIDDEN,
                "IAM.0002",
                &json!({"error_msg": "You are not authorized to perform the requested action.",
                        "error_code": "IAM.0002"}),
            ),
            // HUAWEI_CLOUD_API.md section 7: 403 ces.0017.
            SimApi::Ces => ces_error(StatusCode::FORBIDDEN, "ces.0017", &denied),
            // One of the error shapes HUAWEI_CLOUD_API.md section 7 lists.
            SimApi::ElbV2 | SimApi::ElbV3 => Reply::error(
                StatusCode::FORBIDDEN,
                "403",
                &json!({"http_code": "403", "message": {"details": denied, "code": "403"},
                        "request_id": rid}),
            ),
        })
    }
}

impl Inner {
    pub(super) fn list_projects(
        &self,
        query: &[(String, String)],
        raw_query: &str,
        host: &str,
    ) -> Reply {
        let bool_param = |key: &str| -> Result<Option<bool>, Reply> {
            match first(query, key) {
                None => Ok(None),
                Some(v) if v.eq_ignore_ascii_case("true") => Ok(Some(true)),
                Some(v) if v.eq_ignore_ascii_case("false") => Ok(Some(false)),
                Some(v) => Err(keystone_error(
                    StatusCode::BAD_REQUEST,
                    &format!("Invalid input for field '{key}': {v:?} is not a boolean"),
                )),
            }
        };
        let (enabled, is_domain) = match (bool_param("enabled"), bool_param("is_domain")) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return e,
        };
        let page = match paging_param(query, "page", 1, u32::MAX as u64) {
            Ok(v) => v,
            Err(e) => return e,
        };
        let per_page = match paging_param(query, "per_page", 1, 5000) {
            Ok(v) => v,
            Err(e) => return e,
        };
        if page.is_some() != per_page.is_some() {
            return keystone_error(
                StatusCode::BAD_REQUEST,
                "Invalid input: page and per_page must be given together",
            );
        }
        let name = first(query, "name");
        let domain = first(query, "domain_id");
        let parent = first(query, "parent_id");
        let base = format!("http://{host}");
        let mut all: Vec<Value> = {
            let st = self.state();
            let mut projects: Vec<&Project> = st.projects.iter().collect();
            projects.sort_by(|a, b| a.name.cmp(&b.name));
            projects
                .into_iter()
                .filter(|p| name.is_none_or(|n| n == p.name))
                .filter(|_| enabled.is_none_or(|e| e))
                .filter(|_| is_domain.is_none_or(|d| !d))
                .filter(|_| domain.is_none_or(|d| d == self.domain_id))
                .filter(|_| parent.is_none_or(|d| d == self.domain_id))
                .map(|p| {
                    json!({"id": p.id, "name": p.name, "domain_id": self.domain_id,
                           "parent_id": self.domain_id, "enabled": true, "is_domain": false,
                           "description": "", "links": {"self": format!("{base}/v3/projects/{}", p.id)}})
                })
                .collect()
        };
        let (mut previous, mut next) = (Value::Null, Value::Null);
        if let (Some(page), Some(per_page)) = (page, per_page) {
            (all, previous, next) = project_page(all, page, per_page, query, &base);
        }
        let self_link = if raw_query.is_empty() {
            format!("{base}/v3/projects")
        } else {
            format!("{base}/v3/projects?{raw_query}")
        };
        Reply::ok(&json!({
            "links": {"self": self_link, "previous": previous, "next": next},
            "projects": all,
        }))
    }
}

/// Page `page` of `per_page` projects, with keystone's `previous` and `next` links (null at the ends).
fn project_page(
    all: Vec<Value>,
    page: u64,
    per_page: u64,
    query: &[(String, String)],
    base: &str,
) -> (Vec<Value>, Value, Value) {
    let total = all.len() as u64;
    let start = (page - 1).saturating_mul(per_page);
    let shown = all
        .into_iter()
        .skip(usize::try_from(start).unwrap_or(usize::MAX))
        .take(usize::try_from(per_page).unwrap_or(usize::MAX))
        .collect();
    let link = |p: u64| {
        let mut pairs: Vec<(String, String)> = query
            .iter()
            .filter(|(k, _)| k != "page" && k != "per_page")
            .cloned()
            .collect();
        pairs.push(("page".to_string(), p.to_string()));
        pairs.push(("per_page".to_string(), per_page.to_string()));
        Value::String(format!(
            "{base}/v3/projects?{}",
            signer::canonical_query(&pairs)
        ))
    };
    let previous = if page > 1 {
        link(page - 1)
    } else {
        Value::Null
    };
    let next = if page.saturating_mul(per_page) < total {
        link(page + 1)
    } else {
        Value::Null
    };
    (shown, previous, next)
}

struct ParsedAuth<'a> {
    access: &'a str,
    signed_headers: &'a str,
    signature: &'a str,
}

fn parse_authorization(value: &str) -> Option<ParsedAuth<'_>> {
    let rest = value.trim().strip_prefix("SDK-HMAC-SHA256 ")?;
    let (mut access, mut signed_headers, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let (k, v) = part.trim().split_once('=')?;
        match k.trim() {
            "Access" => access = Some(v.trim()),
            "SignedHeaders" => signed_headers = Some(v.trim()),
            "Signature" => signature = Some(v.trim()),
            _ => {}
        }
    }
    Some(ParsedAuth {
        access: access.filter(|s| !s.is_empty())?,
        signed_headers: signed_headers.filter(|s| !s.is_empty())?,
        signature: signature.filter(|s| !s.is_empty())?,
    })
}

fn paging_param(
    query: &[(String, String)],
    key: &str,
    min: u64,
    max: u64,
) -> Result<Option<u64>, Reply> {
    match first(query, key) {
        None => Ok(None),
        Some(v) => match v.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(keystone_error(
                StatusCode::BAD_REQUEST,
                &format!(
                    "Invalid input for field '{key}': {v:?} must be an integer in {min}..={max}"
                ),
            )),
        },
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
