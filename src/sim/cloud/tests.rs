use super::*;
use super::{
    ces::CES_MAX_BODY,
    data::{MINUTE_MS, datapoint_value},
};
use crate::signer::{Algorithm, SignRequest, sdk_date, sign};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn code(&self) -> String {
        self.json()["error_code"].as_str().unwrap_or("").to_string()
    }
    fn msg(&self) -> String {
        self.json()["error_msg"].as_str().unwrap_or("").to_string()
    }
}

/// A request to sign and send; defaults: signed with the configured credentials, now, X-Project-Id set.
struct Call {
    method: &'static str,
    path: String,
    query: Vec<(String, String)>,
    body: Vec<u8>,
    project: Option<String>,
    sk: Option<String>,
    date: Option<SystemTime>,
    extra: Vec<(String, String)>,
    tamper_query: Option<String>,
    /// The `Host` to sign and send (default: the address).
    host: Option<String>,
}

impl Call {
    fn get(path: impl Into<String>) -> Self {
        Call {
            method: "GET",
            path: path.into(),
            query: Vec::new(),
            body: Vec::new(),
            project: Some(SimConfig::default().project_id),
            sk: None,
            date: None,
            extra: Vec::new(),
            tamper_query: None,
            host: None,
        }
    }
    fn post(path: impl Into<String>, body: Vec<u8>) -> Self {
        Call {
            method: "POST",
            body,
            ..Call::get(path)
        }
    }
    fn q(mut self, k: &str, v: impl ToString) -> Self {
        self.query.push((k.to_string(), v.to_string()));
        self
    }
}

