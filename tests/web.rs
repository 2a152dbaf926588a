//! The HTTP server's protection and limits: basic auth (bcrypt), bearer token, TLS (and its reload),
//! header-read and idle timeouts whatever the protocol, and the gzip body made of concatenated members.

mod common;

use bytes::Bytes;
use elb_exporter::config::{Secret, WebSettings};
use elb_exporter::exposition::{Body, gzip};
use elb_exporter::server::{self, AppState, WebAuth};
use elb_exporter::telemetry::Telemetry;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BODY: &str = "# TYPE huaweicloud_sys_elb_listener_m1_cps gauge\nhuaweicloud_sys_elb_listener_m1_cps{namespace=\"a\"} 1\n";

fn settings() -> WebSettings {
    WebSettings {
        read_header_timeout: Duration::from_millis(300),
        max_connections: 16,
        ..Default::default()
    }
}

async fn start(web: WebSettings) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let state = AppState::new(Telemetry::new(), "/metrics");
    state.body.store(Arc::new(Body::new(
        Bytes::from(gzip(BODY.as_bytes())),
        None,
        1,
    )));
    let telemetry = state.telemetry.clone();
    let app = server::router(state, WebAuth::from_settings(&web));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        server::serve(listener, app, &web, &telemetry, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    (addr, tx)
}

