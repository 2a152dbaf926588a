//! clouds.yml loading: cloudeye-exporter compatibility, defaults, environment overrides, and validation
//! errors that name their field.

use elb_exporter::config::{Config, ConfigError, Filter};
use std::collections::HashMap;
use std::time::Duration;

fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let m: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k| m.get(k).cloned()
}

fn no_env(_: &str) -> Option<String> {
    None
}

/// The practice guide's clouds.yml, as users copy it (AK/SK filled in).
const GUIDE: &str = r#"
global:
  prefix: "huaweicloud"
  scrape_batch_size: 10
auth:
  auth_url: "https://iam.cn-east-3.myhuaweicloud.com/v3"
  project_name: "cn-east-3"
  access_key: "AKGUIDE0000000000001"
  secret_key: "SKguide0000000000000000000000000000000000"
  region: "cn-east-3"
"#;

#[test]
fn practice_guide_file_loads_unchanged() {
    let c = Config::from_yaml(GUIDE, &no_env).expect("guide config loads");
    assert_eq!(c.prefix, "huaweicloud");
    assert_eq!(c.scrape_batch_size, 10);
    assert_eq!(c.effective_batch_size(), 10);
    assert_eq!(c.listen, "0.0.0.0:8087");
    assert_eq!(c.metric_path, "/metrics");
    assert_eq!(c.auth.region, "cn-east-3");
    assert_eq!(c.auth.project_name, "cn-east-3");
    assert_eq!(c.auth.project_id, "");
    assert_eq!(c.auth.credentials.access_key, "AKGUIDE0000000000001");
    assert_eq!(
        c.endpoints.iam.base_url(),
        "https://iam.cn-east-3.myhuaweicloud.com"
    );
    assert_eq!(
        c.endpoints.elb.base_url(),
        "https://elb.cn-east-3.myhuaweicloud.com"
    );
    assert_eq!(
        c.endpoints.ces.base_url(),
        "https://ces.cn-east-3.myhuaweicloud.com"
    );
    assert_eq!(c.discovery.annotation, "kubernetes.io/elb.id");
    assert!(c.discovery.namespaces.is_empty());
    assert_eq!(c.collection.interval, Duration::from_secs(60));
    assert_eq!(c.collection.lookback, Duration::from_secs(300));
    assert_eq!(c.collection.filter, Filter::Average);
    assert_eq!(c.collection.metrics.len(), 13);
    assert!(c.ignored_keys.is_empty());
}

#[test]
fn full_cloudeye_exporter_file_loads_and_reports_ignored_keys() {
    let text = r#"
global:
  port: ":8087"
  prefix: "huaweicloud"
  metric_path: "/metrics"
  scrape_batch_size: 300
  max_routines: 20
  resource_sync_interval_minutes: 20
  ep_ids: "0"
  logs_conf_path: "/root/logs.yml"
  metrics_conf_path: "/root/metric.yml"
  endpoints_conf_path: "/root/endpoints.yml"
  ignore_ssl_verify: false
  proxy_schema: "http"
  proxy_host: "proxy.example"
  proxy_port: 3128
  proxy_username: "u"
  proxy_password: "p"
auth:
  auth_url: "https://iam.cn-north-4.myhuaweicloud.com/v3"
  project_name: "cn-north-4"
  access_key: "AK1"
  secret_key: "SK1"
  region: "cn-north-4"
  domain_name: "acct"
"#;
    let c = Config::from_yaml(text, &no_env).expect("loads");
    assert_eq!(c.cloud.max_concurrency, 20);
    assert_eq!(c.discovery.listener_refresh, Duration::from_secs(1200));
    for k in ["global.ep_ids", "global.proxy_password", "auth.domain_name"] {
        assert!(
            c.ignored_keys.iter().any(|i| i == k),
            "{k} in {:?}",
            c.ignored_keys
        );
    }
    assert!(
        !format!("{c:?}").contains("SK1\""),
        "Debug must not show the SK"
    );
}

#[test]
fn example_file_documents_every_key_and_loads() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/clouds.example.yml"))
        .unwrap();
    let env = env_of(&[
        ("HUAWEICLOUD_SDK_AK", "AKENV"),
        ("HUAWEICLOUD_SDK_SK", "SKENV"),
    ]);
    let c = Config::from_yaml(&text, &env).expect("example loads with credentials from env");
    assert_eq!(c.scrape_batch_size, 500);
    assert_eq!(c.effective_batch_size(), 500);
    assert_eq!(c.collection.stale_intervals, 3);
    assert_eq!(c.cloud.rate_limit.ces_per_minute, 300);
    assert_eq!(c.discovery.listener_refresh, Duration::from_secs(300));
}

