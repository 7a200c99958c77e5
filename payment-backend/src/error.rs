//! The service's error type and the one place that turns it into a gRPC
//! status with google.rpc details.
//!
//! Handlers and the store return [`Error`]; [`Error::into_status`] is the only
//! mapping to `tonic::Status`, and it lists every variant so that a new
//! variant forces a decision about its code and details.

use std::collections::HashMap;
use std::time::Duration;

use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt};

/// The `ErrorInfo.domain` of every error this service returns.
pub const ERROR_DOMAIN: &str = "payments.tollgate.dev";

/// How long a caller should wait before retrying an ABORTED call (a
/// concurrent change conflicted): short, the conflict is usually gone.
pub const RETRY_ABORTED_AFTER: Duration = Duration::from_millis(100);
/// How long a caller should wait before retrying an UNAVAILABLE call (the
/// database is down or saturated).
pub const RETRY_UNAVAILABLE_AFTER: Duration = Duration::from_secs(1);

/// One bad field of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// Path of the field, e.g. `amount.currency`.
    pub field: String,
    /// What is wrong with it and what is expected.
    pub description: String,
}

/// Everything a payment RPC can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; each violation names its field.
    #[error("invalid request: {}", describe_violations(.0))]
    InvalidArgument(Vec<FieldViolation>),

    /// A referenced resource does not exist.
    #[error("{kind} {id:?} not found")]
    NotFound {
        /// `account`, `payment`, …
        kind: &'static str,
        /// The id the caller gave.
        id: String,
    },

    /// The resource is not in a state that allows the operation (capture of a
    /// canceled payment, refund above the captured amount, …).
    #[error("{description}")]
    FailedPrecondition {
        /// Machine-readable reason, e.g. `PAYMENT_NOT_CAPTURABLE`.
        reason: &'static str,
        /// The resource, e.g. `payments/pay_…`.
        subject: String,
        /// What is wrong and what the caller can do.
        description: String,
    },

    /// The idempotency key was used before with a different request.
    #[error("idempotency key {} was already used for a different {method} request; use a new key for a new request", shown(.key))]
    IdempotencyKeyReused {
        /// The reused key.
        key: String,
        /// The RPC the key was first used with.
        method: String,
    },

    /// A concurrent change got in the way; retrying with the same
    /// idempotency key is safe.
    #[error("{0}; retry with the same idempotency key")]
    Aborted(String),

    /// The database cannot be reached.
    #[error("database unavailable: {0}; retry later")]
    Unavailable(String),

    /// The call was still running when the server's drain timeout ended.
    #[error(
        "the server is shutting down and cut this call off; retry with the same idempotency key"
    )]
    ShuttingDown,

    /// The idempotency key was taken when the call started: its stored
    /// outcome is the answer (the store replays it; never sent as such).
    #[error("another call with the same idempotency key finished first; retry with the same key")]
    KeyTaken,

    /// A bug or an impossible state; details are logged, not returned.
    #[error("internal error: {0}")]
    Internal(String),

    /// A final outcome stored under an idempotency key: the status it was
    /// answered with the first time, returned as is (and marked as a replay
    /// when it is one).
    #[error("{}", .status.message())]
    Recorded {
        /// The status as first answered.
        status: tonic::Status,
        /// Whether this answer repeats an earlier call's.
        replayed: bool,
    },
}

