//! The load generator: thread-per-core on monoio (io_uring where the kernel allows it), one
//! runtime per thread, nothing shared between threads but the start instant. Servers (echo and
//! sink) use one SO_REUSEPORT listener per thread, as the data plane does.
//!
//! Scenarios: bulk streams to a sink, request/response at a fixed offered rate with latency
//! measured from each request's intended send time (open loop, like wrk2: a slow response
//! does not delay the next request, so queueing is not hidden), new connections back to back,
//! and many held idle connections.

use std::io::{self, Write as _};
use std::net::{SocketAddr, TcpStream as StdStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mesh_io::runtime::{self, Driver};
use mesh_io::sockets;
use monoio::buf::IoBuf;
use monoio::io::{AsyncReadRent, AsyncReadRentExt, AsyncWriteRent, AsyncWriteRentExt, Splitable};
use monoio::net::{TcpListener, TcpStream};
use serde::{Deserialize, Serialize};

use crate::load::Latency;

const BULK_CHUNK: usize = 256 * 1024;
const ECHO_BUF: usize = 64 * 1024;
/// Connections opened at once by `hold` (each proven with a one-byte echo).
const HOLD_CONCURRENCY: usize = 64;
/// How long the generator waits for what it is owed: a fixed-rate run's responses after the
/// last scheduled request, a sink's byte count after the end of a bulk run, a connection's
/// one-byte echo. What has not arrived by then counts as unanswered, so a stuck connection
/// cannot hang the run.
const ANSWER_GRACE: Duration = Duration::from_secs(10);

/// Runs `work` until `deadline`; past it the work is dropped and the answer is `TimedOut`, so
/// a connection that is never answered counts as a failure instead of hanging the run.
async fn by<T>(
    deadline: Instant,
    work: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    monoio::time::timeout_at(deadline.into(), work)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

fn histogram() -> io::Result<Histogram<u64>> {
    // Nanoseconds, 1 ns to 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).map_err(|e| io::Error::other(e.to_string()))
}

fn merge(into: &mut Histogram<u64>, from: &Histogram<u64>) -> io::Result<()> {
    into.add(from).map_err(|e| io::Error::other(e.to_string()))
}

/// Runs `work(thread_index)` on `threads` threads, each with its own runtime; returns every
/// thread's output in thread order.
fn per_thread<T, F, Fut>(driver: Driver, threads: usize, work: F) -> io::Result<Vec<T>>
where
    T: Send,
    F: Fn(usize) -> Fut + Sync,
    Fut: std::future::Future<Output = io::Result<T>>,
{
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads.max(1))
            .map(|i| {
                let work = &work;
                s.spawn(move || runtime::block_on(driver, || work(i)).and_then(|r| r))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("load thread panicked")))
            })
            .collect()
    })
}

