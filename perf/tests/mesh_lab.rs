//! End-to-end tests in the lab topology: real namespaces, veths, nftables, real ctrl-agent and
//! dataplane processes, real TLS and HTTP/2. They need root (CI runs as root) and fail, never
//! skip, without it. Every scenario runs once on io_uring and once on the epoll fallback.

#[macro_use]
mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use perf::lab::{Lab, LabOptions, SERVICE_VIP};
use perf::load;

lab_test!(
    gigabyte_each_way_arrives_intact,
    LabOptions::default(),
    |lab| {
        echo_server(&lab, "n2-a");
        const TOTAL: u64 = 1 << 30;
        let stream = lab
            .connect_from("n1-a", lab.addr("n2-a", ECHO))
            .expect("connect");
        let mut reader = stream.try_clone().expect("clone");
        let mut writer = stream;
        let sender = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            let (mut seed, mut crc, mut sent) = (7u64, 0u32, 0u64);
            while sent < TOTAL {
                seed = load::pattern(seed, &mut buf);
                crc = crc32c::crc32c_append(crc, &buf);
                writer.write_all(&buf).expect("send");
                sent += buf.len() as u64;
            }
            writer.shutdown(Shutdown::Write).expect("half-close");
            crc
        });
        let mut buf = vec![0u8; 1 << 20];
        let (mut crc, mut received) = (0u32, 0u64);
        loop {
            let n = reader.read(&mut buf).expect("receive");
            if n == 0 {
                break;
            }
            crc = crc32c::crc32c_append(crc, &buf[..n]);
            received += n as u64;
        }
        let sent_crc = sender.join().expect("sender");
        assert_eq!(received, TOTAL, "every byte came back");
        assert_eq!(crc, sent_crc, "and unchanged");
        // It really went through the tunnel, both ways.
        assert!(lab.total(0, "bytes_sent").expect("stats") >= TOTAL);
        assert!(lab.total(0, "bytes_received").expect("stats") >= TOTAL);
        assert!(lab.total(1, "hbone_streams_accepted").expect("stats") >= 1);
    }
);

lab_test!(
    half_close_reaches_the_server_and_its_reply_still_arrives,
    LabOptions::default(),
    |lab| {
        // n2-a through the tunnel; n2-b (outside the mesh) through node 1's passthrough.
        for (server_pod, passthrough) in [("n2-a", 0), ("n2-b", 1)] {
            let listener = lab.listen_in(server_pod, ECHO).expect("listen");
            let server = std::thread::spawn(move || {
                let (mut conn, _) = listener.accept().expect("accept");
                let mut got = Vec::new();
                conn.read_to_end(&mut got)
                    .expect("read to the client's FIN");
                // The client is half-closed; our direction is still open.
                conn.write_all(format!("got {} bytes", got.len()).as_bytes())
                    .expect("reply after FIN");
                conn.shutdown(Shutdown::Write).expect("close");
            });
            let mut client = lab
                .connect_from("n1-a", lab.addr(server_pod, ECHO))
                .expect("connect");
            client.write_all(&[1u8; 100_000]).expect("send");
            client.shutdown(Shutdown::Write).expect("half-close");
            client
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let mut reply = String::new();
            client.read_to_string(&mut reply).expect("reply then EOF");
            assert_eq!(reply, "got 100000 bytes", "to {server_pod}");
            server.join().expect("server");
            assert_eq!(
                lab.total(0, "passthrough_connections").expect("stats"),
                passthrough
            );
        }
    }
);

