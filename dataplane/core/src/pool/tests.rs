use super::*;

const KEY: &str = "client->server";

fn pool(max_streams: u32) -> Pool<&'static str> {
    pool_with_idle_timeout(max_streams, Duration::from_secs(60))
}

fn pool_with_idle_timeout(max_streams: u32, idle_timeout: Duration) -> Pool<&'static str> {
    Pool::new(PoolConfig {
        max_streams,
        idle_timeout,
    })
}

fn wait(c: Checkout) -> (WaiterId, Option<ConnId>) {
    match c {
        Checkout::Wait { waiter, dial } => (waiter, dial),
        other => panic!("expected to wait, got {other:?}"),
    }
}

#[test]
fn a_burst_to_a_fresh_key_dials_once_and_everyone_shares_it() {
    let mut p = pool(100);
    let now = Instant::now();
    let (first, dial) = wait(p.checkout(&KEY));
    let conn = dial.expect("first caller dials");
    let others: Vec<_> = (0..49).map(|_| wait(p.checkout(&KEY))).collect();
    assert!(others.iter().all(|(_, d)| d.is_none()), "only one dial");
    assert_eq!(p.connections(), 1);

    let actions = p.connected(conn, now);
    assert_eq!(actions.granted.len(), 50);
    assert_eq!(actions.granted[0], (first, conn));
    assert_eq!(actions.dial, None);
    assert_eq!(p.checkout(&KEY), Checkout::Ready(conn));
    assert_eq!(p.streams_on(conn), Some(51));
}

#[test]
fn more_than_max_streams_opens_exactly_enough_connections() {
    let mut p = pool(100);
    let now = Instant::now();
    let mut dials = Vec::new();
    let mut granted = 0;
    let mut ready = 0;
    for _ in 0..1000 {
        match p.checkout(&KEY) {
            Checkout::Ready(_) => ready += 1,
            Checkout::Wait {
                dial: Some(conn), ..
            } => dials.push(conn),
            Checkout::Wait { dial: None, .. } => {}
        }
        // Dials complete as they are asked for, interleaved with new callers.
        while let Some(conn) = dials.pop() {
            let a = p.connected(conn, now);
            granted += a.granted.len();
            dials.extend(a.dial);
        }
    }
    assert_eq!(granted + ready, 1000);
    assert_eq!(p.connections(), 10, "1000 streams at 100 per connection");
    assert_eq!(p.streams(), 1000);
}

#[test]
fn waiters_beyond_one_connection_trigger_the_next_dial() {
    let mut p = pool(2);
    let now = Instant::now();
    let (_, dial) = wait(p.checkout(&KEY));
    for _ in 0..4 {
        wait(p.checkout(&KEY));
    }
    let first = p.connected(dial.expect("dial"), now);
    assert_eq!(first.granted.len(), 2);
    let second = first.dial.expect("next connection for the rest");
    let a = p.connected(second, now);
    assert_eq!(a.granted.len(), 2);
    let third = a.dial.expect("and one more for the last");
    assert_eq!(p.connected(third, now).granted.len(), 1);
}

#[test]
fn a_failed_dial_fails_every_waiter_and_the_next_caller_dials_again() {
    let mut p = pool(100);
    let (w1, dial) = wait(p.checkout(&KEY));
    let (w2, _) = wait(p.checkout(&KEY));
    let a = p.connect_failed(dial.expect("dial"));
    assert_eq!(a.failed, vec![w1, w2]);
    assert_eq!(p.connections(), 0);
    let (_, again) = wait(p.checkout(&KEY));
    assert!(again.is_some());
}

#[test]
fn released_slot_goes_to_a_queued_waiter_first() {
    let mut p = pool(1);
    let now = Instant::now();
    let (_, dial) = wait(p.checkout(&KEY));
    let conn = dial.expect("dial");
    p.connected(conn, now);
    let (queued, second_dial) = wait(p.checkout(&KEY));
    assert!(second_dial.is_some());
    let a = p.release(conn, now);
    assert_eq!(a.granted, vec![(queued, conn)]);
}

#[test]
fn cancelled_waiters_are_not_granted() {
    let mut p = pool(100);
    let (w1, dial) = wait(p.checkout(&KEY));
    let (w2, _) = wait(p.checkout(&KEY));
    p.cancel(w1);
    let a = p.connected(dial.expect("dial"), Instant::now());
    assert_eq!(a.granted.iter().map(|g| g.0).collect::<Vec<_>>(), vec![w2]);
}

