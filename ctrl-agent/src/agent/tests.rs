use std::path::Path;

use mesh_snapshot::{ReadOutcome, Snapshot, Subscriber};

use super::*;
use crate::ca::LocalCa;

const CONFIG: &str = r#"
workloads:
  - {uid: c1, name: client, serviceAccount: client, ips: [10.0.1.2], node: node-1, netns: /run/netns/c1}
  - {uid: s1, name: server, serviceAccount: server, ips: [10.0.2.2], node: node-2, netns: /run/netns/s1}
"#;

const DAY: Duration = Duration::from_secs(24 * 3600);

fn agent(dir: &Path) -> Agent {
    std::fs::write(dir.join("mesh.yaml"), CONFIG).expect("write config");
    let options = AgentOptions {
        source: crate::source::SourceOptions::File(dir.join("mesh.yaml")),
        node: "node-1".into(),
        snapshot_path: dir.join("snapshot"),
        owner: None,
        cert_ttl: DAY,
        extra_roots: Vec::new(),
        state_dir: dir.join("state"),
    };
    Agent::new(options, LocalCa::generate("cluster.local").expect("ca")).expect("agent")
}

/// The complete snapshot if anything was published since the last read.
fn read(sub: &mut Subscriber) -> Option<Snapshot> {
    sub.resync();
    match sub.read().expect("region readable") {
        ReadOutcome::New { base, deltas, .. } => {
            mesh_snapshot::delta::replay(None, base.as_ref(), &deltas)
                .expect("decodes")
                .map(|state| state.snapshot())
        }
        ReadOutcome::Unchanged => None,
    }
}

#[test]
fn publishes_routing_for_all_and_namespaces_and_keys_for_this_node_only() {
    let dir = mesh_snapshot::test_support::ScratchDir::new().expect("scratch dir");
    let mut agent = agent(dir.path());
    let now = SystemTime::now();
    assert!(matches!(agent.tick(now).expect("tick"), Tick::Published(v) if v.generation == 1));
    let snap = read(&mut Subscriber::new(dir.path().join("snapshot"))).expect("published");
    assert_eq!(snap.node, "node-1");
    assert_eq!(snap.workloads.len(), 2);
    let netns: Vec<_> = snap
        .workloads
        .iter()
        .map(|w| w.netns_path.as_str())
        .collect();
    assert_eq!(
        netns,
        ["/run/netns/c1", ""],
        "other nodes' namespaces are not ours to enter"
    );
    let ids: Vec<_> = snap
        .identities
        .iter()
        .map(|i| i.spiffe_id.as_str())
        .collect();
    assert_eq!(ids, ["spiffe://cluster.local/ns/default/sa/client"]);
    assert!(!snap.identities[0].private_key.is_empty());
    assert_eq!(snap.trust_roots.len(), 1);
    assert_eq!(agent.tick(now).expect("tick"), Tick::Unchanged);
    // The region's use, as scraped: the base written, and the file's pages hold it.
    let metrics = agent.metrics();
    let base = scraped(&metrics, "meshagent_snapshot_base_bytes");
    assert!(base > 0.0);
    assert!(scraped(&metrics, "meshagent_snapshot_region_memory_bytes") >= base);
    assert_eq!(
        scraped(&metrics, "meshagent_snapshot_slot_capacity_bytes"),
        mesh_snapshot::region::DEFAULT_SLOT_CAPACITY as f64
    );
}

