use super::*;
use crate::test_support::ScratchDir;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

fn region_path(dir: &ScratchDir) -> PathBuf {
    dir.path().join("snapshot")
}

fn small() -> PublishOptions {
    PublishOptions {
        slot_capacity: 4096,
        owner: None,
    }
}

fn expect_new(sub: &mut Subscriber) -> (Version, Vec<u8>) {
    match sub.read() {
        Ok(ReadOutcome::New { version, payload }) => (version, payload),
        other => panic!("expected a new snapshot, got {other:?}"),
    }
}

#[test]
fn publish_then_read_in_order_and_unchanged_in_between() {
    let dir = ScratchDir::new().expect("scratch dir");
    let path = region_path(&dir);
    let mut publisher = Publisher::create(&path, small()).expect("create");
    let mut sub = Subscriber::new(&path);
    assert!(matches!(sub.read(), Err(RegionError::Empty { .. })));

    let v1 = publisher.publish(b"first").expect("publish");
    let (version, payload) = expect_new(&mut sub);
    assert_eq!((version, payload.as_slice()), (v1, &b"first"[..]));
    assert!(matches!(sub.read(), Ok(ReadOutcome::Unchanged)));

    publisher.publish(b"second").expect("publish");
    let v3 = publisher.publish(b"third").expect("publish");
    let (version, payload) = expect_new(&mut sub);
    assert_eq!((version, payload.as_slice()), (v3, &b"third"[..]));
    assert_eq!(v3.generation, 3);
}

