//! The fake apiserver against the real kube client and `kube::runtime::watcher`.

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::Request;
use elb_exporter::sim::kube::FakeApiServer;
use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::Event;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Config};
use serde_json::Value;
use tokio::time::timeout;

const STEP: Duration = Duration::from_secs(10);

type Watch = BoxStream<'static, watcher::Result<Event<Service>>>;

use elb_exporter::sim::fixtures::labelled_service as svc;

fn name(s: &Service) -> String {
    format!(
        "{}/{}",
        s.metadata.namespace.as_deref().unwrap_or_default(),
        s.metadata.name.as_deref().unwrap_or_default()
    )
}

async fn start() -> (FakeApiServer, Client) {
    let server = FakeApiServer::new().with_bookmark_interval(Duration::from_millis(200));
    server
        .serve(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("bind loopback");
    let client = Client::try_from(server.client_config()).expect("client");
    (server, client)
}

async fn next(w: &mut Watch) -> watcher::Result<Event<Service>> {
    timeout(STEP, w.next())
        .await
        .expect("watcher stalled")
        .expect("watcher stream ended")
}

fn status_code(e: &watcher::Error) -> Option<u16> {
    match e {
        watcher::Error::WatchError(s) => Some(s.code),
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.code),
        _ => None,
    }
}

/// Skips errors up to `Init`, then collects the `InitApply` names until `InitDone`.
/// Returns the status codes of the skipped errors and the initial set.
async fn init(w: &mut Watch) -> (Vec<Option<u16>>, Vec<String>) {
    let mut errors = Vec::new();
    loop {
        match next(w).await {
            Ok(Event::Init) => break,
            Err(e) => errors.push(status_code(&e)),
            Ok(other) => panic!("expected Init, got {other:?}"),
        }
    }
    let mut names = Vec::new();
    loop {
        match next(w).await.expect("error during initial list") {
            Event::InitApply(s) => names.push(name(&s)),
            Event::InitDone => return (errors, names),
            other => panic!("expected InitApply/InitDone, got {other:?}"),
        }
    }
}

async fn expect_apply(w: &mut Watch) -> Service {
    match next(w).await {
        Ok(Event::Apply(s)) => s,
        other => panic!("expected Apply, got {other:?}"),
    }
}

fn lists(server: &FakeApiServer) -> usize {
    server
        .requests()
        .iter()
        .filter(|r| !r.watch && r.path == "/api/v1/services")
        .count()
}

