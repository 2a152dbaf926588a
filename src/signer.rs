//! Huawei Cloud AK/SK request signing (`SDK-HMAC-SHA256`, and the opt-in derived `V11-HMAC-SHA256`).
//!
//! Pure: the caller supplies the time (as the `X-Sdk-Date` header value), the credentials and the request;
//! every intermediate stage is returned so tests can check each one against the official SDK's vectors.
//! The canonical query string returned here is also the exact query string to put on the wire, and the
//! returned headers are exactly the headers to send (trimmed values, `Host`, `Authorization`).

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

type HmacSha256 = Hmac<Sha256>;

/// SHA-256 of the empty string: the payload hash of a request without a body.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Which signature scheme to produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Algorithm {
    /// The default scheme: HMAC-SHA256 keyed directly with the SK.
    SdkHmacSha256,
    /// Derived-key scheme: the signing key is derived from AK, SK and `date/region/service`.
    V11HmacSha256 {
        /// Region id, part of the key derivation scope.
        region: String,
        /// Service name (`iam`, `elb`, `ces`), part of the key derivation scope.
        service: String,
    },
}

/// A request as the caller wants to send it. `path` is the resource path as sent (may contain `%XX`);
/// `query` holds unencoded pairs in caller order.
#[derive(Debug, Clone)]
pub struct SignRequest<'a> {
    /// HTTP method, upper case.
    pub method: &'a str,
    /// The URL authority: `host`, or `host:port` when the endpoint has a non-default port.
    pub host: &'a str,
    /// Resource path as sent.
    pub path: &'a str,
    /// Query parameters, unencoded, in caller order.
    pub query: &'a [(String, String)],
    /// Headers to sign; must hold `X-Sdk-Date` (`Host` is added from `host`).
    pub headers: &'a [(String, String)],
    /// The payload; its SHA-256 is signed.
    pub body: &'a [u8],
}

/// Every stage of a signature, plus what to put on the wire.
#[derive(Clone, PartialEq, Eq)]
pub struct Signed {
    /// The canonical request (logged on signature mismatch to compare with the gateway's).
    pub canonical_request: String,
    /// What the signature covers: algorithm, date and the canonical request's hash.
    pub string_to_sign: String,
    /// Hex HMAC-SHA256 of the string to sign.
    pub signature: String,
    /// Signed header names, `;`-joined.
    pub signed_headers: String,
    /// The `Authorization` header value.
    pub authorization: String,
    /// The query string to send, identical to the canonical one (order and encoding).
    pub query_string: String,
    /// Headers to send, in input order, values trimmed, then `Host` (if added) and `Authorization`.
    pub headers: Vec<(String, String)>,
}

// Signatures are not secrets, but the token header is: never print header values.
impl std::fmt::Debug for Signed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signed")
            .field("signed_headers", &self.signed_headers)
            .field("query_string", &self.query_string)
            .finish_non_exhaustive()
    }
}

/// Percent-encodes per the SDK rule: unreserved `A-Z a-z 0-9 - _ . ~` literal, every other byte `%XX`.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX_UPPER[(b >> 4) as usize] as char);
            out.push(HEX_UPPER[(b & 0x0f) as usize] as char);
        }
    }
    out
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// Canonical URI: decode, split on `/` (so an encoded slash becomes a separator), re-encode each segment,
/// and end with `/`.
pub fn canonical_uri(path: &str) -> String {
    let decoded = percent_decode(path);
    let mut out = decoded.split('/').map(encode).collect::<Vec<_>>().join("/");
    if !out.ends_with('/') {
        out.push('/');
    }
    out
}

/// Canonical query string: pairs sorted by raw key then raw value (byte order), each encoded.
pub fn canonical_query(query: &[(String, String)]) -> String {
    let mut pairs: Vec<&(String, String)> = query.iter().collect();
    pairs.sort_by(|a, b| {
        a.0.as_bytes()
            .cmp(b.0.as_bytes())
            .then_with(|| a.1.as_bytes().cmp(b.1.as_bytes()))
    });
    let mut out = String::new();
    for (i, (k, v)) in pairs.into_iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(&encode(k));
        out.push('=');
        out.push_str(&encode(v));
    }
    out
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(msg);
    mac.finalize().into_bytes().to_vec()
}

fn header<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Signs `req`. The `X-Sdk-Date` header must be present (it is the time input); see [`sdk_date`].
pub fn sign(req: &SignRequest<'_>, ak: &str, sk: &str, algorithm: &Algorithm) -> Signed {
    let mut headers = headers_to_sign(req);
    let date = header(&headers, "X-Sdk-Date").unwrap_or("").to_string();
    let (signed_headers, canonical_headers) = canonical_headers(&headers);
    let query_string = canonical_query(req.query);
    let canonical_request = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        req.method.to_ascii_uppercase(),
        canonical_uri(req.path),
        query_string,
        canonical_headers,
        signed_headers,
        payload_hash(&headers, req.body)
    );
    let hashed = sha256_hex(canonical_request.as_bytes());
    let (string_to_sign, signature, authorization) =
        signature(algorithm, ak, sk, &date, &hashed, &signed_headers);
    headers.push(("Authorization".to_string(), authorization.clone()));

    Signed {
        canonical_request,
        string_to_sign,
        signature,
        signed_headers,
        authorization,
        query_string,
        headers,
    }
}

