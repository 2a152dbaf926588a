//! Single values: durations, bounded numbers, URLs and hosts, listen addresses, names (metric, DNS
//! label, annotation key) and bcrypt hashes.

use super::{ConfigError, MAX_BCRYPT_COST};
use std::time::Duration;

/// Parses `500ms`, `5s`, `2m`, `1h`, `1m30s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration; use e.g. \"500ms\", \"5s\", \"2m\", \"1h\"".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 {
            return Err(format!(
                "invalid duration {s:?}; use e.g. \"500ms\", \"5s\", \"2m\", \"1h\""
            ));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("invalid duration {s:?}: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(|b| b.is_ascii_alphabetic()).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            _ => {
                return Err(format!(
                    "invalid duration {s:?}: unit must be ms, s, m or h"
                ));
            }
        };
        total = total.saturating_add(part);
    }
    Ok(total)
}

/// Prints a duration the way the config accepts it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(3_600_000) && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Each name a CES metric name, none twice.
pub(super) fn metric_names(field: &str, metrics: &[String]) -> Result<(), ConfigError> {
    for (i, m) in metrics.iter().enumerate() {
        if !is_ces_metric_name(m) {
            return Err(ConfigError::invalid(
                &format!("{field}[{i}]"),
                m,
                "a CES metric name: 1-96 chars of [0-9A-Za-z_-], starting with a letter",
            ));
        }
        if metrics[..i].contains(m) {
            return Err(ConfigError::invalid(
                &format!("{field}[{i}]"),
                m,
                "listed twice",
            ));
        }
    }
    Ok(())
}

pub(super) fn dur(field: &str, v: Option<String>) -> Result<Option<Duration>, ConfigError> {
    match v {
        None => Ok(None),
        Some(s) => parse_duration(&s)
            .map(Some)
            .map_err(|reason| ConfigError::invalid(field, &s, reason)),
    }
}

/// A duration field, `default` when absent, within [min, max].
pub(super) fn bounded_duration(
    field: &str,
    v: Option<String>,
    default: Duration,
    min: Duration,
    max: Duration,
) -> Result<Duration, ConfigError> {
    within(field, dur(field, v)?.unwrap_or(default), min, max)
}

/// A duration within [min, max]: tokio timers and `Instant` arithmetic panic on overflow, so no value
/// reaches them unbounded.
pub(super) fn within(
    field: &str,
    d: Duration,
    min: Duration,
    max: Duration,
) -> Result<Duration, ConfigError> {
    if d < min || d > max {
        return Err(ConfigError::invalid(
            field,
            format_duration(d),
            format!(
                "must be between {} and {}",
                format_duration(min),
                format_duration(max)
            ),
        ));
    }
    Ok(d)
}

/// A literal route path: no router syntax (`:x`, `*x`, `{x}`), which the HTTP router would treat as a
/// capture or refuse with a panic, and no empty, `.` or `..` segment, which clients normalise away.
pub(super) fn is_plain_path(p: &str) -> bool {
    let Some(rest) = p.strip_prefix('/') else {
        return false;
    };
    !rest.is_empty()
        && rest.split('/').enumerate().all(|(i, seg)| {
            let last = i == rest.matches('/').count();
            (seg.is_empty() && last && i > 0)
                || (!matches!(seg, "" | "." | "..")
                    && seg.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
                    }))
        })
}

