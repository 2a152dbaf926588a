//! elb-exporter: Huawei Cloud ELB listener metrics from Cloud Eye (CES), labelled with the Kubernetes
//! Services that own the load balancers, for Prometheus and the HPA.
//!
//! Data flows one way: `discovery` (Service watch → inventory of targets) → `collector` (CES batches →
//! snapshot) → `exposition` (pre-rendered body) → `server`. `app` wires them; `cli` is the command line.

#![deny(missing_docs)]
#![deny(unreachable_pub)]
#![deny(clippy::print_stdout)]

pub mod annotations;
pub mod app;
// The command line reports to the terminal by design.
#[allow(clippy::print_stdout)]
pub mod cli;
pub mod clock;
pub mod cloud;
pub mod collector;
pub mod config;
#[cfg(feature = "sim")]
#[allow(clippy::print_stdout)]
pub mod demo;
pub mod discovery;
pub mod exposition;
pub mod handover;
pub mod leader;
pub mod logging;
pub mod memory;
pub mod schedule;
pub mod server;
pub mod signer;
/// Test doubles (simulated cloud, fake apiserver, in-memory cloud): the `sim` feature, on by default for
/// `demo`; `--no-default-features` builds the exporter without them.
#[cfg(feature = "sim")]
#[allow(missing_docs)]
pub mod sim;
pub mod telemetry;
