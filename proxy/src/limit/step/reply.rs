//! What a client is told: `ratelimit-*` headers when a call goes on, or
//! the refusal: its status, a message naming the limit, and google.rpc
//! details (RetryInfo, QuotaFailure, BadRequest) in
//! `grpc-status-details-bin`.

use std::time::Duration;

use base64::Engine as _;
use http::{HeaderMap, HeaderName, HeaderValue};

use super::{Compiled, Part};
use crate::grpc::status::Code;
use crate::limit::algorithm::{Decision, Params};
use crate::limit::redis::StoreError;
use crate::limit::Rejection;

fn secs_ceil(micros: u64) -> u64 {
    micros.div_ceil(1_000_000)
}

pub(super) fn ratelimit_headers(d: &Decision) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(4);
    h.insert("ratelimit-limit", HeaderValue::from(d.limit));
    h.insert("ratelimit-remaining", HeaderValue::from(d.remaining));
    h.insert(
        "ratelimit-reset",
        HeaderValue::from(secs_ceil(d.reset_micros)),
    );
    h
}

pub(super) fn unavailable(l: &Compiled, error: Option<&StoreError>) -> Rejection {
    let why = error.map_or("Redis did not answer", StoreError::public);
    Rejection {
        code: Code::Unavailable,
        message: format!(
            "rate limit {:?} cannot be checked and fails closed: {why}; retry shortly",
            l.name
        ),
        headers: HeaderMap::new(),
        by: Some((l.name.clone(), 0)),
    }
}

/// A call whose metadata a limit cannot use: INVALID_ARGUMENT naming the
/// header (never echoing its value), with a BadRequest field violation.
pub(super) fn invalid_metadata(header: &HeaderName, why: &str) -> Rejection {
    let message = format!("metadata {:?} {why}", header.as_str());
    let details = tonic_types::ErrorDetails::with_bad_request_violation(header.as_str(), &message);
    Rejection {
        code: Code::InvalidArgument,
        headers: details_header(Code::InvalidArgument, &message, details),
        message,
        by: None,
    }
}

/// A call whose request field a limit cannot use: INVALID_ARGUMENT naming
/// the field (never echoing its value), with a BadRequest field violation.
pub(super) fn invalid_field(path: &str, why: &str) -> Rejection {
    let message = format!("request field {path:?} {why}");
    let details = tonic_types::ErrorDetails::with_bad_request_violation(path, &message);
    Rejection {
        code: Code::InvalidArgument,
        headers: details_header(Code::InvalidArgument, &message, details),
        message,
        by: None,
    }
}

/// A call missing a key part of a limit with `on_missing: reject`.
pub(super) fn missing_part(l: &Compiled, part: &Part) -> Rejection {
    let why = format!("is missing; rate limit {:?} keys on it", l.name);
    match part {
        Part::Header(h, _) => invalid_metadata(h, &why),
        Part::Field(path, _) => invalid_field(path, &why),
        _ => Rejection {
            code: Code::Unauthenticated,
            message: format!(
                "rate limit {:?} keys on the client certificate's identity: connect with a client certificate",
                l.name
            ),
            headers: HeaderMap::new(),
            by: None,
        },
    }
}

/// A call of a limit whose field names are not resolved yet.
pub(super) fn schema_pending(l: &Compiled, why: &str) -> Rejection {
    Rejection {
        code: Code::Unavailable,
        message: format!(
            "rate limit {:?} cannot read request fields yet: {why}; retry shortly",
            l.name
        ),
        headers: HeaderMap::new(),
        by: None,
    }
}

/// A call costing more than the limit can ever admit: refused without a
/// retry delay (no wait would make it pass), with a QuotaFailure.
pub(super) fn beyond_capacity(l: &Compiled, params: &Params, cost: u64) -> Rejection {
    let capacity = params.capacity();
    let message = format!(
        "rate limit {:?} can never admit a call of cost {cost}: at most {capacity} at once ({} per key); split the call",
        l.name, params.rate
    );
    let mut details = tonic_types::ErrorDetails::new();
    details.add_quota_failure_violation(
        format!("limits/{}", l.name),
        format!(
            "{} per key, {:?}, at most {capacity} at once",
            params.rate, params.algorithm
        ),
    );
    let mut headers = details_header(Code::ResourceExhausted, &message, details);
    headers.insert("ratelimit-limit", HeaderValue::from(capacity));
    Rejection {
        code: Code::ResourceExhausted,
        message,
        headers,
        by: Some((l.name.clone(), 0)),
    }
}

/// `grpc-status-details-bin` carrying `details` (a google.rpc.Status).
fn details_header(code: Code, message: &str, details: tonic_types::ErrorDetails) -> HeaderMap {
    use tonic_types::StatusExt as _;
    let status = tonic::Status::with_error_details(code.to_tonic(), message, details);
    let encoded = base64::engine::general_purpose::STANDARD_NO_PAD.encode(status.details());
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&encoded) {
        headers.insert("grpc-status-details-bin", v);
    }
    headers
}

/// A call whose key found no place while the limit says `closed`.
pub(super) fn no_room(l: &Compiled) -> Rejection {
    Rejection {
        code: Code::Unavailable,
        message: format!(
            "rate limit {:?} cannot count this key: tollgate holds as many keys as limiter.max_keys allows; retry shortly",
            l.name
        ),
        headers: HeaderMap::new(),
        by: Some((l.name.clone(), 0)),
    }
}

pub(super) fn rejection(l: &Compiled, d: Decision) -> Rejection {
    let retry = Duration::from_micros(d.retry_after_micros);
    let message = format!(
        "rate limit {:?} exceeded ({} per key); retry after {:.3}s",
        l.name,
        l.rate,
        retry.as_secs_f64()
    );
    let mut details = tonic_types::ErrorDetails::with_retry_info(Some(retry));
    details.add_quota_failure_violation(
        format!("limits/{}", l.name),
        format!(
            "{} per key, {:?}: {} left, not enough for this call",
            l.rate, l.params.algorithm, d.remaining
        ),
    );
    let mut headers = details_header(Code::ResourceExhausted, &message, details);
    headers.extend(ratelimit_headers(&d));
    headers.insert(
        "retry-after",
        HeaderValue::from(secs_ceil(d.retry_after_micros).max(1)),
    );
    Rejection {
        code: Code::ResourceExhausted,
        message,
        headers,
        by: Some((l.name.clone(), d.retry_after_micros)),
    }
}
