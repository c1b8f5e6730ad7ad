//! The client against a fake istiod (`fake_istiod`): a double of istiod's CA service, since no
//! istiod can run on this machine. It speaks the same TLS + HTTP/2 + gRPC protocol on loopback.

use std::path::Path;
use std::sync::Arc;

use mesh_snapshot::test_support::ScratchDir;

use super::fake_istiod::{FakeIstiod, Mode, TestPki, SERVER_NAME, TOKEN};
use super::*;

const TTL: Duration = Duration::from_secs(3600);

fn spiffe(sa: &str) -> SpiffeId {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
        .parse()
        .expect("id")
}

/// A client of `fake` with the token and root files in `dir`.
fn config(dir: &Path, fake: &FakeIstiod, roots_pem: &str) -> IstioCaConfig {
    std::fs::write(dir.join("root-cert.pem"), roots_pem).expect("write roots");
    // As the kubelet writes it: no newline; a trailing one is tested separately.
    std::fs::write(dir.join("istio-token"), TOKEN).expect("write token");
    let mut config = IstioCaConfig::new(fake.address(), dir.join("root-cert.pem"));
    config.token_file = dir.join("istio-token");
    config.cluster_id = "cluster-7".into();
    config.tls_server_name = Some(SERVER_NAME.into());
    config.connect_timeout = Duration::from_secs(2);
    config.call_timeout = Duration::from_secs(2);
    config
}

fn setup() -> (ScratchDir, Arc<TestPki>, FakeIstiod, IstioCaClient) {
    let dir = ScratchDir::new().expect("scratch dir");
    let pki = Arc::new(TestPki::new("istiod"));
    let fake = FakeIstiod::start(pki.clone());
    let client = IstioCaClient::new(config(dir.path(), &fake, &pki.root_pem)).expect("client");
    (dir, pki, fake, client)
}

fn verify_against(cert: &IssuedCert, roots: &[Vec<u8>]) -> Result<(), crate::ca::ChainError> {
    crate::ca::verify_chain(&cert.chain, roots, UnixTime::now())
}

