use std::time::{Duration, SystemTime};

use ctrl_agent::ca::{IssuedCert, LocalCa};

use super::*;

const HOUR: Duration = Duration::from_secs(3600);

fn id(s: &str) -> SpiffeId {
    s.parse().expect("test id")
}

fn identity(cert: IssuedCert, spiffe: &str) -> Identity {
    Identity {
        spiffe_id: spiffe.into(),
        cert_chain: cert.chain,
        private_key: cert.key_pkcs8,
        not_before_unix: cert.not_before_unix,
        not_after_unix: cert.not_after_unix,
    }
}

/// A certificate for `spiffe` from `ca`, valid for an hour (also used by other modules' tests).
pub(crate) fn issue(ca: &LocalCa, spiffe: &str) -> Identity {
    identity(
        ca.issue(&id(spiffe), SystemTime::now(), HOUR)
            .expect("issue"),
        spiffe,
    )
}

const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/default/sa/server";

/// Runs a handshake between the two configs in memory; returns the server's view of the client
/// identity, or the first error either side hit.
fn handshake(
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
) -> Result<SpiffeId, rustls::Error> {
    let addr = "10.0.0.1:15008".parse().expect("addr");
    let mut c = rustls::ClientConnection::new(client, placeholder_server_name(addr))?;
    let mut s = rustls::ServerConnection::new(server)?;
    for _ in 0..10 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).expect("write to vec");
        }
        let mut rd = buf.as_slice();
        while !rd.is_empty() {
            s.read_tls(&mut rd).expect("read from slice");
        }
        s.process_new_packets()?;
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).expect("write to vec");
        }
        let mut rd = buf.as_slice();
        while !rd.is_empty() {
            c.read_tls(&mut rd).expect("read from slice");
        }
        c.process_new_packets()?;
        if !c.is_handshaking() && !s.is_handshaking() {
            return Ok(peer_identity(&s).expect("server sees a client identity"));
        }
    }
    panic!("handshake did not finish");
}

fn setup() -> (LocalCa, TrustBundle) {
    let ca = LocalCa::generate("cluster.local").expect("ca");
    let trust = TrustBundle::new(&[ca.root_der().to_vec()]).expect("trust");
    (ca, trust)
}

#[test]
fn mutual_handshake_succeeds_and_the_server_learns_the_client_identity() {
    let (ca, trust) = setup();
    let client = client_config(&issue(&ca, CLIENT), &trust, id(SERVER)).expect("client");
    let server = server_config(&issue(&ca, SERVER), &trust, "cluster.local").expect("server");
    assert_eq!(client.alpn_protocols, vec![b"h2".to_vec()]);
    assert_eq!(handshake(client, server).expect("handshake"), id(CLIENT));
}

#[test]
fn server_with_another_identity_than_expected_is_refused() {
    let (ca, trust) = setup();
    let other = "spiffe://cluster.local/ns/default/sa/impostor";
    let client = client_config(&issue(&ca, CLIENT), &trust, id(SERVER)).expect("client");
    let server = server_config(&issue(&ca, other), &trust, "cluster.local").expect("server");
    let err = handshake(client, server).expect_err("must fail");
    assert!(
        err.to_string().contains("is not the expected"),
        "unexpected error: {err}"
    );
}

#[test]
fn client_certificate_from_another_ca_is_refused() {
    let (ca, trust) = setup();
    let rogue = LocalCa::generate("cluster.local").expect("rogue ca");
    let rogue_trust = TrustBundle::new(&[rogue.root_der().to_vec()]).expect("trust");
    // The rogue client trusts the real server (so only the server's check can stop it).
    let mixed =
        TrustBundle::new(&[ca.root_der().to_vec(), rogue.root_der().to_vec()]).expect("trust");
    let client = client_config(&issue(&rogue, CLIENT), &mixed, id(SERVER)).expect("client");
    let server = server_config(&issue(&ca, SERVER), &trust, "cluster.local").expect("server");
    let err = handshake(client, server).expect_err("must fail");
    assert!(
        // Same issuer name, other key: found by name, refused by signature.
        matches!(
            err,
            rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature
            )
        ),
        "unexpected error: {err:?}"
    );
    drop(rogue_trust);
}

#[test]
fn client_from_another_trust_domain_is_refused() {
    let (ca, trust) = setup();
    let foreign = "spiffe://other.domain/ns/default/sa/client";
    let client = client_config(&issue(&ca, foreign), &trust, id(SERVER)).expect("client");
    let server = server_config(&issue(&ca, SERVER), &trust, "cluster.local").expect("server");
    let err = handshake(client, server).expect_err("must fail");
    assert!(err.to_string().contains("outside trust domain"), "{err}");
}

