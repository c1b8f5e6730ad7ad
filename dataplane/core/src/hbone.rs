//! The HBONE request contract: one HTTP/2 `CONNECT` stream per proxied TCP connection.
//!
//! Pure functions in both directions, in the manner of pingora's `raw_connect`: the client builds
//! the request head here, the server validates it here, and only the I/O layer touches h2.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};

/// Header carrying the original client address (RFC 7239), as ztunnel sends it.
pub const FORWARDED: &str = "forwarded";
/// W3C trace context, passed through untouched when present.
pub const TRACEPARENT: &str = "traceparent";
pub const BAGGAGE: &str = "baggage";

/// HTTP/2 settings; both ends advertise the same values. The connection window, frame size and
/// stream limit are ztunnel's; the stream window is a quarter of its 4 MiB.
pub mod settings {
    /// How many of one stream's bytes may be in flight. All streams of a pooled connection
    /// share its TCP and TLS queues, so a bulk stream's in-flight bytes are what a request on
    /// another stream waits behind: 4 MiB held a 1 KiB round trip beside a bulk stream at
    /// 8.3 ms (p50) on the lab, 1 MiB at 2.6 ms, the bulk stream moving x0.87-x0.96 as fast
    /// (bench-results/README.md, "A request beside a bulk stream"). 1 MiB still allows
    /// 8 Gbit/s per stream at 1 ms round trip. Receive-side only: peers with other values
    /// interoperate.
    pub const STREAM_WINDOW: u32 = 1024 * 1024;
    pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
    pub const MAX_FRAME: u32 = 1024 * 1024;
    /// Streams per pooled connection before the pool opens another connection.
    pub const MAX_STREAMS: u32 = 100;
}

/// What the server learned from a valid CONNECT head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The workload address the tunnel should reach.
    pub target: SocketAddr,
    /// The original client, from `forwarded: for=...`, when the peer sent a well-formed one.
    pub forwarded_for: Option<SocketAddr>,
    pub traceparent: Option<HeaderValue>,
}

/// Why a CONNECT head was refused. Every variant maps to 400: the peer sent something we
/// will not act on; the message goes to the log, not onto the wire.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("method {0} is not CONNECT")]
    Method(Method),
    #[error("CONNECT without an :authority")]
    MissingAuthority,
    #[error("authority {0:?} is not ip:port or [ipv6]:port")]
    MalformedAuthority(String),
    #[error("authority {0:?} has port 0")]
    ZeroPort(String),
    #[error("authority {0:?} names a host; only workload addresses are accepted here")]
    HostAuthority(String),
}

impl RequestError {
    pub fn status(&self) -> StatusCode {
        StatusCode::BAD_REQUEST
    }
}

/// Validates a CONNECT request head as an HBONE server must before opening anything.
pub fn validate_connect<B>(req: &Request<B>) -> Result<ConnectRequest, RequestError> {
    if req.method() != Method::CONNECT {
        return Err(RequestError::Method(req.method().clone()));
    }
    let authority = req
        .uri()
        .authority()
        .ok_or(RequestError::MissingAuthority)?;
    let target = parse_authority(authority.as_str())?;
    Ok(ConnectRequest {
        target,
        forwarded_for: forwarded_for(req.headers()),
        traceparent: req.headers().get(TRACEPARENT).cloned(),
    })
}

/// `ip:port` or `[v6]:port`, port not zero, no zone id, no user info.
pub fn parse_authority(authority: &str) -> Result<SocketAddr, RequestError> {
    let malformed = || RequestError::MalformedAuthority(authority.to_owned());
    match authority.parse::<SocketAddr>() {
        Ok(SocketAddr::V6(v6)) if v6.scope_id() != 0 || v6.flowinfo() != 0 => Err(malformed()),
        Ok(addr) if addr.port() == 0 => Err(RequestError::ZeroPort(authority.to_owned())),
        Ok(addr) => Ok(addr),
        Err(_) => {
            let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
            let looks_like_name = !host.is_empty()
                && host.parse::<IpAddr>().is_err()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b))
                && host.bytes().any(|b| b.is_ascii_alphabetic());
            if looks_like_name {
                Err(RequestError::HostAuthority(authority.to_owned()))
            } else {
                Err(malformed())
            }
        }
    }
}

/// The first `for=` of the first `forwarded` header, if it is an address with a port.
fn forwarded_for(headers: &HeaderMap) -> Option<SocketAddr> {
    let value = headers.get(FORWARDED)?.to_str().ok()?;
    let first = value.split(',').next()?;
    first.split(';').find_map(|pair| {
        let (key, val) = pair.trim().split_once('=')?;
        if !key.eq_ignore_ascii_case("for") {
            return None;
        }
        val.trim_matches('"').parse::<SocketAddr>().ok()
    })
}

/// The CONNECT head an HBONE client sends for one proxied connection.
pub fn connect_request(
    target: SocketAddr,
    client: SocketAddr,
    traceparent: Option<&HeaderValue>,
) -> Request<()> {
    let mut req = Request::new(());
    *req.method_mut() = Method::CONNECT;
    // A SocketAddr always renders as a valid authority ("1.2.3.4:80" or "[::1]:80").
    *req.uri_mut() = http::Uri::builder()
        .authority(target.to_string())
        .build()
        .unwrap_or_default();
    let forwarded = format!("for=\"{client}\"");
    if let Ok(mut v) = HeaderValue::from_str(&forwarded) {
        // Never indexed: the client's port makes every value new, so indexing it would put
        // an entry in both ends' HPACK tables for each stream (churning out the reusable
        // ones) and keep the tables at their size limit for the life of each tunnel.
        v.set_sensitive(true);
        req.headers_mut().insert(FORWARDED, v);
    }
    if let Some(tp) = traceparent {
        req.headers_mut().insert(TRACEPARENT, tp.clone());
    }
    req
}

