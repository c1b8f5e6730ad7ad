//! The per-worker HBONE connection pool: the core's pool state machine plus the real h2
//! connections, dials and liveness pings.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::{select, Either};
use h2::client::SendRequest;
use mesh_core::identity::SpiffeId;
use mesh_core::pool::{Actions, Checkout, ConnId, Pool, PoolConfig, WaiterId};
use mesh_core::DATAPLANE_MARK;
use monoio::io::IntoPollIo;
use rustls::ClientConfig;

use crate::bufio::ReadBuffered;
use crate::local;
use crate::netns::NetNs;
use crate::sockets::{finish_connect, start_connect, Source};
use crate::stats::WorkerStats;
use crate::{h2glue, tls};

/// Pool key (DESIGN section 4): streams share a connection only when all of these match.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub source: SpiffeId,
    pub destination: SpiffeId,
    pub tunnel: SocketAddr,
    pub source_ip: IpAddr,
}

/// What it takes to dial a key: where to create the socket and which TLS config to use.
#[derive(Clone)]
pub struct DialSpec {
    pub netns: Rc<NetNs>,
    pub tls: Arc<ClientConfig>,
}

#[derive(Clone, Copy, Debug)]
pub struct PoolSettings {
    /// Streams per connection before the pool dials another (at most what the peer allows,
    /// `settings::MAX_STREAMS`).
    pub max_streams: u32,
    pub idle_timeout: Duration,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    pub dial_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            max_streams: mesh_core::hbone::settings::MAX_STREAMS,
            idle_timeout: Duration::from_secs(300),
            ping_interval: Duration::from_secs(30),
            ping_timeout: Duration::from_secs(10),
            dial_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error, Clone)]
pub enum PoolError {
    #[error("dialling the HBONE tunnel failed: {0}")]
    Dial(String),
    #[error("the pool went away")]
    Gone,
}

type Grant = Result<ConnId, PoolError>;

struct Inner {
    state: Pool<PoolKey>,
    senders: HashMap<ConnId, SendRequest<Bytes>>,
    waiters: HashMap<WaiterId, local::Sender<Grant>>,
    /// Only for keys the state machine tracks: a spec holds a pod's namespace open and TLS keys
    /// (possibly pre-rotation), so it goes when its key does; a later lease brings a fresh one.
    dial_specs: HashMap<PoolKey, DialSpec>,
}

impl Inner {
    /// Call after every event that can leave a key with no connection, dial or waiter.
    fn drop_unused_specs(&mut self) {
        for key in self.state.take_forgotten() {
            self.dial_specs.remove(&key);
        }
    }
}

pub struct HbonePool {
    inner: RefCell<Inner>,
    settings: PoolSettings,
    home: Rc<NetNs>,
    stats: Arc<WorkerStats>,
}

/// One stream slot on a pooled connection; gives the slot back when dropped.
pub struct Lease {
    pool: Rc<HbonePool>,
    conn: ConnId,
    pub sender: SendRequest<Bytes>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.release(self.conn);
    }
}

/// Cancels a waiter that gives up (its connection was dropped) before being served.
struct WaitGuard<'a> {
    pool: &'a Rc<HbonePool>,
    waiter: WaiterId,
    receiver: Option<local::Receiver<Grant>>,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        if let Some(rx) = self.receiver.take() {
            if let Some(Ok(conn)) = rx.try_take() {
                // Granted but never used: hand the slot back.
                self.pool.release(conn);
            } else {
                self.pool.inner.borrow_mut().state.cancel(self.waiter);
            }
        }
    }
}

impl HbonePool {
    pub fn new(settings: PoolSettings, home: Rc<NetNs>, stats: Arc<WorkerStats>) -> Rc<HbonePool> {
        Rc::new(HbonePool {
            inner: RefCell::new(Inner {
                state: Pool::new(PoolConfig {
                    max_streams: settings.max_streams,
                    idle_timeout: settings.idle_timeout,
                }),
                senders: HashMap::new(),
                waiters: HashMap::new(),
                dial_specs: HashMap::new(),
            }),
            settings,
            home,
            stats,
        })
    }

