//! Authorization and identity lifecycle, end to end in the lab topology (root, real namespaces
//! and nftables, real ctrl-agent and dataplane processes), each scenario on io_uring and epoll.
//! Policies are written as the YAML an operator would write; enforcement is by node 2's data
//! plane, the destination, as with ztunnel.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::raw_hbone::{self, Client};
use common::*;
use perf::lab::{Lab, LabOptions};

/// An echo server in `pod` that counts the connections its application accepted.
fn counting_echo(lab: &Lab, pod: &str, port: u16) -> Arc<AtomicUsize> {
    let listener: TcpListener = lab.listen_in(pod, port).expect("listen");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            count.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut conn = conn;
                let mut buf = [0u8; 4096];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    accepted
}

/// Whether a fresh connection from `from` to `to:port` carries an echo.
fn reaches(lab: &Lab, from: &str, to: &str, port: u16) -> bool {
    echoes(lab, from, lab.addr(to, port))
}

fn log_of(lab: &Lab, node: &str) -> String {
    std::fs::read_to_string(lab.dir.join(format!("dataplane-{node}.log"))).expect("log")
}

lab_test!(
    allow_by_principal_admits_one_client_and_refuses_another,
    LabOptions::default(),
    |mut lab| {
        lab.add_pod(0, "c", true, "intruder").expect("pod");
        let accepted = counting_echo(&lab, "n2-a", ECHO);
        lab.apply(
            "policies:
  - name: allow-default-sa
    namespace: default
    selector: {matchLabels: {app: n2-a}}
    action: ALLOW
    rules:
      - from: [{source: {principals: [cluster.local/ns/default/sa/default]}}]
",
        )
        .expect("policy");
        assert!(reaches(&lab, "n1-a", "n2-a", ECHO), "the allowed principal");
        assert!(!reaches(&lab, "n1-c", "n2-a", ECHO), "another principal");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "the denied stream never reached the application"
        );
        assert_eq!(lab.total(1, "authz_denied").expect("stats"), 1);
        let log = log_of(&lab, "node-2");
        assert!(
            log.contains("denied by policy")
                && log.contains("spiffe://cluster.local/ns/default/sa/intruder")
                && log.contains("no ALLOW policy matched"),
            "the denial is logged with who and why"
        );
    }
);

lab_test!(deny_by_namespace, LabOptions::default(), |mut lab| {
    lab.add_pod_in(0, "c", true, "blocked", "default")
        .expect("pod");
    echo_server(&lab, "n2-a");
    lab.apply(
        "policies:
  - name: deny-blocked
    namespace: default
    action: DENY
    rules:
      - from: [{source: {namespaces: [blocked]}}]
",
    )
    .expect("policy");
    assert!(!reaches(&lab, "n1-c", "n2-a", ECHO));
    assert!(reaches(&lab, "n1-a", "n2-a", ECHO));
    assert!(log_of(&lab, "node-2").contains("denied by default/deny-blocked"));
});