/// How the client side reads the server's answer to a CONNECT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectOutcome {
    Established,
    BadRequest,
    Denied,
    NoUpstream,
    Other(u16),
}

impl From<StatusCode> for ConnectOutcome {
    fn from(status: StatusCode) -> Self {
        match status.as_u16() {
            200..=299 => ConnectOutcome::Established,
            400 => ConnectOutcome::BadRequest,
            401 | 403 => ConnectOutcome::Denied,
            503 => ConnectOutcome::NoUpstream,
            other => ConnectOutcome::Other(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, uri: &str) -> Request<()> {
        Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .expect("test request builds")
    }

    #[test]
    fn built_request_validates_to_the_same_target_and_client() {
        let target: SocketAddr = "10.1.2.3:8080".parse().expect("addr");
        let client: SocketAddr = "10.9.9.9:41000".parse().expect("addr");
        let req = connect_request(target, client, None);
        let got = validate_connect(&req).expect("valid");
        assert_eq!(got.target, target);
        assert_eq!(got.forwarded_for, Some(client));
        assert_eq!(req.headers()[FORWARDED], "for=\"10.9.9.9:41000\"");
        // Sent never-indexed: HPACK tables at both ends stay free of one-off client ports.
        assert!(req.headers()[FORWARDED].is_sensitive());

        let v6: SocketAddr = "[fd00::7]:443".parse().expect("addr");
        let req = connect_request(v6, client, None);
        assert_eq!(
            req.uri().authority().map(|a| a.as_str()),
            Some("[fd00::7]:443")
        );
        assert_eq!(validate_connect(&req).expect("valid").target, v6);
    }

    #[test]
    fn bad_heads_are_refused_with_400() {
        let cases: Vec<(Request<()>, RequestError)> = vec![
            (
                request(Method::GET, "http://10.0.0.1:80/"),
                RequestError::Method(Method::GET),
            ),
            (
                request(Method::POST, "10.0.0.1:80"),
                RequestError::Method(Method::POST),
            ),
            (
                request(Method::CONNECT, "/"),
                RequestError::MissingAuthority,
            ),
            (
                request(Method::CONNECT, "10.0.0.1"),
                RequestError::MalformedAuthority("10.0.0.1".into()),
            ),
            (
                request(Method::CONNECT, "10.0.0.1:0"),
                RequestError::ZeroPort("10.0.0.1:0".into()),
            ),
            (
                request(Method::CONNECT, "10.0.0.1:99999"),
                RequestError::MalformedAuthority("10.0.0.1:99999".into()),
            ),
            (
                request(Method::CONNECT, "reviews.default.svc:9080"),
                RequestError::HostAuthority("reviews.default.svc:9080".into()),
            ),
            (
                request(Method::CONNECT, "user@10.0.0.1:80"),
                RequestError::MalformedAuthority("user@10.0.0.1:80".into()),
            ),
        ];
        for (req, want) in cases {
            let got = validate_connect(&req);
            assert_eq!(got.as_ref().err(), Some(&want), "request {req:?}");
            assert_eq!(want.status(), StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn unbracketed_ipv6_is_not_an_authority() {
        // The http crate refuses it before validation; parse_authority must too.
        assert_eq!(
            parse_authority("fd00::1:80"),
            Err(RequestError::MalformedAuthority("fd00::1:80".into()))
        );
    }

    #[test]
    fn forwarded_header_is_optional_and_a_malformed_one_is_ignored() {
        let mut req = request(Method::CONNECT, "10.0.0.1:80");
        assert_eq!(validate_connect(&req).expect("valid").forwarded_for, None);
        for (value, want) in [
            ("for=\"[fd00::9]:1234\"", Some("[fd00::9]:1234")),
            (
                "proto=http;for=10.0.0.2:5, for=1.1.1.1:1",
                Some("10.0.0.2:5"),
            ),
            ("for=unknown", None),
            ("for=\"10.0.0.2\"", None),
        ] {
            req.headers_mut()
                .insert(FORWARDED, HeaderValue::from_static(value));
            let want = want.map(|w| w.parse::<SocketAddr>().expect("addr"));
            assert_eq!(
                validate_connect(&req).expect("valid").forwarded_for,
                want,
                "{value}"
            );
        }
    }

    #[test]
    fn response_status_classes() {
        assert_eq!(
            ConnectOutcome::from(StatusCode::OK),
            ConnectOutcome::Established
        );
        assert_eq!(
            ConnectOutcome::from(StatusCode::UNAUTHORIZED),
            ConnectOutcome::Denied
        );
        assert_eq!(
            ConnectOutcome::from(StatusCode::SERVICE_UNAVAILABLE),
            ConnectOutcome::NoUpstream
        );
        assert_eq!(
            ConnectOutcome::from(StatusCode::IM_A_TEAPOT),
            ConnectOutcome::Other(418)
        );
    }
}