async fn status(c: &reqwest::Client, url: String) -> u16 {
    c.get(url).send().await.unwrap().status().as_u16()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

#[tokio::test]
async fn basic_auth_protects_metrics_but_not_probes() {
    let hash = bcrypt::hash("s3cret pass", 4).unwrap();
    let mut web = settings();
    web.basic_auth_users = vec![("prometheus".into(), Secret::new(hash))];
    let (addr, _stop) = start(web).await;
    let c = client();
    let url = format!("http://{addr}/metrics");

    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["www-authenticate"],
        "Basic realm=\"elb-exporter\""
    );
    let r = c
        .get(&url)
        .basic_auth("prometheus", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .get(&url)
        .basic_auth("nobody", Some("s3cret pass"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    for _ in 0..2 {
        // The second time is answered from the verified cache.
        let r = c
            .get(&url)
            .basic_auth("prometheus", Some("s3cret pass"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.text().await.unwrap().starts_with(BODY));
    }
    assert_eq!(status(&c, format!("http://{addr}/")).await, 401);
    assert_eq!(status(&c, format!("http://{addr}/healthz")).await, 200);
    // Not ready (nothing synced in this test), but answered without credentials.
    assert_eq!(status(&c, format!("http://{addr}/readyz")).await, 503);
}

/// A config file's text with `web:` YAML appended.
fn config_text(web: &str) -> String {
    format!(
        "auth:\n  auth_url: \"https://iam.cn-east-3.myhuaweicloud.com/v3\"\n  project_name: \"cn-east-3\"\n  \
         access_key: \"AKWEB000000000000001\"\n  secret_key: \"SKweb00000000000000000000000000000000000\"\n  \
         region: \"cn-east-3\"\nweb:\n{web}"
    )
}

#[test]
fn bcrypt_costs_above_12_are_refused_in_config() {
    // Format-valid hashes; config looks at the cost, not the digest.
    let hash = |cost: u32| format!("$2b${cost:02}${}", "a".repeat(53));
    let load = |cost: u32| {
        elb_exporter::config::Config::from_yaml(
            &config_text(&format!(
                "  basic_auth_users:\n    prom: \"{}\"\n",
                hash(cost)
            )),
            &|_| None,
        )
    };
    assert!(load(10).is_ok());
    assert!(load(12).is_ok());
    for cost in [13, 31] {
        let err = load(cost).unwrap_err();
        assert_eq!(err.field(), Some("web.basic_auth_users.prom"), "{err}");
        let text = err.to_string();
        assert!(
            text.contains(&format!("bcrypt cost {cost} is above 12")),
            "{text}"
        );
        assert!(!text.contains(&hash(cost)), "the hash leaked: {text}");
    }
    // The binary refuses it before doing anything else: exit 2, naming the field.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clouds.yml");
    std::fs::write(
        &path,
        config_text(&format!(
            "  basic_auth_users:\n    prom: \"{}\"\n",
            hash(31)
        )),
    )
    .unwrap();
    let out = std::process::Command::new(common::BIN)
        .arg("--config")
        .arg(&path)
        .arg("check")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("web.basic_auth_users.prom"), "{stderr}");
}

#[test]
fn web_timeouts_are_validated() {
    let load = |web: &str| elb_exporter::config::Config::from_yaml(&config_text(web), &|_| None);
    let c = load("  read_header_timeout: \"5s\"\n").unwrap();
    assert_eq!(c.web.idle_timeout, Duration::from_secs(120));
    assert_eq!(
        load("  idle_timeout: \"90s\"\n").unwrap().web.idle_timeout,
        Duration::from_secs(90)
    );
    for bad in [
        "  idle_timeout: \"5s\"\n",
        "  idle_timeout: \"2h\"\n",
        "  idle_timeout: \"soon\"\n",
    ] {
        let err = load(bad).unwrap_err();
        assert_eq!(err.field(), Some("web.idle_timeout"), "{bad}: {err}");
    }
    assert!(
        load("  idle_timeoutt: \"90s\"\n")
            .unwrap_err()
            .to_string()
            .contains("idle_timeoutt")
    );
}

/// Sends `n` requests at once, each on its own connection, with basic auth `user`/`password`;
/// returns the statuses in the order the answers arrived.
async fn flood(addr: SocketAddr, n: usize, user: &str, password: &str) -> Vec<u16> {
    let url = format!("http://{addr}/metrics");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // A client per request (one connection each), all built before the first is sent, so that the
    // requests really arrive together.
    let requests: Vec<_> = (0..n)
        .map(|_| client().get(&url).basic_auth(user, Some(password)))
        .collect();
    for request in requests {
        let tx = tx.clone();
        tokio::spawn(async move {
            let r = request.send().await;
            let _ = tx.send(r.map(|r| r.status().as_u16()).unwrap_or(0));
        });
    }
    drop(tx);
    let mut statuses = Vec::new();
    while let Some(s) = rx.recv().await {
        statuses.push(s);
    }
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_checks_are_capped_and_unknown_users_are_checked_too() {
    let hash = bcrypt::hash("s3cret pass", 10).unwrap();
    let mut web = settings();
    web.basic_auth_users = vec![("prometheus".into(), Secret::new(hash))];
    let (addr, _stop) = start(web).await;
    let url = format!("http://{addr}/metrics");
    let ok = || async {
        client()
            .get(&url)
            .basic_auth("prometheus", Some("s3cret pass"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(ok().await, 200);

    // Wrong passwords for a known user, and any password for an unknown one: at most
    // MAX_CONCURRENT_VERIFICATIONS bcrypt checks run; the rest are answered 429 without one (so
    // before the checks that run finish), never queued.
    let n = 12;
    for (user, password) in [("prometheus", "wrong"), ("nobody", "s3cret pass")] {
        let flooding = tokio::spawn(flood(addr, n, user, password));
        // Meanwhile a scraper with the right (already verified) password is served.
        for _ in 0..3 {
            assert_eq!(ok().await, 200);
        }
        let statuses = flooding.await.unwrap();
        let denied = statuses.iter().filter(|s| **s == 401).count();
        let busy = statuses.iter().filter(|s| **s == 429).count();
        assert_eq!(denied + busy, n, "{user}: {statuses:?}");
        // A check takes ~0.5 s here (cost 10, unoptimised build), the 12 requests arrive within
        // milliseconds of each other: all but the first MAX_CONCURRENT_VERIFICATIONS find the slots
        // taken.
        assert!(
            (1..=server::MAX_CONCURRENT_VERIFICATIONS).contains(&denied),
            "{user}: {denied} checks instead of at most {}: {statuses:?}",
            server::MAX_CONCURRENT_VERIFICATIONS
        );
        // Refused at once, not after waiting for a check: the first answer is a 429.
        assert_eq!(statuses[0], 429, "{user}: {statuses:?}");
    }
}

#[tokio::test]
async fn bearer_token_is_accepted() {
    let mut web = settings();
    web.bearer_token = Some(Secret::new("tok-123"));
    let (addr, _stop) = start(web).await;
    let c = client();
    let url = format!("http://{addr}/metrics");
    assert_eq!(
        c.get(&url)
            .bearer_auth("tok-123")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        c.get(&url)
            .bearer_auth("tok-124")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        c.get(&url)
            .bearer_auth("tok-12")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(c.get(&url).send().await.unwrap().status(), 401);
}

#[tokio::test]
async fn tls_serves_https() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let mut web = settings();
    web.tls = Some((cert_path, key_path));
    let (addr, _stop) = start(web).await;

    let c = reqwest::Client::builder()
        .no_proxy()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap())
        .resolve("localhost", addr)
        .build()
        .unwrap();
    let r = c
        .get(format!("https://localhost:{}/metrics", addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().starts_with(BODY));
    // Plain HTTP to the TLS port gets no HTTP answer.
    let plain = client().get(format!("http://{addr}/metrics")).send().await;
    assert!(plain.is_err() || plain.unwrap().status() != 200);
}

/// What a client that never completes a request sends before going quiet.
const OPENERS: [(&str, &[u8]); 4] = [
    ("silent", b""),
    ("PRI", b"PRI"),
    ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    (
        "partial HTTP/1 headers",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n",
    ),
];

/// How long until the server closes `s` (EOF or reset), at most 5 s.
async fn closed_after<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => continue,
            }
        }
    })
    .await
    .ok()
}

async fn open(addr: SocketAddr, opener: &[u8]) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(opener).await.unwrap();
    s
}

/// A self-signed "localhost" certificate written to `dir`; returns the PEM of the certificate.
fn write_cert(dir: &std::path::Path) -> (String, std::path::PathBuf, std::path::PathBuf) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (c, k) = (dir.join("tls.crt"), dir.join("tls.key"));
    // Like a Kubernetes Secret volume: new files are renamed into place.
    let (ct, kt) = (dir.join(".tls.crt.new"), dir.join(".tls.key.new"));
    std::fs::write(&ct, cert.cert.pem()).unwrap();
    std::fs::write(&kt, cert.signing_key.serialize_pem()).unwrap();
    std::fs::rename(&ct, &c).unwrap();
    std::fs::rename(&kt, &k).unwrap();
    (cert.cert.pem(), c, k)
}

