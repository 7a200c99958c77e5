//! The backend's integration tests in one binary (each test binary links
//! the whole crate and librdkafka; one link instead of five). Tests that read
//! the process-wide metrics exactly while other backends in the process
//! would move them run in processes of their own: `events.rs`, `outage.rs`.

#[macro_use]
#[path = "../common/mod.rs"]
mod common;

mod conformance;
mod drain;
mod edges;
mod migrations;
mod shutdown;
mod through_tollgate;
