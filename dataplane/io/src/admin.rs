//! Readiness (15021), Prometheus metrics (15020) and admin (15000, localhost) HTTP endpoints,
//! served by plain threads that never run on a data-plane core's event loop: an expensive dump
//! or scrape must not delay packets.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::accesslog::AccessLogSettings;
use crate::logs::LogLevel;
use crate::metrics::{escape, MetricsRegistry};
use crate::runtime::Driver;
use crate::stats::WorkerStats;
use crate::watch::WatchStatus;
use crate::worker::Control;

/// Everything the endpoints report on or change.
pub struct AdminState {
    pub workers: Vec<Arc<WorkerStats>>,
    pub watch: Arc<WatchStatus>,
    pub driver: Driver,
    pub metrics: MetricsRegistry,
    pub log_level: Option<LogLevel>,
    /// The workers' control channels, for settings changed at runtime.
    pub control: Vec<flume::Sender<Control>>,
    pub access_log: Mutex<AccessLogSettings>,
    /// Set on SIGTERM: readiness fails from then on.
    pub draining: AtomicBool,
}

impl AdminState {
    /// Ready once a snapshot is adopted by every worker and every local pod has listeners,
    /// until the process starts draining.
    pub fn readiness(&self) -> Result<(), String> {
        if self.draining.load(Ordering::Acquire) {
            return Err("draining".into());
        }
        if !self.watch.has_snapshot() {
            return Err("no snapshot adopted yet".into());
        }
        for (i, w) in self.workers.iter().enumerate() {
            if w.snapshot_generation.get() == 0 {
                return Err(format!("worker {i} has not adopted a snapshot"));
            }
            let failures = w.listener_failures.get();
            if failures > 0 {
                return Err(format!("worker {i}: {failures} pod(s) without listeners"));
            }
        }
        Ok(())
    }

    fn ready_response(&self) -> (u16, &'static str, String) {
        match self.readiness() {
            Ok(()) => (200, "text/plain", "ready\n".into()),
            Err(why) => (503, "text/plain", format!("not ready: {why}\n")),
        }
    }