#[test]
fn environment_wins_over_file_for_secrets_and_project() {
    let env = env_of(&[
        ("HUAWEICLOUD_SDK_AK", "AKFROMENV"),
        ("HUAWEICLOUD_SDK_SK", "SKFROMENV"),
        ("HUAWEICLOUD_SDK_SECURITY_TOKEN", "TOKENFROMENV"),
        (
            "HUAWEICLOUD_SDK_PROJECT_ID",
            "0123456789abcdef0123456789abcdef",
        ),
    ]);
    let c = Config::from_yaml(GUIDE, &env).unwrap();
    let cred = &c.auth.credentials;
    assert_eq!(cred.access_key, "AKFROMENV");
    assert_eq!(cred.secret_key.expose(), "SKFROMENV");
    assert_eq!(
        cred.security_token.as_ref().unwrap().expose(),
        "TOKENFROMENV"
    );
    assert_eq!(c.auth.project_id, "0123456789abcdef0123456789abcdef");
    let dbg = format!("{c:?}");
    assert!(
        !dbg.contains("SKFROMENV") && !dbg.contains("TOKENFROMENV"),
        "{dbg}"
    );
}

#[test]
fn endpoint_overrides_keep_scheme_and_port() {
    let text = format!(
        "{GUIDE}endpoints:\n  iam: \"http://127.0.0.1:9999\"\n  elb: \"http://127.0.0.1:9999\"\n  ces: \"https://ces.example.com:8443\"\n"
    );
    let c = Config::from_yaml(&text, &no_env).unwrap();
    assert_eq!(c.endpoints.iam.authority, "127.0.0.1:9999");
    assert_eq!(c.endpoints.elb.base_url(), "http://127.0.0.1:9999");
    assert_eq!(c.endpoints.ces.authority, "ces.example.com:8443");
    // A non-default port on auth_url carries over to the derived endpoints; a default one is dropped.
    let t2 = GUIDE.replace("myhuaweicloud.com/v3", "myhuaweicloud.com:8443/v3");
    let c2 = Config::from_yaml(&t2, &no_env).unwrap();
    assert_eq!(
        c2.endpoints.ces.base_url(),
        "https://ces.cn-east-3.myhuaweicloud.com:8443"
    );
    let t3 = GUIDE.replace("myhuaweicloud.com/v3", "myhuaweicloud.com:443/v3");
    let c3 = Config::from_yaml(&t3, &no_env).unwrap();
    assert_eq!(
        c3.endpoints.elb.authority,
        "elb.cn-east-3.myhuaweicloud.com"
    );
}

#[test]
fn batch_size_is_capped_by_the_datapoint_budget() {
    let text = format!("{GUIDE}collection:\n  lookback: \"10m\"\n")
        .replace("scrape_batch_size: 10", "scrape_batch_size: 500");
    let c = Config::from_yaml(&text, &no_env).unwrap();
    assert_eq!(
        c.effective_batch_size(),
        300,
        "3000 datapoints / 10 minutes"
    );
}

/// Applies `edit` to the guide file and returns the error, which must name `field` and show `value`.
fn expect_error(text: &str, field: &str, value: &str) {
    let err = Config::from_yaml(text, &no_env).expect_err(&format!("{field} must be rejected"));
    let msg = err.to_string();
    assert!(msg.contains(field), "error {msg:?} must name {field}");
    assert!(
        msg.contains(value),
        "error {msg:?} must show the value {value:?}"
    );
}

#[test]
fn unknown_keys_are_named() {
    expect_error(
        &format!("{GUIDE}  portt: 1\n").replace("auth:\n", "global2: {}\nauth:\n"),
        "global2",
        "global2",
    );
    expect_error(
        &GUIDE.replace(
            "  scrape_batch_size: 10\n",
            "  scrape_batch_size: 10\n  colour: red\n",
        ),
        "global",
        "colour",
    );
    expect_error(
        &format!("{GUIDE}collection:\n  intervall: 5s\n"),
        "collection",
        "intervall",
    );
    expect_error(
        &format!("{GUIDE}cloud:\n  retry:\n    attempts: 3\n"),
        "cloud.retry",
        "attempts",
    );
}

