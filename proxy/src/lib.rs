//! tollgate: a gRPC-aware HTTP/2 sidecar proxy that enforces global rate
//! limits.
//!
//! The data path is [`proxy::handle`]; [`call`] is what a call shares with
//! its connection; [`runtime`] starts workers
//! ([`server`]), the admin endpoints ([`admin`]) and reloads; [`config`] is
//! the YAML file; [`grpc`] knows the protocol; [`upstream`] holds the
//! connections to the services behind; [`limit`] is the step where rate
//! limits decide.

pub mod admin;
pub mod body;
pub mod call;
pub mod cli;
pub mod config;
pub mod grpc;
pub mod health;
pub mod limit;
pub mod metrics;
pub mod proxy;
pub mod redact;
pub mod respond;
pub mod routes;
pub mod runtime;
pub mod server;
pub mod state;
mod tcp;
pub mod tls;
pub mod upstream;
