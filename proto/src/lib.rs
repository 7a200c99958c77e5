//! Generated protocol buffer types and gRPC stubs for `payments.v1`.
//!
//! Both binaries use these: the payment backend serves them and the proxy's
//! tests call them through tollgate.

#![allow(unreachable_pub, clippy::all)]

/// `payments.v1`: accounts, payments, refunds and their events.
pub mod payments {
    /// Version 1 of the payments API.
    pub mod v1 {
        tonic::include_proto!("payments.v1");
    }
}

/// `tollgate.test.v1`: the Echo service that tests and benchmarks put
/// behind tollgate.
pub mod test {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("tollgate.test.v1");
    }
}

/// Encoded `FileDescriptorSet` of `tollgate.test.v1` (for reflection and k6).
pub const TEST_V1_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("tollgate_test_v1_descriptor");

/// Encoded `FileDescriptorSet` of `payments.v1`, for gRPC server reflection.
pub const PAYMENTS_V1_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("payments_v1_descriptor");