    /// A stream slot for `key`, dialling if needed.
    pub async fn lease(self: &Rc<Self>, key: PoolKey, spec: DialSpec) -> Result<Lease, PoolError> {
        let checkout = {
            let mut inner = self.inner.borrow_mut();
            inner.dial_specs.insert(key.clone(), spec);
            inner.state.checkout(&key)
        };
        let conn = match checkout {
            Checkout::Ready(conn) => conn,
            Checkout::Wait { waiter, dial } => {
                let (tx, rx) = local::oneshot();
                self.inner.borrow_mut().waiters.insert(waiter, tx);
                if let Some(conn) = dial {
                    self.spawn_dial(conn, key.clone());
                }
                let mut guard = WaitGuard {
                    pool: self,
                    waiter,
                    receiver: Some(rx),
                };
                let grant = match guard.receiver.as_mut() {
                    Some(rx) => rx.await,
                    None => None,
                };
                guard.receiver = None;
                grant.unwrap_or(Err(PoolError::Gone))?
            }
        };
        self.publish_gauges();
        let sender = self.inner.borrow().senders.get(&conn).cloned();
        match sender {
            Some(sender) => Ok(Lease {
                pool: self.clone(),
                conn,
                sender,
            }),
            None => {
                self.release(conn);
                Err(PoolError::Gone)
            }
        }
    }

    fn release(self: &Rc<Self>, conn: ConnId) {
        let actions = self.inner.borrow_mut().state.release(conn, Instant::now());
        self.apply(actions);
    }

    fn apply(self: &Rc<Self>, actions: Actions) {
        let mut inner = self.inner.borrow_mut();
        for (waiter, conn) in actions.granted {
            if let Some(tx) = inner.waiters.remove(&waiter) {
                if tx.send(Ok(conn)).is_err() {
                    // The waiter vanished between grant and delivery: give the slot back.
                    let more = inner.state.release(conn, Instant::now());
                    drop(inner);
                    self.apply(more);
                    inner = self.inner.borrow_mut();
                }
            }
        }
        for waiter in actions.failed {
            if let Some(tx) = inner.waiters.remove(&waiter) {
                let _ = tx.send(Err(PoolError::Dial("connection attempt failed".into())));
            }
        }
        if let Some(conn) = actions.close {
            inner.senders.remove(&conn);
        }
        inner.drop_unused_specs();
        let dial = actions
            .dial
            .and_then(|conn| Some((conn, inner.state.key_of(conn)?.clone())));
        drop(inner);
        if let Some((conn, key)) = dial {
            self.spawn_dial(conn, key);
        }
        self.publish_gauges();
    }

    fn publish_gauges(&self) {
        let inner = self.inner.borrow();
        self.stats
            .pool_connections
            .set(inner.state.connections() as u64);
        self.stats.pool_streams.set(inner.state.streams());
    }

    fn spawn_dial(self: &Rc<Self>, conn: ConnId, key: PoolKey) {
        let pool = self.clone();
        monoio::spawn(async move {
            let spec = pool.inner.borrow().dial_specs.get(&key).cloned();
            let result = match spec {
                Some(spec) => {
                    match monoio::time::timeout(pool.settings.dial_timeout, pool.dial(&key, &spec))
                        .await
                    {
                        Ok(r) => r,
                        Err(_) => Err(format!(
                            "no tunnel to {} within {:?}",
                            key.tunnel, pool.settings.dial_timeout
                        )),
                    }
                }
                None => Err("no dial parameters for key".into()),
            };
            match result {
                Ok((sender, connection)) => {
                    pool.stats.hbone_connections_dialed.inc();
                    pool.inner.borrow_mut().senders.insert(conn, sender);
                    let actions = pool
                        .inner
                        .borrow_mut()
                        .state
                        .connected(conn, Instant::now());
                    pool.apply(actions);
                    tracing::debug!(conn, tunnel = %key.tunnel, source = %key.source,
                        destination = %key.destination, "HBONE connection established");
                    pool.drive(conn, connection).await;
                }
                Err(error) => {
                    pool.stats.hbone_dial_failures.inc();
                    tracing::warn!(tunnel = %key.tunnel, source = %key.source,
                        destination = %key.destination, %error, "HBONE dial failed");
                    let actions = pool.inner.borrow_mut().state.connect_failed(conn);
                    pool.apply(actions);
                }
            }
        });
    }

    async fn dial(
        &self,
        key: &PoolKey,
        spec: &DialSpec,
    ) -> Result<(SendRequest<Bytes>, ClientConn), String> {
        let socket = spec
            .netns
            .run_in(&self.home, || {
                start_connect(key.tunnel, Source::Local(key.source_ip), DATAPLANE_MARK)
            })
            .map_err(|e| format!("entering {}: {e}", spec.netns.path()))?
            .map_err(|e| format!("socket: {e}"))?;
        let tcp = finish_connect(socket)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let io = ReadBuffered::new(tcp.into_poll_io().map_err(|e| format!("poll io: {e}"))?);
        let connector = tokio_rustls::TlsConnector::from(spec.tls.clone());
        let tls_stream = connector
            .connect(tls::placeholder_server_name(key.tunnel), io)
            .await
            .map_err(|e| {
                let reason = tls::Refusal::of(&e);
                self.stats.tls_refused(reason);
                format!("TLS ({}): {e}", reason.name())
            })?;
        h2glue::client_builder()
            .handshake::<_, Bytes>(tls_stream)
            .await
            .map_err(|e| format!("HTTP/2: {e}"))
    }

