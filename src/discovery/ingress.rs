//! CCE ELB Ingresses (`networking.k8s.io/v1`, class `cce`): what the exporter keeps of each one, the
//! watch that reports them, and the attribution of their ELB listeners (one Ingress per listener: the
//! listener master, else the oldest; the others are reported `shared_listener`).
//!
//! Binding: `kubernetes.io/elb.id`; else `kubernetes.io/elb.ip`, looked up by `vip_address`; else CCE's
//! auto-created ELB named `cce-lb-<ingress uid>` (the [`Binder`], from the v3 load balancer listing). An
//! Ingress none of these binds is reported `ingress_unbound` and retried.

use super::{DiscoveryEvent, ElbClass, Problem, Scope, forbidden_message};
use crate::annotations;
use crate::cloud::{CloudApi, ElbVersion, Lane, Listener, LoadBalancer};
use futures::{Stream, StreamExt};
use k8s_openapi::api::networking::v1::Ingress;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};

/// The `kubernetes.io/ingress.class` of CCE's ELB Ingress controller: other classes are ignored.
pub const CCE_CLASS: &str = "cce";

/// (namespace, name) of an Ingress.
pub type IngressKey = (Arc<str>, Arc<str>);

/// What the exporter keeps of a CCE Ingress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressTarget {
    /// The Ingress's namespace.
    pub namespace: Arc<str>,
    /// The Ingress's name, the `ingress` label of its listeners.
    pub name: Arc<str>,
    /// `metadata.uid`: names CCE's auto-created ELB and labels `elb_exporter_pool_info`.
    pub uid: Arc<str>,
    /// `metadata.creationTimestamp`, seconds: the oldest Ingress owns a shared listener.
    pub created: i64,
    /// The bound ELB (empty while unbound).
    pub elb_id: Arc<str>,
    /// Which listener API knows the ELB.
    pub class: ElbClass,
    /// ELB listener ports, sorted, deduplicated.
    pub ports: Vec<u16>,
    /// `<namespace>/<name>` of the listener master CCE named on this Ingress, if any.
    pub master: Option<String>,
    /// Backend Services (name, numeric port) of `spec.rules[].http.paths[]` and `defaultBackend`,
    /// sorted, deduplicated.
    pub backends: Vec<(Arc<str>, u16)>,
    /// Backends that name their Service port (`port.name`): (Service, port name), sorted,
    /// deduplicated. The inventory resolves them through the Service's `spec.ports[]`.
    pub named_backends: Vec<(Arc<str>, Arc<str>)>,
}

impl IngressTarget {
    /// (namespace, name): how events and the inventory refer to it.
    pub fn key(&self) -> IngressKey {
        (self.namespace.clone(), self.name.clone())
    }
}

/// How an Ingress without `kubernetes.io/elb.id` names its ELB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    /// `kubernetes.io/elb.ip`: the ELB's `vip_address`.
    Ip(Arc<str>),
    /// An auto-created ELB: `cce-lb-<ingress uid>`.
    Name(Arc<str>),
}

/// The exporter's view of a watched Ingress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObservedIngress {
    /// A CCE Ingress bound to its ELB.
    Target(IngressTarget),
    /// Everything but the ELB id (empty), which the [`Binder`] looks up.
    Unbound(IngressTarget, Binding),
    /// A CCE Ingress the exporter cannot bind or read.
    Invalid {
        /// (namespace, name).
        key: IngressKey,
        /// Why it cannot be exported.
        problem: Problem,
    },
    /// Another class: not ours.
    Ignored(IngressKey),
}

impl ObservedIngress {
    /// (namespace, name) of the Ingress, whatever its state.
    pub fn key(&self) -> IngressKey {
        match self {
            ObservedIngress::Target(t) | ObservedIngress::Unbound(t, _) => t.key(),
            ObservedIngress::Invalid { key, .. } | ObservedIngress::Ignored(key) => key.clone(),
        }
    }

    /// What the inventory keeps: an Ingress still unbound is a problem to report.
    fn settled(self) -> ObservedIngress {
        match self {
            ObservedIngress::Unbound(t, _) => ObservedIngress::Invalid {
                key: t.key(),
                problem: Problem::IngressUnbound,
            },
            o => o,
        }
    }
}

