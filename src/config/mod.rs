//! `clouds.yml`: a superset of cloudeye-exporter's file, parsed strictly (unknown keys are errors that name
//! the key), then validated into a typed [`Config`] before anything is built. Every key and its default is
//! documented in `clouds.example.yml`.

use serde::Deserialize;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod build;
mod parse;
mod raw;

use build::build;
use raw::RawConfig;

pub use parse::{format_duration, is_ces_metric_name, parse_duration, parse_listen};

/// A configuration problem, always naming the field path and, where there is one, the bad value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The config file given.
        path: PathBuf,
        /// Why reading failed.
        source: std::io::Error,
    },
    /// The file is not valid YAML or has an unknown key.
    #[error("config: {0}")]
    Parse(String),
    /// A field holds an unusable value.
    #[error("config field `{field}` = {value:?}: {reason}")]
    Invalid {
        /// The field's path, e.g. `collection.interval`.
        field: String,
        /// The value given, quoted in the message.
        value: String,
        /// What is wrong and what is accepted.
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
    /// Wraps `s`.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself, for signing or comparing only.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// No secret was given.
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

// ---------------------------------------------------------------------------------------------------------
// The validated configuration.

/// The full, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Socket address to listen on (`global.port`, cloudeye style `":8087"` means all interfaces).
    pub listen: String,
    /// `global.metric_path`: the path the series are served on.
    pub metric_path: String,
    /// `global.prefix`: cloud series are `<prefix>_sys_elb_listener_<metric>`.
    pub prefix: String,
    /// `global.scrape_batch_size`: most metrics per CES batch call.
    pub scrape_batch_size: usize,
    /// `auth`: IAM endpoint, region, project and credentials.
    pub auth: Auth,
    /// `endpoints`: IAM, ELB and CES base URLs.
    pub endpoints: Endpoints,
    /// `discovery`: which Services and Ingresses are watched.
    pub discovery: Discovery,
    /// `collection`: what CES is asked for, and how often.
    pub collection: Collection,
    /// `cloud`: timeouts, TLS, retries and rate limits of cloud calls.
    pub cloud: CloudSettings,
    /// `log`: level and format.
    pub log: LogSettings,
    /// `web`: TLS, authentication and limits of the HTTP server.
    pub web: WebSettings,
    /// `leader_election`: `None` when disabled (one process collects on its own).
    pub leader_election: Option<LeaderElection>,
    /// cloudeye-exporter keys present in the file that have no effect here.
    pub ignored_keys: Vec<String>,
}

/// `auth`: where and as whom the exporter calls the cloud.
#[derive(Debug, Clone)]
pub struct Auth {
    /// IAM's `/v3` URL; the default endpoints derive from its host.
    pub auth_url: String,
    /// Region id, e.g. `cn-east-3`.
    pub region: String,
    /// The project resolved to `project_id` through IAM (default: the region).
    pub project_name: String,
    /// Empty: resolved through IAM from `project_name`.
    pub project_id: String,
    /// Account id, sent as `X-Domain-Id` to IAM.
    pub domain_id: String,
    /// AK/SK (and STS token), from the file or the environment.
    pub credentials: Credentials,
    /// How often the config file is re-read for rotated credentials.
    pub credentials_reload: Duration,
}

/// AK/SK credentials. `Debug` never shows the SK or the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// AK: names the key in logs and the signature.
    pub access_key: String,
    /// SK: signs requests, never shown.
    pub secret_key: Secret,
    /// STS token of temporary credentials, sent as `X-Security-Token`.
    pub security_token: Option<Secret>,
}

/// A parsed `scheme://host[:port]` base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `http` or `https`.
    pub scheme: String,
    /// `host` or `host:port`, exactly as it goes into the `Host` header and the signature.
    pub authority: String,
}

impl Endpoint {
    /// `scheme://authority`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("{}://{}", self.scheme, self.authority)
    }
}