    pub fn stats_json(&self) -> Value {
        let mut totals: std::collections::BTreeMap<&'static str, u64> = Default::default();
        let workers: Vec<Value> = self
            .workers
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let fields = w.fields();
                for (name, v) in &fields {
                    *totals.entry(name).or_default() += v;
                }
                let mut obj = serde_json::Map::new();
                obj.insert("worker".into(), json!(i));
                for (name, v) in fields {
                    obj.insert(name.into(), json!(v));
                }
                Value::Object(obj)
            })
            .collect();
        let last_error = self
            .watch
            .last_error
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default();
        json!({
            "driver": self.driver.name(),
            "snapshot": {
                "epoch": self.watch.epoch.load(Ordering::Acquire),
                "generation": self.watch.generation.load(Ordering::Acquire),
                "adopted_unix_ms": self.watch.adopted_unix_ms.load(Ordering::Acquire),
                "refused": self.watch.refused.load(Ordering::Acquire),
                "read_errors": self.watch.read_errors.load(Ordering::Acquire),
                "builds_discarded": self.watch.builds_discarded.load(Ordering::Acquire),
                "compared": self.watch.compared.load(Ordering::Acquire),
                "last_error": last_error,
            },
            "totals": totals,
            "workers": workers,
        })
    }

    /// Workloads and identities as the data plane sees them. Private keys never appear.
    pub fn config_dump(&self) -> Value {
        let current = self.watch.current.lock().ok().and_then(|c| c.clone());
        let Some(index) = current else {
            return json!({"generation": 0, "workloads": [], "identities": []});
        };
        let mut workloads: Vec<&mesh_core::index::Workload> = index.workloads().collect();
        workloads.sort_by(|a, b| (&a.owner.namespace, &a.name).cmp(&(&b.owner.namespace, &b.name)));
        let workloads: Vec<Value> = workloads
            .into_iter()
            .map(|w| {
                json!({
                    "uid": &*w.uid, "name": w.name, "namespace": &*w.owner.namespace,
                    "identity": w.owner.identity.to_string(),
                    "ips": w.ips.iter().map(|ip| ip.to_string()).collect::<Vec<_>>(),
                    "node": &*w.node, "protocol": format!("{:?}", w.protocol),
                    "netns": match &w.netns {
                        mesh_core::index::NetnsSource::None => String::new(),
                        mesh_core::index::NetnsSource::Path(p) => p.clone(),
                        mesh_core::index::NetnsSource::Agent => "from ctrl-agent (CNI)".into(),
                    },
                    "waypoint": waypoint_json(w.waypoint.as_deref()),
                })
            })
            .collect();
        let mut identities: Vec<Value> = index
            .identities()
            .map(|(id, material)| {
                json!({
                    "identity": id.to_string(),
                    "chain_length": material.cert_chain.len(),
                    "not_before_unix": material.not_before_unix,
                    "not_after_unix": material.not_after_unix,
                })
            })
            .collect();
        identities.sort_by(|a, b| a["identity"].as_str().cmp(&b["identity"].as_str()));
        let mut services = index.services();
        services.sort_by(|a, b| {
            (&a.name.namespace, &a.name.name).cmp(&(&b.name.namespace, &b.name.name))
        });
        let services: Vec<Value> = services
            .into_iter()
            .map(|s| {
                json!({
                    "name": s.name.name, "namespace": s.name.namespace,
                    "hostname": s.name.hostname,
                    "vips": s.frontends.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "endpoints": s.endpoints,
                    "waypoint": waypoint_json(s.waypoint),
                })
            })
            .collect();
        let policies: Vec<Value> = index
            .policies()
            .iter()
            .map(|p| {
                json!({
                    "name": p.name, "action": format!("{:?}", p.action).to_uppercase(),
                    "dry_run": p.dry_run, "rules": p.rule_count(),
                    "http_attributes_fail_closed": p.has_http_attributes,
                    "unreadable_values_fail_closed": p.has_unreadable_values,
                })
            })
            .collect();
        json!({
            "node": index.node(),
            "source": index.source(),
            "services": services,
            "policies": policies,
            "epoch": index.generation().epoch,
            "generation": index.generation().generation,
            "trust_roots": index.trust_roots().len(),
            "workloads": workloads,
            "identities": identities,
        })
    }

    /// Everything in Prometheus text format: Istio's `istio_tcp_*` series, then this data
    /// plane's own per-worker counters and the snapshot's state, then the process's CPU,
    /// memory, threads and descriptors.
    pub fn prometheus(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        self.metrics.render(&mut out);
        // (family, is a gauge, [(labels, value)]), in first-seen order.
        type Family = (String, bool, Vec<(String, u64)>);
        let mut families: Vec<Family> = Vec::new();
        for (i, w) in self.workers.iter().enumerate() {
            for (name, value) in w.fields() {
                let (family, labels) = match name.strip_prefix("tls_refused_") {
                    Some(reason) => (
                        "meshdp_tls_handshake_refusals".to_owned(),
                        format!("worker=\"{i}\",reason=\"{reason}\""),
                    ),
                    None => (format!("meshdp_{name}"), format!("worker=\"{i}\"")),
                };
                let gauge = WorkerStats::is_gauge(name);
                let family = if gauge { family } else { family + "_total" };
                match families.iter_mut().find(|(f, _, _)| *f == family) {
                    Some((_, _, series)) => series.push((labels, value)),
                    None => families.push((family, gauge, vec![(labels, value)])),
                }
            }
        }
        for (family, gauge, series) in families {
            let kind = if gauge { "gauge" } else { "counter" };
            let _ = writeln!(out, "# TYPE {family} {kind}");
            for (labels, value) in series {
                let _ = writeln!(out, "{family}{{{labels}}} {value}");
            }
        }
        let adopted_ms = self.watch.adopted_unix_ms.load(Ordering::Acquire);
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let age = if adopted_ms == 0 {
            0.0
        } else {
            now_ms.saturating_sub(adopted_ms) as f64 / 1000.0
        };
        let gauges = [
            (
                "meshdp_snapshot_epoch",
                self.watch.epoch.load(Ordering::Acquire) as f64,
            ),
            (
                "meshdp_snapshot_generation",
                self.watch.generation.load(Ordering::Acquire) as f64,
            ),
            ("meshdp_snapshot_age_seconds", age),
            (
                "meshdp_draining",
                f64::from(u8::from(self.draining.load(Ordering::Acquire))),
            ),
        ];
        for (name, value) in gauges {
            let _ = writeln!(out, "# TYPE {name} gauge\n{name} {value}");
        }
        let counters = [
            (
                "meshdp_snapshot_refused_total",
                self.watch.refused.load(Ordering::Acquire),
            ),
            (
                "meshdp_snapshot_read_errors_total",
                self.watch.read_errors.load(Ordering::Acquire),
            ),
            (
                "meshdp_snapshot_builds_discarded_total",
                self.watch.builds_discarded.load(Ordering::Acquire),
            ),
            (
                "meshdp_snapshot_compared_adopts_total",
                self.watch.compared.load(Ordering::Acquire),
            ),
        ];
        for (name, value) in counters {
            let _ = writeln!(out, "# TYPE {name} counter\n{name} {value}");
        }
        let durations = &self.watch.adopt_durations;
        for (family, histogram) in [
            ("meshdp_snapshot_full_adopt_seconds", &durations.full),
            ("meshdp_snapshot_changes_adopt_seconds", &durations.changes),
        ] {
            let _ = writeln!(out, "# TYPE {family} histogram");
            histogram.render(family, "", &mut out);
        }
        let _ = writeln!(
            out,
            "# TYPE meshdp_driver_info gauge\nmeshdp_driver_info{{driver=\"{}\"}} 1",
            escape(self.driver.name())
        );
        crate::procfs::render_process_metrics("meshdp", &mut out);
        out
    }

    /// `POST /access_log?enabled=true|false&sample=0..1`: changed on every worker.
    fn set_access_log(&self, query: &str) -> (u16, &'static str, String) {
        let Ok(mut settings) = self.access_log.lock() else {
            return (500, "text/plain", "settings unavailable\n".into());
        };
        let mut next = *settings;
        if let Some(v) = query_value(query, "enabled") {
            match v.parse() {
                Ok(b) => next.enabled = b,
                Err(_) => return (400, "text/plain", "enabled must be true or false\n".into()),
            }
        }
        if let Some(v) = query_value(query, "sample") {
            match v.parse::<f64>() {
                Ok(f) if (0.0..=1.0).contains(&f) => next.sample = f,
                _ => {
                    return (
                        400,
                        "text/plain",
                        "sample must be a number from 0 to 1\n".into(),
                    )
                }
            }
        }
        *settings = next;
        for tx in &self.control {
            let _ = tx.send(Control::AccessLog(next));
        }
        tracing::info!(
            enabled = next.enabled,
            sample = next.sample,
            "access log settings changed"
        );
        (
            200,
            "application/json",
            json!({"enabled": next.enabled, "sample": next.sample}).to_string(),
        )
    }
}

