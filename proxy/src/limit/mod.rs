//! The limiter step: between routing and forwarding, a route's limits decide
//! whether a call goes on. A route without limits has no step at all
//! (`Route::limits` is `None`), so it costs nothing per call.

pub mod algorithm;
#[cfg(test)]
mod behaviour;
pub(crate) mod breaker;
pub mod check;
pub(crate) mod memory;
pub(crate) mod meter;
pub mod redis;
mod shards;
pub(crate) mod step;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use http::HeaderMap;

use crate::grpc::status::Code;
// The behaviour table reads the rate type beside the algorithms.
#[cfg(test)]
use crate::config::Rate;

/// What a limit sees of a call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallInfo<'a> {
    /// `package.Service`.
    pub(crate) service: &'a str,
    /// `Method`.
    pub(crate) method: &'a str,
    /// Request headers (gRPC metadata).
    pub(crate) headers: &'a HeaderMap,
    /// The client's address.
    pub(crate) peer: SocketAddr,
    /// The identity of the client's verified TLS certificate (mTLS).
    pub(crate) tls_identity: Option<&'a str>,
    /// The worker serving the call (picks its Redis connection).
    pub(crate) worker: usize,
    /// The first request message, for limits that read its fields.
    pub(crate) message: FirstMessage<'a>,
    /// The call's record (access log line, spans), when it has one: told
    /// of the Redis round trip.
    pub(crate) record: Option<&'a crate::access::Record>,
}

/// The first request message of a call, as limits that read fields see it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum FirstMessage<'a> {
    /// Not held: the route's limits read no field.
    NotHeld,
    /// Its bytes (decompressed, if it was and the config allows it).
    Held(&'a [u8]),
    /// Not readable (compressed, and `limiter.inspect.decompress` is off)
    /// or the request ended before one: every field is missing.
    Unreadable,
}

/// A call refused by a limit: the gRPC status and the headers the client
/// gets (trailers-only response).
#[derive(Debug, Clone)]
pub(crate) struct Rejection {
    /// RESOURCE_EXHAUSTED, or UNAVAILABLE when a limit fails closed.
    pub(crate) code: Code,
    /// `grpc-message`.
    pub(crate) message: String,
    /// Extra headers (retry-after, ratelimit-*, status details).
    pub(crate) headers: HeaderMap,
    /// The limit that refused, and its retry delay in µs (0: none would
    /// help), when a limit's rate or store refused (`tollgate test`).
    pub(crate) by: Option<(String, u64)>,
}

/// What a call's limits still do once it has gone on: meter its messages
/// each way, and charge it when it ends.
#[derive(Default)]
pub(crate) struct Ongoing {
    /// Message limits on the client's messages.
    pub(crate) client: Option<Box<meter::Meters>>,
    /// Message limits on the upstream's messages.
    pub(crate) server: Option<Box<meter::Meters>>,
    /// Limits charged when the call ends.
    pub(crate) charges: Option<Box<step::Charges>>,
}

impl Ongoing {
    /// Whether there is nothing to do.
    pub(crate) fn is_empty(&self) -> bool {
        self.client.is_none() && self.server.is_none() && self.charges.is_none()
    }
}

/// The decision of a route's limits.
pub(crate) type Decision<'a> =
    Pin<Box<dyn Future<Output = Result<Option<HeaderMap>, Box<Rejection>>> + Send + 'a>>;

/// The limits of one route, checked together.
pub(crate) trait LimitStep: Send + Sync {
    /// `Ok(headers)`: the call goes on (with headers to add to the response,
    /// if any); `Err`: the call is refused and nothing reaches the upstream.
    fn check<'a>(&'a self, call: CallInfo<'a>) -> Decision<'a>;

    /// Whether a limit reads request fields: the call is held until its
    /// first message has arrived, and checked with it.
    fn reads_fields(&self) -> bool {
        false
    }

    /// What the limits do once the call has gone on: its message limits'
    /// meters and the charges due when it ends. Asked before
    /// [`check`](Self::check): charges are made only once
    /// [`armed`](step::Charges::arm), as the call is sent upstream.
    fn ongoing(&self, _call: &CallInfo<'_>) -> Result<Ongoing, Box<Rejection>> {
        Ok(Ongoing::default())
    }

    /// Each limit's key, rate and modes for `call`, asking no store
    /// (`tollgate explain`).
    fn explain(&self, _call: &CallInfo<'_>) -> Vec<step::Report> {
        Vec::new()
    }

    /// Each limit, as the admin server's `/limits` lists it.
    fn describe(&self) -> Vec<serde_json::Value> {
        Vec::new()
    }

    /// What to ask the store of key `value` (the key's values joined by
    /// `/`, as `tollgate explain` prints them) of limit `limit`
    /// (`/limits`); `Err`: no such key to look at.
    fn ask(&self, limit: &str, _value: &str) -> Result<step::Asked, String> {
        Err(format!(
            "the route has no limit {}",
            crate::config::shown(limit)
        ))
    }
}