#[test]
fn a_bad_file_is_refused_with_the_field_named_and_the_last_good_snapshot_stays() {
    let dir = mesh_snapshot::test_support::ScratchDir::new().expect("scratch dir");
    let mut agent = agent(dir.path());
    let now = SystemTime::now();
    agent.tick(now).expect("first publish");
    let mut sub = Subscriber::new(dir.path().join("snapshot"));
    read(&mut sub).expect("generation 1");

    std::fs::write(
        dir.path().join("mesh.yaml"),
        CONFIG.replace("10.0.2.2", "10.0.2.999"),
    )
    .expect("write");
    match agent.tick(now) {
        Err(AgentError::Config { problem, .. }) => {
            assert_eq!(problem.field, "workloads[1].ips[0]");
            assert!(problem.problem.contains("invalid IP address"), "{problem}");
        }
        other => panic!("expected a config error, got {other:?}"),
    }
    assert!(read(&mut sub).is_none(), "nothing new was published");
    // The SRE's view: the source is refused now, it went bad once, and the agent is still
    // ready (the data plane has the last good snapshot).
    let scraped = |agent: &Agent, series: &str| scraped(&agent.metrics(), series);
    assert_eq!(scraped(&agent, "meshagent_source_refused"), 1.0);
    assert_eq!(scraped(&agent, "meshagent_source_refusals_total"), 1.0);
    assert_eq!(agent.metrics().readiness(), Ok(()));
    // Still bad at the next tick: the same refusal, not another.
    assert_eq!(
        agent.tick(now).expect("unchanged bad file"),
        Tick::Unchanged
    );
    assert_eq!(scraped(&agent, "meshagent_source_refusals_total"), 1.0);

    let fixed = CONFIG.replace("10.0.2.2", "10.0.2.3");
    std::fs::write(dir.path().join("mesh.yaml"), &fixed).expect("write");
    assert!(matches!(agent.tick(now).expect("tick"), Tick::Published(v) if v.generation == 2));
    let snap = read(&mut sub).expect("generation 2");
    assert_eq!(snap.workloads[1].ips, vec![vec![10, 0, 2, 3]]);
    assert_eq!(scraped(&agent, "meshagent_source_refused"), 0.0);
    assert_eq!(scraped(&agent, "meshagent_snapshot_generation"), 2.0);

    // A file that goes away is refused at every tick until it is back, and its return (the
    // same bytes as before) makes the source good again.
    std::fs::remove_file(dir.path().join("mesh.yaml")).expect("remove");
    assert!(matches!(agent.tick(now), Err(AgentError::Read { .. })));
    assert!(matches!(agent.tick(now), Err(AgentError::Read { .. })));
    assert_eq!(scraped(&agent, "meshagent_source_refused"), 1.0);
    assert_eq!(scraped(&agent, "meshagent_source_refusals_total"), 2.0);
    std::fs::write(dir.path().join("mesh.yaml"), &fixed).expect("write");
    assert_eq!(
        agent.tick(now).expect("tick"),
        Tick::Unchanged,
        "nothing changed"
    );
    assert_eq!(scraped(&agent, "meshagent_source_refused"), 0.0);
}

/// The value of an unlabelled `series` as the agent's `/metrics` shows it.
fn scraped(metrics: &crate::metrics::AgentMetrics, series: &str) -> f64 {
    crate::metrics::tests::value(&metrics.render(None, false), series)
}

#[test]
fn certificates_are_renewed_after_half_their_lifetime() {
    let dir = mesh_snapshot::test_support::ScratchDir::new().expect("scratch dir");
    let mut agent = agent(dir.path());
    let start = SystemTime::now();
    agent.tick(start).expect("publish");
    let mut sub = Subscriber::new(dir.path().join("snapshot"));
    let first = read(&mut sub).expect("published").identities[0].clone();

    assert_eq!(agent.tick(start + DAY / 3).expect("tick"), Tick::Unchanged);
    assert!(matches!(
        agent.tick(start + DAY * 6 / 10).expect("tick"),
        Tick::Published(_)
    ));
    let renewed = read(&mut sub).expect("republished").identities[0].clone();
    assert_ne!(renewed.cert_chain, first.cert_chain);
    assert!(renewed.not_after_unix > first.not_after_unix);
}

