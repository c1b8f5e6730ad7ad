//! A client for Istio's certificate service (istiod's `IstioCertificateService` on port 15012),
//! so that workload certificates chain to the same roots as every other ztunnel in the cluster.
//!
//! One unary gRPC call per certificate, framed by hand over h2 + tokio-rustls (no tonic: one
//! method does not justify a gRPC stack). The agent loop is made of blocking threads, so the
//! client owns a current-thread tokio runtime and blocks on it for each call; the HTTP/2
//! connection is kept between calls and only makes progress while a call runs.
//!
//! As ztunnel does in shared mode, the agent asks for each pod's identity on that pod's behalf:
//! the request carries `ImpersonatedIdentity` in its metadata and the bearer token of the
//! agent's own service account (read from the projected token file on every call, because the
//! kubelet rotates it), plus a `clusterid` header. The answer is checked before use: the leaf
//! must hold our fresh key and exactly the requested SPIFFE ID, be valid now, and chain through
//! the returned intermediates to the returned roots for both TLS client and server use.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use mesh_core::identity::SpiffeId;
use prost::Message;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::ca::IssuedCert;
use wire::{IstioCertificateRequest, IstioCertificateResponse};

mod wire;

pub use wire::Code;

#[cfg(test)]
pub(crate) mod fake_istiod;
#[cfg(test)]
mod tests;

/// Where Kubernetes projects the agent's service-account token for istiod (audience istio-ca).
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/tokens/istio-token";
/// Istio's name for a cluster when none is configured.
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";
/// Port used when the address names none (URL rules for https); istiod's CA is on 15012.
const DEFAULT_HTTPS_PORT: u16 = 443;
/// A leaf may start this far ahead of our clock (istiod already backdates by two minutes).
const CLOCK_SKEW: i64 = 60;

/// How to reach and authenticate to the CA.
#[derive(Clone, Debug)]
pub struct IstioCaConfig {
    /// `https://host:port`; without a scheme, https is assumed (as ztunnel does).
    pub address: String,
    /// PEM file of istiod's root certificates (several during a root rotation). It verifies
    /// istiod's TLS certificate and its roots are published as mesh trust anchors.
    pub root_cert: PathBuf,
    /// File holding the bearer token, re-read for every request.
    pub token_file: PathBuf,
    /// Sent as the `clusterid` header unless empty.
    pub cluster_id: String,
    /// Name expected in istiod's certificate; the address's host when `None`.
    pub tls_server_name: Option<String>,
    /// Limit on resolving, TCP, TLS and HTTP/2 handshakes together.
    pub connect_timeout: Duration,
    /// Limit on one request and its answer.
    pub call_timeout: Duration,
}

