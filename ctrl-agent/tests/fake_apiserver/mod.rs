//! A double of kube-apiserver, because none can be installed on this machine: plain HTTP/1.1
//! on loopback, speaking the list/watch protocol as client-go and kube's watcher expect it.
//!
//! - `GET <collection>`: the list, with `metadata.resourceVersion` (the store's revision, one
//!   counter for all kinds, like etcd's) and every object's own `metadata.resourceVersion`.
//! - `GET <collection>?watch=true&resourceVersion=N&allowWatchBookmarks=true`: a chunked
//!   stream of newline-delimited watch events (`ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK`)
//!   newer than N. A resourceVersion older than the compaction point gets an `ERROR` event
//!   with a `Status` of code 410 (reason Expired), as the real server sends, or, when asked,
//!   an HTTP 410.
//! - `GET <prefix>/namespaces/<ns>/<plural>/<name>` (or `<collection>/<name>`, cluster
//!   scoped): that object, or a 404 `Status`.
//! - An unknown collection is a 404 with a `Status`, like a CRD that is not installed.
//! - Discovery of a group's kinds (`/apis/<group>` an `APIGroup` naming the versions served,
//!   `/apis/<group>/<version>` an `APIResourceList`), each a 404 when it serves no
//!   collection. A collection can be served at another version of its group than its path's
//!   (which then 404s), as an Istio before 1.22 serves its security kinds at v1beta1 only.
//! - `PATCH /api/v1/namespaces/<ns>/pods/<name>[/status]` with a JSON merge patch: applied to
//!   the stored pod (a `MODIFIED` event), a 404 `Status` for a pod that does not exist, a 415
//!   for another patch type.
//!
//! Tests drive it: apply and delete objects (each a watch event), delete without an event
//! and compact (a gap the watchers did not see), send bookmarks, cut open watches, expire
//! them with 410, slow a list down, and read back which resourceVersions watches asked for.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const NAMESPACES: &str = "/api/v1/namespaces";
pub const PODS: &str = "/api/v1/pods";
pub const SERVICES: &str = "/api/v1/services";
pub const ENDPOINT_SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
pub const AUTHORIZATION_POLICIES: &str = "/apis/security.istio.io/v1/authorizationpolicies";
pub const PEER_AUTHENTICATIONS: &str = "/apis/security.istio.io/v1/peerauthentications";
pub const GATEWAYS: &str = "/apis/gateway.networking.k8s.io/v1/gateways";
pub const GATEWAY_CLASSES: &str = "/apis/gateway.networking.k8s.io/v1/gatewayclasses";
/// Not watched: at shutdown the agent reads its own DaemonSet and its node (`GET` of one
/// object).
pub const DAEMON_SETS: &str = "/apis/apps/v1/daemonsets";
pub const NODES: &str = "/api/v1/nodes";
/// Discovery of Istio's security group: the versions it serves.
pub const ISTIO_SECURITY_GROUP: &str = "/apis/security.istio.io";

/// (collection path, apiVersion, kind) of every collection served.
const COLLECTIONS: [(&str, &str, &str); 10] = [
    (NAMESPACES, "v1", "Namespace"),
    (PODS, "v1", "Pod"),
    (SERVICES, "v1", "Service"),
    (ENDPOINT_SLICES, "discovery.k8s.io/v1", "EndpointSlice"),
    (
        AUTHORIZATION_POLICIES,
        "security.istio.io/v1",
        "AuthorizationPolicy",
    ),
    (
        PEER_AUTHENTICATIONS,
        "security.istio.io/v1",
        "PeerAuthentication",
    ),
    (GATEWAYS, "gateway.networking.k8s.io/v1", "Gateway"),
    (DAEMON_SETS, "apps/v1", "DaemonSet"),
    (NODES, "v1", "Node"),
    (
        GATEWAY_CLASSES,
        "gateway.networking.k8s.io/v1",
        "GatewayClass",
    ),
];