async fn start(cfg: SimConfig) -> (CloudSim, SocketAddr) {
    let sim = CloudSim::new(cfg);
    let addr = sim
        .serve(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("bind");
    (sim, addr)
}

async fn send(sim: &CloudSim, addr: SocketAddr, call: Call) -> Resp {
    let cfg = sim.config();
    let host = call.host.clone().unwrap_or_else(|| addr.to_string());
    let mut headers = vec![
        ("Content-Type".to_string(), "application/json".to_string()),
        (
            "X-Sdk-Date".to_string(),
            sdk_date(call.date.unwrap_or_else(SystemTime::now)),
        ),
    ];
    if let Some(p) = &call.project {
        headers.push(("X-Project-Id".to_string(), p.clone()));
    }
    headers.extend(call.extra.iter().cloned());
    let signed = sign(
        &SignRequest {
            method: call.method,
            host: &host,
            path: &call.path,
            query: &call.query,
            headers: &headers,
            body: &call.body,
        },
        &cfg.ak,
        call.sk.as_deref().unwrap_or(&cfg.sk),
        &Algorithm::SdkHmacSha256,
    );
    let qs = call.tamper_query.unwrap_or(signed.query_string);
    let target = if qs.is_empty() {
        call.path.clone()
    } else {
        format!("{}?{qs}", call.path)
    };
    let mut headers = signed.headers;
    if call.host.is_some() {
        headers.push(("Host".to_string(), host));
    }
    http(addr, call.method, &target, &headers, &call.body).await
}

/// A minimal HTTP/1.1 client: it sends exactly the signed headers and nothing an HTTP library would add.
async fn http(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Resp {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut head = format!("{method} {target} HTTP/1.1\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    s.write_all(head.as_bytes()).await.expect("write head");
    s.write_all(body).await.expect("write body");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header end");
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = buf[split + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(p) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(&String::from_utf8_lossy(&rest[..p]), 16)
                .expect("chunk size");
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[p + 2..p + 2 + size]);
            rest = &rest[p + 2 + size + 2..];
        }
        body = out;
    }
    Resp {
        status,
        headers,
        body,
    }
}

fn pid() -> String {
    SimConfig::default().project_id
}

fn ces_path() -> String {
    format!("/V1.0/{}/batch-query-metric-data", pid())
}

fn metric(lb: &str, listener: &str, name: &str) -> Value {
    json!({"namespace": "SYS.ELB", "metric_name": name,
           "dimensions": [{"name": "lbaas_instance_id", "value": lb},
                          {"name": "lbaas_listener_id", "value": listener}]})
}

fn ces_body(metrics: Vec<Value>, from: i64, to: i64) -> Vec<u8> {
    json!({"metrics": metrics, "from": from, "to": to, "period": "1", "filter": "average"})
        .to_string()
        .into_bytes()
}

fn with_listeners(sim: &CloudSim) {
    sim.add_loadbalancer("lb-shared-a", LbKind::Shared);
    sim.add_loadbalancer("lb-shared-b", LbKind::Shared);
    sim.add_loadbalancer("lb-ded-c", LbKind::Dedicated);
    sim.add_loadbalancer("lb-ded-d", LbKind::Dedicated);
    for i in 0..4 {
        sim.add_listener(
            "lb-shared-a",
            SimListener::new(
                format!("sa-{i}"),
                format!("k8s_TCP_{}", 80 + i),
                "TCP",
                80 + i,
            ),
        );
    }
    for i in 0..3 {
        sim.add_listener(
            "lb-shared-b",
            SimListener::new(format!("sb-{i}"), "web", "HTTP", 8080 + i),
        );
    }
    for i in 0..5 {
        sim.add_listener(
            "lb-ded-c",
            SimListener::new(format!("dc-{i}"), "https", "HTTPS", 443 + i),
        );
    }
    for i in 0..4 {
        sim.add_listener(
            "lb-ded-d",
            SimListener::new(format!("dd-{i}"), "udp", "UDP", 53 + i),
        );
    }
}

/// Pages until a short page; returns every id seen, in order.
async fn walk(
    sim: &CloudSim,
    addr: SocketAddr,
    v3: bool,
    limit: usize,
    lbs: &[&str],
) -> Vec<String> {
    let path = format!("/{}/{}/elb/listeners", if v3 { "v3" } else { "v2" }, pid());
    let mut seen = Vec::new();
    let mut marker: Option<String> = None;
    for _ in 0..50 {
        let mut call = Call::get(path.clone()).q("limit", limit);
        for lb in lbs {
            call = call.q("loadbalancer_id", lb);
        }
        if let Some(m) = &marker {
            call = call.q("marker", m);
        }
        let r = send(sim, addr, call).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let page = r.json()["listeners"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if v3 {
            assert_eq!(r.json()["page_info"]["current_count"], json!(page.len()));
        }
        seen.extend(
            page.iter()
                .filter_map(|l| l["id"].as_str().map(String::from)),
        );
        if page.len() < limit {
            return seen;
        }
        marker = if v3 {
            r.json()["page_info"]["next_marker"]
                .as_str()
                .map(String::from)
        } else {
            seen.last().cloned()
        };
    }
    panic!("paging did not end");
}

#[test]
fn default_config_shapes() {
    let cfg = SimConfig::default();
    assert_eq!(cfg.sk.len(), 40);
    assert_eq!(cfg.project_id.len(), 32);
    assert!(cfg.project_id.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(!format!("{cfg:?}").contains(&cfg.sk));
}

#[tokio::test]
async fn well_signed_request_passes() {
    let (sim, addr) = start(SimConfig::default()).await;
    assert_eq!(sim.url(), Some(format!("http://{addr}")));
    let r = send(&sim, addr, Call::get("/v3/projects").q("name", "cn-east-3")).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("x-request-id").map(str::len), Some(32));
    let projects = r.json()["projects"].as_array().cloned().unwrap_or_default();
    assert_eq!(projects.len(), 1);
    assert_eq!(projects[0]["id"], json!(pid()));
    assert_eq!(projects[0]["enabled"], json!(true));
    assert!(projects[0]["domain_id"].is_string());
    assert!(r.json()["links"]["next"].is_null());
    // The trailing-slash form of the path signs the same and is served the same.
    let r = send(&sim, addr, Call::get("/v3/projects/")).await;
    assert_eq!(r.status, 200);
    let log = sim.requests();
    assert_eq!(log.len(), 2);
    assert_eq!(log[0].api, SimApi::Iam);
    assert_eq!(log[0].query, "name=cn-east-3");
}

#[tokio::test]
async fn authentication_failures_are_401() {
    let (sim, addr) = start(SimConfig::default()).await;
    let mut wrong = Call::get("/v3/projects");
    wrong.sk = Some("x".repeat(40));
    let r = send(&sim, addr, wrong).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.code(), "APIGW.0301");
    assert!(
        r.msg()
            .starts_with("Incorrect IAM authentication information")
    );
    assert_eq!(r.json()["request_id"].as_str(), r.header("x-request-id"));

    let mut skewed = Call::get("/v3/projects");
    skewed.date = Some(SystemTime::now() - Duration::from_secs(16 * 60));
    let r = send(&sim, addr, skewed).await;
    assert_eq!((r.status, r.code().as_str()), (401, "APIGW.0301"));
    let mut fine = Call::get("/v3/projects");
    fine.date = Some(SystemTime::now() - Duration::from_secs(10 * 60));
    assert_eq!(send(&sim, addr, fine).await.status, 200);

    // The query is verified as received: a changed value breaks the signature.
    let mut tampered = Call::get("/v3/projects").q("name", "cn-east-3");
    tampered.tamper_query = Some("name=cn-north-4".to_string());
    assert_eq!(send(&sim, addr, tampered).await.status, 401);

    let r = http(addr, "GET", "/v3/projects", &[], &[]).await;
    assert_eq!((r.status, r.code().as_str()), (401, "APIGW.0301"));

    let r = http(addr, "GET", "/v9/nothing", &[], &[]).await;
    assert_eq!((r.status, r.code().as_str()), (404, "APIGW.0101"));
    assert!(r.header("x-request-id").is_some());
}

#[tokio::test]
async fn ak_locks_after_consecutive_failures() {
    let cfg = SimConfig {
        lock_duration: Duration::from_millis(300),
        ..SimConfig::default()
    };
    let (sim, addr) = start(cfg).await;
    for _ in 0..5 {
        let mut bad = Call::get("/v3/projects");
        bad.sk = Some("y".repeat(40));
        assert_eq!(send(&sim, addr, bad).await.status, 401);
    }
    let r = send(&sim, addr, Call::get("/v3/projects")).await;
    assert_eq!((r.status, r.code().as_str()), (401, "APIGW.0301"));
    assert!(r.msg().contains("locked"), "{}", r.msg());
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(
        send(&sim, addr, Call::get("/v3/projects")).await.status,
        200
    );
}

#[tokio::test]
async fn security_token_must_be_signed_and_equal() {
    let cfg = SimConfig {
        security_token: Some("sts-token-1".to_string()),
        ..SimConfig::default()
    };
    let (sim, addr) = start(cfg).await;
    assert_eq!(
        send(&sim, addr, Call::get("/v3/projects")).await.status,
        401
    );
    let mut wrong = Call::get("/v3/projects");
    wrong.extra = vec![("X-Security-Token".to_string(), "other".to_string())];
    assert_eq!(send(&sim, addr, wrong).await.status, 401);
    let mut good = Call::get("/v3/projects");
    good.extra = vec![("X-Security-Token".to_string(), "sts-token-1".to_string())];
    assert_eq!(send(&sim, addr, good).await.status, 200);
}

#[tokio::test]
async fn project_header_is_checked() {
    let (sim, addr) = start(SimConfig::default()).await;
    with_listeners(&sim);
    let body = ces_body(
        vec![metric("lb-ded-c", "dc-0", "m1_cps")],
        1_705_306_800_000,
        1_705_307_400_000,
    );

    let mut none = Call::post(ces_path(), body.clone());
    none.project = None;
    let r = send(&sim, addr, none).await;
    assert_eq!((r.status, r.code().as_str()), (400, "ces.0003"));

    let mut other = Call::post(ces_path(), body.clone());
    other.project = Some("f".repeat(32));
    let r = send(&sim, addr, other).await;
    assert_eq!((r.status, r.code().as_str()), (400, "ces.0003"));

    let ghost = "a".repeat(32);
    let mut missing = Call::post(format!("/V1.0/{ghost}/batch-query-metric-data"), body);
    missing.project = Some(ghost);
    let r = send(&sim, addr, missing).await;
    assert_eq!((r.status, r.code().as_str()), (404, "ces.0016"));

    let mut none = Call::get(format!("/v3/{}/elb/listeners", pid()));
    none.project = None;
    let r = send(&sim, addr, none).await;
    assert_eq!((r.status, r.code().as_str()), (401, "ELB.1102"));

    let mut other = Call::get(format!("/v2/{}/elb/listeners", pid()));
    other.project = Some("f".repeat(32));
    let r = send(&sim, addr, other).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["message"]["code"], json!("403"));

    // An existing project of the account without load balancers lists nothing.
    let second = "b".repeat(32);
    sim.add_project("cn-south-1", &second);
    let mut call = Call::get(format!("/v3/{second}/elb/listeners"));
    call.project = Some(second);
    let r = send(&sim, addr, call).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["listeners"], json!([]));
}

