//! The proxy's integration tests in one binary (each test binary links the
//! whole crate; one link instead of ten). Tests that read process-wide
//! metrics exactly, while others would move them, run in a process of their
//! own: `redis_outage.rs`.
//! Tests of tollgate in front of the payment backend are the backend's
//! (`payment-backend/tests/it/through_tollgate.rs`).

#[path = "../common/mod.rs"]
mod common;

mod access_log;
mod charges;
mod dns;
mod fields;
mod hostile;
mod identity;
mod inspect;
mod limits;
mod messages;
mod process;
mod protocol;
mod redis_limits;
mod redis_security;
mod redis_store;
mod reload;
mod resilience;
mod rls;
mod tls;
mod tracing;
mod transparency;

use std::net::SocketAddr;

/// The YAML of a proxy with one upstream `echo` at `upstream` and a
/// catch-all route to it; `extra` is appended (more routes, upstreams …).
pub(crate) fn basic_config(upstream: SocketAddr) -> String {
    named_config(upstream, "*")
}

/// [`basic_config`] with the catch-all route named `name` (metrics are
/// process-wide: a test that counts uses a name of its own).
pub(crate) fn named_config(upstream: SocketAddr, name: &str) -> String {
    format!(
        "listener: {{ address: 127.0.0.1:0, workers: 2 }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  echo: {{ addresses: [\"{upstream}\"], connect_timeout: 500ms }}\nroutes:\n  - {{ match: {{}}, upstream: echo, name: \"{name}\" }}\n"
    )
}
