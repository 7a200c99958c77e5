//! What tollgate knows about gRPC: the `/package.Service/Method` path, the
//! 5-byte length-prefixed message frames, `grpc-timeout`, and how to answer
//! with a gRPC status.

pub mod frame;
pub mod path;
pub mod status;
pub mod timeout;
