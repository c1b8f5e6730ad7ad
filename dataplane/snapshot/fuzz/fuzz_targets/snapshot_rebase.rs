//! A complete snapshot compared with the index a data plane holds (`Index::rebase_encoded`,
//! what it does on an agent restart) must never take in what a build refuses, and what it
//! takes in must be what a build gives. The first byte picks the payload from the rest: the
//! bytes as they are; the held snapshot's encoding with them appended (protobuf merges the
//! two: the held world plus records and fields the fuzzer adds); or them read as a delta,
//! applied to the held world, and the result encoded (records changed, added and removed
//! among unchanged ones, which meet their fingerprints).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::index::{Generation, Index};
use mesh_snapshot::delta::{Delta, State};
use mesh_snapshot::schema::{AuthorizationPolicy, Identity, Snapshot};

mod worlds;

fn held() -> Snapshot {
    let workload = worlds::workload;
    Snapshot {
        node: "n1".into(),
        workloads: vec![
            workload("a", 1, "n1"),
            workload("b", 2, "n2"),
            workload("c", 3, "n2"),
        ],
        services: vec![worlds::service(&["a", "b", "d"])],
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
                source: format!("spiffe://cluster.local/ns/default/sa/{peer}")
                    .parse()
                    .ok(),
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
    let payload = match mode % 3 {
        0 => rest.to_vec(),
        1 => {
            let mut payload = mesh_snapshot::encode(&held());
            payload.extend_from_slice(rest);
            payload
        }
        _ => {
            // Any schema version: the delta only shapes the world, whose encoding is checked.
            let Ok(mut delta) = <Delta as prost::Message>::decode(rest) else {
                return;
            };
            // A uid shorter than three bytes names a held workload (by its length), so that
            // changes and removals land on held records, which a fuzzer would not guess.
            let held_uid = |uid: &mut String| {
                if let Some(named) = ["a", "b", "c"].get(uid.len()) {
                    *uid = (*named).to_owned();
                }
            };
            delta
                .workloads
                .iter_mut()
                .for_each(|w| held_uid(&mut w.uid));
            delta.removed_workloads.iter_mut().for_each(held_uid);
            let mut state = State::from(held());
            state.apply(&delta);
            mesh_snapshot::encode(&state.snapshot())
        }
    };
    let generation = Generation {
        epoch: 2,
        generation: 1,
    };
    // Built from its encoding, as the data plane builds: so its records have fingerprints.
    let held = Index::build_encoded(&mesh_snapshot::encode(&held()), Generation::default())
        .expect("the held snapshot builds");
    if let Some(rebased) = held.rebase_encoded(&payload, generation) {
        let built = Index::build_encoded(&payload, generation)
            .expect("a comparison took in what a build refuses");
        assert_eq!(observable(&rebased.index), observable(&built));
        assert_eq!(decisions(&rebased.index), decisions(&built));
    }
});
