//! A delta record that passed the region's checksum is still outside input: decoding it and
//! applying it to an index (and to the agent-side state, the reference) must refuse or accept
//! it, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::index::{Generation, Index};
use mesh_snapshot::delta::State;
use mesh_snapshot::schema::{Protocol, Service, ServicePort, Snapshot, Workload};

fn base() -> Snapshot {
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
        workloads: vec![workload("a", 1, "n1"), workload("b", 2, "n2")],
        services: vec![Service {
            name: "s".into(),
            namespace: "default".into(),
            vips: vec![vec![10, 96, 0, 1]],
            ports: vec![ServicePort {
                port: 80,
                target_port: 8080,
            }],
            endpoints: vec!["a".into(), "b".into(), "c".into()],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(delta) = mesh_snapshot::delta::decode(data) {
        let mut state = State::from(base());
        state.apply(&delta);
        if let Ok(index) = Index::build(base(), Generation::default()) {
            if let Ok(next) = index.apply(delta, Generation::default()) {
                let _ = next.route_outbound("10.96.0.1:80".parse().expect("addr"), 1);
            }
        }
    }
});