#[tokio::test]
async fn iam_filters_pages_and_ambiguity() {
    let (sim, addr) = start(SimConfig::default()).await;
    let r = send(&sim, addr, Call::get("/v3/projects")).await;
    let names: Vec<String> = r.json()["projects"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str().map(String::from))
        .collect();
    assert!(names.len() >= 3 && names[0] != "cn-east-3", "{names:?}");

    let r = send(
        &sim,
        addr,
        Call::get("/v3/projects").q("page", 1).q("per_page", 2),
    )
    .await;
    assert_eq!(r.json()["projects"].as_array().map(Vec::len), Some(2));
    assert!(
        r.json()["links"]["next"]
            .as_str()
            .is_some_and(|l| l.ends_with("/v3/projects?page=2&per_page=2"))
    );
    let r = send(
        &sim,
        addr,
        Call::get("/v3/projects").q("per_page", 0).q("page", 1),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], json!(400));

    let r = send(
        &sim,
        addr,
        Call::get("/v3/projects")
            .q("name", "cn-east-3")
            .q("enabled", false),
    )
    .await;
    assert_eq!(r.json()["projects"], json!([]));

    sim.add_project("cn-east-3", &"c".repeat(32));
    let r = send(&sim, addr, Call::get("/v3/projects").q("name", "cn-east-3")).await;
    assert_eq!(r.json()["projects"].as_array().map(Vec::len), Some(2));
}

