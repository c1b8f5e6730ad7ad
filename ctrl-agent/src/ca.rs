//! The local certificate authority of the embedded default: a self-signed ECDSA P-256 root
//! that issues workload certificates carrying the SPIFFE ID as their only URI SAN, with both
//! server and client auth usages (HBONE is mutual), as Istio's CA does.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_core::identity::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::{CertificateDer, UnixTime};
use time::OffsetDateTime;

const CA_CERT_FILE: &str = "ca-cert.pem";
const CA_KEY_FILE: &str = "ca-key.pem";
/// Lifetime of a generated root.
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Issued certificates start a little in the past to tolerate clock skew between nodes.
const BACKDATE: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {problem}")]
    Load { path: String, problem: String },
    #[error("time out of range")]
    Time,
    #[error(transparent)]
    Istio(#[from] crate::istio_ca::IstioCaError),
}

impl CaError {
    /// What an operator does about a failure, in a word, in the order of
    /// [`CaError::reason_index`]: the CA is down or cut off (`unreachable`), it said no
    /// (`refused`: the token, istiod's trusted node accounts), its answer was unusable
    /// (`bad_answer`), or the problem is on this node (`local`: a file, the local CA).
    pub const REASONS: [&'static str; 4] = ["unreachable", "refused", "bad_answer", "local"];

    /// The remote CA could not be reached at all (so no identity can be issued for now).
    pub fn is_transport(&self) -> bool {
        matches!(self, CaError::Istio(e) if e.is_transport())
    }

    /// Where this failure's reason is in [`CaError::REASONS`].
    pub fn reason_index(&self) -> usize {
        use crate::istio_ca::IstioCaError as E;
        match self {
            e if e.is_transport() => 0,
            CaError::Istio(E::Status { .. }) => 1,
            CaError::Istio(
                E::Malformed(_)
                | E::KeyMismatch
                | E::WrongIdentity { .. }
                | E::NotValid(_)
                | E::Chain(_),
            ) => 2,
            _ => 3,
        }
    }
}

/// A certificate chain (leaf first) and its PKCS#8 private key, all DER.
#[derive(Clone)]
pub struct IssuedCert {
    pub chain: Vec<Vec<u8>>,
    pub key_pkcs8: Vec<u8>,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("IssuedCert")
            .field("chain_len", &self.chain.len())
            .field("not_before_unix", &self.not_before_unix)
            .field("not_after_unix", &self.not_after_unix)
            .finish_non_exhaustive()
    }
}

/// Why a chain would not be accepted by the data plane's peers.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("no certificate in the chain")]
    Empty,
    #[error("root: {0}")]
    Root(webpki::Error),
    #[error("leaf: {0}")]
    Leaf(webpki::Error),
    #[error("{0}")]
    Path(webpki::Error),
}

/// Checks `chain` (leaf first) the way the data plane's peers check it: webpki, up to one of
/// `roots`, as TLS server and as TLS client, at `at`.
pub fn verify_chain(chain: &[Vec<u8>], roots: &[Vec<u8>], at: UnixTime) -> Result<(), ChainError> {
    let (leaf, intermediates) = chain.split_first().ok_or(ChainError::Empty)?;
    let root_ders: Vec<CertificateDer<'_>> = roots
        .iter()
        .map(|r| CertificateDer::from(r.as_slice()))
        .collect();
    let anchors = root_ders
        .iter()
        .map(webpki::anchor_from_trusted_cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(ChainError::Root)?;
    let intermediates: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let leaf = CertificateDer::from(leaf.as_slice());
    let end_entity = webpki::EndEntityCert::try_from(&leaf).map_err(ChainError::Leaf)?;
    for usage in [
        webpki::KeyUsage::server_auth(),
        webpki::KeyUsage::client_auth(),
    ] {
        end_entity
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &anchors,
                &intermediates,
                at,
                usage,
                None,
                None,
            )
            .map_err(ChainError::Path)?;
    }
    Ok(())
}

