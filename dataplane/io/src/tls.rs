//! rustls configuration for HBONE: TLS 1.3 only, AES-GCM suites, ALPN h2, mutual authentication
//! by SPIFFE identity (DESIGN section 4).
//!
//! Clients check the server's chain against the mesh roots and its SPIFFE ID against the
//! identity expected for the destination; names and SNI play no part. Servers require a client
//! certificate chained to the roots and in their own trust domain.
//!
//! Session resumption is off on both sides: rustls's resumption caches sit behind mutexes, and
//! pooled connections make full handshakes rare anyway.

use std::fmt;
use std::sync::Arc;

use mesh_core::identity::{SpiffeId, SpiffeIdError};
use mesh_snapshot::schema::Identity;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, Resumption};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};

pub const ALPN_H2: &[u8] = b"h2";

/// The crypto provider with the suites the HBONE contract allows.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    Arc::new(provider)
}

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("trust root {index} is not a usable certificate: {source}")]
    Root {
        index: usize,
        #[source]
        source: rustls::Error,
    },
    #[error("no trust roots in the snapshot")]
    NoRoots,
    #[error("identity {id}: {source}")]
    Identity {
        id: String,
        #[source]
        source: rustls::Error,
    },
    #[error("client verifier: {0}")]
    Verifier(String),
}

/// Why a peer's certificate does not name a usable identity.
#[derive(thiserror::Error)]
pub enum PeerIdentityError {
    #[error("peer presented no certificate")]
    NoCertificate,
    #[error("certificate does not parse: {0}")]
    Parse(String),
    #[error("certificate has no SPIFFE URI SAN")]
    Missing,
    #[error("certificate has {0} SPIFFE URI SANs, expected one")]
    Multiple(usize),
    #[error("certificate's SPIFFE ID is invalid: {0}")]
    Invalid(#[from] SpiffeIdError),
}

/// rustls renders the errors of custom verifiers with `{:?}`; make that the readable message,
/// since it is what lands in the log line of a refused handshake.
macro_rules! debug_as_display {
    ($($t:ty),*) => {$(
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }
    )*};
}
debug_as_display!(
    PeerIdentityError,
    UnexpectedServerIdentity,
    ForeignTrustDomain
);

/// The SPIFFE ID in a certificate's URI SAN.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, PeerIdentityError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| PeerIdentityError::Parse(e.to_string()))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| PeerIdentityError::Parse(e.to_string()))?
        .ok_or(PeerIdentityError::Missing)?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(PeerIdentityError::Missing),
        [one] => Ok(one.parse()?),
        many => Err(PeerIdentityError::Multiple(many.len())),
    }
}

/// The verified peer identity of an established connection.
pub fn peer_identity(state: &rustls::CommonState) -> Result<SpiffeId, PeerIdentityError> {
    let certs = state
        .peer_certificates()
        .ok_or(PeerIdentityError::NoCertificate)?;
    spiffe_id_of(certs.first().ok_or(PeerIdentityError::NoCertificate)?)
}

/// Mesh trust anchors, parsed once per snapshot.
#[derive(Clone, Debug)]
pub struct TrustBundle {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl TrustBundle {
    pub fn new(roots_der: &[Vec<u8>]) -> Result<TrustBundle, TlsSetupError> {
        if roots_der.is_empty() {
            return Err(TlsSetupError::NoRoots);
        }
        let mut roots = RootCertStore::empty();
        for (index, der) in roots_der.iter().enumerate() {
            roots
                .add(CertificateDer::from(der.clone()))
                .map_err(|source| TlsSetupError::Root { index, source })?;
        }
        Ok(TrustBundle {
            roots: Arc::new(roots),
            provider: provider(),
        })
    }
}

fn cert_and_key(identity: &Identity) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let chain = identity
        .cert_chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.private_key.clone()));
    (chain, key)
}

