//! Authentication of the protected routes: bcrypt basic auth and a bearer token.
//!
//! bcrypt is slow on purpose, so an unauthenticated client can make the exporter burn CPU with wrong
//! passwords. The cost is bounded three ways: config refuses costs above `MAX_BCRYPT_COST`, at most
//! `MAX_CONCURRENT_VERIFICATIONS` checks run at once (more are answered 429 at once, never queued), and a
//! header that verified once is recognised by its SHA-256 without bcrypt. Checks run on blocking threads
//! only while holding a permit, so they occupy at most that many threads and never the renderer's.

use crate::config::WebSettings;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::Digest as _;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;

/// bcrypt checks running at once; a third wrong password arriving meanwhile is answered 429 at once.
/// Two, so that a Prometheus pair verifying together after a restart both get through.
pub const MAX_CONCURRENT_VERIFICATIONS: usize = 2;

/// Verified headers remembered; the set is cleared when full (only valid credentials can fill it).
const VERIFIED_CAPACITY: usize = 64;

/// The outcome of checking one request's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Credentials verified.
    Allowed,
    /// Missing or wrong credentials: answered 401.
    Denied,
    /// Every verification slot is busy: answered 429 without checking.
    Busy,
}

/// Basic-auth users (bcrypt hashes) and/or a bearer token, checked on protected routes.
pub struct WebAuth {
    users: HashMap<String, String>,
    /// The configured hash of the highest cost: unknown users are checked against it (and refused) so
    /// that they take as long as known ones and user names cannot be probed by timing.
    decoy: Option<String>,
    bearer: Option<String>,
    /// SHA-256 of `Authorization` values that verified: scrapes skip bcrypt after the first one.
    verified: Mutex<HashSet<[u8; 32]>>,
    verifying: Arc<Semaphore>,
}

fn cost(hash: &str) -> u32 {
    hash.get(4..6).and_then(|c| c.parse().ok()).unwrap_or(0)
}

impl WebAuth {
    /// `None` when `web` configures no authentication.
    pub fn from_settings(w: &WebSettings) -> Option<Arc<WebAuth>> {
        if !w.auth_enabled() {
            return None;
        }
        let users: HashMap<String, String> = w
            .basic_auth_users
            .iter()
            .map(|(u, h)| (u.clone(), h.expose().to_string()))
            .collect();
        let decoy = users.values().max_by_key(|h| cost(h)).cloned();
        Some(Arc::new(WebAuth {
            users,
            decoy,
            bearer: w.bearer_token.as_ref().map(|t| t.expose().to_string()),
            verified: Mutex::new(HashSet::new()),
            verifying: Arc::new(Semaphore::new(MAX_CONCURRENT_VERIFICATIONS)),
        }))
    }

    /// Verifies the request's `Authorization` header; bcrypt only for values not verified before.
    pub async fn check(&self, headers: &HeaderMap) -> Verdict {
        let Some(value) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        else {
            return Verdict::Denied;
        };
        if let Some(token) = value.strip_prefix("Bearer ") {
            let ok = self
                .bearer
                .as_deref()
                .is_some_and(|b| constant_time_eq(b.as_bytes(), token.trim().as_bytes()));
            return if ok {
                Verdict::Allowed
            } else {
                Verdict::Denied
            };
        }
        let Some((user, password)) = value.strip_prefix("Basic ").and_then(decode_basic) else {
            return Verdict::Denied;
        };
        let key: [u8; 32] = sha2::Sha256::digest(value.as_bytes()).into();
        if self.lock_verified().contains(&key) {
            return Verdict::Allowed;
        }
        let (hash, known) = match (self.users.get(&user), &self.decoy) {
            (Some(h), _) => (h.clone(), true),
            (None, Some(d)) => (d.clone(), false),
            (None, None) => return Verdict::Denied,
        };
        let Ok(permit) = self.verifying.clone().try_acquire_owned() else {
            return Verdict::Busy;
        };
        // The permit lives as long as the bcrypt work, even when the client goes away meanwhile.
        let matched = tokio::task::spawn_blocking(move || {
            let ok = bcrypt::verify(password, &hash).unwrap_or(false);
            drop(permit);
            ok
        })
        .await
        .unwrap_or(false);
        if !(matched && known) {
            return Verdict::Denied;
        }
        let mut verified = self.lock_verified();
        if verified.len() >= VERIFIED_CAPACITY {
            verified.clear();
        }
        verified.insert(key);
        Verdict::Allowed
    }

    fn lock_verified(&self) -> std::sync::MutexGuard<'_, HashSet<[u8; 32]>> {
        self.verified.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `user` and `password` from the base64 part of a basic `Authorization` header.
fn decode_basic(encoded: &str) -> Option<(String, String)> {
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let pair = String::from_utf8(decoded).ok()?;
    let (user, password) = pair.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(super) async fn require_auth(
    State(auth): State<Arc<WebAuth>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match auth.check(req.headers()).await {
        Verdict::Allowed => next.run(req).await,
        Verdict::Busy => {
            let mut r = (
                StatusCode::TOO_MANY_REQUESTS,
                "too many password checks at once\n",
            )
                .into_response();
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
        Verdict::Denied => {
            let mut r = (StatusCode::UNAUTHORIZED, "unauthorized\n").into_response();
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"elb-exporter\""),
            );
            r
        }
    }
}