#[test]
fn issues_a_certificate_for_the_exact_identity_that_chains_to_the_ca_root() {
    let (_dir, pki, fake, mut client) = setup();
    let id = spiffe("client");
    let now = SystemTime::now();
    let cert = client.issue(&id, now, TTL).expect("issued");

    // Leaf and intermediate; the root is a trust anchor, not part of what is presented.
    assert_eq!(cert.chain.len(), 2);
    let leaf = CertificateDer::from(cert.chain[0].as_slice());
    assert_eq!(mesh_io::tls::spiffe_id_of(&leaf).expect("identity"), id);
    verify_against(&cert, std::slice::from_ref(&pki.root_der)).expect("chains to the root");
    let other = TestPki::new("another mesh");
    assert!(verify_against(&cert, &[other.root_der]).is_err());

    // The private key is the leaf's.
    let key = KeyPair::try_from(cert.key_pkcs8.as_slice()).expect("PKCS#8 key");
    let (_, parsed) = x509_parser::parse_x509_certificate(&cert.chain[0]).expect("leaf");
    assert_eq!(
        parsed.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
    // Validity as the CA set it: backdated two minutes, valid for the requested TTL.
    let now_unix = now.duration_since(UNIX_EPOCH).expect("clock").as_secs() as i64;
    assert!((cert.not_before_unix - (now_unix - 120)).abs() <= 2);
    assert!((cert.not_after_unix - (now_unix + 3600)).abs() <= 2);
    assert_eq!(
        cert.not_before_unix,
        parsed.validity().not_before.timestamp()
    );

    // The request as ztunnel sends it.
    let seen = fake.requests();
    assert_eq!(seen.len(), 1);
    let seen = &seen[0];
    assert_eq!(
        seen.authorization.as_deref(),
        Some("Bearer projected-token-of-ztunnel")
    );
    assert_eq!(seen.cluster_id.as_deref(), Some("cluster-7"));
    assert_eq!(seen.content_type.as_deref(), Some("application/grpc"));
    assert_eq!(seen.te.as_deref(), Some("trailers"));
    assert_eq!(seen.grpc_timeout.as_deref(), Some("2000m"));
    assert_eq!(seen.impersonated.as_deref(), Some(id.to_string().as_str()));
    assert_eq!(seen.validity_duration, 3600);
    assert_eq!(seen.csr_uris, [id.to_string()]);

    assert_eq!(client.trust_roots(), std::slice::from_ref(&pki.root_der));
}

#[test]
fn the_connection_is_kept_between_calls_and_each_call_has_a_fresh_key() {
    let (_dir, _pki, fake, mut client) = setup();
    let first = client
        .issue(&spiffe("a"), SystemTime::now(), TTL)
        .expect("first");
    let second = client
        .issue(&spiffe("a"), SystemTime::now(), TTL)
        .expect("second");
    assert_ne!(first.key_pkcs8, second.key_pkcs8);
    assert_ne!(first.chain[0], second.chain[0]);
    assert_eq!(fake.requests().len(), 2);
    assert_eq!(fake.connections(), 1);
}

#[test]
fn a_rejected_token_is_reported_as_unauthenticated_with_the_message_and_the_token_is_reread() {
    let (dir, _pki, fake, mut client) = setup();
    std::fs::write(dir.path().join("istio-token"), "expired-token").expect("write");
    let error = client
        .issue(&spiffe("a"), SystemTime::now(), TTL)
        .expect_err("refused");
    match &error {
        IstioCaError::Status { code, message } => {
            assert_eq!(*code, Code::UNAUTHENTICATED);
            assert_eq!(message, "request authenticate failure: token is not valid");
        }
        other => panic!("expected a gRPC status, got {other:?}"),
    }
    assert_eq!(
        error.to_string(),
        "CA refused the request: UNAUTHENTICATED (16): request authenticate failure: token is \
         not valid"
    );
    assert!(!error.is_transport());
    assert_eq!(
        fake.requests()[0].authorization.as_deref(),
        Some("Bearer expired-token")
    );

    // The kubelet rotates the token: the next request reads the new one (newline and all).
    std::fs::write(dir.path().join("istio-token"), format!("{TOKEN}\n")).expect("write");
    client
        .issue(&spiffe("a"), SystemTime::now(), TTL)
        .expect("issued with the new token");

    std::fs::write(dir.path().join("istio-token"), "").expect("write");
    let error = client
        .issue(&spiffe("a"), SystemTime::now(), TTL)
        .expect_err("no token");
    assert!(
        matches!(&error, IstioCaError::Token { problem, .. } if problem == "is empty"),
        "{error}"
    );
}

#[test]
fn a_status_in_the_trailers_is_reported_with_code_and_message() {
    let (_dir, _pki, fake, mut client) = setup();
    fake.set_mode(Mode::Fail(
        Code::INTERNAL,
        "failed to sign: CA key unavailable".into(),
    ));
    let error = client
        .issue(&spiffe("a"), SystemTime::now(), TTL)
        .expect_err("refused");
    assert!(
        matches!(&error, IstioCaError::Status { code, message }
            if *code == Code::INTERNAL && message == "failed to sign: CA key unavailable"),
        "{error}"
    );
}

#[test]
fn a_certificate_for_another_identity_is_refused() {
    let (_dir, _pki, fake, mut client) = setup();
    fake.set_mode(Mode::OtherIdentity(
        "spiffe://cluster.local/ns/kube-system/sa/admin".into(),
    ));
    let error = client
        .issue(&spiffe("client"), SystemTime::now(), TTL)
        .expect_err("refused");
    match &error {
        IstioCaError::WrongIdentity { expected, found } => {
            assert_eq!(*expected, spiffe("client"));
            assert_eq!(found, "spiffe://cluster.local/ns/kube-system/sa/admin");
        }
        other => panic!("expected a wrong identity, got {other:?}"),
    }
    assert!(
        client.trust_roots().len() == 1,
        "nothing taken from the answer"
    );
}

#[test]
fn a_certificate_for_another_key_is_refused() {
    let (_dir, _pki, fake, mut client) = setup();
    fake.set_mode(Mode::OtherKey);
    let error = client
        .issue(&spiffe("client"), SystemTime::now(), TTL)
        .expect_err("refused");
    assert!(matches!(error, IstioCaError::KeyMismatch), "{error}");
}

#[test]
fn a_chain_without_its_root_is_malformed() {
    let (_dir, _pki, fake, mut client) = setup();
    fake.set_mode(Mode::LeafOnly);
    let error = client
        .issue(&spiffe("client"), SystemTime::now(), TTL)
        .expect_err("refused");
    assert!(
        matches!(&error, IstioCaError::Malformed(p) if p.contains("no root")),
        "{error}"
    );
}

#[test]
fn a_chain_to_a_root_that_did_not_sign_it_does_not_verify() {
    let (_dir, _pki, fake, mut client) = setup();
    fake.set_roots_pem(TestPki::new("impostor").root_pem);
    let error = client
        .issue(&spiffe("client"), SystemTime::now(), TTL)
        .expect_err("refused");
    assert!(matches!(error, IstioCaError::Chain(_)), "{error}");
}

#[test]
fn a_certificate_that_is_not_valid_at_now_is_refused() {
    let (_dir, _pki, _fake, mut client) = setup();
    let in_two_days = SystemTime::now() + Duration::from_secs(2 * 24 * 3600);
    let error = client
        .issue(&spiffe("client"), in_two_days, TTL)
        .expect_err("refused");
    assert!(
        matches!(&error, IstioCaError::NotValid(p) if p.starts_with("expired at")),
        "{error}"
    );
}

#[test]
fn a_slow_ca_times_out_and_the_next_call_goes_through() {
    let (dir, pki, fake, _) = setup();
    let mut config = config(dir.path(), &fake, &pki.root_pem);
    config.call_timeout = Duration::from_millis(300);
    let mut client = IstioCaClient::new(config).expect("client");
    fake.set_mode(Mode::Delay(Duration::from_secs(3)));
    let started = std::time::Instant::now();
    let error = client
        .issue(&spiffe("a"), SystemTime::now(), TTL)
        .expect_err("timed out");
    assert!(
        matches!(&error, IstioCaError::Timeout { what: "answer", .. }),
        "{error}"
    );
    assert!(error.is_transport());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the timeout held"
    );
    fake.set_mode(Mode::Issue);
    client
        .issue(&spiffe("a"), SystemTime::now(), TTL)
        .expect("issued");
}

