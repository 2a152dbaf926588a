//! `RawConfig` -> `Config`: defaults applied and every value checked, each error naming its field. One
//! `build_<section>` a section, called in the file's order, so that of several mistakes the same one is
//! reported first.

use super::parse::*;
use super::raw::*;
use super::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

pub(super) fn build(
    raw: RawConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let mut ignored: Vec<String> = raw
        .global
        .ignored_present()
        .into_iter()
        .map(|k| format!("global.{k}"))
        .collect();
    let global = build_global(&raw.global)?;
    let (auth, auth_host) = build_auth(raw.auth, env, &mut ignored)?;
    let endpoints = build_endpoints(raw.endpoints, &auth_host, &auth.region)?;
    let discovery = build_discovery(raw.discovery, raw.global.resource_sync_interval_minutes)?;
    let collection = build_collection(raw.collection)?;
    let cloud = build_cloud(raw.cloud, &raw.global)?;
    let log = build_log(raw.log)?;
    let web = build_web(raw.web)?;
    header_safe(&auth.credentials)?;
    let leader_election = build_leader_election(raw.leader_election, env, &|| {
        std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE_FILE).ok()
    })?;
    Ok(Config {
        listen: global.listen,
        metric_path: global.metric_path,
        prefix: global.prefix,
        scrape_batch_size: global.scrape_batch_size,
        auth,
        endpoints,
        discovery,
        collection,
        cloud,
        log,
        web,
        leader_election,
        ignored_keys: ignored,
    })
}

/// An environment variable, when set to more than white space (its value is not trimmed).
fn env_nonempty(env: &dyn Fn(&str) -> Option<String>, k: &str) -> Option<String> {
    env(k).filter(|v| !v.trim().is_empty())
}

/// The `global` keys that are `Config`'s own fields.
struct Global {
    listen: String,
    metric_path: String,
    prefix: String,
    scrape_batch_size: usize,
}

