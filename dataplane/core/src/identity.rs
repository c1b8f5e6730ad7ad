//! SPIFFE workload identities as Istio writes them: `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// A workload identity. Only the Istio form is accepted: extra path segments, queries and
/// fragments are errors, because a looser parser would let two spellings name one principal.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// `<trust-domain>/ns/<namespace>/sa/<service-account>`: the form Istio policies name
    /// principals in, kept whole so matching needs no allocation; shared, because every pod of
    /// a service account carries the same one.
    principal: Arc<str>,
    namespace_at: usize,
    account_at: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpiffeIdError {
    #[error("identity is longer than 2048 bytes")]
    TooLong,
    #[error("identity must start with spiffe://")]
    Scheme,
    #[error("trust domain {0:?} is empty or has characters other than a-z 0-9 . - _")]
    TrustDomain(String),
    #[error("path must be /ns/<namespace>/sa/<service-account>, found {0:?}")]
    Path(String),
    #[error("{field} {value:?} is empty or has characters outside a DNS label or name")]
    Segment { field: &'static str, value: String },
}

impl SpiffeId {
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        Self::check(trust_domain, namespace, service_account)?;
        let namespace_at = trust_domain.len() + "/ns/".len();
        let account_at = namespace_at + namespace.len() + "/sa/".len();
        Ok(SpiffeId {
            principal: format!("{trust_domain}/ns/{namespace}/sa/{service_account}").into(),
            namespace_at,
            account_at,
        })
    }

    /// Whether `new` would accept these parts, without building the identity.
    pub fn check(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<(), SpiffeIdError> {
        check_trust_domain(trust_domain)?;
        check_segment("namespace", namespace)?;
        check_segment("service account", service_account)
    }

    pub fn trust_domain(&self) -> &str {
        &self.principal[..self.namespace_at - "/ns/".len()]
    }
    pub fn namespace(&self) -> &str {
        &self.principal[self.namespace_at..self.account_at - "/sa/".len()]
    }
    pub fn service_account(&self) -> &str {
        &self.principal[self.account_at..]
    }
    /// The identity as Istio policies write principals: without the `spiffe://` scheme.
    pub fn principal(&self) -> &str {
        &self.principal
    }
}

fn check_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    let ok = !td.is_empty()
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SpiffeIdError::TrustDomain(td.to_owned()))
    }
}

fn check_segment(field: &'static str, value: &str) -> Result<(), SpiffeIdError> {
    // Kubernetes names: DNS-1123 subdomain characters. '%' and '/' would allow aliasing.
    let ok = !value.is_empty()
        && value.len() <= 253
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SpiffeIdError::Segment {
            field,
            value: value.to_owned(),
        })
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > 2048 {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s.strip_prefix("spiffe://").ok_or(SpiffeIdError::Scheme)?;
        let (td, path) = rest
            .split_once('/')
            .ok_or_else(|| SpiffeIdError::Path(String::new()))?;
        check_trust_domain(td)?;
        let mut parts = path.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => SpiffeId::new(td, ns, sa),
            _ => Err(SpiffeIdError::Path(format!("/{path}"))),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}", self.principal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_istio_form_and_round_trips() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
            .parse()
            .expect("valid id");
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "bookinfo-productpage");
        assert_eq!(
            id.principal(),
            "cluster.local/ns/default/sa/bookinfo-productpage"
        );
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
        );
    }

    #[test]
    fn rejects_everything_that_is_not_exactly_the_istio_form() {
        let cases = [
            ("http://cluster.local/ns/a/sa/b", SpiffeIdError::Scheme),
            (
                "spiffe://cluster.local/ns/a/sa/b/extra",
                SpiffeIdError::Path("/ns/a/sa/b/extra".into()),
            ),
            (
                "spiffe://cluster.local/ns/a/sa/b/",
                SpiffeIdError::Path("/ns/a/sa/b/".into()),
            ),
            (
                "spiffe://cluster.local/ns/a",
                SpiffeIdError::Path("/ns/a".into()),
            ),
            (
                "spiffe://cluster.local/sa/b/ns/a",
                SpiffeIdError::Path("/sa/b/ns/a".into()),
            ),
            ("spiffe://cluster.local", SpiffeIdError::Path(String::new())),
            (
                "spiffe:///ns/a/sa/b",
                SpiffeIdError::TrustDomain(String::new()),
            ),
            (
                "spiffe://Cluster.Local/ns/a/sa/b",
                SpiffeIdError::TrustDomain("Cluster.Local".into()),
            ),
            (
                "spiffe://cluster.local/ns//sa/b",
                SpiffeIdError::Segment {
                    field: "namespace",
                    value: String::new(),
                },
            ),
            (
                "spiffe://cluster.local/ns/a/sa/b?x=1",
                SpiffeIdError::Segment {
                    field: "service account",
                    value: "b?x=1".into(),
                },
            ),
            (
                "spiffe://cluster.local/ns/a%2fb/sa/c",
                SpiffeIdError::Segment {
                    field: "namespace",
                    value: "a%2fb".into(),
                },
            ),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<SpiffeId>(), Err(want), "input {input}");
        }
        let long = format!("spiffe://td/ns/{}/sa/b", "a".repeat(2100));
        assert_eq!(long.parse::<SpiffeId>(), Err(SpiffeIdError::TooLong));
    }
}
