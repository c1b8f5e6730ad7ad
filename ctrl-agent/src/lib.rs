//! ctrl-agent: the control side of the mesh on one node.
#![forbid(unsafe_code)]

pub mod agent;
pub mod authority;
pub mod ca;
pub mod channel;
pub mod cni_api;
pub mod cni_server;
pub mod config;
pub mod enroll;
pub mod istio_ca;
pub mod kube_source;
pub mod metrics;
pub mod probes;
pub mod source;
pub mod translate;
pub mod uninstall;