#[test]
fn a_stopped_ca_is_unreachable_and_used_again_once_it_is_back() {
    let (_dir, _pki, mut fake, mut client) = setup();
    client
        .issue(&spiffe("a"), SystemTime::now(), TTL)
        .expect("issued");
    fake.stop();
    // The kept connection is dead; the retry on a new one is refused.
    let error = client
        .issue(&spiffe("a"), SystemTime::now(), TTL)
        .expect_err("down");
    assert!(
        matches!(&error, IstioCaError::Unreachable { problem, .. } if problem.contains("refused")),
        "{error}"
    );
    fake.restart();
    client
        .issue(&spiffe("a"), SystemTime::now(), TTL)
        .expect("issued again");
    assert_eq!(fake.connections(), 2);
}

#[test]
fn a_kept_connection_closed_by_the_ca_is_replaced_without_an_error() {
    let (_dir, _pki, mut fake, mut client) = setup();
    client
        .issue(&spiffe("a"), SystemTime::now(), TTL)
        .expect("issued");
    // istiod restarts between two renewals: the kept connection is closed under the client.
    fake.restart();
    client
        .issue(&spiffe("a"), SystemTime::now(), TTL)
        .expect("issued on a new connection");
    assert_eq!(fake.connections(), 2);
}

#[test]
fn istiod_tls_is_checked_against_the_root_file_and_the_server_name() {
    let dir = ScratchDir::new().expect("scratch dir");
    let pki = Arc::new(TestPki::new("istiod"));
    let fake = FakeIstiod::start(pki.clone());

    let stranger = TestPki::new("stranger");
    let mut client =
        IstioCaClient::new(config(dir.path(), &fake, &stranger.root_pem)).expect("client");
    let error = client
        .issue(&spiffe("a"), SystemTime::now(), TTL)
        .expect_err("untrusted istiod");
    assert!(
        matches!(&error, IstioCaError::Tls { source, .. } if source.to_string().contains("UnknownIssuer")),
        "{error}"
    );

    // By IP without --ca-tls-server-name: istiod's certificate does not name 127.0.0.1.
    let mut config = config(dir.path(), &fake, &pki.root_pem);
    config.tls_server_name = None;
    let mut client = IstioCaClient::new(config).expect("client");
    let error = client
        .issue(&spiffe("a"), SystemTime::now(), TTL)
        .expect_err("wrong name");
    assert!(matches!(error, IstioCaError::Tls { .. }), "{error}");
    assert!(fake.requests().is_empty(), "no token was sent to either");
}

