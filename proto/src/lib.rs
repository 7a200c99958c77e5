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

/// Envoy's rate limit service API, as Envoy publishes it: the packages
/// `envoy.service.ratelimit.v3`, `envoy.extensions.common.ratelimit.v3`,
/// `envoy.config.core.v3` and `envoy.type.v3` (the parts the service uses).
pub mod envoy {
    /// `envoy.service`.
    pub mod service {
        /// `envoy.service.ratelimit`.
        pub mod ratelimit {
            /// `envoy.service.ratelimit.v3`: `RateLimitService`.
            pub mod v3 {
                tonic::include_proto!("envoy.service.ratelimit.v3");
            }
        }
    }
    /// `envoy.extensions`.
    pub mod extensions {
        /// `envoy.extensions.common`.
        pub mod common {
            /// `envoy.extensions.common.ratelimit`.
            pub mod ratelimit {
                /// `envoy.extensions.common.ratelimit.v3`: descriptors.
                pub mod v3 {
                    tonic::include_proto!("envoy.extensions.common.ratelimit.v3");
                }
            }
        }
    }
    /// `envoy.config`.
    pub mod config {
        /// `envoy.config.core`.
        pub mod core {
            /// `envoy.config.core.v3`: `HeaderValue`.
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    /// `envoy.type`.
    pub mod r#type {
        /// `envoy.type.v3`: `RateLimitUnit`.
        pub mod v3 {
            // prost names the file after the Rust path (`r#type`).
            include!(concat!(env!("OUT_DIR"), "/envoy.r#type.v3.rs"));
        }
    }
}

/// Encoded `FileDescriptorSet` of Envoy's rate limit service API (for
/// reflection on tollgate's `rls` listener).
pub const ENVOY_RLS_V3_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("envoy_rls_v3_descriptor");

/// Encoded `FileDescriptorSet` of `tollgate.test.v1` (for reflection and k6).
pub const TEST_V1_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("tollgate_test_v1_descriptor");

/// Encoded `FileDescriptorSet` of `payments.v1`, for gRPC server reflection.
pub const PAYMENTS_V1_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("payments_v1_descriptor");
