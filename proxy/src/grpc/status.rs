//! gRPC status codes and tollgate's own answers: trailers-only responses
//! (HTTP 200, `grpc-status` in the headers) and trailers that end a stream
//! tollgate had to cut.

use http::header::{HeaderMap, HeaderValue, CONTENT_TYPE};

/// gRPC status codes tollgate produces or counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Code {
    /// 0
    Ok = 0,
    /// 1
    Cancelled = 1,
    /// 2
    Unknown = 2,
    /// 3
    InvalidArgument = 3,
    /// 4
    DeadlineExceeded = 4,
    /// 5
    NotFound = 5,
    /// 6
    AlreadyExists = 6,
    /// 7
    PermissionDenied = 7,
    /// 8
    ResourceExhausted = 8,
    /// 9
    FailedPrecondition = 9,
    /// 10
    Aborted = 10,
    /// 11
    OutOfRange = 11,
    /// 12
    Unimplemented = 12,
    /// 13
    Internal = 13,
    /// 14
    Unavailable = 14,
    /// 15
    DataLoss = 15,
    /// 16
    Unauthenticated = 16,
}

/// Names of the codes, indexed by value, as metrics print them.
pub(crate) const CODE_NAMES: [&str; 17] = [
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

const DIGITS: [&str; 17] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
];

/// Every code, indexed by value.
const ALL: [Code; 17] = [
    Code::Ok,
    Code::Cancelled,
    Code::Unknown,
    Code::InvalidArgument,
    Code::DeadlineExceeded,
    Code::NotFound,
    Code::AlreadyExists,
    Code::PermissionDenied,
    Code::ResourceExhausted,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::OutOfRange,
    Code::Unimplemented,
    Code::Internal,
    Code::Unavailable,
    Code::DataLoss,
    Code::Unauthenticated,
];

// === impl Code ===

impl Code {
    /// The `grpc-status` header value.
    pub(crate) fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(DIGITS[self as usize])
    }

    /// The name metrics print (`RESOURCE_EXHAUSTED`).
    pub(crate) fn name(self) -> &'static str {
        CODE_NAMES[self as usize]
    }

    /// The same code as tonic spells it (for `google.rpc.Status` details).
    pub(crate) fn to_tonic(self) -> tonic::Code {
        tonic::Code::from(self as i32)
    }
}

/// The gRPC status of a stream the peer reset, as the gRPC spec maps
/// HTTP/2 error codes (PROTOCOL-HTTP2.md, "Errors"): REFUSED_STREAM means
/// the call was not processed (UNAVAILABLE, safe to retry); CANCEL is
/// CANCELLED; ENHANCE_YOUR_CALM is RESOURCE_EXHAUSTED; INADEQUATE_SECURITY
/// is PERMISSION_DENIED; every other code is INTERNAL.
pub(crate) fn reset_code(reason: h2::Reason) -> Code {
    match reason {
        h2::Reason::REFUSED_STREAM => Code::Unavailable,
        h2::Reason::CANCEL => Code::Cancelled,
        h2::Reason::ENHANCE_YOUR_CALM => Code::ResourceExhausted,
        h2::Reason::INADEQUATE_SECURITY => Code::PermissionDenied,
        _ => Code::Internal,
    }
}

/// Parses a `grpc-status` value (0–16), or `None`.
/// The code numbered `n`, if there is one.
pub(crate) fn code_of(n: i32) -> Option<Code> {
    ALL.get(usize::try_from(n).ok()?).copied()
}

pub(crate) fn parse_status(v: &HeaderValue) -> Option<Code> {
    let n = match v.as_bytes() {
        [d] if d.is_ascii_digit() => d - b'0',
        [b'1', d] if (b'0'..=b'6').contains(d) => 10 + d - b'0',
        _ => return None,
    };
    ALL.get(usize::from(n)).copied()
}

/// Percent-encodes a `grpc-message` (bytes outside 0x20–0x7E, and `%`).
pub(crate) fn encode_message(msg: &str) -> HeaderValue {
    let mut out = String::with_capacity(msg.len());
    for b in msg.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::from_str(&out).unwrap_or_else(|_| HeaderValue::from_static("error"))
}

/// Headers (or trailers) carrying a status and message.
pub(crate) fn status_headers(code: Code, message: &str) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(3);
    h.insert("grpc-status", code.header_value());
    if !message.is_empty() {
        h.insert("grpc-message", encode_message(message));
    }
    h
}

/// A trailers-only response: HTTP 200, `content-type: application/grpc`,
/// the status in the headers, no body.
pub(crate) fn trailers_only<B: Default>(code: Code, message: &str) -> http::Response<B> {
    let mut r = http::Response::new(B::default());
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.extend(status_headers(code, message));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_parse() {
        for (i, _) in CODE_NAMES.iter().enumerate() {
            let v = HeaderValue::from_str(&i.to_string()).unwrap();
            assert_eq!(parse_status(&v).map(|c| c as usize), Some(i));
            assert_eq!(parse_status(&v).map(Code::name), Some(CODE_NAMES[i]));
        }
        for bad in ["", "17", "x", "01"] {
            assert_eq!(
                parse_status(&HeaderValue::from_str(bad).unwrap()),
                None,
                "{bad}"
            );
        }
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(encode_message("plain text"), "plain text");
        assert_eq!(encode_message("100% sure"), "100%25 sure");
        assert_eq!(encode_message("é\n"), "%C3%A9%0A");
    }

    #[test]
    fn resets_map_as_the_grpc_spec_says() {
        use h2::Reason;
        for (reason, code) in [
            (Reason::NO_ERROR, Code::Internal),
            (Reason::PROTOCOL_ERROR, Code::Internal),
            (Reason::INTERNAL_ERROR, Code::Internal),
            (Reason::FLOW_CONTROL_ERROR, Code::Internal),
            (Reason::SETTINGS_TIMEOUT, Code::Internal),
            (Reason::FRAME_SIZE_ERROR, Code::Internal),
            (Reason::REFUSED_STREAM, Code::Unavailable),
            (Reason::CANCEL, Code::Cancelled),
            (Reason::COMPRESSION_ERROR, Code::Internal),
            (Reason::CONNECT_ERROR, Code::Internal),
            (Reason::ENHANCE_YOUR_CALM, Code::ResourceExhausted),
            (Reason::INADEQUATE_SECURITY, Code::PermissionDenied),
            (Reason::HTTP_1_1_REQUIRED, Code::Internal),
        ] {
            assert_eq!(reset_code(reason), code, "{reason:?}");
        }
    }

    #[test]
    fn trailers_only_responses() {
        let r: http::Response<()> = trailers_only(Code::Unimplemented, "no route");
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "12");
        assert_eq!(r.headers()["grpc-message"], "no route");
        assert_eq!(r.headers()["content-type"], "application/grpc");
    }
}