#[derive(Default)]
struct Collection {
    api_version: String,
    kind: String,
    /// By namespace/name.
    objects: BTreeMap<String, Value>,
    /// Every event, in order: (resourceVersion, type, object).
    log: Vec<(u64, String, Value)>,
    /// Watches from before this resourceVersion are refused with 410.
    compacted: u64,
    /// Bumped to cut open watches (connection dropped mid-stream).
    cut: u64,
    /// Bumped to end open watches with an ERROR 410 event.
    expired: u64,
    list_delay: Duration,
    /// Refuse too-old watches with an HTTP 410 instead of an ERROR event.
    http_gone: bool,
    /// Not served at all (404), like an uninstalled CRD.
    missing: bool,
    /// Served at this version of its group instead of its path's: the path 404s, and
    /// discovery names this version.
    served_at: Option<String>,
}

#[derive(Default)]
struct State {
    revision: u64,
    collections: BTreeMap<String, Collection>,
    /// Every request: (path, query parameters).
    requests: Vec<(String, BTreeMap<String, String>)>,
    /// Every patch: (path, patch, status code answered).
    patches: Vec<(String, Value, u16)>,
    /// Patches still to fail with a 500, as an API server that is restarting answers.
    failing_patches: u32,
}

struct Inner {
    state: Mutex<State>,
    changed: Condvar,
    stopped: AtomicBool,
}

pub struct FakeApiServer {
    addr: SocketAddr,
    inner: Arc<Inner>,
}

fn key(object: &Value) -> String {
    let meta = &object["metadata"];
    match meta["namespace"].as_str() {
        Some(ns) => format!("{ns}/{}", meta["name"].as_str().unwrap_or_default()),
        None => meta["name"].as_str().unwrap_or_default().to_owned(),
    }
}

