//! Waypoints, end to end in the lab topology (root, real namespaces and nftables, real
//! ctrl-agent and dataplane processes, real TLS and HTTP/2), on io_uring and on epoll.
//!
//! The waypoint is a double written for these tests: Envoy, Istio's waypoint, cannot be
//! installed here. It does at L4 what a waypoint does: it terminates HBONE as the waypoint's
//! identity in a pod of its own (not enrolled, as Istio's waypoint pods), records each CONNECT
//! target and the client identity it proved, and forwards the stream over HBONE of its own, as
//! its own identity, to the destination pod, which its "routes" name as a waypoint's config
//! would.

#[macro_use]
mod common;

use std::collections::HashMap;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use mesh_io::netns::NetNs;
use monoio::io::IntoPollIo;
use perf::lab::{Lab, LabOptions, ECHO_PORT, SERVICE_VIP};
use tokio::io::{AsyncRead, AsyncWrite};

const WAYPOINT_ID: &str = "spiffe://cluster.local/ns/default/sa/waypoint";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/default";
/// The waypoint's service: its VIP and HBONE port, as `istio.io/use-waypoint` resolves.
const WAYPOINT: &str = "10.96.0.20:15008";

/// One CONNECT the waypoint took: its target, and the identity the client proved.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    authority: String,
    client: String,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// The waypoint double, running.
struct Waypoint {
    seen: Log,
    /// How many of the next tunnels it sends away as soon as they are set up: GOAWAY with
    /// last stream id 0 (nothing processed), as a draining peer does with a tunnel it took as
    /// it stopped accepting.
    going_away: Arc<AtomicUsize>,
}

/// Starts the waypoint double on port 15008 of `pod`, proving `identity`. `routes` maps each
/// CONNECT target it may be sent to the pod address it forwards to; every such pod proves
/// `upstream_id`.
fn start_waypoint(
    lab: &Lab,
    pod: &str,
    identity: &str,
    routes: HashMap<String, SocketAddr>,
    upstream_id: &str,
) -> Waypoint {
    let (identity, trust) = raw_hbone::mesh_identity(lab, identity);
    let server = mesh_io::tls::server_config(&identity, &trust, "cluster.local").expect("server");
    let client = mesh_io::tls::client_config(&identity, &trust, upstream_id.parse().expect("id"))
        .expect("client");
    let listener = lab.listen_in(pod, 15008).expect("listen");
    listener.set_nonblocking(true).expect("nonblocking");
    let netns = NetNs::open(lab.pod(pod).netns_path()).expect("waypoint namespace");
    let waypoint = Waypoint {
        seen: Log::default(),
        going_away: Arc::default(),
    };
    let (log, going_away) = (waypoint.seen.clone(), waypoint.going_away.clone());
    std::thread::spawn(move || {
        let home = NetNs::current().expect("home namespace");
        // Its upstream connections leave from the waypoint's pod, as a waypoint's do.
        netns
            .run_in(&home, move || {
                let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                    .enable_timer()
                    .build()
                    .expect("runtime");
                let routes = Rc::new(routes);
                rt.block_on(serve(listener, server, client, routes, log, going_away));
            })
            .expect("enter the waypoint's namespace");
    });
    waypoint
}

async fn serve(
    listener: std::net::TcpListener,
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    routes: Rc<HashMap<String, SocketAddr>>,
    log: Log,
    going_away: Arc<AtomicUsize>,
) {
    let listener = monoio::net::TcpListener::from_std(listener).expect("listener");
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    while let Ok((tcp, _)) = listener.accept().await {
        let (acceptor, client, routes, log, going_away) = (
            acceptor.clone(),
            client.clone(),
            routes.clone(),
            log.clone(),
            going_away.clone(),
        );
        monoio::spawn(async move {
            let Ok(io) = tcp.into_poll_io() else { return };
            let Ok(tls) = acceptor.accept(io).await else {
                return;
            };
            let Ok(peer) = mesh_io::tls::peer_identity(tls.get_ref().1) else {
                return;
            };
            let sent_away = going_away
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if sent_away {
                send_away(tls).await;
                return;
            }
            let Ok(mut tunnel) = mesh_io::h2glue::server_builder()
                .handshake::<_, Bytes>(tls)
                .await
            else {
                return;
            };
            while let Some(Ok((request, respond))) = tunnel.accept().await {
                let authority = request.uri().to_string();
                log.lock().expect("log").push(Seen {
                    authority: authority.clone(),
                    client: peer.to_string(),
                });
                let to = routes.get(&authority).copied();
                monoio::spawn(forward(request, respond, to, client.clone()));
            }
        });
    }
}

