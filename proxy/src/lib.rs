//! tollgate: a gRPC-aware HTTP/2 sidecar proxy that enforces global rate
//! limits held in Redis.
//!
//! The data path (listener, routing, frame observer, forwarding) and the
//! limiter are built in this crate; see `DESIGN.md` for the call path.
