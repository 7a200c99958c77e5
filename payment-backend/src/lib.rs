//! The payment backend: a tonic gRPC service for accounts, payments,
//! captures and refunds over a double-entry ledger, with idempotency keys and
//! a transactional outbox relayed to Kafka.
//!
//! A call flows: [`service`] validates the request and reads its
//! idempotency key → [`store`] runs one transaction (claim the key, lock
//! rows, decide with [`payment`], write payment + ledger + outbox, store the
//! response) → [`error`] maps any failure to a gRPC status. Background tasks:
//! [`relay`] (outbox → Kafka), [`sweeper`] (expiry), [`health`] (database
//! watch), [`exporter`] (`/metrics`). [`server`] assembles them; [`cli`] is
//! the command line.

pub mod cli;
pub mod error;
pub mod exporter;
pub mod health;
pub mod idempotency;
pub mod metrics;
pub mod money;
pub mod payment;
/// The proxy's URL masking, one source for both binaries.
#[path = "../../proxy/src/redact.rs"]
pub mod redact;
pub mod relay;
pub mod server;
pub mod service;
pub mod store;
pub mod sweeper;
pub mod telemetry;