#[test]
fn a_short_lived_certificate_is_renewed_at_half_its_ttl_not_on_every_tick() {
    let dir = mesh_snapshot::test_support::ScratchDir::new().expect("scratch dir");
    std::fs::write(dir.path().join("mesh.yaml"), CONFIG).expect("write config");
    let options = AgentOptions {
        source: crate::source::SourceOptions::File(dir.path().join("mesh.yaml")),
        node: "node-1".into(),
        snapshot_path: dir.path().join("snapshot"),
        owner: None,
        cert_ttl: Duration::from_secs(4),
        extra_roots: Vec::new(),
        state_dir: dir.path().join("state"),
    };
    let mut agent =
        Agent::new(options, LocalCa::generate("cluster.local").expect("ca")).expect("agent");
    // Validity is in whole seconds: start on one so the expectations below are exact.
    let whole = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(whole);
    agent.tick(start).expect("first publish");
    for ms in [100, 500, 1900] {
        assert_eq!(
            agent.tick(start + Duration::from_millis(ms)).expect("tick"),
            Tick::Unchanged,
            "renewed after {ms} ms"
        );
    }
    assert!(matches!(
        agent
            .tick(start + Duration::from_millis(2500))
            .expect("tick"),
        Tick::Published(_)
    ));
}

#[test]
fn a_one_pod_change_goes_out_as_a_delta_of_that_pod_alone() {
    let dir = mesh_snapshot::test_support::ScratchDir::new().expect("scratch dir");
    let mut agent = agent(dir.path());
    let now = SystemTime::now();
    agent.tick(now).expect("first publish");
    let mut sub = Subscriber::new(dir.path().join("snapshot"));
    let first = match sub.read().expect("read") {
        ReadOutcome::New {
            base: Some(base),
            deltas,
            ..
        } if deltas.is_empty() => mesh_snapshot::decode(&base.payload).expect("decodes"),
        other => panic!("expected the complete snapshot, got {other:?}"),
    };

    std::fs::write(
        dir.path().join("mesh.yaml"),
        CONFIG.replace("10.0.2.2", "10.0.2.3"),
    )
    .expect("write");
    assert!(matches!(agent.tick(now).expect("tick"), Tick::Published(v) if v.generation == 2));
    match sub.read().expect("read") {
        ReadOutcome::New {
            version,
            base: None,
            deltas,
        } => {
            assert_eq!((version.generation, deltas.len()), (2, 1));
            let delta = mesh_snapshot::delta::decode(&deltas[0].payload).expect("decodes");
            // The pod and the file's new digest in the source; nothing else.
            assert_eq!(delta.len(), 1);
            assert_eq!(delta.workloads[0].uid, "s1");
            assert_eq!(delta.workloads[0].ips, vec![vec![10, 0, 2, 3]]);
            let replayed = mesh_snapshot::delta::replay(Some(first.into()), None, &deltas)
                .expect("decodes")
                .map(|state| state.snapshot());
            assert_eq!(
                replayed,
                read(&mut Subscriber::new(dir.path().join("snapshot")))
            );
        }
        other => panic!("expected one delta, got {other:?}"),
    }
    // The change was translated alone (the agent's incremental path); what it published is
    // still the full translation of the new file.
    let config =
        crate::config::FileConfig::parse(&CONFIG.replace("10.0.2.2", "10.0.2.3")).expect("valid");
    let full = crate::translate::snapshot(
        &config,
        "node-1",
        &crate::translate::Enrolled::new(),
        Vec::new(),
        Vec::new(),
        String::new(),
    );
    assert_eq!(
        agent.channel.state().map(|s| &s.workloads),
        Some(&mesh_snapshot::delta::State::from(full).workloads)
    );
}

#[test]
fn an_unreadable_previous_snapshot_carries_nothing_and_does_not_stop_the_agent() {
    let dir = mesh_snapshot::test_support::ScratchDir::new().expect("scratch dir");
    std::fs::write(dir.path().join("snapshot"), b"not a region").expect("write");
    let mut agent = agent(dir.path());
    assert!(matches!(
        agent.tick(SystemTime::now()).expect("tick"),
        Tick::Published(_)
    ));
    let snap = read(&mut Subscriber::new(dir.path().join("snapshot"))).expect("published");
    assert_eq!(snap.identities.len(), 1, "issued by the CA");
}