#[test]
fn expired_and_not_yet_valid_server_certificates_are_refused() {
    let (ca, trust) = setup();
    let now = SystemTime::now();
    let expired = ca
        .issue_between(&id(SERVER), now - 2 * HOUR, now - HOUR)
        .expect("issue");
    let future = ca
        .issue_between(&id(SERVER), now + HOUR, now + 2 * HOUR)
        .expect("issue");
    for (cert, want) in [(expired, "expired"), (future, "not valid yet")] {
        let client = client_config(&issue(&ca, CLIENT), &trust, id(SERVER)).expect("client");
        let server =
            server_config(&identity(cert, SERVER), &trust, "cluster.local").expect("server");
        let err = handshake(client, server).expect_err("must fail");
        assert!(
            err.to_string().to_lowercase().contains(want),
            "wanted {want}: {err}"
        );
    }
}

#[test]
fn certificates_without_exactly_one_spiffe_id_are_refused() {
    let (ca, trust) = setup();
    let now = SystemTime::now();
    let two = ca
        .issue_with_uris(&[SERVER.into(), CLIENT.into()], now, now + HOUR)
        .expect("issue");
    let client = client_config(&issue(&ca, CLIENT), &trust, id(SERVER)).expect("client");
    let server = server_config(&identity(two, SERVER), &trust, "cluster.local").expect("server");
    let err = handshake(client, server).expect_err("must fail");
    assert!(err.to_string().contains("2 SPIFFE URI SANs"), "{err}");

    let none = ca
        .issue_with_uris(&["https://example.com/x".into()], now, now + HOUR)
        .expect("issue");
    let client = client_config(&issue(&ca, CLIENT), &trust, id(SERVER)).expect("client");
    let server = server_config(&identity(none, SERVER), &trust, "cluster.local").expect("server");
    let err = handshake(client, server).expect_err("must fail");
    assert!(err.to_string().contains("no SPIFFE URI SAN"), "{err}");
}

#[test]
fn several_roots_are_trusted_during_a_rotation() {
    let old = LocalCa::generate("cluster.local").expect("old");
    let new = LocalCa::generate("cluster.local").expect("new");
    let both =
        TrustBundle::new(&[old.root_der().to_vec(), new.root_der().to_vec()]).expect("trust");
    let client = client_config(&issue(&old, CLIENT), &both, id(SERVER)).expect("client");
    let server = server_config(&issue(&new, SERVER), &both, "cluster.local").expect("server");
    assert_eq!(handshake(client, server).expect("handshake"), id(CLIENT));
}

#[test]
fn refusals_are_classified_by_reason() {
    let (ca, trust) = setup();
    let now = SystemTime::now();
    let as_io = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let refusal = |server_cert: Identity, client_id: &str, trust_domain: &str| {
        let client = client_config(&issue(&ca, client_id), &trust, id(SERVER)).expect("client");
        let server = server_config(&server_cert, &trust, trust_domain).expect("server");
        Refusal::of(&as_io(handshake(client, server).expect_err("refused")))
    };
    let expired = identity(
        ca.issue_between(&id(SERVER), now - 2 * HOUR, now - HOUR)
            .expect("issue"),
        SERVER,
    );
    assert_eq!(refusal(expired, CLIENT, "cluster.local"), Refusal::Expired);
    let future = identity(
        ca.issue_between(&id(SERVER), now + HOUR, now + 2 * HOUR)
            .expect("issue"),
        SERVER,
    );
    assert_eq!(
        refusal(future, CLIENT, "cluster.local"),
        Refusal::NotYetValid
    );
    let impostor = issue(&ca, "spiffe://cluster.local/ns/default/sa/impostor");
    assert_eq!(
        refusal(impostor, CLIENT, "cluster.local"),
        Refusal::UnexpectedIdentity
    );
    assert_eq!(
        refusal(
            issue(&ca, SERVER),
            "spiffe://elsewhere/ns/a/sa/b",
            "cluster.local"
        ),
        Refusal::TrustDomain
    );
    assert_eq!(
        Refusal::of(&as_io(rustls::Error::NoCertificatesPresented)),
        Refusal::NoClientCertificate
    );
    assert_eq!(
        Refusal::of(&std::io::Error::from(std::io::ErrorKind::TimedOut)),
        Refusal::Other
    );
}