/// A TLS client trusting `pems`, completing the handshake with "localhost" at `addr`.
async fn tls_connect(
    addr: SocketAddr,
    pems: &[&str],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    for pem in pems {
        roots
            .add(CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
            .unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap()
}

fn https_client(pem: &str, addr: SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
        .resolve("localhost", addr)
        .build()
        .unwrap()
}

fn dropped(body: &str, reason: &str) -> f64 {
    common::sample(
        body,
        &format!("elb_exporter_http_connections_dropped_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or_else(|| panic!("no drop counter for {reason} in:\n{body}"))
}

#[tokio::test]
async fn slow_headers_are_cut_off() {
    // Every way of never completing a request, HTTP/1, HTTP/2 and TLS alike, is cut off after
    // read_header_timeout (300 ms) counted from accept, not before.
    let (addr, _stop) = start(settings()).await;
    let dir = tempfile::tempdir().unwrap();
    let (pem, cert, key) = write_cert(dir.path());
    let mut web = settings();
    web.tls = Some((cert, key));
    let (tls_addr, _tls_stop) = start(web).await;

    let mut plain = Vec::new();
    for (name, opener) in OPENERS {
        plain.push((name, open(addr, opener).await));
    }
    let mut silent_tls = open(tls_addr, b"").await;
    let mut idle_tls = tls_connect(tls_addr, &[&pem]).await;
    let mut checks = Vec::new();
    for (name, s) in &mut plain {
        checks.push((*name, closed_after(s).await));
    }
    checks.push((
        "silent before the TLS handshake",
        closed_after(&mut silent_tls).await,
    ));
    checks.push((
        "TLS handshake, then nothing",
        closed_after(&mut idle_tls).await,
    ));
    for (name, closed) in checks {
        let elapsed = closed.unwrap_or_else(|| panic!("{name}: connection still open after 5 s"));
        // Measured from the first read, which starts after all sockets were opened.
        assert!(elapsed <= Duration::from_secs(3), "{name}: {elapsed:?}");
    }
    // Not before the timeout: a fresh silent connection lives at least ~read_header_timeout.
    let mut s = open(addr, b"").await;
    let elapsed = closed_after(&mut s).await.expect("closed");
    assert!(
        elapsed >= Duration::from_millis(250),
        "closed too early: {elapsed:?}"
    );
}

#[tokio::test]
async fn idle_connections_do_not_lock_out_scrapers() {
    // max_connections (16) sockets that never send a request must not stop Prometheus.
    let (addr, _stop) = start(settings()).await;
    let mut held = Vec::new();
    for i in 0..16 {
        held.push(open(addr, OPENERS[i % 3].1).await);
    }
    for s in &mut held {
        assert!(
            closed_after(s).await.is_some(),
            "an idle connection kept its slot"
        );
    }
    let r = client()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    assert_eq!(dropped(&body, "header_timeout"), 16.0);
    assert_eq!(dropped(&body, "connection_limit"), 0.0);

    // The same over TLS: handshakes completed, then nothing.
    let dir = tempfile::tempdir().unwrap();
    let (pem, cert, key) = write_cert(dir.path());
    let mut web = settings();
    web.tls = Some((cert, key));
    let (addr, _stop) = start(web).await;
    let mut held = Vec::new();
    for _ in 0..16 {
        held.push(tls_connect(addr, &[&pem]).await);
    }
    for s in &mut held {
        assert!(
            closed_after(s).await.is_some(),
            "an idle TLS connection kept its slot"
        );
    }
    let r = https_client(&pem, addr)
        .get(format!("https://localhost:{}/metrics", addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(dropped(&r.text().await.unwrap(), "header_timeout"), 16.0);
}

/// An HTTP/2 client's opening (preface, empty SETTINGS) and `GET /healthz` on stream 1.
fn h2_get_healthz() -> Vec<u8> {
    let mut b = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    b.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    // HPACK: :method GET, :scheme http, :path "/healthz" (literal, indexed name), :authority "x".
    let block: &[u8] = &[
        0x82, 0x86, 0x04, 0x08, b'/', b'h', b'e', b'a', b'l', b't', b'h', b'z', 0x01, 0x01, b'x',
    ];
    b.extend_from_slice(&[0, 0, block.len() as u8, 1, 0x05, 0, 0, 0, 1]);
    b.extend_from_slice(block);
    b
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let mut web = settings();
    web.idle_timeout = Duration::from_millis(1500);
    let (addr, _stop) = start(web).await;
    let mut h1 = open(addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut h2 = open(addr, &h2_get_healthz()).await;
    let mut buf = [0u8; 256];
    let n = h1.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
    let (h1_closed, h2_closed) = tokio::join!(closed_after(&mut h1), closed_after(&mut h2));
    // Each answered one request, then stayed open past read_header_timeout: only the idle timeout
    // closes them.
    for (name, closed) in [("HTTP/1", h1_closed), ("HTTP/2", h2_closed)] {
        let closed =
            closed.unwrap_or_else(|| panic!("idle {name} connection still open after 5 s"));
        assert!(closed >= Duration::from_millis(1000), "{name}: {closed:?}");
    }
    let body = client()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(dropped(&body, "idle_timeout"), 2.0);
    assert_eq!(dropped(&body, "header_timeout"), 0.0);

    // The same over TLS.
    let dir = tempfile::tempdir().unwrap();
    let (pem, cert, key) = write_cert(dir.path());
    let mut web = settings();
    web.idle_timeout = Duration::from_millis(1500);
    web.tls = Some((cert, key));
    let (addr, _stop) = start(web).await;
    let mut tls = tls_connect(addr, &[&pem]).await;
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let n = tls.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
    let closed = closed_after(&mut tls)
        .await
        .expect("idle TLS connection closed");
    assert!(closed >= Duration::from_millis(1000), "TLS: {closed:?}");
    let r = https_client(&pem, addr)
        .get(format!("https://localhost:{}/metrics", addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(dropped(&r.text().await.unwrap(), "idle_timeout"), 1.0);
}

#[tokio::test]
async fn tls_certificate_is_reloaded_when_its_files_change() {
    let dir = tempfile::tempdir().unwrap();
    let (old_pem, cert, key) = write_cert(dir.path());
    let mut web = settings();
    web.tls = Some((cert, key));
    let (addr, _stop) = start(web).await;
    let leaf = |s: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>| {
        s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    };
    let der = |pem: &str| {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    };
    let first = tls_connect(addr, &[&old_pem]).await;
    assert_eq!(leaf(&first), der(&old_pem));

    let (new_pem, _, _) = write_cert(dir.path());
    let second = tls_connect(addr, &[&old_pem, &new_pem]).await;
    assert_eq!(
        leaf(&second),
        der(&new_pem),
        "a new connection still got the old certificate"
    );

    // A half-written rotation (certificate without its key) keeps the last good pair in service.
    let broken = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.path().join("tls.crt"), broken.cert.pem()).unwrap();
    let third = tls_connect(addr, &[&new_pem]).await;
    assert_eq!(leaf(&third), der(&new_pem));
}

/// The follower's warm-copy client over TLS trusts exactly the certificate its own replica serves
/// (same Secret), reached by pod IP without a matching SAN or CA; another certificate is refused, and a
/// rotated one is followed on the next request.
#[tokio::test]
async fn the_warm_copy_client_trusts_exactly_the_served_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cert, key) = write_cert(dir.path());
    let mut web = settings();
    web.tls = Some((cert.clone(), key));
    let (addr, _stop) = start(web).await;
    // Without leader election the route answers 404: the handshake is what is tested.
    let url = format!("https://{addr}{}", elb_exporter::handover::PATH);
    let pinned = elb_exporter::handover::client(Some(&cert)).unwrap();
    assert_eq!(pinned.get(&url).send().await.unwrap().status(), 404);

    let other_dir = tempfile::tempdir().unwrap();
    let (_, other, _) = write_cert(other_dir.path());
    let stranger = elb_exporter::handover::client(Some(&other)).unwrap();
    assert!(
        stranger.get(&url).send().await.is_err(),
        "trusted another certificate"
    );

    write_cert(dir.path());
    assert_eq!(
        pinned.get(&url).send().await.unwrap().status(),
        404,
        "rotation"
    );
    let plain = elb_exporter::handover::client(None).unwrap();
    assert!(
        plain.get(&url).send().await.is_err(),
        "no TLS without web.tls"
    );
}

#[tokio::test]
async fn gzip_body_is_concatenated_members_of_the_plain_body() {
    let (addr, _stop) = start(settings()).await;
    let c = reqwest::Client::builder().no_proxy().build().unwrap();
    let plain = c
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        plain.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let plain_len: usize = plain.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let plain = plain.bytes().await.unwrap();
    assert_eq!(plain.len(), plain_len);
    let r = c
        .get(format!("http://{addr}/metrics"))
        .header("Accept-Encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-encoding"], "gzip");
    assert_eq!(r.headers()["vary"], "Accept-Encoding");
    let raw = r.bytes().await.unwrap();
    let mut decoded = String::new();
    flate2::read::MultiGzDecoder::new(&raw[..])
        .read_to_string(&mut decoded)
        .unwrap();
    // Same families; the exporter's own counters may differ between the two scrapes only in values.
    assert!(decoded.starts_with(BODY));
    assert!(decoded.contains("\nelb_exporter_up "));
    let names = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.rsplit_once(' ').unwrap().0.to_string())
            .collect()
    };
    assert_eq!(names(&decoded), names(std::str::from_utf8(&plain).unwrap()));
}
