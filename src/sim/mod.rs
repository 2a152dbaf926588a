//! In-repo stand-ins for the outside world, used by tests, the `demo` command and the benchmarks:
//! a simulated Huawei Cloud (`cloud`) and a fake Kubernetes API server (`kube`).

pub mod cloud;
pub mod fake;
pub mod fixtures;
pub mod kube;
pub mod publication;
