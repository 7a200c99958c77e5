//! The gRPC services: request validation, the idempotency key, and the call
//! into the store. Every handler goes through [`crate::metrics::observe`] and
//! turns errors into statuses with [`crate::error::Error::into_status`].

mod accounts;
mod payments;

pub use self::accounts::AccountApi;
pub use self::payments::PaymentApi;

use tokio::sync::watch;
use tonic::metadata::MetadataValue;

use crate::error::{shown, Error};
use crate::idempotency::{Outcome, REPLAYED_HEADER};
use crate::metrics::observe;

/// Ends the calls still running when shutdown's drain timeout is over: they
/// answer UNAVAILABLE (retry with the same key) and their transaction rolls
/// back, instead of running on behind a server that said it stopped.
#[derive(Debug, Clone)]
pub struct Cutoff {
    fired: watch::Receiver<bool>,
    /// The gRPC service whose calls it runs, for their spans.
    service: &'static str,
}

// === impl Cutoff ===

impl Cutoff {
    /// A cutoff, and what fires it (send `true`).
    pub fn new() -> (watch::Sender<bool>, Cutoff) {
        let (tx, rx) = watch::channel(false);
        (
            tx,
            Cutoff {
                fired: rx,
                service: "",
            },
        )
    }

    /// The same cutoff, for the calls of `service` (`payments.v1.…`).
    fn serving(mut self, service: &'static str) -> Self {
        self.service = service;
        self
    }

    /// Runs the handler `f` of `method` (through [`observe`], in its span:
    /// a child of the trace context in `metadata`) unless the cutoff fires
    /// first.
    async fn run<T>(
        &self,
        method: &'static str,
        metadata: &tonic::metadata::MetadataMap,
        f: impl std::future::Future<Output = Result<T, tonic::Status>>,
    ) -> Result<T, tonic::Status> {
        use tracing::Instrument as _;
        let mut fired = self.fired.clone();
        let span = crate::telemetry::rpc(self.service, method, metadata);
        let r = observe(method, async move {
            tokio::select! {
                r = f => r,
                _ = fired.wait_for(|cut| *cut) => Err(status(Error::ShuttingDown)),
            }
        })
        .instrument(span.clone())
        .await;
        let code = r
            .as_ref()
            .map_or_else(tonic::Status::code, |_| tonic::Code::Ok);
        crate::telemetry::rpc_ended(&span, code);
        r
    }
}

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
            "{} is not a valid id; ids look like {prefix}_0192f3…",
            shown(value)
        ))
    } else {
        Ok(())
    }
}

/// What a free-text field may hold besides printable characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Text {
    /// One line: no control characters at all (names, metadata).
    Line,
    /// Prose: tabs and line breaks, but no other control character.
    Prose,
}

/// Checks a free-text field: at most `max` characters (Unicode scalar
/// values, the same unit for every field), and no control characters that
/// make no sense in it (a NUL byte, escape sequences, …), so both databases
/// store exactly what the caller sent.
fn check_text(value: &str, max: usize, kind: Text) -> Result<(), String> {
    let len = value.chars().count();
    if len > max {
        return Err(format!("must be at most {max} characters, got {len}"));
    }
    let allowed = |c: char| kind == Text::Prose && matches!(c, '\t' | '\n' | '\r');
    match value.chars().position(|c| c.is_control() && !allowed(c)) {
        None => Ok(()),
        Some(at) => {
            let c = value.chars().nth(at).unwrap_or_default();
            Err(format!(
                "contains the control character U+{:04X} at character {at}; {}",
                c as u32,
                match kind {
                    Text::Line => "send printable text on one line",
                    Text::Prose => "send printable text (tabs and line breaks are allowed)",
                }
            ))
        }
    }
}

fn status(e: Error) -> tonic::Status {
    if matches!(
        e,
        Error::Internal(_) | Error::Unavailable(_) | Error::ShuttingDown
    ) {
        tracing::warn!(error = %e, "request failed");
    }
    e.into_status()
}