impl FakeApiServer {
    pub fn start() -> FakeApiServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let mut state = State {
            revision: 100,
            ..State::default()
        };
        for (path, api_version, kind) in COLLECTIONS {
            state.collections.insert(
                path.to_owned(),
                Collection {
                    api_version: api_version.into(),
                    kind: kind.into(),
                    ..Collection::default()
                },
            );
        }
        let inner = Arc::new(Inner {
            state: Mutex::new(state),
            changed: Condvar::new(),
            stopped: AtomicBool::new(false),
        });
        let server = inner.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if server.stopped.load(Ordering::Acquire) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let server = server.clone();
                std::thread::spawn(move || serve(&server, stream));
            }
        });
        FakeApiServer { addr, inner }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig pointing at this server, no authentication.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: nobody\n\
             users:\n- name: nobody\n  user: {{}}\ncurrent-context: fake\n",
            self.url()
        )
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn change(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.lock());
        self.inner.changed.notify_all();
    }

    /// Creates or replaces an object: ADDED or MODIFIED to watchers. Returns its
    /// resourceVersion.
    pub fn apply(&self, path: &str, mut object: Value) -> u64 {
        let mut rv = 0;
        self.change(|s| {
            s.revision += 1;
            rv = s.revision;
            let c = s.collections.get_mut(path).expect("known collection");
            object["apiVersion"] = c.api_version.clone().into();
            object["kind"] = c.kind.clone().into();
            object["metadata"]["resourceVersion"] = rv.to_string().into();
            let k = key(&object);
            let kind = if c.objects.contains_key(&k) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            c.objects.insert(k, object.clone());
            c.log.push((rv, kind.into(), object));
        });
        rv
    }

    /// The stored object `key` (namespace/name) of `path`.
    pub fn object(&self, path: &str, key: &str) -> Option<Value> {
        self.lock().collections[path].objects.get(key).cloned()
    }

    /// The pod patches received, in order: (path, patch, status code answered).
    pub fn patches(&self) -> Vec<(String, Value, u16)> {
        self.lock().patches.clone()
    }

    /// Fails the next `count` patches with a 500.
    pub fn fail_patches(&self, count: u32) {
        self.lock().failing_patches = count;
    }

    /// Deletes an object: DELETED to watchers.
    pub fn delete(&self, path: &str, key: &str) -> u64 {
        let mut rv = 0;
        self.change(|s| {
            s.revision += 1;
            rv = s.revision;
            let c = s.collections.get_mut(path).expect("known collection");
            if let Some(mut object) = c.objects.remove(key) {
                object["metadata"]["resourceVersion"] = rv.to_string().into();
                c.log.push((rv, "DELETED".into(), object));
            }
        });
        rv
    }

    /// Deletes an object with no event, and compacts the history past it: the gap a watcher
    /// cannot resume across (only a relist shows the object gone).
    pub fn delete_in_gap(&self, path: &str, key: &str) {
        self.change(|s| {
            s.revision += 1;
            let rv = s.revision;
            let c = s.collections.get_mut(path).expect("known collection");
            c.objects.remove(key);
            c.log.clear();
            c.compacted = rv;
        });
    }

    /// Ends open watches of `path` with an ERROR event, code 410.
    pub fn expire_watches(&self, path: &str) {
        self.change(|s| {
            let c = s.collections.get_mut(path).expect("known collection");
            c.expired += 1;
        });
    }

    /// Drops open watch connections of `path` mid-stream (no final chunk).
    pub fn cut_watches(&self, path: &str) {
        self.change(|s| {
            let c = s.collections.get_mut(path).expect("known collection");
            c.cut += 1;
        });
    }

    /// Moves the store's revision on (as changes to other resources do) and sends a BOOKMARK
    /// with it to `path`'s watchers. Returns the bookmark's resourceVersion.
    pub fn bookmark(&self, path: &str) -> u64 {
        let mut rv = 0;
        self.change(|s| {
            s.revision += 1;
            rv = s.revision;
            let c = s.collections.get_mut(path).expect("known collection");
            let object = json!({
                "apiVersion": c.api_version,
                "kind": c.kind,
                "metadata": {"resourceVersion": rv.to_string()},
            });
            c.log.push((rv, "BOOKMARK".into(), object));
        });
        rv
    }

    pub fn set_list_delay(&self, path: &str, delay: Duration) {
        self.change(|s| s.collections.get_mut(path).expect("known").list_delay = delay);
    }

    pub fn set_http_gone(&self, path: &str, on: bool) {
        self.change(|s| s.collections.get_mut(path).expect("known").http_gone = on);
    }

    pub fn set_missing(&self, path: &str, missing: bool) {
        self.change(|s| s.collections.get_mut(path).expect("known").missing = missing);
    }

    /// Serves `path`'s kind at `version` of its group only (`None`: at its path's again).
    pub fn set_served_at(&self, path: &str, version: Option<&str>) {
        self.change(|s| {
            s.collections.get_mut(path).expect("known").served_at = version.map(str::to_owned)
        });
    }

    /// How many requests `path` had (discovery paths included).
    pub fn requests(&self, path: &str) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|(p, _)| p == path)
            .count()
    }

    /// The resourceVersion of each watch request to `path` so far, in order.
    pub fn watch_versions(&self, path: &str) -> Vec<String> {
        self.lock()
            .requests
            .iter()
            .filter(|(p, q)| p == path && q.get("watch").is_some_and(|w| w == "true" || w == "1"))
            .map(|(_, q)| q.get("resourceVersion").cloned().unwrap_or_default())
            .collect()
    }

    /// How many lists of `path` were served (or started).
    pub fn lists(&self, path: &str) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|(p, q)| p == path && !q.contains_key("watch"))
            .count()
    }

    /// Every request's query for `path`, for assertions on parameters.
    pub fn queries(&self, path: &str) -> Vec<BTreeMap<String, String>> {
        self.lock()
            .requests
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, q)| q.clone())
            .collect()
    }

    /// Service `shop/cart` (10.96.0.1, port 80 to 8080) and its EndpointSlice with one ready
    /// endpoint, pod `uid-cart` at 10.0.0.1: what both test suites' clusters route to.
    pub fn apply_cart_service(&self) {
        self.apply(
            SERVICES,
            objects::service("shop", "cart", &["10.96.0.1"], &[("http", 80, json!(8080))]),
        );
        self.apply(
            ENDPOINT_SLICES,
            objects::endpoint_slice(
                "shop",
                "cart",
                &[("uid-cart", "10.0.0.1", true)],
                &[("http", 8080)],
            ),
        );
    }

    /// Waits until `f` holds for the request log (or panics after `timeout`).
    pub fn wait_for(&self, what: &str, timeout: Duration, f: impl Fn(&FakeApiServer) -> bool) {
        let end = Instant::now() + timeout;
        while !f(self) {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.inner.stopped.store(true, Ordering::Release);
        self.inner.changed.notify_all();
        // Unblock the accept loop.
        let _ = TcpStream::connect(self.addr);
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn respond(stream: &mut TcpStream, code: u16, text: &str, body: &Value) {
    let body = body.to_string();
    let _ = write!(
        stream,
        "HTTP/1.1 {code} {text}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.flush();
}

fn chunk(stream: &mut TcpStream, line: &str) -> std::io::Result<()> {
    write!(stream, "{:x}\r\n{line}\r\n", line.len())?;
    stream.flush()
}

/// One connection, one request (every response closes the connection).
fn serve(inner: &Inner, mut stream: TcpStream) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut headers = BTreeMap::new();
    loop {
        let mut header = String::new();
        match reader.read_line(&mut header) {
            Ok(0) | Err(_) => return,
            Ok(_) if header == "\r\n" || header == "\n" => break,
            Ok(_) => {
                if let Some((name, value)) = header.split_once(':') {
                    headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
                }
            }
        }
    }
    let method = request_line.split_whitespace().next().unwrap_or("GET");
    let target = request_line.split_whitespace().nth(1).unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query: BTreeMap<String, String> = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect();
    if method == "PATCH" {
        let length = headers
            .get("content-length")
            .and_then(|l| l.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        if std::io::Read::read_exact(&mut reader, &mut body).is_err() {
            return;
        }
        let content_type = headers.get("content-type").cloned().unwrap_or_default();
        let (code, answer) = patch(inner, path, &content_type, &body);
        let text = if code == 200 { "OK" } else { "Error" };
        return respond(&mut stream, code, text, &answer);
    }
    let watching = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    let delay = {
        let mut s = inner.state.lock().unwrap_or_else(|e| e.into_inner());
        s.requests.push((path.to_owned(), query.clone()));
        if let Some((code, body)) = discovery(&s, path) {
            drop(s);
            let text = if code == 200 { "OK" } else { "Not Found" };
            return respond(&mut stream, code, text, &body);
        }
        let one = if s.collections.contains_key(path) {
            None
        } else {
            named(path).or_else(|| {
                // Cluster-scoped: `<collection>/<name>`.
                let (collection, name) = path.rsplit_once('/')?;
                s.collections
                    .contains_key(collection)
                    .then(|| (collection.to_owned(), name.to_owned()))
            })
        };
        if let Some((collection, key)) = one {
            let found = s.collections.get(&collection).and_then(|c| {
                let object = c.objects.get(&key)?;
                let mut object = object.clone();
                object["apiVersion"] = c.api_version.clone().into();
                object["kind"] = c.kind.clone().into();
                Some(object)
            });
            drop(s);
            return match found {
                Some(object) => respond(&mut stream, 200, "OK", &object),
                None => {
                    let message = format!("{key} not found");
                    respond(
                        &mut stream,
                        404,
                        "Not Found",
                        &status(404, "NotFound", &message),
                    )
                }
            };
        }
        match s.collections.get(path) {
            Some(c) if !c.missing && c.served_at.is_none() => c.list_delay,
            _ => {
                drop(s);
                let body = status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                );
                return respond(&mut stream, 404, "Not Found", &body);
            }
        }
    };
    if watching {
        watch(inner, stream, path, &query);
    } else {
        std::thread::sleep(delay);
        let s = inner.state.lock().unwrap_or_else(|e| e.into_inner());
        let c = &s.collections[path];
        let body = json!({
            "apiVersion": c.api_version,
            "kind": format!("{}List", c.kind),
            "metadata": {"resourceVersion": s.revision.to_string()},
            "items": c.objects.values().cloned().collect::<Vec<_>>(),
        });
        drop(s);
        respond(&mut stream, 200, "OK", &body);
    }
}

/// `<prefix>/namespaces/<ns>/<plural>/<name>` (`GET` of one object): its collection's path
/// (`<prefix>/<plural>`) and key (`<ns>/<name>`).
fn named(path: &str) -> Option<(String, String)> {
    let (prefix, rest) = path.split_once("/namespaces/")?;
    let mut parts = rest.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(ns), Some(plural), Some(name), None) => {
            Some((format!("{prefix}/{plural}"), format!("{ns}/{name}")))
        }
        _ => None,
    }
}

