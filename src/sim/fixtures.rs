//! Kubernetes objects for the demo and the tests: an annotated LoadBalancer Service and a CCE ELB
//! Ingress, built from a few literals.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use std::collections::BTreeMap;

/// A Service of the fixture: namespace, name, annotations, ports.
pub fn service(ns: &str, name: &str, annotations: &[(&str, &str)], ports: &[i32]) -> Service {
    let mut s = Service::default();
    s.metadata.namespace = Some(ns.into());
    s.metadata.name = Some(name.into());
    if !annotations.is_empty() {
        s.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        );
    }
    s.spec = Some(ServiceSpec {
        type_: Some("LoadBalancer".into()),
        ports: Some(
            ports
                .iter()
                .map(|p| ServicePort {
                    name: Some(format!("p{p}")),
                    port: *p,
                    protocol: Some("TCP".into()),
                    ..Default::default()
                })
                .collect(),
        ),
        ..Default::default()
    });
    s
}

/// A CCE ELB Ingress (`spec.ingressClassName: cce`) routing `/<service>` to each backend
/// (Service name, Service port).
pub fn ingress(
    ns: &str,
    name: &str,
    annotations: &[(&str, &str)],
    backends: &[(&str, i32)],
) -> k8s_openapi::api::networking::v1::Ingress {
    use k8s_openapi::api::networking::v1::{
        HTTPIngressPath, HTTPIngressRuleValue, Ingress, IngressBackend, IngressRule,
        IngressServiceBackend, IngressSpec, ServiceBackendPort,
    };
    let mut ing = Ingress::default();
    ing.metadata.namespace = Some(ns.into());
    ing.metadata.name = Some(name.into());
    ing.metadata.annotations = Some(
        annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
    );
    let paths = backends
        .iter()
        .map(|(svc, port)| HTTPIngressPath {
            path: Some(format!("/{svc}")),
            path_type: "Prefix".into(),
            backend: IngressBackend {
                service: Some(IngressServiceBackend {
                    name: svc.to_string(),
                    port: Some(ServiceBackendPort {
                        number: Some(*port),
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            },
        })
        .collect();
    ing.spec = Some(IngressSpec {
        ingress_class_name: Some("cce".into()),
        rules: Some(vec![IngressRule {
            host: None,
            http: Some(HTTPIngressRuleValue { paths }),
        }]),
        ..Default::default()
    });
    ing
}

/// A bare Service with `metadata.labels` (no spec): what label and field selectors look at.
pub fn labelled_service(ns: &str, name: &str, labels: &[(&str, &str)]) -> Service {
    let mut s = Service::default();
    s.metadata.namespace = Some(ns.to_owned());
    s.metadata.name = Some(name.to_owned());
    s.metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
    );
    s
}