/// Server side of HBONE for one local workload identity.
pub fn server_config(
    identity: &Identity,
    trust: &TrustBundle,
    trust_domain: &str,
) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let inner =
        WebPkiClientVerifier::builder_with_provider(trust.roots.clone(), trust.provider.clone())
            .build()
            .map_err(|e| TlsSetupError::Verifier(e.to_string()))?;
    let verifier = Arc::new(SpiffeClientVerifier {
        inner,
        trust_domain: trust_domain.to_owned(),
    });
    let (chain, key) = cert_and_key(identity);
    let id_err = |source| TlsSetupError::Identity {
        id: identity.spiffe_id.clone(),
        source,
    };
    let mut config = ServerConfig::builder_with_provider(trust.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(id_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(id_err)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Client side of HBONE: presents `identity`, accepts only a server proving `expected`.
pub fn client_config(
    identity: &Identity,
    trust: &TrustBundle,
    expected: SpiffeId,
) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: trust.roots.clone(),
        provider: trust.provider.clone(),
        expected,
    });
    let (chain, key) = cert_and_key(identity);
    let mut config = ClientConfig::builder_with_provider(trust.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsSetupError::Identity {
            id: identity.spiffe_id.clone(),
            source,
        })?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .map_err(|source| TlsSetupError::Identity {
            id: identity.spiffe_id.clone(),
            source,
        })?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// The name passed to rustls for a connection. Our verifier ignores it and SNI is off, so it
/// only has to be syntactically valid.
pub fn placeholder_server_name(addr: std::net::SocketAddr) -> ServerName<'static> {
    ServerName::IpAddress(addr.ip().into())
}

struct UnexpectedServerIdentity {
    expected: SpiffeId,
    found: SpiffeId,
}
impl fmt::Display for UnexpectedServerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "server identity {} is not the expected {}",
            self.found, self.expected
        )
    }
}
impl std::error::Error for UnexpectedServerIdentity {}

struct ForeignTrustDomain {
    trust_domain: String,
    found: SpiffeId,
}
impl fmt::Display for ForeignTrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "client identity {} is outside trust domain {}",
            self.found, self.trust_domain
        )
    }
}
impl std::error::Error for ForeignTrustDomain {}

/// A certificate refused for what it says, not how it is signed: rustls carries the reason.
fn invalid_certificate(reason: impl std::error::Error + Send + Sync + 'static) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(reason))))
}

#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    expected: SpiffeId,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let found = spiffe_id_of(end_entity).map_err(invalid_certificate)?;
        if found != self.expected {
            return Err(invalid_certificate(UnexpectedServerIdentity {
                expected: self.expected.clone(),
                found,
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let found = spiffe_id_of(end_entity).map_err(invalid_certificate)?;
        if found.trust_domain() != self.trust_domain {
            return Err(invalid_certificate(ForeignTrustDomain {
                trust_domain: self.trust_domain.clone(),
                found,
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Why a handshake was refused, for logs and per-reason counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Expired,
    NotYetValid,
    /// Chain does not lead to a mesh root (unknown CA, or a forged signature).
    UnknownIssuer,
    /// Client identity outside our trust domain.
    TrustDomain,
    /// Server identity is not the one expected for the destination.
    UnexpectedIdentity,
    /// Certificate without exactly one SPIFFE ID.
    NoIdentity,
    /// A client that presented no certificate.
    NoClientCertificate,
    /// The other side refused us (TLS alert).
    PeerAlert,
    Other,
}

impl Refusal {
    pub fn name(self) -> &'static str {
        match self {
            Refusal::Expired => "expired",
            Refusal::NotYetValid => "not_yet_valid",
            Refusal::UnknownIssuer => "unknown_issuer",
            Refusal::TrustDomain => "trust_domain",
            Refusal::UnexpectedIdentity => "unexpected_identity",
            Refusal::NoIdentity => "no_identity",
            Refusal::NoClientCertificate => "no_client_certificate",
            Refusal::PeerAlert => "peer_alert",
            Refusal::Other => "other",
        }
    }

    /// Classifies the error a tokio-rustls handshake returned.
    pub fn of(error: &std::io::Error) -> Refusal {
        let Some(tls) = error
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
        else {
            return Refusal::Other;
        };
        match tls {
            rustls::Error::NoCertificatesPresented => Refusal::NoClientCertificate,
            rustls::Error::AlertReceived(_) => Refusal::PeerAlert,
            rustls::Error::InvalidCertificate(c) => match c {
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    Refusal::Expired
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    Refusal::NotYetValid
                }
                CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                    Refusal::UnknownIssuer
                }
                CertificateError::Other(OtherError(inner)) => {
                    if inner.downcast_ref::<ForeignTrustDomain>().is_some() {
                        Refusal::TrustDomain
                    } else if inner.downcast_ref::<UnexpectedServerIdentity>().is_some() {
                        Refusal::UnexpectedIdentity
                    } else if inner.downcast_ref::<PeerIdentityError>().is_some() {
                        Refusal::NoIdentity
                    } else {
                        Refusal::Other
                    }
                }
                _ => Refusal::Other,
            },
            _ => Refusal::Other,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
