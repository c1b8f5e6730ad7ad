//! Where the agent gets workload certificates: the embedded local CA (labs, demos, tests) or
//! Istio's CA (clusters, so that certificates chain to the roots every other ztunnel trusts),
//! when it renews them, and how it backs off when issuing fails.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, RandomState};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_core::identity::SpiffeId;

use crate::ca::{CaError, IssuedCert, LocalCa};
use crate::istio_ca::IstioCaClient;

/// Retries start after about this long...
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// ...double on every failure, and stop growing here, so that a CA back from an outage is used
/// again within a minute.
const MAX_RETRY: Duration = Duration::from_secs(60);

/// How far past halfway a certificate may come due, in thousandths of its remaining time: up
/// to 2%, about half an hour of a day-long certificate, which spreads a burst of renewals over
/// that long. The spread Istio's agent uses (SECRET_GRACE_PERIOD_RATIO_JITTER, ±1% around
/// halfway) but only after halfway, so never earlier than ztunnel renews; and small enough
/// that a short-lived certificate keeps nearly half its time to retry in if the CA is down.
const RENEW_JITTER_PERMILLE: i64 = 20;

/// Both kinds are large (a signing key; a runtime and a connection) and live as long as the
/// agent: boxed, so the enum stays a pointer.
pub enum CertificateAuthority {
    Local(Box<LocalCa>),
    Istio(Box<IstioCaClient>),
}

impl From<LocalCa> for CertificateAuthority {
    fn from(ca: LocalCa) -> Self {
        CertificateAuthority::Local(Box::new(ca))
    }
}

impl From<IstioCaClient> for CertificateAuthority {
    fn from(client: IstioCaClient) -> Self {
        CertificateAuthority::Istio(Box::new(client))
    }
}

impl CertificateAuthority {
    /// A certificate for `id` valid for about `ttl` from `now`. Blocks while a remote CA answers.
    pub fn issue(
        &mut self,
        id: &SpiffeId,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<IssuedCert, CaError> {
        match self {
            CertificateAuthority::Local(ca) => ca.issue(id, now, ttl),
            CertificateAuthority::Istio(client) => Ok(client.issue(id, now, ttl)?),
        }
    }

    /// Re-reads roots that come from a file (Istio's CA: its root ConfigMap, rotated in
    /// place); whether the trust bundle changed and must be republished.
    pub fn reload_roots(&mut self) -> bool {
        match self {
            CertificateAuthority::Local(_) => false,
            CertificateAuthority::Istio(client) => client.reload_file_roots(),
        }
    }

    /// Forgets what was kept for identities no longer on this node.
    pub fn retain_identities(&mut self, wanted: &[SpiffeId]) {
        if let CertificateAuthority::Istio(client) = self {
            client.retain_identities(wanted);
        }
    }

    /// Every root the data plane must trust for this authority's certificates, then `extra`,
    /// each once.
    pub fn trust_roots(&self, extra: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let own = match self {
            CertificateAuthority::Local(ca) => vec![ca.root_der().to_vec()],
            CertificateAuthority::Istio(client) => client.trust_roots(),
        };
        let mut roots: Vec<Vec<u8>> = Vec::with_capacity(own.len() + extra.len());
        for root in own.into_iter().chain(extra.iter().cloned()) {
            if !roots.contains(&root) {
                roots.push(root);
            }
        }
        roots
    }
}

/// When each identity's certificate is due, and when to try again after issuing failed: per
/// identity, and for the whole CA while it cannot be reached (then every identity would fail
/// the same way, each after a connect timeout that would hold up the agent loop). Delays double
/// up to [`MAX_RETRY`], with jitter so that the agents of many nodes do not come back to istiod
/// in step.
#[derive(Default)]
pub struct Renewals {
    /// Unix second from which each held certificate is due for renewal.
    renew_at: BTreeMap<SpiffeId, i64>,
    failures: BTreeMap<SpiffeId, Failure>,
    outage: Option<Failure>,
    jitter: RandomState,
}

struct Failure {
    attempts: u32,
    retry_at: SystemTime,
    /// The last error, to log each distinct problem once.
    problem: String,
}

impl Renewals {
    /// Whether `id` needs a certificate: it holds none, or the one it holds is due.
    pub fn due(&self, id: &SpiffeId, holds_one: bool, now: SystemTime) -> bool {
        !holds_one || self.renew_at.get(id).is_none_or(|at| unix(now) >= *at)
    }