fn describe_violations(v: &[FieldViolation]) -> String {
    v.iter()
        .map(|f| format!("{}: {}", f.field, f.description))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Longest part of a caller's value that an error message repeats.
pub const MAX_SHOWN_CHARS: usize = 64;
/// Response metadata set when a stored response (or error) is replayed.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// Most field violations one error lists; the rest are counted.
pub const MAX_VIOLATIONS: usize = 10;

/// A caller's value as an error message shows it: quoted, with escapes,
/// and cut to [`MAX_SHOWN_CHARS`] characters with an ellipsis, so an error
/// about a huge value stays small enough for every client's metadata limit.
pub fn shown(value: &str) -> String {
    let mut chars = value.chars();
    let head: String = chars.by_ref().take(MAX_SHOWN_CHARS).collect();
    if chars.next().is_some() {
        format!("{head:?}… ({} characters)", value.chars().count())
    } else {
        format!("{head:?}")
    }
}

/// Collects field violations while a request is checked, so the caller
/// learns of every problem at once (up to [`MAX_VIOLATIONS`] of them).
#[derive(Debug, Default)]
pub struct Violations {
    list: Vec<FieldViolation>,
    more: usize,
}

// === impl Violations ===

impl Violations {
    /// Records that `field` is wrong.
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        if self.list.len() < MAX_VIOLATIONS {
            self.list.push(FieldViolation {
                field: field.into(),
                description: description.into(),
            });
        } else {
            self.more += 1;
        }
    }

    /// Records the error of `check`, if any.
    pub fn check(&mut self, field: &str, check: Result<(), String>) {
        if let Err(description) = check {
            self.add(field, description);
        }
    }

    /// `Ok` when nothing was recorded, otherwise INVALID_ARGUMENT.
    pub fn finish(mut self) -> Result<(), Error> {
        if self.list.is_empty() {
            return Ok(());
        }
        if self.more > 0 {
            self.list.push(FieldViolation {
                field: "*".into(),
                description: format!(
                    "{} more problems not listed; fix the ones above and send again",
                    self.more
                ),
            });
        }
        Err(Error::InvalidArgument(self.list))
    }
}

// === impl Error ===