#[tokio::test]
async fn list_pages_are_a_consistent_snapshot() {
    let (server, client) = start().await;
    for i in 0..7 {
        let ns = if i % 2 == 0 { "ns-a" } else { "ns-b" };
        server.apply(svc(ns, &format!("svc-{i}"), &[]));
    }
    let mut expected: Vec<String> = server.services().iter().map(name).collect();
    expected.sort();
    let list_rv = server.resource_version().to_string();

    let get = |uri: String| {
        let client = client.clone();
        async move {
            client
                .request::<Value>(Request::get(uri).body(vec![]).expect("request"))
                .await
        }
    };
    let (mut names, mut token, mut pages) = (Vec::new(), None::<String>, 0);
    loop {
        let uri = match &token {
            Some(t) => format!("/api/v1/services?limit=3&continue={t}"),
            None => "/api/v1/services?limit=3".to_owned(),
        };
        let page = get(uri).await.expect("list page");
        pages += 1;
        assert_eq!(page["kind"], "ServiceList");
        assert_eq!(page["metadata"]["resourceVersion"], list_rv.as_str());
        for item in page["items"].as_array().expect("items") {
            assert!(item.get("kind").is_none() && item.get("apiVersion").is_none());
            let meta = &item["metadata"];
            names.push(format!(
                "{}/{}",
                meta["namespace"].as_str().unwrap_or(""),
                meta["name"].as_str().unwrap_or("")
            ));
        }
        if pages == 1 {
            // Later pages still come from the first page's snapshot.
            server.apply(svc("ns-a", "svc-late", &[]));
            server.delete("ns-b", "svc-5");
        }
        match page["metadata"]["continue"].as_str() {
            Some(t) => token = Some(t.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(names, expected);

    let first = get("/api/v1/services?limit=3".to_owned())
        .await
        .expect("page");
    let stale = first["metadata"]["continue"]
        .as_str()
        .expect("continue")
        .to_owned();
    let old_rv = first["metadata"]["resourceVersion"]
        .as_str()
        .expect("rv")
        .to_owned();
    server.compact();
    let code = |r: kube::Result<Value>| match r {
        Err(kube::Error::Api(s)) => (s.code, s.reason),
        other => panic!("expected an API error, got {other:?}"),
    };
    assert_eq!(
        code(get(format!("/api/v1/services?limit=3&continue={stale}")).await),
        (410, "Expired".to_owned())
    );
    assert_eq!(
        code(get("/api/v1/services?limit=abc".to_owned()).await).0,
        400
    );
    assert_eq!(
        code(get("/api/v1/pods".to_owned()).await),
        (404, "NotFound".to_owned())
    );

    // A watch from a compacted RV is a 200 carrying one ERROR event, then the stream ends.
    let body = timeout(
        STEP,
        client.request_text(
            Request::get(format!(
                "/api/v1/services?watch=true&resourceVersion={old_rv}&timeoutSeconds=5"
            ))
            .body(vec![])
            .expect("request"),
        ),
    )
    .await
    .expect("watch did not end")
    .expect("watch response");
    let lines: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 1, "{body}");
    assert_eq!(lines[0]["type"], "ERROR");
    assert_eq!(lines[0]["object"]["code"], 410);
    assert_eq!(lines[0]["object"]["reason"], "Expired");

    // An absurd timeout is accepted (no deadline) rather than taking the handler down.
    let uri = format!("/api/v1/services?watch=1&timeoutSeconds={}", i64::MAX);
    let c = client.clone();
    let open = tokio::spawn(async move {
        c.request_text(Request::get(uri).body(vec![]).expect("request"))
            .await
    });
    timeout(STEP, async {
        while server.open_watches() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("watch never opened");
    server.drop_watches();
    let _ = timeout(STEP, open)
        .await
        .expect("dropped watch did not end");
    let last = server.requests().pop().expect("logged");
    assert!(last.watch && last.status == 200, "{last:?}");
}

#[tokio::test]
async fn watcher_sees_initial_list_then_changes() {
    let (server, client) = start().await;
    server.apply(svc("default", "a", &[]));
    server.apply(svc("other", "b", &[]));

    let mut w: Watch = watcher(Api::all(client.clone()), watcher::Config::default()).boxed();
    assert_eq!(
        init(&mut w).await,
        (vec![], vec!["default/a".to_owned(), "other/b".to_owned()])
    );
    server.apply(svc("default", "c", &[]));
    assert_eq!(name(&expect_apply(&mut w).await), "default/c");
    server.apply(svc("default", "a", &[("v", "2")]));
    let a = expect_apply(&mut w).await;
    assert_eq!(
        a.metadata
            .labels
            .and_then(|l| l.get("v").cloned())
            .as_deref(),
        Some("2")
    );
    server.delete("other", "b");
    match next(&mut w).await {
        Ok(Event::Delete(s)) => assert_eq!(name(&s), "other/b"),
        other => panic!("expected Delete, got {other:?}"),
    }

    // Streaming lists: the initial set arrives on the watch itself, no list request at all.
    server.clear_requests();
    let cfg = watcher::Config::default().streaming_lists();
    let mut s: Watch = watcher(Api::all(client), cfg).boxed();
    assert_eq!(
        init(&mut s).await.1,
        vec!["default/a".to_owned(), "default/c".to_owned()]
    );
    server.apply(svc("default", "d", &[]));
    assert_eq!(name(&expect_apply(&mut s).await), "default/d");
    assert!(
        server.requests().iter().all(|r| r.watch),
        "{:?}",
        server.requests()
    );
}

#[tokio::test]
async fn watcher_relists_after_compaction() {
    let (server, client) = start().await;
    for n in ["a", "b", "c"] {
        server.apply(svc("default", n, &[]));
    }
    let mut w: Watch = watcher(Api::all(client), watcher::Config::default())
        .default_backoff()
        .boxed();
    assert_eq!(init(&mut w).await.1.len(), 3);
    server.apply(svc("default", "d", &[]));
    expect_apply(&mut w).await;
    assert_eq!(lists(&server), 1);

    // The watcher is not polled here, so "b" goes while it is disconnected and it resumes from an
    // RV that no longer exists.
    server.drop_watches();
    server.delete("default", "b");
    server.compact();
    let (errors, names) = init(&mut w).await;
    assert!(errors.contains(&Some(410)), "{errors:?}");
    assert_eq!(names, ["default/a", "default/c", "default/d"]);
    assert_eq!(lists(&server), 2);

    // Compaction overtaking an open watch.
    server.apply(svc("default", "e", &[]));
    expect_apply(&mut w).await;
    assert_eq!(server.open_watches(), 1);
    server.expire_watches();
    server.delete("default", "a");
    let (errors, names) = init(&mut w).await;
    assert_eq!(errors, [Some(410)]);
    assert_eq!(names, ["default/c", "default/d", "default/e"]);
    assert_eq!(lists(&server), 3);
}

#[tokio::test]
async fn watcher_recovers_from_unavailability() {
    let (server, _) = start().await;
    let mut cfg = server.client_config();
    // kube retries 503 itself by default (up to 15 times), which would hide the outage.
    cfg.default_retry = false;
    let client = Client::try_from(cfg).expect("client");
    server.apply(svc("default", "a", &[]));
    let mut w: Watch = watcher(Api::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .boxed();
    init(&mut w).await;
    server.apply(svc("default", "b", &[]));
    expect_apply(&mut w).await;

    server.set_available(false);
    match client
        .request_text(
            Request::get("/api/v1/services")
                .body(vec![])
                .expect("request"),
        )
        .await
    {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (503, "ServiceUnavailable"))
        }
        other => panic!("expected 503, got {other:?}"),
    }
    let err = next(&mut w)
        .await
        .expect_err("watcher should report the outage");
    assert_eq!(status_code(&err), Some(503), "{err:?}");
    assert!(server.requests().iter().any(|r| r.watch && r.status == 503));

    server.set_available(true);
    server.apply(svc("default", "c", &[]));
    let seen = timeout(Duration::from_secs(20), async {
        loop {
            if let Ok(Event::Apply(s)) = next(&mut w).await {
                return name(&s);
            }
        }
    })
    .await
    .expect("watcher did not recover");
    assert_eq!(seen, "default/c");

    // With kube's default retry a short outage is invisible to the caller.
    let retrying = Client::try_from(server.client_config()).expect("client");
    server.set_available(false);
    let pending = tokio::spawn(async move {
        Api::<Service>::all(retrying)
            .list(&ListParams::default())
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.set_available(true);
    let list = timeout(STEP, pending)
        .await
        .expect("retry stalled")
        .expect("join")
        .expect("list");
    assert_eq!(list.items.len(), 3);
}

#[tokio::test]
async fn kubeconfig_loads_and_lists() {
    let (server, _) = start().await;
    server.apply(svc("default", "web", &[("app", "web")]));
    server.apply(svc("default", "db", &[("app", "db")]));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kubeconfig");
    server.write_kubeconfig(&path).expect("write kubeconfig");

    let kubeconfig = Kubeconfig::read_from(&path).expect("read kubeconfig");
    let cfg = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("load kubeconfig");
    assert_eq!(
        Some(cfg.cluster_url.to_string().trim_end_matches('/').to_owned()),
        server.url()
    );
    let api: Api<Service> = Api::default_namespaced(Client::try_from(cfg).expect("client"));
    let all = api.list(&ListParams::default()).await.expect("list");
    assert_eq!(all.items.len(), 2);
    let web = api
        .list(&ListParams::default().labels("app=web"))
        .await
        .expect("list");
    assert_eq!(
        web.items.iter().map(name).collect::<Vec<_>>(),
        ["default/web"]
    );
    let names: Vec<String> = api
        .list(&ListParams::default().fields("metadata.name!=web"))
        .await
        .expect("list")
        .items
        .iter()
        .map(name)
        .collect();
    assert_eq!(names, ["default/db"]);
    assert_eq!(
        api.get("web").await.expect("get").metadata.name.as_deref(),
        Some("web")
    );
}

/// kube's own `Api<Lease>` against the fake: create, get, replace under resourceVersion, upstream's 409s
/// and 404 Status shapes, and refusing one client (by its kubeconfig token) while another is served.
#[tokio::test]
async fn leases_follow_the_apiserver_with_optimistic_concurrency() {
    use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
    use kube::api::PostParams;
    let (server, client) = start().await;
    let api: Api<Lease> = Api::namespaced(client.clone(), "monitoring");
    let pp = PostParams::default();
    assert!(api.get_opt("elb-exporter").await.expect("get").is_none());
    let mut lease = Lease::default();
    lease.metadata.name = Some("elb-exporter".into());
    lease.spec = Some(LeaseSpec {
        holder_identity: Some("a".into()),
        lease_duration_seconds: Some(15),
        ..LeaseSpec::default()
    });
    let created = api.create(&pp, &lease).await.expect("create");
    let rv1 = created.metadata.resource_version.clone().expect("rv");
    assert!(created.metadata.uid.is_some());
    let status = |e: kube::Error| match e {
        kube::Error::Api(s) => (s.code, s.reason, s.message),
        other => panic!("not a Status: {other}"),
    };
    let (code, reason, _) = status(api.create(&pp, &lease).await.expect_err("exists"));
    assert_eq!((code, reason.as_str()), (409, "AlreadyExists"));

    // b replaces under the version it read; a's write under the same version then conflicts.
    let mut b = created.clone();
    b.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let replaced = api.replace("elb-exporter", &pp, &b).await.expect("replace");
    assert_ne!(
        replaced.metadata.resource_version.as_deref(),
        Some(rv1.as_str())
    );
    let mut a = created.clone();
    a.spec.as_mut().unwrap().renew_time = None;
    a.spec.as_mut().unwrap().lease_transitions = Some(9);
    let (code, reason, message) = status(
        api.replace("elb-exporter", &pp, &a)
            .await
            .expect_err("stale"),
    );
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    assert!(
        message.contains("the object has been modified"),
        "{message}"
    );
    let got = api.get("elb-exporter").await.expect("get");
    assert_eq!(got.spec.unwrap().holder_identity.as_deref(), Some("b"));
    let (code, reason, _) = status(api.get("other").await.expect_err("missing"));
    assert_eq!((code, reason.as_str()), (404, "NotFound"));
    assert_eq!(
        server
            .lease("monitoring", "elb-exporter")
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
            .as_deref(),
        Some("b")
    );
    let mut bad = b.clone();
    bad.metadata.resource_version = None;
    bad.spec.as_mut().unwrap().lease_duration_seconds = Some(0);
    let (code, reason, _) = status(
        api.replace("elb-exporter", &pp, &bad)
            .await
            .expect_err("invalid"),
    );
    assert_eq!((code, reason.as_str()), (422, "Invalid"));

    // One client's token refused: its requests fail, the other client's go through.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kubeconfig");
    server
        .write_kubeconfig_as(&path, "replica-a")
        .expect("kubeconfig");
    let kc = Kubeconfig::read_from(&path).expect("read kubeconfig");
    let mut cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("config");
    // As the exporter's client: kube's own retry of 503 would only slow the refusal down.
    cfg.default_retry = false;
    let api_a: Api<Lease> = Api::namespaced(Client::try_from(cfg).expect("client"), "monitoring");
    api_a.get("elb-exporter").await.expect("served");
    server.set_refused("replica-a", true);
    let (code, _, _) = status(api_a.get("elb-exporter").await.expect_err("refused"));
    assert_eq!(code, 503);
    api.get("elb-exporter")
        .await
        .expect("another client is served");
    server.set_refused("replica-a", false);
    api_a.get("elb-exporter").await.expect("served again");
}

/// `kubectl` reads the Leases the exporter writes (discovery, get, list) from the fake as from a real
/// apiserver. Uses `$KUBECTL`, else the pinned kubectl that scripts/validate-deploy.sh installs in .venv, else
/// PATH; skips when there is none, unless `REQUIRE_KUBECTL=1` (CI).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_reads_leases() {
    use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
    let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/kubectl");
    let kubectl = std::env::var("KUBECTL")
        .ok()
        .or_else(|| {
            std::path::Path::new(venv)
                .is_file()
                .then(|| venv.to_string())
        })
        .or_else(|| {
            std::process::Command::new("kubectl")
                .arg("version")
                .arg("--client")
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|_| "kubectl".to_string())
        });
    let Some(kubectl) = kubectl else {
        let why =
            "no kubectl ($KUBECTL, .venv/bin/kubectl from scripts/validate-deploy.sh, or PATH)";
        assert!(
            std::env::var("REQUIRE_KUBECTL").as_deref() != Ok("1"),
            "REQUIRE_KUBECTL=1 but {why}"
        );
        eprintln!("skipping the kubectl Lease test: {why}");
        return;
    };
    let (server, client) = start().await;
    let api: Api<Lease> = Api::namespaced(client, "monitoring");
    let mut lease = Lease::default();
    lease.metadata.name = Some("elb-exporter".into());
    lease.spec = Some(LeaseSpec {
        holder_identity: Some("exp-a".into()),
        lease_duration_seconds: Some(15),
        ..LeaseSpec::default()
    });
    api.create(&Default::default(), &lease)
        .await
        .expect("create");
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&kubectl)
            .args(args)
            .env("KUBECONFIG", &kubeconfig)
            .env("HOME", dir.path())
            .output()
            .expect("run kubectl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "kubectl {args:?}: {text}\n{err}");
        text
    };
    // kubectl blocks; the fake serves on the other worker meanwhile.
    let out = tokio::task::block_in_place(|| {
        run(&[
            "-n",
            "monitoring",
            "get",
            "lease",
            "elb-exporter",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
    });
    assert_eq!(out, "exp-a");
    let list = tokio::task::block_in_place(|| run(&["-n", "monitoring", "get", "leases"]));
    assert!(list.contains("elb-exporter"), "{list}");
}