/// What the Ingress watch reports to the inventory.
#[derive(Debug)]
pub enum IngressEvent {
    /// An Ingress was added or changed.
    Upsert(ObservedIngress),
    /// An Ingress was deleted.
    Delete(IngressKey),
    /// The complete set for `scope` after a (re-)list.
    Resync {
        /// The namespace listed, or all.
        scope: Scope,
        /// Every Ingress of the scope.
        observed: Vec<ObservedIngress>,
    },
    /// RBAC refuses Ingresses in `scope`: Services are unaffected.
    Forbidden {
        /// The namespace refused, or all.
        scope: Scope,
        /// The apiserver's message, for `check` and logs.
        message: String,
    },
}

/// Listener ports from `kubernetes.io/elb.listen-ports` (JSON list of `{"PROTOCOL": port}`), else
/// `kubernetes.io/elb.port`, else 80 (443 with TLS). `Err` names the annotation that is unusable.
pub fn listener_ports(
    annotations: Option<&BTreeMap<String, String>>,
    tls: bool,
) -> Result<Vec<u16>, &'static str> {
    let get = |k: &str| annotations.and_then(|a| a.get(k)).map(|s| s.trim());
    if let Some(raw) = get(annotations::ELB_LISTEN_PORTS).filter(|s| !s.is_empty()) {
        let parsed: Vec<BTreeMap<String, u64>> =
            serde_json::from_str(raw).map_err(|_| annotations::ELB_LISTEN_PORTS)?;
        let mut ports = Vec::new();
        for entry in parsed {
            for port in entry.into_values() {
                match u16::try_from(port) {
                    Ok(p) if p > 0 => ports.push(p),
                    _ => return Err(annotations::ELB_LISTEN_PORTS),
                }
            }
        }
        ports.sort_unstable();
        ports.dedup();
        return if ports.is_empty() {
            Err(annotations::ELB_LISTEN_PORTS)
        } else {
            Ok(ports)
        };
    }
    if let Some(raw) = get(annotations::ELB_PORT) {
        return match raw.parse::<u16>() {
            Ok(p) if p > 0 => Ok(vec![p]),
            _ => Err(annotations::ELB_PORT),
        };
    }
    Ok(vec![if tls { 443 } else { 80 }])
}

/// `true` for an Ingress of class `cce` (spec.ingressClassName, or the pre-1.23 annotation).
pub fn is_cce(ing: &Ingress) -> bool {
    let by_spec = ing
        .spec
        .as_ref()
        .and_then(|s| s.ingress_class_name.as_deref())
        .map(str::trim);
    let by_annotation = ing
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(annotations::INGRESS_CLASS))
        .map(|s| s.trim());
    by_spec.or(by_annotation) == Some(CCE_CLASS)
}

/// Reads the class, ELB binding and ports of an Ingress.
pub fn observe(ing: &Ingress) -> ObservedIngress {
    let namespace: Arc<str> = ing
        .metadata
        .namespace
        .as_deref()
        .unwrap_or("default")
        .into();
    let name: Arc<str> = ing.metadata.name.as_deref().unwrap_or("").into();
    let key = (namespace.clone(), name.clone());
    if !is_cce(ing) {
        return ObservedIngress::Ignored(key);
    }
    let annotations = ing.metadata.annotations.as_ref();
    let get = |k: &str| annotations.and_then(|a| a.get(k)).map(|s| s.trim());
    let uid = ing.metadata.uid.as_deref().unwrap_or("");
    let (elb_id, binding) = match (get(annotations::ELB_ID), get(annotations::ELB_IP)) {
        (Some(id), _) if !id.is_empty() => match super::elb_id_problem(id) {
            Some(problem) => return ObservedIngress::Invalid { key, problem },
            None => (id, None),
        },
        (_, Some(ip)) if !ip.is_empty() => ("", Some(Binding::Ip(ip.into()))),
        _ if !uid.is_empty() => ("", Some(Binding::Name(format!("cce-lb-{uid}").into()))),
        _ => {
            return ObservedIngress::Invalid {
                key,
                problem: Problem::IngressUnbound,
            };
        }
    };
    let tls = ing
        .spec
        .as_ref()
        .and_then(|s| s.tls.as_ref())
        .is_some_and(|t| !t.is_empty());
    let Ok(ports) = listener_ports(annotations, tls) else {
        return ObservedIngress::Invalid {
            key,
            problem: Problem::IngressBadPorts,
        };
    };
    let class = match get(annotations::ELB_CLASS) {
        Some("union") => ElbClass::Shared,
        Some("performance") => ElbClass::Dedicated,
        _ => ElbClass::Unspecified,
    };
    let (backends, named_backends) = backends(ing);
    let target = IngressTarget {
        namespace,
        name,
        uid: uid.into(),
        created: ing
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(i64::MAX, |t| t.0.as_second()),
        elb_id: elb_id.into(),
        class,
        ports,
        master: get(annotations::ELB_LISTENER_MASTER_INGRESS)
            .filter(|m| !m.is_empty())
            .map(str::to_owned),
        backends,
        named_backends,
    };
    match binding {
        None => ObservedIngress::Target(target),
        Some(b) => ObservedIngress::Unbound(target, b),
    }
}

