//! `payment-backend`: see `payment-backend --help`.

fn main() -> std::process::ExitCode {
    payment_backend::cli::main()
}
