//! A payload that passed the region's checksum is still outside input: decoding it and building
//! the index must refuse or accept it, never panic. The data plane reads workloads and services
//! in place (`Index::build_encoded`); it must accept exactly what prost-then-build accepts and
//! index the same workloads and services.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::index::{Generation, Index};

fn contents(index: &Index) -> (Vec<String>, Vec<String>) {
    let mut workloads: Vec<String> = index.workloads().map(|w| format!("{w:?}")).collect();
    workloads.sort();
    let mut services: Vec<String> = index.services().iter().map(|s| format!("{s:?}")).collect();
    services.sort();
    (workloads, services)
}

fuzz_target!(|data: &[u8]| {
    let generation = Generation {
        epoch: 1,
        generation: 1,
    };
    let through_prost = mesh_snapshot::decode(data)
        .ok()
        .and_then(|snapshot| Index::build(snapshot, generation).ok());
    let in_place = Index::build_encoded(data, generation).ok();
    match (through_prost, in_place) {
        (Some(a), Some(b)) => assert_eq!(contents(&a), contents(&b)),
        (None, None) => {}
        (a, b) => panic!(
            "prost-then-build accepted: {}, in place: {}",
            a.is_some(),
            b.is_some()
        ),
    }
});