/// The Ingress's own backend Services: those with numeric ports, and those naming their port.
#[allow(clippy::type_complexity)]
pub fn backends(ing: &Ingress) -> (Vec<(Arc<str>, u16)>, Vec<(Arc<str>, Arc<str>)>) {
    let (mut numbered, mut named) = (Vec::new(), Vec::new());
    let Some(spec) = ing.spec.as_ref() else {
        return (numbered, named);
    };
    let paths = spec
        .rules
        .iter()
        .flatten()
        .filter_map(|r| r.http.as_ref())
        .flat_map(|h| h.paths.iter().map(|p| &p.backend));
    for s in paths
        .chain(spec.default_backend.as_ref())
        .filter_map(|b| b.service.as_ref())
    {
        let Some(port) = s.port.as_ref() else {
            continue;
        };
        let service = Arc::from(s.name.as_str());
        match (port.number, port.name.as_deref()) {
            (Some(n), _) => {
                if let Ok(n) = u16::try_from(n) {
                    numbered.push((service, n));
                }
            }
            (None, Some(name)) if !name.is_empty() => named.push((service, Arc::from(name))),
            _ => {}
        }
    }
    numbered.sort();
    numbered.dedup();
    named.sort();
    named.dedup();
    (numbered, named)
}

/// The Ingresses known to the inventory, by key.
#[derive(Debug, Default)]
pub struct IngressBook {
    /// Every watched Ingress, usable or not.
    pub ingresses: HashMap<IngressKey, ObservedIngress>,
    /// Scopes whose Ingress list RBAC refuses.
    pub forbidden: BTreeMap<Scope, String>,
    /// Scopes that have answered once (a list or a refusal): readiness waits for each.
    pub answered: HashSet<Scope>,
}

impl IngressBook {
    /// Applies an event; returns whether anything changed.
    pub fn apply(&mut self, ev: IngressEvent) -> bool {
        match ev {
            IngressEvent::Upsert(ObservedIngress::Ignored(key)) | IngressEvent::Delete(key) => {
                let removed = self.ingresses.remove(&key).is_some();
                if removed {
                    info!(namespace = %key.0, ingress = %key.1, "ingress gone");
                }
                removed
            }
            IngressEvent::Upsert(o) => {
                let o = o.settled();
                let key = o.key();
                self.ingresses.insert(key, o.clone()) != Some(o)
            }
            IngressEvent::Resync { scope, observed } => {
                let keep: HashSet<IngressKey> = observed.iter().map(ObservedIngress::key).collect();
                self.ingresses
                    .retain(|k, _| scope.as_ref().is_some_and(|ns| *ns != k.0) || keep.contains(k));
                for o in observed {
                    self.ingresses.insert(o.key(), o.settled());
                }
                self.forbidden.remove(&scope);
                self.answered.insert(scope);
                true
            }
            IngressEvent::Forbidden { scope, message } => {
                // A refusal counts as an answer, and as a change the first time.
                let first = self.answered.insert(scope.clone());
                let new = self.forbidden.insert(scope.clone(), message.clone()) != Some(message);
                if new {
                    warn!(
                        scope = super::scope_name(&scope),
                        "RBAC forbids listing ingresses here; services are still collected"
                    );
                }
                new || first
            }
        }
    }