#[test]
fn file_is_private_to_its_owner() {
    let dir = ScratchDir::new().expect("scratch dir");
    let path = region_path(&dir);
    let _publisher = Publisher::create(&path, small()).expect("create");
    let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn corrupt_generation_is_reported_once_and_the_reader_moves_on_to_the_next_good_one() {
    let dir = ScratchDir::new().expect("scratch dir");
    let path = region_path(&dir);
    let mut publisher = Publisher::create(&path, small()).expect("create");
    let mut sub = Subscriber::new(&path);
    publisher.publish(b"good").expect("publish");
    expect_new(&mut sub);

    publisher.corrupt_active_slot_for_test();
    assert!(matches!(sub.read(), Err(RegionError::Checksum { .. })));
    // Not reported again: the caller keeps its last good view quietly.
    assert!(matches!(sub.read(), Ok(ReadOutcome::Unchanged)));

    publisher.publish(b"good again").expect("publish");
    assert_eq!(expect_new(&mut sub).1, b"good again");
}

#[test]
fn a_restarted_publisher_is_picked_up_as_a_new_epoch() {
    let dir = ScratchDir::new().expect("scratch dir");
    let path = region_path(&dir);
    let mut first = Publisher::create(&path, small()).expect("create");
    let mut sub = Subscriber::new(&path);
    first.publish(b"from the first agent").expect("publish");
    let (v1, _) = expect_new(&mut sub);

    let mut second = Publisher::create(&path, small()).expect("create");
    second.publish(b"from the second agent").expect("publish");
    let (v2, payload) = expect_new(&mut sub);
    assert_ne!(v1.epoch, v2.epoch);
    assert_eq!(v2.generation, 1);
    assert_eq!(payload, b"from the second agent");
}

#[test]
fn outgrowing_the_slots_moves_to_a_bigger_file() {
    let dir = ScratchDir::new().expect("scratch dir");
    let path = region_path(&dir);
    let mut publisher = Publisher::create(&path, small()).expect("create");
    let mut sub = Subscriber::new(&path);
    publisher.publish(b"small").expect("publish");
    expect_new(&mut sub);
    let big = vec![7u8; 3 << 20];
    publisher.publish(&big).expect("publish");
    assert_eq!(expect_new(&mut sub).1, big);
}

#[test]
fn foreign_or_incompatible_files_are_refused() {
    let dir = ScratchDir::new().expect("scratch dir");
    let path = region_path(&dir);
    std::fs::write(&path, vec![0u8; 8192]).expect("write");
    assert!(matches!(
        Subscriber::new(&path).read(),
        Err(RegionError::Magic(_))
    ));

    let mut bytes = vec![0u8; 8192];
    bytes[..8].copy_from_slice(&MAGIC);
    bytes[H_LAYOUT..H_LAYOUT + 4].copy_from_slice(&(LAYOUT_VERSION + 1).to_ne_bytes());
    std::fs::write(&path, &bytes).expect("write");
    assert!(matches!(
        Subscriber::new(&path).read(),
        Err(RegionError::Layout { found, .. }) if found == LAYOUT_VERSION + 1
    ));

    // A header that claims more than the file holds must not be read past the end.
    bytes[H_LAYOUT..H_LAYOUT + 4].copy_from_slice(&LAYOUT_VERSION.to_ne_bytes());
    bytes[H_SLOT_CAPACITY..H_SLOT_CAPACITY + 8].copy_from_slice(&(1u64 << 30).to_ne_bytes());
    std::fs::write(&path, &bytes).expect("write");
    assert!(matches!(
        Subscriber::new(&path).read(),
        Err(RegionError::Truncated { .. })
    ));

    // Capacities that would misalign slot 1 or overflow the size computation (both found by
    // the region_file fuzz target, which panicked the reader on them).
    for capacity in [1u64, 4095, u64::MAX, 1 << 41] {
        bytes[H_SLOT_CAPACITY..H_SLOT_CAPACITY + 8].copy_from_slice(&capacity.to_ne_bytes());
        std::fs::write(&path, &bytes).expect("write");
        assert!(
            matches!(
                Subscriber::new(&path).read(),
                Err(RegionError::Capacity { capacity: c, .. }) if c == capacity
            ),
            "capacity {capacity}"
        );
    }
}

#[test]
fn a_publisher_rounds_its_capacity_so_readers_accept_it() {
    let dir = ScratchDir::new().expect("scratch dir");
    let path = region_path(&dir);
    let mut publisher = Publisher::create(
        &path,
        PublishOptions {
            slot_capacity: 4095,
            owner: None,
        },
    )
    .expect("create");
    publisher.publish(b"hello").expect("publish");
    let (_, payload) = expect_new(&mut Subscriber::new(&path));
    assert_eq!(payload, b"hello");
}

/// Payloads describe themselves (length and fill byte derive from the generation), so a torn
/// copy that slipped through would show up as a mismatch.
fn payload_for(generation: u64) -> Vec<u8> {
    let len = 1000 + (generation as usize * 7919) % 3000;
    let mut p = vec![(generation % 251) as u8; len];
    p[..8].copy_from_slice(&generation.to_le_bytes());
    p
}

#[test]
fn concurrent_readers_never_see_a_torn_snapshot() {
    let dir = ScratchDir::new().expect("scratch dir");
    let path = region_path(&dir);
    let mut publisher = Publisher::create(&path, small()).expect("create");
    publisher.publish(&payload_for(1)).expect("publish");
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let path = path.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut sub = Subscriber::new(&path);
                let mut seen = 0u64;
                let mut last_generation = 0;
                while !stop.load(Ordering::Relaxed) {
                    match sub.read() {
                        Ok(ReadOutcome::New { version, payload }) => {
                            assert!(version.generation > last_generation, "went backwards");
                            last_generation = version.generation;
                            assert_eq!(payload, payload_for(version.generation));
                            seen += 1;
                        }
                        Ok(ReadOutcome::Unchanged) | Err(RegionError::Busy { .. }) => {}
                        Err(e) => panic!("reader failed: {e}"),
                    }
                }
                seen
            })
        })
        .collect();
    for generation in 2..=20_000 {
        publisher
            .publish(&payload_for(generation))
            .expect("publish");
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        let seen = r.join().expect("reader thread");
        assert!(seen > 0, "reader saw nothing");
    }
}

#[test]
fn wait_returns_promptly_when_something_is_published() {
    let dir = ScratchDir::new().expect("scratch dir");
    let path = region_path(&dir);
    let mut publisher = Publisher::create(&path, small()).expect("create");
    publisher.publish(b"one").expect("publish");
    let mut sub = Subscriber::new(&path);
    expect_new(&mut sub);
    let waiter = std::thread::spawn(move || {
        // Without a wake this would block for the whole minute and the join below would hang.
        sub.wait(Duration::from_secs(60));
        sub.read().map(|o| matches!(o, ReadOutcome::New { .. }))
    });
    std::thread::sleep(Duration::from_millis(50));
    publisher.publish(b"two").expect("publish");
    assert!(waiter.join().expect("join").expect("read"));
}
