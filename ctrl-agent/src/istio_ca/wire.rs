//! What goes on the wire to Istio's CA, without any I/O: the protobuf messages of
//! `istio.v1.auth.IstioCertificateService` (istio/api `security/v1alpha1/ca.proto`), gRPC's
//! length-prefixed message framing, and gRPC status codes.

use std::collections::BTreeMap;

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;

/// The one method we call.
pub const CREATE_CERTIFICATE_PATH: &str =
    "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// gRPC's default limit for a received message; a certificate chain is a few KiB.
pub const MAX_RESPONSE_MESSAGE: usize = 4 * 1024 * 1024;

/// The metadata key with which a node agent asks for another identity's certificate (ztunnel
/// sends it in shared mode; istiod then checks that the caller may act for that identity).
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

#[derive(Clone, PartialEq, Message)]
pub struct IstioCertificateRequest {
    /// PEM-encoded PKCS#10 request.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested lifetime in seconds; the CA may shorten it.
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<Struct>,
}

#[derive(Clone, PartialEq, Message)]
pub struct IstioCertificateResponse {
    /// PEM strings: leaf first, then intermediates, roots last (the last entry may hold several).
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

/// `google.protobuf.Struct`.
#[derive(Clone, PartialEq, Message)]
pub struct Struct {
    #[prost(btree_map = "string, message", tag = "1")]
    pub fields: BTreeMap<String, Value>,
}

/// `google.protobuf.Value`, reduced to the string member of its `kind` oneof: the only kind we
/// send. On the wire a set oneof member is just its field, so this encodes identically; other
/// kinds decode as unknown fields and read back as `None`.
#[derive(Clone, PartialEq, Message)]
pub struct Value {
    #[prost(string, optional, tag = "3")]
    pub string_value: Option<String>,
}

impl IstioCertificateRequest {
    /// A request for `identity`'s certificate, sent on that identity's behalf.
    pub fn impersonating(csr: String, validity_seconds: i64, identity: &str) -> Self {
        let fields = BTreeMap::from([(
            IMPERSONATED_IDENTITY.to_owned(),
            Value {
                string_value: Some(identity.to_owned()),
            },
        )]);
        IstioCertificateRequest {
            csr,
            validity_duration: validity_seconds,
            metadata: Some(Struct { fields }),
        }
    }

    /// What the fake CA of the tests reads, as istiod does.
    #[cfg(test)]
    pub fn impersonated_identity(&self) -> Option<&str> {
        self.metadata
            .as_ref()?
            .fields
            .get(IMPERSONATED_IDENTITY)?
            .string_value
            .as_deref()
    }
}

/// One gRPC message: a zero compression flag, the big-endian length, the protobuf bytes.
pub fn frame(message: &impl Message) -> Bytes {
    let payload = message.encode_to_vec();
    let mut buf = BytesMut::with_capacity(5 + payload.len());
    buf.put_u8(0);
    // A request is a CSR of a few hundred bytes: far below u32::MAX.
    buf.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    buf.put_slice(&payload);
    buf.freeze()
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("no response message")]
    Empty,
    #[error("message cut short: {have} of {want} bytes")]
    Truncated { have: usize, want: usize },
    #[error("message is compressed, but no compression was offered")]
    Compressed,
    #[error("unknown compression flag {0}")]
    Flag(u8),
    #[error("message of {0} bytes is over the {MAX_RESPONSE_MESSAGE}-byte limit")]
    TooLarge(usize),
    #[error("{0} bytes after the single message of a unary response")]
    Trailing(usize),
}

