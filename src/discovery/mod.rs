//! Kubernetes discovery: watch Services carrying the ELB annotation and turn each into a compact
//! [`ServiceTarget`] (no Kubernetes object is kept). The [`inventory`] resolves each ELB's listeners and
//! attributes them to Service ports. Of every other Service only its named ports are kept (Ingress
//! backends may name a Service port, CCE's pool names hold its number).

pub mod ingress;
pub mod inventory;
pub mod names;
pub mod plan;
pub mod pools;

use crate::annotations;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// `kubernetes.io/elb.class`: which ELB API knows the load balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ElbClass {
    /// `union`: shared load balancer, v2 API.
    Shared,
    /// `performance`: dedicated load balancer, v3 API.
    Dedicated,
    /// Absent or another value: v3 first, then v2.
    Unspecified,
}

/// (namespace, name) of a Service.
pub type ServiceKey = (Arc<str>, Arc<str>);

/// A Service's named ports, `spec.ports[]` (name, port), sorted: an Ingress backend may name its
/// Service port by name, and CCE's pool name holds the number.
pub type PortNames = Vec<(Arc<str>, u16)>;

/// What the exporter keeps of an annotated Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceTarget {
    /// The Service's namespace.
    pub namespace: Arc<str>,
    /// The Service's name.
    pub name: Arc<str>,
    /// `metadata.uid` (`elb_exporter_listener_info` only).
    pub uid: Arc<str>,
    /// The annotated ELB id, trimmed.
    pub elb_id: Arc<str>,
    /// From `kubernetes.io/elb.class`: which listener API to ask first.
    pub class: ElbClass,
    /// `spec.ports[].port`, sorted, deduplicated.
    pub ports: Vec<u16>,
    /// `spec.ports[]` names to numbers, for Ingress backends that name a port.
    pub port_names: PortNames,
}

impl ServiceTarget {
    /// (namespace, name): how events and the inventory refer to it.
    pub fn key(&self) -> ServiceKey {
        (self.namespace.clone(), self.name.clone())
    }
}

/// Why something discovered cannot be (fully) exported: the `reason` of
/// `elb_exporter_discovery_problems`, the one place its label values are spelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Problem {
    /// The ELB annotation is present but empty.
    EmptyAnnotation,
    /// The ELB annotation holds several ids; a Service has one ELB.
    SeveralIds,
    /// The ELB annotation is not a UUID.
    InvalidId,
    /// Neither ELB API knows the annotated id (or it has no listener).
    UnknownElb,
    /// The ELB's listeners could not be listed (yet).
    ElbLookupFailed,
    /// A Service port with no listener on its ELB.
    PortWithoutListener,
    /// RBAC forbids reading Services in a watched namespace (or cluster-wide).
    NamespaceForbidden,
    /// RBAC forbids reading Ingresses (Services are still collected).
    IngressForbidden,
    /// A CCE Ingress names no ELB the exporter can find (by id, VIP address or CCE's `cce-lb-<uid>`).
    IngressUnbound,
    /// A CCE Ingress's `kubernetes.io/elb.listen-ports` / `kubernetes.io/elb.port` is unusable.
    IngressBadPorts,
    /// An Ingress listener shared with another Ingress, to which it is attributed.
    SharedListener,
    /// A pool behind an Ingress listener that no Ingress backend matches (by CCE's pool name).
    PoolUnmatched,
    /// The pools or forwarding policies of an Ingress ELB could not be listed (yet).
    PoolLookupFailed,
}