async fn connect(to: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect(to).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// CPU seconds this process has used so far (user + system, all threads).
fn own_cpu() -> f64 {
    mesh_io::procfs::Process::Current
        .cpu_seconds()
        .unwrap_or(0.0)
}

/// Echo on `echo_port` and sink on `sink_port`, on `threads` threads, until the process ends;
/// a port of 0 is one the kernel picks. `ready` gets the ports served, once every thread's
/// listener is bound. Echo: every byte back until the client half-closes, then half-close.
/// Sink: read to EOF, answer with the byte count (8 bytes, little endian).
pub fn serve(
    driver: Driver,
    threads: usize,
    echo_port: u16,
    sink_port: u16,
    ready: impl FnOnce(u16, u16),
) -> io::Result<()> {
    let (echo_port, echo) = listeners_per_thread(threads, echo_port)?;
    let (sink_port, sink) = listeners_per_thread(threads, sink_port)?;
    let per_thread = echo.into_iter().zip(sink).collect();
    serve_on_threads(
        driver,
        per_thread,
        |(echo, sink)| async move {
            let echo = TcpListener::from_std(echo)?;
            let sink = TcpListener::from_std(sink)?;
            let sinks = monoio::spawn(accept_loop(sink, sink_conn));
            accept_loop(echo, echo_conn).await;
            sinks.await;
            Ok(())
        },
        || ready(echo_port, sink_port),
    )
}

/// Runs `serve` on each thread's share of listeners, one thread and runtime per share, until
/// the process ends; `ready` runs once every thread has started with its share.
fn serve_on_threads<L, F, Fut>(
    driver: Driver,
    per_thread: Vec<L>,
    serve: F,
    ready: impl FnOnce(),
) -> io::Result<()>
where
    L: Send + 'static,
    F: Fn(L) -> Fut + Send + Copy + 'static,
    Fut: std::future::Future<Output = io::Result<()>>,
{
    let handles: Vec<_> = per_thread
        .into_iter()
        .map(|mine| std::thread::spawn(move || runtime::block_on(driver, || serve(mine))))
        .collect();
    ready();
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

/// One SO_REUSEPORT listener on `port` for each of `threads` threads, all bound before any
/// thread serves, so no connection is refused; returns the port they share. A port of 0 is
/// picked once, by the first bind, which never lands on a port already bound (SO_REUSEPORT
/// or not); the other threads join it. Picking a free port and binding it later instead could
/// join another server's SO_REUSEPORT group on the same port.
fn listeners_per_thread(
    threads: usize,
    port: u16,
) -> io::Result<(u16, Vec<std::net::TcpListener>)> {
    let mut port = port;
    let mut listeners = Vec::new();
    for _ in 0..threads.max(1) {
        let listener = sockets::reuseport_listener(SocketAddr::from(([0, 0, 0, 0], port)))?;
        port = listener.local_addr()?.port();
        listeners.push(listener);
    }
    Ok((port, listeners))
}

/// Plain TCP relays, the floor of any proxy that sits in a connection's path: every
/// connection accepted on a route's port gets a connection of its own to the route's address,
/// and bytes are copied both ways (read, then write, through one buffer per direction) until
/// each side half-closes. No TLS, no HTTP/2, no policy. On `threads` threads with a
/// SO_REUSEPORT listener per route on each, as the data plane's workers; `ready` gets the
/// ports served, in route order, once every listener is bound. Runs until the process ends.
pub fn relay(
    driver: Driver,
    threads: usize,
    routes: &[(u16, SocketAddr)],
    ready: impl FnOnce(&[u16]),
) -> io::Result<()> {
    let mut ports = Vec::new();
    let mut per_thread: Vec<Vec<(std::net::TcpListener, SocketAddr)>> =
        (0..threads.max(1)).map(|_| Vec::new()).collect();
    for &(port, to) in routes {
        let (port, listeners) = listeners_per_thread(threads, port)?;
        ports.push(port);
        for (mine, listener) in per_thread.iter_mut().zip(listeners) {
            mine.push((listener, to));
        }
    }
    serve_on_threads(
        driver,
        per_thread,
        |mine| async move {
            let mut loops = Vec::new();
            for (listener, to) in mine {
                let listener = TcpListener::from_std(listener)?;
                loops.push(monoio::spawn(accept_loop(listener, move |conn| {
                    relay_conn(conn, to)
                })));
            }
            for accepting in loops {
                accepting.await;
            }
            Ok(())
        },
        || ready(&ports),
    )
}

/// Both directions in one task, as the data plane relays: a direction that fails ends the
/// other too, and both sockets close, so neither end waits on a connection half gone.
async fn relay_conn(conn: TcpStream, to: SocketAddr) -> io::Result<()> {
    let upstream = connect(to).await?;
    let (from_client, to_client) = conn.into_split();
    let (from_upstream, to_upstream) = upstream.into_split();
    futures_util::future::try_join(
        copy_until_eof(from_client, to_upstream, BULK_CHUNK),
        copy_until_eof(from_upstream, to_client, BULK_CHUNK),
    )
    .await
    .map(|_| ())
}

/// Copies until `from` reaches EOF, through a buffer of `buf_len` bytes, then half-closes `to`.
/// Reads fill the buffer's capacity, so it is never zeroed.
async fn copy_until_eof(
    mut from: impl AsyncReadRent,
    mut to: impl AsyncWriteRent,
    buf_len: usize,
) -> io::Result<()> {
    let mut buf = Vec::with_capacity(buf_len);
    loop {
        let (res, b) = from.read(buf).await;
        let n = res?;
        if n == 0 {
            return to.shutdown().await;
        }
        let (res, b) = to.write_all(b.slice(..n)).await;
        res?;
        buf = b.into_inner();
    }
}

pub async fn accept_loop<H, Fut>(listener: TcpListener, handle: H)
where
    H: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = io::Result<()>> + 'static,
{
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                let _ = conn.set_nodelay(true);
                monoio::spawn(handle(conn));
            }
            // Out of descriptors or the like: back off briefly instead of spinning.
            Err(_) => monoio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

pub async fn echo_conn(conn: TcpStream) -> io::Result<()> {
    let (from, to) = conn.into_split();
    copy_until_eof(from, to, ECHO_BUF).await
}

async fn sink_conn(mut conn: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; BULK_CHUNK];
    let mut total = 0u64;
    loop {
        let (res, b) = conn.read(buf).await;
        buf = b;
        match res? {
            0 => break,
            n => total += n as u64,
        }
    }
    let (res, _) = conn.write_all(total.to_le_bytes().to_vec()).await;
    res?;
    conn.shutdown().await
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct BulkResult {
    pub connections: usize,
    /// Bytes the sinks confirmed, over all connections.
    pub bytes: u64,
    pub seconds: f64,
    /// CPU seconds the generator itself used while measuring.
    pub client_cpu_s: f64,
}

impl BulkResult {
    pub fn gbit_per_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.seconds / 1e9
    }
}

/// `connections` streams to a sink for `duration`, spread over `threads` threads. Counts
/// only bytes the sink confirmed; a stream whose sink saw a different count is an error.
pub fn bulk(
    driver: Driver,
    to: SocketAddr,
    connections: usize,
    threads: usize,
    duration: Duration,
) -> io::Result<BulkResult> {
    let threads = threads.clamp(1, connections.max(1));
    let cpu = own_cpu();
    let start = Instant::now();
    let per = per_thread(driver, threads, |t| async move {
        let mine = (t..connections.max(1)).step_by(threads).count();
        let streams: Vec<_> = (0..mine)
            .map(|_| monoio::spawn(stream_to_sink(to, start + duration)))
            .collect();
        let mut bytes = 0;
        for s in streams {
            bytes += s.await?;
        }
        Ok(bytes)
    })?;
    Ok(BulkResult {
        connections: connections.max(1),
        bytes: per.iter().sum(),
        seconds: start.elapsed().as_secs_f64(),
        client_cpu_s: own_cpu() - cpu,
    })
}

/// Streams until `until`, then half-closes and waits for the sink's count; a sink that stops
/// reading, or never answers, fails the stream `ANSWER_GRACE` after `until`.
async fn stream_to_sink(to: SocketAddr, until: Instant) -> io::Result<u64> {
    by(until + ANSWER_GRACE, async {
        let mut conn = connect(to).await?;
        let mut chunk = vec![0x5au8; BULK_CHUNK];
        let mut sent = 0u64;
        while Instant::now() < until {
            let (res, c) = conn.write_all(chunk).await;
            chunk = c;
            sent += res? as u64;
        }
        conn.shutdown().await?;
        let (res, ack) = conn.read_exact(vec![0u8; 8]).await;
        res?;
        let confirmed = u64::from_le_bytes(ack[..8].try_into().unwrap_or_default());
        if confirmed != sent {
            return Err(io::Error::other(format!(
                "sink confirmed {confirmed} bytes of {sent} sent"
            )));
        }
        Ok(confirmed)
    })
    .await
}

/// Open-loop request/response at a fixed offered rate.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct RateResult {
    pub offered_rps: f64,
    /// Responses completed within the measured window, per second: below `offered_rps` when
    /// the path cannot keep up, however long the late responses then take.
    pub achieved_rps: f64,
    pub connections: usize,
    pub size: usize,
    /// Requests answered in the measured window.
    pub requests: u64,
    /// Requests sent over the whole run, warm-up included: the span the processes' CPU
    /// figures cover, so what per-request costs divide by.
    pub sent: u64,
    /// Requests scheduled but never answered: lost to a connection error or early close,
    /// never sent because their connection had failed, or not answered by the deadline.
    pub errors: u64,
    /// From each request's intended send time to the last byte of its response.
    pub latency: Latency,
    /// How late the generator itself sent requests (actual minus intended): the floor under
    /// the latency figures. Large values mean the generator, not the path, fell behind.
    pub send_lag: Latency,
    pub client_cpu_s: f64,
}

