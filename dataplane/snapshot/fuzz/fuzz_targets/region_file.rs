//! Any bytes in the region file (a corrupt header, impossible lengths, a torn slot, a base that
//! does not decode): the reader reports an error or a payload, never panics or reads out of
//! bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_snapshot::Subscriber;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("region-fuzz-{}", std::process::id()));
    // As found, and with the base checksums made to match, so that the bases' decoder (LZ4
    // blocks, lengths, codecs) sees arbitrary bytes too.
    let mut sealed = data.to_vec();
    mesh_snapshot::Publisher::seal_slots_for_fuzzing(&mut sealed);
    for bytes in [data, &sealed[..]] {
        if std::fs::write(&path, bytes).is_ok() {
            let mut subscriber = Subscriber::new(&path);
            let _ = subscriber.read();
            let _ = subscriber.read();
        }
    }
});