impl Problem {
    /// Every reason: each body reports all of them, zeros included.
    pub const ALL: [Problem; 13] = [
        Problem::EmptyAnnotation,
        Problem::SeveralIds,
        Problem::InvalidId,
        Problem::UnknownElb,
        Problem::ElbLookupFailed,
        Problem::PortWithoutListener,
        Problem::NamespaceForbidden,
        Problem::IngressForbidden,
        Problem::IngressUnbound,
        Problem::IngressBadPorts,
        Problem::SharedListener,
        Problem::PoolUnmatched,
        Problem::PoolLookupFailed,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Problem::EmptyAnnotation => "empty_annotation",
            Problem::SeveralIds => "several_elb_ids",
            Problem::InvalidId => "invalid_elb_id",
            Problem::UnknownElb => "unknown_elb",
            Problem::ElbLookupFailed => "elb_lookup_failed",
            Problem::PortWithoutListener => "port_without_listener",
            Problem::NamespaceForbidden => "namespace_forbidden",
            Problem::IngressForbidden => "ingress_forbidden",
            Problem::IngressUnbound => "ingress_unbound",
            Problem::IngressBadPorts => "ingress_bad_ports",
            Problem::SharedListener => "shared_listener",
            Problem::PoolUnmatched => "pool_unmatched",
            Problem::PoolLookupFailed => "pool_lookup_failed",
        }
    }

    /// The reason in words, for `check` and logs.
    pub fn describe(self) -> &'static str {
        match self {
            Problem::EmptyAnnotation => "the ELB annotation is empty",
            Problem::SeveralIds => "the ELB annotation holds several ids; one Service has one ELB",
            Problem::InvalidId => {
                "the ELB annotation is not an ELB id (a UUID: 8-4-4-4-12 hexadecimal digits)"
            }
            Problem::UnknownElb => "no ELB API knows the annotated load balancer",
            Problem::ElbLookupFailed => "the ELB's listeners could not be listed",
            Problem::PortWithoutListener => "a Service port has no listener on its ELB",
            Problem::NamespaceForbidden => {
                "RBAC forbids listing Services here (grant get/list/watch on services)"
            }
            Problem::IngressForbidden => {
                "RBAC forbids listing Ingresses (grant get/list/watch on ingresses.networking.k8s.io)"
            }
            Problem::IngressUnbound => {
                "no ELB matches the CCE Ingress's kubernetes.io/elb.id, kubernetes.io/elb.ip (vip_address) or auto-created name cce-lb-<uid> (retried)"
            }
            Problem::IngressBadPorts => {
                "kubernetes.io/elb.listen-ports (JSON [{\"HTTP\":80}]) or kubernetes.io/elb.port is not a list of ports"
            }
            Problem::SharedListener => {
                "the Ingress listener is shared and attributed to another Ingress (its master, else the oldest)"
            }
            Problem::PoolUnmatched => {
                "a pool behind an Ingress listener matches no backend of its Ingresses by CCE's pool name"
            }
            Problem::PoolLookupFailed => "the pools of an Ingress ELB could not be listed",
        }
    }
}