/// `rps` requests per second of `size` bytes, over `connections` connections spread over
/// `threads` threads, each echoed back by the server. On each thread a pacer sends on
/// schedule (its own OS thread, sleeping to the intended instant with a 1 ns timer slack)
/// while monoio tasks read responses; a response's latency is measured from the intended
/// send time of its request, so a stall shows in every request queued behind it.
/// What `rate` offers.
#[derive(Clone, Copy, Debug)]
pub struct RateSpec {
    /// Requests per second over all connections.
    pub rps: f64,
    pub connections: usize,
    pub threads: usize,
    /// Request (and response) size in bytes.
    pub size: usize,
    /// Sent on schedule but not measured.
    pub warmup: Duration,
    pub duration: Duration,
}

pub fn rate(driver: Driver, to: SocketAddr, spec: RateSpec) -> io::Result<RateResult> {
    let RateSpec {
        rps,
        connections,
        threads,
        size,
        warmup,
        duration,
    } = spec;
    if !rps.is_finite() || rps <= 0.0 || size == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "rate needs rps > 0 and size > 0",
        ));
    }
    let connections = connections.max(1);
    let threads = threads.clamp(1, connections);
    let cpu = own_cpu();
    // Everyone starts from the same instant, a little ahead so every connection is open.
    let start = Instant::now() + Duration::from_millis(200);
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let window = Window {
        from: measure_from,
        end,
    };
    let per = per_thread(driver, threads, |t| async move {
        let mine = (t..connections).step_by(threads).count();
        // This thread's share of the rate; its requests interleave with the other threads'.
        let interval = Duration::from_secs_f64(threads as f64 / rps);
        let offset = interval.mul_f64(t as f64 / threads as f64);
        let mut writers = Vec::with_capacity(mine);
        let mut readers = Vec::with_capacity(mine);
        for c in 0..mine {
            let s = StdStream::connect_timeout(&to, Duration::from_secs(10))?;
            s.set_nodelay(true)?;
            // The pacer writes through its own descriptor of the same socket.
            writers.push(s.try_clone()?);
            readers.push(monoio::spawn(read_responses(
                TcpStream::from_std(s)?,
                size,
                Schedule {
                    first: start + offset + interval * c as u32,
                    every: interval * mine as u32,
                },
                window,
                end + ANSWER_GRACE,
            )));
        }
        let pacer = std::thread::spawn(move || {
            pace(
                writers,
                size,
                Schedule {
                    first: start + offset,
                    every: interval,
                },
                window,
            )
        });
        let mut latency = histogram()?;
        let (mut answered, mut in_window) = (0u64, 0u64);
        for r in readers {
            let a = r.await?;
            merge(&mut latency, &a.latency)?;
            answered += a.answered;
            in_window += a.completed_in_window;
        }
        let paced = pacer
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("pacer panicked")))?;
        Ok((latency, answered, in_window, paced))
    })?;
    let (mut latency, mut lag) = (histogram()?, histogram()?);
    let (mut answered, mut in_window, mut sent, mut not_sent) = (0, 0, 0, 0);
    for (l, a, w, paced) in &per {
        merge(&mut latency, l)?;
        merge(&mut lag, &paced.lag)?;
        answered += a;
        in_window += w;
        sent += paced.sent;
        not_sent += paced.not_sent;
    }
    Ok(RateResult {
        offered_rps: rps,
        achieved_rps: in_window as f64 / duration.as_secs_f64(),
        connections,
        size,
        requests: latency.len(),
        sent,
        errors: sent.saturating_sub(answered) + not_sent,
        latency: Latency::from_histogram(&latency),
        send_lag: Latency::from_histogram(&lag),
        client_cpu_s: own_cpu() - cpu,
    })
}

