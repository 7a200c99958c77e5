//! The gRPC services: request validation, the idempotency key, and the call
//! into the store. Every handler goes through [`crate::metrics::observe`] and
//! turns errors into statuses with [`crate::error::Error::into_status`].

mod accounts;
mod payments;

pub use self::accounts::AccountApi;
pub use self::payments::PaymentApi;

use tonic::metadata::MetadataValue;

use crate::error::Error;
use crate::idempotency::{Outcome, REPLAYED_HEADER};

/// Longest id accepted in a request field.
const MAX_ID_LEN: usize = 64;

/// Wraps a store outcome into a response; replays say so in metadata.
fn respond<T>(outcome: Outcome<T>) -> tonic::Response<T> {
    let replayed = outcome.is_replay();
    let mut response = tonic::Response::new(outcome.into_inner());
    if replayed {
        response
            .metadata_mut()
            .insert(REPLAYED_HEADER, MetadataValue::from_static("true"));
    }
    response
}

/// Checks a required id field.
fn check_id(value: &str, prefix: &str) -> Result<(), String> {
    if value.is_empty() {
        Err(format!(
            "required: the id of an existing {prefix}_… resource"
        ))
    } else if value.len() > MAX_ID_LEN
        || !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        Err(format!(
            "{value:?} is not a valid id; ids look like {prefix}_0192f3…"
        ))
    } else {
        Ok(())
    }
}

/// Checks a free-text field's length.
fn check_text(value: &str, max: usize) -> Result<(), String> {
    if value.chars().count() > max {
        Err(format!("must be at most {max} characters"))
    } else {
        Ok(())
    }
}

fn status(e: Error) -> tonic::Status {
    if matches!(e, Error::Internal(_) | Error::Unavailable(_)) {
        tracing::warn!(error = %e, "request failed");
    }
    e.into_status()
}
