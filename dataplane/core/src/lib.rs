//! The deterministic heart of the data plane.
//!
//! Nothing here opens a socket, reads a clock or spawns a task: time comes in as an argument and
//! every decision is a pure function of its inputs, so the rules can be tested exhaustively
//! without a network. The I/O layer (`mesh-io`) drives these pieces.
#![forbid(unsafe_code)]

pub mod authz;
pub mod buffers;
pub mod hbone;
pub mod identity;
pub mod index;
pub mod layered;
pub mod pool;
pub mod redirect;
pub mod socks5;

/// Ports shared with Istio's ztunnel, so NetworkPolicies and dashboards carry over.
pub mod ports {
    pub const OUTBOUND: u16 = 15001;
    pub const INBOUND_PLAINTEXT: u16 = 15006;
    pub const HBONE: u16 = 15008;
    pub const SOCKS5: u16 = 15080;
    pub const ADMIN: u16 = 15000;
    pub const METRICS: u16 = 15020;
    pub const READINESS: u16 = 15021;

    /// The ports the data plane listens on inside every pod. A connection to one of them at a
    /// pod's address would reach the data plane's own listener and be proxied back to it
    /// again, without end; ztunnel refuses the same ports.
    pub const IN_POD_LISTENERS: [u16; 4] = [OUTBOUND, INBOUND_PLAINTEXT, HBONE, SOCKS5];

    /// Whether an inbound connection to `port` would come back to the data plane itself.
    pub fn is_self_call(port: u16) -> bool {
        IN_POD_LISTENERS.contains(&port)
    }
}

/// Packet mark on every socket the data plane opens, so the in-pod redirect rules let its own
/// traffic pass instead of looping it back into the proxy. Same value as ztunnel (1337).
pub const DATAPLANE_MARK: u32 = 0x539;