lab_test!(
    resets_are_carried_across_in_both_directions,
    LabOptions::default(),
    |lab| {
        let listener = lab.listen_in("n2-a", ECHO).expect("listen");
        let server = std::thread::spawn(move || {
            // First connection: the server resets it.
            let (mut conn, _) = listener.accept().expect("accept");
            let mut b = [0u8; 1];
            conn.read_exact(&mut b).expect("first byte");
            reset_on_close(&conn);
            drop(conn);
            // Second connection: the client resets it; the server must see a reset, not EOF.
            let (mut conn, _) = listener.accept().expect("accept");
            conn.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            conn.read_exact(&mut b).expect("first byte");
            conn.write_all(b"x").expect("ack");
            let mut rest = Vec::new();
            conn.read_to_end(&mut rest)
        });
        let mut client = lab
            .connect_from("n1-a", lab.addr("n2-a", ECHO))
            .expect("connect");
        client.write_all(b"x").expect("send");
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = [0u8; 16];
        let err = client.read(&mut buf).expect_err("a reset, not a clean EOF");
        assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");

        let mut client = lab
            .connect_from("n1-a", lab.addr("n2-a", ECHO))
            .expect("connect");
        client.write_all(b"x").expect("send");
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        client.read_exact(&mut buf[..1]).expect("ack");
        reset_on_close(&client);
        drop(client);
        let server_saw = server.join().expect("server");
        assert_eq!(
            server_saw
                .expect_err("the server sees the client's reset")
                .kind(),
            ErrorKind::ConnectionReset
        );
    }
);

lab_test!(
    a_server_with_the_wrong_identity_is_refused,
    LabOptions::default(),
    |lab| {
        echo_server(&lab, "n2-a");
        // Node 2 now runs n2-a under another service account than node 1 expects.
        let impostor = lab.default_config().replace(
            "{uid: n2-a, name: n2-a, namespace: default, serviceAccount: default",
            "{uid: n2-a, name: n2-a, namespace: default, serviceAccount: impostor",
        );
        assert_ne!(impostor, lab.default_config());
        lab.apply_to(1, &impostor).expect("node 2 adopts");

        let mut client = lab
            .connect_from("n1-a", lab.addr("n2-a", ECHO))
            .expect("the local capture accepts");
        let result = roundtrip(&mut client, b"should not arrive");
        assert!(
            result.is_err(),
            "data crossed to a server with the wrong identity"
        );
        assert!(lab.total(0, "hbone_dial_failures").expect("stats") >= 1);
        assert!(lab.total(0, "tls_handshake_failures").expect("stats") >= 1);
        assert_eq!(lab.total(1, "hbone_streams_accepted").expect("stats"), 0);
    }
);

lab_test!(
    a_client_certificate_from_another_ca_is_refused,
    LabOptions {
        rogue_client_ca: true,
        ..LabOptions::default()
    },
    |lab| {
        echo_server(&lab, "n2-a");
        let mut client = lab
            .connect_from("n1-a", lab.addr("n2-a", ECHO))
            .expect("the local capture accepts");
        assert!(roundtrip(&mut client, b"nope").is_err());
        assert!(lab.total(1, "tls_handshake_failures").expect("stats") >= 1);
        assert_eq!(lab.total(1, "hbone_streams_accepted").expect("stats"), 0);
        let log = std::fs::read_to_string(lab.dir.join("dataplane-node-2.log")).expect("log");
        assert!(
            log.contains("inbound TLS handshake refused"),
            "the refusal is logged with its reason"
        );
    }
);

lab_test!(
    thousand_concurrent_connections_share_pooled_tls_connections,
    LabOptions::default(),
    |lab| {
        echo_server(&lab, "n2-a");
        let to = lab.addr("n2-a", ECHO);
        let held = load::hold(1000, || {
            lab.connect_from("n1-a", to).map_err(std::io::Error::other)
        })
        .expect("1000 connections through the mesh");
        assert_eq!(held.len(), 1000);
        let stats = lab.stats(0).expect("stats");
        let mut dialed_total = 0;
        for w in stats["workers"].as_array().expect("workers") {
            let streams = w["hbone_streams_opened"].as_u64().expect("streams");
            let dialed = w["hbone_connections_dialed"].as_u64().expect("dialed");
            // Each worker opens exactly enough connections for its share at 100 streams each.
            assert_eq!(dialed, streams.div_ceil(100), "worker stats {w}");
            dialed_total += dialed;
        }
        assert!(
            (10..=11).contains(&dialed_total),
            "{dialed_total} TLS connections for 1000 streams"
        );
        assert_eq!(
            lab.total(1, "hbone_connections_accepted").expect("stats"),
            dialed_total
        );
        assert_eq!(lab.total(1, "hbone_streams_accepted").expect("stats"), 1000);
    }
);

