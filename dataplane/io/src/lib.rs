//! The data plane's I/O layer: everything that touches the kernel or the network.
pub mod netns;
pub mod sockets;
pub mod tls;
