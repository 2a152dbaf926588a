//! The practice guide's pipeline against the real Prometheus (Debian package `prometheus`, with `promtool`):
//!
//!   elb-exporter demo → Prometheus running the guide's `elb_metric` job (deploy/prometheus-additional.yaml)
//!     AND a ServiceMonitor-equivalent job (deploy/servicemonitor.yaml: `honor_labels`), so every series is
//!     stored twice, as with two scrape paths in a cluster
//!     → every prometheus-adapter rule of deploy/adapter/elb-exporter-rules.yaml, filled in for the shipped
//!       HPAs: each must return the single, undoubled value (the guide's plain `sum` returns twice it)
//!     → every panel query of deploy/grafana/elb-exporter.json: parses, runs, and returns data unless it
//!       shows failures
//!
//! Without `prometheus`/`promtool` on PATH the test skips, unless `REQUIRE_PROMETHEUS=1` (CI), where it fails.
//!
//! # How the guide's job runs here without a cluster
//!
//! The job discovers targets with `kubernetes_sd_configs` (role `endpoints`) and then, verbatim:
//!   1. keeps only targets whose Service has the annotation `prometheus.io/port: "8087"`;
//!   2. rewrites `__address__` to `<discovered host>:<that annotation>`, i.e. `<pod ip>:8087`;
//!   3. maps the Service's labels and adds `kubernetes_namespace` / `kubernetes_service`.
//!
//! Only the discovery mechanism is replaced: `kubernetes_sd_configs` becomes an `http_sd_configs` entry
//! served by this test, which returns what the endpoints role would produce for the Services of
//! deploy/service.yaml (the exporter's) and deploy/example-app.yaml (nginx): their `__meta_kubernetes_*`
//! labels, computed from the manifests. Every relabel rule, `params` and the job name stay verbatim.
//!
//! Rule 2 forces port 8087 into the scrape address, so the exporter must really listen on port 8087 - of the
//! discovered host. Rather than `127.0.0.1:8087` (often taken, e.g. by a developer's `elb-exporter demo`,
//! whose default it is), the "pod ip" is a random address of the loopback net 127.0.0.0/8 (Linux routes all
//! of it to `lo`), and the exporter runs on `<that ip>:8087`. Only if no such address can be bound does the
//! test fall back to 127.0.0.1:8087. The discovered `__address__` deliberately carries another (unused) port,
//! so a successful scrape proves that the address really comes from rule 2, not from discovery; the nginx
//! Service, without the annotation, must be dropped by rule 1. So the keep rule keeps 8087 as written, and
//! nothing in the job is edited to make the test pass.
//!
//! Prometheus scrapes with `Accept-Encoding: gzip`, so the scrape also covers the exporter's gzip body.

mod common;

use common::{Exporter, now_ms, samples_where};
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use elb_exporter::sim::cloud::datapoint_value;
use serde::Deserialize;
use serde_json::{Value as Json, json};
use serde_yaml::{Mapping, Value as Yaml};

const EXPORTER: &str = env!("CARGO_BIN_EXE_elb-exporter");
const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");
const ADAPTER_SNIPPET: &str = "adapter/elb-exporter-rules.yaml";
const DASHBOARD: &str = "grafana/elb-exporter.json";
/// The ServiceMonitor-equivalent job: the operator's relabelling names the job after the scraped Service.
const SM_JOB: &str = "elb-exporter";

/// The port the guide's keep rule and address rewrite insist on.
const GUIDE_PORT: u16 = 8087;
const JOB: &str = "elb_metric";
const SERIES: &str = "huaweicloud_sys_elb_listener_m7_in_Bps";
const CES_METRIC: &str = "m7_in_Bps";
/// The demo's only listener of Service default/nginx (src/demo.rs).
const NGINX_LISTENER: &str = "a1000000-0000-4000-8000-000000000001";
const NGINX_ELB: &str = "6f1c6a1e-0d7e-4c55-9a3b-1d2e3f4a5b01";
const MINUTE_MS: i64 = 60_000;

// ---------------------------------------------------------------------------------------------------------
// processes

/// A child process killed (and reaped) when dropped, so nothing outlives the test, even when it fails.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The end of the process's log, for failure messages.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        tail(self.name, &self.log.display().to_string(), &text)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|dir| dir.join(bin).is_file()))
}

fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// A port free right now on `ip` (bound and released).
fn free_port(ip: Ipv4Addr) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("bind {ip}:0: {e}"))
}

/// Starts `elb-exporter demo --listen <ip>:8087`: first on random 127.x.y.z addresses, then on 127.0.0.1.
/// Returns the process and the address it serves (the one printed on its first stdout line).
fn start_exporter() -> (Exporter, SocketAddr) {
    let seed = random_u64();
    let mut candidates: Vec<Ipv4Addr> = (0..5u64)
        .map(|k| {
            let r = seed.rotate_left(u32::try_from(13 * k).expect("small")) ^ k;
            let [a, b, c, ..] = r.to_le_bytes();
            // 127.<10..=249>.<b>.<1..=254>: never 127.0.0.x, never a broadcast-looking .0/.255 host.
            Ipv4Addr::new(127, 10 + a % 240, b, 1 + c % 254)
        })
        .collect();
    candidates.push(Ipv4Addr::LOCALHOST);
    let mut failures = Vec::new();
    for ip in candidates {
        let listen = SocketAddr::from((ip, GUIDE_PORT));
        let started = Exporter::try_spawn(
            Command::new(EXPORTER).args(["demo", "--listen", &listen.to_string()]),
            Path::new("/nonexistent-kubeconfig"),
            &[],
        );
        // An error: the address or port is not available; try the next one.
        let exporter = match started {
            Ok(e) => e,
            Err(e) => {
                failures.push(format!("{listen}: {e}"));
                continue;
            }
        };
        let first = exporter.stdout();
        let first = first.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("elb-exporter demo: serving "),
            "unexpected first stdout line of the demo: {first:?}"
        );
        let addr: SocketAddr = exporter
            .base
            .strip_prefix("http://")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no http://ADDR/metrics in {first:?}"));
        assert_eq!(addr, listen, "the demo serves another address than asked");
        return (exporter, addr);
    }
    panic!(
        "could not start the exporter on port {GUIDE_PORT} of any loopback address:\n{}",
        failures.join("\n")
    );
}