/// Evenly spaced intended send times.
#[derive(Clone, Copy)]
struct Schedule {
    first: Instant,
    every: Duration,
}

impl Schedule {
    fn at(&self, n: u64) -> Instant {
        self.first + self.every.mul_f64(n as f64)
    }
}

/// The measured part of a fixed-rate run: from `from` up to (not including) `end`.
#[derive(Clone, Copy)]
struct Window {
    from: Instant,
    end: Instant,
}

impl Window {
    fn contains(&self, t: Instant) -> bool {
        self.from <= t && t < self.end
    }
}

/// What one pacer did.
struct Paced {
    /// How late each request of the measured window went out.
    lag: Histogram<u64>,
    /// Requests written in full, warm-up included.
    sent: u64,
    /// Requests whose connection had failed: never (fully) sent, so never answered.
    not_sent: u64,
}

/// Sends requests on schedule, round robin over `conns`, until `window.end`; then half-closes
/// every connection. A connection whose write fails is given up (closed both ways, which also
/// ends its reader) and its remaining turns are counted, not sent: one broken connection must
/// not stop the others, or the run could not report it.
fn pace(
    mut conns: Vec<StdStream>,
    size: usize,
    schedule: Schedule,
    window: Window,
) -> io::Result<Paced> {
    runtime::set_timer_slack_ns(1)?;
    let request = vec![0xa5u8; size];
    let mut alive = vec![true; conns.len()];
    let mut paced = Paced {
        lag: histogram()?,
        sent: 0,
        not_sent: 0,
    };
    for n in 0.. {
        let intended = schedule.at(n);
        if intended >= window.end {
            break;
        }
        let i = n as usize % conns.len();
        if !alive[i] {
            paced.not_sent += 1;
            continue;
        }
        let now = Instant::now();
        if intended > now {
            std::thread::sleep(intended - now);
        }
        if write_all_blocking(&mut conns[i], &request).is_err() {
            alive[i] = false;
            paced.not_sent += 1;
            let _ = conns[i].shutdown(std::net::Shutdown::Both);
            continue;
        }
        paced.sent += 1;
        if intended >= window.from {
            paced
                .lag
                .saturating_record(intended.elapsed().as_nanos() as u64);
        }
    }
    for (c, alive) in conns.iter().zip(alive) {
        // A reset socket refuses even the half-close; its reader has ended already.
        if alive {
            let _ = c.shutdown(std::net::Shutdown::Write);
        }
    }
    Ok(paced)
}

