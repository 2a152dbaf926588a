//! elb-exporter: Huawei Cloud ELB listener metrics from Cloud Eye (CES), labelled with the Kubernetes
//! Services that own the load balancers, for Prometheus and the HPA.
//!
//! Data flows one way: `discovery` (Service watch) → targets → `collector` (CES batches) → snapshot →
//! `exposition` (pre-rendered body) → `server`.

pub mod cloud;
pub mod config;
pub mod signer;
pub mod sim;
pub mod telemetry;
