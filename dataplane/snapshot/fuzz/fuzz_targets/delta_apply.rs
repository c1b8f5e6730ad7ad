//! A delta record that passed the region's checksum is still outside input: decoding it and
//! applying it to an index (and to the agent-side state, the reference) must refuse or accept
//! it, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::index::{Generation, Index};
use mesh_snapshot::delta::State;
use mesh_snapshot::schema::Snapshot;

mod worlds;

fn base() -> Snapshot {
    Snapshot {
        node: "n1".into(),
        workloads: vec![
            worlds::workload("a", 1, "n1"),
            worlds::workload("b", 2, "n2"),
        ],
        services: vec![worlds::service(&["a", "b", "c"])],
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
