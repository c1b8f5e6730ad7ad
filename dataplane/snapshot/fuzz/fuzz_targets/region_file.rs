//! Any bytes in the region file (a corrupt header, impossible lengths, a torn slot): the reader
//! reports an error or a payload, never panics or reads out of bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_snapshot::Subscriber;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("region-fuzz-{}", std::process::id()));
    if std::fs::write(&path, data).is_ok() {
        let mut subscriber = Subscriber::new(&path);
        let _ = subscriber.read();
        let _ = subscriber.read();
    }
});