fn build_global(g: &RawGlobal) -> Result<Global, ConfigError> {
    let listen = parse_listen(g.port.as_deref().unwrap_or(":8087"))?;
    let metric_path = g.metric_path.clone().unwrap_or_else(|| "/metrics".into());
    let reserved = ["/healthz", "/readyz", WARM_COPY_PATH].contains(&metric_path.as_str());
    if !is_plain_path(&metric_path) || reserved {
        return Err(ConfigError::invalid(
            "global.metric_path",
            &metric_path,
            format!(
                "must be an absolute path of letters, digits and - . _ ~ such as /metrics, other than / /healthz /readyz {WARM_COPY_PATH}"
            ),
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
    Ok(Global {
        listen,
        metric_path,
        prefix,
        scrape_batch_size: batch as usize,
    })
}

/// The parts of `auth.auth_url` the service endpoints derive from.
struct AuthHost {
    scheme: String,
    host: String,
    port: Option<u16>,
}

/// `auth`; the cloudeye-exporter keys it accepts without effect are added to `ignored`.
fn build_auth(
    a: RawAuth,
    env: &dyn Fn(&str) -> Option<String>,
    ignored: &mut Vec<String>,
) -> Result<(Auth, AuthHost), ConfigError> {
    let auth_url = non_empty(a.auth_url).ok_or_else(|| {
        ConfigError::invalid(
            "auth.auth_url",
            "",
            "required, e.g. https://iam.cn-east-3.myhuaweicloud.com/v3",
        )
    })?;
    let (scheme, host, port) = parse_url("auth.auth_url", &auth_url, true)?;
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
    let project_id = env_nonempty(env, ENV_PROJECT_ID)
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
    let credentials = build_credentials(
        a.access_key,
        a.secret_key,
        a.security_token,
        a.password.as_ref(),
        env,
    )?;
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
    let credentials_reload = bounded_duration(
        "auth.credentials_reload",
        a.credentials_reload,
        Duration::from_secs(10),
        Duration::from_secs(1),
        HOUR,
    )?;
    let auth = Auth {
        auth_url,
        region,
        project_name,
        project_id,
        domain_id,
        credentials_reload,
        credentials,
    };
    Ok((auth, AuthHost { scheme, host, port }))
}

/// The AK/SK (and token): the environment wins over the file.
fn build_credentials(
    access_key: Option<String>,
    secret_key: Option<Secret>,
    security_token: Option<Secret>,
    password: Option<&Secret>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Credentials, ConfigError> {
    let access_key = env_nonempty(env, ENV_AK)
        .or(non_empty(access_key))
        .unwrap_or_default();
    let secret_key = env_nonempty(env, ENV_SK)
        .map(Secret)
        .or(secret_key.filter(|s| !s.0.trim().is_empty()))
        .map(|s| Secret(s.0.trim().to_string()))
        .unwrap_or_default();
    let security_token = env_nonempty(env, ENV_TOKEN)
        .map(Secret)
        .or(security_token.filter(|s| !s.0.trim().is_empty()))
        .map(|s| Secret(s.0.trim().to_string()));
    if access_key.is_empty() || secret_key.is_empty() {
        if password.is_some_and(|p| !p.is_empty()) {
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
    Ok(Credentials {
        access_key,
        secret_key,
        security_token,
    })
}

/// The AK and the token travel in HTTP headers: control characters would make every request fail.
/// Checked after `web`, where it always was, so that the first of several errors stays the same.
fn header_safe(c: &Credentials) -> Result<(), ConfigError> {
    for (field, v) in [
        ("auth.access_key", Some(c.access_key.as_str())),
        (
            "auth.security_token",
            c.security_token.as_ref().map(|t| t.expose()),
        ),
    ] {
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
    Ok(())
}

/// `endpoints`: explicit, else derived from the auth_url host (rule in PRODUCT.md).
fn build_endpoints(
    e: RawEndpoints,
    auth: &AuthHost,
    region: &str,
) -> Result<Endpoints, ConfigError> {
    let derives = non_empty(e.elb.clone()).is_none() || non_empty(e.ces.clone()).is_none();
    if derives
        && let Some(other) = iam_region(&auth.host)
        && other != region
    {
        return Err(ConfigError::invalid(
            "auth.region",
            region,
            format!(
                "differs from the region {other} of the auth.auth_url host {}: ELB and CES calls would go to {other}; make them agree (or set endpoints.elb and endpoints.ces)",
                auth.host
            ),
        ));
    }
    let service_default = |svc: &str| -> Endpoint {
        let host = derive_host(&auth.host, svc, region);
        Endpoint {
            scheme: auth.scheme.clone(),
            authority: authority(&host, auth.port),
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
    let iam = match non_empty(e.iam.clone()) {
        Some(_) => endpoint("endpoints.iam", e.iam, "iam")?,
        None => Endpoint {
            scheme: auth.scheme.clone(),
            authority: authority(&auth.host, auth.port),
        },
    };
    Ok(Endpoints {
        iam,
        elb: endpoint("endpoints.elb", e.elb, "elb")?,
        ces: endpoint("endpoints.ces", e.ces, "ces")?,
    })
}

/// `discovery`; cloudeye-exporter's `global.resource_sync_interval_minutes` is the listener refresh when
/// `discovery.listener_refresh` is not set.
fn build_discovery(
    d: RawDiscovery,
    resource_sync_interval_minutes: Option<i64>,
) -> Result<Discovery, ConfigError> {
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
        resource_sync_interval_minutes,
    ) {
        (Some(v), _) => v,
        (None, Some(m)) => Duration::from_secs(
            positive("global.resource_sync_interval_minutes", Some(m), 5, 1440)? as u64 * 60,
        ),
        (None, None) => Duration::from_secs(300),
    };
    let listener_refresh = within(
        "discovery.listener_refresh",
        listener_refresh,
        Duration::from_secs(10),
        24 * HOUR,
    )?;
    Ok(Discovery {
        annotation,
        namespaces,
        listener_refresh,
        ingresses: d.ingresses.unwrap_or(true),
    })
}

fn build_collection(c: RawCollection) -> Result<Collection, ConfigError> {
    let interval = bounded_duration(
        "collection.interval",
        c.interval,
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
    Ok(Collection {
        interval,
        lookback,
        filter,
        metrics,
        stale_intervals,
        absent_as_zero: c.absent_as_zero.unwrap_or(false),
        pool_metrics,
        align: c.align.unwrap_or(true),
    })
}

/// `cloud`; cloudeye-exporter's `global.max_routines` and `global.ignore_ssl_verify` stand in for
/// `cloud.max_concurrency` and `cloud.insecure_skip_verify` when those are not set.
fn build_cloud(cl: RawCloud, g: &RawGlobal) -> Result<CloudSettings, ConfigError> {
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
    let ca_file = existing_file("cloud.ca_file", cl.ca_file)?;
    let insecure_skip_verify = cl
        .insecure_skip_verify
        .or(g.ignore_ssl_verify)
        .unwrap_or(false);
    Ok(CloudSettings {
        connect_timeout,
        request_timeout,
        max_concurrency,
        ca_file,
        insecure_skip_verify,
        retry: build_retry(cl.retry)?,
        rate_limit: build_rate_limits(cl.rate_limit)?,
    })
}

fn build_retry(r: RawRetry) -> Result<RetrySettings, ConfigError> {
    let retry = RetrySettings {
        max_attempts: positive("cloud.retry.max_attempts", r.max_attempts, 4, 20)? as u32,
        initial_backoff: dur("cloud.retry.initial_backoff", r.initial_backoff)?
            .unwrap_or(Duration::from_secs(1)),
        max_backoff: bounded_duration(
            "cloud.retry.max_backoff",
            r.max_backoff,
            Duration::from_secs(30),
            Duration::from_millis(1),
            10 * MINUTE,
        )?,
        max_elapsed: bounded_duration(
            "cloud.retry.max_elapsed",
            r.max_elapsed,
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
    Ok(retry)
}

fn build_rate_limits(rl: RawRateLimit) -> Result<RateLimits, ConfigError> {
    let per_minute = |field: &str, v: Option<i64>, default: i64| {
        positive(field, v, default, 10_000).map(|n| n as u32)
    };
    Ok(RateLimits {
        iam_per_minute: per_minute("cloud.rate_limit.iam_per_minute", rl.iam_per_minute, 60)?,
        elb_per_minute: per_minute("cloud.rate_limit.elb_per_minute", rl.elb_per_minute, 300)?,
        ces_per_minute: per_minute("cloud.rate_limit.ces_per_minute", rl.ces_per_minute, 300)?,
    })
}

fn build_log(l: RawLog) -> Result<LogSettings, ConfigError> {
    let level = l.level.unwrap_or_else(|| "info".into());
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
    let format = match l.format.as_deref().unwrap_or("text") {
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
    Ok(LogSettings { level, format })
}

/// A path that must name an existing file, when set.
fn existing_file(field: &str, v: Option<String>) -> Result<Option<PathBuf>, ConfigError> {
    match non_empty(v) {
        None => Ok(None),
        Some(p) if Path::new(&p).is_file() => Ok(Some(PathBuf::from(p))),
        Some(p) => Err(ConfigError::invalid(field, p, "file does not exist")),
    }
}

fn build_web(w: RawWeb) -> Result<WebSettings, ConfigError> {
    let tls = build_tls(w.tls_cert_file, w.tls_key_file)?;
    let basic_auth_users = build_basic_auth_users(w.basic_auth_users.unwrap_or_default())?;
    let bearer_token = read_bearer_token(w.bearer_token_file)?;
    let read_header_timeout = bounded_duration(
        "web.read_header_timeout",
        w.read_header_timeout,
        DEFAULT_READ_HEADER_TIMEOUT,
        Duration::from_millis(100),
        Duration::from_secs(300),
    )?;
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
        basic_auth_users,
        bearer_token,
        read_header_timeout,
        idle_timeout,
        max_connections,
    })
}

/// `web.tls_cert_file` and `web.tls_key_file`: both or neither.
fn build_tls(
    cert: Option<String>,
    key: Option<String>,
) -> Result<Option<(PathBuf, PathBuf)>, ConfigError> {
    let cert = existing_file("web.tls_cert_file", cert)?;
    let key = existing_file("web.tls_key_file", key)?;
    match (cert, key) {
        (Some(c), Some(k)) => Ok(Some((c, k))),
        (None, None) => Ok(None),
        (Some(_), None) => Err(ConfigError::invalid(
            "web.tls_key_file",
            "",
            "required with web.tls_cert_file",
        )),
        (None, Some(_)) => Err(ConfigError::invalid(
            "web.tls_cert_file",
            "",
            "required with web.tls_key_file",
        )),
    }
}

fn build_basic_auth_users(
    users: std::collections::BTreeMap<String, Secret>,
) -> Result<Vec<(String, Secret)>, ConfigError> {
    let mut checked = Vec::new();
    for (user, hash) in users {
        let field = format!("web.basic_auth_users.{user}");
        if user.is_empty() || user.contains(':') {
            return Err(ConfigError::invalid(
                &field,
                &user,
                "a user name must be non-empty and without ':'",
            ));
        }
        bcrypt_cost(&field, hash.expose())?;
        checked.push((user, hash));
    }
    Ok(checked)
}

/// The token in `web.bearer_token_file`, trimmed; an empty file is an error.
fn read_bearer_token(file: Option<String>) -> Result<Option<Secret>, ConfigError> {
    let Some(p) = existing_file("web.bearer_token_file", file)? else {
        return Ok(None);
    };
    let t = std::fs::read_to_string(&p)
        .map_err(|e| ConfigError::invalid("web.bearer_token_file", p.display(), e.to_string()))?;
    let t = t.trim();
    if t.is_empty() {
        return Err(ConfigError::invalid(
            "web.bearer_token_file",
            p.display(),
            "the file is empty",
        ));
    }
    Ok(Some(Secret::new(t)))
}

/// `leader_election`'s three durations, in the order client-go requires: the lease in whole seconds (the
/// Lease stores seconds), a shorter renew deadline, a shorter retry period.
fn leader_timing(
    lease_duration: Option<String>,
    renew_deadline: Option<String>,
    retry_period: Option<String>,
) -> Result<(Duration, Duration, Duration), ConfigError> {
    let lease_duration = bounded_duration(
        "leader_election.lease_duration",
        lease_duration,
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
    let renew_deadline = bounded_duration(
        "leader_election.renew_deadline",
        renew_deadline,
        Duration::from_secs(10),
        Duration::from_millis(200),
        HOUR,
    )?;
    shorter_than(
        ("leader_election.renew_deadline", renew_deadline),
        ("leader_election.lease_duration", lease_duration),
        "so a leader stops before others may take over",
    )?;
    let retry_period = bounded_duration(
        "leader_election.retry_period",
        retry_period,
        Duration::from_secs(2),
        Duration::from_millis(50),
        HOUR,
    )?;
    shorter_than(
        ("leader_election.retry_period", retry_period),
        ("leader_election.renew_deadline", renew_deadline),
        "so a leader gets more than one try to renew",
    )?;
    Ok((lease_duration, renew_deadline, retry_period))
}

/// A duration field that must stay below another one; `why` ends the message.
fn shorter_than(
    (field, d): (&str, Duration),
    (limit_field, limit): (&str, Duration),
    why: &str,
) -> Result<(), ConfigError> {
    if d >= limit {
        return Err(ConfigError::invalid(
            field,
            format_duration(d),
            format!(
                "must be shorter than {limit_field} ({}), {why}",
                format_duration(limit)
            ),
        ));
    }
    Ok(())
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
    let pod_ip = match non_empty(env(ENV_POD_IP)) {
        Some(ip) => Some(ip.parse().map_err(|_| {
            ConfigError::invalid(
                ENV_POD_IP,
                &ip,
                "must be an IP address (the downward API's status.podIP)",
            )
        })?),
        None => None,
    };
    Ok(Some(LeaderElection {
        lease_name,
        lease_namespace,
        identity,
        lease_duration,
        renew_deadline,
        retry_period,
        pod_ip,
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

#[cfg(test)]
mod tests {
    use super::*;

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
                pod_ip: None,
            }
        );
        let with_ip = [
            ("POD_NAME", "p"),
            ("POD_NAMESPACE", "n"),
            ("POD_IP", "10.0.3.7"),
        ];
        let l = leader_election("enabled: true", &with_ip, None).expect("loads");
        assert_eq!(l.and_then(|l| l.pod_ip), Some([10, 0, 3, 7].into()));
        let bad_ip = [
            ("POD_NAME", "p"),
            ("POD_NAMESPACE", "n"),
            ("POD_IP", "pod-a"),
        ];
        let e = leader_election("enabled: true", &bad_ip, None).expect_err("not an IP");
        assert!(
            e.to_string().contains("POD_IP") && e.to_string().contains("pod-a"),
            "{e}"
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
}
