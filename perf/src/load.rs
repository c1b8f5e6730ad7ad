//! The load generator's building blocks, on plain blocking sockets so that the measuring side
//! adds as little of its own machinery as possible: echo and sink servers, a timed bulk
//! stream, closed-loop ping-pong latency, new-connection rate, and held idle connections.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

const SERVER_THREAD_STACK: usize = 128 * 1024;
const BULK_CHUNK: usize = 256 * 1024;

fn spawn_small<F: FnOnce() + Send + 'static>(f: F) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .stack_size(SERVER_THREAD_STACK)
        .spawn(f)
}

/// Echoes every connection until the client half-closes, then half-closes back.
pub fn serve_echo(listener: TcpListener) -> io::Result<JoinHandle<()>> {
    spawn_small(move || {
        for conn in listener.incoming().flatten() {
            let _ = spawn_small(move || {
                let _ = echo(conn);
            });
        }
    })
}

fn echo(mut conn: TcpStream) -> io::Result<()> {
    conn.set_nodelay(true)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return conn.shutdown(Shutdown::Write);
        }
        conn.write_all(&buf[..n])?;
    }
}

/// Reads every connection to EOF and answers with the byte count (8 bytes, little endian).
pub fn serve_sink(listener: TcpListener) -> io::Result<JoinHandle<()>> {
    spawn_small(move || {
        for conn in listener.incoming().flatten() {
            let _ = spawn_small(move || {
                let _ = sink(conn);
            });
        }
    })
}

fn sink(mut conn: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; BULK_CHUNK];
    let mut total = 0u64;
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    conn.write_all(&total.to_le_bytes())?;
    conn.shutdown(Shutdown::Write)
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct BulkResult {
    pub bytes: u64,
    pub seconds: f64,
}

impl BulkResult {
    pub fn gbit_per_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.seconds / 1e9
    }
}

/// Streams to a sink for `duration`; the result counts only bytes the sink confirmed.
pub fn bulk(mut stream: TcpStream, duration: Duration) -> io::Result<BulkResult> {
    let chunk = vec![0x5au8; BULK_CHUNK];
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < duration {
        stream.write_all(&chunk)?;
        sent += chunk.len() as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    let mut ack = [0u8; 8];
    stream.read_exact(&mut ack)?;
    let seconds = start.elapsed().as_secs_f64();
    let confirmed = u64::from_le_bytes(ack);
    if confirmed != sent {
        return Err(io::Error::other(format!(
            "sink confirmed {confirmed} bytes of {sent} sent"
        )));
    }
    Ok(BulkResult {
        bytes: confirmed,
        seconds,
    })
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Latency {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Latency {
    pub fn from_histogram(h: &Histogram<u64>) -> Latency {
        // Recorded in nanoseconds.
        let us = |ns: u64| ns as f64 / 1e3;
        Latency {
            count: h.len(),
            mean_us: h.mean() / 1e3,
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

/// Closed-loop request/response on one connection to an echo server: send `size` bytes, wait
/// for them to come back, repeat. Measures for `duration` after `warmup`.
pub fn ping_pong(
    mut stream: TcpStream,
    size: usize,
    warmup: Duration,
    duration: Duration,
) -> io::Result<Latency> {
    let request = vec![0xa5u8; size];
    let mut response = vec![0u8; size];
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)
        .map_err(|e| io::Error::other(e.to_string()))?;
    let start = Instant::now();
    loop {
        let sent_at = Instant::now();
        stream.write_all(&request)?;
        stream.read_exact(&mut response)?;
        let elapsed = sent_at.elapsed();
        let since_start = start.elapsed();
        if since_start > warmup {
            histogram.saturating_record(elapsed.as_nanos() as u64);
        }
        if since_start > warmup + duration {
            break;
        }
    }
    Ok(Latency::from_histogram(&histogram))
}

/// New connections, one after another on each of `threads` threads: connect, one byte to an
/// echo server and back, close (the client closes first, as a short request would).
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct ConnRateResult {
    pub threads: usize,
    pub connections: u64,
    pub failures: u64,
    pub seconds: f64,
    /// Connect to reply, per connection.
    pub latency: Latency,
}

impl ConnRateResult {
    pub fn per_second(&self) -> f64 {
        self.connections as f64 / self.seconds
    }
}

pub fn connection_rate<F>(
    threads: usize,
    duration: Duration,
    connect: F,
) -> io::Result<ConnRateResult>
where
    F: Fn() -> io::Result<TcpStream> + Sync,
{
    let start = Instant::now();
    let per_thread: Vec<io::Result<(Histogram<u64>, u64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| -> io::Result<(Histogram<u64>, u64)> {
                    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)
                        .map_err(|e| io::Error::other(e.to_string()))?;
                    let mut failures = 0;
                    let mut byte = [0u8; 1];
                    while start.elapsed() < duration {
                        let began = Instant::now();
                        let exchanged = connect().and_then(|mut c| {
                            c.write_all(b"c")?;
                            c.read_exact(&mut byte)
                        });
                        match exchanged {
                            Ok(()) => h.saturating_record(began.elapsed().as_nanos() as u64),
                            Err(_) => failures += 1,
                        }
                    }
                    Ok((h, failures))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("thread panicked")))
            })
            .collect()
    });
    let seconds = start.elapsed().as_secs_f64();
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)
        .map_err(|e| io::Error::other(e.to_string()))?;
    let mut failures = 0;
    for r in per_thread {
        let (h, f) = r?;
        all.add(&h).map_err(|e| io::Error::other(e.to_string()))?;
        failures += f;
    }
    Ok(ConnRateResult {
        threads,
        connections: all.len(),
        failures,
        seconds,
        latency: Latency::from_histogram(&all),
    })
}

/// Opens `count` connections with `connect`, proving each works with a one-byte echo.
pub fn hold<F>(count: usize, mut connect: F) -> io::Result<Vec<TcpStream>>
where
    F: FnMut() -> io::Result<TcpStream>,
{
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        let mut s = connect()?;
        s.write_all(b"h")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        held.push(s);
    }
    Ok(held)
}

/// Deterministic pseudo-random bytes (xorshift), so two ends can agree on content cheaply.
pub fn pattern(seed: u64, buf: &mut [u8]) -> u64 {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    x
}