/// Sends a tunnel away as a draining peer does one it took as it stopped accepting: its
/// SETTINGS, then GOAWAY with last stream id 0 (nothing processed); then reads until the
/// client closes. Raw frames (RFC 9113 section 4.1: 24-bit length, type, flags, stream id),
/// since h2's server closes right after a GOAWAY of its own, and a request then in flight
/// from the client meets a reset that discards the GOAWAY unread.
async fn send_away<S: AsyncRead + AsyncWrite + Unpin>(mut tls: S) {
    const SETTINGS: [u8; 9] = [0, 0, 0, 0x4, 0, 0, 0, 0, 0];
    const GOAWAY_NOTHING_PROCESSED: [u8; 17] =
        [0, 0, 8, 0x7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let frames = [&SETTINGS[..], &GOAWAY_NOTHING_PROCESSED[..]].concat();
    let mut written = 0;
    while written < frames.len() {
        match poll_fn(|cx| Pin::new(&mut tls).poll_write(cx, &frames[written..])).await {
            Ok(n) if n > 0 => written += n,
            _ => return,
        }
    }
    if poll_fn(|cx| Pin::new(&mut tls).poll_flush(cx))
        .await
        .is_err()
    {
        return;
    }
    read_until_closed(&mut tls).await;
}

fn answer(status: u16) -> http::Response<()> {
    http::Response::builder()
        .status(status)
        .body(())
        .expect("response")
}

/// Opens HBONE to `to`'s pod and relays the stream both ways; answers what the pod's node
/// answered, or 503 when there is no route or no tunnel.
async fn forward(
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    to: Option<SocketAddr>,
    client: Arc<rustls::ClientConfig>,
) {
    let upstream = match to {
        Some(to) => connect(to, client).await,
        None => Err("no route".into()),
    };
    let (status, up_send, up_recv) = match upstream {
        Ok(opened) => opened,
        Err(_) => {
            let _ = respond.send_response(answer(503), true);
            return;
        }
    };
    if status != 200 {
        let _ = respond.send_response(answer(status), true);
        return;
    }
    let Ok(down_send) = respond.send_response(answer(200), false) else {
        return;
    };
    monoio::spawn(relay(request.into_body(), up_send));
    relay(up_recv, down_send).await;
}

type Opened = (u16, h2::SendStream<Bytes>, h2::RecvStream);

async fn connect(to: SocketAddr, client: Arc<rustls::ClientConfig>) -> Result<Opened, String> {
    let tunnel = SocketAddr::new(to.ip(), 15008);
    let tcp = monoio::net::TcpStream::connect(tunnel)
        .await
        .map_err(|e| format!("connect {tunnel}: {e}"))?;
    let io = tcp.into_poll_io().map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(client)
        .connect(mesh_io::tls::placeholder_server_name(tunnel), io)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (sender, connection) = mesh_io::h2glue::client_builder()
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(|e| format!("h2: {e}"))?;
    monoio::spawn(connection);
    let request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(to.to_string())
        .body(())
        .map_err(|e| e.to_string())?;
    let mut ready = sender.ready().await.map_err(|e| format!("h2: {e}"))?;
    let (response, send) = ready
        .send_request(request, false)
        .map_err(|e| format!("h2: {e}"))?;
    let response = response.await.map_err(|e| format!("h2: {e}"))?;
    Ok((response.status().as_u16(), send, response.into_body()))
}

/// Copies one direction of a relayed stream, ending it when its source ends.
async fn relay(mut from: h2::RecvStream, mut to: h2::SendStream<Bytes>) {
    while let Some(Ok(chunk)) = from.data().await {
        let _ = from.flow_control().release_capacity(chunk.len());
        if to.send_data(chunk, false).is_err() {
            return;
        }
    }
    let _ = to.send_data(Bytes::new(), true);
}

/// The lab's config with the waypoint: a service for it (endpoints `waypoint_pods`), the
/// `server` service using it, `n2-a` itself using it when `pod_too`, and `extra` sections.
fn config_with_waypoint(lab: &Lab, waypoint_pods: &str, pod_too: bool, extra: &str) -> String {
    let mut config = lab.default_config();
    let server_service = "    endpoints: [n2-a]\n";
    assert!(config.ends_with(server_service), "{config}");
    config.push_str(&format!(
        "    waypoint: {WAYPOINT}\n  - name: waypoint\n    vips: [10.96.0.20]\n    \
         ports: [{{port: 15008}}]\n    endpoints: [{waypoint_pods}]\n"
    ));
    if pod_too {
        let pod = "{uid: n2-a, ";
        assert!(config.contains(pod), "{config}");
        config = config.replace(pod, &format!("{{uid: n2-a, waypoint: {WAYPOINT}, "));
    }
    config + extra
}

fn apply_everywhere(lab: &Lab, config: &str) {
    for node in 0..2 {
        lab.apply_to(node, config).expect("config served");
    }
}

/// Node 1 counted `failed` connections in all as failed for want of an upstream (`UH`), and
/// logged two with `reason` (the access log is written by its own thread: give it a moment).
fn refused_for_want_of_an_upstream(lab: &Lab, failed: u64, reason: &str) {
    assert!(eventually(Duration::from_secs(5), || {
        series(
            &scrape(lab, 0),
            "istio_tcp_connections_failed_total",
            &[("reporter", "source"), ("response_flags", "UH")],
        ) == Some(failed)
    }));
    assert!(
        eventually(Duration::from_secs(5), || {
            let log = lab.process_log("dataplane", 0);
            log.lines().filter(|l| l.contains(reason)).count() == 2
        }),
        "{}",
        lab.process_log("dataplane", 0)
    );
}

/// Only the waypoint may reach n2-a: the usual way to make a waypoint's policies binding.
const ONLY_THE_WAYPOINT: &str = "policies:
  - name: only-via-waypoint
    namespace: default
    selector: {matchLabels: {app: n2-a}}
    action: ALLOW
    rules:
      - from: [{source: {principals: [cluster.local/ns/default/sa/waypoint]}}]
";

lab_test!(
    traffic_to_a_service_or_pod_with_a_waypoint_goes_through_the_waypoint,
    LabOptions::default(),
    |mut lab| {
        lab.add_pod(1, "wp", false, "waypoint")
            .expect("waypoint pod");
        lab.add_pod(1, "wp2", false, "waypoint")
            .expect("a second waypoint pod");
        perf::load::serve_echo(lab.listen_in("n2-a", ECHO_PORT).expect("listen")).expect("echo");
        let service = SocketAddr::from((SERVICE_VIP, 80));
        let pod = lab.addr("n2-a", ECHO_PORT);
        let routes = HashMap::from([(service.to_string(), pod), (pod.to_string(), pod)]);
        let seen = start_waypoint(&lab, "n2-wp", WAYPOINT_ID, routes.clone(), CLIENT_ID).seen;
        // In the second pod, a waypoint that cannot prove the waypoint's identity.
        let impostor = "spiffe://cluster.local/ns/default/sa/impostor";
        let seen_by_impostor = start_waypoint(&lab, "n2-wp2", impostor, routes, CLIENT_ID).seen;

        // The service's traffic goes through the waypoint, which alone n2-a admits; the pod
        // dialled by its own address (the default waypoint takes service traffic only) goes
        // straight to n2-a, whose policy refuses it: nothing reaches n2-a around the waypoint.
        apply_everywhere(
            &lab,
            &config_with_waypoint(&lab, "n2-wp", false, ONLY_THE_WAYPOINT),
        );
        assert!(echoes(&lab, "n1-a", service), "through the waypoint");
        assert!(!echoes(&lab, "n1-a", pod), "around the waypoint");
        let through = Seen {
            authority: service.to_string(),
            client: CLIENT_ID.into(),
        };
        assert_eq!(
            *seen.lock().expect("log"),
            std::slice::from_ref(&through),
            "the waypoint was asked for the service as dialled, by the client's identity"
        );
        // Node 1 reports the connection as Istio does: to the waypoint's pod and identity,
        // for the service.
        let to_waypoint = [
            ("reporter", "source"),
            ("destination_workload", "n2-wp"),
            ("destination_principal", WAYPOINT_ID),
            ("destination_service_name", "server"),
        ];
        assert!(
            eventually(Duration::from_secs(5), || series(
                &scrape(&lab, 0),
                "istio_tcp_connections_opened_total",
                &to_waypoint
            ) == Some(1)),
            "{}",
            scrape(&lab, 0)
        );

        // A pod using the waypoint itself: traffic to its address goes through it too.
        apply_everywhere(
            &lab,
            &config_with_waypoint(&lab, "n2-wp", true, ONLY_THE_WAYPOINT),
        );
        assert!(
            echoes(&lab, "n1-a", pod),
            "to the pod, through the waypoint"
        );
        let direct = Seen {
            authority: pod.to_string(),
            client: CLIENT_ID.into(),
        };
        assert_eq!(*seen.lock().expect("log"), [through, direct]);

        // A waypoint pod that proves another identity than the waypoint's is refused before
        // it sees anything.
        apply_everywhere(&lab, &config_with_waypoint(&lab, "n2-wp2", true, ""));
        assert!(!echoes(&lab, "n1-a", service), "through an impostor");
        assert!(seen_by_impostor.lock().expect("log").is_empty());

        // A waypoint with no pod: connections are refused, not sent around it.
        apply_everywhere(&lab, &config_with_waypoint(&lab, "", true, ""));
        assert!(
            !echoes(&lab, "n1-a", service),
            "the service, without its waypoint"
        );
        assert!(!echoes(&lab, "n1-a", pod), "the pod, without its waypoint");
        assert_eq!(seen.lock().expect("log").len(), 2);
        refused_for_want_of_an_upstream(
            &lab,
            2,
            &format!("waypoint {WAYPOINT} has no pod to send to"),
        );

        // A waypoint known by hostname only (its Gateway names a Service that does not exist
        // yet): refused too, as ztunnel refuses it, though its pod is up.
        let hostname = "waypoint.default.svc.cluster.local";
        let by_hostname = config_with_waypoint(&lab, "n2-wp", true, "").replace(WAYPOINT, hostname);
        apply_everywhere(&lab, &by_hostname);
        assert!(!echoes(&lab, "n1-a", service), "the service, by hostname");
        assert!(!echoes(&lab, "n1-a", pod), "the pod, by hostname");
        assert_eq!(seen.lock().expect("log").len(), 2);
        refused_for_want_of_an_upstream(
            &lab,
            4,
            &format!("waypoint {hostname} has no address yet"),
        );
        // The config dump says so, apart from an address.
        let (status, body) = lab.http_get(0, 15000, "/config_dump").expect("dump");
        assert_eq!(status, 200);
        let dump: serde_json::Value = serde_json::from_str(&body).expect("json");
        let waypoint = dump["services"]
            .as_array()
            .expect("services")
            .iter()
            .find_map(|s| {
                s["waypoint"]
                    .as_object()
                    .filter(|w| w.contains_key("hostname"))
            })
            .unwrap_or_else(|| panic!("no service with an unresolved waypoint: {dump:#}"));
        assert_eq!(waypoint["hostname"], hostname);
        assert!(waypoint["address"].is_null(), "{waypoint:?}");
    }
);

lab_test!(
    a_connect_its_peer_did_not_take_is_sent_again_on_other_tunnels,
    LabOptions::default(),
    |mut lab| {
        lab.add_pod(1, "wp", false, "waypoint")
            .expect("waypoint pod");
        perf::load::serve_echo(lab.listen_in("n2-a", ECHO_PORT).expect("listen")).expect("echo");
        let service = SocketAddr::from((SERVICE_VIP, 80));
        let routes = HashMap::from([(service.to_string(), lab.addr("n2-a", ECHO_PORT))]);
        let waypoint = start_waypoint(&lab, "n2-wp", WAYPOINT_ID, routes, CLIENT_ID);
        apply_everywhere(&lab, &config_with_waypoint(&lab, "n2-wp", false, ""));
        let retries = |lab: &Lab| lab.total(0, "hbone_connect_retries").expect("stats");

        // A peer that sends every tunnel away is not dialled for ever: after four tunnels the
        // client's connection is refused. (First, while no tunnel is pooled that the double
        // would serve.)
        waypoint.going_away.store(4, Ordering::SeqCst);
        assert!(
            !echoes(&lab, "n1-a", service),
            "through four tunnels sent away"
        );
        assert_eq!(waypoint.going_away.load(Ordering::SeqCst), 0);
        assert_eq!(retries(&lab), 3);
        assert!(waypoint.seen.lock().expect("log").is_empty());

        // A peer that drains sends away every tunnel it has, and may take a fresh one as it
        // stops accepting: the client's connection goes through on the third tunnel, taken
        // once, with the bytes it sent while the first two were tried.
        waypoint.going_away.store(2, Ordering::SeqCst);
        assert!(
            echoes(&lab, "n1-a", service),
            "through two tunnels sent away"
        );
        assert_eq!(waypoint.going_away.load(Ordering::SeqCst), 0);
        assert_eq!(retries(&lab), 5);
        assert_eq!(waypoint.seen.lock().expect("log").len(), 1, "taken once");
        assert!(echoes(&lab, "n1-a", service), "and after");
        assert_eq!(retries(&lab), 5);
    }
);
