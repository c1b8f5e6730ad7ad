//! A double of istiod's certificate service for tests: no istiod can run on this machine, so
//! this speaks the same protocol on loopback. TLS with a server certificate for
//! `istiod.istio-system.svc` issued by a test root, HTTP/2, gRPC framing, the
//! `CreateCertificate` method: it checks the bearer token, parses and verifies the CSR, checks
//! that an impersonated identity is the one in the CSR (istiod checks the caller may act for
//! it), and returns `[leaf, intermediate, root]` as PEM, the leaf signed by an intermediate
//! that chains to the root and backdated two minutes as istiod does. Tests can make it fail
//! with a gRPC status, return another identity or key, answer late, or stop and start again.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, ExtendedKeyUsagePurpose, Issuer, KeyPair,
    SanType, PKCS_ECDSA_P256_SHA256,
};
use time::OffsetDateTime;

use super::wire::{self, Code, IstioCertificateRequest, IstioCertificateResponse};

pub(crate) const TOKEN: &str = "projected-token-of-ztunnel";
pub(crate) const SERVER_NAME: &str = "istiod.istio-system.svc";
/// istiod's grace period for clock skew: certificates start this long before they are made.
const BACKDATE: Duration = Duration::from_secs(120);
const DEFAULT_VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// A root, an intermediate under it that signs workload certificates, and istiod's serving
/// certificate under the root.
pub(crate) struct TestPki {
    pub root_pem: String,
    pub root_der: Vec<u8>,
    intermediate: Issuer<'static, KeyPair>,
    intermediate_pem: String,
    server_chain: Vec<Vec<u8>>,
    server_key: Vec<u8>,
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = crate::ca::certificate_authority_params("cluster.local", name);
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::from_secs(3600);
    params.not_after = now + Duration::from_secs(30 * 24 * 3600);
    params
}

impl TestPki {
    pub(crate) fn new(name: &str) -> TestPki {
        let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("root key");
        let root_params = ca_params(&format!("{name} root"));
        let root = root_params.self_signed(&root_key).expect("root");
        let root_issuer = Issuer::new(root_params, root_key);

        let intermediate_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let mut intermediate_params = ca_params(&format!("{name} intermediate"));
        intermediate_params.use_authority_key_identifier_extension = true;
        let intermediate = intermediate_params
            .signed_by(&intermediate_key, &root_issuer)
            .expect("intermediate");

        let server_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let mut server_params =
            CertificateParams::new(vec![SERVER_NAME.to_owned()]).expect("server params");
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        server_params.use_authority_key_identifier_extension = true;
        let server = server_params
            .signed_by(&server_key, &root_issuer)
            .expect("server cert");

        TestPki {
            root_pem: root.pem(),
            root_der: root.der().to_vec(),
            intermediate: Issuer::new(intermediate_params, intermediate_key),
            intermediate_pem: intermediate.pem(),
            server_chain: vec![server.der().to_vec()],
            server_key: server_key.serialize_der(),
        }
    }
}

/// How the fake answers the next requests.
#[derive(Clone, Debug)]
pub(crate) enum Mode {
    Issue,
    /// Headers, then trailers with this status (not trailers-only).
    Fail(Code, String),
    /// Issues the certificate for this URI SAN instead of the requested one.
    OtherIdentity(String),
    /// Issues the certificate for a key of its own instead of the CSR's.
    OtherKey,
    /// Returns only the leaf, without the root.
    LeafOnly,
    /// Waits this long, then issues.
    Delay(Duration),
}

/// What one request carried.
#[derive(Clone, Debug, Default)]
pub(crate) struct Seen {
    pub authorization: Option<String>,
    pub cluster_id: Option<String>,
    pub content_type: Option<String>,
    pub te: Option<String>,
    pub grpc_timeout: Option<String>,
    pub impersonated: Option<String>,
    pub validity_duration: i64,
    pub csr_uris: Vec<String>,
}

struct State {
    mode: Mode,
    /// PEM of the last chain entry: the root, or several concatenated roots.
    roots_pem: String,
    /// Like istiod's maximum workload certificate TTL: longer requests get this.
    max_validity: Option<Duration>,
    connections: usize,
    requests: Vec<Seen>,
}

struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

pub(crate) struct FakeIstiod {
    addr: SocketAddr,
    pki: Arc<TestPki>,
    state: Arc<Mutex<State>>,
    running: Option<Running>,
}

impl FakeIstiod {
    pub(crate) fn start(pki: Arc<TestPki>) -> FakeIstiod {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(Mutex::new(State {
            mode: Mode::Issue,
            roots_pem: pki.root_pem.clone(),
            max_validity: None,
            connections: 0,
            requests: Vec::new(),
        }));
        let mut fake = FakeIstiod {
            addr,
            pki,
            state,
            running: None,
        };
        fake.serve(listener);
        fake
    }

    /// The address as the agent's `--ca-address` would name it.
    pub(crate) fn address(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub(crate) fn set_mode(&self, mode: Mode) {
        self.lock().mode = mode;
    }

    pub(crate) fn set_roots_pem(&self, pem: String) {
        self.lock().roots_pem = pem;
    }

    pub(crate) fn set_max_validity(&self, max: Duration) {
        self.lock().max_validity = Some(max);
    }

    pub(crate) fn requests(&self) -> Vec<Seen> {
        self.lock().requests.clone()
    }

    pub(crate) fn connections(&self) -> usize {
        self.lock().connections
    }

    /// Closes the listener and every connection, as if istiod went away.
    pub(crate) fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            let _ = running.stop.send(());
            running.thread.join().expect("fake istiod thread");
        }
    }

    /// Listens again on the same address.
    pub(crate) fn restart(&mut self) {
        self.stop();
        let listener = std::net::TcpListener::bind(self.addr).expect("bind again");
        self.serve(listener);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("fake istiod state")
    }

    fn serve(&mut self, listener: std::net::TcpListener) {
        listener.set_nonblocking(true).expect("nonblocking");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = self
            .pki
            .server_chain
            .iter()
            .map(|c| rustls_pki_types::CertificateDer::from(c.clone()))
            .collect();
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(self.pki.server_key.clone().into());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server config");
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let pki = self.pki.clone();
        let state = self.state.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                tokio::spawn(accept_loop(listener, acceptor, pki, state));
                let _ = stopped.await;
            });
            // Dropping the runtime drops every task: the listener and all connections close.
            drop(runtime);
        });
        self.running = Some(Running { stop, thread });
    }
}

impl Drop for FakeIstiod {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    pki: Arc<TestPki>,
    state: Arc<Mutex<State>>,
) {
    while let Ok((tcp, _)) = listener.accept().await {
        state.lock().expect("state").connections += 1;
        let acceptor = acceptor.clone();
        let pki = pki.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let Ok(mut connection) = h2::server::handshake(tls).await else {
                return;
            };
            while let Some(Ok((request, respond))) = connection.accept().await {
                tokio::spawn(answer(request, respond, pki.clone(), state.clone()));
            }
        });
    }
}

/// An answer: a chain, or a status sent trailers-only or after the headers.
enum Outcome {
    Chain(Vec<String>),
    TrailersOnly(Code, String),
    Status(Code, String),
}

async fn answer(
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    pki: Arc<TestPki>,
    state: Arc<Mutex<State>>,
) {
    let outcome = decide(request, &pki, &state).await;
    let grpc_headers = |code: Code, message: &str| {
        let mut headers = http::HeaderMap::new();
        headers.insert("grpc-status", code.0.to_string().parse().expect("status"));
        headers.insert(
            "grpc-message",
            wire::percent_encode(message).parse().expect("message"),
        );
        headers
    };
    let mut response = http::Response::new(());
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    match outcome {
        Outcome::TrailersOnly(code, message) => {
            response.headers_mut().extend(grpc_headers(code, &message));
            let _ = respond.send_response(response, true);
        }
        Outcome::Status(code, message) => {
            if let Ok(mut stream) = respond.send_response(response, false) {
                let _ = stream.send_trailers(grpc_headers(code, &message));
            }
        }
        Outcome::Chain(cert_chain) => {
            if let Ok(mut stream) = respond.send_response(response, false) {
                let message = IstioCertificateResponse { cert_chain };
                let _ = stream.send_data(wire::frame(&message), false);
                let _ = stream.send_trailers(grpc_headers(Code::OK, ""));
            }
        }
    }
}

