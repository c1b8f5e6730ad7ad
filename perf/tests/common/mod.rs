//! What the end-to-end test files share: a lab per test, one test at a time, on both drivers,
//! and a raw HBONE client for requests a well-behaved peer would not send.
#![allow(dead_code)] // each test file uses a different subset

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use perf::lab::{Lab, LabOptions};
use perf::load;

/// Lab tests share the machine's two cores and each starts four processes: one at a time.
pub static SERIAL: Mutex<()> = Mutex::new(());

pub const ECHO: u16 = 9000;

pub fn lab_with(driver: &str, options: LabOptions) -> Lab {
    assert!(
        perf::sys::is_root(),
        "the end-to-end tests create network namespaces and must run as root"
    );
    let _ = mesh_io::sockets::raise_nofile_limit();
    let bins = perf::bins::locate().expect("lab binaries");
    Lab::up(
        bins,
        LabOptions {
            driver: driver.into(),
            ..options
        },
    )
    .expect("lab comes up")
}

pub fn echo_server(lab: &Lab, pod: &str) {
    load::serve_echo(lab.listen_in(pod, ECHO).expect("listen")).expect("echo server");
}

/// An application in `pod` that answers each connection on `port` with the address the
/// connection came from, and closes it.
pub fn address_reporter(lab: &Lab, pod: &str, port: u16) {
    let listener = lab.listen_in(pod, port).expect("listen");
    std::thread::spawn(move || {
        for mut connection in listener.incoming().flatten() {
            if let Ok(peer) = connection.peer_addr() {
                let _ = connection.write_all(peer.ip().to_string().as_bytes());
            }
        }
    });
}

/// The address an [`address_reporter`] at `to` saw a connection from pod `from` come from.
pub fn seen_by_app(lab: &Lab, from: &str, to: SocketAddr) -> String {
    let mut stream = lab.connect_from(from, to).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("answer");
    answer
}

pub fn roundtrip(stream: &mut TcpStream, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(payload)?;
    let mut back = vec![0u8; payload.len()];
    stream.read_exact(&mut back)?;
    Ok(back)
}

/// Runs `body` once per driver, each with a fresh lab.
#[macro_export]
macro_rules! lab_test {
    ($name:ident, $options:expr, $body:expr) => {
        mod $name {
            use super::*;
            fn run(driver: &str) {
                let _serial = $crate::common::SERIAL
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let lab = lab_with(driver, $options);
                let body: fn(Lab) = $body;
                body(lab);
            }
            #[test]
            fn io_uring() {
                run("io-uring");
            }
            #[test]
            fn epoll() {
                run("epoll");
            }
        }
    };
}

pub fn reset_on_close(stream: &TcpStream) {
    socket2::SockRef::from(stream)
        .set_linger(Some(Duration::ZERO))
        .expect("linger");
}

/// Whether a fresh connection from pod `from` to `to` carries an echo.
pub fn echoes(lab: &Lab, from: &str, to: SocketAddr) -> bool {
    match lab.connect_from(from, to) {
        Ok(mut s) => roundtrip(&mut s, b"knock").is_ok_and(|b| b == b"knock"),
        Err(_) => false,
    }
}

/// Polls `check` until it holds or `timeout` passes.
pub fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    check()
}

/// What tcpdump saw on node 1's link to node 2, and what it said when it stopped.
pub struct Capture {
    pub bytes: Vec<u8>,
    /// tcpdump's closing lines ("N packets captured ... M packets dropped by kernel"), for
    /// failure messages: a short capture is then told apart from a short exchange.
    pub summary: String,
}

/// Captures node 1's side of the link between the nodes while `send` runs. It stops once the
/// file holds `at_least` bytes (or after 10 s) and the kernel has handed over the rest: a
/// fixed pause was not enough when the machine was busy.
pub fn capture_between_nodes(lab: &Lab, at_least: usize, send: impl FnOnce()) -> Capture {
    let pcap = lab.dir.join(format!("capture-{}.pcap", std::process::id()));
    let mut tcpdump = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.node_netns(0),
            "tcpdump",
            // Hand each packet over at once: buffered capture delivers in blocks, up to a
            // second late, and would miss a short exchange.
            "--immediate-mode",
            // 16 MiB of ring, so a burst is not dropped while tcpdump waits for a core.
            "-B",
            "16384",
            "-i",
            "peer",
            "-U",
            "-s",
            "0",
            "-w",
        ])
        .arg(&pcap)
        .arg("tcp")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tcpdump (apt-get install tcpdump)");
    // tcpdump says "listening on" once the capture is live.
    let mut stderr = tcpdump.stderr.take().expect("stderr");
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut byte = [0u8; 1];
    while !String::from_utf8_lossy(&seen).contains("listening on") {
        assert!(Instant::now() < deadline, "tcpdump did not start");
        if stderr.read(&mut byte).expect("tcpdump stderr") == 0 {
            panic!("tcpdump exited: {}", String::from_utf8_lossy(&seen));
        }
        seen.push(byte[0]);
    }
    send();
    let captured = || std::fs::metadata(&pcap).map_or(0, |m| m.len() as usize);
    let deadline = Instant::now() + Duration::from_secs(10);
    while captured() < at_least && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    // The closing packets (FINs, the last records) may still be on their way to the file.
    std::thread::sleep(Duration::from_millis(300));
    let _ = std::process::Command::new("kill")
        .args(["-INT", &tcpdump.id().to_string()])
        .status();
    let _ = tcpdump.wait();
    let mut summary = String::new();
    let _ = stderr.read_to_string(&mut summary);
    Capture {
        bytes: std::fs::read(&pcap).expect("capture file"),
        summary: summary.trim().replace('\n', "; "),
    }
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The value of the first series of `family` whose labels include every one of `labels`.
pub fn series(text: &str, family: &str, labels: &[(&str, &str)]) -> Option<u64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Node `node`'s metrics, as Prometheus scrapes them.
pub fn scrape(lab: &Lab, node: usize) -> String {
    let (status, body) = lab
        .http_get(node, 15020, "/stats/prometheus")
        .expect("scrape");
    assert_eq!(status, 200, "{body}");
    body
}

