//! `elb-exporter demo`: the real exporter against the built-in simulated cloud and cluster, so a newcomer
//! sees real output with no cloud account.

use crate::annotations;
use crate::app;
use crate::config::Config;
use crate::sim::cloud::{CloudSim, LbKind, SimListener, SimProfile};
/// The Kubernetes object builders live with the other test doubles; the demo and the tests use them
/// under these names.
pub use crate::sim::fixtures::{ingress, service};
use crate::sim::kube::FakeApiServer;
use k8s_openapi::api::core::v1::Service;
use std::net::SocketAddr;

/// A load balancer of the fixture: id, kind, listeners (id, name, protocol, port).
pub struct FixtureElb {
    /// ELB id.
    pub id: &'static str,
    /// Shared (v2) or dedicated (v3).
    pub kind: LbKind,
    /// (id, name, protocol, port) of each listener.
    pub listeners: &'static [(&'static str, &'static str, &'static str, u16)],
}

/// The demo's load balancers: two dedicated, two shared.
pub const ELBS: &[FixtureElb] = &[
    FixtureElb {
        id: "6f1c6a1e-0d7e-4c55-9a3b-1d2e3f4a5b01",
        kind: LbKind::Dedicated,
        listeners: &[(
            "a1000000-0000-4000-8000-000000000001",
            "k8s_TCP_80",
            "TCP",
            80,
        )],
    },
    FixtureElb {
        id: "7a2d7b2f-1e8f-4d66-8b4c-2e3f4a5b6c02",
        kind: LbKind::Shared,
        listeners: &[
            (
                "b2000000-0000-4000-8000-000000000001",
                "k8s_TCP_80",
                "TCP",
                80,
            ),
            (
                "b2000000-0000-4000-8000-000000000002",
                "k8s_TCP_443",
                "TCP",
                443,
            ),
        ],
    },
    FixtureElb {
        id: "8b3e8c3a-2f9a-4e77-9c5d-3f4a5b6c7d03",
        kind: LbKind::Dedicated,
        listeners: &[
            (
                "c3000000-0000-4000-8000-000000000001",
                "k8s_TCP_8080",
                "TCP",
                8080,
            ),
            // No Service port claims it: not exported.
            ("c3000000-0000-4000-8000-000000000002", "admin", "TCP", 9090),
        ],
    },
    FixtureElb {
        id: "9c4f9d4b-3a0b-4f88-8d6e-4a5b6c7d8e04",
        kind: LbKind::Shared,
        listeners: &[(
            "d4000000-0000-4000-8000-000000000001",
            "k8s_HTTP_80",
            "HTTP",
            80,
        )],
    },
];

/// The demo's Services in two namespaces: dedicated and shared ELBs, a two-port Service, a Service
/// without the class annotation (v3 then v2), and one without the ELB annotation.
pub fn services() -> Vec<Service> {
    use crate::annotations::{ELB_CLASS as CLASS, ELB_ID as ID};
    vec![
        service(
            "default",
            "nginx",
            &[(ID, ELBS[0].id), (CLASS, "performance")],
            &[80],
        ),
        service(
            "default",
            "api",
            &[(ID, ELBS[1].id), (CLASS, "union")],
            &[80, 443],
        ),
        service(
            "shop",
            "cart",
            &[(ID, ELBS[2].id), (CLASS, "performance")],
            &[8080],
        ),
        service("shop", "checkout", &[(ID, ELBS[3].id)], &[80]),
        service("shop", "internal", &[], &[8080]),
    ]
}

/// The demo's CCE ELB Ingress: dedicated ELB, one HTTP listener on port 80.
pub const INGRESS_ELB: FixtureElb = FixtureElb {
    id: "ad5f0e5c-4b1c-4f99-8e6f-5b6c7d8e9f05",
    kind: LbKind::Dedicated,
    listeners: &[(
        "e5000000-0000-4000-8000-000000000080",
        "k8s_HTTP_80",
        "HTTP",
        80,
    )],
};