/// ELB ids (shared and dedicated) are UUIDs: `8-4-4-4-12` hexadecimal digits.
fn is_uuid(id: &str) -> bool {
    id.len() == 36
        && id.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// A watch scope: one namespace, or `None` for all namespaces.
pub type Scope = Option<Arc<str>>;

/// The distinct scopes to watch for `namespaces` (empty = all): readiness waits for each exactly once.
pub fn scopes(namespaces: &[String]) -> Vec<Scope> {
    if namespaces.is_empty() {
        return vec![None];
    }
    let mut out: Vec<Scope> = Vec::with_capacity(namespaces.len());
    for n in namespaces {
        let s = Some(Arc::from(n.as_str()));
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out
}

/// How a scope is named in logs and `check`.
pub fn scope_name(scope: &Scope) -> &str {
    scope.as_deref().unwrap_or("*")
}

/// The exporter's view of a watched Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// Annotated and usable.
    Target(ServiceTarget),
    /// Annotated, but the annotation is unusable.
    Invalid {
        /// (namespace, name).
        key: ServiceKey,
        /// What is wrong with the annotation.
        problem: Problem,
        /// Its named ports, which still resolve Ingress backends.
        port_names: PortNames,
    },
    /// Not annotated: not ours (or no longer). Its named ports still resolve Ingress backends.
    Ignored(ServiceKey, PortNames),
}

impl Observed {
    /// The Service's named ports, whatever its annotation says.
    pub fn port_names(&self) -> &[(Arc<str>, u16)] {
        match self {
            Observed::Target(t) => &t.port_names,
            Observed::Invalid { port_names, .. } | Observed::Ignored(_, port_names) => port_names,
        }
    }

    /// Whether a (re-)list keeps it: annotated, or with named ports an Ingress backend may use.
    pub fn worth_keeping(&self) -> bool {
        !matches!(self, Observed::Ignored(_, names) if names.is_empty())
    }
}

/// The Service's named ports.
fn port_names(svc: &Service) -> PortNames {
    let mut out: PortNames = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .map(|ps| {
            ps.iter()
                .filter_map(|p| {
                    let name = p.name.as_deref().filter(|n| !n.is_empty())?;
                    Some((Arc::from(name), u16::try_from(p.port).ok()?))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Reads the annotation and ports of a Service.
pub fn observe(svc: &Service, annotation: &str) -> Observed {
    let namespace: Arc<str> = svc
        .metadata
        .namespace
        .as_deref()
        .unwrap_or("default")
        .into();
    let name: Arc<str> = svc.metadata.name.as_deref().unwrap_or("").into();
    let key = (namespace.clone(), name.clone());
    let annotations = svc.metadata.annotations.as_ref();
    let port_names = port_names(svc);
    let Some(raw) = annotations.and_then(|a| a.get(annotation)) else {
        return Observed::Ignored(key, port_names);
    };
    let id = raw.trim();
    if let Some(problem) = elb_id_problem(id) {
        return Observed::Invalid {
            key,
            problem,
            port_names,
        };
    }
    let class = match annotations
        .and_then(|a| a.get(annotations::ELB_CLASS))
        .map(|s| s.trim())
    {
        Some("union") => ElbClass::Shared,
        Some("performance") => ElbClass::Dedicated,
        _ => ElbClass::Unspecified,
    };
    let mut ports: Vec<u16> = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .map(|ps| {
            ps.iter()
                .filter_map(|p| u16::try_from(p.port).ok())
                .collect()
        })
        .unwrap_or_default();
    ports.sort_unstable();
    ports.dedup();
    Observed::Target(ServiceTarget {
        namespace,
        name,
        uid: svc.metadata.uid.as_deref().unwrap_or("").into(),
        elb_id: id.into(),
        class,
        ports,
        port_names,
    })
}

/// What is wrong with an ELB id annotation's (trimmed) value, if anything.
pub fn elb_id_problem(id: &str) -> Option<Problem> {
    if id.is_empty() {
        Some(Problem::EmptyAnnotation)
    } else if id.contains([',', ' ', ';', '\n', '\t']) {
        Some(Problem::SeveralIds)
    } else if !is_uuid(id) {
        // Sent to the cloud, a malformed id can make it refuse a whole listing of 50 load balancers.
        Some(Problem::InvalidId)
    } else {
        None
    }
}

/// What the watch reports to the inventory.
#[derive(Debug)]
pub enum DiscoveryEvent {
    /// A Service was added or changed (or lost its annotation: `Observed::Ignored`).
    Upsert(Observed),
    /// A Service was deleted.
    Delete(ServiceKey),
    /// A (re-)list finished: this is the complete set for `scope` (one namespace, or all when `None`);
    /// anything else previously seen in that scope is gone.
    Resync {
        /// The namespace listed (`None`: all).
        scope: Option<Arc<str>>,
        /// Every Service of the scope.
        observed: Vec<Observed>,
    },
    /// The watch failed; it retries with backoff by itself.
    Error(&'static str),
    /// The apiserver refused to list or watch `scope` (403): reported, retried with the watch's
    /// backoff, and not waited for by readiness, so the other scopes are collected meanwhile.
    Forbidden {
        /// The namespace refused, or all.
        scope: Scope,
        /// The apiserver's message, for `check` and logs.
        message: String,
    },
    /// From the Ingress watch.
    Ingress(ingress::IngressEvent),
}

/// The kind of Kubernetes object a listener series is attributed to: names its label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Owner {
    /// Labelled `service`.
    Service,
    /// Labelled `ingress`.
    Ingress,
}

impl Owner {
    /// The label carrying the object's name on listener series.
    pub fn label(self) -> &'static str {
        match self {
            Owner::Service => "service",
            Owner::Ingress => "ingress",
        }
    }
}

/// Watches Services (all namespaces, or each listed one) and sends [`DiscoveryEvent`]s until the receiver
/// is dropped. Errors never end it: the watcher retries with exponential backoff.
pub async fn run_watch(
    client: kube::Client,
    namespaces: Vec<String>,
    annotation: String,
    tx: mpsc::Sender<DiscoveryEvent>,
) {
    let streams = scopes(&namespaces).into_iter().map(|scope| {
        let api: Api<Service> = match &scope {
            None => Api::all(client.clone()),
            Some(ns) => Api::namespaced(client.clone(), ns),
        };
        scoped_events(api, scope, annotation.clone()).boxed()
    });
    let mut merged = futures::stream::select_all(streams);
    while let Some(ev) = merged.next().await {
        if tx.send(ev).await.is_err() {
            return;
        }
    }
}

fn scoped_events(
    api: Api<Service>,
    scope: Option<Arc<str>>,
    annotation: String,
) -> impl Stream<Item = DiscoveryEvent> + Send {
    let mut buffer: Option<Vec<Observed>> = None;
    watcher(api, watcher::Config::default())
        .default_backoff()
        .filter_map(move |ev| {
            let out = match ev {
                Ok(watcher::Event::Init) => {
                    buffer = Some(Vec::new());
                    None
                }
                Ok(watcher::Event::InitApply(svc)) => {
                    let o = observe(&svc, &annotation);
                    if o.worth_keeping() {
                        buffer.get_or_insert_with(Vec::new).push(o);
                    }
                    None
                }
                Ok(watcher::Event::InitDone) => {
                    let observed = buffer.take().unwrap_or_default();
                    info!(
                        scope = scope.as_deref().unwrap_or("*"),
                        annotated = observed.len(),
                        "service list synced"
                    );
                    Some(DiscoveryEvent::Resync {
                        scope: scope.clone(),
                        observed,
                    })
                }
                Ok(watcher::Event::Apply(svc)) => {
                    Some(DiscoveryEvent::Upsert(observe(&svc, &annotation)))
                }
                Ok(watcher::Event::Delete(svc)) => {
                    let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
                    let name = svc.metadata.name.as_deref().unwrap_or("");
                    Some(DiscoveryEvent::Delete((ns.into(), name.into())))
                }
                Err(e) => {
                    warn!(
                        scope = scope.as_deref().unwrap_or("*"),
                        error = %e,
                        "service watch failed, retrying with backoff"
                    );
                    Some(match forbidden_message(&e) {
                        Some(message) => DiscoveryEvent::Forbidden {
                            scope: scope.clone(),
                            message,
                        },
                        None => DiscoveryEvent::Error(watch_error_kind(&e)),
                    })
                }
            };
            futures::future::ready(out)
        })
}

/// The apiserver's message when it refused the request for RBAC (403).
fn forbidden_message(e: &watcher::Error) -> Option<String> {
    let status = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s,
        watcher::Error::WatchError(s) => s,
        _ => return None,
    };
    (status.code == 403).then(|| status.message.clone())
}

/// `true` when a direct list (as `check` does) was refused for RBAC.
pub fn is_forbidden(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 403)
}

fn watch_error_kind(e: &watcher::Error) -> &'static str {
    match e {
        watcher::Error::InitialListFailed(_) => "list",
        watcher::Error::WatchStartFailed(_) => "watch_start",
        watcher::Error::WatchError(_) => "watch_status",
        watcher::Error::WatchFailed(_) => "watch_stream",
        _ => "other",
    }
}

#[cfg(all(test, feature = "sim"))]
mod tests {
    use super::*;

    fn svc(annotations: &[(&str, &str)], ports: &[i32]) -> Service {
        crate::sim::fixtures::service("shop", "web", annotations, ports)
    }

    const A: &str = annotations::ELB_ID;

    #[test]
    fn annotated_service_becomes_a_target() {
        let o = observe(
            &svc(
                &[
                    (A, " 2f4c7f6e-3d5a-4b8e-9c1d-0e2f3a4b5c6d "),
                    (annotations::ELB_CLASS, "union"),
                ],
                &[443, 80, 80],
            ),
            A,
        );
        let Observed::Target(t) = o else {
            panic!("{o:?}")
        };
        assert_eq!(&*t.elb_id, "2f4c7f6e-3d5a-4b8e-9c1d-0e2f3a4b5c6d");
        assert_eq!(t.class, ElbClass::Shared);
        assert_eq!(t.ports, vec![80, 443]);
    }

    #[test]
    fn bad_annotations_are_named() {
        let cases = [
            ("", Problem::EmptyAnnotation),
            ("   ", Problem::EmptyAnnotation),
            ("a,b", Problem::SeveralIds),
            ("a b", Problem::SeveralIds),
            ("id\"with\\quote", Problem::InvalidId),
            ("ünïcode", Problem::InvalidId),
            // Letters, digits and dashes, but not a UUID: the cloud may refuse a whole listing for it.
            ("elb-1234", Problem::InvalidId),
            ("2f4c7f6e3d5a4b8e9c1d0e2f3a4b5c6d", Problem::InvalidId),
            ("2f4c7f6e-3d5a-4b8e-9c1d-0e2f3a4b5c6g", Problem::InvalidId),
            ("2f4c7f6e-3d5a-4b8e-9c1d0-e2f3a4b5c6d", Problem::InvalidId),
        ];
        for (value, want) in cases {
            match observe(&svc(&[(A, value)], &[80]), A) {
                Observed::Invalid { problem, .. } => assert_eq!(problem, want, "{value:?}"),
                other => panic!("{value:?}: {other:?}"),
            }
        }
        let long = "a".repeat(65);
        assert!(matches!(
            observe(&svc(&[(A, &long)], &[80]), A),
            Observed::Invalid {
                problem: Problem::InvalidId,
                ..
            }
        ));
        assert!(matches!(
            observe(&svc(&[], &[80]), A),
            Observed::Ignored(..)
        ));
    }
}
