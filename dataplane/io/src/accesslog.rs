//! Access logs: one structured line per connection, written off the data path.
//!
//! A worker fills in a [`Record`] when a connection ends and pushes it onto its own bounded
//! lock-free queue; a logger thread drains every worker's queue and writes the lines (target
//! `access`, through the process's log format). A full queue drops the record and counts it,
//! so a slow log sink never slows traffic.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_queue::ArrayQueue;

use crate::stats::WorkerStats;

/// Records a worker may have waiting before it starts dropping them. The queue is allocated
/// (and its slots touched) up front, about 250 bytes a slot: 1024 keeps it near 256 KiB per
/// worker and, with the logger draining continuously while there is work, holds over 10k
/// connections per second per worker.
const QUEUE_DEPTH: usize = 1024;

/// Whether and how much to log; workers get changes as a control message.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AccessLogSettings {
    pub enabled: bool,
    /// Fraction of successful connections logged (0.0..=1.0); failures are always logged.
    pub sample: f64,
}

impl Default for AccessLogSettings {
    fn default() -> Self {
        AccessLogSettings {
            enabled: true,
            sample: 1.0,
        }
    }
}

/// One finished connection.
#[derive(Debug, Clone)]
pub struct Record {
    pub worker: usize,
    /// "outbound", "inbound" (HBONE) or "inbound plaintext".
    pub direction: &'static str,
    pub pod: String,
    pub source: SocketAddr,
    pub source_identity: Option<String>,
    pub destination: SocketAddr,
    pub destination_identity: Option<String>,
    /// Bytes from the connection's client to its server, and back.
    pub bytes_to_server: u64,
    pub bytes_to_client: u64,
    pub duration: Duration,
    /// "ok", "reset", "denied", "closed by policy", or why the connection was not made.
    pub result: String,
    /// The policy decision, when one was made.
    pub policy: Option<String>,
}

/// One worker's sampler and queue.
pub struct WorkerLog {
    queue: Arc<ArrayQueue<Record>>,
    settings: std::cell::Cell<AccessLogSettings>,
    /// Successful connections seen, for deterministic sampling.
    seen: std::cell::Cell<u64>,
    stats: Arc<WorkerStats>,
}

impl WorkerLog {
    pub fn set(&self, settings: AccessLogSettings) {
        self.settings.set(settings);
    }

    /// Whether the connection that just started will be logged if it succeeds. Every
    /// 1/sample-th one is: sampling spreads evenly instead of in bursts.
    pub fn sample(&self) -> bool {
        let s = self.settings.get();
        if !s.enabled || s.sample <= 0.0 {
            return false;
        }
        let n = self.seen.get();
        self.seen.set(n.wrapping_add(1));
        ((n + 1) as f64 * s.sample).floor() > (n as f64 * s.sample).floor()
    }

    /// Whether failures are logged at all.
    pub fn enabled(&self) -> bool {
        self.settings.get().enabled
    }

    pub fn push(&self, record: Record) {
        if self.queue.push(record).is_err() {
            self.stats.access_log_dropped.inc();
        }
    }
}

/// The logger thread's side.
pub struct AccessLogger {
    queues: Vec<Arc<ArrayQueue<Record>>>,
}

impl AccessLogger {
    pub fn new(
        stats: &[Arc<WorkerStats>],
        settings: AccessLogSettings,
    ) -> (AccessLogger, Vec<WorkerLog>) {
        let mut queues = Vec::with_capacity(stats.len());
        let mut workers = Vec::with_capacity(stats.len());
        for s in stats {
            let queue = Arc::new(ArrayQueue::new(QUEUE_DEPTH));
            queues.push(queue.clone());
            workers.push(WorkerLog {
                queue,
                settings: std::cell::Cell::new(settings),
                seen: std::cell::Cell::new(0),
                stats: s.clone(),
            });
        }
        (AccessLogger { queues }, workers)
    }

    /// Writes everything queued; returns how many lines.
    pub fn drain(&self) -> usize {
        let mut n = 0;
        for queue in &self.queues {
            while let Some(r) = queue.pop() {
                write(&r);
                n += 1;
            }
        }
        crate::logs::flush_lines();
        n
    }

    /// Drains every 100 ms until `stop`, then once more. Lines go to stderr packed into
    /// writes of up to PIPE_BUF ([`crate::logs::batch_lines_on_this_thread`]).
    pub fn run(self, stop: Arc<std::sync::atomic::AtomicBool>) {
        crate::logs::batch_lines_on_this_thread(std::io::stderr());
        while !stop.load(std::sync::atomic::Ordering::Acquire) {
            if self.drain() == 0 {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        self.drain();
    }
}

fn write(r: &Record) {
    tracing::info!(
        target: "access",
        worker = r.worker,
        direction = r.direction,
        pod = %r.pod,
        src.addr = %r.source,
        src.identity = r.source_identity.as_deref().unwrap_or("-"),
        dst.addr = %r.destination,
        dst.identity = r.destination_identity.as_deref().unwrap_or("-"),
        bytes_to_server = r.bytes_to_server,
        bytes_to_client = r.bytes_to_client,
        duration_ms = r.duration.as_secs_f64() * 1000.0,
        result = %r.result,
        policy = r.policy.as_deref().unwrap_or("-"),
        "connection"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_logs_the_requested_fraction_evenly() {
        let stats = [Arc::new(WorkerStats::default())];
        let (_, workers) = AccessLogger::new(
            &stats,
            AccessLogSettings {
                enabled: true,
                sample: 0.25,
            },
        );
        let picked: Vec<bool> = (0..8).map(|_| workers[0].sample()).collect();
        assert_eq!(picked.iter().filter(|p| **p).count(), 2);
        assert!(!picked[0] && picked[3] && picked[7]);
        workers[0].set(AccessLogSettings {
            enabled: false,
            sample: 1.0,
        });
        assert!(!workers[0].sample());
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let stats = [Arc::new(WorkerStats::default())];
        let (logger, workers) = AccessLogger::new(&stats, AccessLogSettings::default());
        let record = Record {
            worker: 0,
            direction: "outbound",
            pod: "p".into(),
            source: "10.0.0.1:1".parse().expect("addr"),
            source_identity: None,
            destination: "10.0.0.2:2".parse().expect("addr"),
            destination_identity: None,
            bytes_to_server: 0,
            bytes_to_client: 0,
            duration: Duration::ZERO,
            result: "ok".into(),
            policy: None,
        };
        for _ in 0..QUEUE_DEPTH + 5 {
            workers[0].push(record.clone());
        }
        assert_eq!(stats[0].access_log_dropped.get(), 5);
        assert_eq!(logger.drain(), QUEUE_DEPTH);
    }
}
