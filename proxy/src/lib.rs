//! tollgate: a gRPC-aware HTTP/2 sidecar proxy that enforces global rate
//! limits.
//!
//! The data path is [`proxy::handle`]; [`call`] is what a call shares with
//! its connection; [`runtime`] starts workers
//! ([`server`]), the admin endpoints ([`admin`]) and reloads; [`config`] is
//! the YAML file; [`grpc`] knows the protocol; [`upstream`] holds the
//! connections to the services behind; [`limit`] is the step where rate
//! limits decide.

pub(crate) mod admin;
pub(crate) mod body;
pub(crate) mod call;
pub mod cli;
pub mod config;
pub(crate) mod grpc;
pub(crate) mod health;
pub mod limit;
pub(crate) mod metrics;
pub(crate) mod proxy;
pub mod redact;
pub(crate) mod respond;
pub(crate) mod routes;
pub mod runtime;
pub(crate) mod server;
pub(crate) mod state;
mod tcp;
pub(crate) mod tls;
pub(crate) mod upstream;
