//! SOCKS5 (RFC 1928) CONNECT without authentication: the lab's way to send traffic into the mesh
//! without redirect rules. Addresses must be IP literals; the data plane resolves no names.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const VERSION: u8 = 5;
const NO_AUTH: u8 = 0;
const NO_ACCEPTABLE_METHOD: u8 = 0xff;
const CMD_CONNECT: u8 = 1;

/// Reply codes sent back to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Reply {
    Succeeded = 0,
    GeneralFailure = 1,
    NotAllowed = 2,
    HostUnreachable = 4,
    ConnectionRefused = 5,
    CommandNotSupported = 7,
    AddressTypeNotSupported = 8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Socks5Error {
    #[error("not SOCKS version 5 (got {0})")]
    Version(u8),
    #[error("client offers no unauthenticated method")]
    NoAcceptableMethod,
    #[error("command {0} is not CONNECT")]
    Command(u8),
    #[error("address type {0} is not supported (IPv4 and IPv6 literals only)")]
    AddressType(u8),
    #[error("malformed request")]
    Malformed,
}

impl Socks5Error {
    /// The reply to send before closing, if the protocol has reached the request stage.
    pub fn reply(&self) -> Option<Reply> {
        match self {
            Socks5Error::Command(_) => Some(Reply::CommandNotSupported),
            Socks5Error::AddressType(_) => Some(Reply::AddressTypeNotSupported),
            Socks5Error::Malformed => Some(Reply::GeneralFailure),
            Socks5Error::Version(_) | Socks5Error::NoAcceptableMethod => None,
        }
    }
}

/// Parsing outcome for a partially received message.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<T> {
    /// Need at least this many bytes in total.
    Incomplete(usize),
    /// Parsed; consumed this many bytes.
    Done(T, usize),
}

/// The client's greeting: version, methods. Answer with [`greeting_reply`].
pub fn parse_greeting(buf: &[u8]) -> Result<Parsed<()>, Socks5Error> {
    if buf.len() < 2 {
        return Ok(Parsed::Incomplete(2));
    }
    if buf[0] != VERSION {
        return Err(Socks5Error::Version(buf[0]));
    }
    let total = 2 + usize::from(buf[1]);
    if buf.len() < total {
        return Ok(Parsed::Incomplete(total));
    }
    if buf[2..total].contains(&NO_AUTH) {
        Ok(Parsed::Done((), total))
    } else {
        Err(Socks5Error::NoAcceptableMethod)
    }
}

pub fn greeting_reply(accepted: bool) -> [u8; 2] {
    [
        VERSION,
        if accepted {
            NO_AUTH
        } else {
            NO_ACCEPTABLE_METHOD
        },
    ]
}

/// The CONNECT request: returns the destination.
pub fn parse_request(buf: &[u8]) -> Result<Parsed<SocketAddr>, Socks5Error> {
    if buf.len() < 4 {
        return Ok(Parsed::Incomplete(4));
    }
    if buf[0] != VERSION {
        return Err(Socks5Error::Version(buf[0]));
    }
    if buf[2] != 0 {
        return Err(Socks5Error::Malformed);
    }
    let (addr_len, make): (usize, fn(&[u8]) -> IpAddr) = match buf[3] {
        1 => (4, |b| Ipv4Addr::new(b[0], b[1], b[2], b[3]).into()),
        4 => (16, |b| {
            let mut o = [0u8; 16];
            o.copy_from_slice(&b[..16]);
            Ipv6Addr::from(o).into()
        }),
        other => return Err(Socks5Error::AddressType(other)),
    };
    if buf[1] != CMD_CONNECT {
        return Err(Socks5Error::Command(buf[1]));
    }
    let total = 4 + addr_len + 2;
    if buf.len() < total {
        return Ok(Parsed::Incomplete(total));
    }
    let ip = make(&buf[4..4 + addr_len]);
    let port = u16::from_be_bytes([buf[4 + addr_len], buf[5 + addr_len]]);
    if port == 0 {
        return Err(Socks5Error::Malformed);
    }
    Ok(Parsed::Done(SocketAddr::new(ip, port), total))
}

/// A reply with an all-zero bound address (clients ignore it for CONNECT).
pub fn reply(code: Reply) -> [u8; 10] {
    [VERSION, code as u8, 0, 1, 0, 0, 0, 0, 0, 0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_needs_no_auth_offered() {
        assert_eq!(parse_greeting(&[5]), Ok(Parsed::Incomplete(2)));
        assert_eq!(parse_greeting(&[5, 2, 2]), Ok(Parsed::Incomplete(4)));
        assert_eq!(parse_greeting(&[5, 2, 2, 0]), Ok(Parsed::Done((), 4)));
        assert_eq!(
            parse_greeting(&[5, 1, 2]),
            Err(Socks5Error::NoAcceptableMethod)
        );
        assert_eq!(parse_greeting(&[4, 1, 0]), Err(Socks5Error::Version(4)));
    }

    #[test]
    fn connect_requests_for_ip_literals() {
        let v4 = [5, 1, 0, 1, 10, 0, 0, 7, 0x1f, 0x90];
        assert_eq!(
            parse_request(&v4),
            Ok(Parsed::Done("10.0.0.7:8080".parse().expect("addr"), 10))
        );
        assert_eq!(parse_request(&v4[..7]), Ok(Parsed::Incomplete(10)));
        let mut v6 = vec![5, 1, 0, 4];
        v6.extend_from_slice(&"fd00::1".parse::<Ipv6Addr>().expect("ip").octets());
        v6.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(
            parse_request(&v6),
            Ok(Parsed::Done("[fd00::1]:443".parse().expect("addr"), 22))
        );
    }

    #[test]
    fn unsupported_requests_get_the_matching_reply() {
        let bind = [5, 2, 0, 1, 10, 0, 0, 7, 0, 80];
        let err = parse_request(&bind).expect_err("BIND refused");
        assert_eq!(err.reply(), Some(Reply::CommandNotSupported));
        let domain = [5, 1, 0, 3, 3, b'a', b'b', b'c', 0, 80];
        let err = parse_request(&domain).expect_err("names refused");
        assert_eq!(err.reply(), Some(Reply::AddressTypeNotSupported));
        let port0 = [5, 1, 0, 1, 10, 0, 0, 7, 0, 0];
        assert_eq!(parse_request(&port0), Err(Socks5Error::Malformed));
    }
}