/// A JSON merge patch (RFC 7386) of a pod, as `kubectl annotate` and kube's
/// `Patch::Merge` send it: applied to the stored object, which watchers see MODIFIED.
fn patch(inner: &Inner, path: &str, content_type: &str, body: &[u8]) -> (u16, Value) {
    if content_type != "application/merge-patch+json" {
        let message = format!("the body of the request was in an unknown format: {content_type}");
        return (415, status(415, "UnsupportedMediaType", &message));
    }
    let Ok(change) = serde_json::from_slice::<Value>(body) else {
        return (400, status(400, "BadRequest", "the patch is not JSON"));
    };
    let Some(key) = path
        .strip_prefix("/api/v1/namespaces/")
        .and_then(|rest| rest.split_once("/pods/"))
        .map(|(ns, name)| format!("{ns}/{}", name.trim_end_matches("/status")))
    else {
        return (
            405,
            status(405, "MethodNotAllowed", "only pods are patched here"),
        );
    };
    let mut s = inner.state.lock().unwrap_or_else(|e| e.into_inner());
    if s.failing_patches > 0 {
        s.failing_patches -= 1;
        s.patches.push((path.to_owned(), change, 500));
        return (500, status(500, "InternalError", "etcd is restarting"));
    }
    let Some(mut object) = s.collections[PODS].objects.get(&key).cloned() else {
        s.patches.push((path.to_owned(), change, 404));
        return (
            404,
            status(404, "NotFound", &format!("pods \"{key}\" not found")),
        );
    };
    merge(&mut object, &change);
    s.patches.push((path.to_owned(), change, 200));
    s.revision += 1;
    let rv = s.revision;
    object["metadata"]["resourceVersion"] = rv.to_string().into();
    let c = s.collections.get_mut(PODS).expect("pods");
    c.objects.insert(key, object.clone());
    c.log.push((rv, "MODIFIED".into(), object.clone()));
    drop(s);
    inner.changed.notify_all();
    (200, object)
}