    /// Whether a request for `id` may go out now, or must wait for its backoff.
    pub fn may_try(&self, id: &SpiffeId, now: SystemTime) -> bool {
        let ready = |f: &Failure| now >= f.retry_at;
        self.outage.as_ref().is_none_or(ready) && self.failures.get(id).is_none_or(ready)
    }

    /// Records that issuing for `id` failed and logs it, once per distinct problem.
    /// `current` is the certificate still held for `id`, if any.
    pub fn failed(
        &mut self,
        id: &SpiffeId,
        now: SystemTime,
        error: &CaError,
        current: Option<&IssuedCert>,
    ) {
        let problem = error.to_string();
        let failure = self.failures.entry(id.clone()).or_insert(Failure {
            attempts: 0,
            retry_at: now,
            problem: String::new(),
        });
        failure.attempts = failure.attempts.saturating_add(1);
        let wait = delay(&self.jitter, id, failure.attempts);
        failure.retry_at = now + wait;
        let new_problem = failure.problem != problem;
        failure.problem = problem;
        if error.is_transport() {
            let outage = self.outage.get_or_insert(Failure {
                attempts: 0,
                retry_at: now,
                problem: String::new(),
            });
            outage.attempts = outage.attempts.saturating_add(1);
            outage.retry_at = now + delay(&self.jitter, id, outage.attempts);
        } else {
            // The CA answered: it is reachable, only this identity waits.
            self.outage = None;
        }
        if !new_problem {
            tracing::debug!(identity = %id, %error, retry_in = ?wait, "certificate still not issued");
            return;
        }
        match current {
            Some(cert) => tracing::warn!(identity = %id, %error, retry_in = ?wait,
                valid_until_unix = cert.not_after_unix,
                "certificate renewal failed; the current certificate stays in use while valid"),
            None => tracing::error!(identity = %id, %error, retry_in = ?wait,
                "certificate could not be issued; the workload has no identity until it is"),
        }
    }

    /// Records a certificate issued for `id` at `now`, due at a random point from halfway to
    /// its expiry to [`RENEW_JITTER_PERMILLE`] of its time later, so that the certificates of
    /// one burst (an agent start, nodes restarted together) do not all come due in the same
    /// tick. (Neither the TTL asked for nor not_after - not_before tells how long it was
    /// granted for: a CA may grant less than asked, and the not-before is backdated to absorb
    /// clock skew, which with a short TTL would make every certificate look due on every tick.)
    pub fn issued(&mut self, id: &SpiffeId, now: SystemTime, cert: &IssuedCert) {
        let now = unix(now);
        let left = cert.not_after_unix.saturating_sub(now).max(0);
        // Drawn again at every issue (`now` is hashed too), from this process's random seed:
        // other agents, and this identity's next certificate, draw other points.
        let draw = i64::try_from(self.jitter.hash_one((id, now)) % 1000).unwrap_or(0);
        let jitter =
            i128::from(left) * i128::from(RENEW_JITTER_PERMILLE) * i128::from(draw) / 1_000_000;
        let due_in = left / 2 + i64::try_from(jitter).unwrap_or(0);
        self.renew_at.insert(id.clone(), now.saturating_add(due_in));
        self.outage = None;
        if let Some(failure) = self.failures.remove(id) {
            tracing::info!(identity = %id, failed_attempts = failure.attempts,
                "certificate issued again after failures");
        }
    }

