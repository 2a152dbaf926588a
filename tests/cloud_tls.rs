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
    tls_front_named(upstream, "localhost").await
}

/// Serves TLS on 127.0.0.1 with a certificate for `name` only, forwarding the bytes to `upstream`.
async fn tls_front_named(upstream: std::net::SocketAddr, name: &str) -> (u16, String) {
    let cert = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
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
    let yaml = config_yaml(sim, &format!("https://localhost:{port}/v3"), extra);
    Config::from_yaml(&yaml, &|_| None).unwrap()
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

#[tokio::test]
async fn a_certificate_for_another_host_is_refused() {
    // A certificate from a trusted CA (the same self-signed one is in ca_file) but for another name:
    // refused before any request, whether the endpoint is named by host or by IP address.
    let sim = CloudSim::new(SimConfig::default());
    let upstream = sim.serve(([127, 0, 0, 1], 0).into()).await.unwrap();
    let (port, pem) = tls_front_named(upstream, "elb.other-region.example").await;
    let ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca.path(), &pem).unwrap();
    let extra = format!("  ca_file: \"{}\"\n", ca.path().display());
    for host in ["localhost", "127.0.0.1"] {
        let yaml = config_yaml(&sim, &format!("https://{host}:{port}/v3"), &extra);
        let cfg = Config::from_yaml(&yaml, &|_| None).unwrap();
        let cloud = Arc::new(HttpCloud::new(&cfg, Telemetry::new()).unwrap());
        let err = tokio::time::timeout(
            Duration::from_secs(20),
            cloud.list_listeners(elb_exporter::cloud::ElbVersion::V3, "x"),
        )
        .await
        .expect("bounded")
        .unwrap_err();
        assert!(matches!(err, CloudError::Connect(..)), "{host}: {err:?}");
        assert!(sim.requests().is_empty(), "{host}: a request got through");
    }
}

fn config_yaml(sim: &CloudSim, auth_url: &str, extra: &str) -> String {
    let c = sim.config();
    format!(
        "auth:\n  auth_url: \"{auth_url}\"\n  region: \"{}\"\n  project_id: \"{}\"\n  access_key: \"{}\"\n  secret_key: \"{}\"\ncloud:\n  retry:\n    max_attempts: 1\n{extra}",
        c.region, c.project_id, c.ak, c.sk
    )
}

/// A config with a project id (no IAM call needed), cloud endpoints on a closed loopback port, and `extra`.
fn warned_config(extra: &str) -> String {
    format!(
        "auth:\n  auth_url: \"https://127.0.0.1:9/v3\"\n  region: \"r1\"\n  project_id: \"p1\"\n  \
         access_key: \"AKTLS000000000000001\"\n  secret_key: \"SKtls00000000000000000000000000000000000\"\n{extra}"
    )
}

#[test]
fn weak_cloud_transport_is_warned_about() {
    let warnings = |extra: &str| {
        Config::from_yaml(&warned_config(extra), &|_| None)
            .unwrap()
            .transport_warnings()
    };
    assert!(warnings("").is_empty());
    for extra in [
        "cloud:\n  insecure_skip_verify: true\n",
        "global:\n  ignore_ssl_verify: true\n",
    ] {
        let w = warnings(extra);
        assert_eq!(w.len(), 1, "{extra}: {w:?}");
        assert!(w[0].contains("cloud.insecure_skip_verify"), "{w:?}");
    }
    let token = "  security_token: \"tok-secret-1\"\n";
    let http = "endpoints:\n  elb: \"http://127.0.0.1:9\"\n  ces: \"http://127.0.0.1:9\"\n";
    let with_token = |endpoints: &str| {
        let text = warned_config(endpoints).replacen(
            "\n  project_id",
            &format!("\n{token}  project_id"),
            1,
        );
        Config::from_yaml(&text, &|_| None)
            .unwrap()
            .transport_warnings()
    };
    let w = with_token(http);
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(
        w[0].starts_with("endpoints.elb is http://127.0.0.1:9 while auth.security_token"),
        "{w:?}"
    );
    assert!(
        w[1].starts_with("endpoints.ces is http://127.0.0.1:9"),
        "{w:?}"
    );
    assert!(w.iter().all(|w| !w.contains("tok-secret-1")), "{w:?}");
    // http:// without a token (simulators) and https:// with one are fine.
    assert!(warnings(http).is_empty());
    assert!(with_token("").is_empty());
}

#[test]
fn weak_cloud_transport_is_warned_at_start_and_by_check() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clouds.yml");
    std::fs::write(&path, warned_config("global:\n  ignore_ssl_verify: true\n")).unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_elb-exporter"))
            .arg("--config")
            .arg(&path)
            .args(args)
            // No cluster: both modes stop at the Kubernetes client, after the warnings.
            .env("KUBECONFIG", dir.path().join("no-kubeconfig"))
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };
    let check = run(&["check"]);
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(
        stdout.contains("  warning: cloud.insecure_skip_verify (global.ignore_ssl_verify) is on"),
        "{stdout}"
    );
    let start = run(&[]);
    let stderr = String::from_utf8_lossy(&start.stderr);
    assert!(
        stderr.contains("insecure transport to the cloud"),
        "{stderr}"
    );
    assert!(stderr.contains("cloud.insecure_skip_verify"), "{stderr}");
}