pub(super) fn non_empty(v: Option<String>) -> Option<String> {
    v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

pub(super) fn positive(
    field: &str,
    v: Option<i64>,
    default: i64,
    max: i64,
) -> Result<i64, ConfigError> {
    let n = v.unwrap_or(default);
    if n < 1 || n > max {
        return Err(ConfigError::invalid(
            field,
            n,
            format!("must be between 1 and {max}"),
        ));
    }
    Ok(n)
}

/// The cost of a bcrypt hash (`$2b$10$` + 53 characters), refused above `MAX_BCRYPT_COST`.
pub(super) fn bcrypt_cost(field: &str, h: &str) -> Result<u32, ConfigError> {
    let prefix_ok = h.starts_with("$2a$") || h.starts_with("$2b$") || h.starts_with("$2y$");
    let cost = h
        .get(4..6)
        .filter(|_| prefix_ok && h.len() == 60 && h.as_bytes()[6] == b'$')
        .and_then(|c| c.parse::<u32>().ok())
        .filter(|c| (4..=31).contains(c));
    match cost {
        None => Err(ConfigError::invalid(
            field,
            "[redacted]",
            "must be a bcrypt hash (e.g. htpasswd -nBC 10 \"\" | tr -d ':\\n')",
        )),
        Some(c) if c > MAX_BCRYPT_COST => Err(ConfigError::invalid(
            field,
            "[redacted]",
            format!(
                "bcrypt cost {c} is above {MAX_BCRYPT_COST}: every wrong password would cost that much CPU; \
                 hash again with htpasswd -nBC 10"
            ),
        )),
        Some(c) => Ok(c),
    }
}

/// `":8087"` (cloudeye style: all interfaces), `"8087"`, `"127.0.0.1:8087"` or `"[::1]:8087"`.
pub fn parse_listen(s: &str) -> Result<String, ConfigError> {
    let t = s.trim();
    let candidate = if let Some(port) = t.strip_prefix(':') {
        format!("0.0.0.0:{port}")
    } else if t.bytes().all(|b| b.is_ascii_digit()) && !t.is_empty() {
        format!("0.0.0.0:{t}")
    } else {
        t.to_string()
    };
    candidate
        .parse::<std::net::SocketAddr>()
        .map(|a| a.to_string())
        .map_err(|_| {
            ConfigError::invalid(
                "global.port",
                s,
                "must be \":PORT\" or \"HOST:PORT\" with a numeric host, e.g. \":8087\" or \"127.0.0.1:8087\"",
            )
        })
}

/// Returns (scheme, host, explicit port).
pub(super) fn parse_url(
    field: &str,
    s: &str,
    path_allowed: bool,
) -> Result<(String, String, Option<u16>), ConfigError> {
    // Every message shows the URL without its userinfo, even when it does not parse.
    let shown = without_userinfo(s);
    let s_in = s;
    let s = shown.as_str();
    let url = reqwest::Url::parse(s_in)
        .map_err(|e| ConfigError::invalid(field, s, format!("not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ConfigError::invalid(
            field,
            s,
            "scheme must be https or http",
        ));
    }
    let host = match url.host() {
        Some(url::Host::Domain(d)) => d.to_string(),
        Some(url::Host::Ipv4(a)) => a.to_string(),
        Some(url::Host::Ipv6(a)) => format!("[{a}]"),
        None => return Err(ConfigError::invalid(field, s, "has no host")),
    };
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ConfigError::invalid(
            field,
            s,
            "must not carry credentials (user:password@)",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(ConfigError::invalid(
            field,
            s,
            "must not have a query or fragment",
        ));
    }
    if !path_allowed && url.path() != "/" && !url.path().is_empty() {
        return Err(ConfigError::invalid(
            field,
            s,
            "must be scheme://host[:port] without a path",
        ));
    }
    Ok((url.scheme().to_string(), host, url.port()))
}

/// `s` with everything between `scheme://` and the last `@` removed (userinfo may hold any
/// character, so the last `@` is the only safe end), for error messages. Works on any string.
pub(super) fn without_userinfo(s: &str) -> String {
    let (scheme, rest) = match s.find("://") {
        Some(i) => s.split_at(i + 3),
        None => ("", s),
    };
    match rest.rfind('@') {
        Some(at) => format!("{scheme}{}", &rest[at + 1..]),
        None => s.to_string(),
    }
}

pub(super) fn authority(host: &str, port: Option<u16>) -> String {
    // `Url::port()` is already `None` for the scheme's default port, so the Host header matches what
    // an HTTP client sends for the same URL.
    match port {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    }
}

/// The region label of a regional IAM host (`iam.<region>.<domain>`): a second label shaped like a
/// region id (`cn-east-3`, `eu-west-101`, `eu-de`). `None` for a global IAM host or any other host.
pub(super) fn iam_region(host: &str) -> Option<&str> {
    let rest = host.strip_prefix("iam.")?;
    let (label, domain) = rest.split_once('.')?;
    let (geo, tail) = label.split_once('-')?;
    let region_like = geo.len() == 2
        && geo.bytes().all(|b| b.is_ascii_lowercase())
        && !tail.is_empty()
        && tail.split('-').all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        });
    (region_like && !domain.is_empty()).then_some(label)
}