    /// Runs the connection until it ends or stops answering PINGs, then forgets it.
    async fn drive(self: &Rc<Self>, conn: ConnId, mut connection: ClientConn) {
        let ping_pong = connection.ping_pong();
        let settings = self.settings;
        let liveness = async move {
            let Some(mut pp) = ping_pong else {
                return std::future::pending::<String>().await;
            };
            loop {
                monoio::time::sleep(settings.ping_interval).await;
                match monoio::time::timeout(settings.ping_timeout, pp.ping(h2::Ping::opaque()))
                    .await
                {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return format!("PING failed: {e}"),
                    Err(_) => return format!("no PONG within {:?}", settings.ping_timeout),
                }
            }
        };
        let reason = match select(std::pin::pin!(connection), std::pin::pin!(liveness)).await {
            Either::Left((Ok(()), _)) => None,
            Either::Left((Err(e), _)) => Some(format!("connection error: {e}")),
            Either::Right((why, _)) => Some(why),
        };
        if let Some(reason) = reason {
            tracing::info!(conn, %reason, "HBONE connection lost");
        }
        let actions = {
            let mut inner = self.inner.borrow_mut();
            inner.senders.remove(&conn);
            inner.state.lost(conn)
        };
        self.apply(actions);
    }

    /// Closes connections idle past the timeout; runs until the worker stops.
    pub async fn sweep_idle(self: Rc<Self>) {
        let period = (self.settings.idle_timeout / 4).max(Duration::from_millis(100));
        loop {
            monoio::time::sleep(period).await;
            let expired = {
                let mut inner = self.inner.borrow_mut();
                let expired = inner.state.expire_idle(Instant::now());
                for conn in &expired {
                    // Dropping the last SendRequest lets h2 send GOAWAY and close.
                    inner.senders.remove(conn);
                }
                inner.drop_unused_specs();
                expired
            };
            if !expired.is_empty() {
                tracing::debug!(count = expired.len(), "released idle HBONE connections");
                self.publish_gauges();
            }
        }
    }

    /// No new streams on the lease's connection (the peer is going away); it closes when its
    /// last stream ends.
    pub fn retire(self: &Rc<Self>, lease: &Lease) {
        let actions = self.inner.borrow_mut().state.retire(lease.conn);
        self.apply(actions);
    }

    /// New streams for `source` go to new connections (its certificate changed); existing
    /// streams finish on the old ones, which close when drained.
    pub fn retire_source(self: &Rc<Self>, source: &SpiffeId) {
        let closed = self
            .inner
            .borrow_mut()
            .state
            .retire_where(|k| &k.source == source);
        {
            let mut inner = self.inner.borrow_mut();
            for conn in closed {
                inner.senders.remove(&conn);
            }
            inner.drop_unused_specs();
        }
        // Idle connections closed at once: the gauges say so now, not at the next event.
        self.publish_gauges();
    }
}

type ClientConn = h2::client::Connection<
    tokio_rustls::client::TlsStream<ReadBuffered<monoio::net::tcp::stream_poll::TcpStreamPoll>>,
    Bytes,
