use std::path::Path;

use mesh_snapshot::{ReadOutcome, Snapshot, Subscriber};

use super::*;

const CONFIG: &str = r#"
workloads:
  - {uid: c1, name: client, serviceAccount: client, ips: [10.0.1.2], node: node-1, netns: /run/netns/c1}
  - {uid: s1, name: server, serviceAccount: server, ips: [10.0.2.2], node: node-2, netns: /run/netns/s1}
"#;

const DAY: Duration = Duration::from_secs(24 * 3600);

fn agent(dir: &Path) -> Agent {
    std::fs::write(dir.join("mesh.yaml"), CONFIG).expect("write config");
    let options = AgentOptions {
        config_path: dir.join("mesh.yaml"),
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

    let fixed = CONFIG.replace("10.0.2.2", "10.0.2.3");
    std::fs::write(dir.path().join("mesh.yaml"), fixed).expect("write");
    assert!(matches!(agent.tick(now).expect("tick"), Tick::Published(v) if v.generation == 2));
    let snap = read(&mut sub).expect("generation 2");
    assert_eq!(snap.workloads[1].ips, vec![vec![10, 0, 2, 3]]);
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
        config_path: dir.path().join("mesh.yaml"),
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
}