/// The value of `key` in a query string (no percent-decoding: values here are plain words).
/// A waypoint in the config dump: its address, or the hostname it is known by while that
/// names no service with a VIP (its traffic is then refused).
fn waypoint_json(waypoint: Option<&mesh_core::index::Waypoint>) -> Value {
    match waypoint {
        None => Value::Null,
        Some(mesh_core::index::Waypoint::At(address)) => json!({ "address": address.to_string() }),
        Some(mesh_core::index::Waypoint::Unresolved(hostname)) => json!({
            "hostname": &**hostname,
            "address": null,
            "traffic": "refused until the hostname names a service with a VIP",
        }),
    }
}

pub(crate) fn query_value(query: &str, key: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.replace('+', " "))
}

/// A request: method, path, query string, and where it came from.
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a str,
    /// The client's address: a port facing the pod network may keep some paths to clients
    /// on the pod's own loopback (`kubectl port-forward`, `kubectl exec`).
    pub peer: IpAddr,
}

type Handler = dyn Fn(&Request<'_>) -> (u16, &'static str, String) + Send + Sync;

/// What one client may cost an endpoint. The metrics and readiness ports face the pod
/// network, so a client that never finishes a request must hold neither memory nor the server.
#[derive(Clone, Copy, Debug)]
struct Limits {
    /// The request line and each header line, newline included.
    line: usize,
    headers: usize,
    /// From accept to the end of the request (a per-read timeout lets a trickle live for ever).
    read: Duration,
    /// From accept to the end of the response.
    total: Duration,
    /// Connections served at once on one endpoint, and from one peer address.
    connections: usize,
    per_peer: usize,
}

