//! `clouds.yml`: a superset of cloudeye-exporter's file, parsed strictly (unknown keys are errors that name
//! the key), then validated into a typed [`Config`] before anything is built. Every key and its default is
//! documented in `clouds.example.yml`.

use serde::Deserialize;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A configuration problem, always naming the field path and, where there is one, the bad value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config: {0}")]
    Parse(String),
    #[error("config field `{field}` = {value:?}: {reason}")]
    Invalid {
        field: String,
        value: String,
        reason: String,
    },
}

impl ConfigError {
    fn invalid(field: &str, value: impl fmt::Display, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.to_string(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    /// The field path the error is about, when known.
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// A string that never prints: `Debug` and `Display` show `[redacted]`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Secret(String::deserialize(d)?))
    }
}

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

// ---------------------------------------------------------------------------------------------------------
// The file as written.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    global: RawGlobal,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    endpoints: RawEndpoints,
    #[serde(default)]
    discovery: RawDiscovery,
    #[serde(default)]
    collection: RawCollection,
    #[serde(default)]
    cloud: RawCloud,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    web: RawWeb,
    #[serde(default)]
    leader_election: RawLeaderElection,
}

/// cloudeye-exporter keys that load unchanged but have no effect here (the exporter is ELB-only and
/// Kubernetes-driven). They are reported once at startup.
const IGNORED_GLOBAL_KEYS: &[&str] = &[
    "eps_path",
    "metric_info_expiration_days",
    "metric_info_clean_threshold",
    "ep_ids",
    "metrics_conf_path",
    "logs_conf_path",
    "endpoints_conf_path",
    "rms_retry_times",
    "namespaces",
    "export_rms_labels",
    "client_cn",
    "unit_standardization_enabled",
    "i18n_config_file_path",
    "unit_standardization_file_path",
    "metric_timestamp_export_enabled",
    "metric_query_duration",
    "enable_https",
    "https_port",
    "tls_cert",
    "tls_key",
    "proxy_schema",
    "proxy_host",
    "proxy_port",
    "proxy_username",
    "proxy_password",
];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGlobal {
    port: Option<String>,
    metric_path: Option<String>,
    prefix: Option<String>,
    scrape_batch_size: Option<i64>,
    // cloudeye-exporter keys with an equivalent here.
    max_routines: Option<i64>,
    resource_sync_interval_minutes: Option<i64>,
    ignore_ssl_verify: Option<bool>,
    // cloudeye-exporter keys accepted for compatibility, without effect.
    eps_path: Option<serde_yaml::Value>,
    metric_info_expiration_days: Option<serde_yaml::Value>,
    metric_info_clean_threshold: Option<serde_yaml::Value>,
    ep_ids: Option<serde_yaml::Value>,
    metrics_conf_path: Option<serde_yaml::Value>,
    logs_conf_path: Option<serde_yaml::Value>,
    endpoints_conf_path: Option<serde_yaml::Value>,
    rms_retry_times: Option<serde_yaml::Value>,
    namespaces: Option<serde_yaml::Value>,
    export_rms_labels: Option<serde_yaml::Value>,
    client_cn: Option<serde_yaml::Value>,
    unit_standardization_enabled: Option<serde_yaml::Value>,
    i18n_config_file_path: Option<serde_yaml::Value>,
    unit_standardization_file_path: Option<serde_yaml::Value>,
    metric_timestamp_export_enabled: Option<serde_yaml::Value>,
    metric_query_duration: Option<serde_yaml::Value>,
    enable_https: Option<serde_yaml::Value>,
    https_port: Option<serde_yaml::Value>,
    tls_cert: Option<serde_yaml::Value>,
    tls_key: Option<serde_yaml::Value>,
    proxy_schema: Option<serde_yaml::Value>,
    proxy_host: Option<serde_yaml::Value>,
    proxy_port: Option<serde_yaml::Value>,
    proxy_username: Option<serde_yaml::Value>,
    proxy_password: Option<Secret>,
}