/// The protobuf bytes of the single message of a unary response body.
pub fn unframe_unary(body: &[u8]) -> Result<&[u8], FrameError> {
    if body.is_empty() {
        return Err(FrameError::Empty);
    }
    let Some((header, rest)) = body.split_first_chunk::<5>() else {
        return Err(FrameError::Truncated {
            have: body.len(),
            want: 5,
        });
    };
    match header[0] {
        0 => {}
        1 => return Err(FrameError::Compressed),
        other => return Err(FrameError::Flag(other)),
    }
    let [_, len @ ..] = *header;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_RESPONSE_MESSAGE {
        return Err(FrameError::TooLarge(len));
    }
    if rest.len() < len {
        return Err(FrameError::Truncated {
            have: rest.len(),
            want: len,
        });
    }
    if rest.len() > len {
        return Err(FrameError::Trailing(rest.len() - len));
    }
    Ok(rest)
}

/// A gRPC status code with its canonical name, for error messages an operator can search for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Code(pub u32);

impl Code {
    pub const OK: Code = Code(0);
    pub const INVALID_ARGUMENT: Code = Code(3);
    pub const PERMISSION_DENIED: Code = Code(7);
    pub const UNIMPLEMENTED: Code = Code(12);
    pub const INTERNAL: Code = Code(13);
    pub const UNAVAILABLE: Code = Code(14);
    pub const UNAUTHENTICATED: Code = Code(16);