#[test]
fn each_invalid_value_names_its_field() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "global:\n  scrape_batch_size: 501\n",
            "global.scrape_batch_size",
            "501",
        ),
        (
            "global:\n  scrape_batch_size: 0\n",
            "global.scrape_batch_size",
            "0",
        ),
        ("global:\n  port: \"eighty\"\n", "global.port", "eighty"),
        (
            "global:\n  metric_path: \"metrics\"\n",
            "global.metric_path",
            "metrics",
        ),
        (
            "global:\n  prefix: \"huawei-cloud\"\n",
            "global.prefix",
            "huawei-cloud",
        ),
        (
            "collection:\n  interval: \"5 parsecs\"\n",
            "collection.interval",
            "5 parsecs",
        ),
        (
            "collection:\n  interval: \"500ms\"\n",
            "collection.interval",
            "500ms",
        ),
        (
            "collection:\n  lookback: \"10s\"\n",
            "collection.lookback",
            "10s",
        ),
        (
            "collection:\n  filter: \"median\"\n",
            "collection.filter",
            "median",
        ),
        ("collection:\n  metrics: []\n", "collection.metrics", "[]"),
        (
            "collection:\n  metrics: [m1_cps, \"7up\"]\n",
            "collection.metrics[1]",
            "7up",
        ),
        (
            "collection:\n  metrics: [m1_cps, m1_cps]\n",
            "collection.metrics[1]",
            "m1_cps",
        ),
        (
            "collection:\n  stale_intervals: 0\n",
            "collection.stale_intervals",
            "0",
        ),
        (
            "discovery:\n  namespaces: [shop, default, shop]\n",
            "discovery.namespaces[2]",
            "listed twice",
        ),
        (
            "global:\n  metric_path: \"/:m\"\n",
            "global.metric_path",
            "/:m",
        ),
        (
            "global:\n  metric_path: \"/internal/warm-copy\"\n",
            "global.metric_path",
            "/internal/warm-copy",
        ),
        (
            "global:\n  metric_path: \"/readyz\"\n",
            "global.metric_path",
            "/readyz",
        ),
        (
            "global:\n  metric_path: \"/metrics/{x}\"\n",
            "global.metric_path",
            "/metrics/{x}",
        ),
        (
            "global:\n  metric_path: \"//metrics\"\n",
            "global.metric_path",
            "//metrics",
        ),
        (
            "collection:\n  interval: \"2h\"\n",
            "collection.interval",
            "2h",
        ),
        (
            "discovery:\n  listener_refresh: \"25h\"\n",
            "discovery.listener_refresh",
            "25h",
        ),
        (
            "cloud:\n  retry:\n    max_elapsed: \"99999999999h\"\n",
            "cloud.retry.max_elapsed",
            "99999999999h",
        ),
        (
            "cloud:\n  retry:\n    max_backoff: \"11m\"\n",
            "cloud.retry.max_backoff",
            "11m",
        ),
        (
            "discovery:\n  namespaces: [\"Bad_NS\"]\n",
            "discovery.namespaces[0]",
            "Bad_NS",
        ),
        (
            "discovery:\n  annotation: \"not a key\"\n",
            "discovery.annotation",
            "not a key",
        ),
        (
            "discovery:\n  listener_refresh: \"1s\"\n",
            "discovery.listener_refresh",
            "1s",
        ),
        (
            "endpoints:\n  ces: \"ftp://ces.example.com\"\n",
            "endpoints.ces",
            "ftp://ces.example.com",
        ),
        (
            "endpoints:\n  elb: \"https://elb.example.com/v3\"\n",
            "endpoints.elb",
            "https://elb.example.com/v3",
        ),
        (
            "endpoints:\n  elb: \"not a url\"\n",
            "endpoints.elb",
            "not a url",
        ),
        (
            "cloud:\n  request_timeout: \"0s\"\n",
            "cloud.request_timeout",
            "0s",
        ),
        (
            "cloud:\n  max_concurrency: 0\n",
            "cloud.max_concurrency",
            "0",
        ),
        (
            "cloud:\n  ca_file: \"/nonexistent/ca.pem\"\n",
            "cloud.ca_file",
            "/nonexistent/ca.pem",
        ),
        (
            "cloud:\n  rate_limit:\n    ces_per_minute: -5\n",
            "cloud.rate_limit.ces_per_minute",
            "-5",
        ),
        ("log:\n  format: \"xml\"\n", "log.format", "xml"),
        (
            "web:\n  tls_cert_file: \"/nonexistent.crt\"\n",
            "web.tls_cert_file",
            "/nonexistent.crt",
        ),
        (
            "web:\n  bearer_token_file: \"/nonexistent.tok\"\n",
            "web.bearer_token_file",
            "/nonexistent.tok",
        ),
        (
            "web:\n  basic_auth_users:\n    prom: \"plaintext\"\n",
            "web.basic_auth_users.prom",
            "[redacted]",
        ),
        (
            "web:\n  read_header_timeout: \"1h\"\n",
            "web.read_header_timeout",
            "1h",
        ),
        ("web:\n  max_connections: 0\n", "web.max_connections", "0"),
    ];
    for (extra, field, value) in cases {
        // Later sections are appended; `global` edits replace the guide's global section.
        let text = if extra.starts_with("global:") {
            GUIDE.replace(
                "global:\n  prefix: \"huaweicloud\"\n  scrape_batch_size: 10\n",
                extra,
            )
        } else {
            format!("{GUIDE}{extra}")
        };
        expect_error(&text, field, value);
    }
}

