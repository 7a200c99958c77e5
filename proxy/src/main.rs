//! `tollgate`: see `tollgate --help`.

/// mimalloc: glibc malloc merged its fast bins on every call (each call's
/// future is a block of over 1 KiB); see BENCHMARKS.md.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tollgate::cli::main()
}
