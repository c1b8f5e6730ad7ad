//! The crypto reference for throughput: one plain TLS 1.3 stream between the same two pods,
//! with the mesh's own rustls provider (ring, the same cipher suites in the same order) and key
//! type (ECDSA P-256), but no HTTP/2, no proxying and no second hop. Blocking sockets: a single
//! stream needs no event loop, and this keeps the reference free of our own machinery.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};

/// The name the baseline server's certificate carries.
pub const SERVER_NAME: &str = "tls-baseline.meshlab";
const CHUNK: usize = 256 * 1024;

/// Writes a self-signed ECDSA P-256 certificate and key for [`SERVER_NAME`] into `dir`;
/// returns (certificate, key) paths. The client trusts the certificate itself as its root.
pub fn write_cert(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let cert = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned()])?;
    let (cert_path, key_path) = (dir.join("tls-baseline.crt"), dir.join("tls-baseline.key"));
    std::fs::write(&cert_path, cert.cert.pem())?;
    std::fs::write(&key_path, cert.signing_key.serialize_pem())?;
    Ok((cert_path, key_path))
}

/// Serves TLS sinks on `port` (0: one the kernel picks, which `ready` gets) until the process
/// ends: read to close_notify, answer with the byte count (8 bytes, little endian), close.
pub fn serve(port: u16, cert: &Path, key: &Path, ready: impl FnOnce(u16)) -> anyhow::Result<()> {
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()?;
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(mesh_io::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(certs, key)?,
    );
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    ready(listener.local_addr()?.port());
    for conn in listener.incoming().flatten() {
        let config = config.clone();
        std::thread::spawn(move || {
            let _ = sink(conn, config);
        });
    }
    Ok(())
}

fn sink(tcp: TcpStream, config: Arc<rustls::ServerConfig>) -> anyhow::Result<()> {
    tcp.set_nodelay(true)?;
    let mut tls = rustls::StreamOwned::new(rustls::ServerConnection::new(config)?, tcp);
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        match tls.read(&mut buf)? {
            0 => break,
            n => total += n as u64,
        }
    }
    tls.write_all(&total.to_le_bytes())?;
    tls.conn.send_close_notify();
    tls.flush()?;
    Ok(())
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TlsBulkResult {
    pub bytes: u64,
    pub seconds: f64,
    pub cipher_suite: String,
    pub client_cpu_s: f64,
}

/// One TLS stream to a baseline sink for `duration`; counts only bytes the sink confirmed.
pub fn bulk(to: SocketAddr, ca: &Path, duration: Duration) -> anyhow::Result<TlsBulkResult> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(mesh_io::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let cpu = mesh_io::procfs::Process::Current
        .cpu_seconds()
        .unwrap_or(0.0);
    let tcp = TcpStream::connect_timeout(&to, Duration::from_secs(10))?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(SERVER_NAME)?;
    let mut tls = rustls::StreamOwned::new(rustls::ClientConnection::new(config, name)?, tcp);
    let chunk = vec![0x5au8; CHUNK];
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < duration {
        tls.write_all(&chunk)?;
        sent += CHUNK as u64;
    }
    tls.conn.send_close_notify();
    tls.flush()?;
    let mut ack = [0u8; 8];
    tls.read_exact(&mut ack)?;
    let seconds = start.elapsed().as_secs_f64();
    let confirmed = u64::from_le_bytes(ack);
    if confirmed != sent {
        anyhow::bail!("TLS sink confirmed {confirmed} bytes of {sent} sent");
    }
    let cipher_suite = tls
        .conn
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_default();
    Ok(TlsBulkResult {
        bytes: confirmed,
        seconds,
        cipher_suite,
        client_cpu_s: mesh_io::procfs::Process::Current
            .cpu_seconds()
            .unwrap_or(0.0)
            - cpu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verified_stream_is_confirmed_byte_for_byte() {
        let dir = std::env::temp_dir().join(format!("tls-baseline-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (cert, key) = write_cert(&dir).expect("cert");
        let (tx, rx) = std::sync::mpsc::channel();
        let (c, k) = (cert.clone(), key.clone());
        std::thread::spawn(move || {
            serve(0, &c, &k, move |port| {
                let _ = tx.send(port);
            })
        });
        let port = rx.recv_timeout(Duration::from_secs(5)).expect("server up");
        let to = SocketAddr::from(([127, 0, 0, 1], port));
        let r = bulk(to, &cert, Duration::from_millis(200)).expect("bulk");
        assert!(r.bytes >= CHUNK as u64);
        // The reference negotiates what the mesh negotiates between two of its own nodes: the
        // mesh's first suite, not ring's default order (which starts with AES-256).
        let mesh_first = format!("{:?}", mesh_io::tls::provider().cipher_suites[0].suite());
        assert_eq!(r.cipher_suite, mesh_first, "{r:?}");
        assert_eq!(r.cipher_suite, "TLS13_AES_128_GCM_SHA256");
        // A client that trusts another root refuses the server.
        let other = dir.join("other");
        std::fs::create_dir_all(&other).expect("dir");
        let (other_root, _) = write_cert(&other).expect("cert");
        assert!(bulk(to, &other_root, Duration::from_millis(50)).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
