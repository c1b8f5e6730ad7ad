//! Per-worker counters. Each worker writes only its own block (plain load + store, no locked
//! read-modify-write, no cache line shared with another writer); the admin thread reads them all
//! and sums when scraped.

use std::sync::atomic::{AtomicU64, Ordering};

/// A counter or gauge with a single writer.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }
    #[inline]
    pub fn dec(&self) {
        self.0.store(
            self.0.load(Ordering::Relaxed).saturating_sub(1),
            Ordering::Relaxed,
        );
    }
    #[inline]
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

macro_rules! worker_stats {
    ($($(#[doc = $doc:literal])* $name:ident),* $(,)?) => {
        /// One worker's counters, aligned so no two workers share a cache line.
        #[derive(Debug, Default)]
        #[repr(align(128))]
        pub struct WorkerStats {
            $($(#[doc = $doc])* pub $name: Counter,)*
        }

        impl WorkerStats {
            /// Every counter by name, for the admin endpoint.
            pub fn fields(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.get()),)*]
            }
        }
    };
}

worker_stats! {
    /// 1 when this worker runs on io_uring, 0 on epoll.
    driver_io_uring,
    /// Generation of the snapshot this worker serves (gauge).
    snapshot_generation,
    /// Listeners open in pod namespaces (gauge).
    listeners,
    /// Pods whose listeners could not be opened (gauge).
    listener_failures,
    outbound_accepted,
    inbound_hbone_accepted,
    inbound_plaintext_accepted,
    socks5_accepted,
    /// Proxied connections in progress (gauge).
    active_connections,
    /// Outbound connections sent as plain TCP (destination not in the mesh).
    passthrough_connections,
    /// Plain TCP relays reset because no pipe could be made for splice (descriptor limits).
    pipe_failures,
    /// Pipes open for splice, held by relays moving bytes or kept spare (gauge).
    pipes_open,
    /// TLS connections this worker dialled for HBONE pools.
    hbone_connections_dialed,
    /// TLS connections this worker accepted on 15008.
    hbone_connections_accepted,
    /// CONNECT streams sent (client side).
    hbone_streams_opened,
    /// CONNECT streams received (server side).
    hbone_streams_accepted,
    /// CONNECT requests refused with 400.
    hbone_bad_requests,
    /// CONNECT requests that got 503 (upstream unreachable).
    hbone_no_upstream,
    /// Outbound CONNECTs that did not get a 200.
    hbone_connect_refused,
    /// Handshakes refused, all reasons (the tls_refused_* counters split them).
    tls_handshake_failures,
    tls_refused_expired,
    tls_refused_not_yet_valid,
    tls_refused_unknown_issuer,
    tls_refused_trust_domain,
    tls_refused_unexpected_identity,
    tls_refused_no_identity,
    tls_refused_no_client_certificate,
    tls_refused_peer_alert,
    tls_refused_other,
    /// Inbound connections (HBONE streams or plaintext) that policy allowed.
    authz_allowed,
    /// Inbound connections refused by policy (401 for HBONE, closed for plaintext).
    authz_denied,
    /// Live connections closed because a new snapshot's policy denies them.
    authz_closed_live,
    /// Plaintext refused because the destination requires mTLS (PeerAuthentication STRICT).
    plaintext_refused_strict,
    /// Local identities whose certificate was replaced by a newer snapshot.
    certificates_rotated,
    /// Dials of HBONE tunnels that failed (TCP, TLS or h2).
    hbone_dial_failures,
    /// Upstream TCP connects that failed.
    upstream_connect_failures,
    /// Pooled connections open or opening (gauge).
    pool_connections,
    /// Streams in use on pooled connections (gauge).
    pool_streams,
    /// Access-log records dropped because the logger fell behind.
    access_log_dropped,
    /// Bytes from local applications toward the network.
    bytes_sent,
    /// Bytes from the network toward local applications.
    bytes_received,
}

/// The fields above that are gauges (a level, not a running count).
pub const GAUGES: &[&str] = &[
    "driver_io_uring",
    "snapshot_generation",
    "listeners",
    "listener_failures",
    "active_connections",
    "pool_connections",
    "pool_streams",
];

impl WorkerStats {
    /// Counts a refused handshake under its reason.
    pub fn tls_refused(&self, reason: crate::tls::Refusal) {
        use crate::tls::Refusal;
        self.tls_handshake_failures.inc();
        match reason {
            Refusal::Expired => &self.tls_refused_expired,
            Refusal::NotYetValid => &self.tls_refused_not_yet_valid,
            Refusal::UnknownIssuer => &self.tls_refused_unknown_issuer,
            Refusal::TrustDomain => &self.tls_refused_trust_domain,
            Refusal::UnexpectedIdentity => &self.tls_refused_unexpected_identity,
            Refusal::NoIdentity => &self.tls_refused_no_identity,
            Refusal::NoClientCertificate => &self.tls_refused_no_client_certificate,
            Refusal::PeerAlert => &self.tls_refused_peer_alert,
            Refusal::Other => &self.tls_refused_other,
        }
        .inc();
    }
}
