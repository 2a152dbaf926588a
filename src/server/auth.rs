//! Authentication of the protected routes: bcrypt basic auth and a bearer token.

use crate::config::WebSettings;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::Digest as _;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// Basic-auth users (bcrypt hashes) and/or a bearer token, checked on protected routes.
pub struct WebAuth {
    users: HashMap<String, String>,
    bearer: Option<String>,
    /// SHA-256 of recently verified `user:password` pairs: bcrypt is deliberately slow, scrapes are not.
    verified: Mutex<HashSet<[u8; 32]>>,
}

impl WebAuth {
    pub fn from_settings(w: &WebSettings) -> Option<Arc<WebAuth>> {
        if !w.auth_enabled() {
            return None;
        }
        Some(Arc::new(WebAuth {
            users: w
                .basic_auth_users
                .iter()
                .map(|(u, h)| (u.clone(), h.expose().to_string()))
                .collect(),
            bearer: w.bearer_token.as_ref().map(|t| t.expose().to_string()),
            verified: Mutex::new(HashSet::new()),
        }))
    }

    async fn allows(self: &Arc<Self>, headers: &HeaderMap) -> bool {
        let Some(value) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        else {
            return false;
        };
        if let Some(token) = value.strip_prefix("Bearer ") {
            return self
                .bearer
                .as_deref()
                .is_some_and(|b| constant_time_eq(b.as_bytes(), token.trim().as_bytes()));
        }
        let Some(encoded) = value.strip_prefix("Basic ") else {
            return false;
        };
        use base64::Engine as _;
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
            return false;
        };
        let Ok(pair) = String::from_utf8(decoded) else {
            return false;
        };
        let Some((user, password)) = pair.split_once(':') else {
            return false;
        };
        let Some(hash) = self.users.get(user).cloned() else {
            return false;
        };
        let key: [u8; 32] = sha2::Sha256::digest(pair.as_bytes()).into();
        if self
            .verified
            .lock()
            .map(|v| v.contains(&key))
            .unwrap_or(false)
        {
            return true;
        }
        let password = password.to_string();
        let ok =
            tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
                .await
                .unwrap_or(false);
        if ok && let Ok(mut v) = self.verified.lock() {
            if v.len() >= 64 {
                v.clear();
            }
            v.insert(key);
        }
        ok
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(super) async fn require_auth(
    State(auth): State<Arc<WebAuth>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if auth.allows(req.headers()).await {
        next.run(req).await
    } else {
        let mut r = (StatusCode::UNAUTHORIZED, "unauthorized\n").into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"elb-exporter\""),
        );
        r
    }
}
