//! The service's error type and the one place that turns it into a gRPC
//! status with google.rpc details.
//!
//! Handlers and the store return [`Error`]; [`Error::into_status`] is the only
//! mapping to `tonic::Status`, and it lists every variant so that a new
//! variant forces a decision about its code and details.

use std::collections::HashMap;

use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt};

/// The `ErrorInfo.domain` of every error this service returns.
pub const ERROR_DOMAIN: &str = "payments.tollgate.dev";

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
    #[error("idempotency key {key:?} was already used for a different {method} request; use a new key for a new request")]
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

    /// A bug or an impossible state; details are logged, not returned.
    #[error("internal error: {0}")]
    Internal(String),
}

fn describe_violations(v: &[FieldViolation]) -> String {
    v.iter()
        .map(|f| format!("{}: {}", f.field, f.description))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Collects field violations while a request is checked, so the caller
/// learns of every problem at once.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldViolation>);

// === impl Violations ===

impl Violations {
    /// Records that `field` is wrong.
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation {
            field: field.into(),
            description: description.into(),
        });
    }

    /// Records the error of `check`, if any.
    pub fn check(&mut self, field: &str, check: Result<(), String>) {
        if let Err(description) = check {
            self.add(field, description);
        }
    }

    /// `Ok` when nothing was recorded, otherwise INVALID_ARGUMENT.
    pub fn finish(self) -> Result<(), Error> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidArgument(self.0))
        }
    }
}

// === impl Error ===

impl Error {
    /// A single-field INVALID_ARGUMENT.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        let mut v = Violations::default();
        v.add(field, description);
        Error::InvalidArgument(v.0)
    }

    /// The gRPC code this error is returned with.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound { .. } => Code::NotFound,
            Error::FailedPrecondition { .. } => Code::FailedPrecondition,
            Error::IdempotencyKeyReused { .. } => Code::FailedPrecondition,
            Error::Aborted(_) => Code::Aborted,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Internal(_) => Code::Internal,
        }
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
            Error::Aborted(_) => {
                details.set_error_info("CONCURRENT_CHANGE", ERROR_DOMAIN, HashMap::new());
                self.to_string()
            }
            Error::Unavailable(_) => {
                details.set_error_info("DATABASE_UNAVAILABLE", ERROR_DOMAIN, HashMap::new());
                // The cause may name hosts; the caller learns only that the
                // database is down (the log has the rest).
                "database unavailable; retry later".to_owned()
            }
            Error::Internal(_) => {
                details.set_error_info("INTERNAL", ERROR_DOMAIN, HashMap::new());
                "internal error; see the payment-backend log".to_owned()
            }
        };
        tonic::Status::with_error_details(code, message, details)
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        crate::store::classify(e)
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
