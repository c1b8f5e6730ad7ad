//! HBONE connection pool bookkeeping for one worker, as a state machine.
//!
//! The I/O layer owns the actual h2 connections; this decides which one a new stream uses, when
//! to dial, who waits, and what to close. Rules (DESIGN section 4):
//! - a burst to a fresh key dials one connection and everyone else waits for it;
//! - at most `max_streams` streams per connection; the overflow gets another connection;
//! - a connection with no streams for `idle_timeout` is released; with a zero timeout, as soon
//!   as its last stream ends, not even handed to a waiter (with `max_streams` 1, every stream
//!   then dials and handshakes afresh);
//! - a retired connection (certificate rotated, peer going away) takes no new streams and is
//!   closed when its last stream ends.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

pub type ConnId = u64;
pub type WaiterId = u64;

#[derive(Clone, Copy, Debug)]
pub struct PoolConfig {
    pub max_streams: u32,
    pub idle_timeout: Duration,
}

/// The answer to "I want a stream for this key".
#[derive(Debug, PartialEq, Eq)]
pub enum Checkout {
    /// A stream slot on an established connection is reserved for the caller.
    Ready(ConnId),
    /// The caller waits as `waiter`. If `dial` is set, the caller must start dialling that
    /// connection (in a task of its own, so the dial survives the caller giving up).
    Wait {
        waiter: WaiterId,
        dial: Option<ConnId>,
    },
}

/// What the I/O layer must do after an event.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Actions {
    /// Waiters that now hold a stream slot on the connection.
    pub granted: Vec<(WaiterId, ConnId)>,
    /// Waiters whose connection attempt failed.
    pub failed: Vec<WaiterId>,
    /// A connection to dial for waiters still queued.
    pub dial: Option<ConnId>,
    /// A connection to close (retired and now unused).
    pub close: Option<ConnId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Ready,
    Retired,
}

#[derive(Debug)]
struct Conn<K> {
    key: K,
    phase: Phase,
    streams: u32,
    idle_since: Option<Instant>,
}

#[derive(Debug, Default)]
struct KeyState {
    ready: Vec<ConnId>,
    connecting: Option<ConnId>,
    waiters: VecDeque<WaiterId>,
}

#[derive(Debug)]
pub struct Pool<K> {
    config: PoolConfig,
    keys: HashMap<K, KeyState>,
    conns: HashMap<ConnId, Conn<K>>,
    waiters: HashMap<WaiterId, K>,
    /// Keys dropped since the last `take_forgotten`, so the caller can drop what it keeps per
    /// key (dial parameters) instead of keeping it for every key ever seen.
    forgotten: Vec<K>,
    next_id: u64,
}

impl<K: Hash + Eq + Clone> Pool<K> {
    pub fn new(config: PoolConfig) -> Self {
        Pool {
            config,
            keys: HashMap::new(),
            conns: HashMap::new(),
            waiters: HashMap::new(),
            forgotten: Vec::new(),
            next_id: 1,
        }
    }

    fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    pub fn checkout(&mut self, key: &K) -> Checkout {
        let max = self.config.max_streams;
        if let Some(state) = self.keys.get(key) {
            let room = state
                .ready
                .iter()
                .copied()
                .find(|id| self.conns.get(id).is_some_and(|c| c.streams < max));
            if let Some(id) = room {
                if let Some(conn) = self.conns.get_mut(&id) {
                    conn.streams += 1;
                    conn.idle_since = None;
                }
                return Checkout::Ready(id);
            }
        }
        let waiter = self.next_id();
        self.waiters.insert(waiter, key.clone());
        let needs_dial = {
            let state = self.keys.entry(key.clone()).or_default();
            state.waiters.push_back(waiter);
            state.connecting.is_none()
        };
        let dial = needs_dial.then(|| self.start_dial(key));
        Checkout::Wait { waiter, dial }
    }

