//! The limiter step: between routing and forwarding, a route's limits decide
//! whether a call goes on. A route without limits has no step at all
//! (`Route::limits` is `None`), so it costs nothing per call.

pub mod algorithm;
#[cfg(test)]
mod behaviour;
pub mod breaker;
pub mod check;
pub mod memory;
pub mod redis;
mod shards;
pub mod step;

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
pub struct CallInfo<'a> {
    /// `package.Service`.
    pub service: &'a str,
    /// `Method`.
    pub method: &'a str,
    /// Request headers (gRPC metadata).
    pub headers: &'a HeaderMap,
    /// The client's address.
    pub peer: SocketAddr,
    /// The identity of the client's verified TLS certificate (mTLS).
    pub tls_identity: Option<&'a str>,
    /// The worker serving the call (picks its Redis connection).
    pub worker: usize,
}

/// A call refused by a limit: the gRPC status and the headers the client
/// gets (trailers-only response).
#[derive(Debug, Clone)]
pub struct Rejection {
    /// RESOURCE_EXHAUSTED, or UNAVAILABLE when a limit fails closed.
    pub code: Code,
    /// `grpc-message`.
    pub message: String,
    /// Extra headers (retry-after, ratelimit-*, status details).
    pub headers: HeaderMap,
}

/// The decision of a route's limits.
pub type Decision<'a> =
    Pin<Box<dyn Future<Output = Result<Option<HeaderMap>, Box<Rejection>>> + Send + 'a>>;

/// The limits of one route, checked together.
pub trait LimitStep: Send + Sync {
    /// `Ok(headers)`: the call goes on (with headers to add to the response,
    /// if any); `Err`: the call is refused and nothing reaches the upstream.
    fn check<'a>(&'a self, call: CallInfo<'a>) -> Decision<'a>;
}