impl Error {
    /// A single-field INVALID_ARGUMENT.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Error::InvalidArgument(vec![FieldViolation {
            field: field.into(),
            description: description.into(),
        }])
    }

    /// The gRPC code this error is returned with.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound { .. } => Code::NotFound,
            Error::FailedPrecondition { .. } => Code::FailedPrecondition,
            Error::IdempotencyKeyReused { .. } => Code::FailedPrecondition,
            Error::Aborted(_) | Error::KeyTaken => Code::Aborted,
            Error::ShuttingDown => Code::Unavailable,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Internal(_) => Code::Internal,
            Error::Recorded { status, .. } => status.code(),
        }
    }

    /// Whether this error is a final answer to the request, to be stored
    /// under its idempotency key and replayed to retries (as Stripe does):
    /// the request was valid and was decided against the state it found.
    /// Validation errors, conflicts and outages are not: a retry may meet a
    /// different fate.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Error::FailedPrecondition { .. } | Error::NotFound { .. }
        )
    }

    /// The gRPC status, with google.rpc details, that the caller receives.
    pub fn into_status(self) -> tonic::Status {
        let code = self.code();
        let mut details = ErrorDetails::new();
        let message = match &self {
            Error::InvalidArgument(violations) => {
                for v in violations {
                    details.add_bad_request_violation(v.field.clone(), v.description.clone());
                }
                self.to_string()
            }
            Error::NotFound { kind, id } => {
                details.set_resource_info(*kind, id.clone(), "", format!("no {kind} has this id"));
                self.to_string()
            }
            Error::FailedPrecondition {
                reason,
                subject,
                description,
            } => {
                details.add_precondition_failure_violation(
                    "STATE",
                    subject.clone(),
                    description.clone(),
                );
                details.set_error_info(*reason, ERROR_DOMAIN, HashMap::new());
                self.to_string()
            }
            Error::IdempotencyKeyReused { key, method } => {
                details.add_precondition_failure_violation(
                    "IDEMPOTENCY_KEY",
                    key.clone(),
                    format!("already used with a different {method} request"),
                );
                details.set_error_info(
                    "IDEMPOTENCY_KEY_REUSED",
                    ERROR_DOMAIN,
                    HashMap::from([("method".to_owned(), method.clone())]),
                );
                self.to_string()
            }
            Error::Aborted(_) | Error::KeyTaken => {
                details.set_error_info("CONCURRENT_CHANGE", ERROR_DOMAIN, HashMap::new());
                details.set_retry_info(Some(RETRY_ABORTED_AFTER));
                self.to_string()
            }
            Error::Unavailable(_) => {
                details.set_error_info("DATABASE_UNAVAILABLE", ERROR_DOMAIN, HashMap::new());
                details.set_retry_info(Some(RETRY_UNAVAILABLE_AFTER));
                // The cause may name hosts; the caller learns only that the
                // database is down (the log has the rest).
                "database unavailable; retry later".to_owned()
            }
            Error::ShuttingDown => {
                details.set_error_info("SHUTTING_DOWN", ERROR_DOMAIN, HashMap::new());
                details.set_retry_info(Some(RETRY_ABORTED_AFTER));
                self.to_string()
            }
            Error::Internal(_) => {
                details.set_error_info("INTERNAL", ERROR_DOMAIN, HashMap::new());
                "internal error; see the payment-backend log".to_owned()
            }
            Error::Recorded { .. } => String::new(),
        };
        if let Error::Recorded {
            mut status,
            replayed,
        } = self
        {
            if replayed {
                status.metadata_mut().insert(
                    REPLAYED_HEADER,
                    tonic::metadata::MetadataValue::from_static("true"),
                );
            }
            return status;
        }
        tonic::Status::with_error_details(code, message, details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_carries_every_field() {
        let mut v = Violations::default();
        v.add("amount.amount_minor", "must be positive");
        v.add("amount.currency", "required");
        let status = v.finish().unwrap_err().into_status();
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let fields: Vec<_> = details
            .bad_request()
            .unwrap()
            .field_violations
            .iter()
            .map(|f| f.field.as_str())
            .collect();
        assert_eq!(fields, ["amount.amount_minor", "amount.currency"]);
        assert!(status.message().contains("amount.currency: required"));
    }

    #[test]
    fn unavailable_hides_the_cause() {
        let status = Error::Unavailable("connect to 10.0.0.1:5432 refused".into()).into_status();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(!status.message().contains("10.0.0.1"));
    }

    #[test]
    fn retryable_errors_say_when_to_retry() {
        for (e, after) in [
            (Error::Aborted("x".into()), RETRY_ABORTED_AFTER),
            (Error::Unavailable("x".into()), RETRY_UNAVAILABLE_AFTER),
        ] {
            let status = e.into_status();
            let retry = status.get_details_retry_info().expect("RetryInfo");
            assert_eq!(retry.retry_delay, Some(after), "{status:?}");
        }
        let status = Error::Internal("x".into()).into_status();
        assert!(status.get_details_retry_info().is_none());
    }

    #[test]
    fn huge_values_are_shown_cut() {
        let long = "x".repeat(10_000);
        let s = shown(&long);
        assert!(s.len() < 100, "{s}");
        assert!(s.contains("10000 characters"), "{s}");
        assert_eq!(shown("ab\0"), "\"ab\\0\"");
        let mut v = Violations::default();
        for i in 0..1000 {
            v.add(format!("f{i}"), "bad");
        }
        let status = v.finish().unwrap_err().into_status();
        let listed = status.get_details_bad_request().unwrap().field_violations;
        assert_eq!(listed.len(), MAX_VIOLATIONS + 1);
        assert!(listed[MAX_VIOLATIONS].description.contains("990 more"));
    }

    #[test]
    fn reused_key_is_failed_precondition_with_reason() {
        let status = Error::IdempotencyKeyReused {
            key: "k1".into(),
            method: "CreatePayment".into(),
        }
        .into_status();
        assert_eq!(status.code(), Code::FailedPrecondition);
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "IDEMPOTENCY_KEY_REUSED");
    }
}