#[test]
fn the_trust_bundle_holds_every_root_of_the_file_and_of_the_chains_once() {
    let dir = ScratchDir::new().expect("scratch dir");
    let pki = Arc::new(TestPki::new("istiod"));
    let fake = FakeIstiod::start(pki.clone());
    // Mid-rotation: the root file holds the old root and the new one.
    let next = TestPki::new("next root");
    let file = format!("{}{}", pki.root_pem, next.root_pem);
    let mut client = IstioCaClient::new(config(dir.path(), &fake, &file)).expect("client");
    assert_eq!(
        client.trust_roots(),
        [pki.root_der.clone(), next.root_der.clone()]
    );
    // The CA ends its chains with its root (already known) and a third one, concatenated in
    // the last entry as istiod does.
    let third = TestPki::new("third root");
    fake.set_roots_pem(format!("{}\n{}", pki.root_pem, third.root_pem));
    let cert = client
        .issue(&spiffe("a"), SystemTime::now(), TTL)
        .expect("issued");
    client
        .issue(&spiffe("b"), SystemTime::now(), TTL)
        .expect("issued");
    assert_eq!(
        client.trust_roots(),
        [pki.root_der.clone(), next.root_der.clone(), third.root_der]
    );
    assert_eq!(
        cert.chain.len(),
        2,
        "roots are not part of the presented chain"
    );
    // Once no identity holds a chain to the third root, only the file's roots remain.
    client.retain_identities(&[spiffe("b")]);
    assert_eq!(client.trust_roots().len(), 3);
    client.retain_identities(&[]);
    assert_eq!(client.trust_roots(), [pki.root_der.clone(), next.root_der]);
}

#[test]
fn a_root_file_that_cannot_be_read_again_keeps_the_roots_read_before() {
    let (dir, pki, _fake, mut client) = setup();
    std::fs::write(dir.path().join("root-cert.pem"), "not a certificate").expect("write");
    client
        .issue(&spiffe("a"), SystemTime::now(), TTL)
        .expect("issued on the kept connection");
    assert_eq!(client.trust_roots(), std::slice::from_ref(&pki.root_der));
}

#[test]
fn bad_configuration_is_refused_before_any_request() {
    let dir = ScratchDir::new().expect("scratch dir");
    let pki = TestPki::new("istiod");
    let roots = dir.path().join("roots.pem");
    std::fs::write(&roots, &pki.root_pem).expect("write");
    let cases: [(&str, &str); 6] = [
        ("http://istiod:15010", "only https is supported"),
        ("https://istiod:15012/v1", "must not have a path"),
        ("https://", "not a URL"),
        ("https://istiod:99999", "port 99999 is not in 1-65535"),
        ("https://istiod:0", "port 0 is not in 1-65535"),
        (
            "https://user:pw@istiod:15012",
            "must not carry user information",
        ),
    ];
    for (address, problem) in cases {
        match IstioCaClient::new(IstioCaConfig::new(address, &roots)) {
            Err(IstioCaError::Address { problem: found, .. }) => {
                assert!(found.contains(problem), "{address}: {found}")
            }
            other => panic!("{address}: expected an address error, got {other:?}"),
        }
    }
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").expect("write");
    assert!(matches!(
        IstioCaClient::new(IstioCaConfig::new("istiod:15012", &empty)),
        Err(IstioCaError::Roots { .. })
    ));
    let mut config = IstioCaConfig::new("istiod:15012", &roots);
    config.cluster_id = "bad\nid".into();
    assert!(IstioCaClient::new(config).is_err());
}

#[test]
fn addresses_without_scheme_or_port_and_ipv6_literals_are_understood() {
    let endpoint = Endpoint::parse("istiod.istio-system.svc:15012", None).expect("parses");
    assert_eq!(endpoint.display, "https://istiod.istio-system.svc:15012");
    assert_eq!(
        endpoint.uri.to_string(),
        "https://istiod.istio-system.svc:15012/istio.v1.auth.IstioCertificateService/CreateCertificate"
    );
    assert_eq!(
        (endpoint.host.as_str(), endpoint.port),
        ("istiod.istio-system.svc", 15012)
    );
    let endpoint = Endpoint::parse("https://istiod", None).expect("parses");
    assert_eq!(endpoint.port, 443);
    let endpoint = Endpoint::parse("https://[::1]:15012", Some(SERVER_NAME)).expect("parses");
    assert_eq!(endpoint.host, "::1");
    assert_eq!(
        endpoint.server_name,
        ServerName::try_from(SERVER_NAME).expect("name")
    );
}

#[test]
fn the_client_debug_output_shows_no_secret() {
    let (dir, _pki, _fake, client) = setup();
    let shown = format!("{client:?}");
    assert!(shown.contains("istio-token"), "{shown}");
    assert!(!shown.contains(TOKEN), "{shown}");
    drop(dir);
}
