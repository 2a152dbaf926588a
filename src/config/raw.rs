//! The file as written: serde mirrors of `clouds.yml` sections, strict (`deny_unknown_fields`).

use super::Secret;
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) global: RawGlobal,
    #[serde(default)]
    pub(super) auth: RawAuth,
    #[serde(default)]
    pub(super) endpoints: RawEndpoints,
    #[serde(default)]
    pub(super) discovery: RawDiscovery,
    #[serde(default)]
    pub(super) collection: RawCollection,
    #[serde(default)]
    pub(super) cloud: RawCloud,
    #[serde(default)]
    pub(super) log: RawLog,
    #[serde(default)]
    pub(super) web: RawWeb,
    #[serde(default)]
    pub(super) leader_election: RawLeaderElection,
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
pub(super) struct RawGlobal {
    pub(super) port: Option<String>,
    pub(super) metric_path: Option<String>,
    pub(super) prefix: Option<String>,
    pub(super) scrape_batch_size: Option<i64>,
    // cloudeye-exporter keys with an equivalent here.
    pub(super) max_routines: Option<i64>,
    pub(super) resource_sync_interval_minutes: Option<i64>,
    pub(super) ignore_ssl_verify: Option<bool>,
    // cloudeye-exporter keys accepted for compatibility, without effect.
    pub(super) eps_path: Option<serde_yaml::Value>,
    pub(super) metric_info_expiration_days: Option<serde_yaml::Value>,
    pub(super) metric_info_clean_threshold: Option<serde_yaml::Value>,
    pub(super) ep_ids: Option<serde_yaml::Value>,
    pub(super) metrics_conf_path: Option<serde_yaml::Value>,
    pub(super) logs_conf_path: Option<serde_yaml::Value>,
    pub(super) endpoints_conf_path: Option<serde_yaml::Value>,
    pub(super) rms_retry_times: Option<serde_yaml::Value>,
    pub(super) namespaces: Option<serde_yaml::Value>,
    pub(super) export_rms_labels: Option<serde_yaml::Value>,
    pub(super) client_cn: Option<serde_yaml::Value>,
    pub(super) unit_standardization_enabled: Option<serde_yaml::Value>,
    pub(super) i18n_config_file_path: Option<serde_yaml::Value>,
    pub(super) unit_standardization_file_path: Option<serde_yaml::Value>,
    pub(super) metric_timestamp_export_enabled: Option<serde_yaml::Value>,
    pub(super) metric_query_duration: Option<serde_yaml::Value>,
    pub(super) enable_https: Option<serde_yaml::Value>,
    pub(super) https_port: Option<serde_yaml::Value>,
    pub(super) tls_cert: Option<serde_yaml::Value>,
    pub(super) tls_key: Option<serde_yaml::Value>,
    pub(super) proxy_schema: Option<serde_yaml::Value>,
    pub(super) proxy_host: Option<serde_yaml::Value>,
    pub(super) proxy_port: Option<serde_yaml::Value>,
    pub(super) proxy_username: Option<serde_yaml::Value>,
    pub(super) proxy_password: Option<Secret>,
}

impl RawGlobal {
    pub(super) fn ignored_present(&self) -> Vec<&'static str> {
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
pub(super) struct RawAuth {
    pub(super) auth_url: Option<String>,
    pub(super) region: Option<String>,
    pub(super) project_name: Option<String>,
    pub(super) project_id: Option<String>,
    pub(super) access_key: Option<String>,
    pub(super) secret_key: Option<Secret>,
    pub(super) security_token: Option<Secret>,
    pub(super) credentials_reload: Option<String>,
    // cloudeye-exporter keys: the account is identified by AK/SK here.
    pub(super) domain_name: Option<String>,
    pub(super) domain_id: Option<String>,
    pub(super) user_name: Option<String>,
    pub(super) password: Option<Secret>,
    pub(super) oidc: Option<serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEndpoints {
    pub(super) iam: Option<String>,
    pub(super) elb: Option<String>,
    pub(super) ces: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDiscovery {
    pub(super) annotation: Option<String>,
    pub(super) namespaces: Option<Vec<String>>,
    pub(super) listener_refresh: Option<String>,
    pub(super) ingresses: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCollection {
    pub(super) interval: Option<String>,
    pub(super) lookback: Option<String>,
    pub(super) filter: Option<String>,
    pub(super) metrics: Option<Vec<String>>,
    pub(super) stale_intervals: Option<i64>,
    pub(super) absent_as_zero: Option<bool>,
    pub(super) pool_metrics: Option<Vec<String>>,
    pub(super) align: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCloud {
    pub(super) connect_timeout: Option<String>,
    pub(super) request_timeout: Option<String>,
    pub(super) max_concurrency: Option<i64>,
    pub(super) ca_file: Option<String>,
    pub(super) insecure_skip_verify: Option<bool>,
    #[serde(default)]
    pub(super) retry: RawRetry,
    #[serde(default)]
    pub(super) rate_limit: RawRateLimit,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetry {
    pub(super) max_attempts: Option<i64>,
    pub(super) initial_backoff: Option<String>,
    pub(super) max_backoff: Option<String>,
    pub(super) max_elapsed: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimit {
    pub(super) iam_per_minute: Option<i64>,
    pub(super) elb_per_minute: Option<i64>,
    pub(super) ces_per_minute: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWeb {
    pub(super) tls_cert_file: Option<String>,
    pub(super) tls_key_file: Option<String>,
    pub(super) basic_auth_users: Option<std::collections::BTreeMap<String, Secret>>,
    pub(super) bearer_token_file: Option<String>,
    pub(super) read_header_timeout: Option<String>,
    pub(super) idle_timeout: Option<String>,
    pub(super) max_connections: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLeaderElection {
    pub(super) enabled: Option<bool>,
    pub(super) lease_name: Option<String>,
    pub(super) lease_namespace: Option<String>,
    pub(super) identity: Option<String>,
    pub(super) lease_duration: Option<String>,
    pub(super) renew_deadline: Option<String>,
    pub(super) retry_period: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) level: Option<String>,
    pub(super) format: Option<String>,
}
