//! Tuning a node for the data plane, for SREs: what to set and why (`profile`), what the node
//! has now against that (`doctor`), which cores run workers and which take NIC interrupts
//! (`planner`), and exact apply/revert of file writes (`state`). Everything reads and writes
//! through a root directory, so tests run it on scratch trees and on real network namespaces.

pub mod doctor;
pub mod planner;
pub mod profile;
pub mod state;
pub mod sysfs;
