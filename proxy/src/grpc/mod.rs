//! What tollgate knows about gRPC: the `/package.Service/Method` path, the
//! 5-byte length-prefixed message frames, `grpc-timeout`, and how to answer
//! with a gRPC status.

pub(crate) mod fields;
pub(crate) mod frame;
pub(crate) mod path;
pub(crate) mod status;
pub(crate) mod timeout;