#[test]
fn web_settings_load() {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("token");
    std::fs::write(&tok, "abc\n").unwrap();
    let hash = "$2y$10$abcdefghijklmnopqrstuuWbFnL3ks1ZbGcyvAqbW7Ez4YjJgqk1e";
    let text = format!(
        "{GUIDE}web:\n  bearer_token_file: \"{}\"\n  basic_auth_users:\n    prom: \"{hash}\"\n",
        tok.display()
    );
    let c = Config::from_yaml(&text, &no_env).unwrap();
    assert_eq!(c.web.bearer_token.as_ref().unwrap().expose(), "abc");
    assert_eq!(c.web.basic_auth_users[0].0, "prom");
    assert!(c.web.auth_enabled());
    assert!(!format!("{c:?}").contains(hash));
    // Off by default.
    assert!(
        !Config::from_yaml(GUIDE, &no_env)
            .unwrap()
            .web
            .auth_enabled()
    );
}

#[test]
fn auth_errors_name_their_field() {
    expect_error(
        &GUIDE.replace(
            "  region: \"cn-east-3\"\n",
            "  region: \"cn-east-3\"\n  credentials_reload: \"2h\"\n",
        ),
        "auth.credentials_reload",
        "2h",
    );
    expect_error(
        &GUIDE.replace(
            "  auth_url: \"https://iam.cn-east-3.myhuaweicloud.com/v3\"\n",
            "",
        ),
        "auth.auth_url",
        "",
    );
    expect_error(
        &GUIDE.replace("https://iam.cn-east-3", "iam.cn-east-3"),
        "auth.auth_url",
        "iam.cn-east-3",
    );
    expect_error(
        &GUIDE.replace("  region: \"cn-east-3\"\n", ""),
        "auth.region",
        "",
    );
    expect_error(
        &GUIDE.replace("  region: \"cn-east-3\"\n", "  region: \"CN East 3\"\n"),
        "auth.region",
        "CN East 3",
    );
    expect_error(
        &GUIDE.replace("  access_key: \"AKGUIDE0000000000001\"\n", ""),
        "auth.access_key",
        "",
    );
    let no_sk = GUIDE.replace(
        "  secret_key: \"SKguide0000000000000000000000000000000000\"\n",
        "",
    );
    expect_error(&no_sk, "auth.secret_key", "");
    let pw = no_sk.replace("  region:", "  password: \"hunter2\"\n  region:");
    let err = Config::from_yaml(&pw, &no_env).unwrap_err().to_string();
    assert!(
        err.contains("auth.password") && !err.contains("hunter2"),
        "{err}"
    );
}

#[test]
fn a_secret_never_shows_in_errors() {
    // A URL with credentials in it: the error must not echo them.
    let text = GUIDE.replace("https://iam.", "https://user:s3cr3t@iam.");
    let err = Config::from_yaml(&text, &no_env).unwrap_err();
    assert!(matches!(err, ConfigError::Invalid { .. }));
    assert!(!err.to_string().contains("s3cr3t"), "{err}");
}