impl IstioCaConfig {
    /// Defaults for everything but the address and the root file.
    pub fn new(address: impl Into<String>, root_cert: impl Into<PathBuf>) -> IstioCaConfig {
        IstioCaConfig {
            address: address.into(),
            root_cert: root_cert.into(),
            token_file: PathBuf::from(DEFAULT_TOKEN_FILE),
            cluster_id: DEFAULT_CLUSTER_ID.to_owned(),
            tls_server_name: None,
            connect_timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IstioCaError {
    #[error("CA address {address:?}: {problem}")]
    Address { address: String, problem: String },
    #[error("CA root certificates {path}: {problem}")]
    Roots { path: String, problem: String },
    #[error("CA token {path}: {problem}")]
    Token { path: String, problem: String },
    #[error("starting the CA client's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("creating the certificate request: {0}")]
    Csr(#[from] rcgen::Error),
    #[error("CA {endpoint} unreachable: {problem}")]
    Unreachable { endpoint: String, problem: String },
    #[error("TLS with CA {endpoint}: {source}")]
    Tls {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("CA {endpoint}: no {what} within {after:?}")]
    Timeout {
        endpoint: String,
        what: &'static str,
        after: Duration,
    },
    #[error("HTTP/2 with CA {endpoint}: {source}")]
    Http2 {
        endpoint: String,
        #[source]
        source: h2::Error,
    },
    #[error("CA refused the request: {code}: {message}")]
    Status { code: Code, message: String },
    #[error("malformed answer from the CA: {0}")]
    Malformed(String),
    #[error("CA returned a certificate for another public key than the one in our request")]
    KeyMismatch,
    #[error("CA returned a certificate for {found}, not for the requested {expected}")]
    WrongIdentity { expected: SpiffeId, found: String },
    #[error("CA returned a certificate that is not valid now: {0}")]
    NotValid(String),
    #[error("certificate chain from the CA does not verify: {0}")]
    Chain(String),
}

impl IstioCaError {
    /// The CA could not be talked to at all (as opposed to answering badly): every identity
    /// would fail the same way, so the agent holds back all requests for a while.
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            IstioCaError::Unreachable { .. }
                | IstioCaError::Tls { .. }
                | IstioCaError::Timeout { .. }
                | IstioCaError::Http2 { .. }
        )
    }
}

/// Where the CA is, parsed once.
#[derive(Clone, Debug)]
struct Endpoint {
    /// For messages: the address as configured, with its scheme.
    display: String,
    /// Host to resolve, without IPv6 brackets.
    host: String,
    port: u16,
    uri: http::Uri,
    server_name: ServerName<'static>,
}

impl Endpoint {
    fn parse(address: &str, server_name: Option<&str>) -> Result<Endpoint, IstioCaError> {
        let problem = |problem: &str| IstioCaError::Address {
            address: address.to_owned(),
            problem: problem.to_owned(),
        };
        let display = if address.contains("://") {
            address.to_owned()
        } else {
            format!("https://{address}")
        };
        let uri: http::Uri = display
            .parse()
            .map_err(|e| problem(&format!("not a URL: {e}")))?;
        if uri.scheme_str() != Some("https") {
            // The bearer token must never cross the network in clear text.
            return Err(problem("only https is supported"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(problem("must not have a path"));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| problem("has no host"))?
            .clone();
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if authority.as_str().contains('@') {
            return Err(problem("must not carry user information"));
        }
        // Read the port text ourselves: `http` reads an out-of-range port as no port at all,
        // which would silently mean 443.
        let port = match authority
            .as_str()
            .strip_prefix(authority.host())
            .and_then(|rest| rest.strip_prefix(':'))
        {
            None | Some("") => DEFAULT_HTTPS_PORT,
            Some(port) => match port.parse::<u16>() {
                Ok(port) if port != 0 => port,
                _ => return Err(problem(&format!("port {port} is not in 1-65535"))),
            },
        };
        let name = server_name.unwrap_or(&host).to_owned();
        let server_name =
            ServerName::try_from(name).map_err(|e| problem(&format!("TLS server name: {e}")))?;
        let uri = http::Uri::builder()
            .scheme("https")
            .authority(authority)
            .path_and_query(wire::CREATE_CERTIFICATE_PATH)
            .build()
            .map_err(|e| problem(&e.to_string()))?;
        Ok(Endpoint {
            display,
            host,
            port,
            uri,
            server_name,
        })
    }
}

/// A blocking client for one CA.
pub struct IstioCaClient {
    config: IstioCaConfig,
    endpoint: Endpoint,
    cluster_id: Option<http::HeaderValue>,
    runtime: tokio::runtime::Runtime,
    /// Roots read from `config.root_cert`, re-read before every request.
    file_roots: Vec<Vec<u8>>,
    /// Why the root file could not be read again, logged once; the last good roots stay.
    roots_problem: Option<String>,
    /// The roots that ended the latest chain issued for each identity still wanted.
    chain_roots: BTreeMap<SpiffeId, Vec<Vec<u8>>>,
    /// The HTTP/2 connection kept between calls.
    connection: Option<h2::client::SendRequest<Bytes>>,
}

impl fmt::Debug for IstioCaClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token is never held, only its path; no private key lives here either.
        f.debug_struct("IstioCaClient")
            .field("address", &self.endpoint.display)
            .field("root_cert", &self.config.root_cert)
            .field("token_file", &self.config.token_file)
            .field("cluster_id", &self.config.cluster_id)
            .field("connected", &self.connection.is_some())
            .finish_non_exhaustive()
    }
}

/// A chain accepted from the CA.
struct Accepted {
    /// Leaf then intermediates, DER: what the data plane presents in handshakes.
    chain: Vec<Vec<u8>>,
    roots: Vec<Vec<u8>>,
    not_before_unix: i64,
    not_after_unix: i64,
}

impl IstioCaClient {
    /// Checks the configuration and reads the root file; does not contact the CA (it may not be
    /// up yet, and the agent retries).
    pub fn new(config: IstioCaConfig) -> Result<IstioCaClient, IstioCaError> {
        let endpoint = Endpoint::parse(&config.address, config.tls_server_name.as_deref())?;
        let cluster_id = match config.cluster_id.as_str() {
            "" => None,
            id => Some(
                http::HeaderValue::from_str(id).map_err(|_| IstioCaError::Address {
                    address: config.address.clone(),
                    problem: format!("cluster id {id:?} cannot be sent as a header"),
                })?,
            ),
        };
        let file_roots = read_roots(&config.root_cert)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(IstioCaError::Runtime)?;
        Ok(IstioCaClient {
            config,
            endpoint,
            cluster_id,
            runtime,
            file_roots,
            roots_problem: None,
            chain_roots: BTreeMap::new(),
            connection: None,
        })
    }

    /// Asks the CA for a certificate for `id` valid for `ttl` (the CA may shorten it), with a
    /// fresh ECDSA P-256 key, and checks the answer against `now`.
    pub fn issue(
        &mut self,
        id: &SpiffeId,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<IssuedCert, IstioCaError> {
        self.reload_file_roots();
        let token = read_token(&self.config.token_file)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let request = IstioCertificateRequest::impersonating(
            certificate_request(id, &key)?,
            i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            &id.to_string(),
        );
        let response = self.call(&request, &token)?;
        let accepted = accept_chain(&response.cert_chain, id, key.public_key_raw(), now)?;
        self.chain_roots.insert(id.clone(), accepted.roots);
        Ok(IssuedCert {
            chain: accepted.chain,
            key_pkcs8: key.serialize_der(),
            not_before_unix: accepted.not_before_unix,
            not_after_unix: accepted.not_after_unix,
        })
    }

    /// The roots of the root file, then those that ended issued chains, each once.
    pub fn trust_roots(&self) -> Vec<Vec<u8>> {
        let mut roots: Vec<Vec<u8>> = Vec::new();
        for root in self
            .file_roots
            .iter()
            .chain(self.chain_roots.values().flatten())
        {
            if !roots.contains(root) {
                roots.push(root.clone());
            }
        }
        roots
    }

    /// Forgets the chain roots of identities no longer wanted: a root stays trusted while a
    /// certificate held here chains to it, or while the root file lists it.
    pub fn retain_identities(&mut self, wanted: &[SpiffeId]) {
        self.chain_roots.retain(|id, _| wanted.contains(id));
    }

    /// Picks up a rotated root file (istiod's root ConfigMap, updated by the kubelet); keeps
    /// the last good roots if it cannot be read now. Returns whether the roots changed.
    pub fn reload_file_roots(&mut self) -> bool {
        match read_roots(&self.config.root_cert) {
            Ok(roots) => {
                self.roots_problem = None;
                if roots != self.file_roots {
                    tracing::info!(path = %self.config.root_cert.display(), roots = roots.len(),
                        "CA root certificates changed");
                    self.file_roots = roots;
                    return true;
                }
                false
            }
            Err(error) => {
                let message = error.to_string();
                if self.roots_problem.as_deref() != Some(message.as_str()) {
                    tracing::warn!(error = %message, "keeping the CA root certificates read before");
                    self.roots_problem = Some(message);
                }
                false
            }
        }
    }

    /// One unary call, on the kept connection if there is one. A kept connection may have been
    /// closed by istiod while no call was running to notice: a transport failure on it is
    /// retried once on a new connection (a second certificate for the same key is harmless).
    fn call(
        &mut self,
        request: &IstioCertificateRequest,
        token: &str,
    ) -> Result<IstioCertificateResponse, IstioCaError> {
        let body = wire::frame(request);
        let mut retried = false;
        loop {
            let http_request = self.http_request(token)?;
            let (send, reused) = match self.connection.take() {
                Some(send) => (send, true),
                None => (self.connect()?, false),
            };
            let timeout = self.config.call_timeout;
            let endpoint = self.endpoint.display.clone();
            let result = self.runtime.block_on(async {
                tokio::time::timeout(
                    timeout,
                    exchange(send.clone(), http_request, body.clone(), &endpoint),
                )
                .await
                .unwrap_or_else(|_| {
                    Err(IstioCaError::Timeout {
                        endpoint: endpoint.clone(),
                        what: "answer",
                        after: timeout,
                    })
                })
            });
            match result {
                Err(error) if error.is_transport() => {
                    let stale = reused && !matches!(error, IstioCaError::Timeout { .. });
                    if stale && !retried {
                        tracing::debug!(%error, "kept connection to the CA failed; reconnecting");
                        retried = true;
                        continue;
                    }
                    return Err(error);
                }
                result => {
                    self.connection = Some(send);
                    return result;
                }
            }
        }
    }

    fn connect(&mut self) -> Result<h2::client::SendRequest<Bytes>, IstioCaError> {
        let tls = tls_config(&self.file_roots, &self.config.root_cert)?;
        let endpoint = self.endpoint.clone();
        let timeout = self.config.connect_timeout;
        self.runtime.block_on(async {
            tokio::time::timeout(timeout, connect(&endpoint, tls))
                .await
                .unwrap_or_else(|_| {
                    Err(IstioCaError::Timeout {
                        endpoint: endpoint.display.clone(),
                        what: "connection",
                        after: timeout,
                    })
                })
        })
    }

    fn http_request(&self, token: &str) -> Result<http::Request<()>, IstioCaError> {
        let mut request = http::Request::new(());
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = self.endpoint.uri.clone();
        let headers = request.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
        if let Ok(timeout) =
            http::HeaderValue::from_str(&wire::timeout_header(self.config.call_timeout))
        {
            headers.insert("grpc-timeout", timeout);
        }
        let mut bearer = http::HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            IstioCaError::Token {
                path: self.config.token_file.display().to_string(),
                problem: "has characters a header cannot carry".into(),
            }
        })?;
        // Never put the token in HPACK's dynamic table.
        bearer.set_sensitive(true);
        headers.insert(http::header::AUTHORIZATION, bearer);
        if let Some(cluster_id) = &self.cluster_id {
            headers.insert("clusterid", cluster_id.clone());
        }
        Ok(request)
    }
}

/// Resolves, connects to the first address that answers, and does the TLS and HTTP/2
/// handshakes. The connection task runs on the client's runtime.
async fn connect(
    endpoint: &Endpoint,
    tls: Arc<rustls::ClientConfig>,
) -> Result<h2::client::SendRequest<Bytes>, IstioCaError> {
    let unreachable = |problem: String| IstioCaError::Unreachable {
        endpoint: endpoint.display.clone(),
        problem,
    };
    let addresses = tokio::net::lookup_host((endpoint.host.as_str(), endpoint.port))
        .await
        .map_err(|e| unreachable(format!("resolving {}: {e}", endpoint.host)))?;
    let mut problems = Vec::new();
    let mut tcp = None;
    for address in addresses {
        match tokio::net::TcpStream::connect(address).await {
            Ok(stream) => {
                tcp = Some(stream);
                break;
            }
            Err(e) => problems.push(format!("{address}: {e}")),
        }
    }
    let tcp = tcp.ok_or_else(|| {
        unreachable(if problems.is_empty() {
            format!("{} resolves to no address", endpoint.host)
        } else {
            problems.join("; ")
        })
    })?;
    // Requests are small and answered at once: do not let Nagle hold them.
    let _ = tcp.set_nodelay(true);
    let tls_stream = tokio_rustls::TlsConnector::from(tls)
        .connect(endpoint.server_name.clone(), tcp)
        .await
        .map_err(|source| IstioCaError::Tls {
            endpoint: endpoint.display.clone(),
            source,
        })?;
    let (send, connection) = h2::client::Builder::new()
        .handshake::<_, Bytes>(tls_stream)
        .await
        .map_err(|source| IstioCaError::Http2 {
            endpoint: endpoint.display.clone(),
            source,
        })?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "connection to the CA closed");
        }
    });
    tracing::debug!(endpoint = %endpoint.display, "connected to the CA");
    Ok(send)
}