/// The demo's Ingress `shop/storefront` with two backends (`web:80`, `cart:8080`) on one listener, and
/// the ELB objects CCE creates for it (a pool per backend, reached by forwarding policies), so the
/// per-backend QPS split is visible: `<prefix>_sys_elb_pool_mb_l7_qps{service="web"|"cart",...}`.
pub fn seed_ingress(sim: &CloudSim, cluster: &FakeApiServer) {
    let elb = &INGRESS_ELB;
    sim.add_loadbalancer(elb.id, elb.kind);
    for (id, name, proto, port) in elb.listeners {
        sim.add_listener(elb.id, SimListener::new(*id, *name, *proto, *port));
    }
    let backends = [("web", 80), ("cart", 8080)];
    let ing = cluster.apply_ingress(ingress(
        "shop",
        "storefront",
        &[
            (annotations::ELB_ID, elb.id),
            (annotations::ELB_CLASS, "performance"),
        ],
        &backends,
    ));
    let uid = ing.metadata.uid.unwrap_or_default();
    let (listener, _, _, port) = elb.listeners[0];
    for (svc, svc_port) in backends {
        sim.add_cce_route(elb.id, listener, port, "shop", svc, svc_port as u16, &uid);
    }
}

/// Fills a simulator with the fixture's load balancers.
pub fn seed_cloud(sim: &CloudSim) {
    for elb in ELBS {
        sim.add_loadbalancer(elb.id, elb.kind);
        for (id, name, proto, port) in elb.listeners {
            sim.add_listener(elb.id, SimListener::new(*id, *name, *proto, *port));
        }
    }
}

/// A config for an exporter talking to the simulator at `cloud_url`.
pub fn config_for(sim: &CloudSim, cloud_url: &str, extra: &str) -> String {
    let c = sim.config();
    format!(
        "global:\n  port: \"127.0.0.1:0\"\n  prefix: \"huaweicloud\"\nauth:\n  auth_url: \"{cloud_url}/v3\"\n  region: \"{region}\"\n  project_name: \"{region}\"\n  access_key: \"{ak}\"\n  secret_key: \"{sk}\"\nendpoints:\n  iam: \"{cloud_url}\"\n  elb: \"{cloud_url}\"\n  ces: \"{cloud_url}\"\n{extra}",
        region = c.region,
        ak = c.ak,
        sk = c.sk,
    )
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A simulator could not be served.
    #[error("simulated {what}: {source}")]
    Serve {
        /// Which simulator.
        what: &'static str,
        /// Why it could not listen.
        source: std::io::Error,
    },
    /// The generated configuration was refused.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The Kubernetes client for the fake apiserver could not be built.
    #[error("kubernetes client for the simulated cluster: {0}")]
    Kube(String),
    /// The exporter failed.
    #[error(transparent)]
    App(#[from] app::AppError),
}

/// `--profile`: a simulated cloud by name.
pub fn parse_profile(name: &str) -> Result<SimProfile, String> {
    SimProfile::parse(name).ok_or_else(|| {
        let names: Vec<&str> = SimProfile::ALL.iter().map(|p| p.as_str()).collect();
        format!("unknown profile {name:?}; one of {}", names.join(", "))
    })
}

/// Runs the demo on the simulated `profile` cloud until Ctrl-C.
pub async fn run(listen: &str, profile: SimProfile) -> Result<(), DemoError> {
    let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
    let sim = CloudSim::new(profile.config());
    seed_cloud(&sim);
    let cloud_addr = sim
        .serve(loopback)
        .await
        .map_err(|source| DemoError::Serve {
            what: "cloud",
            source,
        })?;
    let cluster = FakeApiServer::new();
    for s in services() {
        cluster.apply(s);
    }
    seed_ingress(&sim, &cluster);
    let cluster_addr = cluster
        .serve(loopback)
        .await
        .map_err(|source| DemoError::Serve {
            what: "cluster",
            source,
        })?;
    // The default listener metrics plus the L7 requests per second the Ingress HPA example scales on.
    let metrics = crate::config::DEFAULT_METRICS
        .iter()
        .chain(&["mb_l7_qps"])
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    let text = config_for(
        &sim,
        &format!("http://{cloud_addr}"),
        &format!(
            "collection:\n  interval: \"15s\"\n  metrics: [{metrics}]\ndiscovery:\n  listener_refresh: \"1m\"\n"
        ),
    );
    let cfg = Config::from_yaml(&text, &|_| None)?;
    let kube = kube::Client::try_from(cluster.client_config())
        .map_err(|e| DemoError::Kube(e.to_string()))?;
    let listener = app::bind(listen).await?;
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| listen.to_string());
    println!(
        "elb-exporter demo: serving http://{addr}/metrics\n  simulated {} cloud (IAM, ELB, CES; region {}) at http://{cloud_addr}, simulated Kubernetes API at http://{cluster_addr}\n  5 Services in namespaces default and shop, and Ingress shop/storefront (backends web and cart on one listener); press Ctrl-C to stop",
        profile.as_str(),
        profile.region(),
    );
    app::run(cfg, None, kube, listener, crate::server::shutdown_signal()).await?;
    Ok(())
}
