//! The proxy's integration tests in one binary (each test binary links the
//! whole crate; one link instead of ten). Tests that read process-wide
//! metrics exactly, while others would move them, run in a process of their
//! own: `redis_outage.rs`.
//! Tests of tollgate in front of the payment backend are the backend's
//! (`payment-backend/tests/it/through_tollgate.rs`).

#[path = "../common/mod.rs"]
mod common;

mod hostile;
mod limits;
mod process;
mod protocol;
mod redis_limits;
mod redis_security;
mod redis_store;
mod reload;
mod tls;
mod transparency;
