use super::*;
use crate::test_support::ScratchDir;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

/// A scratch directory and the region path in it (nothing created yet).
fn scratch_region() -> (ScratchDir, PathBuf) {
    let dir = ScratchDir::new().expect("scratch dir");
    let path = dir.path().join("snapshot");
    (dir, path)
}

/// How most tests start: a region with a small-slot publisher and one reader of it.
fn small_region() -> (ScratchDir, PathBuf, Publisher, Subscriber) {
    let (dir, path) = scratch_region();
    let publisher = Publisher::create(&path, small()).expect("create");
    let sub = Subscriber::new(&path);
    (dir, path, publisher, sub)
}

fn small() -> PublishOptions {
    PublishOptions {
        slot_capacity: 4096,
        ..PublishOptions::default()
    }
}

/// Options that compress every base that LZ4 shrinks, however small.
fn compressing(slot_capacity: u64) -> PublishOptions {
    PublishOptions {
        slot_capacity,
        compress_from: 0,
        ..PublishOptions::default()
    }
}

/// Expects a complete snapshot and no deltas.
fn expect_new(sub: &mut Subscriber) -> (Version, Vec<u8>) {
    match sub.read() {
        Ok(ReadOutcome::New {
            version,
            base: Some(base),
            deltas,
        }) if deltas.is_empty() => {
            assert_eq!(base.generation, version.generation);
            assert!(base.payload.intact());
            (version, base.payload.to_vec())
        }
        other => panic!("expected a new snapshot, got {other:?}"),
    }
}

/// Expects only deltas: (version, delta payloads).
fn expect_deltas(sub: &mut Subscriber) -> (Version, Vec<Vec<u8>>) {
    match sub.read() {
        Ok(ReadOutcome::New {
            version,
            base: None,
            deltas,
        }) => {
            assert_eq!(
                deltas.last().map(|d| d.generation),
                Some(version.generation)
            );
            (
                version,
                deltas.into_iter().map(|d| d.payload.to_vec()).collect(),
            )
        }
        other => panic!("expected deltas, got {other:?}"),
    }
}