const LIMITS: Limits = Limits {
    line: 8 * 1024,
    headers: 64,
    read: Duration::from_secs(5),
    total: Duration::from_secs(10),
    connections: 32,
    // Kubelet probes and Prometheus scrapes come from one address each: a busy peer cannot
    // take every slot.
    per_peer: 8,
};

/// Connections being served on one endpoint, in total and by peer.
#[derive(Default)]
struct Occupancy {
    total: usize,
    by_peer: HashMap<IpAddr, usize>,
}

/// A connection's place in [`Occupancy`], given back when the connection ends.
struct Slot {
    occupancy: Arc<Mutex<Occupancy>>,
    peer: IpAddr,
}

impl Slot {
    fn take(occupancy: &Arc<Mutex<Occupancy>>, peer: IpAddr, limits: &Limits) -> Option<Slot> {
        let mut o = occupancy.lock().unwrap_or_else(PoisonError::into_inner);
        let mine = o.by_peer.get(&peer).copied().unwrap_or(0);
        if o.total >= limits.connections || mine >= limits.per_peer {
            return None;
        }
        o.total += 1;
        o.by_peer.insert(peer, mine + 1);
        Some(Slot {
            occupancy: occupancy.clone(),
            peer,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut o = self
            .occupancy
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        o.total = o.total.saturating_sub(1);
        if let Some(n) = o.by_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                o.by_peer.remove(&self.peer);
            }
        }
    }
}

/// Serves requests on `listener` with `handler`, each connection on a short-lived thread of
/// its own (so a slow client delays no one else), until `stop` is set (checked at least every
/// 200 ms).
pub fn serve(listener: TcpListener, handler: Arc<Handler>, stop: Arc<AtomicBool>) {
    serve_with(listener, handler, stop, LIMITS);
}

fn serve_with(listener: TcpListener, handler: Arc<Handler>, stop: Arc<AtomicBool>, limits: Limits) {
    let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
    // Non-blocking: another process may share this socket (upgrade), and an accept that
    // loses the race must not block.
    let _ = listener.set_nonblocking(true);
    let occupancy = Arc::new(Mutex::new(Occupancy::default()));
    let name = std::thread::current()
        .name()
        .unwrap_or("endpoint")
        .to_owned()
        + "-conn";
    while !stop.load(Ordering::Acquire) {
        match crate::sockets::wait_readable(fd, Duration::from_millis(200)) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        }
        let Ok((conn, peer)) = listener.accept() else {
            continue;
        };
        // Full: closed at once, rather than queued behind the clients that filled it.
        let Some(slot) = Slot::take(&occupancy, peer.ip(), &limits) else {
            continue;
        };
        let handler = handler.clone();
        let _ = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let _slot = slot;
                let _ = answer(conn, peer.ip(), &*handler, &limits);
            });
    }
}

/// The connection, read or written only until `until`.
struct Deadline<'a> {
    conn: &'a TcpStream,
    until: Instant,
}

