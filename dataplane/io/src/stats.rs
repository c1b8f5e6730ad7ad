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

/// A Prometheus histogram of durations with a single writer: a count per bucket (not
/// cumulative; the scrape adds them up), the sum in microseconds and the count.
#[derive(Debug)]
pub struct DurationHistogram {
    /// Upper bounds in seconds, ascending; a last, unbounded bucket follows.
    bounds: &'static [f64],
    buckets: Box<[Counter]>,
    sum_micros: Counter,
}

impl DurationHistogram {
    pub fn new(bounds: &'static [f64]) -> DurationHistogram {
        DurationHistogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| Counter::default()).collect(),
            sum_micros: Counter::default(),
        }
    }

    pub fn observe(&self, took: std::time::Duration) {
        let seconds = took.as_secs_f64();
        let bucket = self
            .bounds
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(self.bounds.len());
        self.buckets[bucket].inc();
        self.sum_micros
            .add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
    }

    /// Observations so far, and their total.
    pub fn count_and_sum(&self) -> (u64, std::time::Duration) {
        let count = self.buckets.iter().map(Counter::get).sum();
        (
            count,
            std::time::Duration::from_micros(self.sum_micros.get()),
        )
    }

    /// `<family>_bucket`, `_sum` and `_count` lines, each with `labels` (`key="value"`, may be
    /// empty) first. The caller writes the `# TYPE` line once per family.
    pub fn render(&self, family: &str, labels: &str, out: &mut String) {
        use std::fmt::Write as _;
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.get();
            let le = match self.bounds.get(i) {
                Some(bound) => bound.to_string(),
                None => "+Inf".to_owned(),
            };
            let _ = writeln!(
                out,
                "{family}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let seconds = self.sum_micros.get() as f64 / 1e6;
        let labels = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{family}_sum{labels} {seconds}");
        let _ = writeln!(out, "{family}_count{labels} {cumulative}");
    }
}

/// The value of `series` (its name and labels exactly as rendered, e.g.
/// `meshagent_kube_listed{kind="pods"}`) in Prometheus text, as a scraper reads it; `None` if
/// it is not there. For tests and tools that check what an endpoint shows.
pub fn series_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

macro_rules! worker_stats {
    ($($(#[doc = $doc:literal])* $name:ident $(as $kind:ident)?),* $(,)?) => {
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

            /// Whether the counter `name` is a gauge (a level, not a running count): those
            /// marked `as gauge` above.
            pub fn is_gauge(name: &str) -> bool {
                match name {
                    $(stringify!($name) => false $(|| stringify!($kind) == "gauge")?,)*
                    _ => false,
                }
            }
        }
    };
}

worker_stats! {
    /// 1 when this worker runs on io_uring, 0 on epoll.
    driver_io_uring as gauge,
    /// Generation of the snapshot this worker serves (gauge).
    snapshot_generation as gauge,
    /// Listeners open in pod namespaces (gauge).
    listeners as gauge,
    /// Pods whose listeners could not be opened (gauge).
    listener_failures as gauge,
    outbound_accepted,
    inbound_hbone_accepted,
    inbound_plaintext_accepted,
    socks5_accepted,
    /// Proxied connections in progress (gauge).
    active_connections as gauge,
    /// Outbound connections sent as plain TCP (destination not in the mesh).
    passthrough_connections,
    /// Plain TCP relays reset because no pipe could be made for splice (descriptor limits).
    pipe_failures,
    /// Pipes open for splice, held by relays moving bytes or kept spare (gauge).
    pipes_open as gauge,
    /// TLS connections this worker dialled for HBONE pools.
    hbone_connections_dialed,
    /// TLS connections this worker accepted on 15008.
    hbone_connections_accepted,
    /// CONNECT streams sent (client side).
    hbone_streams_opened,
    /// CONNECTs sent again on another tunnel because the peer did not take them on the one
    /// before (it refused the stream, or the tunnel went away first).
    hbone_connect_retries,
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
    /// Inbound connections (HBONE streams or plaintext) to one of the data plane's own in-pod
    /// ports, refused so that they do not loop through it (400 for HBONE, reset for plaintext).
    self_calls_refused,
    /// Local identities whose certificate was replaced by a newer snapshot.
    certificates_rotated,
    /// Dials of HBONE tunnels that failed (TCP, TLS or h2).
    hbone_dial_failures,
    /// Upstream TCP connects that failed.
    upstream_connect_failures,
    /// Connects to a pod's application from a client's address given up after a second
    /// without an answer and tried again from another port: the first port was in use in the
    /// pod's connection tracking (by one of that client's own connections to the application).
    app_connect_retries,
    /// Pooled connections open or opening (gauge).
    pool_connections as gauge,
    /// Streams in use on pooled connections (gauge).
    pool_streams as gauge,
    /// Access-log records dropped because the logger fell behind.
    access_log_dropped,
    /// Bytes from local applications toward the network.
    bytes_sent,
    /// Bytes from the network toward local applications.
    bytes_received,
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_histogram_renders_cumulative_buckets_its_sum_and_its_count() {
        let histogram = DurationHistogram::new(&[0.001, 0.01]);
        for micros in [50, 1000, 2_000, 40_000_000] {
            histogram.observe(Duration::from_micros(micros));
        }
        let mut out = String::new();
        histogram.render("adopt_seconds", "", &mut out);
        assert_eq!(
            out,
            "adopt_seconds_bucket{le=\"0.001\"} 2\n\
             adopt_seconds_bucket{le=\"0.01\"} 3\n\
             adopt_seconds_bucket{le=\"+Inf\"} 4\n\
             adopt_seconds_sum 40.00305\n\
             adopt_seconds_count 4\n"
        );
        let mut out = String::new();
        histogram.render("adopt_seconds", "kind=\"full\"", &mut out);
        assert!(
            out.starts_with("adopt_seconds_bucket{kind=\"full\",le=\"0.001\"} 2\n"),
            "{out}"
        );
        assert!(
            out.ends_with("adopt_seconds_count{kind=\"full\"} 4\n"),
            "{out}"
        );
        assert_eq!(
            histogram.count_and_sum(),
            (4, Duration::from_micros(40_003_050))
        );
    }
}