/// Bytes LZ4 cannot shrink (xorshift), for tests about how much room a base takes.
fn incompressible(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Text that repeats itself the way a snapshot does (namespaces, nodes, accounts per pod).
fn snapshot_like(pods: usize) -> Vec<u8> {
    (0..pods)
        .flat_map(|i| {
            format!(
                "uid:{i:08x}-1c5e name:app-{}-7d9f8b6c5-{i:05x} ns:ns-{} sa:sa-{} \
                 td:cluster.local node:node-{} ip:{};",
                i / 20,
                i / 500,
                i / 20,
                i % 50,
                i * 7919
            )
            .into_bytes()
        })
        .collect()
}

fn appended(publisher: &mut Publisher, delta: &[u8]) -> Version {
    match publisher.append(delta).expect("append") {
        Appended::Published(version) => version,
        Appended::NeedsFull => panic!("append refused"),
    }
}

#[test]
fn publish_then_read_in_order_and_unchanged_in_between() {
    let (_dir, _, mut publisher, mut sub) = small_region();
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
    let (_dir, path) = scratch_region();
    let _publisher = Publisher::create(&path, small()).expect("create");
    let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn corrupt_generation_is_reported_once_and_the_reader_moves_on_to_the_next_good_one() {
    let (_dir, _, mut publisher, mut sub) = small_region();
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
    let (_dir, path) = scratch_region();
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
    let (_dir, _, mut publisher, mut sub) = small_region();
    publisher.publish(b"small").expect("publish");
    expect_new(&mut sub);
    let big = incompressible(3 << 20);
    publisher.publish(&big).expect("publish");
    assert_eq!(expect_new(&mut sub).1, big);
}

#[test]
fn foreign_or_incompatible_files_are_refused() {
    let (_dir, path) = scratch_region();
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
fn a_reader_waiting_on_a_replaced_region_is_woken_at_once() {
    let (_dir, path) = scratch_region();
    let mut first = Publisher::create(&path, small()).expect("create");
    first.publish(b"from the first agent").expect("publish");
    let mut sub = Subscriber::new(&path);
    expect_new(&mut sub);
    let waiter = std::thread::spawn(move || {
        let started = Instant::now();
        sub.wait(Duration::from_secs(30));
        (started.elapsed(), sub)
    });
    std::thread::sleep(Duration::from_millis(100));
    // A restarted agent creates a new file; nothing is published to the old one again.
    let mut second = Publisher::create(&path, small()).expect("create");
    let (waited, mut sub) = waiter.join().expect("join");
    assert!(
        waited < Duration::from_secs(10),
        "the reader slept on the replaced file for {waited:?}"
    );
    second.publish(b"from the second agent").expect("publish");
    assert_eq!(expect_new(&mut sub).1, b"from the second agent");
}

#[test]
fn a_replacement_region_that_cannot_be_read_makes_the_reader_wait_not_spin() {
    let (_dir, path) = scratch_region();
    let mut publisher = Publisher::create(&path, small()).expect("create");
    publisher.publish(b"one").expect("publish");
    let mut sub = Subscriber::new(&path);
    expect_new(&mut sub);
    // An agent of another layout version replaces the file (an upgrade or a rollback): the
    // reader keeps the old mapping, which is marked superseded.
    let mut bytes = vec![0u8; 8192];
    bytes[..8].copy_from_slice(&MAGIC);
    bytes[H_LAYOUT..H_LAYOUT + 4].copy_from_slice(&(LAYOUT_VERSION + 1).to_ne_bytes());
    let tmp = path.with_extension("other-agent");
    std::fs::write(&tmp, &bytes).expect("write");
    let old = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open");
    std::fs::rename(&tmp, &path).expect("rename");
    mark_superseded(&old);
    for _ in 0..2 {
        assert!(matches!(sub.read(), Err(RegionError::Layout { .. })));
        // Returning at once here would have the watcher (real-time, where allowed) read,
        // fail and read again without pause.
        let started = Instant::now();
        sub.wait(Duration::from_millis(300));
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "wait returned after {:?}",
            started.elapsed()
        );
    }
    // A compatible agent that takes over is read at once.
    let mut next = Publisher::create(&path, small()).expect("create");
    next.publish(b"two").expect("publish");
    assert_eq!(expect_new(&mut sub).1, b"two");
}

#[test]
fn a_publisher_that_fails_to_grow_keeps_publishing_in_the_file_it_has() {
    let (_dir, path, mut publisher, mut sub) = small_region();
    publisher.publish(b"small").expect("publish");
    expect_new(&mut sub);
    // Something in the way of the bigger file's temporary name makes growing fail.
    let blocker = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::create_dir(&blocker).expect("blocker");
    assert!(publisher.publish(&incompressible(3 << 20)).is_err());
    for payload in [&b"small again"[..], b"and again"] {
        publisher.publish(payload).expect("publish in the old file");
        assert_eq!(expect_new(&mut sub).1, payload);
    }
    std::fs::remove_dir(&blocker).expect("remove blocker");
    let big = incompressible(3 << 20);
    publisher.publish(&big).expect("grow");
    assert_eq!(expect_new(&mut sub).1, big);
}

#[test]
fn slot_lengths_that_would_overflow_are_refused() {
    let (_dir, path) = scratch_region();
    let mut publisher = Publisher::create(&path, small()).expect("create");
    publisher.publish(b"base").expect("publish");
    drop(publisher);
    let clean = std::fs::read(&path).expect("read");
    // Base length and log length near u64::MAX (the first panicked the reader when rounding
    // the base up to the log's start; found by the region_file fuzz target).
    for field in [S_LEN, S_LOG_LEN] {
        for claim in [u64::MAX, u64::MAX - 7, 1 << 63] {
            let mut bytes = clean.clone();
            let at = HEADER_SIZE + field;
            bytes[at..at + 8].copy_from_slice(&claim.to_ne_bytes());
            std::fs::write(&path, &bytes).expect("write");
            assert!(
                matches!(
                    Subscriber::new(&path).read(),
                    Err(RegionError::Length { .. })
                ),
                "field {field} = {claim}"
            );
        }
    }
}

#[test]
fn a_publisher_rounds_its_capacity_so_readers_accept_it() {
    let (_dir, path) = scratch_region();
    let mut publisher = Publisher::create(
        &path,
        PublishOptions {
            slot_capacity: 4095,
            ..PublishOptions::default()
        },
    )
    .expect("create");
    publisher.publish(b"hello").expect("publish");
    let (_, payload) = expect_new(&mut Subscriber::new(&path));
    assert_eq!(payload, b"hello");
}

#[test]
fn a_base_read_in_place_stays_intact_until_the_publisher_replaces_it() {
    let (_dir, _, mut publisher, mut sub) = small_region();
    publisher.publish(b"first base").expect("publish");
    let base = match sub.read() {
        Ok(ReadOutcome::New {
            base: Some(base), ..
        }) => base,
        other => panic!("expected a base, got {other:?}"),
    };
    assert!(base.payload.in_place(), "{:?}", base.payload);
    appended(&mut publisher, b"a delta");
    assert!(base.payload.intact(), "a delta leaves the base alone");
    assert_eq!(&*base.payload, b"first base");
    publisher.compact(b"first base + a delta").expect("compact");
    assert!(!base.payload.intact(), "the slot was released");

    // The same for a base read after a compaction, replaced by a publish.
    let base = match sub.read() {
        Ok(ReadOutcome::New {
            base: Some(base), ..
        }) => base,
        other => panic!("expected the compacted base, got {other:?}"),
    };
    assert!(base.payload.intact());
    publisher.publish(b"third").expect("publish");
    assert!(!base.payload.intact());
    // What replaced it is read whole.
    assert_eq!(expect_new(&mut sub).1, b"third");
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
    readers_never_see_a_torn_snapshot(small(), true);
}

#[test]
fn concurrent_readers_never_see_a_torn_compressed_snapshot() {
    readers_never_see_a_torn_snapshot(compressing(4096), false);
}

/// Readers of bases stored with `options`, read `in_place` or as decoded copies, under a
/// publisher replacing them at full speed. A base read in place is checked only where
/// `intact` says the publisher left it alone while it was compared, as the data plane does.
fn readers_never_see_a_torn_snapshot(options: PublishOptions, in_place: bool) {
    let (_dir, path) = scratch_region();
    let mut publisher = Publisher::create(&path, options).expect("create");
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
                        Ok(ReadOutcome::New {
                            version,
                            base: Some(base),
                            deltas,
                        }) if deltas.is_empty() => {
                            assert!(version.generation > last_generation, "went backwards");
                            assert_eq!(base.payload.in_place(), in_place);
                            let same = *base.payload == *payload_for(version.generation);
                            if !base.payload.intact() {
                                sub.resync();
                                continue;
                            }
                            assert!(same, "generation {} torn", version.generation);
                            last_generation = version.generation;
                            seen += 1;
                        }
                        Ok(ReadOutcome::Unchanged) | Err(RegionError::Busy { .. }) => {}
                        Ok(other) => panic!("only complete snapshots were published: {other:?}"),
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
    let (_dir, path) = scratch_region();
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

#[test]
fn a_reader_waits_for_the_first_publication_instead_of_spinning() {
    let (_dir, path) = scratch_region();
    // The agent has created the region but not yet published (it may still be listing the
    // cluster): a reader must sleep on the wake word, not return at once and read again.
    let mut publisher = Publisher::create(&path, small()).expect("create");
    let mut sub = Subscriber::new(&path);
    assert!(matches!(sub.read(), Err(RegionError::Empty { .. })));
    let published = Arc::new(AtomicBool::new(false));
    let waiter = std::thread::spawn({
        let published = published.clone();
        move || {
            sub.wait(Duration::from_secs(60));
            published.load(Ordering::Acquire)
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    published.store(true, Ordering::Release);
    publisher.publish(b"one").expect("publish");
    assert!(
        waiter.join().expect("join"),
        "wait returned before anything was published"
    );
}

#[test]
fn changes_are_appended_and_each_reader_gets_only_what_it_has_not_seen() {
    let (_dir, path) = scratch_region();
    let mut publisher = Publisher::create(&path, small()).expect("create");
    assert_eq!(
        publisher.append(b"too early").expect("append"),
        Appended::NeedsFull
    );
    publisher.publish(b"base").expect("publish");
    let mut early = Subscriber::new(&path);
    assert_eq!(expect_new(&mut early).1, b"base");

    appended(&mut publisher, b"delta 2");
    let v3 = appended(&mut publisher, b"delta 3");
    assert_eq!(v3.generation, 3);
    let (version, deltas) = expect_deltas(&mut early);
    assert_eq!(version, v3);
    assert_eq!(deltas, vec![b"delta 2".to_vec(), b"delta 3".to_vec()]);
    assert!(matches!(early.read(), Ok(ReadOutcome::Unchanged)));

    // The next read copies only the new record, not the log again.
    appended(&mut publisher, b"delta 4");
    assert_eq!(expect_deltas(&mut early).1, vec![b"delta 4".to_vec()]);

    // A reader that starts now gets the base and the whole log.
    let mut late = Subscriber::new(&path);
    match late.read().expect("read") {
        ReadOutcome::New {
            version,
            base: Some(base),
            deltas,
        } => {
            assert_eq!((version.generation, base.generation), (4, 1));
            assert_eq!(&*base.payload, b"base");
            let generations: Vec<u64> = deltas.iter().map(|d| d.generation).collect();
            assert_eq!(generations, [2, 3, 4]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_compaction_is_invisible_to_readers_that_kept_up_and_a_base_for_those_behind() {
    let (_dir, path) = scratch_region();
    let mut publisher = Publisher::create(&path, small()).expect("create");
    publisher.publish(b"base").expect("publish");
    let mut current = Subscriber::new(&path);
    let mut behind = Subscriber::new(&path);
    expect_new(&mut current);
    expect_new(&mut behind);
    appended(&mut publisher, b"delta 2");
    appended(&mut publisher, b"delta 3");
    expect_deltas(&mut current);

    let compacted = publisher.compact(b"base + 2 + 3").expect("compact");
    assert_eq!((compacted.generation, publisher.log_bytes()), (3, 0));
    assert!(matches!(current.read(), Ok(ReadOutcome::Unchanged)));
    appended(&mut publisher, b"delta 4");
    assert_eq!(expect_deltas(&mut current).1, vec![b"delta 4".to_vec()]);

    // Stopped at generation 1: its deltas are gone, so it gets the compacted base.
    match behind.read().expect("read") {
        ReadOutcome::New {
            version,
            base: Some(base),
            deltas,
        } => {
            assert_eq!(version.generation, 4);
            assert_eq!((base.generation, &*base.payload), (3, &b"base + 2 + 3"[..]));
            assert_eq!(deltas.len(), 1);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_full_log_asks_for_a_complete_snapshot_and_a_long_one_for_compaction() {
    let (_dir, path) = scratch_region();
    let mut publisher = Publisher::create(&path, small()).expect("create");
    publisher.publish(&incompressible(1000)).expect("publish");
    let mut appends = 0;
    while let Appended::Published(_) = publisher.append(&[2u8; 500]).expect("append") {
        appends += 1;
    }
    // 4096-byte slots: 1000 bytes of base leave room for five 516-byte records.
    assert_eq!(appends, 5);
    assert!(
        !publisher.wants_compaction(),
        "1 MiB minimum before compaction"
    );

    let (_dir2, path2) = scratch_region();
    let mut big = Publisher::create(&path2, PublishOptions::default()).expect("create");
    big.publish(&[1u8; 100]).expect("publish");
    while !big.wants_compaction() {
        big.append(&[3u8; 64 << 10]).expect("append");
    }
    assert!(big.log_bytes() > 1 << 20);
}

#[test]
fn a_corrupt_record_is_reported_once_and_a_compaction_heals_the_reader() {
    let (_dir, _, mut publisher, mut sub) = small_region();
    publisher.publish(b"base").expect("publish");
    expect_new(&mut sub);
    appended(&mut publisher, b"delta 2");
    publisher.corrupt_last_record_for_test();
    assert!(matches!(
        sub.read(),
        Err(RegionError::Checksum { generation: 2, .. })
    ));
    assert!(matches!(sub.read(), Ok(ReadOutcome::Unchanged)));
    // Deltas after the bad one cannot be applied either: still refused, from the base.
    appended(&mut publisher, b"delta 3");
    assert!(matches!(sub.read(), Err(RegionError::Checksum { .. })));
    publisher.compact(b"good base at 3").expect("compact");
    appended(&mut publisher, b"delta 4");
    match sub.read().expect("read") {
        ReadOutcome::New {
            version,
            base: Some(base),
            deltas,
        } => {
            assert_eq!(version.generation, 4);
            assert_eq!(&*base.payload, b"good base at 3");
            assert_eq!(deltas.len(), 1);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_compaction_after_a_refusal_is_read_although_the_generation_did_not_move() {
    let (_dir, _, mut publisher, mut sub) = small_region();
    publisher.publish(b"base").expect("publish");
    expect_new(&mut sub);
    appended(&mut publisher, b"a delta the caller refuses");
    expect_deltas(&mut sub);
    sub.resync();
    assert!(matches!(sub.read(), Ok(ReadOutcome::Unchanged)));
    publisher.compact(b"fixed base").expect("compact");
    let (version, payload) = expect_new(&mut sub);
    assert_eq!(
        (version.generation, payload.as_slice()),
        (2, &b"fixed base"[..])
    );
    assert!(matches!(sub.read(), Ok(ReadOutcome::Unchanged)));

    // The same after a corrupt record the reader itself refused.
    appended(&mut publisher, b"delta 3");
    publisher.corrupt_last_record_for_test();
    assert!(matches!(sub.read(), Err(RegionError::Checksum { .. })));
    publisher.compact(b"base at 3").expect("compact");
    assert_eq!(expect_new(&mut sub).1, b"base at 3");
}

#[test]
fn resync_starts_the_next_read_from_the_base() {
    let (_dir, _, mut publisher, mut sub) = small_region();
    publisher.publish(b"base").expect("publish");
    expect_new(&mut sub);
    appended(&mut publisher, b"delta 2");
    expect_deltas(&mut sub);
    sub.resync();
    appended(&mut publisher, b"delta 3");
    match sub.read().expect("read") {
        ReadOutcome::New {
            base: Some(base),
            deltas,
            ..
        } => {
            assert_eq!(&*base.payload, b"base");
            assert_eq!(deltas.len(), 2);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn only_the_active_slot_keeps_its_pages() {
    use std::os::unix::fs::MetadataExt;
    let (_dir, path) = scratch_region();
    let mut publisher = Publisher::create(&path, PublishOptions::default()).expect("create");
    let payload = incompressible(8 << 20);
    publisher.publish(&payload).expect("publish");
    publisher.publish(&payload).expect("publish");
    publisher.compact(&payload).expect("compact");
    let allocated = std::fs::metadata(&path).expect("stat").blocks() * 512;
    // One slot's 8 MiB plus the header and a partial page, not two slots' worth.
    assert!(allocated < 9 << 20, "{allocated} bytes allocated");
    assert_eq!(expect_new(&mut Subscriber::new(&path)).1, payload);
}

#[test]
fn a_base_is_stored_compressed_and_read_back_whole() {
    use std::os::unix::fs::MetadataExt;
    let (_dir, path) = scratch_region();
    let mut publisher =
        Publisher::create(&path, compressing(DEFAULT_SLOT_CAPACITY)).expect("create");
    let payload = snapshot_like(100_000);
    publisher.publish(&payload).expect("publish");
    // The same shape of text as a snapshot's: namespaces, nodes and accounts repeat.
    assert!(
        publisher.base_bytes() * 3 < payload.len() as u64,
        "{} of {} bytes stored",
        publisher.base_bytes(),
        payload.len()
    );
    let allocated = std::fs::metadata(&path).expect("stat").blocks() * 512;
    assert!(
        allocated < payload.len() as u64 / 3,
        "{allocated} bytes allocated"
    );
    assert_eq!(expect_new(&mut Subscriber::new(&path)).1, payload);

    // A base bigger than the slots that compresses into them stays in this file.
    let (_dir2, path2) = scratch_region();
    let mut tight = Publisher::create(&path2, compressing(4096)).expect("create");
    let mut sub = Subscriber::new(&path2);
    tight.publish(b"first").expect("publish");
    let (first, _) = expect_new(&mut sub);
    let roomy = snapshot_like(100);
    assert!(roomy.len() > 4096);
    tight.publish(&roomy).expect("publish");
    let (second, read) = expect_new(&mut sub);
    assert_eq!(read, roomy);
    assert_eq!(first.epoch, second.epoch, "no bigger file was needed");

    let noise = incompressible(2000);
    tight.publish(&noise).expect("publish");
    assert_eq!(tight.base_bytes(), 2000, "stored as is");
    assert_eq!(expect_new(&mut sub).1, noise);
}

#[test]
fn a_base_that_does_not_decode_is_refused_and_the_next_good_one_is_read() {
    let (_dir, path) = scratch_region();
    let payload = snapshot_like(200);
    let mut publisher =
        Publisher::create(&path, compressing(DEFAULT_SLOT_CAPACITY)).expect("create");
    publisher.publish(&payload).expect("publish");
    let stored = publisher.base_bytes() as usize;
    drop(publisher);
    let clean = std::fs::read(&path).expect("read");
    let slot = HEADER_SIZE;
    let field = |bytes: &[u8], at: usize| {
        u64::from_ne_bytes(bytes[slot + at..slot + at + 8].try_into().expect("8 bytes"))
    };
    assert_eq!(field(&clean, S_DECODED_LEN), payload.len() as u64);
    let codec = u32::from_ne_bytes(
        clean[slot + S_CODEC..slot + S_CODEC + 4]
            .try_into()
            .expect("4 bytes"),
    );
    assert_eq!(codec, CODEC_LZ4_BLOCK);

    // Each as a publisher's bug would write it: wrong, yet with a checksum that matches, so
    // only the decoder can tell. None may panic or allocate what the header claims.
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut truncated_block = clean.clone();
    truncated_block[slot + S_LEN..slot + S_LEN + 8]
        .copy_from_slice(&(stored as u64 - 9).to_ne_bytes());
    cases.push(("a block cut short", truncated_block));
    for claim in [payload.len() as u64 + 1, u64::MAX, 1 << 40] {
        let mut lying = clean.clone();
        lying[slot + S_DECODED_LEN..slot + S_DECODED_LEN + 8].copy_from_slice(&claim.to_ne_bytes());
        cases.push(("a decoded length the block does not have", lying));
    }
    let mut unknown = clean.clone();
    unknown[slot + S_CODEC..slot + S_CODEC + 4].copy_from_slice(&7u32.to_ne_bytes());
    cases.push(("an unknown codec", unknown));
    let mut stored_as_is = clean.clone();
    stored_as_is[slot + S_CODEC..slot + S_CODEC + 4].copy_from_slice(&CODEC_STORED.to_ne_bytes());
    cases.push(("a block said to be stored as is", stored_as_is));
    for (case, mut bytes) in cases {
        Publisher::seal_slots_for_fuzzing(&mut bytes);
        std::fs::write(&path, &bytes).expect("write");
        let mut sub = Subscriber::new(&path);
        match sub.read() {
            Err(error @ RegionError::Decode { .. }) => assert!(error.is_corrupt(), "{case}"),
            other => panic!("{case}: expected a decode error, got {other:?}"),
        }
        // Reported once; the next publication is read whole.
        assert!(matches!(sub.read(), Ok(ReadOutcome::Unchanged)), "{case}");
        let mut next = Publisher::create(&path, PublishOptions::default()).expect("create");
        next.publish(&payload).expect("publish");
        assert_eq!(expect_new(&mut sub).1, payload, "{case}");
    }

    // Without the fixed checksum, a changed codec or decoded length is a checksum error.
    let mut torn = clean;
    torn[slot + S_DECODED_LEN] ^= 1;
    std::fs::write(&path, &torn).expect("write");
    assert!(matches!(
        Subscriber::new(&path).read(),
        Err(RegionError::Checksum { .. })
    ));
}

/// State of the model below after generation `g`: every generation folds into one number,
/// so a reader that skipped, repeated or reordered anything ends with a different one.
fn fold(state: u64, generation: u64) -> u64 {
    state
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(generation)
}

fn state_at(generation: u64) -> u64 {
    (1..=generation).fold(0, fold)
}

/// The publish/adopt protocol under concurrency, as an executable model: a publisher mixes
/// complete snapshots, appended deltas and compactions at full speed while readers rebuild the
/// state from what they read; after every read a reader's state must equal the publisher's
/// at that generation. (loom cannot model memory shared through a file mapping, so this runs
/// the real code on real threads; the mix and count make every interleaving class occur.)
#[test]
fn readers_rebuild_exactly_the_published_state_under_a_mix_of_bases_deltas_and_compactions() {
    let (_dir, path) = scratch_region();
    let mut publisher = Publisher::create(&path, small()).expect("create");
    let base_payload = |generation: u64| {
        let mut p = vec![0u8; 64 + (generation as usize % 7) * 100];
        p[..8].copy_from_slice(&generation.to_le_bytes());
        p[8..16].copy_from_slice(&state_at(generation).to_le_bytes());
        p
    };
    publisher.publish(&base_payload(1)).expect("publish");
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let path = path.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut sub = Subscriber::new(&path);
                let mut state = None::<u64>;
                let (mut bases, mut deltas_seen) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    match sub.read() {
                        Ok(ReadOutcome::New {
                            version,
                            base,
                            deltas,
                        }) => {
                            if let Some(base) = base {
                                let word = |r: std::ops::Range<usize>| {
                                    u64::from_le_bytes(base.payload[r].try_into().expect("8"))
                                };
                                let (generation, base_state) = (word(0..8), word(8..16));
                                // Replaced while read in place: read again, from the base.
                                if !base.payload.intact() {
                                    sub.resync();
                                    continue;
                                }
                                assert_eq!(
                                    generation, base.generation,
                                    "base of another generation"
                                );
                                state = Some(base_state);
                                bases += 1;
                            }
                            let mut s = state.expect("a delta before any base");
                            for d in &deltas {
                                assert_eq!(*d.payload, d.generation.to_le_bytes());
                                s = fold(s, d.generation);
                                deltas_seen += 1;
                            }
                            state = Some(s);
                            assert_eq!(s, state_at(version.generation), "at {version:?}");
                        }
                        Ok(ReadOutcome::Unchanged) | Err(RegionError::Busy { .. }) => {}
                        Err(e) => panic!("reader failed: {e}"),
                    }
                }
                (bases, deltas_seen)
            })
        })
        .collect();
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    for _ in 0..30_000 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let next = publisher.version().generation + 1;
        match rng % 10 {
            0 => {
                publisher.publish(&base_payload(next)).expect("publish");
            }
            1 => {
                let now = publisher.version().generation;
                publisher.compact(&base_payload(now)).expect("compact");
            }
            _ => {
                if publisher.append(&next.to_le_bytes()).expect("append") == Appended::NeedsFull {
                    publisher.publish(&base_payload(next)).expect("publish");
                }
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        let (bases, deltas) = r.join().expect("reader thread");
        assert!(bases > 0 && deltas > 0, "bases {bases}, deltas {deltas}");
    }
}

/// One record as a publisher appends it: length, checksum, generation, payload padded to 8.
fn record(generation: u64, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    bytes.extend_from_slice(&generation.to_le_bytes());
    bytes.extend_from_slice(payload);
    bytes.resize(bytes.len().next_multiple_of(8), 0);
    bytes
}

#[test]
fn a_log_that_no_publisher_wrote_is_refused_not_skipped() {
    let good = [record(6, b"six"), record(7, b"seven")].concat();
    let mut applied = 5;
    let read = parse_records(&good, &mut applied).unwrap_or_else(|_| panic!("a good log"));
    assert_eq!((read.len(), applied), (2, 7));
    // Zero-filled bytes pass the checksum (an empty payload's is 0) but are no record.
    let zeros = [record(6, b"six"), vec![0u8; 32]].concat();
    // A generation twice, and one going back: even where the reader has seen them all.
    let repeated = [record(6, b"six"), record(6, b"six")].concat();
    let backwards = [record(6, b"six"), record(5, b"five")].concat();
    for (what, log) in [
        ("zeros", zeros),
        ("repeated", repeated),
        ("backwards", backwards),
    ] {
        let mut applied = 6;
        assert!(
            matches!(
                parse_records(&log, &mut applied),
                Err(RecordProblem::Malformed(_))
            ),
            "{what} accepted"
        );
    }
}