    pub fn name(self) -> &'static str {
        const NAMES: [&str; 17] = [
            "OK",
            "CANCELLED",
            "UNKNOWN",
            "INVALID_ARGUMENT",
            "DEADLINE_EXCEEDED",
            "NOT_FOUND",
            "ALREADY_EXISTS",
            "PERMISSION_DENIED",
            "RESOURCE_EXHAUSTED",
            "FAILED_PRECONDITION",
            "ABORTED",
            "OUT_OF_RANGE",
            "UNIMPLEMENTED",
            "INTERNAL",
            "UNAVAILABLE",
            "DATA_LOSS",
            "UNAUTHENTICATED",
        ];
        NAMES
            .get(self.0 as usize)
            .copied()
            .unwrap_or("UNKNOWN_CODE")
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

/// The `grpc-status` and `grpc-message` of a header block; `None` without `grpc-status`.
pub fn status(headers: &http::HeaderMap) -> Option<Result<(Code, String), String>> {
    let raw = headers.get("grpc-status")?;
    let code = match raw.to_str().ok().and_then(|s| s.parse::<u32>().ok()) {
        Some(code) => Code(code),
        None => return Some(Err(format!("grpc-status {raw:?} is not a number"))),
    };
    let message = headers
        .get("grpc-message")
        .map(|m| percent_decode(m.as_bytes()))
        .unwrap_or_default();
    Some(Ok((code, message)))
}

/// gRPC percent-encodes `grpc-message`; a malformed escape is kept as it came.
pub fn percent_decode(raw: &[u8]) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let escaped = match raw.get(i..i + 3) {
            Some([b'%', h, l]) => hex(*h).zip(hex(*l)).map(|(h, l)| h << 4 | l),
            _ => None,
        };
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(raw[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Encodes `message` for a `grpc-message` header (the fake CA in the tests sends it).
#[cfg(test)]
pub fn percent_encode(message: &str) -> String {
    message
        .bytes()
        .map(|b| {
            if (0x20..0x7f).contains(&b) && b != b'%' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The `grpc-timeout` header value for `timeout`: at most eight digits, so milliseconds, or
/// seconds for very long timeouts.
pub fn timeout_header(timeout: std::time::Duration) -> String {
    let millis = timeout.as_millis();
    if millis < 100_000_000 {
        format!("{millis}m")
    } else {
        format!("{}S", timeout.as_secs().min(99_999_999))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_encodes_the_fields_of_ca_proto() {
        let request =
            IstioCertificateRequest::impersonating("CSR".into(), 3600, "spiffe://td/ns/a/sa/b");
        let bytes = request.encode_to_vec();
        // csr = 1 (length-delimited), validity_duration = 3 (varint), metadata = 4.
        assert_eq!(&bytes[..5], &[0x0a, 3, b'C', b'S', b'R']);
        assert_eq!(&bytes[5..8], &[0x18, 0x90, 0x1c]);
        assert_eq!(bytes[8], 0x22);
        let back = IstioCertificateRequest::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(back.impersonated_identity(), Some("spiffe://td/ns/a/sa/b"));
        assert_eq!(back, request);
    }

    #[test]
    fn a_value_of_another_kind_reads_as_none() {
        // google.protobuf.Value{bool_value: true} is field 4, varint 1.
        let value = Value::decode(&[0x20, 0x01][..]).expect("decodes");
        assert_eq!(value.string_value, None);
    }

    #[test]
    fn framing_round_trips_and_refuses_what_a_unary_response_cannot_be() {
        let response = IstioCertificateResponse {
            cert_chain: vec!["leaf".into(), "root".into()],
        };
        let framed = frame(&response);
        assert_eq!(framed[0], 0);
        assert_eq!(
            u32::from_be_bytes([framed[1], framed[2], framed[3], framed[4]]) as usize,
            framed.len() - 5
        );
        let payload = unframe_unary(&framed).expect("one message");
        assert_eq!(
            IstioCertificateResponse::decode(payload).expect("decodes"),
            response
        );

        let mut compressed = framed.to_vec();
        compressed[0] = 1;
        let mut trailing = framed.to_vec();
        trailing.push(0);
        let cases: [(&[u8], FrameError); 6] = [
            (&[], FrameError::Empty),
            (&[0, 0, 0], FrameError::Truncated { have: 3, want: 5 }),
            (
                &[0, 0, 0, 0, 9, 1],
                FrameError::Truncated { have: 1, want: 9 },
            ),
            (&compressed, FrameError::Compressed),
            (&[7, 0, 0, 0, 0], FrameError::Flag(7)),
            (&trailing, FrameError::Trailing(1)),
        ];
        for (body, expected) in cases {
            assert_eq!(unframe_unary(body), Err(expected), "{body:?}");
        }
        assert_eq!(
            unframe_unary(&[0, 0xff, 0xff, 0xff, 0xff]),
            Err(FrameError::TooLarge(u32::MAX as usize))
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoders() {
        // A small deterministic generator: the decoders must refuse, not panic, on anything.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 64) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|i| (state >> (i % 8 * 8)) as u8 ^ i as u8)
                .collect();
            if let Ok(payload) = unframe_unary(&bytes) {
                let _ = IstioCertificateResponse::decode(payload);
            }
            let _ = percent_decode(&bytes);
        }
    }

    #[test]
    fn status_headers_are_read_and_messages_decoded() {
        let mut headers = http::HeaderMap::new();
        assert!(status(&headers).is_none());
        headers.insert("grpc-status", http::HeaderValue::from_static("16"));
        headers.insert(
            "grpc-message",
            http::HeaderValue::from_static("token%20expired%3A%20100%25"),
        );
        let (code, message) = status(&headers).expect("present").expect("valid");
        assert_eq!(code, Code::UNAUTHENTICATED);
        assert_eq!(message, "token expired: 100%");
        assert_eq!(code.to_string(), "UNAUTHENTICATED (16)");
        assert_eq!(Code(99).name(), "UNKNOWN_CODE");
        headers.insert("grpc-status", http::HeaderValue::from_static("x"));
        assert!(status(&headers).expect("present").is_err());
    }

    #[test]
    fn percent_coding_round_trips_and_keeps_bad_escapes() {
        let message = "naïve: 50% \"off\"\n";
        assert_eq!(percent_decode(percent_encode(message).as_bytes()), message);
        assert_eq!(percent_decode(b"%zz%4"), "%zz%4");
    }

    #[test]
    fn timeouts_fit_in_eight_digits() {
        use std::time::Duration;
        assert_eq!(timeout_header(Duration::from_secs(10)), "10000m");
        assert_eq!(timeout_header(Duration::from_secs(10_000_000)), "10000000S");
    }
}
