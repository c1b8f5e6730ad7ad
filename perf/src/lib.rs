//! The perf lab: brings up two simulated nodes (network namespaces joined by a veth pair), two
//! pods per node, one ctrl-agent and one dataplane per node, nftables redirects in the enrolled
//! pods, and drives real traffic through it. The lab binary and the end-to-end tests share it.
#![forbid(unsafe_code)]

pub mod bins;
pub mod cni;
pub mod gen;
pub mod lab;
pub mod load;
pub mod report;
pub mod sys;
pub mod tls_baseline;