/// RFC 7386: objects merge key by key, null removes, anything else replaces.
fn merge(target: &mut Value, change: &Value) {
    let Value::Object(fields) = change else {
        *target = change.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    for (key, value) in fields {
        if value.is_null() {
            if let Some(map) = target.as_object_mut() {
                map.remove(key);
            }
        } else {
            merge(&mut target[key.as_str()], value);
        }
    }
}

/// The answer to a discovery request (`/apis/<group>` or `/apis/<group>/<version>`), or
/// `None` when `path` is not one.
fn discovery(s: &State, path: &str) -> Option<(u16, Value)> {
    let parts: Vec<&str> = path.strip_prefix("/apis/")?.split('/').collect();
    let (group, version) = match parts[..] {
        [group] => (group, None),
        [group, version] => (group, Some(version)),
        _ => return None,
    };
    // (version, plural, kind) of every collection of the group served.
    let mut served: Vec<(String, &str, &str)> = Vec::new();
    for (collection, c) in &s.collections {
        let Some(rest) = collection.strip_prefix("/apis/") else {
            continue;
        };
        let [g, v, plural] = rest.split('/').collect::<Vec<_>>()[..] else {
            continue;
        };
        if g == group && !c.missing {
            let v = c.served_at.clone().unwrap_or_else(|| v.to_owned());
            served.push((v, plural, &c.kind));
        }
    }
    let not_found = (
        404,
        status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ),
    );
    let body = match version {
        None => {
            let mut versions: Vec<&str> = served.iter().map(|(v, _, _)| v.as_str()).collect();
            versions.sort_unstable();
            versions.dedup();
            let versions: Vec<Value> = versions
                .iter()
                .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
                .collect();
            let Some(preferred) = versions.first().cloned() else {
                return Some(not_found);
            };
            json!({"kind": "APIGroup", "apiVersion": "v1", "name": group,
                   "versions": versions, "preferredVersion": preferred})
        }
        Some(version) => {
            let resources: Vec<Value> = served
                .iter()
                .filter(|(v, _, _)| v == version)
                .map(|(_, plural, kind)| {
                    json!({"name": plural, "singularName": "", "namespaced": *plural != "gatewayclasses",
                           "kind": kind, "verbs": ["get", "list", "watch"]})
                })
                .collect();
            if resources.is_empty() {
                return Some(not_found);
            }
            json!({"kind": "APIResourceList", "apiVersion": "v1",
                   "groupVersion": format!("{group}/{version}"), "resources": resources})
        }
    };
    Some((200, body))
}

