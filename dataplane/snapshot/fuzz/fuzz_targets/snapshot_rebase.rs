//! A complete snapshot compared with the index a data plane holds (`Index::rebase_encoded`,
//! what it does on an agent restart) must never take in what a build refuses, and what it
//! takes in must be what a build gives. The first byte picks the payload: the input as it is,
//! or the held snapshot's encoding with the input appended (protobuf merges the two: the held
//! world plus records and fields the fuzzer adds), so that unchanged records meet their
//! fingerprints.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::index::{Generation, Index};
use mesh_snapshot::schema::{
    AuthorizationPolicy, Identity, Protocol, Service, ServicePort, Snapshot, Workload,
};

fn held() -> Snapshot {
    let workload = |uid: &str, last: u8, node: &str| Workload {
        uid: uid.into(),
        name: uid.into(),
        namespace: "default".into(),
        service_account: uid.into(),
        trust_domain: "cluster.local".into(),
        ips: vec![vec![10, 0, 0, last]],
        node: node.into(),
        protocol: Protocol::Hbone as i32,
        netns_path: if node == "n1" { "/run/netns/a".into() } else { String::new() },
        ..Default::default()
    };
    Snapshot {
        node: "n1".into(),
        workloads: vec![workload("a", 1, "n1"), workload("b", 2, "n2"), workload("c", 3, "n2")],
        services: vec![Service {
            name: "s".into(),
            namespace: "default".into(),
            vips: vec![vec![10, 96, 0, 1]],
            ports: vec![ServicePort {
                port: 80,
                target_port: 8080,
            }],
            endpoints: vec!["a".into(), "b".into(), "d".into()],
            ..Default::default()
        }],
        policies: vec![AuthorizationPolicy {
            name: "p".into(),
            namespace: "default".into(),
            ..Default::default()
        }],
        identities: vec![Identity {
            spiffe_id: "spiffe://cluster.local/ns/default/sa/a".into(),
            ..Default::default()
        }],
        trust_roots: vec![vec![1]],
        ..Default::default()
    }
}

fn observable(index: &Index) -> Vec<String> {
    let mut seen: Vec<String> = index.workloads().map(|w| format!("{w:?}")).collect();
    seen.extend(index.services().iter().map(|s| format!("{s:?}")));
    seen.extend(index.local_workloads().map(|w| format!("local {}", w.uid)));
    seen.extend(index.identities().map(|(id, _)| format!("identity {id}")));
    seen.sort();
    seen.push(format!("{:?} {:?}", index.trust_roots(), index.source()));
    seen
}

/// What each local workload decides for a few peers, and its inbound mTLS mode.
fn decisions(index: &Index) -> Vec<String> {
    let mut seen = Vec::new();
    for local in index.local_workloads() {
        let Some(&ip) = local.ips.first() else {
            continue;
        };
        for peer in ["a", "b", "x"] {
            let connection = mesh_core::authz::Connection {
                source: format!("spiffe://cluster.local/ns/default/sa/{peer}").parse().ok(),
                source_ip: [10, 0, 0, 2].into(),
                destination_ip: ip,
                destination_port: 8080,
            };
            seen.push(format!(
                "{} {peer} {:?} {:?}",
                local.uid,
                index.authorize(&local.uid, &connection),
                index.inbound_mtls(&local.uid, 8080)
            ));
        }
    }
    seen.sort();
    seen
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut payload = Vec::new();
    if mode & 1 == 1 {
        payload = mesh_snapshot::encode(&held());
    }
    payload.extend_from_slice(rest);
    let generation = Generation {
        epoch: 2,
        generation: 1,
    };
    let held = Index::build(held(), Generation::default()).expect("the held snapshot builds");
    if let Some(rebased) = held.rebase_encoded(&payload, generation) {
        let built = Index::build_encoded(&payload, generation)
            .expect("a comparison took in what a build refuses");
        assert_eq!(observable(&rebased.index), observable(&built));
        assert_eq!(decisions(&rebased.index), decisions(&built));
    }
});