lab_test!(port_scoped_rules, LabOptions::default(), |lab| {
    echo_server(&lab, "n2-a");
    counting_echo(&lab, "n2-a", ECHO + 1);
    lab.apply(
        "policies:
  - name: only-9000
    namespace: default
    selector: {matchLabels: {app: n2-a}}
    rules:
      - to: [{operation: {ports: [\"9000\"]}}]
",
    )
    .expect("policy");
    assert!(reaches(&lab, "n1-a", "n2-a", ECHO));
    assert!(!reaches(&lab, "n1-a", "n2-a", ECHO + 1));
});

lab_test!(
    strict_refuses_plaintext_clients,
    LabOptions::default(),
    |lab| {
        echo_server(&lab, "n2-a");
        // n1-b is outside the mesh: its traffic arrives in plaintext on n2-a's 15006.
        assert!(reaches(&lab, "n1-b", "n2-a", ECHO), "PERMISSIVE by default");
        lab.apply(
            "peerAuthentications:
  - name: strict
    namespace: default
    mtls: {mode: STRICT}
",
        )
        .expect("policy");
        assert!(
            !reaches(&lab, "n1-b", "n2-a", ECHO),
            "STRICT refuses plaintext"
        );
        assert!(
            reaches(&lab, "n1-a", "n2-a", ECHO),
            "mesh clients still reach it"
        );
        assert!(lab.total(1, "plaintext_refused_strict").expect("stats") >= 1);
    }
);

/// Applies a DENY of the default service account (n1-a's) and waits for node 2 to close the
/// one live connection it denies.
fn deny_default_sa_and_see_node_2_close_one(lab: &Lab) {
    lab.apply(
        "policies:
  - name: deny-default-sa
    namespace: default
    action: DENY
    rules:
      - from: [{source: {principals: [cluster.local/ns/default/sa/default]}}]
",
    )
    .expect("policy");
    assert!(
        eventually(Duration::from_secs(2), || {
            lab.total(1, "authz_closed_live").expect("stats") == 1
        }),
        "node 2 closes the connection the new policy denies"
    );
}

lab_test!(
    a_new_policy_closes_live_connections_it_denies_and_leaves_the_rest,
    LabOptions::default(),
    |mut lab| {
        lab.add_pod(0, "c", true, "kept").expect("pod");
        echo_server(&lab, "n2-a");
        let mut doomed = lab
            .connect_from("n1-a", lab.addr("n2-a", ECHO))
            .expect("connect");
        let mut kept = lab
            .connect_from("n1-c", lab.addr("n2-a", ECHO))
            .expect("connect");
        assert_eq!(roundtrip(&mut doomed, b"before").expect("echo"), b"before");
        assert_eq!(roundtrip(&mut kept, b"before").expect("echo"), b"before");
        deny_default_sa_and_see_node_2_close_one(&lab);
        assert!(
            roundtrip(&mut doomed, b"after").is_err(),
            "the denied connection is gone"
        );
        assert_eq!(roundtrip(&mut kept, b"after").expect("untouched"), b"after");
        assert!(log_of(&lab, "node-2").contains("closing a live connection the new policy denies"));
    }
);

lab_test!(
    a_denied_connection_whose_server_has_finished_sending_is_released_on_both_nodes,
    LabOptions::default(),
    |lab| {
        // The server answers, closes its side, and waits for the client to finish.
        let listener = lab.listen_in("n2-a", ECHO + 2).expect("listen");
        std::thread::spawn(move || {
            if let Ok((mut server, _)) = listener.accept() {
                let _ = server.write_all(b"bye");
                let _ = server.shutdown(std::net::Shutdown::Write);
                let mut sink = [0u8; 64];
                while matches!(server.read(&mut sink), Ok(n) if n > 0) {}
            }
        });
        let mut client = lab
            .connect_from("n1-a", lab.addr("n2-a", ECHO + 2))
            .expect("connect");
        let mut answer = Vec::new();
        client
            .read_to_end(&mut answer)
            .expect("read up to the server's FIN");
        assert_eq!(answer, b"bye");
        assert_eq!(lab.total(0, "active_connections").expect("stats"), 1);
        deny_default_sa_and_see_node_2_close_one(&lab);
        // Node 1 hears of it only through the stream's reset: the client sends nothing.
        assert!(
            eventually(Duration::from_secs(5), || {
                lab.total(0, "active_connections").expect("stats") == 0
            }),
            "node 1 still holds the connection node 2 reset"
        );
        drop(client);
    }
);

lab_test!(
    a_long_lived_connection_survives_two_certificate_rotations,
    LabOptions {
        cert_ttl: "4s".into(),
        ..LabOptions::default()
    },
    |lab| {
        echo_server(&lab, "n2-a");
        let mut long_lived = lab
            .connect_from("n1-a", lab.addr("n2-a", ECHO))
            .expect("connect");
        let rotated = |node| lab.total(node, "certificates_rotated").expect("stats");
        // Certificates live 4 s and are renewed every 2 s; keep talking through two renewals.
        let mut rounds = 0;
        while rotated(0) < 2 * 2 || rotated(1) < 2 * 2 {
            assert_eq!(
                roundtrip(&mut long_lived, b"still here").expect("connection survives"),
                b"still here"
            );
            rounds += 1;
            assert!(rounds < 200, "certificates did not rotate twice");
            std::thread::sleep(Duration::from_millis(50));
        }
        // Each node has two workers; each counts its own rotations.
        assert!(reaches(&lab, "n1-a", "n2-a", ECHO), "new connections work");
        let stats = lab.stats(0).expect("stats");
        assert!(
            stats["totals"]["hbone_connections_dialed"].as_u64() >= Some(2),
            "and use a new tunnel with the new certificate: {}",
            stats["totals"]
        );
    }
);

lab_test!(
    bad_client_certificates_are_refused_with_their_reason,
    LabOptions::default(),
    |lab| {
        echo_server(&lab, "n2-a");
        let target = format!("{}:{ECHO}", lab.pod("n2-a").ip);
        let cases = [
            (
                Client::Expired("spiffe://cluster.local/ns/default/sa/default"),
                "tls_refused_expired",
                "expired",
            ),
            (
                Client::Mesh("spiffe://elsewhere.example/ns/default/sa/default"),
                "tls_refused_trust_domain",
                "trust_domain",
            ),
            (
                Client::Anonymous,
                "tls_refused_no_client_certificate",
                "no_client_certificate",
            ),
        ];
        for (client, counter, reason) in cases {
            let result = raw_hbone::connect_as(&lab, client, &[&target]);
            assert!(result.is_err(), "{reason}: the tunnel must be refused");
            // The client may read the alert before the server has counted the refusal.
            assert!(
                eventually(Duration::from_secs(2), || lab
                    .total(1, counter)
                    .expect("stats")
                    == 1),
                "{reason} is counted"
            );
            assert!(
                log_of(&lab, "node-2").contains(&format!("reason=\"{reason}\"")),
                "{reason} is logged"
            );
        }
        // A valid client on the same node still gets through.
        let ok = raw_hbone::connect_as(
            &lab,
            Client::Mesh("spiffe://cluster.local/ns/default/sa/default"),
            &[&target],
        )
        .expect("valid client");
        assert_eq!(ok.statuses, [200]);
    }
);

lab_test!(
    an_http_only_allow_rule_fails_closed_without_a_waypoint,
    LabOptions::default(),
    |lab| {
        echo_server(&lab, "n2-a");
        lab.apply(
            "policies:
  - name: get-only
    namespace: default
    selector: {matchLabels: {app: n2-a}}
    rules:
      - from: [{source: {principals: [cluster.local/ns/default/sa/default]}}]
        to: [{operation: {methods: [GET]}}]
",
        )
        .expect("policy");
        assert!(!reaches(&lab, "n1-a", "n2-a", ECHO));
    }
);

lab_test!(
    audit_and_dry_run_policies_log_without_enforcing,
    LabOptions::default(),
    |lab| {
        echo_server(&lab, "n2-a");
        lab.apply(
            "policies:
  - name: watch
    namespace: default
    action: AUDIT
    rules: [{}]
  - name: would-deny
    namespace: default
    action: DENY
    dryRun: true
    rules: [{}]
",
        )
        .expect("policy");
        assert!(reaches(&lab, "n1-a", "n2-a", ECHO));
        let log = log_of(&lab, "node-2");
        assert!(log.contains("audit") && log.contains("default/watch"));
        assert!(
            log.contains("dry-run policy would decide differently")
                && log.contains("denied by default/would-deny")
        );
    }
);