/// Sends one request and reads its answer: the single response message and the status, from
/// the trailers or, for a trailers-only error, from the headers.
async fn exchange(
    send: h2::client::SendRequest<Bytes>,
    request: http::Request<()>,
    body: Bytes,
    endpoint: &str,
) -> Result<IstioCertificateResponse, IstioCaError> {
    let h2_error = |source| IstioCaError::Http2 {
        endpoint: endpoint.to_owned(),
        source,
    };
    let mut send = send.ready().await.map_err(h2_error)?;
    let (response, mut stream) = send.send_request(request, false).map_err(h2_error)?;
    stream.send_data(body, true).map_err(h2_error)?;
    let (parts, mut body) = response.await.map_err(h2_error)?.into_parts();
    if parts.status != http::StatusCode::OK {
        return Err(IstioCaError::Malformed(format!(
            "HTTP status {}, not a gRPC answer",
            parts.status
        )));
    }
    if let Some(status) = wire::status(&parts.headers) {
        return Err(match status_error(status) {
            Ok(()) => IstioCaError::Malformed("status OK but no response message".into()),
            Err(error) => error,
        });
    }
    let content_type = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !content_type.starts_with("application/grpc") {
        return Err(IstioCaError::Malformed(format!(
            "content-type {content_type:?}, not application/grpc"
        )));
    }
    let mut message = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(h2_error)?;
        body.flow_control()
            .release_capacity(chunk.len())
            .map_err(h2_error)?;
        if message.len() + chunk.len() > 5 + wire::MAX_RESPONSE_MESSAGE {
            return Err(IstioCaError::Malformed(format!(
                "answer is over the {}-byte limit",
                wire::MAX_RESPONSE_MESSAGE
            )));
        }
        message.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.map_err(h2_error)?.unwrap_or_default();
    match wire::status(&trailers) {
        None => return Err(IstioCaError::Malformed("no grpc-status".into())),
        Some(status) => status_error(status)?,
    }
    let payload =
        wire::unframe_unary(&message).map_err(|e| IstioCaError::Malformed(e.to_string()))?;
    IstioCertificateResponse::decode(payload)
        .map_err(|e| IstioCaError::Malformed(format!("response does not decode: {e}")))
}