impl RawGlobal {
    fn ignored_present(&self) -> Vec<&'static str> {
        let present = [
            self.eps_path.is_some(),
            self.metric_info_expiration_days.is_some(),
            self.metric_info_clean_threshold.is_some(),
            self.ep_ids.is_some(),
            self.metrics_conf_path.is_some(),
            self.logs_conf_path.is_some(),
            self.endpoints_conf_path.is_some(),
            self.rms_retry_times.is_some(),
            self.namespaces.is_some(),
            self.export_rms_labels.is_some(),
            self.client_cn.is_some(),
            self.unit_standardization_enabled.is_some(),
            self.i18n_config_file_path.is_some(),
            self.unit_standardization_file_path.is_some(),
            self.metric_timestamp_export_enabled.is_some(),
            self.metric_query_duration.is_some(),
            self.enable_https.is_some(),
            self.https_port.is_some(),
            self.tls_cert.is_some(),
            self.tls_key.is_some(),
            self.proxy_schema.is_some(),
            self.proxy_host.is_some(),
            self.proxy_port.is_some(),
            self.proxy_username.is_some(),
            self.proxy_password.is_some(),
        ];
        IGNORED_GLOBAL_KEYS
            .iter()
            .zip(present)
            .filter(|(_, p)| *p)
            .map(|(k, _)| *k)
            .collect()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    auth_url: Option<String>,
    region: Option<String>,
    project_name: Option<String>,
    project_id: Option<String>,
    access_key: Option<String>,
    secret_key: Option<Secret>,
    security_token: Option<Secret>,
    credentials_reload: Option<String>,
    // cloudeye-exporter keys: the account is identified by AK/SK here.
    domain_name: Option<String>,
    domain_id: Option<String>,
    user_name: Option<String>,
    password: Option<Secret>,
    oidc: Option<serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoints {
    iam: Option<String>,
    elb: Option<String>,
    ces: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDiscovery {
    annotation: Option<String>,
    namespaces: Option<Vec<String>>,
    listener_refresh: Option<String>,
    ingresses: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCollection {
    interval: Option<String>,
    lookback: Option<String>,
    filter: Option<String>,
    metrics: Option<Vec<String>>,
    stale_intervals: Option<i64>,
    absent_as_zero: Option<bool>,
    pool_metrics: Option<Vec<String>>,
    align: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCloud {
    connect_timeout: Option<String>,
    request_timeout: Option<String>,
    max_concurrency: Option<i64>,
    ca_file: Option<String>,
    insecure_skip_verify: Option<bool>,
    #[serde(default)]
    retry: RawRetry,
    #[serde(default)]
    rate_limit: RawRateLimit,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    max_attempts: Option<i64>,
    initial_backoff: Option<String>,
    max_backoff: Option<String>,
    max_elapsed: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    iam_per_minute: Option<i64>,
    elb_per_minute: Option<i64>,
    ces_per_minute: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWeb {
    tls_cert_file: Option<String>,
    tls_key_file: Option<String>,
    basic_auth_users: Option<std::collections::BTreeMap<String, Secret>>,
    bearer_token_file: Option<String>,
    read_header_timeout: Option<String>,
    idle_timeout: Option<String>,
    max_connections: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLeaderElection {
    enabled: Option<bool>,
    lease_name: Option<String>,
    lease_namespace: Option<String>,
    identity: Option<String>,
    lease_duration: Option<String>,
    renew_deadline: Option<String>,
    retry_period: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    format: Option<String>,
}

// ---------------------------------------------------------------------------------------------------------
// The validated configuration.

/// The full, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Socket address to listen on (`global.port`, cloudeye style `":8087"` means all interfaces).
    pub listen: String,
    pub metric_path: String,
    pub prefix: String,
    pub scrape_batch_size: usize,
    pub auth: Auth,
    pub endpoints: Endpoints,
    pub discovery: Discovery,
    pub collection: Collection,
    pub cloud: CloudSettings,
    pub log: LogSettings,
    pub web: WebSettings,
    /// `leader_election`: `None` when disabled (one process collects on its own).
    pub leader_election: Option<LeaderElection>,
    /// cloudeye-exporter keys present in the file that have no effect here.
    pub ignored_keys: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Auth {
    pub auth_url: String,
    pub region: String,
    pub project_name: String,
    /// Empty: resolved through IAM from `project_name`.
    pub project_id: String,
    pub domain_id: String,
    pub credentials: Credentials,
    /// How often the config file is re-read for rotated credentials.
    pub credentials_reload: Duration,
}

/// AK/SK credentials. `Debug` never shows the SK or the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key: String,
    pub secret_key: Secret,
    pub security_token: Option<Secret>,
}

/// A parsed `scheme://host[:port]` base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub scheme: String,
    /// `host` or `host:port`, exactly as it goes into the `Host` header and the signature.
    pub authority: String,
}

impl Endpoint {
    pub fn base_url(&self) -> String {
        format!("{}://{}", self.scheme, self.authority)
    }
}

#[derive(Debug, Clone)]
pub struct Endpoints {
    pub iam: Endpoint,
    pub elb: Endpoint,
    pub ces: Endpoint,
}

#[derive(Debug, Clone)]
pub struct Discovery {
    pub annotation: String,
    pub namespaces: Vec<String>,
    pub listener_refresh: Duration,
    /// Watch CCE ELB Ingresses too (`discovery.ingresses`, default true).
    pub ingresses: bool,
}

/// CES statistic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Average,
    Max,
    Min,
    Sum,
    Variance,
}

impl Filter {
    pub fn as_str(self) -> &'static str {
        match self {
            Filter::Average => "average",
            Filter::Max => "max",
            Filter::Min => "min",
            Filter::Sum => "sum",
            Filter::Variance => "variance",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "average" => Filter::Average,
            "max" => Filter::Max,
            "min" => Filter::Min,
            "sum" => Filter::Sum,
            "variance" => Filter::Variance,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Collection {
    pub interval: Duration,
    pub lookback: Duration,
    pub filter: Filter,
    pub metrics: Vec<String>,
    /// `collection.pool_metrics`: L7 metrics of the pools behind Ingress listeners (empty: none).
    pub pool_metrics: Vec<String>,
    /// How many intervals the last good values keep being served after collection fails.
    pub stale_intervals: u32,
    /// Export 0 for a series CES had no datapoint for, under the collector's guard (opt-in).
    pub absent_as_zero: bool,
    /// Start cycles just after Cloud Eye is expected to publish the next minute (whole-minute intervals).
    pub align: bool,
}

#[derive(Debug, Clone)]
pub struct CloudSettings {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// Cloud requests in flight at once, across all APIs.
    pub max_concurrency: usize,
    pub ca_file: Option<PathBuf>,
    pub insecure_skip_verify: bool,
    pub retry: RetrySettings,
    pub rate_limit: RateLimits,
}

#[derive(Debug, Clone)]
pub struct RetrySettings {
    /// Attempts per call, the first included.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// No retry starts once this much time has passed since the first attempt.
    pub max_elapsed: Duration,
}

#[derive(Debug, Clone)]
pub struct RateLimits {
    pub iam_per_minute: u32,
    pub elb_per_minute: u32,
    pub ces_per_minute: u32,
}

/// Protection and limits of the HTTP server (like Prometheus' exporter web config). Off by default.
#[derive(Debug, Clone)]
pub struct WebSettings {
    /// PEM certificate chain and key: serve HTTPS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// user -> bcrypt hash, for HTTP basic auth on the metrics path and `/`.
    pub basic_auth_users: Vec<(String, Secret)>,
    /// Accepted `Authorization: Bearer` token, read from `web.bearer_token_file`.
    pub bearer_token: Option<Secret>,
    /// A connection must deliver a complete request within this from accept (TLS handshake included).
    pub read_header_timeout: Duration,
    /// A connection on which no request started for this long is closed (HTTP/1 keep-alive and HTTP/2).
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

/// Highest bcrypt cost accepted in `web.basic_auth_users`: cost 12 is ~0.25 s of CPU per check already,
/// and every wrong password an unauthenticated client sends costs one check.
pub const MAX_BCRYPT_COST: u32 = 12;

const DEFAULT_READ_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longer than any usual scrape interval, so Prometheus keeps reusing its connection.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
const DEFAULT_MAX_CONNECTIONS: i64 = 256;

impl Default for WebSettings {
    fn default() -> Self {
        WebSettings {
            tls: None,
            basic_auth_users: Vec::new(),
            bearer_token: None,
            read_header_timeout: DEFAULT_READ_HEADER_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS as usize,
        }
    }
}

impl WebSettings {
    pub fn auth_enabled(&self) -> bool {
        !self.basic_auth_users.is_empty() || self.bearer_token.is_some()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// `leader_election` when enabled: who competes for which Lease, and its timing (client-go's names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderElection {
    pub lease_name: String,
    pub lease_namespace: String,
    pub identity: String,
    /// How long followers wait after the last observed renewal before taking over.
    pub lease_duration: Duration,
    /// A leader that has not renewed for this long stops collecting, before the Lease can expire.
    pub renew_deadline: Duration,
    /// How often every replica tries to acquire or renew.
    pub retry_period: Duration,
}

/// Where a pod's namespace is mounted (the service account token volume).
pub const SERVICE_ACCOUNT_NAMESPACE_FILE: &str =
    "/var/run/secrets/kubernetes.io/serviceaccount/namespace";
pub const ENV_POD_NAME: &str = "POD_NAME";
pub const ENV_POD_NAMESPACE: &str = "POD_NAMESPACE";

#[derive(Debug, Clone)]
pub struct LogSettings {
    pub level: String,
    pub format: LogFormat,
}

/// The default metric set (PRODUCT.md).
/// `collection.pool_metrics` by default: the pool L7 metrics an HPA and a dashboard want.
pub const DEFAULT_POOL_METRICS: &[&str] = &[
    "mb_l7_qps",
    "m24_l7_req_Bps",
    "m25_l7_resp_Bps",
    "m17_l7_upstream_rt",
    "m15_l7_upstream_4xx",
    "m16_l7_upstream_5xx",
];

/// Each name a CES metric name, none twice.
fn metric_names(field: &str, metrics: &[String]) -> Result<(), ConfigError> {
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

pub const DEFAULT_METRICS: &[&str] = &[
    "m1_cps",
    "m1e_server_rps",
    "m1f_lvs_rps",
    "m21_client_rps",
    "m22_in_bandwidth",
    "m23_out_bandwidth",
    "m2_act_conn",
    "m3_inact_conn",
    "m4_ncps",
    "m5_in_pps",
    "m6_out_pps",
    "m7_in_Bps",
    "m8_out_Bps",
];

pub const DEFAULT_ANNOTATION: &str = "kubernetes.io/elb.id";
/// CES accepts at most this many metrics per batch call.
pub const CES_MAX_BATCH: usize = 500;
/// CES returns at most this many datapoints per call; beyond it `from` is silently moved forward.
pub const CES_DATAPOINT_BUDGET: u64 = 3000;

/// Environment variables that override the file.
pub const ENV_AK: &str = "HUAWEICLOUD_SDK_AK";
pub const ENV_SK: &str = "HUAWEICLOUD_SDK_SK";
pub const ENV_TOKEN: &str = "HUAWEICLOUD_SDK_SECURITY_TOKEN";
pub const ENV_PROJECT_ID: &str = "HUAWEICLOUD_SDK_PROJECT_ID";

impl Config {
    /// Reads and validates `path`, with the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_yaml(&text, &|k| std::env::var(k).ok())
    }

    /// Parses and validates a `clouds.yml` text; `env` supplies environment variables.
    pub fn from_yaml(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        // An empty file is an empty mapping, so that environment-only setups work.
        let raw: RawConfig = if text.trim().is_empty() {
            RawConfig::default()
        } else {
            serde_yaml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?
        };
        build(raw, env)
    }

    /// Metrics-per-call limit: the configured batch size, CES' 500, and the 3000-datapoint budget of the
    /// lookback window at 1-minute resolution (so CES never silently truncates the window).
    pub fn effective_batch_size(&self) -> usize {
        let minutes = self.collection.lookback.as_secs().div_ceil(60).max(1);
        let budget = (CES_DATAPOINT_BUDGET / minutes).max(1) as usize;
        self.scrape_batch_size.min(CES_MAX_BATCH).min(budget)
    }
}

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

fn dur(field: &str, v: Option<String>) -> Result<Option<Duration>, ConfigError> {
    match v {
        None => Ok(None),
        Some(s) => parse_duration(&s)
            .map(Some)
            .map_err(|reason| ConfigError::invalid(field, &s, reason)),
    }
}

/// A duration field within [min, max]: tokio timers and `Instant` arithmetic panic on overflow, so no
/// value reaches them unbounded.
fn bounded(
    field: &str,
    v: Option<Duration>,
    default: Duration,
    min: Duration,
    max: Duration,
) -> Result<Duration, ConfigError> {
    let d = v.unwrap_or(default);
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
fn is_plain_path(p: &str) -> bool {
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

fn non_empty(v: Option<String>) -> Option<String> {
    v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

fn positive(field: &str, v: Option<i64>, default: i64, max: i64) -> Result<i64, ConfigError> {
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

fn build(raw: RawConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let env_nonempty = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    let mut ignored: Vec<String> = raw
        .global
        .ignored_present()
        .into_iter()
        .map(|k| format!("global.{k}"))
        .collect();

    // global
    let g = &raw.global;
    let listen = parse_listen(g.port.as_deref().unwrap_or(":8087"))?;
    let metric_path = g.metric_path.clone().unwrap_or_else(|| "/metrics".into());
    if !is_plain_path(&metric_path) || matches!(metric_path.as_str(), "/healthz" | "/readyz") {
        return Err(ConfigError::invalid(
            "global.metric_path",
            &metric_path,
            "must be an absolute path of letters, digits and - . _ ~ such as /metrics, other than / /healthz /readyz",
        ));
    }
    let prefix = g.prefix.clone().unwrap_or_else(|| "huaweicloud".into());
    if !is_metric_name(&prefix) {
        return Err(ConfigError::invalid(
            "global.prefix",
            &prefix,
            "must match [a-zA-Z_:][a-zA-Z0-9_:]*",
        ));
    }
    let batch = g.scrape_batch_size.unwrap_or(CES_MAX_BATCH as i64);
    if !(1..=CES_MAX_BATCH as i64).contains(&batch) {
        return Err(ConfigError::invalid(
            "global.scrape_batch_size",
            batch,
            "CES accepts 1..500 metrics per batch call",
        ));
    }

    // auth
    let a = raw.auth;
    let auth_url = non_empty(a.auth_url).ok_or_else(|| {
        ConfigError::invalid(
            "auth.auth_url",
            "",
            "required, e.g. https://iam.cn-east-3.myhuaweicloud.com/v3",
        )
    })?;
    let (auth_scheme, auth_host, auth_port) = parse_url("auth.auth_url", &auth_url, true)?;
    let region = non_empty(a.region)
        .ok_or_else(|| ConfigError::invalid("auth.region", "", "required, e.g. cn-east-3"))?;
    if !region
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(ConfigError::invalid(
            "auth.region",
            &region,
            "a region id looks like cn-east-3",
        ));
    }
    let project_id = env_nonempty(ENV_PROJECT_ID)
        .or(non_empty(a.project_id))
        .unwrap_or_default();
    if !project_id.is_empty()
        && !project_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ConfigError::invalid(
            "auth.project_id",
            &project_id,
            "must be the project's id (letters and digits)",
        ));
    }
    let project_name = non_empty(a.project_name).unwrap_or_else(|| region.clone());
    let access_key = env_nonempty(ENV_AK)
        .or(non_empty(a.access_key))
        .unwrap_or_default();
    let secret_key = env_nonempty(ENV_SK)
        .map(Secret)
        .or(a.secret_key.filter(|s| !s.0.trim().is_empty()))
        .map(|s| Secret(s.0.trim().to_string()))
        .unwrap_or_default();
    let security_token = env_nonempty(ENV_TOKEN)
        .map(Secret)
        .or(a.security_token.filter(|s| !s.0.trim().is_empty()))
        .map(|s| Secret(s.0.trim().to_string()));
    if access_key.is_empty() || secret_key.is_empty() {
        if a.password.is_some_and(|p| !p.is_empty()) {
            return Err(ConfigError::invalid(
                "auth.password",
                "[redacted]",
                "password authentication is not supported; set auth.access_key and auth.secret_key",
            ));
        }
        let field = if access_key.is_empty() {
            "auth.access_key"
        } else {
            "auth.secret_key"
        };
        return Err(ConfigError::invalid(
            field,
            "",
            format!("required (or set {ENV_AK} and {ENV_SK})"),
        ));
    }
    if access_key.contains(|c: char| c.is_whitespace() || c == ',') {
        // A credential's value is never printed, even a wrong one: it may be a secret pasted into
        // the wrong field.
        return Err(ConfigError::invalid(
            "auth.access_key",
            "[redacted]",
            "must not contain spaces or commas",
        ));
    }
    for (k, present) in [
        ("auth.domain_name", a.domain_name.is_some()),
        ("auth.user_name", a.user_name.is_some()),
        ("auth.password", a.password.is_some()),
        ("auth.oidc", a.oidc.is_some()),
    ] {
        if present {
            ignored.push(k.to_string());
        }
    }
    let domain_id = non_empty(a.domain_id).unwrap_or_default();
    let credentials_reload = bounded(
        "auth.credentials_reload",
        dur("auth.credentials_reload", a.credentials_reload)?,
        Duration::from_secs(10),
        Duration::from_secs(1),
        HOUR,
    )?;

    // endpoints: explicit, else derived from the auth_url host (rule in PRODUCT.md).
    let derives = non_empty(raw.endpoints.elb.clone()).is_none()
        || non_empty(raw.endpoints.ces.clone()).is_none();
    if derives
        && let Some(other) = iam_region(&auth_host)
        && other != region
    {
        return Err(ConfigError::invalid(
            "auth.region",
            &region,
            format!(
                "differs from the region {other} of the auth.auth_url host {auth_host}: ELB and CES calls would go to {other}; make them agree (or set endpoints.elb and endpoints.ces)"
            ),
        ));
    }
    let service_default = |svc: &str| -> Endpoint {
        let host = derive_host(&auth_host, svc, &region);
        Endpoint {
            scheme: auth_scheme.clone(),
            authority: authority(&host, auth_port),
        }
    };
    let endpoint = |field: &str, v: Option<String>, svc: &str| -> Result<Endpoint, ConfigError> {
        match non_empty(v) {
            None => Ok(service_default(svc)),
            Some(u) => {
                let (scheme, host, port) = parse_url(field, &u, false)?;
                Ok(Endpoint {
                    authority: authority(&host, port),
                    scheme,
                })
            }
        }
    };
    let iam = match non_empty(raw.endpoints.iam.clone()) {
        Some(_) => endpoint("endpoints.iam", raw.endpoints.iam, "iam")?,
        None => Endpoint {
            scheme: auth_scheme.clone(),
            authority: authority(&auth_host, auth_port),
        },
    };
    let endpoints = Endpoints {
        iam,
        elb: endpoint("endpoints.elb", raw.endpoints.elb, "elb")?,
        ces: endpoint("endpoints.ces", raw.endpoints.ces, "ces")?,
    };

    // discovery
    let d = raw.discovery;
    let annotation = d
        .annotation
        .unwrap_or_else(|| DEFAULT_ANNOTATION.to_string());
    if !is_annotation_key(&annotation) {
        return Err(ConfigError::invalid(
            "discovery.annotation",
            &annotation,
            "must be a Kubernetes annotation key such as kubernetes.io/elb.id",
        ));
    }
    let namespaces = d.namespaces.unwrap_or_default();
    for (i, ns) in namespaces.iter().enumerate() {
        if !is_dns_label(ns) {
            return Err(ConfigError::invalid(
                &format!("discovery.namespaces[{i}]"),
                ns,
                "must be a Kubernetes namespace name",
            ));
        }
        // Readiness waits for every listed scope: a duplicate would be waited for twice.
        if namespaces[..i].contains(ns) {
            return Err(ConfigError::invalid(
                &format!("discovery.namespaces[{i}]"),
                ns,
                "listed twice",
            ));
        }
    }
    let listener_refresh = match (
        dur("discovery.listener_refresh", d.listener_refresh)?,
        g.resource_sync_interval_minutes,
    ) {
        (Some(v), _) => v,
        (None, Some(m)) => Duration::from_secs(
            positive("global.resource_sync_interval_minutes", Some(m), 5, 1440)? as u64 * 60,
        ),
        (None, None) => Duration::from_secs(300),
    };
    let listener_refresh = bounded(
        "discovery.listener_refresh",
        Some(listener_refresh),
        listener_refresh,
        Duration::from_secs(10),
        24 * HOUR,
    )?;

    // collection
    let c = raw.collection;
    let interval = bounded(
        "collection.interval",
        dur("collection.interval", c.interval)?,
        Duration::from_secs(60),
        Duration::from_secs(1),
        HOUR,
    )?;
    let lookback = dur("collection.lookback", c.lookback)?.unwrap_or(Duration::from_secs(300));
    if lookback < Duration::from_secs(60) || lookback > Duration::from_secs(4 * 3600) {
        return Err(ConfigError::invalid(
            "collection.lookback",
            format_duration(lookback),
            "must be between 1m (one CES period) and 4h",
        ));
    }
    let filter_s = c.filter.unwrap_or_else(|| "average".into());
    let filter = Filter::parse(&filter_s).ok_or_else(|| {
        ConfigError::invalid(
            "collection.filter",
            &filter_s,
            "must be one of average, max, min, sum, variance",
        )
    })?;
    let metrics = c
        .metrics
        .unwrap_or_else(|| DEFAULT_METRICS.iter().map(|s| s.to_string()).collect());
    if metrics.is_empty() {
        return Err(ConfigError::invalid(
            "collection.metrics",
            "[]",
            "at least one metric is required",
        ));
    }
    metric_names("collection.metrics", &metrics)?;
    let pool_metrics = c
        .pool_metrics
        .unwrap_or_else(|| DEFAULT_POOL_METRICS.iter().map(|s| s.to_string()).collect());
    metric_names("collection.pool_metrics", &pool_metrics)?;
    let stale_intervals =
        positive("collection.stale_intervals", c.stale_intervals, 3, 1000)? as u32;

    // cloud
    let cl = raw.cloud;
    let connect_timeout =
        dur("cloud.connect_timeout", cl.connect_timeout)?.unwrap_or(Duration::from_secs(5));
    let request_timeout =
        dur("cloud.request_timeout", cl.request_timeout)?.unwrap_or(Duration::from_secs(20));
    for (field, v) in [
        ("cloud.connect_timeout", connect_timeout),
        ("cloud.request_timeout", request_timeout),
    ] {
        if v < Duration::from_millis(100) || v > Duration::from_secs(600) {
            return Err(ConfigError::invalid(
                field,
                format_duration(v),
                "must be between 100ms and 10m",
            ));
        }
    }
    let max_concurrency = match (cl.max_concurrency, g.max_routines) {
        (Some(n), _) => positive("cloud.max_concurrency", Some(n), 4, 64)?,
        (None, Some(n)) => positive("global.max_routines", Some(n), 4, 1000)?.min(64),
        // The auth gate holds one credential's requests to 4 in flight anyway (5 bad signatures lock an AK).
        (None, None) => 4,
    } as usize;
    let ca_file = non_empty(cl.ca_file).map(PathBuf::from);
    if let Some(p) = &ca_file
        && !p.is_file()
    {
        return Err(ConfigError::invalid(
            "cloud.ca_file",
            p.display(),
            "file does not exist",
        ));
    }
    let insecure_skip_verify = cl
        .insecure_skip_verify
        .or(g.ignore_ssl_verify)
        .unwrap_or(false);
    let r = cl.retry;
    let retry = RetrySettings {
        max_attempts: positive("cloud.retry.max_attempts", r.max_attempts, 4, 20)? as u32,
        initial_backoff: dur("cloud.retry.initial_backoff", r.initial_backoff)?
            .unwrap_or(Duration::from_secs(1)),
        max_backoff: bounded(
            "cloud.retry.max_backoff",
            dur("cloud.retry.max_backoff", r.max_backoff)?,
            Duration::from_secs(30),
            Duration::from_millis(1),
            10 * MINUTE,
        )?,
        max_elapsed: bounded(
            "cloud.retry.max_elapsed",
            dur("cloud.retry.max_elapsed", r.max_elapsed)?,
            Duration::from_secs(120),
            Duration::from_secs(1),
            HOUR,
        )?,
    };
    if retry.initial_backoff.is_zero() || retry.initial_backoff > retry.max_backoff {
        return Err(ConfigError::invalid(
            "cloud.retry.initial_backoff",
            format_duration(retry.initial_backoff),
            "must be above 0 and at most cloud.retry.max_backoff",
        ));
    }
    let rl = cl.rate_limit;
    let rate_limit = RateLimits {
        iam_per_minute: positive(
            "cloud.rate_limit.iam_per_minute",
            rl.iam_per_minute,
            60,
            10_000,
        )? as u32,
        elb_per_minute: positive(
            "cloud.rate_limit.elb_per_minute",
            rl.elb_per_minute,
            300,
            10_000,
        )? as u32,
        ces_per_minute: positive(
            "cloud.rate_limit.ces_per_minute",
            rl.ces_per_minute,
            300,
            10_000,
        )? as u32,
    };

    // log
    let level = raw.log.level.unwrap_or_else(|| "info".into());
    if !matches!(
        level.as_str(),
        "error" | "warn" | "info" | "debug" | "trace"
    ) {
        return Err(ConfigError::invalid(
            "log.level",
            &level,
            "must be one of error, warn, info, debug, trace",
        ));
    }
    let format = match raw.log.format.as_deref().unwrap_or("text") {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            return Err(ConfigError::invalid(
                "log.format",
                other,
                "must be text or json",
            ));
        }
    };

    let web = build_web(raw.web)?;
    for (field, v) in [
        ("auth.access_key", Some(access_key.as_str())),
        (
            "auth.security_token",
            security_token.as_ref().map(|t| t.expose()),
        ),
    ] {
        // These travel in HTTP headers: control characters would make every request fail.
        if let Some(v) = v
            && v.bytes().any(|b| !(0x20..0x7f).contains(&b))
        {
            return Err(ConfigError::invalid(
                field,
                "[redacted]",
                "must be printable ASCII",
            ));
        }
    }

    let leader_election = build_leader_election(raw.leader_election, env, &|| {
        std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE_FILE).ok()
    })?;

    Ok(Config {
        listen,
        metric_path,
        prefix,
        scrape_batch_size: batch as usize,
        auth: Auth {
            auth_url,
            region,
            project_name,
            project_id,
            domain_id,
            credentials_reload,
            credentials: Credentials {
                access_key,
                secret_key,
                security_token,
            },
        },
        endpoints,
        discovery: Discovery {
            annotation,
            namespaces,
            listener_refresh,
            ingresses: d.ingresses.unwrap_or(true),
        },
        collection: Collection {
            interval,
            lookback,
            filter,
            metrics,
            stale_intervals,
            absent_as_zero: c.absent_as_zero.unwrap_or(false),
            pool_metrics,
            align: c.align.unwrap_or(true),
        },
        cloud: CloudSettings {
            connect_timeout,
            request_timeout,
            max_concurrency,
            ca_file,
            insecure_skip_verify,
            retry,
            rate_limit,
        },
        log: LogSettings { level, format },
        web,
        leader_election,
        ignored_keys: ignored,
    })
}

fn build_web(w: RawWeb) -> Result<WebSettings, ConfigError> {
    let file = |field: &str, v: Option<String>| -> Result<Option<PathBuf>, ConfigError> {
        match non_empty(v) {
            None => Ok(None),
            Some(p) if Path::new(&p).is_file() => Ok(Some(PathBuf::from(p))),
            Some(p) => Err(ConfigError::invalid(field, p, "file does not exist")),
        }
    };
    let cert = file("web.tls_cert_file", w.tls_cert_file)?;
    let key = file("web.tls_key_file", w.tls_key_file)?;
    let tls = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        (Some(_), None) => {
            return Err(ConfigError::invalid(
                "web.tls_key_file",
                "",
                "required with web.tls_cert_file",
            ));
        }
        (None, Some(_)) => {
            return Err(ConfigError::invalid(
                "web.tls_cert_file",
                "",
                "required with web.tls_key_file",
            ));
        }
    };
    let mut users = Vec::new();
    for (user, hash) in w.basic_auth_users.unwrap_or_default() {
        let field = format!("web.basic_auth_users.{user}");
        if user.is_empty() || user.contains(':') {
            return Err(ConfigError::invalid(
                &field,
                &user,
                "a user name must be non-empty and without ':'",
            ));
        }
        bcrypt_cost(&field, hash.expose())?;
        users.push((user, hash));
    }
    let bearer_token = match file("web.bearer_token_file", w.bearer_token_file)? {
        None => None,
        Some(p) => {
            let t = std::fs::read_to_string(&p).map_err(|e| {
                ConfigError::invalid("web.bearer_token_file", p.display(), e.to_string())
            })?;
            let t = t.trim();
            if t.is_empty() {
                return Err(ConfigError::invalid(
                    "web.bearer_token_file",
                    p.display(),
                    "the file is empty",
                ));
            }
            Some(Secret::new(t))
        }
    };
    let read_header_timeout = dur("web.read_header_timeout", w.read_header_timeout)?
        .unwrap_or(DEFAULT_READ_HEADER_TIMEOUT);
    if read_header_timeout < Duration::from_millis(100)
        || read_header_timeout > Duration::from_secs(300)
    {
        return Err(ConfigError::invalid(
            "web.read_header_timeout",
            format_duration(read_header_timeout),
            "must be between 100ms and 5m",
        ));
    }
    let idle_timeout = dur("web.idle_timeout", w.idle_timeout)?.unwrap_or(DEFAULT_IDLE_TIMEOUT);
    if idle_timeout < read_header_timeout || idle_timeout > Duration::from_secs(3600) {
        return Err(ConfigError::invalid(
            "web.idle_timeout",
            format_duration(idle_timeout),
            "must be between web.read_header_timeout and 1h (and longer than the scrape interval)",
        ));
    }
    let max_connections = positive(
        "web.max_connections",
        w.max_connections,
        DEFAULT_MAX_CONNECTIONS,
        100_000,
    )? as usize;
    Ok(WebSettings {
        tls,
        basic_auth_users: users,
        bearer_token,
        read_header_timeout,
        idle_timeout,
        max_connections,
    })
}

/// `leader_election`'s three durations, in the order client-go requires: the lease in whole seconds (the
/// Lease stores seconds), a shorter renew deadline, a shorter retry period.
fn leader_timing(
    lease_duration: Option<String>,
    renew_deadline: Option<String>,
    retry_period: Option<String>,
) -> Result<(Duration, Duration, Duration), ConfigError> {
    let lease_duration = bounded(
        "leader_election.lease_duration",
        dur("leader_election.lease_duration", lease_duration)?,
        Duration::from_secs(15),
        Duration::from_secs(1),
        HOUR,
    )?;
    if lease_duration.subsec_nanos() != 0 {
        return Err(ConfigError::invalid(
            "leader_election.lease_duration",
            format_duration(lease_duration),
            "must be whole seconds (the Lease stores leaseDurationSeconds)",
        ));
    }
    let renew_deadline = bounded(
        "leader_election.renew_deadline",
        dur("leader_election.renew_deadline", renew_deadline)?,
        Duration::from_secs(10),
        Duration::from_millis(200),
        HOUR,
    )?;
    if renew_deadline >= lease_duration {
        return Err(ConfigError::invalid(
            "leader_election.renew_deadline",
            format_duration(renew_deadline),
            format!(
                "must be shorter than leader_election.lease_duration ({}), so a leader stops before others may take over",
                format_duration(lease_duration)
            ),
        ));
    }
    let retry_period = bounded(
        "leader_election.retry_period",
        dur("leader_election.retry_period", retry_period)?,
        Duration::from_secs(2),
        Duration::from_millis(50),
        HOUR,
    )?;
    if retry_period >= renew_deadline {
        return Err(ConfigError::invalid(
            "leader_election.retry_period",
            format_duration(retry_period),
            format!(
                "must be shorter than leader_election.renew_deadline ({}), so a leader gets more than one try to renew",
                format_duration(renew_deadline)
            ),
        ));
    }
    Ok((lease_duration, renew_deadline, retry_period))
}

/// `leader_election`. Defaults follow client-go (15s/10s/2s) and the pod's downward API: the namespace
/// from `POD_NAMESPACE`, else the service account's namespace file (`sa_namespace`); the identity from
/// `POD_NAME`, else the hostname. Disabled, nothing is resolved or checked beyond the types.
fn build_leader_election(
    l: RawLeaderElection,
    env: &dyn Fn(&str) -> Option<String>,
    sa_namespace: &dyn Fn() -> Option<String>,
) -> Result<Option<LeaderElection>, ConfigError> {
    let (lease_duration, renew_deadline, retry_period) =
        leader_timing(l.lease_duration, l.renew_deadline, l.retry_period)?;
    let lease_name = non_empty(l.lease_name).unwrap_or_else(|| "elb-exporter".into());
    if lease_name.len() > 253 || !lease_name.split('.').all(is_dns_label) {
        return Err(ConfigError::invalid(
            "leader_election.lease_name",
            &lease_name,
            "must be a DNS subdomain name (lowercase letters, digits, '-' and '.')",
        ));
    }
    let given_namespace = non_empty(l.lease_namespace);
    let given_identity = non_empty(l.identity);
    if !l.enabled.unwrap_or(false) {
        return Ok(None);
    }
    let lease_namespace = given_namespace
        .or_else(|| non_empty(env(ENV_POD_NAMESPACE)))
        .or_else(|| non_empty(sa_namespace()))
        .ok_or_else(|| {
            ConfigError::invalid(
                "leader_election.lease_namespace",
                "",
                format!(
                    "required: neither {ENV_POD_NAMESPACE} nor {SERVICE_ACCOUNT_NAMESPACE_FILE} gives the pod's namespace"
                ),
            )
        })?;
    if !is_dns_label(&lease_namespace) {
        return Err(ConfigError::invalid(
            "leader_election.lease_namespace",
            &lease_namespace,
            "must be a namespace name (DNS label)",
        ));
    }
    let identity = given_identity
        .or_else(|| non_empty(env(ENV_POD_NAME)))
        .or_else(hostname)
        .ok_or_else(|| {
            ConfigError::invalid(
                "leader_election.identity",
                "",
                format!("required: neither {ENV_POD_NAME} nor the hostname is set"),
            )
        })?;
    if identity.len() > 253 || identity.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
        return Err(ConfigError::invalid(
            "leader_election.identity",
            &identity,
            "must be 1 to 253 printable ASCII characters without spaces",
        ));
    }
    Ok(Some(LeaderElection {
        lease_name,
        lease_namespace,
        identity,
        lease_duration,
        renew_deadline,
        retry_period,
    }))
}

fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    non_empty(Some(String::from_utf8_lossy(&buf[..end]).into_owned()))
}

impl Config {
    /// Settings that weaken the transport to the cloud: logged as warnings at start and printed by
    /// `check`, because they are legal (private clouds, tests) but must never pass unnoticed.
    /// A `global.scrape_batch_size` below CES' 500 (the practice guide sets 10) multiplies the CES calls
    /// of every cycle: said once at start, with the factor.
    pub fn batch_size_warning(&self) -> Option<String> {
        let n = self.scrape_batch_size;
        (n < CES_MAX_BATCH).then(|| {
            let factor = CES_MAX_BATCH as f64 / n.max(1) as f64;
            let factor = if CES_MAX_BATCH.is_multiple_of(n.max(1)) {
                format!("{factor:.0}")
            } else {
                format!("{factor:.1}")
            };
            format!(
                "global.scrape_batch_size is {n} instead of {CES_MAX_BATCH}: {factor}x more CES calls per cycle (keep it at {CES_MAX_BATCH} unless this cloud limits batches; a 10-metric limit is detected on its own)"
            )
        })
    }

    pub fn transport_warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.cloud.insecure_skip_verify {
            warnings.push(
                "cloud.insecure_skip_verify (global.ignore_ssl_verify) is on: cloud TLS certificates are \
                 not verified, so anyone on the path can read the requests and forge the answers"
                    .to_string(),
            );
        }
        if self.auth.credentials.security_token.is_some() {
            let e = &self.endpoints;
            for (field, endpoint) in [
                ("endpoints.iam", &e.iam),
                ("endpoints.elb", &e.elb),
                ("endpoints.ces", &e.ces),
            ] {
                if endpoint.scheme != "https" {
                    warnings.push(format!(
                        "{field} is {} while auth.security_token is set: the token is sent in clear text",
                        endpoint.base_url()
                    ));
                }
            }
        }
        warnings
    }
}

/// The cost of a bcrypt hash (`$2b$10$` + 53 characters), refused above `MAX_BCRYPT_COST`.
fn bcrypt_cost(field: &str, h: &str) -> Result<u32, ConfigError> {
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
fn parse_url(
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
fn without_userinfo(s: &str) -> String {
    let (scheme, rest) = match s.find("://") {
        Some(i) => s.split_at(i + 3),
        None => ("", s),
    };
    match rest.rfind('@') {
        Some(at) => format!("{scheme}{}", &rest[at + 1..]),
        None => s.to_string(),
    }
}

fn authority(host: &str, port: Option<u16>) -> String {
    // `Url::port()` is already `None` for the scheme's default port, so the Host header matches what
    // an HTTP client sends for the same URL.
    match port {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    }
}

/// The region label of a regional IAM host (`iam.<region>.<domain>`): a second label shaped like a
/// region id (`cn-east-3`, `eu-west-101`, `eu-de`). `None` for a global IAM host or any other host.
fn iam_region(host: &str) -> Option<&str> {
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
fn derive_host(auth_host: &str, service: &str, region: &str) -> String {
    if service == "iam" {
        return auth_host.to_string();
    }
    match auth_host.split_once('.') {
        Some(("iam", rest)) if iam_region(auth_host).is_some() => format!("{service}.{rest}"),
        Some(("iam", domain)) => format!("{service}.{region}.{domain}"),
        _ => auth_host.to_string(),
    }
}

fn is_metric_name(s: &str) -> bool {
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

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_annotation_key(s: &str) -> bool {
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
    fn credential_values_and_url_userinfo_never_reach_error_text() {
        let base = "auth:\n  auth_url: \"https://iam.cn-east-3.myhuaweicloud.com/v3\"\n  region: \"cn-east-3\"\n  access_key: \"AKVALUE\"\n  secret_key: \"SKVALUE\"\n";
        let cases = [
            ("AKVALUE", "AK WITH SPACE-LEAK1", "auth.access_key"),
            ("AKVALUE", "AK,COMMA-LEAK2", "auth.access_key"),
            ("AKVALUE", "AK\\tTAB-LEAK3", "auth.access_key"),
            ("AKVALUE", "AK\\u00e9-LEAK4", "auth.access_key"),
            (
                "https://iam.cn-east-3.myhuaweicloud.com/v3",
                "https://user:PW-LEAK5@iam.cn-east-3.myhuaweicloud.com/v3",
                "auth.auth_url",
            ),
            (
                "https://iam.cn-east-3.myhuaweicloud.com/v3",
                "https://user:PW-LEAK6@iam.example.com:99999/v3",
                "auth.auth_url",
            ),
            (
                "https://iam.cn-east-3.myhuaweicloud.com/v3",
                "ftp://user:PW/LEAK7@iam.example.com/v3",
                "auth.auth_url",
            ),
        ];
        for (from, to, field) in cases {
            let text = base.replace(from, to);
            let err = Config::from_yaml(&text, &|_| None).expect_err(to);
            let msg = err.to_string();
            assert_eq!(err.field(), Some(field), "{msg}");
            assert!(!msg.contains("LEAK"), "{to}: {msg}");
        }
        let text =
            base.to_string() + "endpoints:\n  ces: \"https://ak:PW-LEAK8@ces.example.com/x\"\n";
        let msg = Config::from_yaml(&text, &|_| None).unwrap_err().to_string();
        assert!(!msg.contains("LEAK"), "{msg}");
        assert!(msg.contains("https://ces.example.com/x"), "{msg}");
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

    /// Real IAM hosts from reference/HUAWEI_CLOUD_API.md (Huawei CN/intl, Huawei Europe, Open Telekom
    /// Cloud) and hosts without an `iam` label, through the whole config path.
    #[test]
    fn endpoints_derive_from_real_iam_hosts() {
        let table: &[(&str, &str, &str, &str)] = &[
            // (auth_url, region, elb endpoint, ces endpoint)
            (
                "https://iam.cn-east-3.myhuaweicloud.com/v3",
                "cn-east-3",
                "https://elb.cn-east-3.myhuaweicloud.com",
                "https://ces.cn-east-3.myhuaweicloud.com",
            ),
            (
                "https://iam.ap-southeast-1.myhuaweicloud.com/v3",
                "ap-southeast-1",
                "https://elb.ap-southeast-1.myhuaweicloud.com",
                "https://ces.ap-southeast-1.myhuaweicloud.com",
            ),
            (
                "https://iam.myhuaweicloud.com/v3",
                "cn-north-4",
                "https://elb.cn-north-4.myhuaweicloud.com",
                "https://ces.cn-north-4.myhuaweicloud.com",
            ),
            (
                "https://iam.eu-west-101.myhuaweicloud.eu/v3",
                "eu-west-101",
                "https://elb.eu-west-101.myhuaweicloud.eu",
                "https://ces.eu-west-101.myhuaweicloud.eu",
            ),
            (
                "https://iam.myhuaweicloud.eu/v3",
                "eu-west-101",
                "https://elb.eu-west-101.myhuaweicloud.eu",
                "https://ces.eu-west-101.myhuaweicloud.eu",
            ),
            (
                "https://iam.eu-de.otc.t-systems.com/v3",
                "eu-de",
                "https://elb.eu-de.otc.t-systems.com",
                "https://ces.eu-de.otc.t-systems.com",
            ),
            (
                "https://iam.eu-nl.otc.t-systems.com:443/v3",
                "eu-nl",
                "https://elb.eu-nl.otc.t-systems.com",
                "https://ces.eu-nl.otc.t-systems.com",
            ),
            (
                "http://127.0.0.1:8080/v3",
                "cn-east-3",
                "http://127.0.0.1:8080",
                "http://127.0.0.1:8080",
            ),
            (
                "http://sim.local:9000/v3",
                "cn-east-3",
                "http://sim.local:9000",
                "http://sim.local:9000",
            ),
        ];
        for (auth_url, region, elb, ces) in table {
            let text = format!(
                "auth:\n  auth_url: \"{auth_url}\"\n  region: \"{region}\"\n  access_key: \"AK\"\n  secret_key: \"SK\"\n"
            );
            let cfg =
                Config::from_yaml(&text, &|_| None).unwrap_or_else(|e| panic!("{auth_url}: {e}"));
            assert_eq!(cfg.endpoints.elb.base_url(), *elb, "{auth_url}");
            assert_eq!(cfg.endpoints.ces.base_url(), *ces, "{auth_url}");
        }
        // A regional IAM host of another region: an error naming both fields, unless both endpoints
        // are explicit.
        let text = "auth:\n  auth_url: \"https://iam.cn-east-3.myhuaweicloud.com/v3\"\n  region: \"cn-north-4\"\n  access_key: \"AK\"\n  secret_key: \"SK\"\n";
        let err = Config::from_yaml(text, &|_| None).unwrap_err();
        assert_eq!(err.field(), Some("auth.region"));
        let msg = err.to_string();
        assert!(
            msg.contains("auth.auth_url") && msg.contains("cn-east-3"),
            "{msg}"
        );
        let explicit = format!(
            "{text}endpoints:\n  elb: \"https://elb.cn-north-4.myhuaweicloud.com\"\n  ces: \"https://ces.cn-north-4.myhuaweicloud.com\"\n"
        );
        let cfg = Config::from_yaml(&explicit, &|_| None).unwrap();
        assert_eq!(
            cfg.endpoints.ces.base_url(),
            "https://ces.cn-north-4.myhuaweicloud.com"
        );
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

    #[test]
    fn absent_as_zero_is_opt_in_and_typed() {
        let base = "auth: {auth_url: 'https://iam.cn-east-3.myhuaweicloud.com/v3', region: cn-east-3, \
                    project_id: p, access_key: a, secret_key: s}\n";
        let none = |_: &str| None;
        let c = Config::from_yaml(base, &none).expect("loads");
        assert!(!c.collection.absent_as_zero);
        let on = format!("{base}collection: {{absent_as_zero: true}}\n");
        assert!(
            Config::from_yaml(&on, &none)
                .expect("loads")
                .collection
                .absent_as_zero
        );
        let bad = format!("{base}collection: {{absent_as_zero: sometimes}}\n");
        let err = Config::from_yaml(&bad, &none)
            .expect_err("not a boolean")
            .to_string();
        assert!(err.contains("absent_as_zero"), "{err}");
    }

    fn leader_election(
        yaml: &str,
        env: &[(&str, &str)],
        sa: Option<&str>,
    ) -> Result<Option<LeaderElection>, ConfigError> {
        let raw: RawLeaderElection =
            serde_yaml::from_str(yaml).map_err(|e| ConfigError::Parse(e.to_string()))?;
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let sa = sa.map(str::to_string);
        build_leader_election(
            raw,
            &|k| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()),
            &|| sa.clone(),
        )
    }

    #[test]
    fn leader_election_is_off_by_default_with_client_go_timing() {
        assert_eq!(leader_election("{}", &[], None).expect("loads"), None);
        let pod = [("POD_NAME", "exp-0"), ("POD_NAMESPACE", "monitoring")];
        let l = leader_election("enabled: true", &pod, Some("other"))
            .expect("loads")
            .expect("enabled");
        assert_eq!(
            l,
            LeaderElection {
                lease_name: "elb-exporter".into(),
                lease_namespace: "monitoring".into(),
                identity: "exp-0".into(),
                lease_duration: Duration::from_secs(15),
                renew_deadline: Duration::from_secs(10),
                retry_period: Duration::from_secs(2),
            }
        );
        // Without POD_NAMESPACE the service account's namespace file; without POD_NAME the hostname.
        let l = leader_election("enabled: true", &[], Some("kube-system\n"))
            .expect("loads")
            .expect("enabled");
        assert_eq!(l.lease_namespace, "kube-system");
        assert_eq!(Some(l.identity), hostname());
        let l = leader_election(
            "{enabled: true, lease_namespace: ns1, identity: me, lease_name: x.y}",
            &pod,
            None,
        )
        .expect("loads")
        .expect("enabled");
        assert_eq!(
            (
                l.lease_namespace.as_str(),
                l.identity.as_str(),
                l.lease_name.as_str()
            ),
            ("ns1", "me", "x.y")
        );
    }

    #[test]
    fn leader_election_errors_name_the_field() {
        let pod = [("POD_NAME", "p"), ("POD_NAMESPACE", "n")];
        for (yaml, field) in [
            (
                "{enabled: true, renew_deadline: 15s}",
                "leader_election.renew_deadline",
            ),
            (
                "{enabled: true, retry_period: 10s}",
                "leader_election.retry_period",
            ),
            (
                "{enabled: true, lease_duration: 1500ms}",
                "leader_election.lease_duration",
            ),
            (
                "{enabled: true, lease_duration: 2h}",
                "leader_election.lease_duration",
            ),
            (
                "{enabled: true, retry_period: 1ms}",
                "leader_election.retry_period",
            ),
            (
                "{enabled: true, lease_duration: soon}",
                "leader_election.lease_duration",
            ),
            (
                "{enabled: true, lease_name: Not_A_Name}",
                "leader_election.lease_name",
            ),
            (
                "{enabled: true, lease_namespace: 'a/b'}",
                "leader_election.lease_namespace",
            ),
            (
                "{enabled: true, identity: 'a b'}",
                "leader_election.identity",
            ),
        ] {
            let err = leader_election(yaml, &pod, None).expect_err(yaml);
            assert_eq!(err.field(), Some(field), "{yaml}: {err}");
        }
        let err =
            leader_election("enabled: true", &[("POD_NAME", "p")], None).expect_err("no namespace");
        assert_eq!(
            err.field(),
            Some("leader_election.lease_namespace"),
            "{err}"
        );
        let err = leader_election("{enabled: true, lease_time: 3s}", &pod, None)
            .expect_err("unknown key");
        assert!(err.to_string().contains("lease_time"), "{err}");
        // The section is part of the file's schema.
        let none = |_: &str| None;
        let base = "auth: {auth_url: 'https://iam.cn-east-3.myhuaweicloud.com/v3', region: cn-east-3, \
                    project_id: p, access_key: a, secret_key: s}\n";
        let err = Config::from_yaml(
            &format!("{base}leader_election: {{enabled: true, retry_period: 20s}}\n"),
            &none,
        )
        .expect_err("retry_period too long");
        assert_eq!(err.field(), Some("leader_election.retry_period"), "{err}");
        let c = Config::from_yaml(base, &none).expect("loads");
        assert!(c.leader_election.is_none());
    }

    #[test]
    fn align_defaults_on_and_is_typed() {
        let base = "auth: {auth_url: 'https://iam.cn-east-3.myhuaweicloud.com/v3', region: cn-east-3, \
                    project_id: p, access_key: a, secret_key: s}\n";
        let none = |_: &str| None;
        assert!(
            Config::from_yaml(base, &none)
                .expect("loads")
                .collection
                .align
        );
        let off = format!("{base}collection: {{align: false}}\n");
        assert!(
            !Config::from_yaml(&off, &none)
                .expect("loads")
                .collection
                .align
        );
        let bad = format!("{base}collection: {{align: 1m}}\n");
        let err = Config::from_yaml(&bad, &none)
            .expect_err("not a boolean")
            .to_string();
        assert!(err.contains("align"), "{err}");
    }
}
