//! `make demo`: against a running `make run`, one payment and a burst of
//! refunds through tollgate, told in plain words. config/dev.yaml allows 10
//! refunds a minute per merchant (`refunds-per-merchant`): the first ten
//! pass, the eleventh is refused with RESOURCE_EXHAUSTED and the delay after
//! which a retry would pass.
//!
//! ```text
//! cargo run -q -p payment-backend --example demo -- --target http://127.0.0.1:10000
//! ```

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use tollgate_proto::payments::v1 as pb;
use tollgate_proto::payments::v1::account_service_client::AccountServiceClient;
use tollgate_proto::payments::v1::payment_service_client::PaymentServiceClient;
use tonic::transport::Channel;
use tonic_types::StatusExt;

#[derive(Debug, Parser)]
struct Args {
    /// tollgate's gRPC address (from `make run`).
    #[arg(long, default_value = "http://127.0.0.1:10000")]
    target: String,
    /// Refunds to ask for, one after another.
    #[arg(long, default_value_t = 12)]
    refunds: u32,
}

fn usd(minor: i64) -> Option<pb::Money> {
    Some(pb::Money {
        amount_minor: minor,
        currency: "USD".into(),
    })
}

fn key(what: &str, n: u128) -> String {
    format!("demo-{what}-{n}")
}

/// The request with the merchant header the limits are keyed on.
fn as_merchant<T>(merchant: &str, message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    if let Ok(v) = merchant.parse() {
        r.metadata_mut().insert("x-merchant-id", v);
    }
    r
}

fn dollars(minor: i64) -> String {
    format!("${}.{:02}", minor / 100, minor % 100)
}

async fn run(args: Args) -> Result<(), String> {
    let channel = Channel::from_shared(args.target.clone())
        .map_err(|e| format!("--target {:?}: {e}", args.target))?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| {
            format!(
                "cannot reach tollgate at {}: {e}; start it with `make run` first",
                args.target
            )
        })?;
    let accounts = AccountServiceClient::new(channel.clone());
    let mut payments = PaymentServiceClient::new(channel);
    // One merchant per run: a second run within the minute starts afresh.
    let run = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let merchant = format!("demo-merchant-{run}");
    let status = |e: tonic::Status| format!("{:?}: {}", e.code(), e.message());

    let open = |owner: &'static str, funds: i64| {
        let mut accounts = accounts.clone();
        async move {
            let a = accounts
                .create_account(pb::CreateAccountRequest {
                    idempotency_key: key(owner, run),
                    owner: owner.into(),
                    currency: "USD".into(),
                })
                .await?
                .into_inner();
            if funds > 0 {
                accounts
                    .deposit(pb::DepositRequest {
                        idempotency_key: key(&format!("{owner}-deposit"), run),
                        account_id: a.id.clone(),
                        amount: usd(funds),
                    })
                    .await?;
            }
            Ok::<_, tonic::Status>(a.id)
        }
    };
    let payer = open("demo-customer", 100_000).await.map_err(status)?;
    let payee = open("demo-shop", 0).await.map_err(status)?;
    println!(
        "Opened a customer account with {} and a shop account.",
        dollars(100_000)
    );
    let payment = payments
        .create_payment(as_merchant(
            &merchant,
            pb::CreatePaymentRequest {
                idempotency_key: key("payment", run),
                payer_account_id: payer,
                payee_account_id: payee,
                amount: usd(5_000),
                capture_method: pb::CaptureMethod::Automatic.into(),
                description: "tollgate demo".into(),
                ..Default::default()
            },
        ))
        .await
        .map_err(status)?
        .into_inner();
    println!(
        "The customer paid the shop {} (payment {}).",
        dollars(5_000),
        payment.id
    );
    println!(
        "Now {} refunds of {} each, as merchant {merchant}; tollgate allows 10 a minute per merchant:",
        args.refunds,
        dollars(100)
    );
    let mut refused = false;
    for n in 1..=args.refunds {
        let asked = payments
            .refund_payment(as_merchant(
                &merchant,
                pb::RefundPaymentRequest {
                    idempotency_key: key(&format!("refund-{n}"), run),
                    payment_id: payment.id.clone(),
                    amount_minor: Some(100),
                    reason: "demo".into(),
                },
            ))
            .await;
        match asked {
            Ok(r) => println!(
                "  refund {n:>2}: allowed, {} back",
                dollars(r.into_inner().amount.map_or(0, |m| m.amount_minor))
            ),
            Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                let delay = e
                    .get_details_retry_info()
                    .and_then(|r| r.retry_delay)
                    .map_or_else(
                        || "an unknown time".to_owned(),
                        |d| format!("{:.1} s", d.as_secs_f64()),
                    );
                println!(
                    "  refund {n:>2}: refused by tollgate with RESOURCE_EXHAUSTED ({}); retry in {delay}",
                    e.message()
                );
                refused = true;
            }
            Err(e) => return Err(format!("refund {n}: {}", status(e))),
        }
    }
    if refused {
        println!("The refused calls never reached the payment backend.");
    } else {
        println!("No refund was refused: is tollgate running with config/dev.yaml?");
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::FAILURE
        }
    }
}