/// An HBONE client speaking to node 2's data plane directly from node 1's namespace, with a
/// certificate from the lab's CA: for requests a well-behaved peer would not send.
pub mod raw_hbone {
    use std::sync::Arc;
    use std::time::SystemTime;

    use super::*;
    use bytes::Bytes;
    use mesh_core::identity::SpiffeId;
    use monoio::io::IntoPollIo;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

    pub struct Answers {
        pub statuses: Vec<u16>,
        pub echoed: Vec<u8>,
    }

    /// The certificate the raw client presents.
    pub enum Client {
        /// A valid mesh certificate for this identity.
        Mesh(&'static str),
        /// A mesh-CA certificate for this identity that expired an hour ago.
        Expired(&'static str),
        /// No certificate at all.
        Anonymous,
    }

    const HOUR: Duration = Duration::from_secs(3600);

    /// Sends each authority as a CONNECT on one connection, as the mesh identity
    /// `default/default`; after a 200, echoes `b"after"`.
    pub fn connect_all(lab: &Lab, authorities: &[&str]) -> Answers {
        connect_as(
            lab,
            Client::Mesh("spiffe://cluster.local/ns/default/sa/default"),
            authorities,
        )
        .expect("HBONE exchange")
    }

    /// Accepts any server: these tests are about what the server does with the client.
    #[derive(Debug)]
    struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

    impl ServerCertVerifier for AnyServer {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    /// A certificate for `id` from the lab's mesh CA, valid from `from` until `until`, with
    /// the mesh's trust bundle.
    pub fn mesh_identity_between(
        lab: &Lab,
        id: &str,
        from: SystemTime,
        until: SystemTime,
    ) -> (mesh_snapshot::schema::Identity, mesh_io::tls::TrustBundle) {
        let ca = ctrl_agent::ca::LocalCa::load(
            &lab.mesh_ca_dir().join("ca-cert.pem"),
            &lab.mesh_ca_dir().join("ca-key.pem"),
        )
        .expect("lab CA");
        let spiffe: SpiffeId = id.parse().expect("id");
        let cert = ca.issue_between(&spiffe, from, until).expect("issue");
        let identity = mesh_snapshot::schema::Identity {
            spiffe_id: spiffe.to_string(),
            cert_chain: cert.chain,
            private_key: cert.key_pkcs8,
            ..Default::default()
        };
        let trust = mesh_io::tls::TrustBundle::new(&[ca.root_der().to_vec()]).expect("trust");
        (identity, trust)
    }

    /// A certificate for `id` from the lab's mesh CA, valid from a minute ago for an hour.
    pub fn mesh_identity(
        lab: &Lab,
        id: &str,
    ) -> (mesh_snapshot::schema::Identity, mesh_io::tls::TrustBundle) {
        let now = SystemTime::now();
        mesh_identity_between(lab, id, now - Duration::from_secs(60), now + HOUR)
    }

    pub fn client_config(lab: &Lab, client: Client) -> Arc<rustls::ClientConfig> {
        let now = SystemTime::now();
        let (identity, trust) = match client {
            Client::Mesh(id) => mesh_identity(lab, id),
            Client::Expired(id) => mesh_identity_between(lab, id, now - 2 * HOUR, now - HOUR),
            Client::Anonymous => {
                let provider = mesh_io::tls::provider();
                let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .expect("tls 1.3")
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
                    .with_no_client_auth();
                config.alpn_protocols = vec![b"h2".to_vec()];
                return Arc::new(config);
            }
        };
        let server: SpiffeId = "spiffe://cluster.local/ns/default/sa/default"
            .parse()
            .expect("id");
        mesh_io::tls::client_config(&identity, &trust, server).expect("client config")
    }

    /// Like [`connect_all`] with a chosen client certificate; `Err` if the tunnel is refused.
    /// The client's end of a TLS connection to node 2's data plane.
    pub type Tls = tokio_rustls::client::TlsStream<monoio::net::tcp::stream_poll::TcpStreamPoll>;

    /// Connects from node 1's namespace to 15008 on pod n2-a as `client`, completes TLS, and
    /// runs `exchange` on the connection (on a runtime of its own).
    pub fn over_tls<T, F, Fut>(lab: &Lab, client: Client, exchange: F) -> Result<T, String>
    where
        F: FnOnce(Tls) -> Fut,
        Fut: std::future::Future<Output = Result<T, String>>,
    {
        let tls = client_config(lab, client);
        let tunnel = SocketAddr::from((lab.pod("n2-a").ip, 15008));
        let tcp = lab
            .connect_in(&lab.node_netns(0), tunnel)
            .expect("reach 15008");
        tcp.set_nonblocking(true).expect("nonblocking");
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let io = monoio::net::TcpStream::from_std(tcp)
                .expect("monoio")
                .into_poll_io()
                .expect("poll io");
            let tls_stream = tokio_rustls::TlsConnector::from(tls)
                .connect(mesh_io::tls::placeholder_server_name(tunnel), io)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            exchange(tls_stream).await
        })
    }