/// With Istio's CA, against a fake istiod (a double of istiod's CA service: no istiod can run
/// on this machine; see `istio_ca::fake_istiod`).
mod istio {
    use std::sync::Arc;

    use rustls_pki_types::CertificateDer;

    use super::*;
    use crate::istio_ca::fake_istiod::{FakeIstiod, Mode, TestPki, SERVER_NAME, TOKEN};
    use crate::istio_ca::{IstioCaClient, IstioCaConfig};

    fn agent(dir: &Path, fake: &FakeIstiod, roots_pem: &str, ttl: Duration) -> Agent {
        std::fs::write(dir.join("mesh.yaml"), CONFIG).expect("write config");
        std::fs::write(dir.join("root-cert.pem"), roots_pem).expect("write roots");
        std::fs::write(dir.join("istio-token"), TOKEN).expect("write token");
        let mut ca = IstioCaConfig::new(fake.address(), dir.join("root-cert.pem"));
        ca.token_file = dir.join("istio-token");
        ca.tls_server_name = Some(SERVER_NAME.into());
        ca.connect_timeout = Duration::from_secs(2);
        ca.call_timeout = Duration::from_secs(2);
        let options = AgentOptions {
            source: crate::source::SourceOptions::File(dir.join("mesh.yaml")),
            node: "node-1".into(),
            snapshot_path: dir.join("snapshot"),
            owner: None,
            cert_ttl: ttl,
            extra_roots: Vec::new(),
            state_dir: dir.join("state"),
        };
        Agent::new(options, IstioCaClient::new(ca).expect("CA client")).expect("agent")
    }