    /// ELBs the Ingresses name, with their class.
    pub fn elbs(&self) -> impl Iterator<Item = (&Arc<str>, ElbClass)> {
        self.ingresses.values().filter_map(|o| match o {
            ObservedIngress::Target(t) => Some((&t.elb_id, t.class)),
            _ => None,
        })
    }
}

/// One Ingress listener attributed to its owning Ingress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressListener<'a> {
    /// The owning Ingress.
    pub ingress: &'a IngressTarget,
    /// Its ELB listener.
    pub listener: &'a Listener,
}

/// Every Ingress on one listener, oldest first: the pools behind it are attributed among them.
#[derive(Debug, Clone)]
pub struct ListenerRoutes<'a> {
    /// The shared listener.
    pub listener: &'a Listener,
    /// Every Ingress routed through it, oldest first.
    pub ingresses: Vec<&'a IngressTarget>,
}

/// What attribution found: the owned listeners, every Ingress listener's routes, and each Ingress's
/// problems.
#[derive(Debug, Default)]
pub struct Attribution<'a> {
    /// Each listener with the one Ingress that owns it (exported with its labels).
    pub owned: Vec<IngressListener<'a>>,
    /// Each listener with every Ingress on it (input of pool attribution).
    pub routes: Vec<ListenerRoutes<'a>>,
    /// Per Ingress: the reason and a sentence for `check` and logs.
    pub problems: Vec<(IngressKey, Problem, String)>,
}

/// Attributes every Ingress listener to one Ingress: CCE's listener master when an Ingress on that
/// listener names one of them, else the oldest (creation time, then namespace/name). `listeners`
/// gives an ELB's resolved listeners, `Err(None)` while it is being looked up (nothing to report yet) or
/// `Err(Some(problem))` when the lookup found nothing or failed.
pub fn attribute<'a>(
    book: &'a IngressBook,
    listeners: impl Fn(&str) -> Result<&'a [Listener], Option<Problem>>,
) -> Attribution<'a> {
    let mut out = Attribution::default();
    let mut by_listener: BTreeMap<&str, (&Listener, Vec<&IngressTarget>)> = BTreeMap::new();
    let mut targets: Vec<&IngressTarget> = Vec::new();
    for o in book.ingresses.values() {
        match o {
            ObservedIngress::Target(t) => targets.push(t),
            ObservedIngress::Invalid { key, problem } => {
                out.problems
                    .push((key.clone(), *problem, problem.describe().to_owned()));
            }
            ObservedIngress::Unbound(t, _) => {
                let p = Problem::IngressUnbound;
                out.problems.push((t.key(), p, p.describe().to_owned()));
            }
            ObservedIngress::Ignored(_) => {}
        }
    }
    targets.sort_by(|a, b| {
        (a.created, &a.namespace, &a.name).cmp(&(b.created, &b.namespace, &b.name))
    });
    for t in targets {
        let ls = match listeners(&t.elb_id) {
            Ok(ls) => ls,
            Err(None) => continue,
            Err(Some(p)) => {
                out.problems.push((t.key(), p, p.describe().to_owned()));
                continue;
            }
        };
        for &port in &t.ports {
            match ls.iter().find(|l| l.port == port) {
                Some(l) => by_listener
                    .entry(&l.id)
                    .or_insert((l, Vec::new()))
                    .1
                    .push(t),
                None => out.problems.push((
                    t.key(),
                    Problem::PortWithoutListener,
                    format!("port {port} has no listener on ELB {}", t.elb_id),
                )),
            }
        }
    }
    for (_, (listener, sharing)) in by_listener {
        let named = |t: &&&IngressTarget| {
            sharing
                .iter()
                .any(|s| s.master.as_deref() == Some(&format!("{}/{}", t.namespace, t.name)))
        };
        let owner = sharing.iter().find(named).or(sharing.first()).copied();
        for t in &sharing {
            if Some(*t) == owner {
                out.owned.push(IngressListener {
                    ingress: t,
                    listener,
                });
            } else if let Some(o) = owner {
                out.problems.push((
                    t.key(),
                    Problem::SharedListener,
                    format!(
                        "listener {} (port {}) is attributed to ingress {}/{}",
                        listener.id, listener.port, o.namespace, o.name
                    ),
                ));
            }
        }
        out.routes.push(ListenerRoutes {
            listener,
            ingresses: sharing,
        });
    }
    out
}