    fn start_dial(&mut self, key: &K) -> ConnId {
        let id = self.next_id();
        self.conns.insert(
            id,
            Conn {
                key: key.clone(),
                phase: Phase::Connecting,
                streams: 0,
                idle_since: None,
            },
        );
        self.keys.entry(key.clone()).or_default().connecting = Some(id);
        id
    }

    /// The dial of `id` succeeded: hand its stream slots to waiters in arrival order.
    pub fn connected(&mut self, id: ConnId, now: Instant) -> Actions {
        let Some(conn) = self.conns.get_mut(&id) else {
            return Actions::default();
        };
        conn.phase = Phase::Ready;
        conn.idle_since = Some(now);
        let key = conn.key.clone();
        if let Some(state) = self.keys.get_mut(&key) {
            if state.connecting == Some(id) {
                state.connecting = None;
            }
            state.ready.push(id);
        }
        let mut actions = self.grant_waiters(&key, id);
        self.close_if_unused(id, &mut actions);
        actions
    }

    /// With a zero idle timeout, a ready connection without streams is closed now rather than
    /// at the next sweep, so that the next stream dials afresh (a dial whose waiters gave up).
    fn close_if_unused(&mut self, id: ConnId, actions: &mut Actions) {
        let unused = self
            .conns
            .get(&id)
            .is_some_and(|c| c.phase == Phase::Ready && c.streams == 0);
        if unused && self.config.idle_timeout.is_zero() {
            self.remove(id);
            actions.close = Some(id);
        }
    }

    fn grant_waiters(&mut self, key: &K, id: ConnId) -> Actions {
        let mut actions = Actions::default();
        let max = self.config.max_streams;
        let Some(state) = self.keys.get_mut(key) else {
            return actions;
        };
        let Some(conn) = self.conns.get_mut(&id) else {
            return actions;
        };
        if conn.phase == Phase::Ready {
            while conn.streams < max {
                let Some(waiter) = state.waiters.pop_front() else {
                    break;
                };
                self.waiters.remove(&waiter);
                conn.streams += 1;
                conn.idle_since = None;
                actions.granted.push((waiter, id));
            }
        }
        actions.dial = self.dial_for_waiters(key);
        actions
    }

    /// Starts a dial for `key` if callers wait for it and none is under way.
    fn dial_for_waiters(&mut self, key: &K) -> Option<ConnId> {
        let state = self.keys.get(key)?;
        let needed = !state.waiters.is_empty() && state.connecting.is_none();
        needed.then(|| self.start_dial(key))
    }

    /// The dial of `id` failed: everyone waiting on its key is told.
    pub fn connect_failed(&mut self, id: ConnId) -> Actions {
        let mut actions = Actions::default();
        let Some(conn) = self.conns.remove(&id) else {
            return actions;
        };
        if let Some(state) = self.keys.get_mut(&conn.key) {
            if state.connecting == Some(id) {
                state.connecting = None;
            }
            for waiter in state.waiters.drain(..) {
                self.waiters.remove(&waiter);
                actions.failed.push(waiter);
            }
        }
        self.forget_key_if_empty(&conn.key);
        actions
    }

    /// A stream on `id` ended.
    pub fn release(&mut self, id: ConnId, now: Instant) -> Actions {
        let Some(conn) = self.conns.get_mut(&id) else {
            return Actions::default();
        };
        conn.streams = conn.streams.saturating_sub(1);
        let key = conn.key.clone();
        match conn.phase {
            Phase::Retired if conn.streams == 0 => {
                self.remove(id);
                Actions {
                    close: Some(id),
                    ..Actions::default()
                }
            }
            Phase::Retired | Phase::Connecting => Actions::default(),
            Phase::Ready if conn.streams == 0 && self.config.idle_timeout.is_zero() => {
                // Not reused, not even by a waiter: that one has (or now gets) a dial of its own.
                self.remove(id);
                Actions {
                    close: Some(id),
                    dial: self.dial_for_waiters(&key),
                    ..Actions::default()
                }
            }
            Phase::Ready => {
                let actions = self.grant_waiters(&key, id);
                if let Some(conn) = self.conns.get_mut(&id) {
                    if conn.streams == 0 {
                        conn.idle_since = Some(now);
                    }
                }
                actions
            }
        }
    }

