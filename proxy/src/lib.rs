//! tollgate: a gRPC-aware HTTP/2 sidecar proxy that enforces global rate
//! limits.
//!
//! Modules import one way, from the protocol up to the process:
//!
//! ```text
//! grpc, config, redact, tcp          the protocol; the file, parsed into types
//!   → metrics → call → body          counters; what a call shares with its
//!                                    connection; the bodies on their way through
//!   → tls, limit, upstream           certificates; the limiter step; the
//!                                    connections to the services behind
//!   → rls                            Envoy's rate limit service, from
//!                                    envoyproxy/ratelimit config files
//!   → routes → state                 the route table; the config in force and
//!                                    each worker's state
//!   → respond → proxy                one answer for every way a call ends early;
//!                                    the call path, `proxy::handle`
//!   → server → admin → runtime       listeners and connections; the admin
//!                                    endpoints; start, reload, drain
//!   → tools                          explain, test, inspect, convert
//!   → cli, health                    the command line
//! ```
//!
//! The library exposes what the binary and the tests use: [`cli`],
//! [`config`], [`runtime`], [`limit`] (its algorithms, checks and Redis
//! store) and [`redact`] (which the payment backend compiles too).

pub(crate) mod access;
pub(crate) mod admin;
pub(crate) mod body;
pub(crate) mod call;
pub mod cli;
pub mod config;
pub(crate) mod grpc;
pub(crate) mod headers;
pub(crate) mod health;
pub(crate) mod hold;
pub mod limit;
pub(crate) mod metrics;
pub(crate) mod proxy;
pub mod redact;
pub(crate) mod respond;
pub(crate) mod rls;
pub(crate) mod routes;
pub mod runtime;
pub(crate) mod schema;
pub(crate) mod server;
pub(crate) mod state;
mod tcp;
pub(crate) mod tls;
pub(crate) mod tools;
pub(crate) mod trace;
pub(crate) mod upstream;