/// Watches Ingresses (all namespaces, or each listed one) and sends their events to the [`Binder`].
pub async fn run_watch(
    client: kube::Client,
    namespaces: Vec<String>,
    tx: mpsc::Sender<IngressEvent>,
) {
    let streams = super::scopes(&namespaces).into_iter().map(|scope| {
        let api: Api<Ingress> = match &scope {
            None => Api::all(client.clone()),
            Some(ns) => Api::namespaced(client.clone(), ns),
        };
        scoped_events(api, scope).boxed()
    });
    let mut merged = futures::stream::select_all(streams);
    while let Some(ev) = merged.next().await {
        if tx.send(ev).await.is_err() {
            return;
        }
    }
}

/// The shortest time between two load balancer listings triggered by Ingress events.
const RELIST_MIN: Duration = Duration::from_secs(2);
/// How often Ingresses that are still unbound are looked up again.
const BIND_RETRY: Duration = Duration::from_secs(30);

/// Binds Ingresses that name their ELB by VIP address or by CCE's auto-created name, from the v3 load
/// balancer listing (re-listed at most every [`RELIST_MIN`] on Ingress events, and every [`BIND_RETRY`]
/// while some Ingress is unbound).
pub struct Binder<C: CloudApi> {
    cloud: Arc<C>,
    lbs: Vec<LoadBalancer>,
    listed: Option<Instant>,
    unbound: HashMap<IngressKey, ObservedIngress>,
}

impl<C: CloudApi> Binder<C> {
    /// A binder with no load balancer listed yet.
    pub fn new(cloud: Arc<C>) -> Self {
        Binder {
            cloud,
            lbs: Vec::new(),
            listed: None,
            unbound: HashMap::new(),
        }
    }

    /// The event with each Ingress bound when a load balancer matches.
    pub async fn bind(&mut self, ev: IngressEvent) -> IngressEvent {
        match ev {
            IngressEvent::Upsert(o) => IngressEvent::Upsert(self.bind_one(o).await),
            IngressEvent::Delete(key) => {
                self.unbound.remove(&key);
                IngressEvent::Delete(key)
            }
            IngressEvent::Resync { scope, observed } => {
                let keep: HashSet<IngressKey> = observed.iter().map(ObservedIngress::key).collect();
                self.unbound
                    .retain(|k, _| scope.as_ref().is_some_and(|ns| *ns != k.0) || keep.contains(k));
                let mut bound = Vec::with_capacity(observed.len());
                for o in observed {
                    bound.push(self.bind_one(o).await);
                }
                IngressEvent::Resync {
                    scope,
                    observed: bound,
                }
            }
            other => other,
        }
    }

    async fn bind_one(&mut self, o: ObservedIngress) -> ObservedIngress {
        if !matches!(o, ObservedIngress::Unbound(..)) {
            self.unbound.remove(&o.key());
            return o;
        }
        let stale = self.listed.is_none_or(|t| t.elapsed() >= RELIST_MIN);
        if resolve(&o, &self.lbs).is_none() && stale {
            self.relist().await;
        }
        match resolve(&o, &self.lbs) {
            Some(bound) => {
                self.unbound.remove(&o.key());
                bound
            }
            None => {
                self.unbound.insert(o.key(), o.clone());
                o
            }
        }
    }

    async fn relist(&mut self) {
        self.listed = Some(Instant::now());
        let listing = self
            .cloud
            .list_loadbalancers(ElbVersion::V3, None, Lane::Priority, u32::MAX)
            .await;
        match listing {
            Ok(l) => self.lbs = l.lbs,
            Err(e) => {
                warn!(error = %e, "load balancer listing failed; unbound ingresses are retried")
            }
        }
    }