fn watch(inner: &Inner, mut stream: TcpStream, path: &str, query: &BTreeMap<String, String>) {
    let mut s = inner.state.lock().unwrap_or_else(|e| e.into_inner());
    let mut position: u64 = match query.get("resourceVersion").map(|v| v.parse()) {
        Some(Ok(rv)) if rv > 0 => rv,
        // Unset or "0": from now on.
        _ => s.revision,
    };
    let c = &s.collections[path];
    let (cut, expired) = (c.cut, c.expired);
    if position < c.compacted {
        let message = format!("too old resource version: {position} ({})", c.compacted);
        if c.http_gone {
            drop(s);
            return respond(&mut stream, 410, "Gone", &status(410, "Expired", &message));
        }
        drop(s);
        let _ = write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        let event = json!({"type": "ERROR", "object": status(410, "Expired", &message)});
        let _ = chunk(&mut stream, &format!("{event}\n"));
        let _ = write!(stream, "0\r\n\r\n");
        return;
    }
    if write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .and_then(|_| stream.flush())
    .is_err()
    {
        return;
    }
    loop {
        if inner.stopped.load(Ordering::Acquire) {
            return;
        }
        let c = &s.collections[path];
        if c.cut != cut {
            drop(s);
            // Mid-stream: no final chunk, the client sees the connection die.
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
        if c.expired != expired {
            let message = format!("too old resource version: {position}");
            let event = json!({"type": "ERROR", "object": status(410, "Expired", &message)});
            drop(s);
            let _ = chunk(&mut stream, &format!("{event}\n"));
            let _ = write!(stream, "0\r\n\r\n");
            return;
        }
        let pending: Vec<String> = c
            .log
            .iter()
            .filter(|(rv, _, _)| *rv > position)
            .map(|(_, kind, object)| json!({"type": kind, "object": object}).to_string())
            .collect();
        if let Some((rv, _, _)) = c.log.last() {
            position = position.max(*rv);
        }
        if pending.is_empty() {
            s = inner
                .changed
                .wait_timeout(s, Duration::from_millis(200))
                .unwrap_or_else(|e| e.into_inner())
                .0;
            continue;
        }
        drop(s);
        for line in pending {
            if chunk(&mut stream, &format!("{line}\n")).is_err() {
                return;
            }
        }
        s = inner.state.lock().unwrap_or_else(|e| e.into_inner());
    }
}

pub mod objects;