impl Deadline<'_> {
    fn left(&self) -> std::io::Result<Duration> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        Ok(left)
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.conn.set_read_timeout(Some(self.left()?))?;
        self.conn.read(buf)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.conn.set_write_timeout(Some(self.left()?))?;
        self.conn.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.conn.flush()
    }
}

/// One line of at most `max` bytes, newline included; `Ok(None)` if it is longer.
fn read_line_capped<R: BufRead>(reader: &mut R, max: usize) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    reader
        .by_ref()
        .take(max as u64)
        .read_until(b'\n', &mut line)?;
    if line.last() == Some(&b'\n') {
        Ok(Some(line))
    } else if line.len() >= max {
        Ok(None)
    } else {
        Err(std::io::ErrorKind::UnexpectedEof.into())
    }
}

/// The request line and the body's length, or the error status to answer with.
fn read_head<R: BufRead>(
    reader: &mut R,
    limits: &Limits,
) -> std::io::Result<Result<(String, u64), u16>> {
    let Some(request_line) = read_line_capped(reader, limits.line)? else {
        return Ok(Err(414));
    };
    let Ok(request_line) = String::from_utf8(request_line) else {
        return Ok(Err(400));
    };
    let mut body_len = 0u64;
    let mut headers = 0;
    loop {
        let Some(line) = read_line_capped(reader, limits.line)? else {
            return Ok(Err(431));
        };
        if line == b"\r\n" || line == b"\n" {
            break;
        }
        headers += 1;
        if headers > limits.headers {
            return Ok(Err(431));
        }
        let line = String::from_utf8_lossy(&line);
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                body_len = value.trim().parse().unwrap_or(0).min(64 * 1024);
            }
        }
    }
    Ok(Ok((request_line, body_len)))
}