    /// Looks the unbound Ingresses up again; returns those that bind now.
    pub async fn retry(&mut self) -> Vec<IngressEvent> {
        if self.unbound.is_empty() {
            return Vec::new();
        }
        self.relist().await;
        let bound: Vec<ObservedIngress> = self
            .unbound
            .values()
            .filter_map(|o| resolve(o, &self.lbs))
            .collect();
        for b in &bound {
            self.unbound.remove(&b.key());
        }
        bound.into_iter().map(IngressEvent::Upsert).collect()
    }
}

/// An unbound Ingress bound to the load balancer its binding names, if one does.
fn resolve(o: &ObservedIngress, lbs: &[LoadBalancer]) -> Option<ObservedIngress> {
    let ObservedIngress::Unbound(t, binding) = o else {
        return None;
    };
    let lb = lbs.iter().find(|lb| match binding {
        Binding::Ip(ip) => lb.vip_address == **ip,
        Binding::Name(name) => lb.name == **name,
    })?;
    let class = match (t.class, lb.guaranteed) {
        (ElbClass::Unspecified, Some(true)) => ElbClass::Dedicated,
        (ElbClass::Unspecified, Some(false)) => ElbClass::Shared,
        (c, _) => c,
    };
    Some(ObservedIngress::Target(IngressTarget {
        elb_id: lb.id.as_str().into(),
        class,
        ..t.clone()
    }))
}

/// Binds the Ingress watch's events and hands them to the inventory, until either side closes.
pub async fn run_binder<C: CloudApi>(
    cloud: Arc<C>,
    mut rx: mpsc::Receiver<IngressEvent>,
    tx: mpsc::Sender<DiscoveryEvent>,
) {
    let mut binder = Binder::new(cloud);
    let mut tick = tokio::time::interval(BIND_RETRY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let out = tokio::select! {
            ev = rx.recv() => match ev {
                Some(ev) => vec![binder.bind(ev).await],
                None => return,
            },
            _ = tick.tick() => binder.retry().await,
        };
        for ev in out {
            if tx.send(DiscoveryEvent::Ingress(ev)).await.is_err() {
                return;
            }
        }
    }
}