    /// Forgets identities no longer on this node.
    pub fn retain(&mut self, wanted: &[SpiffeId]) {
        self.renew_at.retain(|id, _| wanted.contains(id));
        self.failures.retain(|id, _| wanted.contains(id));
    }
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// `FIRST_RETRY * 2^(attempts - 1)`, at most `MAX_RETRY`, of which a random half is taken off.
fn delay(jitter: &RandomState, id: &SpiffeId, attempts: u32) -> Duration {
    let full = FIRST_RETRY
        .saturating_mul(1 << attempts.saturating_sub(1).min(16))
        .min(MAX_RETRY);
    let fraction = (jitter.hash_one((id, attempts)) % 1000) as u32;
    full / 2 + full / 2 * fraction / 1000
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::istio_ca::{Code, IstioCaError};

    fn id() -> SpiffeId {
        "spiffe://cluster.local/ns/a/sa/b".parse().expect("id")
    }

    #[test]
    fn delays_double_up_to_a_minute_with_at_most_half_taken_off() {
        let jitter = RandomState::new();
        for (attempts, full) in [(1, 1), (2, 2), (3, 4), (6, 32), (7, 60), (40, 60)] {
            let full = Duration::from_secs(full);
            let d = delay(&jitter, &id(), attempts);
            assert!(d >= full / 2 && d <= full, "attempt {attempts}: {d:?}");
        }
    }

    fn granted(now: i64, secs: i64) -> IssuedCert {
        // Backdated two minutes, as Istio's CA does; granted `secs` from now.
        IssuedCert {
            chain: Vec::new(),
            key_pkcs8: Vec::new(),
            not_before_unix: now - 120,
            not_after_unix: now + secs,
        }
    }

    #[test]
    fn a_certificate_is_due_between_halfway_and_two_percent_later_of_what_it_was_granted() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let after = |secs| now + Duration::from_secs(secs);
        // Granted 60 s of the day asked for: due at 30 s or 31 s, whatever the draw.
        for _ in 0..20 {
            let mut renewals = Renewals::default();
            assert!(renewals.due(&id(), false, now), "none held");
            renewals.issued(&id(), now, &granted(1_000_000, 60));
            assert!(!renewals.due(&id(), true, after(29)));
            assert!(renewals.due(&id(), true, after(32)));
            assert!(renewals.due(&id(), false, now), "dropped: due at once");
            renewals.retain(&[]);
            assert!(renewals.due(&id(), true, now), "forgotten: due");
        }
        // A day: not before 12 h, and by 12 h + 2% of a day (28.8 min).
        let mut renewals = Renewals::default();
        renewals.issued(&id(), now, &granted(1_000_000, 86_400));
        assert!(!renewals.due(&id(), true, after(43_199)));
        assert!(renewals.due(&id(), true, after(43_200 + 1_728)));
    }

    #[test]
    fn certificates_issued_together_come_due_spread_over_the_jitter() {
        let mut renewals = Renewals::default();
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let ids: Vec<SpiffeId> = (0..100)
            .map(|i| {
                format!("spiffe://cluster.local/ns/a/sa/sa-{i}")
                    .parse()
                    .expect("id")
            })
            .collect();
        for id in &ids {
            renewals.issued(id, now, &granted(1_000_000, 86_400));
        }
        // Halfway through the 28.8 minutes some are due and some not (all on one side: one
        // chance in 2^99).
        let middle = now + Duration::from_secs(43_200 + 864);
        let due = ids
            .iter()
            .filter(|id| renewals.due(id, true, middle))
            .count();
        assert!(due > 0 && due < ids.len(), "{due} of 100 due at once");
    }

    #[test]
    fn a_failed_identity_waits_and_an_unreachable_ca_holds_back_every_identity() {
        let mut renewals = Renewals::default();
        let other: SpiffeId = "spiffe://cluster.local/ns/a/sa/other".parse().expect("id");
        let now = SystemTime::now();
        let refused = CaError::Istio(IstioCaError::Status {
            code: Code::PERMISSION_DENIED,
            message: "no".into(),
        });
        renewals.failed(&id(), now, &refused, None);
        assert!(!renewals.may_try(&id(), now + Duration::from_millis(400)));
        assert!(renewals.may_try(&id(), now + Duration::from_secs(1)));
        assert!(
            renewals.may_try(&other, now),
            "the CA answered: others go on"
        );

        let down = CaError::Istio(IstioCaError::Unreachable {
            endpoint: "https://istiod:15012".into(),
            problem: "connection refused".into(),
        });
        renewals.failed(&id(), now, &down, None);
        assert!(
            !renewals.may_try(&other, now),
            "nobody tries while the CA is down"
        );
        assert!(renewals.may_try(&other, now + Duration::from_secs(1)));

        let issued = IssuedCert {
            chain: Vec::new(),
            key_pkcs8: Vec::new(),
            not_before_unix: 0,
            not_after_unix: 0,
        };
        renewals.issued(&id(), now, &issued);
        assert!(renewals.may_try(&id(), now));
        assert!(renewals.may_try(&other, now));
    }

    #[test]
    fn trust_roots_list_the_authority_root_then_extra_ones_once() {
        let ca = LocalCa::generate("cluster.local").expect("ca");
        let root = ca.root_der().to_vec();
        let authority = CertificateAuthority::from(ca);
        let other = vec![1, 2, 3];
        assert_eq!(
            authority.trust_roots(&[other.clone(), root.clone(), other.clone()]),
            [root, other]
        );
    }
}