    /// The connection died (peer closed, PING timed out). Streams on it end on their own.
    pub fn lost(&mut self, id: ConnId) -> Actions {
        match self.conns.get(&id).map(|c| c.phase) {
            Some(Phase::Connecting) => self.connect_failed(id),
            Some(_) => {
                self.remove(id);
                Actions::default()
            }
            None => Actions::default(),
        }
    }

    /// Stops new streams on `id`; it is closed when its last stream ends (now, if idle).
    pub fn retire(&mut self, id: ConnId) -> Actions {
        let Some(conn) = self.conns.get_mut(&id) else {
            return Actions::default();
        };
        if conn.phase != Phase::Ready {
            return Actions::default();
        }
        conn.phase = Phase::Retired;
        let key = conn.key.clone();
        let idle = conn.streams == 0;
        if let Some(state) = self.keys.get_mut(&key) {
            state.ready.retain(|c| *c != id);
        }
        if idle {
            self.remove(id);
            return Actions {
                close: Some(id),
                ..Actions::default()
            };
        }
        Actions::default()
    }

    /// Retires every connection whose key matches; used when a source certificate rotates.
    pub fn retire_where(&mut self, mut matches: impl FnMut(&K) -> bool) -> Vec<ConnId> {
        let ids: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.phase == Phase::Ready && matches(&c.key))
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .filter_map(|id| self.retire(id).close)
            .collect()
    }

    /// A waiter gave up before being served.
    pub fn cancel(&mut self, waiter: WaiterId) {
        if let Some(key) = self.waiters.remove(&waiter) {
            if let Some(state) = self.keys.get_mut(&key) {
                state.waiters.retain(|w| *w != waiter);
            }
        }
    }

    /// Connections idle for at least the timeout; they are forgotten and must be closed.
    pub fn expire_idle(&mut self, now: Instant) -> Vec<ConnId> {
        let timeout = self.config.idle_timeout;
        let expired: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.phase == Phase::Ready
                    && c.streams == 0
                    && c.idle_since
                        .is_some_and(|t| now.saturating_duration_since(t) >= timeout)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in &expired {
            self.remove(*id);
        }
        expired
    }

    fn remove(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.remove(&id) {
            if let Some(state) = self.keys.get_mut(&conn.key) {
                state.ready.retain(|c| *c != id);
            }
            self.forget_key_if_empty(&conn.key);
        }
    }

    fn forget_key_if_empty(&mut self, key: &K) {
        let empty = self
            .keys
            .get(key)
            .is_some_and(|s| s.ready.is_empty() && s.connecting.is_none() && s.waiters.is_empty());
        if empty {
            if let Some((key, _)) = self.keys.remove_entry(key) {
                self.forgotten.push(key);
            }
        }
    }

    /// Keys left with no connection, dial or waiter since the last call: nothing will dial them
    /// again until a new checkout. Callers that keep state per key drain this after every event
    /// (it grows until drained).
    pub fn take_forgotten(&mut self) -> Vec<K> {
        let mut forgotten = std::mem::take(&mut self.forgotten);
        // Checked out again since: live once more.
        forgotten.retain(|k| !self.keys.contains_key(k));
        forgotten
    }

    /// Open (or opening) connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Streams in use across all connections.
    pub fn streams(&self) -> u64 {
        self.conns.values().map(|c| u64::from(c.streams)).sum()
    }

    /// The key a connection (open or being dialled) belongs to.
    pub fn key_of(&self, id: ConnId) -> Option<&K> {
        self.conns.get(&id).map(|c| &c.key)
    }

    pub fn streams_on(&self, id: ConnId) -> Option<u32> {
        self.conns.get(&id).map(|c| c.streams)
    }
}

#[cfg(test)]
mod tests;