/// The PRODUCT.md rule: the leading `iam` label replaced by the service (`iam.cn-east-3.myhuaweicloud.com`
/// → `elb.cn-east-3.myhuaweicloud.com`); a global IAM host without a region label gets the region
/// inserted (`iam.myhuaweicloud.eu` → `elb.<region>.myhuaweicloud.eu`); a host without a leading `iam`
/// label (an IP, a simulator, a private gateway) is kept as it is.
pub(super) fn derive_host(auth_host: &str, service: &str, region: &str) -> String {
    if service == "iam" {
        return auth_host.to_string();
    }
    match auth_host.split_once('.') {
        Some(("iam", rest)) if iam_region(auth_host).is_some() => format!("{service}.{rest}"),
        Some(("iam", domain)) => format!("{service}.{region}.{domain}"),
        _ => auth_host.to_string(),
    }
}

pub(super) fn is_metric_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_' || b == b':')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
}

/// CES metric names: 1-96 chars of `[0-9A-Za-z_-]`, starting with a letter.
pub fn is_ces_metric_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 96
        && s.as_bytes()[0].is_ascii_alphabetic()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        // The exported family name keeps the CES name; `-` is not allowed in Prometheus names.
        && !s.contains('-')
}

pub(super) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

pub(super) fn is_annotation_key(s: &str) -> bool {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    let prefix_ok =
        prefix.is_none_or(|p| !p.is_empty() && p.len() <= 253 && p.split('.').all(is_dns_label));
    name_ok && prefix_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        for bad in ["", "5", "5x", "s", "-1s", "1.5s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert_eq!(format_duration(Duration::from_secs(300)), "5m");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn derived_hosts() {
        assert_eq!(
            derive_host("iam.cn-east-3.myhuaweicloud.com", "ces", "cn-east-3"),
            "ces.cn-east-3.myhuaweicloud.com"
        );
        assert_eq!(
            derive_host("iam.myhuaweicloud.com", "elb", "cn-north-4"),
            "elb.cn-north-4.myhuaweicloud.com"
        );
        assert_eq!(
            derive_host("iam.eu-west-101.myhuaweicloud.eu", "elb", "eu-west-101"),
            "elb.eu-west-101.myhuaweicloud.eu"
        );
        assert_eq!(derive_host("127.0.0.1", "ces", "r"), "127.0.0.1");
    }

    #[test]
    fn listen_forms() {
        assert_eq!(parse_listen(":8087").unwrap(), "0.0.0.0:8087");
        assert_eq!(parse_listen("127.0.0.1:0").unwrap(), "127.0.0.1:0");
        assert_eq!(parse_listen("[::1]:9000").unwrap(), "[::1]:9000");
        assert!(parse_listen("localhost:x").is_err());
    }

    #[test]
    fn annotation_keys() {
        assert!(is_annotation_key("kubernetes.io/elb.id"));
        assert!(is_annotation_key("elb-id"));
        assert!(!is_annotation_key("kubernetes.io/"));
        assert!(!is_annotation_key("bad key"));
    }
}