fn status_error(status: Result<(Code, String), String>) -> Result<(), IstioCaError> {
    match status {
        Ok((Code::OK, _)) => Ok(()),
        Ok((code, message)) => Err(IstioCaError::Status { code, message }),
        Err(problem) => Err(IstioCaError::Malformed(problem)),
    }
}

/// TLS toward istiod: its certificate must chain to the root file and name the server name.
fn tls_config(roots: &[Vec<u8>], path: &Path) -> Result<Arc<rustls::ClientConfig>, IstioCaError> {
    let problem = |problem: String| IstioCaError::Roots {
        path: path.display().to_string(),
        problem,
    };
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store
            .add(CertificateDer::from(root.as_slice()))
            .map_err(|e| problem(e.to_string()))?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| problem(e.to_string()))?
    .with_root_certificates(store)
    .with_no_client_auth();
    // gRPC servers refuse TLS connections that did not negotiate h2.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Every certificate of a PEM file, each usable as a trust anchor.
fn read_roots(path: &Path) -> Result<Vec<Vec<u8>>, IstioCaError> {
    let problem = |problem: String| IstioCaError::Roots {
        path: path.display().to_string(),
        problem,
    };
    let pem = std::fs::read(path).map_err(|e| problem(e.to_string()))?;
    let roots = CertificateDer::pem_slice_iter(&pem)
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| problem(e.to_string()))?;
    if roots.is_empty() {
        return Err(problem("no CERTIFICATE block".into()));
    }
    for (index, root) in roots.iter().enumerate() {
        webpki::anchor_from_trusted_cert(&CertificateDer::from(root.as_slice()))
            .map_err(|e| problem(format!("certificate {index}: {e}")))?;
    }
    Ok(roots)
}