async fn decide(
    request: http::Request<h2::RecvStream>,
    pki: &TestPki,
    state: &Mutex<State>,
) -> Outcome {
    let (parts, mut body) = request.into_parts();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let mut seen = Seen {
        authorization: header("authorization"),
        cluster_id: header("clusterid"),
        content_type: header("content-type"),
        te: header("te"),
        grpc_timeout: header("grpc-timeout"),
        ..Seen::default()
    };
    if parts.uri.path() != wire::CREATE_CERTIFICATE_PATH {
        return Outcome::TrailersOnly(Code::UNIMPLEMENTED, "unknown method".into());
    }
    let mut bytes = Vec::new();
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    let request = wire::unframe_unary(&bytes)
        .ok()
        .and_then(|payload| IstioCertificateRequest::decode(payload).ok());
    if let Some(request) = &request {
        seen.impersonated = request.impersonated_identity().map(str::to_owned);
        seen.validity_duration = request.validity_duration;
    }
    let csr = request
        .as_ref()
        .and_then(|r| CertificateSigningRequestParams::from_pem(&r.csr).ok());
    if let Some(csr) = &csr {
        seen.csr_uris = uris(&csr.params.subject_alt_names);
    }
    let (mode, roots_pem, max_validity) = {
        let mut state = state.lock().expect("state");
        state.requests.push(seen.clone());
        (
            state.mode.clone(),
            state.roots_pem.clone(),
            state.max_validity,
        )
    };
    // istiod authenticates before anything else, and answers a failure trailers-only.
    if seen.authorization.as_deref() != Some(&format!("Bearer {TOKEN}")) {
        return Outcome::TrailersOnly(
            Code::UNAUTHENTICATED,
            "request authenticate failure: token is not valid".into(),
        );
    }
    let Some(csr) = csr else {
        return Outcome::TrailersOnly(Code::INVALID_ARGUMENT, "CSR does not parse".into());
    };
    if let Some(impersonated) = &seen.impersonated {
        if seen.csr_uris != [impersonated.clone()] {
            return Outcome::TrailersOnly(
                Code::PERMISSION_DENIED,
                format!("CSR is not for the impersonated identity {impersonated}"),
            );
        }
    }
    let requested = match seen.validity_duration {
        secs if secs > 0 => Duration::from_secs(secs as u64),
        _ => DEFAULT_VALIDITY,
    };
    let validity = max_validity.map_or(requested, |max| requested.min(max));
    let mut params = csr.params.clone();
    let mut own_key = None;
    let leaf_only = matches!(mode, Mode::LeafOnly);
    match mode {
        Mode::Fail(code, message) => return Outcome::Status(code, message),
        Mode::Delay(delay) => tokio::time::sleep(delay).await,
        Mode::OtherIdentity(uri) => {
            params.subject_alt_names = vec![SanType::URI(uri.try_into().expect("uri"))];
        }
        Mode::OtherKey => {
            own_key = Some(KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key"));
        }
        Mode::Issue | Mode::LeafOnly => {}
    }
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + validity;
    crate::ca::mark_workload_leaf(&mut params);
    let signed = match &own_key {
        Some(key) => params.signed_by(key, &pki.intermediate),
        None => CertificateSigningRequestParams {
            params,
            public_key: csr.public_key.clone(),
        }
        .signed_by(&pki.intermediate),
    };
    let leaf = match signed {
        Ok(leaf) => leaf,
        Err(e) => return Outcome::TrailersOnly(Code::INTERNAL, e.to_string()),
    };
    if leaf_only {
        return Outcome::Chain(vec![leaf.pem()]);
    }
    Outcome::Chain(vec![leaf.pem(), pki.intermediate_pem.clone(), roots_pem])
}

fn uris(sans: &[SanType]) -> Vec<String> {
    sans.iter()
        .filter_map(|san| match san {
            SanType::URI(uri) => Some(uri.as_str().to_owned()),
            _ => None,
        })
        .collect()
}