/// Base URLs of the three services the exporter calls.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// Project lookup.
    pub iam: Endpoint,
    /// Listener, pool and load balancer listings.
    pub elb: Endpoint,
    /// Cloud Eye batch queries.
    pub ces: Endpoint,
}

/// `discovery`: which Kubernetes objects are watched.
#[derive(Debug, Clone)]
pub struct Discovery {
    /// The Service annotation naming the ELB (default `kubernetes.io/elb.id`).
    pub annotation: String,
    /// Namespaces watched, one watch each; empty: all (needs a ClusterRole).
    pub namespaces: Vec<String>,
    /// Known ELBs' listeners are listed again this often.
    pub listener_refresh: Duration,
    /// Watch CCE ELB Ingresses too (`discovery.ingresses`, default true).
    pub ingresses: bool,
}

/// CES statistic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// Mean over the period.
    Average,
    /// Highest value in the period.
    Max,
    /// Lowest value in the period.
    Min,
    /// Total over the period.
    Sum,
    /// Variance over the period.
    Variance,
}

impl Filter {
    /// The value CES expects in `filter`, and the config spelling.
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

/// `collection`: what Cloud Eye is asked for, and how often.
#[derive(Debug, Clone)]
pub struct Collection {
    /// Start to start of full cycles.
    pub interval: Duration,
    /// The CES window each query covers, ending now.
    pub lookback: Duration,
    /// The CES statistic asked for.
    pub filter: Filter,
    /// CES metrics collected per listener.
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

/// `cloud`: how cloud calls are made.
#[derive(Debug, Clone)]
pub struct CloudSettings {
    /// TCP and TLS connect timeout per call.
    pub connect_timeout: Duration,
    /// Whole-request timeout per call.
    pub request_timeout: Duration,
    /// Cloud requests in flight at once, across all APIs.
    pub max_concurrency: usize,
    /// Extra PEM CA bundle (private clouds); public CAs stay trusted.
    pub ca_file: Option<PathBuf>,
    /// Skips TLS verification (never in production; warned about at start).
    pub insecure_skip_verify: bool,
    /// `cloud.retry`.
    pub retry: RetrySettings,
    /// `cloud.rate_limit`: client-side limits per service.
    pub rate_limit: RateLimits,
}

/// `cloud.retry`: how failed calls that may succeed again are retried.
#[derive(Debug, Clone)]
pub struct RetrySettings {
    /// Attempts per call, the first included.
    pub max_attempts: u32,
    /// Backoff ceiling after the first failure; doubles per attempt (full jitter below it).
    pub initial_backoff: Duration,
    /// Highest backoff ceiling.
    pub max_backoff: Duration,
    /// No retry starts once this much time has passed since the first attempt.
    pub max_elapsed: Duration,
}

/// `cloud.rate_limit`: calls per minute allowed per service, below the cloud's own limits.
#[derive(Debug, Clone)]
pub struct RateLimits {
    /// IAM calls per minute.
    pub iam_per_minute: u32,
    /// ELB calls per minute.
    pub elb_per_minute: u32,
    /// CES calls per minute; collection cycles are paced to it.
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
    /// Connections beyond this are closed at once.
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
    /// Basic auth or a bearer token is configured: protected routes check credentials.
    pub fn auth_enabled(&self) -> bool {
        !self.basic_auth_users.is_empty() || self.bearer_token.is_some()
    }
}

/// `log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `leader_election` when enabled: who competes for which Lease, and its timing (client-go's names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderElection {
    /// The Lease object.
    pub lease_name: String,
    /// Its namespace (default: `POD_NAMESPACE`, else the service account's).
    pub lease_namespace: String,
    /// This replica's holder name; must differ between replicas.
    pub identity: String,
    /// How long followers wait after the last observed renewal before taking over.
    pub lease_duration: Duration,
    /// A leader that has not renewed for this long stops collecting, before the Lease can expire.
    pub renew_deadline: Duration,
    /// How often every replica tries to acquire or renew.
    pub retry_period: Duration,
    /// This pod's IP (`POD_IP`, the downward API's `status.podIP`): the leader advertises it on the
    /// Lease so followers can keep a warm copy of its cloud series. `None`: the listen address, when
    /// it names one host.
    pub pod_ip: Option<std::net::IpAddr>,
}

/// Where a pod's namespace is mounted (the service account token volume).
pub const SERVICE_ACCOUNT_NAMESPACE_FILE: &str =
    "/var/run/secrets/kubernetes.io/serviceaccount/namespace";
/// Default `leader_election.identity` (set by the Deployment from the pod name).
pub const ENV_POD_NAME: &str = "POD_NAME";
/// Default `leader_election.lease_namespace`.
pub const ENV_POD_NAMESPACE: &str = "POD_NAMESPACE";
/// Where a leader serves its warm copy to followers (reserved: `global.metric_path` cannot take it).
pub const WARM_COPY_PATH: &str = "/internal/warm-copy";
/// The address the leader advertises to followers for the warm copy (downward API `status.podIP`).
pub const ENV_POD_IP: &str = "POD_IP";

/// `log`.
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// `error`, `warn`, `info`, `debug` or `trace`; `RUST_LOG` wins when set.
    pub level: String,
    /// Text or JSON lines.
    pub format: LogFormat,
}