/// The socket may be non-blocking (the runtime's choice, shared by both descriptors): wait
/// for room instead of failing.
fn write_all_blocking(conn: &mut StdStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match conn.write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                sockets::wait_writable(conn.as_raw_fd(), Duration::from_secs(10))?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One connection's responses.
struct Answers {
    /// Latency of each answered request intended within the measured window.
    latency: Histogram<u64>,
    /// Responses received, warm-up included.
    answered: u64,
    /// Responses that completed within the measured window, whenever their request was due.
    completed_in_window: u64,
}

/// Reads one connection's responses in order, until EOF, an error or `deadline`; the n-th
/// answers the request sent at `schedule.at(n)`.
async fn read_responses(
    mut conn: TcpStream,
    size: usize,
    schedule: Schedule,
    window: Window,
    deadline: Instant,
) -> io::Result<Answers> {
    let mut answers = Answers {
        latency: histogram()?,
        answered: 0,
        completed_in_window: 0,
    };
    let mut buf = vec![0u8; size];
    loop {
        // Past the deadline the rest count as unanswered (the caller counts what is missing).
        let Ok((res, b)) = monoio::time::timeout_at(deadline.into(), conn.read_exact(buf)).await
        else {
            break;
        };
        buf = b;
        // EOF after the pacer's half-close means every response is in; an error ends the
        // connection early.
        if res.is_err() {
            break;
        }
        let done = Instant::now();
        let intended = schedule.at(answers.answered);
        if intended >= window.from {
            answers
                .latency
                .saturating_record(done.saturating_duration_since(intended).as_nanos() as u64);
        }
        if window.contains(done) {
            answers.completed_in_window += 1;
        }
        answers.answered += 1;
    }
    Ok(answers)
}

/// New connections back to back on each of `threads` threads: connect, one byte to an echo
/// server and back, close (the client closes first, as a short request would).
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct ConnRateResult {
    pub threads: usize,
    pub connections: u64,
    pub failures: u64,
    pub seconds: f64,
    /// Connect to reply, per connection.
    pub latency: Latency,
    pub client_cpu_s: f64,
}

impl ConnRateResult {
    pub fn per_second(&self) -> f64 {
        self.connections as f64 / self.seconds
    }
}

pub fn connection_rate(
    driver: Driver,
    to: SocketAddr,
    threads: usize,
    duration: Duration,
) -> io::Result<ConnRateResult> {
    let cpu = own_cpu();
    let start = Instant::now();
    let per = per_thread(driver, threads, |_| async move {
        let mut h = histogram()?;
        let mut failures = 0u64;
        let mut byte = vec![0u8; 1];
        while start.elapsed() < duration {
            let began = Instant::now();
            match exchange_one(to, byte).await {
                (Ok(()), b) => {
                    h.saturating_record(began.elapsed().as_nanos() as u64);
                    byte = b;
                }
                (Err(_), b) => {
                    failures += 1;
                    byte = b;
                }
            }
        }
        Ok((h, failures))
    })?;
    let seconds = start.elapsed().as_secs_f64();
    let mut all = histogram()?;
    let mut failures = 0;
    for (h, f) in &per {
        merge(&mut all, h)?;
        failures += f;
    }
    Ok(ConnRateResult {
        threads,
        connections: all.len(),
        failures,
        seconds,
        latency: Latency::from_histogram(&all),
        client_cpu_s: own_cpu() - cpu,
    })
}

/// Connect, one byte each way, and (on drop) close; what takes longer than `ANSWER_GRACE`
/// fails.
async fn exchange_one(to: SocketAddr, byte: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
    let exchange = async {
        let mut conn = connect(to).await?;
        let (res, byte) = conn.write_all(byte).await;
        res?;
        let (res, byte) = conn.read_exact(byte).await;
        res.map(|_| byte)
    };
    match by(Instant::now() + ANSWER_GRACE, exchange).await {
        Ok(byte) => (Ok(()), byte),
        // The buffer went with the failed exchange.
        Err(e) => (Err(e), vec![0u8; 1]),
    }
}

/// Opens `count` connections to an echo server, each proven with a one-byte echo, then calls
/// `hold` while they stay open (idle) on this thread.
pub fn hold(driver: Driver, to: SocketAddr, count: usize, hold: impl FnOnce()) -> io::Result<()> {
    runtime::block_on(driver, || async move {
        let mut held = Vec::with_capacity(count);
        let mut opened = 0;
        while opened < count {
            let batch = HOLD_CONCURRENCY.min(count - opened);
            let tasks: Vec<_> = (0..batch)
                .map(|_| {
                    monoio::spawn(by(Instant::now() + ANSWER_GRACE, async move {
                        let mut conn = connect(to).await?;
                        let (res, byte) = conn.write_all(vec![b'h']).await;
                        res?;
                        let (res, _) = conn.read_exact(byte).await;
                        res?;
                        io::Result::Ok(conn)
                    }))
                })
                .collect();
            for t in tasks {
                held.push(t.await?);
            }
            opened += batch;
        }
        hold();
        drop(held);
        Ok(())
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn driver() -> Driver {
        runtime::resolve(runtime::DriverChoice::Auto).expect("a driver")
    }

    /// Starts echo and sink servers on ports of their own, in this process.
    fn servers() -> (SocketAddr, SocketAddr) {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            serve(driver(), 2, 0, 0, move |echo, sink| {
                let _ = tx.send((echo, sink));
            })
        });
        let (echo, sink) = rx.recv_timeout(Duration::from_secs(5)).expect("servers up");
        (
            SocketAddr::from(([127, 0, 0, 1], echo)),
            SocketAddr::from(([127, 0, 0, 1], sink)),
        )
    }

    /// Starts relays for `routes` in this process; returns their loopback addresses.
    fn relays(routes: Vec<(u16, SocketAddr)>) -> Vec<SocketAddr> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            relay(driver(), 2, &routes, move |ports| {
                let _ = tx.send(ports.to_vec());
            })
        });
        let ports = rx.recv_timeout(Duration::from_secs(5)).expect("relays up");
        ports
            .into_iter()
            .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
            .collect()
    }

    #[test]
    fn two_relays_in_a_row_carry_streams_requests_and_new_connections() {
        let (echo, sink) = servers();
        let far = relays(vec![(0, echo), (0, sink)]);
        let near = relays(vec![(0, far[0]), (0, far[1])]);
        let (echo, sink) = (near[0], near[1]);
        // The sink confirms the exact count sent, after the client's half-close went through
        // both relays.
        let r = bulk(driver(), sink, 2, 2, Duration::from_millis(300)).expect("bulk");
        assert!(r.bytes >= 2 * BULK_CHUNK as u64, "{r:?}");
        let spec = RateSpec {
            rps: 1000.0,
            connections: 2,
            threads: 1,
            size: 1024,
            warmup: Duration::from_millis(100),
            duration: Duration::from_millis(500),
        };
        let r = rate(driver(), echo, spec).expect("rate");
        assert_eq!(r.errors, 0, "{r:?}");
        assert!(r.requests >= 450, "{r:?}");
        let c = connection_rate(driver(), echo, 2, Duration::from_millis(300)).expect("conns");
        assert_eq!(c.failures, 0, "{c:?}");
        assert!(c.connections > 0, "{c:?}");
    }

    #[test]
    fn a_reset_behind_two_relays_ends_the_clients_connection() {
        // The server reads the request and resets instead of answering: the client must see
        // its connection end through both relays, not wait for an answer.
        let to = server(|mut conn, _| {
            use std::io::Read;
            let mut buf = [0u8; 64];
            let _ = conn.read(&mut buf);
            let _ = socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO));
        });
        let far = relays(vec![(0, to)]);
        let near = relays(vec![(0, far[0])]);
        let mut client = StdStream::connect(near[0]).expect("connect");
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        client.write_all(b"request").expect("write");
        let mut buf = [0u8; 64];
        let read = std::io::Read::read(&mut client, &mut buf);
        assert!(
            !matches!(&read, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "the client still waits: {read:?}"
        );
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }

    #[test]
    fn bulk_counts_only_what_the_sinks_confirmed() {
        let (_, sink) = servers();
        let r = bulk(driver(), sink, 3, 2, Duration::from_millis(300)).expect("bulk");
        assert_eq!(r.connections, 3);
        assert!(r.bytes >= 3 * BULK_CHUNK as u64, "{r:?}");
        assert_eq!(r.bytes % BULK_CHUNK as u64, 0, "whole chunks only: {r:?}");
    }

    #[test]
    fn fixed_rate_sends_on_schedule_and_every_request_is_answered() {
        let (echo, _) = servers();
        let spec = RateSpec {
            rps: 2000.0,
            connections: 4,
            threads: 2,
            size: 512,
            warmup: Duration::from_millis(200),
            duration: Duration::from_secs(1),
        };
        let r = rate(driver(), echo, spec).expect("rate");
        assert_eq!(r.errors, 0, "{r:?}");
        // 2000/s over a 1 s window, within the schedule's edges.
        assert!((1900..=2100).contains(&r.requests), "{r:?}");
        // And 200 ms of warm-up before it, sent but not measured.
        assert!((2300..=2500).contains(&r.sent), "{r:?}");
        assert!(r.latency.p50_us > 0.0 && r.latency.p50_us <= r.latency.p99_us);
    }

    #[test]
    fn a_stalled_server_shows_in_latency_from_the_intended_send_time() {
        // A server that stops for 400 ms after the first request, then echoes everything:
        // open-loop latency must show the stall for every request queued behind it, not
        // just the first (a closed loop would have sent only one request during the stall).
        let to = server(|mut conn, _| {
            use std::io::Read;
            let mut buf = [0u8; 4096];
            let mut stalled = false;
            while let Ok(n) = conn.read(&mut buf) {
                if !stalled {
                    std::thread::sleep(Duration::from_millis(400));
                    stalled = true;
                }
                if n == 0 || conn.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = conn.shutdown(std::net::Shutdown::Write);
        });
        let spec = RateSpec {
            rps: 1000.0,
            connections: 1,
            threads: 1,
            size: 64,
            warmup: Duration::ZERO,
            duration: Duration::from_millis(600),
        };
        let r = rate(driver(), to, spec).expect("rate");
        assert_eq!(r.errors, 0, "{r:?}");
        // Two thirds of the requests were sent during the stall: the median waited for it.
        assert_eq!(r.requests, 600, "{r:?}");
        assert!(r.latency.p50_us > 100_000.0, "{r:?}");
        assert!(r.latency.max_us >= 350_000.0, "{r:?}");
    }

    /// `rate` on its own thread, failing the test if it takes longer than `bound`.
    fn rate_within(to: SocketAddr, spec: RateSpec, bound: Duration) -> RateResult {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(rate(driver(), to, spec));
        });
        rx.recv_timeout(bound)
            .unwrap_or_else(|_| panic!("the run did not finish within {bound:?}"))
            .expect("rate")
    }

    /// A loopback server calling `handle(connection, accept_index)` on its own thread per
    /// connection.
    fn server(handle: fn(StdStream, usize)) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let to = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            for (i, conn) in listener.incoming().flatten().enumerate() {
                std::thread::spawn(move || handle(conn, i));
            }
        });
        to
    }

    #[test]
    fn a_connection_reset_mid_run_is_counted_and_the_other_connections_still_answer() {
        // The first connection is echoed for 100 ms from its first request, then reset; the
        // others are echoed to the end. Its thread has another connection, which must still
        // be half-closed.
        let to = server(|mut conn, i| {
            use std::io::Read;
            let mut buf = [0u8; 4096];
            let mut began = None;
            while let Ok(n) = conn.read(&mut buf) {
                let began = *began.get_or_insert_with(Instant::now);
                if i == 0 && began.elapsed() >= Duration::from_millis(100) {
                    let _ = socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO));
                    return;
                }
                if n == 0 || conn.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = conn.shutdown(std::net::Shutdown::Write);
        });
        let spec = RateSpec {
            rps: 1000.0,
            connections: 4,
            threads: 2,
            size: 64,
            warmup: Duration::ZERO,
            duration: Duration::from_secs(1),
        };
        let r = rate_within(to, spec, Duration::from_secs(8));
        // 250 requests were due on the reset connection, about 225 of them after the reset.
        assert!((150..=240).contains(&r.errors), "{r:?}");
        // The three others answered theirs.
        assert!((700..=800).contains(&r.requests), "{r:?}");
        assert!((700.0..=800.0).contains(&r.achieved_rps), "{r:?}");
    }

    #[test]
    fn achieved_rate_is_what_the_path_completed_not_what_was_offered() {
        // A server that answers one 64-byte request every 5 ms at most: 200/s, half of what
        // is offered. Every request is answered in the end, most after the window.
        let to = server(|mut conn, _| {
            use std::io::Read;
            let mut request = [0u8; 64];
            let mut next = Instant::now();
            while conn.read_exact(&mut request).is_ok() {
                next = next.max(Instant::now());
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
                if conn.write_all(&request).is_err() {
                    return;
                }
                next += Duration::from_millis(5);
            }
            let _ = conn.shutdown(std::net::Shutdown::Write);
        });
        let spec = RateSpec {
            rps: 400.0,
            connections: 1,
            threads: 1,
            size: 64,
            warmup: Duration::ZERO,
            duration: Duration::from_secs(1),
        };
        let r = rate_within(to, spec, Duration::from_secs(8));
        assert_eq!(r.errors, 0, "{r:?}");
        assert_eq!(r.requests, 400, "{r:?}");
        assert!((170.0..=230.0).contains(&r.achieved_rps), "{r:?}");
    }

    #[test]
    fn responses_missing_at_the_deadline_count_as_unanswered() {
        // A server that reads every request, never answers, and keeps the connection open.
        let to = server(|mut conn, _| {
            use std::io::Read;
            let mut buf = [0u8; 4096];
            while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
            std::thread::sleep(Duration::from_secs(60));
        });
        let spec = RateSpec {
            rps: 100.0,
            connections: 1,
            threads: 1,
            size: 64,
            warmup: Duration::ZERO,
            duration: Duration::from_millis(500),
        };
        // The readers give up ANSWER_GRACE after the last request was due.
        let r = rate_within(to, spec, ANSWER_GRACE + Duration::from_secs(5));
        assert_eq!(r.sent, 50, "{r:?}");
        assert_eq!(r.errors, 50, "{r:?}");
        assert_eq!(r.requests, 0, "{r:?}");
        assert_eq!(r.achieved_rps, 0.0, "{r:?}");
    }

    #[test]
    fn connection_rate_and_hold_prove_each_connection() {
        let (echo, _) = servers();
        let r = connection_rate(driver(), echo, 2, Duration::from_millis(300)).expect("conns");
        assert!(r.connections > 10, "{r:?}");
        assert_eq!(r.failures, 0);
        let mut held_while = false;
        hold(driver(), echo, 200, || held_while = true).expect("hold");
        assert!(held_while);
    }

    #[test]
    fn a_connection_never_answered_fails_instead_of_hanging_the_run() {
        // Accepts, reads, never writes, and keeps the connection open past the grace.
        let to = server(|mut conn, _| {
            use std::io::Read;
            let mut buf = [0u8; 64];
            let _ = conn.read(&mut buf);
            std::thread::sleep(ANSWER_GRACE * 2);
        });
        let (rate_tx, rate_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = rate_tx.send(connection_rate(driver(), to, 1, Duration::from_millis(10)));
        });
        let (hold_tx, hold_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = hold_tx.send(hold(driver(), to, 1, || ()));
        });
        let bound = ANSWER_GRACE + Duration::from_secs(5);
        let r = rate_rx
            .recv_timeout(bound)
            .expect("the run ends once the exchange has waited its grace")
            .expect("conns");
        assert_eq!((r.connections, r.failures), (0, 1), "{r:?}");
        let held = hold_rx.recv_timeout(bound).expect("hold gives up too");
        assert_eq!(
            held.map_err(|e| e.kind()).err(),
            Some(io::ErrorKind::TimedOut)
        );
    }
}
