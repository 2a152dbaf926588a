//! The HTTP server's protection and limits: basic auth (bcrypt), bearer token, TLS, header-read timeout,
//! and the gzip body made of concatenated members.

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
    let app = server::router(state, WebAuth::from_settings(&web));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        server::serve(listener, app, &web, async {
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

#[tokio::test]
async fn slow_headers_are_cut_off() {
    let (addr, _stop) = start(settings()).await;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 512];
    // The server must close (or answer 408) after the header timeout, not wait for us forever.
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    let elapsed = started.elapsed();
    assert!(r.is_ok(), "connection still open after 5 s");
    assert!(
        elapsed >= Duration::from_millis(250),
        "closed too early: {elapsed:?}"
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