>;

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use ctrl_agent::ca::LocalCa;
    use monoio::net::TcpListener;
    use rustls::ServerConfig;

    use super::*;
    use crate::runtime::{self, DriverChoice};
    use crate::tls::tests::issue;
    use crate::tls::TrustBundle;

    const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";
    const SERVER: &str = "spiffe://cluster.local/ns/default/sa/server";
    const PODS: u8 = 20;

    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        let driver = runtime::resolve(DriverChoice::Auto).expect("a driver");
        runtime::block_on(driver, || future).expect("runtime")
    }

    fn id(s: &str) -> SpiffeId {
        s.parse().expect("test id")
    }

    /// The client's and the server's TLS configs, issued by one mesh CA.
    fn configs() -> (Arc<ClientConfig>, Arc<ServerConfig>) {
        let ca = LocalCa::generate("cluster.local").expect("ca");
        let trust = TrustBundle::new(&[ca.root_der().to_vec()]).expect("trust");
        let client = tls::client_config(&issue(&ca, CLIENT), &trust, id(SERVER)).expect("client");
        let server =
            tls::server_config(&issue(&ca, SERVER), &trust, "cluster.local").expect("server");
        (client, server)
    }

    /// An HBONE peer on loopback that keeps every tunnel open until the client closes it.
    fn tunnel_peer(config: Arc<ServerConfig>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        monoio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let acceptor = tokio_rustls::TlsAcceptor::from(config.clone());
                monoio::spawn(async move {
                    let Ok(io) = stream.into_poll_io() else {
                        return;
                    };
                    let Ok(tls) = acceptor.accept(io).await else {
                        return;
                    };
                    let handshake = h2glue::server_builder().handshake::<_, Bytes>(tls);
                    let Ok(mut conn) = handshake.await else {
                        return;
                    };
                    while let Some(Ok(_)) = conn.accept().await {}
                });
            }
        });
        addr
    }

    fn pool(idle_timeout: Duration) -> (Rc<HbonePool>, Arc<WorkerStats>) {
        let stats = Arc::new(WorkerStats::default());
        let settings = PoolSettings {
            idle_timeout,
            ..PoolSettings::default()
        };
        let home = Rc::new(NetNs::current().expect("own namespace"));
        (HbonePool::new(settings, home, stats.clone()), stats)
    }

    /// Pod `i`'s key: each pod has its own address (any 127/8 address can be bound).
    fn key(i: u8, tunnel: SocketAddr) -> PoolKey {
        PoolKey {
            source: id(CLIENT),
            destination: id(SERVER),
            tunnel,
            source_ip: IpAddr::V4(Ipv4Addr::new(127, 0, 1, i)),
        }
    }

    /// A namespace handle as a worker holds one per pod.
    fn pod_netns() -> Rc<NetNs> {
        Rc::new(NetNs::current().expect("namespace"))
    }

    fn still_held(pods: &[Rc<NetNs>]) -> usize {
        pods.iter().filter(|ns| Rc::strong_count(ns) > 1).count()
    }

    /// Dialling enters the pod's namespace and marks the socket: needs root, as CI runs.
    #[test]
    fn idle_tunnels_of_departed_pods_let_go_of_their_namespaces() {
        block_on(async {
            let (client_tls, server_tls) = configs();
            let tunnel = tunnel_peer(server_tls);
            let (pool, stats) = pool(Duration::from_millis(200));
            monoio::spawn(pool.clone().sweep_idle());
            let pods: Vec<Rc<NetNs>> = (0..PODS).map(|_| pod_netns()).collect();
            for (i, netns) in (1..).zip(&pods) {
                let spec = DialSpec {
                    netns: netns.clone(),
                    tls: client_tls.clone(),
                };
                drop(pool.lease(key(i, tunnel), spec).await.expect("tunnel"));
            }
            assert_eq!(stats.pool_connections.get(), u64::from(PODS));

            let deadline = Instant::now() + Duration::from_secs(5);
            while stats.pool_connections.get() > 0 && Instant::now() < deadline {
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(stats.pool_connections.get(), 0, "idle tunnels closed");
            assert_eq!(
                still_held(&pods),
                0,
                "namespaces of pods without tunnels are released"
            );

            // The first pod comes back (new namespace handle): it gets a tunnel again.
            let returning = pod_netns();
            let spec = DialSpec {
                netns: returning.clone(),
                tls: client_tls.clone(),
            };
            let _lease = pool.lease(key(1, tunnel), spec).await.expect("tunnel");
            assert_eq!(
                Rc::strong_count(&returning),
                2,
                "held while its tunnel lives"
            );
            assert_eq!(still_held(&pods), 0);
        });
    }

    /// Dialling enters the pod's namespace and marks the socket: needs root, as CI runs.
    #[test]
    fn a_rotated_source_s_idle_tunnels_leave_the_gauges_at_once() {
        block_on(async {
            let (client_tls, server_tls) = configs();
            let tunnel = tunnel_peer(server_tls);
            let (pool, stats) = pool(PoolSettings::default().idle_timeout);
            let spec = DialSpec {
                netns: pod_netns(),
                tls: client_tls,
            };
            drop(pool.lease(key(1, tunnel), spec).await.expect("tunnel"));
            assert_eq!(stats.pool_connections.get(), 1, "idle, kept for reuse");
            pool.retire_source(&id(CLIENT));
            assert_eq!(stats.pool_connections.get(), 0, "closed by the rotation");
        });
    }

    #[test]
    fn failed_dials_let_go_of_the_pod_namespace() {
        block_on(async {
            let (client_tls, _) = configs();
            let closed = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port");
            let (pool, _) = pool(PoolSettings::default().idle_timeout);
            let pods: Vec<Rc<NetNs>> = (0..PODS).map(|_| pod_netns()).collect();
            for (i, netns) in (1..).zip(&pods) {
                let spec = DialSpec {
                    netns: netns.clone(),
                    tls: client_tls.clone(),
                };
                let refused = pool.lease(key(i, closed), spec).await;
                assert!(
                    matches!(refused, Err(PoolError::Dial(_))),
                    "nothing listens"
                );
            }
            assert_eq!(still_held(&pods), 0, "no namespace kept for failed dials");
        });
    }
}