lab_test!(
    a_workload_added_while_traffic_runs_becomes_reachable,
    LabOptions::default(),
    |mut lab| {
        echo_server(&lab, "n2-a");
        // Traffic keeps flowing on an existing connection for the whole change.
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let mut live = lab
            .connect_from("n1-a", lab.addr("n2-a", ECHO))
            .expect("connect");
        let background = {
            let (stop, rounds) = (stop.clone(), rounds.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    assert_eq!(
                        roundtrip(&mut live, b"ping").expect("live connection"),
                        b"ping"
                    );
                    rounds.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        // A new pod: listed in both nodes' config, then attached through CNI on node 2.
        let pod = lab.add_pod(1, "c", true, "newcomer").expect("new pod");
        echo_server(&lab, "n2-c");
        let before = lab.total(1, "hbone_streams_accepted").expect("stats");
        let mut client = lab
            .connect_from("n1-a", SocketAddr::from((pod.ip, ECHO)))
            .expect("connect to the newcomer");
        assert_eq!(
            roundtrip(&mut client, b"hello newcomer").expect("echo"),
            b"hello newcomer"
        );
        assert!(
            lab.total(1, "hbone_streams_accepted").expect("stats") > before,
            "via HBONE"
        );
        stop.store(true, Ordering::Relaxed);
        background.join().expect("the live connection never failed");
        assert!(rounds.load(Ordering::Relaxed) > 0);
    }
);

lab_test!(
    killing_the_agents_keeps_old_and_new_connections_working,
    LabOptions::default(),
    |mut lab| {
        echo_server(&lab, "n2-a");
        let mut existing = lab
            .connect_from("n1-a", lab.addr("n2-a", ECHO))
            .expect("connect");
        assert_eq!(
            roundtrip(&mut existing, b"before").expect("echo"),
            b"before"
        );
        lab.kill_agent(0).expect("kill");
        lab.kill_agent(1).expect("kill");
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            roundtrip(&mut existing, b"after").expect("existing"),
            b"after"
        );
        let mut fresh = lab
            .connect_from("n1-a", lab.addr("n2-a", ECHO))
            .expect("connect");
        assert_eq!(
            roundtrip(&mut fresh, b"new").expect("new connection"),
            b"new"
        );
        assert_eq!(
            lab.http_get(0, 15021, "/healthz/ready").expect("ready").0,
            200
        );
    }
);

lab_test!(
    service_vip_socks5_and_passthrough_reach_their_servers,
    LabOptions::default(),
    |lab| {
        echo_server(&lab, "n2-a");
        echo_server(&lab, "n2-b");
        // The VIP maps port 80 to the echo port 7000 of n2-a; serve that too.
        load::serve_echo(lab.listen_in("n2-a", perf::lab::ECHO_PORT).expect("listen"))
            .expect("echo");
        let mut via_vip = lab
            .connect_from("n1-a", SocketAddr::from((SERVICE_VIP, 80)))
            .expect("connect to the VIP");
        assert_eq!(roundtrip(&mut via_vip, b"vip").expect("echo"), b"vip");

        // SOCKS5 on the pod's localhost, no redirect involved.
        let mut socks = lab
            .connect_from("n1-a", SocketAddr::from(([127, 0, 0, 1], 15080)))
            .expect("socks5 listener");
        socks.write_all(&[5, 1, 0]).expect("greeting");
        let mut reply = [0u8; 2];
        socks.read_exact(&mut reply).expect("method");
        assert_eq!(reply, [5, 0]);
        let target = lab.pod("n2-a").ip.octets();
        let port = ECHO.to_be_bytes();
        socks
            .write_all(&[
                5, 1, 0, 1, target[0], target[1], target[2], target[3], port[0], port[1],
            ])
            .expect("connect request");
        let mut reply = [0u8; 10];
        socks.read_exact(&mut reply).expect("reply");
        assert_eq!(reply[1], 0, "SOCKS5 CONNECT succeeded");
        assert_eq!(roundtrip(&mut socks, b"socks").expect("echo"), b"socks");

        // n2-b is not in the mesh: plain TCP, counted as passthrough.
        let mut plain = lab
            .connect_from("n1-a", lab.addr("n2-b", ECHO))
            .expect("connect");
        assert_eq!(roundtrip(&mut plain, b"plain").expect("echo"), b"plain");
        assert_eq!(lab.total(0, "passthrough_connections").expect("stats"), 1);
        assert_eq!(lab.total(0, "hbone_streams_opened").expect("stats"), 2);
    }
);

lab_test!(
    applications_see_their_clients_own_addresses,
    LabOptions::default(),
    |lab| {
        const WHO: u16 = 9100;
        address_reporter(&lab, "n2-a", WHO);
        let seen_by_app = |from: &str| seen_by_app(&lab, from, lab.addr("n2-a", WHO));
        // A meshed client on the other node: HBONE to node 2's data plane, which connects to
        // the application from the client's address. The application's reply must find its
        // way back to the data plane for the answer to arrive at all.
        assert_eq!(seen_by_app("n1-a"), lab.pod("n1-a").ip.to_string());
        assert_eq!(lab.total(1, "hbone_streams_accepted").expect("stats"), 1);
        // Clients outside the mesh, from the other node and from this one: plaintext taken
        // in on 15006, passed on from the client's address as well.
        assert_eq!(seen_by_app("n1-b"), lab.pod("n1-b").ip.to_string());
        assert_eq!(seen_by_app("n2-b"), lab.pod("n2-b").ip.to_string());
        assert_eq!(
            lab.total(1, "inbound_plaintext_accepted").expect("stats"),
            2
        );
    }
);

lab_test!(
    a_client_port_the_data_plane_would_reuse_toward_the_app_costs_no_stall,
    LabOptions::default(),
    |lab| {
        echo_server(&lab, "n2-a");
        // Taken in on 15006, a client's connection stays in the pod's connection tracking
        // as client:port -> app. The data plane's own connection to the app, from the
        // client's address, must not pick that port: its SYN would join the client's
        // connection and never be answered.
        let echo = lab.addr("n2-a", ECHO);
        let mut held = lab.connect_from_port("n2-b", echo, 40000).expect("held");
        assert_eq!(roundtrip(&mut held, b"held").expect("echo"), b"held");
        // Now the data plane has two ports to connect from in the pod, and connect() tries
        // the even one first: every new connection from that client meets the clash.
        run_in(
            &lab,
            "n2-a",
            "sysctl",
            &[
                "-qw",
                "net.ipv4.ip_local_port_range=40000 40001",
                "net.ipv4.tcp_tw_reuse=1",
            ],
        );
        for i in 0..3 {
            // The port the last connection used waits in TIME_WAIT, reusable a second after
            // its last segment (`tcp_tw_reuse`): let it be, so that the retry can take it.
            std::thread::sleep(Duration::from_millis(1200));
            let started = std::time::Instant::now();
            let mut again = lab.connect_from("n2-b", echo).expect("connect");
            let answer = roundtrip(&mut again, b"again");
            assert_eq!(
                answer.as_deref().ok(),
                Some(&b"again"[..]),
                "connection {i}: {answer:?} after {:?}; node 2's data plane:\n{}",
                started.elapsed(),
                lab.process_log("dataplane", 1)
            );
        }
        assert_eq!(roundtrip(&mut held, b"still").expect("echo"), b"still");
        assert!(lab.total(1, "app_connect_retries").expect("stats") >= 3);
    }
);

lab_test!(
    the_bytes_between_nodes_are_tls_not_the_payload,
    LabOptions::default(),
    |lab| {
        echo_server(&lab, "n2-a");
        echo_server(&lab, "n2-b");
        let marker = b"MESH-PLAINTEXT-MARKER-0123456789";
        let payload: Vec<u8> = marker.iter().copied().cycle().take(256 * 1024).collect();
        let exchange = |from: &str, to: &str| {
            let mut s = lab.connect_from(from, lab.addr(to, ECHO)).expect("connect");
            assert_eq!(roundtrip(&mut s, &payload).expect("echo"), payload);
        };
        // Control: without the mesh the marker is on the wire, so the capture can see it.
        // Each exchange crosses the link twice, so the capture holds at least that much.
        let plain = capture_between_nodes(&lab, 2 * payload.len(), || exchange("n1-b", "n2-b"));
        assert!(
            contains(&plain.bytes, marker),
            "the capture works and sees plaintext (tcpdump: {})",
            plain.summary
        );

        let meshed = capture_between_nodes(&lab, 2 * payload.len(), || exchange("n1-a", "n2-a"));
        assert!(
            meshed.bytes.len() > 2 * payload.len(),
            "the exchange was captured: {} bytes (tcpdump: {})",
            meshed.bytes.len(),
            meshed.summary
        );
        let meshed = meshed.bytes;
        assert!(
            !contains(&meshed, marker),
            "payload crossed between nodes in the clear"
        );
        // TLS 1.3 application-data records: content type 23, legacy version 3.3.
        assert!(
            contains(&meshed, &[0x17, 0x03, 0x03]),
            "TLS records on the wire"
        );
        assert!(
            contains(&meshed, &15008u16.to_be_bytes()),
            "to the HBONE port"
        );
    }
);

lab_test!(
    malformed_hbone_requests_get_their_status_and_the_worker_goes_on,
    LabOptions::default(),
    |lab| {
        echo_server(&lab, "n2-a");
        let pod = lab.pod("n2-a").ip;
        let good = format!("{pod}:{ECHO}");
        let closed_port = format!("{pod}:9");
        let answers = raw_hbone::connect_all(
            &lab,
            &[
                &format!("{pod}"),          // no port
                &format!("{pod}:0"),        // port zero
                "reviews.default.svc:9080", // a name, not a workload address
                "198.18.1.2:9000",          // a workload that is not on this node
                &format!("{pod}:15006"),    // the data plane's own ports: they would loop
                &format!("{pod}:15001"),
                &format!("{pod}:15008"),
                &closed_port, // nothing listening
                &good,        // and the same connection still works
            ],
        );
        assert_eq!(
            answers.statuses,
            [400, 400, 400, 400, 400, 400, 400, 503, 200]
        );
        assert_eq!(answers.echoed, b"after");
        assert_eq!(lab.total(1, "hbone_bad_requests").expect("stats"), 7);
        assert_eq!(lab.total(1, "self_calls_refused").expect("stats"), 3);
        assert_eq!(lab.total(1, "hbone_no_upstream").expect("stats"), 1);
        assert_eq!(
            lab.total(1, "hbone_streams_accepted").expect("stats"),
            9,
            "no stream came back to the data plane"
        );

        // Plaintext from outside the mesh to the pod's 15006 is reset (while connecting, or at
        // the first read), not proxied back to the data plane.
        let reset = |e: &std::io::Error| e.kind() == ErrorKind::ConnectionReset;
        let refused = match lab.connect_from("n1-b", lab.addr("n2-a", 15006)) {
            Err(error) => error
                .chain()
                .any(|c| c.downcast_ref::<std::io::Error>().is_some_and(reset)),
            Ok(mut plain) => {
                let _ = plain.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = plain.write_all(b"loop?");
                let mut buf = [0u8; 16];
                match plain.read(&mut buf) {
                    Ok(n) => n == 0,
                    Err(error) => reset(&error),
                }
            }
        };
        assert!(refused, "refused at once, without an answer");
        assert_eq!(lab.total(1, "self_calls_refused").expect("stats"), 4);
        assert_eq!(
            lab.total(1, "inbound_plaintext_accepted").expect("stats"),
            1,
            "the refused connection did not come back to the data plane"
        );
    }
);

lab_test!(
    a_peer_that_sends_nothing_after_tls_is_closed_and_tunnels_are_kept_alive,
    LabOptions {
        dataplane_args: vec!["--connect-timeout".into(), "1s".into()],
        ..LabOptions::default()
    },
    |lab| {
        // Well past the 1 s timeout, and short of the minute a test would otherwise hang.
        let open_for = silent_after_tls(&lab, Duration::from_secs(20)).expect("closed");
        assert!(
            open_for >= Duration::from_millis(500),
            "closed after {open_for:?}"
        );

        // The kernel probes an idle inbound tunnel, so a vanished peer node frees it.
        echo_server(&lab, "n2-a");
        let mut client = lab
            .connect_from("n1-a", lab.addr("n2-a", ECHO))
            .expect("connect");
        assert_eq!(roundtrip(&mut client, b"alive").expect("echo"), b"alive");
        // ss shows the keepalive timer while nothing is in flight (else the retransmit one).
        let tunnels = || {
            run_in(
                &lab,
                "n2-a",
                "ss",
                &["-tnoH", "state", "established", "sport", "=", ":15008"],
            )
        };
        let kept_alive =
            |s: &str| s.lines().count() >= 1 && s.lines().all(|l| l.contains("keepalive"));
        assert!(
            eventually(Duration::from_secs(5), || kept_alive(&tunnels())),
            "inbound tunnels without keepalive timers: {}",
            tunnels()
        );
    }
);

lab_test!(
    idle_pooled_connections_are_released,
    LabOptions {
        dataplane_args: vec!["--pool-idle-timeout".into(), "1s".into()],
        ..LabOptions::default()
    },
    |lab| {
        echo_server(&lab, "n2-a");
        let mut client = lab
            .connect_from("n1-a", lab.addr("n2-a", ECHO))
            .expect("connect");
        assert_eq!(roundtrip(&mut client, b"once").expect("echo"), b"once");
        assert_eq!(lab.total(0, "pool_connections").expect("stats"), 1);
        drop(client);
        assert!(
            eventually(Duration::from_secs(5), || {
                lab.total(0, "pool_connections").expect("stats") == 0
            }),
            "the idle tunnel was not released"
        );
        // The next connection dials a fresh tunnel.
        let mut again = lab
            .connect_from("n1-a", lab.addr("n2-a", ECHO))
            .expect("connect");
        assert_eq!(roundtrip(&mut again, b"again").expect("echo"), b"again");
        assert_eq!(lab.total(0, "hbone_connections_dialed").expect("stats"), 2);
    }
);

lab_test!(
    with_one_stream_per_tunnel_and_no_idle_time_every_connection_gets_a_fresh_tunnel,
    LabOptions {
        dataplane_args: vec![
            "--pool-max-streams".into(),
            "1".into(),
            "--pool-idle-timeout".into(),
            "0s".into(),
        ],
        ..LabOptions::default()
    },
    |lab| {
        echo_server(&lab, "n2-a");
        // Two at once: the second cannot share the first one's tunnel.
        let mut first = lab
            .connect_from("n1-a", lab.addr("n2-a", ECHO))
            .expect("connect");
        let mut second = lab
            .connect_from("n1-a", lab.addr("n2-a", ECHO))
            .expect("connect");
        assert_eq!(roundtrip(&mut first, b"one").expect("echo"), b"one");
        assert_eq!(roundtrip(&mut second, b"two").expect("echo"), b"two");
        assert_eq!(lab.total(0, "pool_connections").expect("stats"), 2);
        let no_tunnel_left = || {
            eventually(Duration::from_secs(5), || {
                lab.total(0, "pool_connections").expect("stats") == 0
            })
        };
        drop((first, second));
        assert!(no_tunnel_left(), "tunnels outlived their streams");
        // One after the other: each closes with its stream, so none is reused.
        for round in 0..3u8 {
            let mut client = lab
                .connect_from("n1-a", lab.addr("n2-a", ECHO))
                .expect("connect");
            assert_eq!(roundtrip(&mut client, &[round]).expect("echo"), [round]);
            drop(client);
            assert!(
                no_tunnel_left(),
                "the tunnel of connection {round} was kept"
            );
        }
        assert_eq!(lab.total(0, "hbone_connections_dialed").expect("stats"), 5);
        assert_eq!(lab.total(0, "hbone_dial_failures").expect("stats"), 0);
    }
);

lab_test!(
    a_tunnel_whose_peer_stops_answering_pings_is_dropped,
    LabOptions {
        dataplane_args: vec![
            "--ping-interval".into(),
            "300ms".into(),
            "--ping-timeout".into(),
            "300ms".into(),
        ],
        ..LabOptions::default()
    },
    |lab| {
        echo_server(&lab, "n2-a");
        let mut client = lab
            .connect_from("n1-a", lab.addr("n2-a", ECHO))
            .expect("connect");
        assert_eq!(roundtrip(&mut client, b"ping").expect("echo"), b"ping");
        // Freeze node 2's data plane: the tunnel stays open at the TCP level but goes silent.
        lab.signal_dataplane(1, "STOP").expect("SIGSTOP");
        let dropped = eventually(Duration::from_secs(5), || {
            lab.total(0, "pool_connections").expect("stats") == 0
        });
        lab.signal_dataplane(1, "CONT").expect("SIGCONT");
        assert!(
            dropped,
            "node 1 kept a tunnel whose peer did not answer PINGs"
        );
        let log = std::fs::read_to_string(lab.dir.join("dataplane-node-1.log")).expect("log");
        assert!(log.contains("HBONE connection lost"), "the drop is logged");
        let mut fresh = lab
            .connect_from("n1-a", lab.addr("n2-a", ECHO))
            .expect("connect");
        assert_eq!(roundtrip(&mut fresh, b"back").expect("echo"), b"back");
    }
);

lab_test!(
    refused_snapshots_leave_the_last_good_one_serving,
    LabOptions::default(),
    |mut lab| {
        echo_server(&lab, "n2-a");
        // Take the region over from node 1's agent, as a buggy or hostile publisher would.
        lab.kill_agent(0).expect("kill agent");
        let mut publisher = mesh_snapshot::Publisher::create(
            lab.snapshot_region(0),
            mesh_snapshot::region::PublishOptions::default(),
        )
        .expect("publisher");
        let refused = |lab: &Lab| {
            lab.stats(0).expect("stats")["snapshot"]["refused"]
                .as_u64()
                .expect("refused counter")
        };
        // Bytes that are not a snapshot at all (checksum fine, protobuf not).
        publisher.publish(&[0xff; 64]).expect("publish garbage");
        assert!(eventually(Duration::from_secs(5), || refused(&lab) == 1));
        // A well-formed snapshot that contradicts itself: two workloads on one address.
        let mut snapshot = mesh_snapshot::Snapshot {
            node: "node-1".into(),
            ..Default::default()
        };
        for uid in ["x", "y"] {
            snapshot.workloads.push(mesh_snapshot::schema::Workload {
                uid: uid.into(),
                name: uid.into(),
                namespace: "default".into(),
                service_account: "default".into(),
                trust_domain: "cluster.local".into(),
                ips: vec![vec![198, 18, 9, 9]],
                node: "node-1".into(),
                ..Default::default()
            });
        }
        publisher
            .publish(&mesh_snapshot::encode(&snapshot))
            .expect("publish contradiction");
        assert!(eventually(Duration::from_secs(5), || refused(&lab) == 2));
        // A corrupted slot (checksum mismatch).
        publisher.corrupt_active_slot_for_test();
        assert!(eventually(Duration::from_secs(5), || refused(&lab) == 3));

        // Node 1 still serves the agent's last good snapshot.
        let mut client = lab
            .connect_from("n1-a", lab.addr("n2-a", ECHO))
            .expect("connect");
        assert_eq!(roundtrip(&mut client, b"still").expect("echo"), b"still");
        assert_eq!(
            lab.http_get(0, 15021, "/healthz/ready").expect("ready").0,
            200
        );
        let dump = lab.http_get(0, 15000, "/config_dump").expect("dump").1;
        assert!(
            dump.contains("\"n2-a\""),
            "the last good workloads are still there"
        );
        // Identities are listed with their validity, and nothing else: no key material.
        let dump: serde_json::Value = serde_json::from_str(&dump).expect("json");
        let identities = dump["identities"].as_array().expect("identities");
        assert!(!identities.is_empty());
        for id in identities {
            let mut fields: Vec<&str> = id
                .as_object()
                .expect("object")
                .keys()
                .map(|k| k.as_str())
                .collect();
            fields.sort_unstable();
            assert_eq!(
                fields,
                [
                    "chain_length",
                    "identity",
                    "not_after_unix",
                    "not_before_unix"
                ]
            );
        }
    }
);

lab_test!(
    a_refused_delta_keeps_the_last_good_index_until_the_publisher_fixes_it,
    LabOptions::default(),
    |mut lab| {
        echo_server(&lab, "n2-a");
        // What node 1's agent published, replayed from its region; then take the region over.
        let mut reader = mesh_snapshot::Subscriber::new(lab.snapshot_region(0));
        let mut state = match reader.read().expect("agent's region") {
            mesh_snapshot::ReadOutcome::New { base, deltas, .. } => {
                mesh_snapshot::delta::replay(None, base.as_ref(), &deltas)
                    .expect("decodes")
                    .expect("a state")
            }
            other => panic!("{other:?}"),
        };
        lab.kill_agent(0).expect("kill agent");
        let mut publisher = mesh_snapshot::Publisher::create(
            lab.snapshot_region(0),
            mesh_snapshot::region::PublishOptions::default(),
        )
        .expect("publisher");
        let epoch = publisher
            .publish(&mesh_snapshot::encode(&state.snapshot()))
            .expect("publish")
            .epoch;
        let snapshot_stats = |lab: &Lab| lab.stats(0).expect("stats")["snapshot"].clone();
        let at = |lab: &Lab, generation: u64, refused: u64| {
            let s = snapshot_stats(lab);
            s["epoch"].as_u64() == Some(epoch)
                && s["generation"].as_u64() == Some(generation)
                && s["refused"].as_u64() == Some(refused)
        };
        assert!(eventually(Duration::from_secs(5), || at(&lab, 1, 0)));
        let append = |publisher: &mut mesh_snapshot::Publisher, bytes: &[u8]| {
            assert!(matches!(
                publisher.append(bytes).expect("append"),
                mesh_snapshot::Appended::Published(_)
            ));
        };

        // A new pod on n2-a's address: the delta is refused, the index stays.
        let n2a_ip = lab.addr("n2-a", ECHO).ip();
        let mut late = state.workloads.values().next().expect("a workload").clone();
        late.uid = "late-pod".into();
        late.name = "late-pod".into();
        late.ips = vec![mesh_core::index::ip_to_bytes(n2a_ip)];
        let clash = mesh_snapshot::Delta {
            workloads: vec![late.clone()],
            ..Default::default()
        };
        append(&mut publisher, &mesh_snapshot::delta::encode(&clash));
        assert!(eventually(Duration::from_secs(5), || at(&lab, 1, 1)));
        let mut client = lab
            .connect_from("n1-a", lab.addr("n2-a", ECHO))
            .expect("connect");
        assert_eq!(roundtrip(&mut client, b"kept").expect("echo"), b"kept");

        // The publisher moves the pod to a free address: the data plane rereads from the base
        // and adopts the fixed state, although the log still holds the refused record.
        late.ips = vec![vec![198, 18, 7, 7]];
        let fix = mesh_snapshot::Delta {
            workloads: vec![late.clone()],
            ..Default::default()
        };
        append(&mut publisher, &mesh_snapshot::delta::encode(&fix));
        state.apply(&fix);
        assert!(eventually(Duration::from_secs(5), || at(&lab, 3, 1)));
        let dump = lab.http_get(0, 15000, "/config_dump").expect("dump").1;
        assert!(
            dump.contains("late-pod") && dump.contains("198.18.7.7"),
            "{dump}"
        );

        // A record that is not a delta at all: refused, and the index stays at 3 ...
        append(&mut publisher, &[0xff; 16]);
        assert!(eventually(Duration::from_secs(5), || {
            snapshot_stats(&lab)["refused"].as_u64() == Some(2)
        }));
        assert_eq!(snapshot_stats(&lab)["generation"].as_u64(), Some(3));
        // ... until a compaction writes a good base at the same generation number.
        publisher
            .compact(&mesh_snapshot::encode(&state.snapshot()))
            .expect("compact");
        assert!(eventually(Duration::from_secs(5), || at(&lab, 4, 2)));
        let mut client = lab
            .connect_from("n1-a", lab.addr("n2-a", ECHO))
            .expect("connect");
        assert_eq!(roundtrip(&mut client, b"healed").expect("echo"), b"healed");
    }
);
