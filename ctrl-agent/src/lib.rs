//! ctrl-agent: the control side of the mesh on one node.
#![forbid(unsafe_code)]

pub mod agent;
pub mod ca;
pub mod config;
pub mod translate;
