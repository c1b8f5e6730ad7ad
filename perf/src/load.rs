//! Latency figures shared by every scenario, and the blocking helpers tests use in-process
//! (an echo server on a listener made inside a pod, held connections, patterned bytes). The
//! lab's own traffic comes from the monoio generator in [`crate::gen`].

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread::JoinHandle;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

const SERVER_THREAD_STACK: usize = 128 * 1024;

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