/// The request's headers, trimmed, plus the ones the SDK adds before signing (`Host`, and
/// `X-Sdk-Content-Sha256: UNSIGNED-PAYLOAD` for a body that is neither JSON nor BSON).
fn headers_to_sign(req: &SignRequest<'_>) -> Vec<(String, String)> {
    let mut headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.trim().to_string()))
        .collect();
    if header(&headers, "Host").is_none() {
        headers.push(("Host".to_string(), req.host.to_string()));
    }
    // The SDK tests the raw, untrimmed value of exactly `Content-Type`, so a leading space counts.
    if let Some((_, raw)) = req.headers.iter().find(|(k, _)| k == "Content-Type")
        && !raw.starts_with("application/json")
        && !raw.starts_with("application/bson")
    {
        headers.push((
            "X-Sdk-Content-Sha256".to_string(),
            "UNSIGNED-PAYLOAD".to_string(),
        ));
    }
    headers
}

/// `(signed header names joined by ';', canonical header lines)`; names with '_' are not signed.
fn canonical_headers(headers: &[(String, String)]) -> (String, String) {
    let mut signed: Vec<(String, &str)> = headers
        .iter()
        .filter(|(k, _)| !k.contains('_'))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str()))
        .collect();
    signed.sort_by(|a, b| a.0.cmp(&b.0));
    let signed_headers = signed
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let mut canonical_headers = String::new();
    for (k, v) in &signed {
        canonical_headers.push_str(k);
        canonical_headers.push(':');
        canonical_headers.push_str(v);
        canonical_headers.push('\n');
    }
    (signed_headers, canonical_headers)
}

fn payload_hash(headers: &[(String, String)], body: &[u8]) -> String {
    if body.is_empty() {
        EMPTY_SHA256.to_string()
    } else if let Some(v) = header(headers, "X-Sdk-Content-Sha256") {
        v.to_string()
    } else {
        sha256_hex(body)
    }
}

/// `(string_to_sign, signature, authorization)` for the hashed canonical request.
fn signature(
    algorithm: &Algorithm,
    ak: &str,
    sk: &str,
    date: &str,
    hashed: &str,
    signed_headers: &str,
) -> (String, String, String) {
    match algorithm {
        Algorithm::SdkHmacSha256 => {
            let string_to_sign = format!("SDK-HMAC-SHA256\n{date}\n{hashed}");
            let signature = hex::encode(hmac_sha256(sk.as_bytes(), string_to_sign.as_bytes()));
            let authorization = format!(
                "SDK-HMAC-SHA256 Access={ak}, SignedHeaders={signed_headers}, Signature={signature}"
            );
            (string_to_sign, signature, authorization)
        }
        Algorithm::V11HmacSha256 { region, service } => {
            let day = date.get(..8).unwrap_or(date);
            let info = format!("{day}/{region}/{service}");
            let string_to_sign = format!("V11-HMAC-SHA256\n{date}\n{info}\n{hashed}");
            let prk = hmac_sha256(ak.as_bytes(), sk.as_bytes());
            let mut msg = info.clone().into_bytes();
            msg.push(0x01);
            let key = hex::encode(hmac_sha256(&prk, &msg));
            let signature = hex::encode(hmac_sha256(key.as_bytes(), string_to_sign.as_bytes()));
            let authorization = format!(
                "V11-HMAC-SHA256 Credential={ak}/{info}, SignedHeaders={signed_headers}, Signature={signature}"
            );
            (string_to_sign, signature, authorization)
        }
    }
}

/// Formats a time as an `X-Sdk-Date` value: UTC `YYYYMMDDTHHMMSSZ`.
pub fn sdk_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Parses an `X-Sdk-Date` value; `None` when it is not exactly `YYYYMMDDTHHMMSSZ`.
pub fn parse_sdk_date(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (h, mi, se) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se;
    u64::try_from(secs)
        .ok()
        .map(|s| UNIX_EPOCH + Duration::from_secs(s))
}

// Howard Hinnant's civil-date algorithms: exact for the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdk_date_round_trips() {
        let t = UNIX_EPOCH + Duration::from_secs(1_573_788_615);
        assert_eq!(sdk_date(t), "20191115T033015Z");
        assert_eq!(parse_sdk_date("20191115T033015Z"), Some(t));
        assert_eq!(sdk_date(UNIX_EPOCH), "19700101T000000Z");
        assert_eq!(
            sdk_date(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "20000229T000000Z"
        );
        for bad in [
            "",
            "20191115T033015",
            "2019111XT033015Z",
            "20191315T033015Z",
        ] {
            assert_eq!(parse_sdk_date(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn canonical_uri_examples_from_reference() {
        assert_eq!(canonical_uri("/v3/projects"), "/v3/projects/");
        assert_eq!(canonical_uri("/"), "/");
        assert_eq!(canonical_uri("/v1//x"), "/v1//x/");
        assert_eq!(canonical_uri("/v1/caf%c3%a9"), "/v1/caf%C3%A9/");
        assert_eq!(canonical_uri("/v1/a+b:c"), "/v1/a%2Bb%3Ac/");
        assert_eq!(canonical_uri("/v1/a%2Fb/c"), "/v1/a/b/c/");
    }

    #[test]
    fn query_sorts_on_raw_form() {
        let q: Vec<(String, String)> = ["a:", "a0", "a/b", "a.b"]
            .iter()
            .map(|k| (k.to_string(), "1".to_string()))
            .collect();
        assert_eq!(canonical_query(&q), "a.b=1&a%2Fb=1&a0=1&a%3A=1");
        assert_eq!(
            encode("a b+*/,=&%é名"),
            "a%20b%2B%2A%2F%2C%3D%26%25%C3%A9%E5%90%8D"
        );
    }
}
