//! The backend's integration tests in one binary (each test binary links
//! the whole crate and librdkafka; one link instead of five). Tests that read
//! the process-wide metrics exactly while other backends in the process
//! would move them run in processes of their own: `events.rs`, `outage.rs`.

/// The shared harness, all of it (`#[path]` on an inline module names the
/// directory of its files: `tests/common/`).
#[macro_use]
#[path = "../common"]
mod common {
    mod backend;
    #[macro_use]
    mod cases;
    mod checks;
    mod health;
    mod locks;
    mod outbox;
    mod payments;

    pub(crate) use self::backend::*;
    pub(crate) use self::checks::*;
    pub(crate) use self::health::*;
    pub(crate) use self::locks::*;
    pub(crate) use self::outbox::*;
}

mod conformance;
mod drain;
mod edges;
mod field_limits;
mod migrations;
mod shutdown;
mod through_tollgate;
mod traces;