/// `collection.pool_metrics` by default: the pool L7 metrics an HPA and a dashboard want.
pub const DEFAULT_POOL_METRICS: &[&str] = &[
    "mb_l7_qps",
    "m24_l7_req_Bps",
    "m25_l7_resp_Bps",
    "m17_l7_upstream_rt",
    "m15_l7_upstream_4xx",
    "m16_l7_upstream_5xx",
];

/// The default metric set (PRODUCT.md).
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

/// `discovery.annotation` by default.
pub const DEFAULT_ANNOTATION: &str = crate::annotations::ELB_ID;
/// CES accepts at most this many metrics per batch call.
pub const CES_MAX_BATCH: usize = 500;
/// CES returns at most this many datapoints per call; beyond it `from` is silently moved forward.
pub const CES_DATAPOINT_BUDGET: u64 = 3000;

/// Environment variables that override the file.
pub const ENV_AK: &str = "HUAWEICLOUD_SDK_AK";
/// The SK, overriding `auth.secret_key`.
pub const ENV_SK: &str = "HUAWEICLOUD_SDK_SK";
/// The STS token, overriding `auth.security_token`.
pub const ENV_TOKEN: &str = "HUAWEICLOUD_SDK_SECURITY_TOKEN";
/// The project id, overriding `auth.project_id`.
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

    /// Warnings about settings that weaken transport security, logged at start and by `check`.
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

#[cfg(test)]
mod tests {
    use super::*;

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

    /// A boolean `collection` key: `default` when absent, `true` and `false` taken, a non-boolean
    /// refused naming the key.
    fn collection_flag(key: &str, get: fn(&Config) -> bool, default: bool) {
        let base = "auth: {auth_url: 'https://iam.cn-east-3.myhuaweicloud.com/v3', region: cn-east-3, \
                    project_id: p, access_key: a, secret_key: s}\n";
        let none = |_: &str| None;
        assert_eq!(
            get(&Config::from_yaml(base, &none).expect("loads")),
            default
        );
        for v in [true, false] {
            let text = format!("{base}collection: {{{key}: {v}}}\n");
            assert_eq!(get(&Config::from_yaml(&text, &none).expect("loads")), v);
        }
        let bad = format!("{base}collection: {{{key}: 1m}}\n");
        let err = Config::from_yaml(&bad, &none)
            .expect_err("not a boolean")
            .to_string();
        assert!(err.contains(key), "{err}");
    }

    #[test]
    fn absent_as_zero_is_opt_in_and_typed() {
        collection_flag("absent_as_zero", |c| c.collection.absent_as_zero, false);
    }

    #[test]
    fn align_defaults_on_and_is_typed() {
        collection_flag("align", |c| c.collection.align, true);
    }
}
