//! Generates the Rust code for every `.proto` file under `proto/` into
//! `OUT_DIR`; nothing generated is committed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc keeps `cargo build` working on a machine without
    // protobuf-compiler installed; an explicit PROTOC still wins.
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "payments/v1/types.proto",
        "payments/v1/accounts.proto",
        "payments/v1/payments.proto",
        "payments/v1/events.proto",
    ];
    tonic_prost_build::configure()
        // Deterministic encoding of map fields: the request fingerprint of an
        // idempotency key must not depend on hash-map iteration order.
        .btree_map(".")
        .file_descriptor_set_path(out.join("payments_v1_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("tollgate_test_v1_descriptor.bin"))
        .compile_protos(&["tollgate/test/v1/echo.proto"], &["."])?;
    // Envoy's rate limit service API, for tollgate's `rls` listener and the
    // tests that call it.
    let envoy = [
        "envoy/service/ratelimit/v3/rls.proto",
        "envoy/extensions/common/ratelimit/v3/ratelimit.proto",
        "envoy/config/core/v3/base.proto",
        "envoy/type/v3/ratelimit_unit.proto",
    ];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("envoy_rls_v3_descriptor.bin"))
        .compile_protos(&envoy, &["."])?;
    for p in protos
        .iter()
        .chain(&["tollgate/test/v1/echo.proto"])
        .chain(&envoy)
    {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
