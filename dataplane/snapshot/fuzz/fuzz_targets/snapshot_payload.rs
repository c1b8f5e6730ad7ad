//! A payload that passed the region's checksum is still outside input: decoding it and building
//! the index must refuse or accept it, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::index::{Generation, Index};

fuzz_target!(|data: &[u8]| {
    if let Ok(snapshot) = mesh_snapshot::decode(data) {
        let _ = Index::build(
            snapshot,
            Generation {
                epoch: 1,
                generation: 1,
            },
        );
    }
});