fn scoped_events(api: Api<Ingress>, scope: Scope) -> impl Stream<Item = IngressEvent> + Send {
    let mut buffer: Option<Vec<ObservedIngress>> = None;
    watcher(api, watcher::Config::default())
        .default_backoff()
        .filter_map(move |ev| {
            let out = match ev {
                Ok(watcher::Event::Init) => {
                    buffer = Some(Vec::new());
                    None
                }
                Ok(watcher::Event::InitApply(ing)) => {
                    let o = observe(&ing);
                    if !matches!(o, ObservedIngress::Ignored(_)) {
                        buffer.get_or_insert_with(Vec::new).push(o);
                    }
                    None
                }
                Ok(watcher::Event::InitDone) => {
                    let observed = buffer.take().unwrap_or_default();
                    info!(scope = super::scope_name(&scope), cce = observed.len(), "ingress list synced");
                    Some(IngressEvent::Resync {
                        scope: scope.clone(),
                        observed,
                    })
                }
                Ok(watcher::Event::Apply(ing)) => Some(IngressEvent::Upsert(observe(&ing))),
                Ok(watcher::Event::Delete(ing)) => Some(IngressEvent::Delete((
                    ing.metadata.namespace.as_deref().unwrap_or("default").into(),
                    ing.metadata.name.as_deref().unwrap_or("").into(),
                ))),
                Err(e) => {
                    warn!(scope = super::scope_name(&scope), error = %e, "ingress watch failed, retrying with backoff");
                    forbidden_message(&e).map(|message| IngressEvent::Forbidden {
                        scope: scope.clone(),
                        message,
                    })
                }
            };
            futures::future::ready(out)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn listener_ports_follow_cce_priority() {
        let both = ann(&[
            (
                annotations::ELB_LISTEN_PORTS,
                r#"[{"HTTP":80},{"HTTPS":443}]"#,
            ),
            (annotations::ELB_PORT, "8080"),
        ]);
        assert_eq!(listener_ports(Some(&both), false), Ok(vec![80, 443]));
        let port = ann(&[(annotations::ELB_PORT, " 8080 ")]);
        assert_eq!(listener_ports(Some(&port), true), Ok(vec![8080]));
        assert_eq!(listener_ports(None, false), Ok(vec![80]));
        assert_eq!(listener_ports(None, true), Ok(vec![443]));
        for bad in [r#"[{"HTTP":70000}]"#, "80", "[]", r#"[{"HTTP":0}]"#] {
            let a = ann(&[(annotations::ELB_LISTEN_PORTS, bad)]);
            assert_eq!(
                listener_ports(Some(&a), false),
                Err(annotations::ELB_LISTEN_PORTS),
                "{bad}"
            );
        }
        let a = ann(&[(annotations::ELB_PORT, "http")]);
        assert_eq!(listener_ports(Some(&a), false), Err(annotations::ELB_PORT));
    }

    fn ingress(name: &str, created: i64, master: Option<&str>) -> ObservedIngress {
        ObservedIngress::Target(IngressTarget {
            namespace: "shop".into(),
            name: name.into(),
            uid: format!("uid-{name}").into(),
            created,
            elb_id: "elb".into(),
            class: ElbClass::Dedicated,
            ports: vec![80],
            master: master.map(str::to_owned),
            backends: Vec::new(),
            named_backends: Vec::new(),
        })
    }

    fn book(items: Vec<ObservedIngress>) -> IngressBook {
        let mut b = IngressBook::default();
        for o in items {
            b.apply(IngressEvent::Upsert(o));
        }
        b
    }

    #[test]
    fn a_shared_listener_goes_to_the_master_else_the_oldest() {
        let listeners = vec![Listener {
            id: "l80".into(),
            name: "k8s_HTTP_80".into(),
            protocol: "HTTP".into(),
            port: 80,
        }];
        let lookup = |_: &str| Ok(listeners.as_slice());
        let oldest = book(vec![ingress("b", 10, None), ingress("a", 20, None)]);
        let a = attribute(&oldest, lookup);
        assert_eq!(a.owned.len(), 1);
        assert_eq!(&*a.owned[0].ingress.name, "b");
        assert_eq!(a.problems.len(), 1);
        assert_eq!(
            (&*a.problems[0].0.1, a.problems[0].1),
            ("a", Problem::SharedListener)
        );

        let mastered = book(vec![
            ingress("b", 10, Some("shop/a")),
            ingress("a", 20, Some("shop/a")),
        ]);
        let a = attribute(&mastered, lookup);
        assert_eq!(&*a.owned[0].ingress.name, "a");
        assert_eq!(&*a.problems[0].0.1, "b");
    }

    #[test]
    fn class_and_binding_are_read() {
        use k8s_openapi::api::networking::v1::IngressSpec;
        let mut ing = Ingress::default();
        ing.metadata.name = Some("web".into());
        ing.metadata.annotations = Some(ann(&[(
            annotations::ELB_ID,
            "11111111-1111-4111-8111-111111111111",
        )]));
        assert!(matches!(observe(&ing), ObservedIngress::Ignored(_)));
        ing.spec = Some(IngressSpec {
            ingress_class_name: Some("cce".into()),
            ..IngressSpec::default()
        });
        let ObservedIngress::Target(t) = observe(&ing) else {
            panic!("not a target")
        };
        assert_eq!(
            (&*t.elb_id, t.ports.as_slice()),
            ("11111111-1111-4111-8111-111111111111", &[80u16][..])
        );
        ing.metadata.annotations = Some(ann(&[(annotations::ELB_IP, "192.168.0.9")]));
        assert!(matches!(
            observe(&ing),
            ObservedIngress::Unbound(_, Binding::Ip(ip)) if &*ip == "192.168.0.9"
        ));
        ing.metadata.annotations = None;
        ing.metadata.uid = Some("u-1".into());
        assert!(matches!(
            observe(&ing),
            ObservedIngress::Unbound(_, Binding::Name(n)) if &*n == "cce-lb-u-1"
        ));
        ing.spec = None;
        ing.metadata.annotations = Some(ann(&[
            (annotations::INGRESS_CLASS, "cce"),
            (annotations::ELB_ID, "11111111-1111-4111-8111-111111111111"),
            (annotations::ELB_PORT, "x"),
        ]));
        assert!(matches!(
            observe(&ing),
            ObservedIngress::Invalid {
                problem: Problem::IngressBadPorts,
                ..
            }
        ));
    }
}
