//! Readiness (15021) and admin (15000, localhost) HTTP endpoints, served by plain threads that
//! never run on a data-plane core's event loop: an expensive dump must not delay packets.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::runtime::Driver;
use crate::stats::WorkerStats;
use crate::watch::WatchStatus;

/// Everything the endpoints report on.
pub struct AdminState {
    pub workers: Vec<Arc<WorkerStats>>,
    pub watch: Arc<WatchStatus>,
    pub driver: Driver,
}

impl AdminState {
    /// Ready once a snapshot is adopted by every worker and every local pod has listeners.
    pub fn readiness(&self) -> Result<(), String> {
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
        let workloads: Vec<Value> = index
            .workloads()
            .iter()
            .map(|w| {
                json!({
                    "uid": w.uid, "name": w.name, "namespace": w.namespace,
                    "identity": w.identity.to_string(),
                    "ips": w.ips.iter().map(|ip| ip.to_string()).collect::<Vec<_>>(),
                    "node": w.node, "protocol": format!("{:?}", w.protocol),
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
        json!({
            "node": index.node(),
            "source": index.source(),
            "epoch": index.generation().epoch,
            "generation": index.generation().generation,
            "trust_roots": index.trust_roots().len(),
            "workloads": workloads,
            "identities": identities,
        })
    }
}

type Handler = dyn Fn(&str) -> (u16, &'static str, String) + Send + Sync;

/// Serves GET requests on `listener` with `handler(path)`, one short-lived connection at a time.
pub fn serve(listener: TcpListener, handler: Arc<Handler>) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
        let _ = answer(conn, &*handler);
    }
}

fn answer(mut conn: TcpStream, handler: &Handler) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Drain headers so the client sees a clean close.
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let (status, content_type, body) = match (parts.next(), parts.next()) {
        (Some("GET"), Some(path)) => handler(path),
        _ => (405, "text/plain", "only GET\n".into()),
    };
    let reason = match status {
        200 => "OK",
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

/// Starts the readiness and admin servers on threads of their own.
pub fn start(
    state: Arc<AdminState>,
    readiness: SocketAddr,
    admin: SocketAddr,
) -> std::io::Result<()> {
    let ready_listener = TcpListener::bind(readiness)?;
    let admin_listener = TcpListener::bind(admin)?;
    let ready_state = state.clone();
    let ready: Arc<Handler> = Arc::new(move |path| match path {
        "/healthz/ready" => match ready_state.readiness() {
            Ok(()) => (200, "text/plain", "ready\n".into()),
            Err(why) => (503, "text/plain", format!("not ready: {why}\n")),
        },
        _ => (404, "text/plain", "not found\n".into()),
    });
    let admin_handler: Arc<Handler> = Arc::new(move |path| match path {
        "/stats" => (200, "application/json", state.stats_json().to_string()),
        "/config_dump" => (200, "application/json", state.config_dump().to_string()),
        "/healthz/ready" => match state.readiness() {
            Ok(()) => (200, "text/plain", "ready\n".into()),
            Err(why) => (503, "text/plain", format!("not ready: {why}\n")),
        },
        _ => (
            404,
            "text/plain",
            "endpoints: /stats /config_dump /healthz/ready\n".into(),
        ),
    });
    std::thread::Builder::new()
        .name("readiness".into())
        .spawn(move || serve(ready_listener, ready))?;
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || serve(admin_listener, admin_handler))?;
    Ok(())
}