    pub fn connect_as(lab: &Lab, client: Client, authorities: &[&str]) -> Result<Answers, String> {
        let authorities: Vec<String> = authorities.iter().map(|a| a.to_string()).collect();
        over_tls(lab, client, |tls_stream| async move {
            let (sender, connection) = mesh_io::h2glue::client_builder()
                .handshake::<_, Bytes>(tls_stream)
                .await
                .map_err(|e| format!("h2: {e}"))?;
            monoio::spawn(connection);
            let mut statuses = Vec::new();
            let mut echoed = Vec::new();
            for authority in authorities {
                let request = http::Request::builder()
                    .method(http::Method::CONNECT)
                    .uri(authority.as_str())
                    .body(())
                    .expect("request");
                let mut ready = sender
                    .clone()
                    .ready()
                    .await
                    .map_err(|e| format!("h2: {e}"))?;
                let (response, mut send) = ready
                    .send_request(request, false)
                    .map_err(|e| format!("h2: {e}"))?;
                let response = response.await.map_err(|e| format!("h2: {e}"))?;
                statuses.push(response.status().as_u16());
                if response.status() == 200 {
                    send.send_data(Bytes::from_static(b"after"), true)
                        .map_err(|e| format!("h2: {e}"))?;
                    let mut body = response.into_body();
                    while let Some(chunk) = body.data().await {
                        echoed.extend_from_slice(&chunk.map_err(|e| format!("h2: {e}"))?);
                    }
                }
            }
            Ok(Answers { statuses, echoed })
        })
    }
}

pub fn run_in(lab: &Lab, pod: &str, program: &str, args: &[&str]) -> String {
    let mut child = lab
        .spawn_in(pod, std::path::Path::new(program), args)
        .expect("program starts");
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = stdout.read_to_string(&mut out);
    }
    let status = child.wait().expect("program ends");
    assert!(status.success(), "{program} {args:?} failed: {out}");
    out
}

/// A client that completes TLS with node 2's data plane and then sends nothing: how long the
/// data plane kept the connection open, or an error if it still had after `patience`.
pub fn silent_after_tls(lab: &Lab, patience: Duration) -> Result<Duration, String> {
    use raw_hbone::*;
    let client = Client::Mesh("spiffe://cluster.local/ns/default/sa/default");
    over_tls(lab, client, |mut tls_stream| async move {
        let started = std::time::Instant::now();
        // The server's SETTINGS arrive first; read until it closes.
        match monoio::time::timeout(patience, read_until_closed(&mut tls_stream)).await {
            Ok(()) => Ok(started.elapsed()),
            Err(_) => Err(format!("still open after {patience:?}")),
        }
    })
}

/// Reads (and drops) what `stream` brings until its peer closes it or it fails.
pub async fn read_until_closed(stream: &mut (impl tokio::io::AsyncRead + Unpin)) {
    let mut buf = [0u8; 4096];
    loop {
        let mut read = tokio::io::ReadBuf::new(&mut buf);
        let polled =
            std::future::poll_fn(|cx| std::pin::Pin::new(&mut *stream).poll_read(cx, &mut read))
                .await;
        if polled.is_err() || read.filled().is_empty() {
            return;
        }
    }
}

/// The JSON result a benchmark saved into `dir` (its only `.json`), with its path.
pub fn saved_result(dir: &std::path::Path) -> (std::path::PathBuf, serde_json::Value) {
    let json = std::fs::read_dir(dir)
        .expect("results dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .expect("a JSON result");
    let value = serde_json::from_slice(&std::fs::read(&json).expect("read")).expect("JSON");
    (json, value)
}