#[tokio::test]
async fn v2_paging_reaches_every_shared_listener_once() {
    let (sim, addr) = start(SimConfig::default()).await;
    with_listeners(&sim);
    let mut all_shared: Vec<String> = (0..4)
        .map(|i| format!("sa-{i}"))
        .chain((0..3).map(|i| format!("sb-{i}")))
        .collect();
    all_shared.sort();
    for limit in [1, 3, 7] {
        let mut seen = walk(&sim, addr, false, limit, &[]).await;
        seen.sort();
        assert_eq!(seen, all_shared, "limit {limit}");
    }
    // Without limit: everything at once, no dedicated listeners, realistic v2 fields.
    let r = send(
        &sim,
        addr,
        Call::get(format!("/v2/{}/elb/listeners", pid())),
    )
    .await;
    let ls = r.json()["listeners"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(ls.len(), 7);
    assert!(r.json().get("listeners_links").is_none());
    for key in [
        "tenant_id",
        "admin_state_up",
        "connection_limit",
        "default_pool_id",
        "http2_enable",
        "sni_container_refs",
        "tags",
        "created_at",
        "updated_at",
        "insert_headers",
    ] {
        assert!(ls[0].get(key).is_some(), "{key}");
    }
    assert_eq!(ls[0]["loadbalancers"][0]["id"], json!("lb-shared-a"));

    let r = send(
        &sim,
        addr,
        Call::get(format!("/v2/{}/elb/listeners", pid())).q("limit", 2),
    )
    .await;
    assert_eq!(r.json()["listeners_links"][0]["rel"], json!("next"));

    let r = send(
        &sim,
        addr,
        Call::get(format!("/v2/{}/elb/listeners", pid()))
            .q("loadbalancer_id", "lb-shared-b")
            .q("protocol_port", 8081),
    )
    .await;
    assert_eq!(r.json()["listeners"][0]["id"], json!("sb-1"));
    assert_eq!(r.json()["listeners"].as_array().map(Vec::len), Some(1));

    let r = send(
        &sim,
        addr,
        Call::get(format!("/v2/{}/elb/listeners", pid())).q("loadbalancer_id", "no-such-lb"),
    )
    .await;
    assert_eq!((r.status, r.json()["listeners"].clone()), (200, json!([])));

    let r = send(
        &sim,
        addr,
        Call::get(format!("/v2/{}/elb/listeners", pid()))
            .q("limit", 2)
            .q("marker", "no-such-listener"),
    )
    .await;
    assert_eq!((r.status, r.code().as_str()), (400, "ELB.8902"));
    assert!(r.msg().contains("marker"));
}

#[tokio::test]
async fn v3_paging_filters_and_limits() {
    let (sim, addr) = start(SimConfig::default()).await;
    with_listeners(&sim);
    let mut expected: Vec<String> = (0..5)
        .map(|i| format!("dc-{i}"))
        .chain((0..4).map(|i| format!("dd-{i}")))
        .collect();
    expected.sort();
    for limit in [2, 4, 9] {
        let mut seen = walk(
            &sim,
            addr,
            true,
            limit,
            &["lb-ded-c", "lb-ded-d", "lb-shared-a"],
        )
        .await;
        seen.sort();
        assert_eq!(seen, expected, "limit {limit}");
    }
    let mut seen = walk(&sim, addr, true, 2000, &[]).await;
    seen.sort();
    assert_eq!(seen, expected);

    let path = format!("/v3/{}/elb/listeners", pid());
    for bad in ["2001", "-1", "ten"] {
        let r = send(&sim, addr, Call::get(path.clone()).q("limit", bad)).await;
        assert_eq!((r.status, r.code().as_str()), (400, "ELB.8902"), "{bad}");
    }
    let r = send(
        &sim,
        addr,
        Call::get(path.clone()).q("limit", 2).q("marker", "sa-0"),
    )
    .await;
    assert_eq!(r.status, 200, "a marker names any existing listener");
    let r = send(&sim, addr, Call::get(path.clone()).q("marker", "gone")).await;
    assert_eq!(r.status, 400);
    let r = send(
        &sim,
        addr,
        Call::get(path.clone()).q("id", "dc-1").q("id", "dd-2"),
    )
    .await;
    assert_eq!(r.json()["listeners"].as_array().map(Vec::len), Some(2));
    assert!(r.json()["request_id"].is_string());
    let r = send(&sim, addr, Call::get(path.clone()).q("protocol", "UDP")).await;
    assert_eq!(r.json()["page_info"]["current_count"], json!(4));

    let r = send(
        &sim,
        addr,
        Call::get(format!("/v3/{}/elb/loadbalancers", pid())),
    )
    .await;
    let lbs = r.json()["loadbalancers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(lbs.len(), 2);
    assert!(lbs.iter().all(|lb| lb["guaranteed"] == json!(true)));
    assert_eq!(lbs[0]["listeners"].as_array().map(Vec::len), Some(5));

    sim.remove_loadbalancer("lb-ded-d");
    sim.remove_listener("dc-0");
    let seen = walk(&sim, addr, true, 100, &[]).await;
    assert_eq!(seen, ["dc-1", "dc-2", "dc-3", "dc-4"]);
}

#[tokio::test]
async fn v3_can_list_shared_load_balancers() {
    let cfg = SimConfig {
        v3_lists_shared: true,
        ..SimConfig::default()
    };
    let (sim, addr) = start(cfg).await;
    with_listeners(&sim);
    let seen = walk(&sim, addr, true, 5, &["lb-shared-a"]).await;
    assert_eq!(seen.len(), 4);
    let r = send(
        &sim,
        addr,
        Call::get(format!("/v3/{}/elb/loadbalancers", pid())).q("id", "lb-shared-a"),
    )
    .await;
    assert_eq!(r.json()["loadbalancers"][0]["guaranteed"], json!(false));
}

#[tokio::test]
async fn ces_validation_errors_name_their_field() {
    let (sim, addr) = start(SimConfig::default()).await;
    let (from, to) = (1_705_306_800_000_i64, 1_705_307_400_000_i64);
    let one = metric("lb", "l", "m1_cps");
    let five_dims = json!({"namespace": "SYS.ELB", "metric_name": "m1_cps",
        "dimensions": (0..5).map(|i| json!({"name": format!("d{i}"), "value": "v"})).collect::<Vec<_>>()});
    let base = |metrics: Vec<Value>| json!({"metrics": metrics, "from": from, "to": to, "period": "1", "filter": "average"});
    let mut cases: Vec<(Value, &str)> = vec![
        (base(vec![]), "metrics"),
        (base(vec![one.clone(); 501]), "metrics"),
        (base(vec![five_dims]), "metrics[0].dimensions"),
        (
            base(vec![
                json!({"namespace": "SYS", "metric_name": "m1_cps", "dimensions": [{"name": "a", "value": "b"}]}),
            ]),
            "metrics[0].namespace",
        ),
        (
            base(vec![
                json!({"namespace": "SYS.ELB", "metric_name": "1abc", "dimensions": [{"name": "a", "value": "b"}]}),
            ]),
            "metrics[0].metric_name",
        ),
        (
            base(vec![
                json!({"namespace": "SYS.ELB", "metric_name": "m1_cps", "dimensions": [{"name": "x".repeat(33), "value": "b"}]}),
            ]),
            "metrics[0].dimensions[0].name",
        ),
    ];
    let mut bad = base(vec![one.clone()]);
    bad["period"] = json!("60");
    cases.push((bad.clone(), "period"));
    bad["period"] = json!(1);
    cases.push((bad, "period"));
    let mut bad = base(vec![one.clone()]);
    bad["filter"] = json!("avg");
    cases.push((bad, "filter"));
    let mut bad = base(vec![one.clone()]);
    bad["from"] = json!(to);
    cases.push((bad, "from"));
    let mut bad = base(vec![one.clone()]);
    bad["to"] = json!(1_705_307_400);
    cases.push((bad, "to"));
    for (body, field) in cases {
        let r = send(
            &sim,
            addr,
            Call::post(ces_path(), body.to_string().into_bytes()),
        )
        .await;
        assert_eq!((r.status, r.code().as_str()), (400, "ces.0014"), "{field}");
        assert!(
            r.msg().contains(&format!(": {field}:")),
            "{field}: {}",
            r.msg()
        );
    }
    // Over 512 KB, even when otherwise valid.
    let mut big = base(vec![one]);
    big["padding"] = json!("p".repeat(CES_MAX_BODY));
    let r = send(
        &sim,
        addr,
        Call::post(ces_path(), big.to_string().into_bytes()),
    )
    .await;
    assert_eq!((r.status, r.code().as_str()), (400, "ces.0014"));
    assert!(r.msg().contains("body"), "{}", r.msg());
    let r = send(
        &sim,
        addr,
        Call::post(ces_path(), b"{\"metrics\": [".to_vec()),
    )
    .await;
    assert_eq!((r.status, r.code().as_str()), (400, "ces.0014"));
    let log = sim.requests();
    assert_eq!(log[1].ces_metrics, 501);
    assert_eq!((log[1].from, log[1].to), (Some(from), Some(to)));
    assert!(
        log.iter()
            .all(|r| r.error_code.as_deref() == Some("ces.0014"))
    );
}

#[tokio::test]
async fn ces_serves_the_value_function_out_of_order() {
    let (sim, addr) = start(SimConfig::default()).await;
    with_listeners(&sim);
    let newest = sim.newest_minute(now_ms());
    let to = newest - 10 * MINUTE_MS + 30_000;
    let from = to - 5 * MINUTE_MS;
    let metrics = vec![
        metric("lb-shared-a", "sa-0", "m1_cps"),
        metric("lb-shared-a", "sa-0", "m7_in_Bps"),
        metric("lb-shared-a", "sa-0", "mb_l7_qps"),
        metric("lb-shared-b", "sb-0", "mb_l7_qps"),
        metric("lb-shared-b", "sa-0", "m1_cps"),
        metric("lb-shared-a", "nope", "m1_cps"),
        metric("lb-shared-a", "sa-0", "m99_unknown"),
        json!({"namespace": "SYS.ELB", "metric_name": "m1_cps",
               "dimensions": [{"name": "lbaas_instance_id", "value": "lb-shared-a"}]}),
    ];
    let r = send(
        &sim,
        addr,
        Call::post(ces_path(), ces_body(metrics.clone(), from, to)),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let got = r.json()["metrics"].as_array().cloned().unwrap_or_default();
    assert_eq!(got.len(), metrics.len());
    let key = |v: &Value| (v["metric_name"].clone(), v["dimensions"].clone());
    let requested: Vec<_> = metrics.iter().map(key).collect();
    let returned: Vec<_> = got.iter().map(key).collect();
    assert_ne!(
        requested, returned,
        "results must not come back in request order"
    );
    let find = |lb: &str, l: &str, m: &str| {
        got.iter()
            .find(|e| key(e) == key(&metric(lb, l, m)))
            .cloned()
            .unwrap_or(Value::Null)
    };
    let cps = find("lb-shared-a", "sa-0", "m1_cps");
    assert_eq!(cps["unit"], json!("Count"));
    let dps = cps["datapoints"].as_array().cloned().unwrap_or_default();
    let first = from.div_euclid(MINUTE_MS) * MINUTE_MS;
    let stamps: Vec<i64> = dps.iter().filter_map(|d| d["timestamp"].as_i64()).collect();
    let want: Vec<i64> = (0..6).map(|k| first + k * MINUTE_MS).collect();
    assert_eq!(stamps, want);
    for d in &dps {
        let t = d["timestamp"].as_i64().unwrap_or_default();
        assert_eq!(
            d["average"].as_f64(),
            Some(datapoint_value("sa-0", "m1_cps", t))
        );
    }
    assert_eq!(
        find("lb-shared-a", "sa-0", "m7_in_Bps")["unit"],
        json!("Byte/s")
    );
    assert_eq!(
        find("lb-shared-a", "sa-0", "mb_l7_qps")["datapoints"],
        json!([]),
        "no L7 data on TCP"
    );
    assert_eq!(
        find("lb-shared-b", "sb-0", "mb_l7_qps")["datapoints"]
            .as_array()
            .map(Vec::len),
        Some(6)
    );
    assert_eq!(
        find("lb-shared-b", "sa-0", "m1_cps")["datapoints"],
        json!([]),
        "listener on another LB"
    );
    assert_eq!(
        find("lb-shared-a", "nope", "m1_cps")["datapoints"],
        json!([])
    );
    let unknown = find("lb-shared-a", "sa-0", "m99_unknown");
    assert_eq!(unknown["datapoints"], json!([]));
    assert!(unknown.get("unit").is_none());

    // Data stops at the newest minute; other statistics and periods aggregate minute values.
    let body = json!({"metrics": [metric("lb-shared-a", "sa-1", "m4_ncps")],
                      "from": newest - 3 * MINUTE_MS, "to": newest + 5 * MINUTE_MS,
                      "period": "1", "filter": "max"})
    .to_string()
    .into_bytes();
    let r = send(&sim, addr, Call::post(ces_path(), body)).await;
    let dps = r.json()["metrics"][0]["datapoints"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(dps.len() == 4 || dps.len() == 5, "{}", dps.len());
    assert!(dps[0]["max"].is_number() && dps[0].get("average").is_none());
    let bucket = (newest - 60 * MINUTE_MS).div_euclid(300_000) * 300_000;
    let body = json!({"metrics": [metric("lb-shared-a", "sa-1", "m4_ncps")],
                      "from": bucket + 1, "to": bucket + 1000,
                      "period": "300", "filter": "sum"})
    .to_string()
    .into_bytes();
    let r = send(&sim, addr, Call::post(ces_path(), body)).await;
    let dp = r.json()["metrics"][0]["datapoints"][0].clone();
    let sum: f64 = (0..5)
        .map(|k| datapoint_value("sa-1", "m4_ncps", bucket + k * MINUTE_MS))
        .sum();
    assert_eq!(dp["timestamp"], json!(bucket));
    assert!((dp["sum"].as_f64().unwrap_or_default() - sum).abs() < 0.011);
}

#[tokio::test]
async fn ces_budget_moves_from_silently() {
    let (sim, addr) = start(SimConfig::default()).await;
    with_listeners(&sim);
    let newest = sim.newest_minute(now_ms());
    let to = newest - 60 * MINUTE_MS;

    // 7 metrics × 600 minutes exceeds 3000: from moves to to − floor(3000/7) minutes.
    let metrics: Vec<Value> = [
        "m1_cps",
        "m2_act_conn",
        "m3_inact_conn",
        "m4_ncps",
        "m5_in_pps",
        "m6_out_pps",
        "m7_in_Bps",
    ]
    .iter()
    .map(|m| metric("lb-ded-c", "dc-0", m))
    .collect();
    let r = send(
        &sim,
        addr,
        Call::post(ces_path(), ces_body(metrics, to - 600 * MINUTE_MS, to)),
    )
    .await;
    assert_eq!(r.status, 200);
    let entries = r.json()["metrics"].as_array().cloned().unwrap_or_default();
    for e in &entries {
        let dps = e["datapoints"].as_array().cloned().unwrap_or_default();
        assert_eq!(dps.len(), 428);
        assert_eq!(dps.last().map(|d| d["timestamp"].clone()), Some(json!(to)));
    }
    let log = sim.requests();
    assert_eq!(log[0].from, Some(to - 600 * MINUTE_MS));
    assert_eq!(log[0].budget_from, Some(to - 428 * MINUTE_MS));

    // 500 metrics × 10 minutes → to − 6 minutes, and never more than 3000 points.
    let names = [
        "m1_cps",
        "m2_act_conn",
        "m3_inact_conn",
        "m4_ncps",
        "m5_in_pps",
    ];
    let metrics: Vec<Value> = (0..500)
        .map(|i| metric("lb-ded-c", &format!("dc-{}", i % 5), names[i / 5 % 5]))
        .collect();
    let r = send(
        &sim,
        addr,
        Call::post(ces_path(), ces_body(metrics, to - 10 * MINUTE_MS, to)),
    )
    .await;
    assert_eq!(r.status, 200);
    let entries = r.json()["metrics"].as_array().cloned().unwrap_or_default();
    let counts: Vec<usize> = entries
        .iter()
        .map(|e| e["datapoints"].as_array().map_or(0, Vec::len))
        .collect();
    assert_eq!(counts.len(), 500);
    assert!(counts.iter().all(|&c| c == 6), "{counts:?}");
    assert_eq!(sim.requests()[1].budget_from, Some(to - 6 * MINUTE_MS));
    assert_eq!(sim.requests()[1].ces_metrics, 500);

    // Within budget: untouched.
    let r = send(
        &sim,
        addr,
        Call::post(
            ces_path(),
            ces_body(
                vec![metric("lb-ded-c", "dc-0", "m1_cps")],
                to - 10 * MINUTE_MS,
                to,
            ),
        ),
    )
    .await;
    assert_eq!(
        r.json()["metrics"][0]["datapoints"]
            .as_array()
            .map(Vec::len),
        Some(11)
    );
    assert_eq!(sim.requests()[2].budget_from, None);
}

#[tokio::test]
async fn ces_throttles_per_minute() {
    let cfg = SimConfig {
        ces_calls_per_minute: 3,
        ..SimConfig::default()
    };
    let (sim, addr) = start(cfg).await;
    let body = ces_body(
        vec![metric("lb", "l", "m1_cps")],
        1_705_306_800_000,
        1_705_307_400_000,
    );
    for _ in 0..3 {
        assert_eq!(
            send(&sim, addr, Call::post(ces_path(), body.clone()))
                .await
                .status,
            200
        );
    }
    let r = send(&sim, addr, Call::post(ces_path(), body)).await;
    assert_eq!((r.status, r.code().as_str()), (429, "ces.0429"));
    // Other APIs are not throttled by the CES limit.
    assert_eq!(
        send(&sim, addr, Call::get("/v3/projects")).await.status,
        200
    );
}

#[tokio::test]
async fn faults_apply_to_well_signed_calls_in_order() {
    let cfg = SimConfig {
        ces_latency: Duration::from_millis(20),
        ..SimConfig::default()
    };
    let (sim, addr) = start(cfg).await;
    with_listeners(&sim);
    let v2 = || Call::get(format!("/v2/{}/elb/listeners", pid()));
    sim.inject(
        SimApi::ElbV2,
        Fault::Status {
            status: 503,
            body: r#"{"error_code":"ELB.9999","error_msg":"busy"}"#.to_string(),
            count: 2,
        },
    );
    sim.inject(SimApi::ElbV2, Fault::Malformed { count: 1 });
    sim.inject(
        SimApi::ElbV2,
        Fault::Throttle {
            retry_after_secs: Some(7),
            count: 1,
        },
    );
    sim.inject(
        SimApi::ElbV2,
        Fault::Delay {
            delay: Duration::from_millis(120),
            count: 1,
        },
    );
    // A badly signed call is rejected before faults and does not consume one.
    let mut bad = v2();
    bad.sk = Some("z".repeat(40));
    assert_eq!(send(&sim, addr, bad).await.status, 401);
    for _ in 0..2 {
        let r = send(&sim, addr, v2()).await;
        assert_eq!((r.status, r.code().as_str()), (503, "ELB.9999"));
        assert_eq!(r.body, br#"{"error_code":"ELB.9999","error_msg":"busy"}"#);
    }
    let r = send(&sim, addr, v2()).await;
    assert_eq!(r.status, 200);
    assert!(serde_json::from_slice::<Value>(&r.body).is_err());
    let r = send(&sim, addr, v2()).await;
    assert_eq!((r.status, r.code().as_str()), (429, "APIGW.0308"));
    assert_eq!(r.header("retry-after"), Some("7"));
    let t = Instant::now();
    let r = send(&sim, addr, v2()).await;
    assert!(t.elapsed() >= Duration::from_millis(120));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["listeners"].as_array().map(Vec::len), Some(7));
    assert_eq!(send(&sim, addr, v2()).await.status, 200);

    // CES throttle faults carry the CES code; latency applies to every CES answer.
    sim.inject(
        SimApi::Ces,
        Fault::Throttle {
            retry_after_secs: None,
            count: 1,
        },
    );
    let body = ces_body(
        vec![metric("lb", "l", "m1_cps")],
        1_705_306_800_000,
        1_705_307_400_000,
    );
    let t = Instant::now();
    let r = send(&sim, addr, Call::post(ces_path(), body)).await;
    assert!(t.elapsed() >= Duration::from_millis(20));
    assert_eq!((r.status, r.code().as_str()), (429, "ces.0429"));
    assert!(r.header("retry-after").is_none());
    let statuses: Vec<u16> = sim.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [401, 503, 503, 200, 429, 200, 200, 429]);
    sim.clear_requests();
    assert!(sim.requests().is_empty());
}

#[tokio::test]
async fn cleared_faults_end_an_outage_of_one_api_only() {
    let (sim, addr) = start(SimConfig::default()).await;
    with_listeners(&sim);
    let outage = || Fault::Throttle {
        retry_after_secs: None,
        count: u32::MAX,
    };
    sim.inject(SimApi::Ces, outage());
    sim.inject(SimApi::ElbV2, outage());
    let ces = || {
        let body = ces_body(
            vec![metric("lb", "l", "m1_cps")],
            1_705_306_800_000,
            1_705_307_400_000,
        );
        Call::post(ces_path(), body)
    };
    let v2 = || Call::get(format!("/v2/{}/elb/listeners", pid()));
    for _ in 0..3 {
        assert_eq!(send(&sim, addr, ces()).await.status, 429);
    }
    sim.clear_faults(SimApi::Ces);
    assert_eq!(send(&sim, addr, ces()).await.status, 200);
    assert_eq!(
        send(&sim, addr, v2()).await.status,
        429,
        "ELB's outage goes on"
    );
}

#[test]
fn values_are_deterministic_and_realistic() {
    let day = 1_705_276_800_000_i64;
    for l in ["l-1", "l-2", "9b1e4a5b"] {
        for k in (0..1440).step_by(7) {
            let t = day + k * MINUTE_MS;
            let v = |m| datapoint_value(l, m, t);
            assert_eq!(v("m1_cps"), datapoint_value(l, "m1_cps", t + 59_999));
            assert!((10.0..=5_000.0).contains(&v("m1_cps")) && v("m1_cps").fract() == 0.0);
            assert!((100.0..=200_000.0).contains(&v("m5_in_pps")));
            assert!((1e3..=1.2e7).contains(&v("m7_in_Bps")));
            let ratio = v("m22_in_bandwidth") / v("m7_in_Bps");
            assert!((7.5..=8.5).contains(&ratio), "{ratio}");
            assert!(
                (0.0..=50.0).contains(&v("m21_client_rps")) && v("m21_client_rps").fract() == 0.0
            );
            assert!(v("m1c_l7_rt_max") > v("m14_l7_rt") && v("m14_l7_rt") > v("m1d_l7_rt_min"));
            let x = v("m4_ncps");
            assert_eq!(x, (x * 100.0).round() / 100.0);
        }
    }
    assert_eq!(datapoint_value("l-1", "nope", day), 0.0);
    assert_ne!(
        datapoint_value("l-1", "m1_cps", day),
        datapoint_value("l-2", "m1_cps", day)
    );
}

#[tokio::test]
async fn a_profile_answers_on_its_own_hosts_with_its_limits_and_policies() {
    let (sim, addr) = start(SimProfile::Otc.least_privilege()).await;
    let on = |host: &str, c: Call| Call {
        host: Some(host.to_string()),
        ..c
    };
    // The service's own host; a wrong service, a global IAM host (none on OTC), another cloud.
    let r = send(
        &sim,
        addr,
        on(
            "iam.eu-de.otc.t-systems.com",
            Call::get("/v3/auth/projects"),
        ),
    )
    .await;
    assert_eq!(r.status, 200);
    for host in [
        "elb.eu-de.otc.t-systems.com",
        "iam.otc.t-systems.com",
        "iam.eu-de.myhuaweicloud.com",
    ] {
        let r = send(&sim, addr, on(host, Call::get("/v3/auth/projects"))).await;
        assert_eq!((r.status, r.code().as_str()), (404, "APIGW.0101"), "{host}");
    }
    // The least-privilege user may not list projects by name, until granted.
    let r = send(&sim, addr, Call::get("/v3/projects").q("name", "eu-de")).await;
    assert_eq!((r.status, r.code().as_str()), (403, "IAM.0002"));
    sim.grant("iam:projects:list");
    let r = send(&sim, addr, Call::get("/v3/projects").q("name", "eu-de")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["projects"][0]["id"].as_str(), Some(pid().as_str()));
    // 10 metrics per CES call; 11 is a 400 with the body-error shape.
    with_listeners(&sim);
    let to = now_ms();
    let metrics = |n: usize| {
        (0..n)
            .map(|_| metric("lb-ded-c", "dc-0", "m1_cps"))
            .collect()
    };
    let r = send(
        &sim,
        addr,
        Call::post(ces_path(), ces_body(metrics(11), to - 300_000, to)),
    )
    .await;
    assert_eq!((r.status, r.code().as_str()), (400, "ces.0014"));
    assert!(r.msg().contains("1 to 10 items, got 11"), "{}", r.msg());
    let r = send(
        &sim,
        addr,
        Call::post(ces_path(), ces_body(metrics(10), to - 300_000, to)),
    )
    .await;
    assert_eq!(r.status, 200);
}
