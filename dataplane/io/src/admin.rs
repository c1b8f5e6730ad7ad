//! Readiness (15021), Prometheus metrics (15020) and admin (15000, localhost) HTTP endpoints,
//! served by plain threads that never run on a data-plane core's event loop: an expensive dump
//! or scrape must not delay packets.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::accesslog::AccessLogSettings;
use crate::logs::LogLevel;
use crate::metrics::{escape, MetricsRegistry};
use crate::runtime::Driver;
use crate::stats::{WorkerStats, GAUGES};
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
        workloads.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let workloads: Vec<Value> = workloads
            .into_iter()
            .map(|w| {
                json!({
                    "uid": &*w.uid, "name": w.name, "namespace": &*w.namespace,
                    "identity": w.identity.to_string(),
                    "ips": w.ips.iter().map(|ip| ip.to_string()).collect::<Vec<_>>(),
                    "node": &*w.node, "protocol": format!("{:?}", w.protocol),
                    "netns": match &w.netns {
                        mesh_core::index::NetnsSource::None => String::new(),
                        mesh_core::index::NetnsSource::Path(p) => p.clone(),
                        mesh_core::index::NetnsSource::Agent => "from ctrl-agent (CNI)".into(),
                    },
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
        services.sort_by(|a, b| (&a.0.namespace, &a.0.name).cmp(&(&b.0.namespace, &b.0.name)));
        let services: Vec<Value> = services
            .into_iter()
            .map(|(name, vips, endpoints)| {
                json!({
                    "name": name.name, "namespace": name.namespace, "hostname": name.hostname,
                    "vips": vips.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "endpoints": endpoints,
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
    /// plane's own per-worker counters and the snapshot's state.
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
                let gauge = GAUGES.contains(&name);
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
        out
    }

    /// `POST /logging?level=<RUST_LOG filter>`; without a level, reports the current one.
    fn logging(&self, query: &str) -> (u16, &'static str, String) {
        let Some(level) = &self.log_level else {
            return (
                503,
                "text/plain",
                "log level is fixed in this process\n".into(),
            );
        };
        match query_value(query, "level") {
            None => (200, "text/plain", format!("{}\n", level.current())),
            Some(directives) => match level.set(&directives) {
                Ok(()) => {
                    tracing::info!(filter = %directives, "log filter changed");
                    (200, "text/plain", format!("{directives}\n"))
                }
                Err(e) => (400, "text/plain", format!("{e}\n")),
            },
        }
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
fn query_value(query: &str, key: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.replace('+', " "))
}

/// A request: method, path, query string.
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a str,
}

type Handler = dyn Fn(&Request<'_>) -> (u16, &'static str, String) + Send + Sync;

/// Serves requests on `listener` with `handler`, one short-lived connection at a time, until
/// `stop` is set (checked between connections and at least every 200 ms).
pub fn serve(listener: TcpListener, handler: Arc<Handler>, stop: Arc<AtomicBool>) {
    let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
    // Non-blocking: another process may share this socket (upgrade), and an accept that
    // loses the race must not block.
    let _ = listener.set_nonblocking(true);
    while !stop.load(Ordering::Acquire) {
        match crate::sockets::wait_readable(fd, Duration::from_millis(200)) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        }
        let Ok((conn, _)) = listener.accept() else {
            continue;
        };
        let _ = conn.set_nonblocking(false);
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
        let _ = answer(conn, &*handler);
    }
}

fn answer(mut conn: TcpStream, handler: &Handler) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Read the headers, and a (small) body, so the client sees a clean close.
    let mut body_len = 0u64;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                body_len = value.trim().parse().unwrap_or(0).min(64 * 1024);
            }
        }
    }
    std::io::copy(&mut reader.by_ref().take(body_len), &mut std::io::sink())?;
    let mut parts = request_line.split_whitespace();
    let (status, content_type, body) = match (parts.next(), parts.next()) {
        (Some(method @ ("GET" | "POST")), Some(target)) => {
            let (path, query) = target.split_once('?').unwrap_or((target, ""));
            handler(&Request {
                method,
                path,
                query,
            })
        }
        _ => (405, "text/plain", "GET or POST only\n".into()),
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "",
    };
    write!(
        conn,
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    conn.flush()
}

/// The three endpoint listeners: bound here, or taken over from the previous process.
pub struct Endpoints {
    pub readiness: TcpListener,
    pub admin: TcpListener,
    pub metrics: TcpListener,
}

impl Endpoints {
    /// Each endpoint from `inherited` if the previous process handed it over, else bound.
    pub fn open(
        inherited: &crate::upgrade::Inherited,
        readiness: SocketAddr,
        admin: SocketAddr,
        metrics: SocketAddr,
    ) -> std::io::Result<Endpoints> {
        let get = |name: &str, addr: SocketAddr| match inherited.endpoint(name) {
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
        ("GET", "/logging") => state.logging(""),
        ("POST", "/logging") => state.logging(r.query),
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
