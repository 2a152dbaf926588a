//! The Kubernetes annotation keys CCE defines on Services and Ingresses, spelled once: discovery reads
//! them, config defaults to [`ELB_ID`], the demo and simulator fixtures write them.

/// The ELB a Service or Ingress is bound to, by id (the default `discovery.annotation`).
pub const ELB_ID: &str = "kubernetes.io/elb.id";
/// Ingress: the ELB bound by its private VIP address when no id is given.
pub const ELB_IP: &str = "kubernetes.io/elb.ip";
/// Shared (`union`) or dedicated (`performance`): which listener API version knows the ELB.
pub const ELB_CLASS: &str = "kubernetes.io/elb.class";
/// Ingress: its single listener port, when [`ELB_LISTEN_PORTS`] is absent.
pub const ELB_PORT: &str = "kubernetes.io/elb.port";
/// Ingress: its listener ports as JSON, e.g. `[{"HTTP":80},{"HTTPS":443}]`.
pub const ELB_LISTEN_PORTS: &str = "kubernetes.io/elb.listen-ports";
/// Ingress: `namespace/name` of the Ingress that owns a listener several Ingresses share.
pub const ELB_LISTENER_MASTER_INGRESS: &str = "kubernetes.io/elb.listener-master-ingress";
/// Ingress: the controller class; the exporter reads only CCE's (`cce`).
pub const INGRESS_CLASS: &str = "kubernetes.io/ingress.class";