    /// The data plane's own TLS setup, both ends presenting `identity`, handshaking in memory:
    /// returns the client identity the server saw.
    fn data_plane_handshake(snap: &Snapshot, identity: &Identity) -> Result<SpiffeId, String> {
        use mesh_io::tls;
        let trust = tls::TrustBundle::new(&snap.trust_roots).map_err(|e| e.to_string())?;
        let id: SpiffeId = identity.spiffe_id.parse().expect("id");
        let server = tls::server_config(identity, &trust, id.trust_domain()).expect("server");
        let client = tls::client_config(identity, &trust, id).expect("client");
        let addr = "10.0.1.2:15008".parse().expect("addr");
        let mut c = rustls::ClientConnection::new(client, tls::placeholder_server_name(addr))
            .map_err(|e| e.to_string())?;
        let mut s = rustls::ServerConnection::new(server).map_err(|e| e.to_string())?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).expect("write to vec");
            }
            s.read_tls(&mut buf.as_slice()).expect("read from slice");
            s.process_new_packets()
                .map_err(|e| format!("server: {e}"))?;
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).expect("write to vec");
            }
            c.read_tls(&mut buf.as_slice()).expect("read from slice");
            c.process_new_packets()
                .map_err(|e| format!("client: {e}"))?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return tls::peer_identity(&s).map_err(|e| e.to_string());
            }
        }
        Err("handshake did not finish".into())
    }

    #[test]
    fn published_identities_chain_to_the_ca_root_and_pass_the_data_plane_handshake() {
        let dir = mesh_snapshot::test_support::ScratchDir::new().expect("scratch dir");
        let pki = Arc::new(TestPki::new("istiod"));
        let fake = FakeIstiod::start(pki.clone());
        // The root file also holds the next root of a rotation: both must be trusted.
        let next = TestPki::new("next root");
        let roots_pem = format!("{}{}", pki.root_pem, next.root_pem);
        let mut agent = agent(dir.path(), &fake, &roots_pem, DAY);
        assert!(matches!(
            agent.tick(SystemTime::now()).expect("tick"),
            Tick::Published(_)
        ));
        let snap = read(&mut Subscriber::new(dir.path().join("snapshot"))).expect("published");
        let ids: Vec<_> = snap
            .identities
            .iter()
            .map(|i| i.spiffe_id.as_str())
            .collect();
        assert_eq!(ids, ["spiffe://cluster.local/ns/default/sa/client"]);
        assert_eq!(
            snap.trust_roots,
            [pki.root_der.clone(), next.root_der.clone()]
        );

        let identity = &snap.identities[0];
        assert_eq!(identity.cert_chain.len(), 2, "leaf and intermediate");
        let leaf = CertificateDer::from(identity.cert_chain[0].as_slice());
        assert_eq!(
            mesh_io::tls::spiffe_id_of(&leaf)
                .expect("identity")
                .to_string(),
            identity.spiffe_id
        );
        assert_eq!(
            data_plane_handshake(&snap, identity).expect("handshake"),
            identity.spiffe_id.parse::<SpiffeId>().expect("id")
        );
        // The same certificate against another mesh's roots: refused, so the check above
        // really went through the CA's root.
        let mut foreign = snap.clone();
        foreign.trust_roots = vec![next.root_der.clone()];
        assert!(data_plane_handshake(&foreign, identity).is_err());
        assert_eq!(fake.requests().len(), 1, "one identity on this node");
    }

    #[test]
    fn a_rotated_root_file_is_republished_at_once_and_a_broken_one_keeps_the_roots() {
        let dir = mesh_snapshot::test_support::ScratchDir::new().expect("scratch dir");
        let pki = Arc::new(TestPki::new("istiod"));
        let fake = FakeIstiod::start(pki.clone());
        let mut agent = agent(dir.path(), &fake, &pki.root_pem, DAY);
        let mut sub = Subscriber::new(dir.path().join("snapshot"));
        agent.tick(SystemTime::now()).expect("tick");
        assert_eq!(
            read(&mut sub).expect("published").trust_roots,
            std::slice::from_ref(&pki.root_der)
        );
        assert_eq!(
            agent.tick(SystemTime::now()).expect("tick"),
            Tick::Unchanged
        );

        // istiod starts a root rotation: its ConfigMap, mounted as the root file, gains the
        // next root. Peers may present it from now on, so it is trusted without waiting for
        // a certificate renewal (a day away here).
        let next = TestPki::new("next root");
        let roots_file = dir.path().join("root-cert.pem");
        std::fs::write(&roots_file, format!("{}{}", pki.root_pem, next.root_pem)).expect("write");
        assert!(matches!(
            agent.tick(SystemTime::now()).expect("tick"),
            Tick::Published(_)
        ));
        assert_eq!(
            read(&mut sub).expect("republished").trust_roots,
            [pki.root_der.clone(), next.root_der.clone()]
        );
        assert_eq!(fake.requests().len(), 1, "no certificate was asked for");

        // A file caught half-written does not read: the roots stay, nothing is republished.
        std::fs::write(&roots_file, "-----BEGIN CERTIFICATE-----\nMII").expect("write");
        assert_eq!(
            agent.tick(SystemTime::now()).expect("tick"),
            Tick::Unchanged
        );
        assert!(read(&mut sub).is_none());
    }

    #[test]
    fn renewal_replaces_a_due_certificate_and_keeps_it_while_the_ca_is_down_until_expiry() {
        let dir = mesh_snapshot::test_support::ScratchDir::new().expect("scratch dir");
        let pki = Arc::new(TestPki::new("istiod"));
        let mut fake = FakeIstiod::start(pki.clone());
        let ttl = Duration::from_secs(60);
        let mut agent = agent(dir.path(), &fake, &pki.root_pem, ttl);
        let mut sub = Subscriber::new(dir.path().join("snapshot"));
        // Ticks run on simulated time from `t0`; the fake CA stamps certificates with the real
        // clock (which moves a few milliseconds meanwhile): every leaf issued here is valid
        // from about t0 - 120 s to t0 + 60 s.
        let whole = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(whole);
        let at = |secs: f64| t0 + Duration::from_secs_f64(secs);

        agent.tick(at(0.0)).expect("tick");
        let first = read(&mut sub).expect("published").identities[0].clone();
        assert_eq!(agent.tick(at(20.0)).expect("tick"), Tick::Unchanged);
        assert_eq!(fake.requests().len(), 1, "not due with 40 s of 60 left");

        // Due with under half of its time left: a new certificate and key, due in turn
        // halfway through what is left of its time (at about t0 + 45 s).
        assert!(matches!(
            agent.tick(at(31.0)).expect("tick"),
            Tick::Published(_)
        ));
        let renewed = read(&mut sub).expect("republished").identities[0].clone();
        assert_ne!(renewed.cert_chain, first.cert_chain);
        assert_ne!(renewed.private_key, first.private_key);
        assert_eq!(fake.requests().len(), 2);

        // istiod goes away: the renewal fails and the current, still valid, certificate stays.
        fake.stop();
        assert_eq!(agent.tick(at(46.0)).expect("tick"), Tick::Unchanged);
        assert!(read(&mut sub).is_none(), "nothing republished");
        // Back, but the retry waits for its backoff (at least half a second)...
        fake.restart();
        assert_eq!(agent.tick(at(46.4)).expect("tick"), Tick::Unchanged);
        assert_eq!(fake.requests().len(), 2, "no request during the backoff");
        // ...and then goes through.
        assert!(matches!(
            agent.tick(at(47.0)).expect("tick"),
            Tick::Published(_)
        ));
        let recovered = read(&mut sub).expect("republished").identities[0].clone();
        assert_ne!(recovered.cert_chain, renewed.cert_chain);

        // Down again until past expiry: the expired certificate is dropped, not published.
        fake.stop();
        assert_eq!(agent.tick(at(55.0)).expect("tick"), Tick::Unchanged);
        assert!(matches!(
            agent.tick(at(90.0)).expect("tick"),
            Tick::Published(_)
        ));
        let snap = read(&mut sub).expect("republished");
        assert!(snap.identities.is_empty(), "{:?}", snap.identities);
        assert_eq!(snap.workloads.len(), 2, "routing is still published");
        // What the SRE paged about it sees: three issued, the failed renewals, one identity
        // without a certificate, the expiry.
        let metrics = agent.metrics();
        assert_eq!(
            scraped(&metrics, "meshagent_certificates_issued_total"),
            3.0
        );
        let failures = |reason| {
            scraped(
                &metrics,
                &format!("meshagent_certificate_failures_total{{reason=\"{reason}\"}}"),
            )
        };
        assert!(failures("unreachable") >= 2.0, "istiod was down twice");
        assert_eq!(failures("refused"), 0.0);
        assert_eq!(
            scraped(&metrics, "meshagent_certificates_expired_total"),
            1.0
        );
        assert_eq!(scraped(&metrics, "meshagent_identities_wanted"), 1.0);
        assert_eq!(scraped(&metrics, "meshagent_certificates"), 0.0);
    }

    #[test]
    fn certificate_failures_are_counted_by_what_an_operator_does_about_them() {
        let dir = mesh_snapshot::test_support::ScratchDir::new().expect("scratch dir");
        let pki = Arc::new(TestPki::new("istiod"));
        let fake = FakeIstiod::start(pki.clone());
        // istiod does not trust this node's account to ask for its pods (a missing
        // CA_TRUSTED_NODE_ACCOUNTS entry, say).
        fake.set_mode(Mode::Fail(
            crate::istio_ca::Code::PERMISSION_DENIED,
            "not a trusted node account".into(),
        ));
        let mut agent = agent(dir.path(), &fake, &pki.root_pem, DAY);
        let t0 = SystemTime::now();
        agent
            .tick(t0)
            .expect("routing is published without the certificate");
        // Then it answers with a certificate for a key the agent did not ask for.
        fake.set_mode(Mode::OtherKey);
        agent
            .tick(t0 + Duration::from_secs(3600))
            .expect("tick after the backoff");
        assert_eq!(fake.requests().len(), 2);
        let metrics = agent.metrics();
        for (reason, count) in [
            ("refused", 1.0),
            ("bad_answer", 1.0),
            ("unreachable", 0.0),
            ("local", 0.0),
        ] {
            let series = format!("meshagent_certificate_failures_total{{reason=\"{reason}\"}}");
            assert_eq!(scraped(&metrics, &series), count, "{series}");
        }
        assert_eq!(scraped(&metrics, "meshagent_identities_wanted"), 1.0);
        assert_eq!(scraped(&metrics, "meshagent_certificates"), 0.0);
        assert!(!metrics
            .render(None, false)
            .contains("meshagent_certificate_earliest_expiry_timestamp_seconds"));
    }

    #[test]
    fn a_ca_granting_less_than_the_ttl_is_asked_again_at_half_of_what_it_granted() {
        let dir = mesh_snapshot::test_support::ScratchDir::new().expect("scratch dir");
        let pki = Arc::new(TestPki::new("istiod"));
        let fake = FakeIstiod::start(pki.clone());
        // istiod caps workload certificates at its maximum TTL, whatever the agent asks for.
        fake.set_max_validity(Duration::from_secs(60));
        let mut agent = agent(dir.path(), &fake, &pki.root_pem, DAY);
        let whole = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(whole);
        agent.tick(t0).expect("tick");
        assert_eq!(fake.requests()[0].validity_duration, 24 * 3600);
        // Not asked again on every tick because a day was asked for and a minute granted...
        assert_eq!(
            agent.tick(t0 + Duration::from_secs(20)).expect("tick"),
            Tick::Unchanged
        );
        assert_eq!(fake.requests().len(), 1);
        // ...but renewed with under half the granted minute left.
        assert!(matches!(
            agent.tick(t0 + Duration::from_secs(31)).expect("tick"),
            Tick::Published(_)
        ));
        assert_eq!(fake.requests().len(), 2);
    }

    /// Starts an agent with istiod up, publishes, and drops it (the agent restarting): what it
    /// published.
    fn published_before_restart(
        dir: &Path,
        fake: &FakeIstiod,
        pki: &TestPki,
        ttl: Duration,
        now: SystemTime,
    ) -> Snapshot {
        let mut first = agent(dir, fake, &pki.root_pem, ttl);
        first.tick(now).expect("tick");
        let snap = read(&mut Subscriber::new(dir.join("snapshot"))).expect("published");
        assert_eq!(snap.identities.len(), 1);
        snap
    }

    #[test]
    fn an_agent_restarted_while_the_ca_is_down_keeps_publishing_the_certificates_it_had() {
        let dir = mesh_snapshot::test_support::ScratchDir::new().expect("scratch dir");
        let pki = Arc::new(TestPki::new("istiod"));
        let mut fake = FakeIstiod::start(pki.clone());
        let before = published_before_restart(dir.path(), &fake, &pki, DAY, SystemTime::now());

        // A control-plane upgrade: istiod is away while the agent restarts. The data plane
        // adopts whatever the new agent publishes first.
        fake.stop();
        let mut agent = agent(dir.path(), &fake, &pki.root_pem, DAY);
        assert!(matches!(
            agent.tick(SystemTime::now()).expect("tick"),
            Tick::Published(_)
        ));
        let after = read(&mut Subscriber::new(dir.path().join("snapshot"))).expect("published");
        // Not assert_eq!: a failure would print the private keys.
        assert!(
            after.identities == before.identities,
            "the same certificate chains and keys are published"
        );
        assert_eq!(
            data_plane_handshake(&after, &after.identities[0]).expect("handshake"),
            after.identities[0]
                .spiffe_id
                .parse::<SpiffeId>()
                .expect("id")
        );
    }

    #[test]
    fn a_certificate_from_a_replaced_ca_is_not_carried_over() {
        let dir = mesh_snapshot::test_support::ScratchDir::new().expect("scratch dir");
        let pki = Arc::new(TestPki::new("istiod"));
        let mut fake = FakeIstiod::start(pki.clone());
        published_before_restart(dir.path(), &fake, &pki, DAY, SystemTime::now());

        // The CA was replaced while the agent was down, and the new one is not answering yet:
        // the root file now holds only the new root, which every peer will check against.
        fake.stop();
        let replacement = TestPki::new("istiod");
        let mut agent = agent(dir.path(), &fake, &replacement.root_pem, DAY);
        assert!(agent.certs.is_empty(), "{:?}", agent.certs);
        assert!(matches!(
            agent.tick(SystemTime::now()).expect("tick"),
            Tick::Published(_)
        ));
        let after = read(&mut Subscriber::new(dir.path().join("snapshot"))).expect("published");
        let ids: Vec<_> = after.identities.iter().map(|i| &i.spiffe_id).collect();
        assert!(ids.is_empty(), "published under the old root: {ids:?}");
        assert_eq!(
            after.trust_roots,
            std::slice::from_ref(&replacement.root_der)
        );
    }

    #[test]
    fn a_carried_over_certificate_is_dropped_at_its_expiry_while_the_ca_stays_down() {
        let dir = mesh_snapshot::test_support::ScratchDir::new().expect("scratch dir");
        let pki = Arc::new(TestPki::new("istiod"));
        let mut fake = FakeIstiod::start(pki.clone());
        // Certificates are stamped with the real clock: valid until about t0 + 60 s.
        let whole = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(whole);
        let ttl = Duration::from_secs(60);
        let before = published_before_restart(dir.path(), &fake, &pki, ttl, t0);

        fake.stop();
        let mut agent = agent(dir.path(), &fake, &pki.root_pem, ttl);
        let mut sub = Subscriber::new(dir.path().join("snapshot"));
        agent.tick(t0 + Duration::from_secs(1)).expect("tick");
        let carried = read(&mut sub).expect("published");
        assert!(carried.identities == before.identities, "carried over");

        assert!(matches!(
            agent.tick(t0 + Duration::from_secs(90)).expect("tick"),
            Tick::Published(_)
        ));
        let snap = read(&mut sub).expect("republished");
        let ids: Vec<_> = snap.identities.iter().map(|i| &i.spiffe_id).collect();
        assert!(ids.is_empty(), "expired, still published: {ids:?}");
        assert_eq!(snap.workloads.len(), 2, "routing is still published");
    }

    #[test]
    fn a_carried_over_certificate_is_replaced_on_the_first_tick_when_the_ca_answers() {
        let dir = mesh_snapshot::test_support::ScratchDir::new().expect("scratch dir");
        let pki = Arc::new(TestPki::new("istiod"));
        let fake = FakeIstiod::start(pki.clone());
        let before = published_before_restart(dir.path(), &fake, &pki, DAY, SystemTime::now());
        let old = &before.identities[0];

        let mut agent = agent(dir.path(), &fake, &pki.root_pem, DAY);
        let held: Vec<_> = agent.certs.values().map(|c| &c.chain).collect();
        assert_eq!(
            held,
            [&old.cert_chain],
            "carried over before the first tick"
        );
        let now = SystemTime::now();
        assert!(matches!(agent.tick(now).expect("tick"), Tick::Published(_)));
        let snap = read(&mut Subscriber::new(dir.path().join("snapshot"))).expect("published");
        assert_eq!(snap.identities.len(), 1);
        let fresh = &snap.identities[0];
        assert_eq!(fresh.spiffe_id, old.spiffe_id);
        assert_ne!(fresh.cert_chain[0], old.cert_chain[0], "a new leaf");
        assert!(fresh.private_key != old.private_key, "and a new key");
        assert_eq!(fake.requests().len(), 2, "one request per agent");
        assert_eq!(
            agent.tick(now).expect("tick"),
            Tick::Unchanged,
            "not due again"
        );
    }
}