/// The bearer token; surrounding whitespace (a trailing newline) is not part of it.
fn read_token(path: &Path) -> Result<String, IstioCaError> {
    let problem = |problem: String| IstioCaError::Token {
        path: path.display().to_string(),
        problem,
    };
    let text = std::fs::read_to_string(path).map_err(|e| problem(e.to_string()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(problem("is empty".into()));
    }
    Ok(token.to_owned())
}

/// A PKCS#10 request whose only content is the SPIFFE ID as URI SAN (no subject: rcgen then
/// marks the SAN critical, as RFC 5280 asks when the subject is empty).
fn certificate_request(id: &SpiffeId, key: &KeyPair) -> Result<String, IstioCaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    Ok(params.serialize_request(key)?.pem()?)
}

/// Checks an answer's chain: `[leaf, intermediates..., roots]`, where the last entry may hold
/// several concatenated roots (istiod does that during a root rotation).
fn accept_chain(
    pems: &[String],
    id: &SpiffeId,
    public_key: &[u8],
    now: SystemTime,
) -> Result<Accepted, IstioCaError> {
    let malformed = |problem: String| IstioCaError::Malformed(problem);
    let (leaf_pem, rest) = pems
        .split_first()
        .ok_or_else(|| malformed("empty certificate chain".into()))?;
    let (roots_pem, intermediates_pem) = rest
        .split_last()
        .ok_or_else(|| malformed("chain has no root after the leaf".into()))?;
    let leaf = single_certificate(leaf_pem, "leaf")?;
    let intermediates = intermediates_pem
        .iter()
        .enumerate()
        .map(|(i, pem)| single_certificate(pem, &format!("intermediate {}", i + 1)))
        .collect::<Result<Vec<_>, _>>()?;
    let roots = CertificateDer::pem_slice_iter(roots_pem.as_bytes())
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| malformed(format!("roots: {e}")))?;
    if roots.is_empty() {
        return Err(malformed("last entry holds no root certificate".into()));
    }

    let (_, parsed) =
        x509_parser::parse_x509_certificate(&leaf).map_err(|e| malformed(format!("leaf: {e}")))?;
    if parsed.public_key().subject_public_key.data.as_ref() != public_key {
        return Err(IstioCaError::KeyMismatch);
    }
    let found =
        mesh_io::tls::spiffe_id_of(&CertificateDer::from(leaf.as_slice())).map_err(|problem| {
            IstioCaError::WrongIdentity {
                expected: id.clone(),
                found: problem.to_string(),
            }
        })?;
    if found != *id {
        return Err(IstioCaError::WrongIdentity {
            expected: id.clone(),
            found: found.to_string(),
        });
    }
    let not_before_unix = parsed.validity().not_before.timestamp();
    let not_after_unix = parsed.validity().not_after.timestamp();
    let now_unix = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    if not_after_unix <= now_unix {
        return Err(IstioCaError::NotValid(format!(
            "expired at {}",
            show_time(not_after_unix)
        )));
    }
    if not_before_unix > now_unix + CLOCK_SKEW {
        return Err(IstioCaError::NotValid(format!(
            "valid only from {}",
            show_time(not_before_unix)
        )));
    }
    // Within the skew allowance, check the chain at the leaf's start rather than refuse it.
    let at = UnixTime::since_unix_epoch(Duration::from_secs(
        u64::try_from(now_unix.max(not_before_unix)).unwrap_or(0),
    ));
    let mut chain = Vec::with_capacity(1 + intermediates.len());
    chain.push(leaf);
    chain.extend(intermediates);
    // The data plane's peers check these chains with webpki: refuse now what fails there later.
    crate::ca::verify_chain(&chain, &roots, at).map_err(|e| match e {
        crate::ca::ChainError::Path(_) => IstioCaError::Chain(e.to_string()),
        other => IstioCaError::Malformed(other.to_string()),
    })?;
    Ok(Accepted {
        chain,
        roots,
        not_before_unix,
        not_after_unix,
    })
}

fn single_certificate(pem: &str, what: &str) -> Result<Vec<u8>, IstioCaError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IstioCaError::Malformed(format!("{what}: {e}")))?;
    match certs.as_slice() {
        [one] => Ok(one.to_vec()),
        other => Err(IstioCaError::Malformed(format!(
            "{what}: {} certificates where one was expected",
            other.len()
        ))),
    }
}

fn show_time(unix: i64) -> String {
    u64::try_from(unix)
        .ok()
        .and_then(|secs| UNIX_EPOCH.checked_add(Duration::from_secs(secs)))
        .map_or_else(
            || format!("unix time {unix}"),
            |t| humantime::format_rfc3339_seconds(t).to_string(),
        )
}