pub struct LocalCa {
    root_der: Vec<u8>,
    root_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn to_offset(t: SystemTime) -> Result<OffsetDateTime, CaError> {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| CaError::Time)?
        .as_secs();
    OffsetDateTime::from_unix_timestamp(secs as i64).map_err(|_| CaError::Time)
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl LocalCa {
    /// A new root for `trust_domain`.
    pub fn generate(trust_domain: &str) -> Result<LocalCa, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params =
            certificate_authority_params(trust_domain, &format!("mesh local CA {trust_domain}"));
        let now = SystemTime::now();
        params.not_before = to_offset(now - BACKDATE)?;
        params.not_after = to_offset(now + ROOT_VALIDITY)?;
        let cert = params.self_signed(&key)?;
        Ok(LocalCa {
            root_der: cert.der().to_vec(),
            root_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads `ca-cert.pem` and `ca-key.pem` from `dir`, or generates and stores them there
    /// (key file mode 0600) if neither exists.
    pub fn load_or_generate(dir: &Path, trust_domain: &str) -> Result<LocalCa, CaError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        if cert_path.exists() || key_path.exists() {
            return LocalCa::load(&cert_path, &key_path);
        }
        let ca = LocalCa::generate(trust_domain)?;
        std::fs::create_dir_all(dir).map_err(|source| CaError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        write_private(&key_path, ca.issuer.key().serialize_pem().as_bytes())?;
        std::fs::write(&cert_path, ca.root_pem.as_bytes()).map_err(|source| CaError::Io {
            path: cert_path.display().to_string(),
            source,
        })?;
        Ok(ca)
    }

    pub fn load(cert_path: &Path, key_path: &Path) -> Result<LocalCa, CaError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| CaError::Io {
                path: p.display().to_string(),
                source,
            })
        };
        let cert_pem = read(cert_path)?;
        let key_pem = read(key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Load {
            path: key_path.display().to_string(),
            problem: e.to_string(),
        })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| CaError::Load {
            path: cert_path.display().to_string(),
            problem: e.to_string(),
        })?;
        let root_der = rustls_pem_to_der(&cert_pem).ok_or_else(|| CaError::Load {
            path: cert_path.display().to_string(),
            problem: "no CERTIFICATE block".into(),
        })?;
        Ok(LocalCa {
            root_der,
            root_pem: cert_pem,
            issuer,
        })
    }

    pub fn root_der(&self) -> &[u8] {
        &self.root_der
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Issues a workload certificate for `id`, valid from a little before `now` for `ttl`.
    pub fn issue(
        &self,
        id: &SpiffeId,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<IssuedCert, CaError> {
        self.issue_between(id, now - BACKDATE, now + ttl)
    }

    /// Issues with an explicit validity window (tests use it for expired and future certs).
    pub fn issue_between(
        &self,
        id: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<IssuedCert, CaError> {
        self.issue_with_uris(&[id.to_string()], not_before, not_after)
    }

    /// Issues with arbitrary URI SANs; only tests want anything but one SPIFFE ID.
    pub fn issue_with_uris(
        &self,
        uris: &[String],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<IssuedCert, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = uris
            .iter()
            .map(|u| Ok(SanType::URI(u.as_str().try_into()?)))
            .collect::<Result<_, rcgen::Error>>()?;
        mark_workload_leaf(&mut params);
        params.not_before = to_offset(not_before)?;
        params.not_after = to_offset(not_after)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            chain: vec![cert.der().to_vec()],
            key_pkcs8: key.serialize_der(),
            not_before_unix: unix(not_before),
            not_after_unix: unix(not_after),
        })
    }
}

/// A CA certificate's name and profile: may sign certificates and revocation lists.
pub fn certificate_authority_params(organization: &str, common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, organization);
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// What makes a workload certificate one: not a CA, signing and key exchange, usable by both
/// ends of mutual TLS, and naming its issuer's key (as Istio's CA issues them).
pub fn mark_workload_leaf(params: &mut CertificateParams) {
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CaError> {
    let io = |source| CaError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)
}

/// DER of the first CERTIFICATE block of a PEM file.
fn rustls_pem_to_der(pem: &str) -> Option<Vec<u8>> {
    pem_certificates(pem.as_bytes()).and_then(|mut v| v.drain(..).next())
}

/// DER of every CERTIFICATE block in PEM text; `None` if there is none.
pub fn pem_certificates(pem: &[u8]) -> Option<Vec<Vec<u8>>> {
    use rustls_pki_types::pem::PemObject;
    let certs: Vec<Vec<u8>> = rustls_pki_types::CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .map(|c| c.to_vec())
        .collect();
    (!certs.is_empty()).then_some(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificate_carries_the_spiffe_id_and_chains_to_the_root() {
        let ca = LocalCa::generate("cluster.local").expect("ca");
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/client"
            .parse()
            .expect("id");
        let now = SystemTime::now();
        let cert = ca
            .issue(&id, now, Duration::from_secs(3600))
            .expect("issue");
        let (_, leaf) = x509_parser::parse_x509_certificate(&cert.chain[0]).expect("leaf parses");
        let san = leaf
            .subject_alternative_name()
            .expect("san ext")
            .expect("has san");
        let uris: Vec<String> = san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(uris, [id.to_string()]);
        let (_, root) = x509_parser::parse_x509_certificate(ca.root_der()).expect("root");
        assert_eq!(leaf.issuer(), root.subject());
        leaf.verify_signature(Some(root.public_key()))
            .expect("signed by the root");
        assert!(cert.not_after_unix - cert.not_before_unix >= 3600);
    }

    #[test]
    fn stored_ca_is_loaded_again_with_a_private_key_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = mesh_snapshot::test_support::ScratchDir::new().expect("scratch dir");
        let first = LocalCa::load_or_generate(dir.path(), "cluster.local").expect("generate");
        let again = LocalCa::load_or_generate(dir.path(), "cluster.local").expect("load");
        assert_eq!(first.root_der(), again.root_der());
        let mode = std::fs::metadata(dir.path().join(CA_KEY_FILE))
            .expect("key file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // The loaded CA issues certificates that chain to the same root.
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().expect("id");
        let cert = again
            .issue(&id, SystemTime::now(), Duration::from_secs(60))
            .expect("issue");
        let (_, leaf) = x509_parser::parse_x509_certificate(&cert.chain[0]).expect("leaf");
        let (_, root) = x509_parser::parse_x509_certificate(first.root_der()).expect("root");
        leaf.verify_signature(Some(root.public_key()))
            .expect("chains");
    }

    #[test]
    fn debug_output_never_shows_the_key() {
        let ca = LocalCa::generate("td").expect("ca");
        let id: SpiffeId = "spiffe://td/ns/a/sa/b".parse().expect("id");
        let cert = ca
            .issue(&id, SystemTime::now(), Duration::from_secs(60))
            .expect("issue");
        let shown = format!("{cert:?}");
        assert!(!shown.contains("key_pkcs8:"), "{shown}");
    }
}