fn answer(
    conn: TcpStream,
    peer: IpAddr,
    handler: &Handler,
    limits: &Limits,
) -> std::io::Result<()> {
    let accepted = Instant::now();
    let _ = conn.set_nonblocking(false);
    let mut reader = BufReader::new(Deadline {
        conn: &conn,
        until: accepted + limits.read,
    });
    let head = read_head(&mut reader, limits)?;
    let (status, content_type, body) = match &head {
        Ok((request_line, body_len)) => {
            // Read a (small) body, so the client sees a clean close.
            std::io::copy(&mut reader.by_ref().take(*body_len), &mut std::io::sink())?;
            let mut parts = request_line.split_whitespace();
            match (parts.next(), parts.next()) {
                (Some(method @ ("GET" | "POST")), Some(target)) => {
                    let (path, query) = target.split_once('?').unwrap_or((target, ""));
                    handler(&Request {
                        method,
                        path,
                        query,
                        peer,
                    })
                }
                _ => (405, "text/plain", "GET or POST only\n".into()),
            }
        }
        Err(status) => (
            *status,
            "text/plain",
            "request too large or malformed\n".into(),
        ),
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        414 => "URI Too Long",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    };
    let mut response = Vec::with_capacity(body.len() + 128);
    write!(
        response,
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = Deadline {
        conn: &conn,
        until: accepted + limits.total,
    };
    out.write_all(&response)?;
    if head.is_err() {
        // Unread request bytes would make the close a reset, which can discard the answer
        // before the client reads it: stop writing, then drain a little, within the deadline.
        let _ = conn.shutdown(std::net::Shutdown::Write);
        let _ = std::io::copy(&mut reader.take(64 * 1024), &mut std::io::sink());
    }
    Ok(())
}

/// The three endpoint listeners: bound here, or taken over from the previous process.
pub struct Endpoints {
    pub readiness: TcpListener,
    pub admin: TcpListener,
    pub metrics: TcpListener,
}

impl Endpoints {
    /// Each endpoint from `inherited` if the previous process handed it over from this
    /// network namespace, else bound.
    pub fn open(
        inherited: &crate::upgrade::Inherited,
        readiness: SocketAddr,
        admin: SocketAddr,
        metrics: SocketAddr,
    ) -> std::io::Result<Endpoints> {
        // Only those listening here: after a handover across pods, the old process's are in
        // its own pod's namespace.
        let here = crate::netns::NetNs::current()
            .and_then(|netns| netns.identity())
            .ok();
        let get = |name: &str, addr: SocketAddr| match inherited.endpoint(name, here) {
            Some(l) => Ok(l),
            None => TcpListener::bind(addr),
        };
        Ok(Endpoints {
            readiness: get("readiness", readiness)?,
            admin: get("admin", admin)?,
            metrics: get("metrics", metrics)?,
        })
    }

    /// Duplicates, named, for handing over to a new process.
    pub fn duplicate(&self) -> std::io::Result<Vec<(&'static str, SocketAddr, TcpListener)>> {
        [
            ("readiness", &self.readiness),
            ("admin", &self.admin),
            ("metrics", &self.metrics),
        ]
        .into_iter()
        .map(|(name, l)| Ok((name, l.local_addr()?, l.try_clone()?)))
        .collect()
    }
}

/// Starts the readiness, admin and metrics servers on threads of their own; they stop when
/// `stop` is set.
pub fn start(
    state: Arc<AdminState>,
    endpoints: Endpoints,
    stop: Arc<AtomicBool>,
) -> std::io::Result<()> {
    let ready_state = state.clone();
    let ready: Arc<Handler> = Arc::new(move |r| match r.path {
        "/healthz/ready" => ready_state.ready_response(),
        _ => (404, "text/plain", "not found\n".into()),
    });
    let metrics_state = state.clone();
    let scrape: Arc<Handler> = Arc::new(move |r| match r.path {
        "/stats/prometheus" | "/metrics" => {
            (200, "text/plain; version=0.0.4", metrics_state.prometheus())
        }
        _ => (404, "text/plain", "metrics: /stats/prometheus\n".into()),
    });
    let admin_handler: Arc<Handler> = Arc::new(move |r| match (r.method, r.path) {
        ("GET", "/stats") => (200, "application/json", state.stats_json().to_string()),
        ("GET", "/config_dump") => (200, "application/json", state.config_dump().to_string()),
        ("GET", "/stats/prometheus") => (200, "text/plain; version=0.0.4", state.prometheus()),
        ("GET", "/healthz/ready") => state.ready_response(),
        (method @ ("GET" | "POST"), "/logging") => {
            crate::logs::answer_logging(state.log_level.as_ref(), method, r.query)
        }
        ("GET", "/access_log") => state.set_access_log(""),
        ("POST", "/access_log") => state.set_access_log(r.query),
        _ => (
            404,
            "text/plain",
            "endpoints: GET /stats /config_dump /stats/prometheus /healthz/ready /logging \
             /access_log; POST /logging?level=<filter> /access_log?enabled=<bool>&sample=<0..1>\n"
                .into(),
        ),
    });
    for (name, listener, handler) in [
        ("readiness", endpoints.readiness, ready),
        ("admin", endpoints.admin, admin_handler),
        ("metrics", endpoints.metrics, scrape),
    ] {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || serve(listener, handler, stop))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server answering `/healthz/ready` with 200, and the flag that stops it.
    fn server(limits: Option<Limits>) -> (SocketAddr, Arc<AtomicBool>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(|r| match r.path {
            "/healthz/ready" => (200, "text/plain", "ready\n".into()),
            _ => (404, "text/plain", "not found\n".into()),
        });
        let flag = stop.clone();
        std::thread::spawn(move || match limits {
            Some(limits) => serve_with(listener, handler, flag, limits),
            None => serve(listener, handler, flag),
        });
        (addr, stop)
    }

    /// Sends `request` and reads the answer until the server closes (at most 2 s).
    fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut conn = TcpStream::connect(addr).expect("connect");
        conn.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        conn.write_all(request).expect("send");
        let mut answer = Vec::new();
        let _ = conn.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    }

    fn probe(addr: SocketAddr) -> String {
        exchange(addr, b"GET /healthz/ready HTTP/1.1\r\nhost: x\r\n\r\n")
    }

    #[test]
    fn a_stalled_client_does_not_delay_another_clients_probe() {
        let (addr, stop) = server(None);
        let mut stalled = TcpStream::connect(addr).expect("connect");
        stalled
            .write_all(b"GET /healthz/ready HTTP/1.1\r\n")
            .expect("send");
        std::thread::sleep(Duration::from_millis(100));
        let started = Instant::now();
        let answer = probe(addr);
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer:?}");
        assert!(answer.ends_with("ready\n"), "{answer:?}");
        assert!(started.elapsed() < Duration::from_secs(1));
        stop.store(true, Ordering::Release);
    }

    #[test]
    fn a_trickling_client_is_cut_off_at_the_request_deadline() {
        let limits = Limits {
            read: Duration::from_secs(1),
            ..LIMITS
        };
        let (addr, stop) = server(Some(limits));
        let mut conn = TcpStream::connect(addr).expect("connect");
        let mut trickle = conn.try_clone().expect("clone");
        // A byte every 200 ms: each read succeeds well within any per-read timeout.
        std::thread::spawn(move || {
            for b in b"GET /healthz/ready HTTP/1.1\r\nx-slow: ".iter().cycle() {
                if trickle.write_all(&[*b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        conn.set_read_timeout(Some(Duration::from_secs(4)))
            .expect("timeout");
        let started = Instant::now();
        let mut buf = [0u8; 64];
        match conn.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("server did not close the connection: {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(probe(addr).starts_with("HTTP/1.1 200 OK"));
        stop.store(true, Ordering::Release);
    }

    #[test]
    fn over_long_requests_are_refused_and_the_server_keeps_answering() {
        let (addr, stop) = server(None);
        let mut long_line = b"GET /".to_vec();
        long_line.resize(20 * 1024, b'a');
        let answer = exchange(addr, &long_line);
        assert!(answer.starts_with("HTTP/1.1 414 "), "{answer:?}");

        let mut long_header = b"GET /healthz/ready HTTP/1.1\r\nx-big: ".to_vec();
        long_header.resize(20 * 1024, b'b');
        let answer = exchange(addr, &long_header);
        assert!(answer.starts_with("HTTP/1.1 431 "), "{answer:?}");

        let mut many = b"GET /healthz/ready HTTP/1.1\r\n".to_vec();
        for i in 0..100 {
            many.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        let answer = exchange(addr, &many);
        assert!(answer.starts_with("HTTP/1.1 431 "), "{answer:?}");

        // Headers within the limits are still fine.
        let mut some = b"GET /healthz/ready HTTP/1.1\r\n".to_vec();
        for i in 0..20 {
            some.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
        }
        some.extend_from_slice(b"\r\n");
        assert!(exchange(addr, &some).starts_with("HTTP/1.1 200 OK"));
        assert!(probe(addr).starts_with("HTTP/1.1 200 OK"));
        stop.store(true, Ordering::Release);
    }

    #[test]
    fn one_peer_cannot_take_more_than_its_share_of_connections() {
        let limits = Limits {
            per_peer: 2,
            read: Duration::from_secs(1),
            ..LIMITS
        };
        let (addr, stop) = server(Some(limits));
        let idle: Vec<TcpStream> = (0..2)
            .map(|_| TcpStream::connect(addr).expect("connect"))
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        // The third is closed unanswered, at once, instead of waiting behind the idle two.
        let started = Instant::now();
        assert_eq!(probe(addr), "");
        assert!(started.elapsed() < Duration::from_millis(900));
        // Once the idle ones hit the deadline, the slots are free again.
        std::thread::sleep(Duration::from_millis(1200));
        assert!(probe(addr).starts_with("HTTP/1.1 200 OK"));
        drop(idle);
        stop.store(true, Ordering::Release);
    }
}