/// A child process whose readiness [`wait_ok`] waits for: whether it has exited, the end of its log.
trait Watched {
    fn name(&self) -> &str;
    fn exited(&mut self) -> Option<ExitStatus>;
    fn log_tail(&self) -> String;
}

impl Watched for Proc {
    fn name(&self) -> &str {
        self.name
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        Proc::exited(self)
    }

    fn log_tail(&self) -> String {
        Proc::log_tail(self)
    }
}

impl Watched for Exporter {
    fn name(&self) -> &str {
        "elb-exporter"
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn log_tail(&self) -> String {
        tail("elb-exporter", "stderr", &self.logs())
    }
}

/// The end of a log (its last 4,000 bytes), for failure messages.
fn tail(name: &str, what: &str, text: &str) -> String {
    let start = text.len().saturating_sub(4000);
    let start = (start..text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    format!("--- {name} log ({what}) ---\n{}", &text[start..])
}

/// Runs `promtool ARGS`, with `stdin` as its standard input; returns (status, stdout, stderr).
fn promtool(args: &[&str], stdin: &[u8]) -> (ExitStatus, String, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(stdin)
        .expect("write to promtool");
    let out = child.wait_with_output().expect("wait for promtool");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ---------------------------------------------------------------------------------------------------------
// HTTP

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

async fn get(client: &reqwest::Client, url: &str) -> Result<(u16, String), String> {
    let resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp.text().await.map_err(|e| format!("{url}: body: {e}"))?;
    Ok((status, body))
}

/// Waits until `url` answers 200; panics after `limit` (or when `proc` exits) with its log.
async fn wait_ok(client: &reqwest::Client, url: &str, limit: Duration, proc: &mut impl Watched) {
    let deadline = Instant::now() + limit;
    loop {
        let last = match get(client, url).await {
            Ok((200, _)) => return,
            Ok((s, body)) => format!("HTTP {s}: {body}"),
            Err(e) => e,
        };
        if let Some(status) = proc.exited() {
            panic!(
                "{} exited ({status}) before {url} was ready\n{}",
                proc.name(),
                proc.log_tail()
            );
        }
        if Instant::now() > deadline {
            panic!(
                "{url} not 200 within {limit:?} (last: {last})\n{}",
                proc.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Prometheus HTTP API call; returns `data`.
async fn prom_api(
    client: &reqwest::Client,
    base: &str,
    path: &str,
    params: &[(&str, &str)],
) -> Json {
    let url = reqwest::Url::parse_with_params(&format!("{base}{path}"), params).expect("api url");
    let (status, body) = get(client, url.as_str())
        .await
        .unwrap_or_else(|e| panic!("Prometheus API: {e}"));
    let v: Json = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("{url}: HTTP {status}, not JSON ({e}): {body}"));
    assert!(
        status == 200 && v["status"] == "success",
        "{url}: HTTP {status}: {body}"
    );
    v["data"].clone()
}

/// An instant query; returns the vector's samples (labels, value).
async fn prom_query(
    client: &reqwest::Client,
    base: &str,
    query: &str,
) -> Vec<(BTreeMap<String, String>, f64)> {
    let data = prom_api(client, base, "/api/v1/query", &[("query", query)]).await;
    assert_eq!(data["resultType"], "vector", "{query}: {data}");
    data["result"]
        .as_array()
        .expect("result array")
        .iter()
        .map(|s| {
            let labels = BTreeMap::<String, String>::deserialize(&s["metric"]).expect("labels");
            let value = s["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("{query}: bad sample {s}"));
            (labels, value)
        })
        .collect()
}

/// The value of the exporter's own nginx series, read from its /metrics text.
fn exporter_nginx_value(metrics: &str) -> f64 {
    let samples = samples_where(
        metrics,
        SERIES,
        &[("namespace", "default"), ("service", "nginx")],
    );
    for (_, labels, _) in &samples {
        assert!(
            labels
                .iter()
                .any(|(k, v)| k == "lbaas_listener_id" && v == NGINX_LISTENER),
            "unexpected nginx listener in {labels:?}"
        );
    }
    assert_eq!(
        samples.len(),
        1,
        "the demo's Service default/nginx should have exactly one listener in /metrics:\n{metrics}"
    );
    samples[0].2
}

// ---------------------------------------------------------------------------------------------------------
// deploy/ files

fn yaml_file(name: &str) -> Yaml {
    let path = format!("{DEPLOY}/{name}");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml_docs(name: &str) -> Vec<Yaml> {
    let path = format!("{DEPLOY}/{name}");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Yaml::deserialize(d).unwrap_or_else(|e| panic!("{path}: {e}")))
        .collect()
}

fn s<'a>(v: &'a Yaml, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: not a string: {v:?}"))
}

/// Prometheus' label-name sanitising for Kubernetes labels and annotations (strutil.SanitizeLabelName).
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The `__meta_kubernetes_*` labels the `endpoints` role attaches to a target of the Service's first port.
fn endpoints_meta_labels(svc: &Yaml) -> BTreeMap<String, String> {
    let md = &svc["metadata"];
    let name = s(&md["name"], "metadata.name");
    let mut m = BTreeMap::new();
    m.insert(
        "__meta_kubernetes_namespace".into(),
        md["namespace"].as_str().unwrap_or("default").to_owned(),
    );
    m.insert("__meta_kubernetes_service_name".into(), name.to_owned());
    m.insert("__meta_kubernetes_endpoints_name".into(), name.to_owned());
    for (kind, field) in [("label", "labels"), ("annotation", "annotations")] {
        if let Some(map) = md[field].as_mapping() {
            for (k, v) in map {
                let k = sanitize(s(k, field));
                m.insert(
                    format!("__meta_kubernetes_service_{kind}_{k}"),
                    s(v, field).to_owned(),
                );
                m.insert(
                    format!("__meta_kubernetes_service_{kind}present_{k}"),
                    "true".into(),
                );
            }
        }
    }
    let port = &svc["spec"]["ports"][0];
    m.insert(
        "__meta_kubernetes_endpoint_port_name".into(),
        port["name"].as_str().unwrap_or_default().to_owned(),
    );
    m.insert(
        "__meta_kubernetes_endpoint_port_protocol".into(),
        port["protocol"].as_str().unwrap_or("TCP").to_owned(),
    );
    m.insert("__meta_kubernetes_endpoint_ready".into(), "true".into());
    m
}

/// The guide's job with its discovery swapped for `http_sd_configs` at `sd_url`; everything else verbatim.
fn guide_job(sd_url: &str) -> Yaml {
    let jobs = yaml_file("prometheus-additional.yaml");
    let jobs = jobs
        .as_sequence()
        .expect("prometheus-additional.yaml is a list of scrape configs");
    let mut matching = jobs.iter().filter(|j| j["job_name"] == JOB);
    let job = matching.next().expect("job elb_metric").clone();
    assert!(matching.next().is_none(), "two jobs named {JOB}");
    let mut job = job.as_mapping().expect("job is a mapping").clone();
    let sd = job
        .remove("kubernetes_sd_configs")
        .expect("the guide's job uses kubernetes_sd_configs");
    assert_eq!(
        sd,
        serde_yaml::from_str::<Yaml>("[{role: endpoints}]").expect("yaml"),
        "this test emulates the endpoints role; the job now uses another discovery"
    );
    assert!(
        job.get("scrape_interval").is_none() && job.get("scrape_timeout").is_none(),
        "the job sets its own interval; the test's 1 s global interval would not apply"
    );
    job.insert(
        "http_sd_configs".into(),
        serde_yaml::from_str(&format!("[{{url: '{sd_url}', refresh_interval: 1s}}]"))
            .expect("yaml"),
    );
    Yaml::Mapping(job)
}

/// What the Prometheus Operator generates from deploy/servicemonitor.yaml for the exporter's Service
/// (deploy/service.yaml): its endpoint's path, scheme and `honorLabels`, and the target labels the operator
/// attaches (`namespace`/`service` naming the EXPORTER's Service, `pod`, `container`, `endpoint`); the job is
/// named after the Service, as the operator's relabelling does. Endpoints discovery becomes a static target.
fn servicemonitor_job(target: SocketAddr) -> Yaml {
    let sm = yaml_file("servicemonitor.yaml");
    let svc = yaml_file("service.yaml");
    assert_eq!(sm["kind"], "ServiceMonitor");
    let eps = sm["spec"]["endpoints"]
        .as_sequence()
        .expect("servicemonitor.yaml: spec.endpoints");
    assert_eq!(eps.len(), 1, "one endpoint expected: {eps:?}");
    let ep = &eps[0];
    let port = s(&ep["port"], "endpoints[0].port");
    let svc_name = s(&svc["metadata"]["name"], "service.yaml metadata.name");
    assert_eq!(svc_name, SM_JOB);
    let labels = json!({
        "namespace": svc["metadata"]["namespace"].as_str().unwrap_or("default"),
        "service": svc_name,
        "pod": format!("{svc_name}-5d8f7c9b6d-x2x7q"),
        "container": svc_name,
        "endpoint": port,
    });
    let job = json!({
        "job_name": SM_JOB,
        "honor_labels": ep["honorLabels"].as_bool().unwrap_or(false),
        "metrics_path": ep["path"].as_str().unwrap_or("/metrics"),
        "scheme": ep["scheme"].as_str().unwrap_or("http"),
        "static_configs": [{"targets": [target.to_string()], "labels": labels}],
    });
    serde_json::from_value(job).expect("job as YAML")
}

// ---------------------------------------------------------------------------------------------------------
// prometheus-adapter emulation

struct AdapterRule {
    series_query: String,
    name_matches: String,
    name_as: String,
    metrics_query: String,
    /// resource (singular, lower case) → label
    overrides: BTreeMap<String, String>,
}

/// Every rule of the adapter snippet (deploy/adapter/elb-exporter-rules.yaml: a `rules:` list to merge).
fn adapter_rules() -> Vec<AdapterRule> {
    let snippet = yaml_file(ADAPTER_SNIPPET);
    assert!(
        snippet.get("kind").is_none(),
        "{ADAPTER_SNIPPET} must be a snippet to merge, not a whole object"
    );
    let rules = snippet["rules"]
        .as_sequence()
        .unwrap_or_else(|| panic!("{ADAPTER_SNIPPET}: no rules list"));
    assert!(!rules.is_empty(), "{ADAPTER_SNIPPET}: no rules");
    rules
        .iter()
        .map(|rule| {
            let overrides = rule["resources"]["overrides"]
                .as_mapping()
                .expect("resources.overrides")
                .iter()
                .map(|(label, r)| {
                    let res = s(&r["resource"], "resource").to_ascii_lowercase();
                    // Singular: services -> service, ingresses -> ingress (and ingress stays).
                    let res = if let Some(stem) = res.strip_suffix("sses") {
                        format!("{stem}ss")
                    } else if res.ends_with("ss") {
                        res
                    } else {
                        res.strip_suffix('s').map(str::to_owned).unwrap_or(res)
                    };
                    (res, s(label, "override label").to_owned())
                })
                .collect();
            AdapterRule {
                series_query: s(&rule["seriesQuery"], "seriesQuery").to_owned(),
                name_matches: s(&rule["name"]["matches"], "name.matches").to_owned(),
                name_as: s(&rule["name"]["as"], "name.as").to_owned(),
                metrics_query: s(&rule["metricsQuery"], "metricsQuery").to_owned(),
                overrides,
            }
        })
        .collect()
}

impl AdapterRule {
    /// The adapter's name mapping (Go regexp FindStringSubmatchIndex + ExpandString), for patterns of the
    /// shape `<literal>(.*)` and templates using `${1}` only; other shapes fail the test rather than being
    /// emulated wrongly.
    fn metric_name(&self, series: &str) -> Option<String> {
        let prefix = self
            .name_matches
            .strip_suffix("(.*)")
            .filter(|p| p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or_else(|| panic!("name.matches {:?} is not <literal>(.*)", self.name_matches));
        assert_eq!(
            self.name_as.matches('$').count(),
            self.name_as.matches("${1}").count(),
            "name.as {:?}: only ${{1}} is emulated",
            self.name_as
        );
        let at = series.find(prefix)?;
        Some(self.name_as.replace("${1}", &series[at + prefix.len()..]))
    }

    /// metricsQuery for an Object metric of `resource` `name` in `namespace` (pkg/naming/metrics_query.go
    /// Build: namespace matcher first, then the resource's; group by the resource's label).
    fn metrics_query(&self, series: &str, namespace: &str, resource: &str, name: &str) -> String {
        let ns_label = &self.overrides["namespace"];
        let res_label = self
            .overrides
            .get(resource)
            .unwrap_or_else(|| panic!("no resources.overrides entry for {resource}"));
        let q = self
            .metrics_query
            .replace("<<.Series>>", series)
            .replace(
                "<<.LabelMatchers>>",
                &format!("{ns_label}=\"{namespace}\",{res_label}=\"{name}\""),
            )
            .replace("<<.GroupBy>>", res_label);
        assert!(!q.contains("<<"), "template fields left unfilled: {q}");
        q
    }
}

// ---------------------------------------------------------------------------------------------------------
// the test

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guide_pipeline_against_real_prometheus() {
    let missing: Vec<&str> = ["prometheus", "promtool"]
        .into_iter()
        .filter(|b| !on_path(b))
        .collect();
    if !missing.is_empty() {
        let why = format!(
            "{} not on PATH (Debian/Ubuntu: apt-get install --no-install-recommends prometheus)",
            missing.join(" and ")
        );
        if std::env::var("REQUIRE_PROMETHEUS").as_deref() == Ok("1") {
            panic!("REQUIRE_PROMETHEUS=1 but {why}");
        }
        eprintln!("skipping the real-Prometheus test: {why}");
        return;
    }
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let http = client();

    // --- the exporter, on port 8087 of a loopback "pod ip"
    let (mut exporter, exporter_addr) = start_exporter();
    let exporter_base = format!("http://{exporter_addr}");
    wait_ok(
        &http,
        &format!("{exporter_base}/readyz"),
        Duration::from_secs(20),
        &mut exporter,
    )
    .await;
    let metrics_url = format!("{exporter_base}/metrics");

    // --- promtool check metrics on the exporter's exposition
    let (status, body) = get(&http, &metrics_url).await.expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(&format!("{SERIES}{{")),
        "no {SERIES} in /metrics:\n{body}"
    );
    let (st, out, err) = promtool(&["check", "metrics"], body.as_bytes());
    // The cloud families keep the CES metric's name verbatim (PRODUCT.md: the guide's HPA names depend on it),
    // so `mb_l7_qps` trips promlint's abbreviated-unit rule ("mb"). That lint finding, on those families only,
    // is accepted; exit status 3 is promtool's "lint problems", anything else (1: unparsable) is not.
    let accepted = |line: &str| {
        line.split_once(' ').is_some_and(|(name, why)| {
            why == "metric names should not contain abbreviated units"
                && ["huaweicloud_sys_elb_listener_", "huaweicloud_sys_elb_pool_"]
                    .iter()
                    .any(|f| name.strip_prefix(f).is_some_and(|m| m.starts_with("mb_")))
        })
    };
    let lint_ok = st.success() || (st.code() == Some(3) && err.lines().all(accepted));
    assert!(
        lint_ok && out.trim().is_empty() && err.lines().all(accepted),
        "promtool check metrics: {st}\nstdout:\n{out}\nstderr:\n{err}\n--- /metrics ---\n{body}"
    );

    // --- service discovery: what the endpoints role would report for the two Services
    let exporter_svc = yaml_file("service.yaml");
    assert_eq!(exporter_svc["kind"], "Service");
    let nginx_svc = yaml_docs("example-app.yaml")
        .into_iter()
        .find(|d| d["kind"] == "Service" && d["metadata"]["name"] == "nginx")
        .expect("Service nginx in example-app.yaml");
    let SocketAddr::V4(v4) = exporter_addr else {
        panic!("IPv4 expected: {exporter_addr}");
    };
    let pod_ip = *v4.ip();
    // Not 8087: the scrape only reaches the exporter if the guide's rewrite puts 8087 in.
    let discovered_exporter = format!("{pod_ip}:{}", free_port(pod_ip));
    let nginx_ip = Ipv4Addr::from(u32::from(pod_ip) ^ 1);
    let discovered_nginx = format!("{nginx_ip}:80");
    let groups = json!([
        {"targets": [discovered_exporter], "labels": endpoints_meta_labels(&exporter_svc)},
        {"targets": [discovered_nginx], "labels": endpoints_meta_labels(&nginx_svc)},
    ]);
    let sd = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind SD server");
    let sd_url = format!("http://{}/sd", sd.local_addr().expect("SD addr"));
    let app = axum::Router::new().route(
        "/sd",
        axum::routing::get(move || {
            let groups = groups.clone();
            async move { axum::Json(groups) }
        }),
    );
    let sd_task = tokio::spawn(async move { axum::serve(sd, app).await });

    // --- the Prometheus config: the guide's job, 1 s scrapes
    let mut config = Mapping::new();
    config.insert(
        "global".into(),
        serde_yaml::from_str("{scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}")
            .expect("yaml"),
    );
    config.insert(
        "scrape_configs".into(),
        // Two scrape paths at once, as `deploy/` + the guide's job (or CCE's annotation discovery) produce:
        // every series is stored twice, and the adapter rules must still see each value once.
        Yaml::Sequence(vec![guide_job(&sd_url), servicemonitor_job(exporter_addr)]),
    );
    let config_text = serde_yaml::to_string(&config).expect("serialise config");
    let config_path = dir.path().join("prometheus.yml");
    std::fs::write(&config_path, &config_text).expect("write config");
    let config_arg = config_path.to_str().expect("utf-8 path");
    let (st, out, err) = promtool(&["check", "config", config_arg], b"");
    assert!(
        st.success(),
        "promtool check config: {st}\n{out}\n{err}\n--- config ---\n{config_text}"
    );

    // --- Prometheus
    let prom_port = free_port(Ipv4Addr::LOCALHOST);
    let prom_log = dir.path().join("prometheus.log");
    let log = File::create(&prom_log).expect("create prometheus log");
    let mut prom = Proc {
        name: "prometheus",
        child: Command::new("prometheus")
            .arg(format!("--config.file={config_arg}"))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .expect("spawn prometheus"),
        log: prom_log,
    };
    let prom_base = format!("http://127.0.0.1:{prom_port}");
    wait_ok(
        &http,
        &format!("{prom_base}/-/ready"),
        Duration::from_secs(30),
        &mut prom,
    )
    .await;
    let (_, build) = get(&http, &format!("{prom_base}/api/v1/status/buildinfo"))
        .await
        .expect("buildinfo");
    eprintln!("prometheus buildinfo: {build}");

    // --- wait for the scraped series: one copy per scrape path
    let series_query = format!("{SERIES}{{service=\"nginx\"}}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let samples = loop {
        let r = prom_query(&http, &prom_base, &series_query).await;
        if r.len() >= 2 {
            break r;
        }
        if Instant::now() > deadline {
            let targets = get(&http, &format!("{prom_base}/api/v1/targets"))
                .await
                .map(|(_, b)| b)
                .unwrap_or_else(|e| e);
            panic!(
                "not two {series_query} (one per job) in Prometheus within 30 s: {r:?}\ntargets: {targets}\n{}\n{}",
                prom.log_tail(),
                exporter.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let jobs: BTreeSet<&str> = samples.iter().map(|(l, _)| l["job"].as_str()).collect();
    assert_eq!(jobs, BTreeSet::from([JOB, SM_JOB]), "{samples:?}");

    // --- the relabelling: one target, kept by the 8087 rule, scraped at <pod ip>:8087
    let targets = prom_api(&http, &prom_base, "/api/v1/targets", &[]).await;
    let active: Vec<&Json> = targets["activeTargets"]
        .as_array()
        .expect("activeTargets")
        .iter()
        .filter(|t| t["scrapePool"] == JOB)
        .collect();
    assert_eq!(
        active.len(),
        1,
        "exactly the exporter is scraped: {targets}"
    );
    let t = active[0];
    let scrape_addr = format!("{pod_ip}:{GUIDE_PORT}");
    assert_eq!(
        t["scrapeUrl"],
        format!("http://{scrape_addr}/metrics?services=SYS.ELB"),
        "{t}"
    );
    // (Not checked through `discoveredLabels.__address__`: Prometheus 2.42 shows the relabelled address
    // there. The SD server above served `discovered_exporter`, whose port is not 8087.)
    assert_eq!(t["health"], "up", "{t}");
    assert_eq!(t["lastError"], "", "{t}");
    let dropped: Vec<&Json> = targets["droppedTargets"]
        .as_array()
        .expect("droppedTargets")
        .iter()
        .filter(|t| t["discoveredLabels"]["job"] == JOB)
        .collect();
    assert!(
        dropped.len() == 1
            && dropped[0]["discoveredLabels"]["__meta_kubernetes_service_name"] == "nginx",
        "the keep rule drops exactly the nginx Service (no prometheus.io/port: \"8087\"): {targets}"
    );

    // --- the stored series' labels
    assert_eq!(samples.len(), 2, "one nginx series per job: {samples:?}");
    let by_job = |job: &str| {
        &samples
            .iter()
            .find(|(l, _)| l["job"] == job)
            .unwrap_or_else(|| panic!("no {job} sample in {samples:?}"))
            .0
    };
    let labels = by_job(JOB);
    let mut expected: BTreeMap<String, String> = [
        ("__name__", SERIES),
        ("namespace", "default"),
        ("service", "nginx"),
        ("lbaas_instance_id", NGINX_ELB),
        ("lbaas_listener_id", NGINX_LISTENER),
        ("listener_name", "k8s_TCP_80"),
        ("port", "80"),
        ("protocol", "TCP"),
        ("job", JOB),
        ("instance", scrape_addr.as_str()),
        ("kubernetes_namespace", "default"),
        ("kubernetes_service", "elb-exporter"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    // labelmap: the exporter Service's own labels (service.yaml), e.g. app="elb-exporter".
    for (k, v) in exporter_svc["metadata"]["labels"]
        .as_mapping()
        .expect("service.yaml labels")
    {
        let k = sanitize(s(k, "label"));
        assert!(
            !expected.contains_key(&k),
            "service.yaml label {k} clashes with an exported or target label"
        );
        expected.insert(k, s(v, "label").to_owned());
    }
    assert_eq!(labels, &expected, "labels of the stored series (guide job)");
    // The ServiceMonitor job: honor_labels keeps the exported namespace/service (the APPLICATION's Service);
    // the operator's target labels only fill what the series lacks.
    let sm_labels = by_job(SM_JOB);
    for (k, v) in [
        ("namespace", "default"),
        ("service", "nginx"),
        ("lbaas_listener_id", NGINX_LISTENER),
        ("endpoint", "http-metrics"),
        ("instance", scrape_addr.as_str()),
    ] {
        assert_eq!(
            sm_labels.get(k).map(String::as_str),
            Some(v),
            "{k} of {sm_labels:?}"
        );
    }
    assert!(
        !sm_labels.keys().any(|k| k.starts_with("exported_")),
        "honorLabels must keep the exported labels: {sm_labels:?}"
    );
    // The exporter's own series have no namespace/service: there the target's (the exporter's Service) apply.
    let own = prom_query(
        &http,
        &prom_base,
        &format!("elb_exporter_build_info{{job=\"{SM_JOB}\"}}"),
    )
    .await;
    assert!(
        own.len() == 1 && own[0].0["service"] == SM_JOB && own[0].0["namespace"] == "default",
        "{own:?}"
    );

    // --- the adapter rules, as prometheus-adapter runs them for the shipped HPAs
    let hpa_queries = adapter_queries_for_hpas(&http, &prom_base).await;

    // --- values: Prometheus = the exporter's /metrics = the simulator's datapoint; every adapter query gives
    // that value once although Prometheus holds two copies; so does the dashboard's traffic panel.
    // The exporter's value changes once a minute; retry until one round sees a single value everywhere.
    let dashboard = dashboard_queries();
    let traffic_panel = dashboard
        .iter()
        .find(|(title, _)| title.contains("elb01_listener_m7_in_Bps"))
        .map(|(_, q)| substitute(q, "default", "nginx"))
        .expect("a dashboard panel for elb01_listener_m7_in_Bps");
    let mut attempts = Vec::new();
    for _ in 0..10 {
        let t0 = now_ms();
        let body_before = get(&http, &metrics_url).await.expect("/metrics").1;
        let before = exporter_nginx_value(&body_before);
        let scraped = prom_query(&http, &prom_base, &series_query).await;
        // (adapter query result, the exporter's value of that object before the queries)
        let mut adapted = Vec::new();
        for h in &hpa_queries {
            let q = &h.query;
            let r = prom_query(&http, &prom_base, q).await;
            assert_eq!(r.len(), 1, "{q}: exactly one sample: {r:?}");
            let wanted: BTreeMap<String, String> = [(h.label.clone(), h.name.clone())].into();
            assert_eq!(r[0].0, wanted, "{q} groups by {}", h.label);
            let own = h.exporter_value(&body_before).unwrap_or_else(|| {
                panic!(
                    "the exporter has no {} of {}/{}:\n{body_before}",
                    h.series, h.namespace, h.name
                )
            });
            adapted.push((r[0].1, own));
        }
        let panel = prom_query(&http, &prom_base, &traffic_panel).await;
        // What the old plain-sum rule saw: the doubled value (proves the duplicates are really there).
        let naive = prom_query(&http, &prom_base, &format!("sum({series_query})")).await;
        let body_after = get(&http, &metrics_url).await.expect("/metrics").1;
        let after = exporter_nginx_value(&body_after);
        let t1 = now_ms();
        assert_eq!(scraped.len(), 2, "{series_query}: {scraped:?}");
        assert_eq!(panel.len(), 1, "{traffic_panel}: {panel:?}");
        let prom_v: Vec<f64> = scraped.iter().map(|(_, v)| *v).collect();
        if before == after
            && prom_v.iter().all(|v| *v == before)
            && adapted
                .iter()
                .zip(&hpa_queries)
                .all(|((v, own), h)| v == own && h.exporter_value(&body_after) == Some(*own))
            && panel[0].1 == before
            && naive.first().map(|(_, v)| *v) == Some(2.0 * before)
        {
            // The exporter serves the newest minute with data as of its last collection (every 15 s in
            // the demo): floor((t - 60 s) / 60 s) for some t in [t0 - 20 s, t1].
            let newest = |t: i64| (t - MINUTE_MS).div_euclid(MINUTE_MS) * MINUTE_MS;
            let minutes: Vec<i64> = (newest(t0 - 20_000)..=newest(t1))
                .step_by(usize::try_from(MINUTE_MS).expect("usize"))
                .collect();
            let sim: Vec<f64> = minutes
                .iter()
                .map(|m| datapoint_value(NGINX_LISTENER, CES_METRIC, *m))
                .collect();
            assert!(
                sim.contains(&before),
                "Prometheus/exporter value {before} is not the simulator's {CES_METRIC} of {NGINX_LISTENER} at \
                 minutes {minutes:?}: {sim:?}"
            );
            check_dashboard(&http, &prom_base, &dashboard).await;
            let readme = readme_queries();
            check_readme_joins(&http, &prom_base, &metrics_url, &readme, before).await;
            eprintln!(
                "prometheus test: value {before} agrees everywhere (2 scrape paths, {} adapter queries, {} \
                 dashboard queries, {} README queries); took {:.1} s",
                hpa_queries.len(),
                dashboard.len(),
                readme.len(),
                started.elapsed().as_secs_f64()
            );
            sd_task.abort();
            drop(prom);
            drop(exporter);
            return;
        }
        attempts.push(format!(
            "exporter before {before}, Prometheus {prom_v:?}, adapter queries {adapted:?}, traffic panel {}, \
             exporter after {after}",
            panel[0].1
        ));
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    panic!(
        "Prometheus, the adapter queries, the dashboard and the exporter never agreed:\n{}",
        attempts.join("\n")
    );
}

fn s_json(v: &Json) -> String {
    v.as_str()
        .unwrap_or_else(|| panic!("not a string: {v}"))
        .to_owned()
}

// ---------------------------------------------------------------------------------------------------------
// the shipped HPAs through the adapter rules

/// Every Object metric of the HPAs in deploy/ (resource kind, lower case; namespace; name; metric).
fn shipped_hpa_metrics() -> Vec<(String, String, String, String)> {
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(DEPLOY)
        .expect("read deploy/")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for path in files {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("file name");
        for doc in yaml_docs(name) {
            if doc["kind"] != "HorizontalPodAutoscaler" {
                continue;
            }
            let ns = doc["metadata"]["namespace"].as_str().unwrap_or("default");
            for m in doc["spec"]["metrics"].as_sequence().expect("spec.metrics") {
                assert_eq!(
                    m["type"], "Object",
                    "{name}: only Object metrics are emulated"
                );
                let o = &m["object"];
                let d = &o["describedObject"];
                out.push((
                    s(&d["kind"], "describedObject.kind").to_ascii_lowercase(),
                    ns.to_owned(),
                    s(&d["name"], "describedObject.name").to_owned(),
                    s(&o["metric"]["name"], "metric.name").to_owned(),
                ));
            }
        }
    }
    assert!(!out.is_empty(), "no HPA in deploy/");
    out
}

/// One shipped HPA metric as prometheus-adapter serves it.
struct HpaQuery {
    /// The filled metricsQuery.
    query: String,
    /// The exporter's series behind it, and the described object: namespace, resource label, name.
    series: String,
    namespace: String,
    label: String,
    name: String,
}

impl HpaQuery {
    /// What the query must return: the sum of the exporter's own series of the described object (each
    /// listener or pool once), from its /metrics text; `None` when it has none.
    fn exporter_value(&self, metrics: &str) -> Option<f64> {
        let with = [
            ("namespace", self.namespace.as_str()),
            (self.label.as_str(), self.name.as_str()),
        ];
        let values: Vec<f64> = samples_where(metrics, &self.series, &with)
            .into_iter()
            .map(|(_, _, v)| v)
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }
}

/// For each shipped HPA metric: the query prometheus-adapter runs (seriesQuery → series names → name rule →
/// the HPA's metric; metricsQuery filled for the described object). Every rule must serve some HPA metric,
/// and each HPA metric exactly one rule and one series.
async fn adapter_queries_for_hpas(http: &reqwest::Client, base: &str) -> Vec<HpaQuery> {
    let rules = adapter_rules();
    let mut used = vec![false; rules.len()];
    let mut queries = Vec::new();
    for (kind, ns, name, metric) in shipped_hpa_metrics() {
        // Series that appear after the first scrapes (Ingress listeners and pools are resolved after the
        // Services) may take a few scrapes to be stored: ask again for a while before judging.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut serving = Vec::new();
        while serving.is_empty() && Instant::now() < deadline {
            serving = serving_rules(http, base, &rules, &kind, &metric).await;
            if serving.is_empty() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        assert_eq!(
            serving.len(),
            1,
            "exactly one adapter rule must publish {metric} for {kind}: {serving:?}"
        );
        let (i, series) = serving.pop().expect("one");
        let series: Vec<String> = series.into_iter().collect();
        assert_eq!(series.len(), 1, "series behind {metric}: {series:?}");
        used[i] = true;
        let q = rules[i].metrics_query(&series[0], &ns, &kind, &name);
        let label = rules[i].overrides[&kind].clone();
        if metric == "elb01_listener_m7_in_Bps" {
            assert_eq!(
                q,
                format!(
                    "sum by (service) (max by (namespace, service, lbaas_listener_id) \
                     ({SERIES}{{namespace=\"default\",service=\"nginx\"}}))"
                )
            );
        }
        queries.push(HpaQuery {
            query: q,
            series: series[0].clone(),
            namespace: ns,
            label,
            name,
        });
    }
    for (rule, used) in rules.iter().zip(used) {
        assert!(
            used,
            "adapter rule {} serves no shipped HPA: untested",
            rule.series_query
        );
    }
    queries
}

/// The rules that publish `metric` for `kind`, with the series names behind it.
async fn serving_rules(
    http: &reqwest::Client,
    base: &str,
    rules: &[AdapterRule],
    kind: &str,
    metric: &str,
) -> Vec<(usize, BTreeSet<String>)> {
    let mut serving = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        if !rule.overrides.contains_key(kind) {
            continue;
        }
        let found = prom_api(
            http,
            base,
            "/api/v1/series",
            &[("match[]", rule.series_query.as_str())],
        )
        .await;
        let series: BTreeSet<String> = found
            .as_array()
            .expect("series list")
            .iter()
            .map(|l| s_json(&l["__name__"]))
            .filter(|n| rule.metric_name(n).as_deref() == Some(metric))
            .collect();
        if !series.is_empty() {
            serving.push((i, series));
        }
    }
    serving
}

// ---------------------------------------------------------------------------------------------------------
// the Grafana dashboard

/// Panels that may be empty on the healthy demo: they show failures. Everything else must return data.
const MAY_BE_EMPTY: [&str; 2] = [
    "Cloud request failures/s by code",
    "Calls paused after rejected credentials",
];

/// The PromQL examples of README.md (its ```promql blocks).
fn readme_queries() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut out = Vec::new();
    let mut block: Option<String> = None;
    for line in text.lines() {
        match (block.as_mut(), line.trim()) {
            (None, "```promql") => block = Some(String::new()),
            (Some(_), "```") => out.extend(block.take()),
            (Some(b), _) => {
                b.push_str(line);
                b.push('\n');
            }
            (None, _) => {}
        }
    }
    assert!(!out.is_empty(), "README.md has no promql example");
    out
}

/// One label's value in an exposition line.
fn label_value<'a>(line: &'a str, label: &str) -> Option<&'a str> {
    let start = line.find(&format!(",{label}=\""))? + label.len() + 3;
    line[start..].split('"').next()
}

/// Every README query (the join of a traffic series with `elb_exporter_listener_info`) runs on the real
/// Prometheus scraping the exporter twice and gives the nginx listener once, with the uid and ELB name
/// of the exporter's own listener_info line and the traffic series' value.
async fn check_readme_joins(
    http: &reqwest::Client,
    base: &str,
    metrics_url: &str,
    queries: &[String],
    before: f64,
) {
    let body = get(http, metrics_url).await.expect("/metrics").1;
    let info = body
        .lines()
        .find(|l| {
            l.starts_with("elb_exporter_listener_info{")
                && l.contains(&format!("lbaas_listener_id=\"{NGINX_LISTENER}\""))
        })
        .unwrap_or_else(|| panic!("no listener_info for {NGINX_LISTENER}:\n{body}"));
    let want: Vec<&str> = ["uid", "elb_name"]
        .iter()
        .map(|l| label_value(info, l).unwrap_or_else(|| panic!("no {l} in {info}")))
        .collect();
    assert!(want.iter().all(|v| !v.is_empty()), "{info}");
    let now = exporter_nginx_value(&body);
    for q in queries {
        let r = prom_query(http, base, q).await;
        let nginx: Vec<_> = r
            .iter()
            .filter(|(l, _)| l.get("lbaas_listener_id").map(String::as_str) == Some(NGINX_LISTENER))
            .collect();
        assert_eq!(nginx.len(), 1, "{q}: one nginx sample: {r:?}");
        let (labels, v) = nginx[0];
        let got: Vec<&str> = ["uid", "elb_name"]
            .iter()
            .map(|l| labels.get(*l).map_or("", String::as_str))
            .collect();
        assert_eq!(got, want, "{q}: {labels:?}");
        assert!(
            *v == before || *v == now,
            "{q}: {v}, exporter {before} / {now}"
        );
    }
}

fn dashboard_json() -> Json {
    let path = format!("{DEPLOY}/{DASHBOARD}");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// (panel title, PromQL) of every target of every panel, after checking what makes the dashboard importable
/// and honest: a datasource variable used by every panel and target, unique panel ids, no `vector(`
/// padding that would hide a broken query.
fn dashboard_queries() -> Vec<(String, String)> {
    let d = dashboard_json();
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("dashboard variable {name} is missing"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    for v in ["namespace", "service"] {
        assert_eq!(var(v)["type"], "query", "{v}");
    }
    let mut ids = BTreeSet::new();
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        assert!(
            ids.insert(p["id"].as_i64().expect("panel id")),
            "duplicate id {p}"
        );
        if p["type"] == "row" {
            continue;
        }
        let title = s_json(&p["title"]);
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no targets");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
            let expr = s_json(&t["expr"]);
            assert!(!expr.contains("vector("), "{title}: padding in {expr}");
            out.push((title.clone(), expr));
        }
    }
    for t in MAY_BE_EMPTY {
        assert!(out.iter().any(|(title, _)| title == t), "no panel {t}");
    }
    out
}

/// Grafana's variable interpolation for the values `namespace`, `service` (regex matchers: ".*" = All).
fn substitute(q: &str, namespace: &str, service: &str) -> String {
    let q = q
        .replace("$namespace", namespace)
        .replace("$service", service)
        .replace("$__rate_interval", "1m");
    assert!(!q.contains('$'), "uninterpolated variable in {q}");
    q
}

/// Runs every panel query with All and with default/nginx selected, and every variable query.
async fn check_dashboard(http: &reqwest::Client, base: &str, queries: &[(String, String)]) {
    for (ns, svc) in [(".*", ".*"), ("default", "nginx")] {
        for (title, q) in queries {
            let q = substitute(q, ns, svc);
            // Counters need two samples inside the rate window: allow a few scrapes.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let r = prom_query(http, base, &q).await;
                if !r.is_empty() || MAY_BE_EMPTY.contains(&title.as_str()) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "panel {title:?}: no data for {q}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    let d = dashboard_json();
    for (var, want) in [("namespace", "default"), ("service", "nginx")] {
        let v = d["templating"]["list"]
            .as_array()
            .expect("templating.list")
            .iter()
            .find(|v| v["name"] == var)
            .expect("variable");
        let def = s_json(&v["query"]["query"]);
        let inner = def
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{var}: not label_values(selector, label): {def}"));
        let (selector, label) = inner.rsplit_once(',').expect("selector, label");
        assert_eq!(label.trim(), var);
        let selector = substitute(selector.trim(), ".*", ".*");
        let values = prom_api(
            http,
            base,
            &format!("/api/v1/label/{var}/values"),
            &[("match[]", selector.as_str())],
        )
        .await;
        assert!(
            values.as_array().expect("values").iter().any(|x| x == want),
            "variable {var} ({def}) does not offer {want}: {values}"
        );
    }
}