#[test]
fn idle_connections_are_released_after_the_timeout_and_busy_ones_are_kept() {
    let mut p = pool(100);
    let t0 = Instant::now();
    let (_, dial) = wait(p.checkout(&KEY));
    let conn = dial.expect("dial");
    p.connected(conn, t0);
    let busy = "other";
    let (_, other_dial) = wait(p.checkout(&busy));
    let other = other_dial.expect("dial");
    p.connected(other, t0);
    p.release(conn, t0 + Duration::from_secs(1));

    assert!(p.expire_idle(t0 + Duration::from_secs(60)).is_empty());
    assert_eq!(p.expire_idle(t0 + Duration::from_secs(61)), vec![conn]);
    assert_eq!(p.connections(), 1, "the connection with a stream stays");
    let (_, fresh) = wait(p.checkout(&KEY));
    assert!(fresh.is_some(), "an expired connection is not reused");
}

#[test]
fn with_a_zero_idle_timeout_a_connection_closes_when_its_last_stream_ends() {
    let mut p = pool_with_idle_timeout(2, Duration::ZERO);
    let now = Instant::now();
    let (first, dial) = wait(p.checkout(&KEY));
    let (second, none) = wait(p.checkout(&KEY));
    assert!(none.is_none(), "one dial at a time per key");
    let conn = dial.expect("dial");
    assert_eq!(
        p.connected(conn, now).granted,
        vec![(first, conn), (second, conn)]
    );

    assert_eq!(
        p.release(conn, now).close,
        None,
        "kept while a stream uses it"
    );
    let last = p.release(conn, now);
    assert_eq!(
        last.close,
        Some(conn),
        "closed once unused, not left for the sweep"
    );
    assert_eq!(p.connections(), 0);
    assert_eq!(p.take_forgotten(), vec![KEY]);
    let (_, fresh) = wait(p.checkout(&KEY));
    assert!(fresh.is_some(), "the next stream dials a new connection");
}

#[test]
fn with_a_zero_idle_timeout_a_freed_connection_is_not_handed_to_a_waiter() {
    let mut p = pool_with_idle_timeout(1, Duration::ZERO);
    let now = Instant::now();
    let (first, dial) = wait(p.checkout(&KEY));
    let old = dial.expect("dial");
    p.connected(old, now);
    let (second, dial) = wait(p.checkout(&KEY));
    let own = dial.expect("the full connection makes the second caller dial");

    let released = p.release(old, now);
    assert!(released.granted.is_empty(), "the waiter keeps its own dial");
    assert_eq!(released.close, Some(old));
    assert_eq!(released.dial, None, "its dial is under way");
    assert_eq!(p.connected(own, now).granted, vec![(second, own)]);
    assert_ne!(first, second);
}

#[test]
fn with_a_zero_idle_timeout_a_dial_nobody_waits_for_any_more_is_closed_at_once() {
    let mut p = pool_with_idle_timeout(2, Duration::ZERO);
    let (waiter, dial) = wait(p.checkout(&KEY));
    p.cancel(waiter);
    let conn = dial.expect("dial");
    let connected = p.connected(conn, Instant::now());
    assert!(connected.granted.is_empty());
    assert_eq!(connected.close, Some(conn));
    assert_eq!(p.connections(), 0);
}

#[test]
fn retired_connections_take_no_new_streams_and_close_when_drained() {
    let mut p = pool(100);
    let now = Instant::now();
    let (_, dial) = wait(p.checkout(&KEY));
    let conn = dial.expect("dial");
    p.connected(conn, now);
    assert!(
        p.retire_where(|k| *k == KEY).is_empty(),
        "still has a stream"
    );
    let (_, fresh) = wait(p.checkout(&KEY));
    assert!(fresh.is_some(), "new streams go to a new connection");
    assert_eq!(p.release(conn, now).close, Some(conn));
}

#[test]
fn events_for_unknown_connections_are_ignored() {
    let mut p = pool(100);
    let now = Instant::now();
    assert_eq!(p.release(42, now), Actions::default());
    assert_eq!(p.connected(42, now), Actions::default());
    assert_eq!(p.lost(42), Actions::default());
    assert_eq!(p.connect_failed(42), Actions::default());
}

#[test]
fn keys_left_with_nothing_are_reported_forgotten_once_unless_checked_out_again() {
    let mut p = pool(100);
    let t0 = Instant::now();
    let (_, dial) = wait(p.checkout(&KEY));
    let idle = dial.expect("dial");
    p.connected(idle, t0);
    p.release(idle, t0);
    let (_, dial) = wait(p.checkout(&"unreachable"));
    p.connect_failed(dial.expect("dial"));
    let (_, dial) = wait(p.checkout(&"busy"));
    p.connected(dial.expect("dial"), t0);
    assert_eq!(p.take_forgotten(), vec!["unreachable"]);

    assert_eq!(p.expire_idle(t0 + Duration::from_secs(60)), vec![idle]);
    assert_eq!(p.take_forgotten(), vec![KEY]);
    assert!(p.take_forgotten().is_empty(), "reported once");

    // Forgotten, then wanted again before anyone looked: still in use.
    let (_, dial) = wait(p.checkout(&"retry"));
    p.connect_failed(dial.expect("dial"));
    wait(p.checkout(&"retry"));
    assert!(p.take_forgotten().is_empty());
}
