//! TLS to cloud endpoints: verified by default, a custom CA file trusted when configured, and
//! `insecure_skip_verify` only when asked. A TLS terminator in front of the simulator stands in for a
//! private cloud's gateway with its own CA.

use elb_exporter::cloud::client::HttpCloud;
use elb_exporter::cloud::{CloudApi, CloudError};
use elb_exporter::config::Config;
use elb_exporter::sim::cloud::{CloudSim, SimApi, SimConfig};
use elb_exporter::telemetry::Telemetry;
use std::sync::Arc;
use std::time::Duration;

/// Serves TLS for "localhost" on 127.0.0.1 and forwards the bytes to `upstream`.
async fn tls_front(upstream: std::net::SocketAddr) -> (u16, String) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let pem = cert.cert.pem();
    let dir = tempfile::tempdir().unwrap().keep();
    let (c, k) = (dir.join("c.pem"), dir.join("k.pem"));
    std::fs::write(&c, &pem).unwrap();
    std::fs::write(&k, cert.signing_key.serialize_pem()).unwrap();
    let acceptor = elb_exporter::server::tls_acceptor(&c, &k).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    (port, pem)
}

fn config(sim: &CloudSim, port: u16, extra: &str) -> Config {
    let c = sim.config();
    let text = format!(
        "auth:\n  auth_url: \"https://localhost:{port}/v3\"\n  region: \"{}\"\n  project_id: \"{}\"\n  access_key: \"{}\"\n  secret_key: \"{}\"\ncloud:\n  retry:\n    max_attempts: 1\n{extra}",
        c.region, c.project_id, c.ak, c.sk
    );
    Config::from_yaml(&text, &|_| None).unwrap()
}

#[tokio::test]
async fn cloud_tls_is_verified_and_a_custom_ca_is_trusted() {
    let sim = CloudSim::new(SimConfig::default());
    let upstream = sim.serve(([127, 0, 0, 1], 0).into()).await.unwrap();
    let (port, pem) = tls_front(upstream).await;
    let ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca.path(), &pem).unwrap();
    let call = |cfg: Config| async move {
        let cloud = Arc::new(HttpCloud::new(&cfg, Telemetry::new()).unwrap());
        tokio::time::timeout(
            Duration::from_secs(20),
            cloud.list_listeners(elb_exporter::cloud::ElbVersion::V3, "x"),
        )
        .await
        .expect("bounded")
    };

    // Default: an unknown CA is refused before any request reaches the cloud.
    let err = call(config(&sim, port, "")).await.unwrap_err();
    assert!(matches!(err, CloudError::Connect(..)), "{err:?}");
    assert!(sim.requests().is_empty());

    // With the CA file: verified TLS, and the signature (Host with port) still matches.
    let ok = call(config(
        &sim,
        port,
        &format!("  ca_file: \"{}\"\n", ca.path().display()),
    ))
    .await;
    assert_eq!(ok.unwrap(), vec![]);
    assert_eq!(sim.requests().len(), 1);
    assert!(matches!(sim.requests()[0].api, SimApi::ElbV3));

    // Opting out of verification works too (never in production).
    assert!(
        call(config(&sim, port, "  insecure_skip_verify: true\n"))
            .await
            .is_ok()
    );
}
