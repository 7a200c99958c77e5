//! Load generator for CreatePayment: N clients, each on its own HTTP/2
//! connection, each issuing calls back to back (like pgbench's clients), on
//! random payer → payee pairs drawn from many funded accounts.
//!
//! ```text
//! cargo run --release -p payment-backend --example create_payment_load -- \
//!     --target http://127.0.0.1:50051 --clients 8 --warmup 2s --duration 10s
//! ```
//! Prints one line: `calls=… ok=… errors=… tps=… p50_us=… p99_us=…`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tollgate_proto::payments::v1 as pb;
use tollgate_proto::payments::v1::account_service_client::AccountServiceClient;
use tollgate_proto::payments::v1::payment_service_client::PaymentServiceClient;
use tonic::transport::Channel;

#[derive(Debug, Parser)]
struct Args {
    /// Backend address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    target: String,
    /// Concurrent clients (one connection each).
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Funded payer accounts to spread payments over.
    #[arg(long, default_value_t = 1000)]
    payers: usize,
    /// Payee accounts.
    #[arg(long, default_value_t = 100)]
    payees: usize,
    /// Time to run before measuring.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Measured time.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

async fn open(
    accounts: &mut AccountServiceClient<Channel>,
    run: &str,
    i: usize,
    funds: i64,
) -> String {
    let id = accounts
        .create_account(pb::CreateAccountRequest {
            idempotency_key: format!("{run}-acct-{i}"),
            owner: format!("load-{i}"),
            currency: "USD".into(),
        })
        .await
        .expect("create account")
        .into_inner()
        .id;
    if funds > 0 {
        accounts
            .deposit(pb::DepositRequest {
                idempotency_key: format!("{run}-dep-{i}"),
                account_id: id.clone(),
                amount: Some(pb::Money {
                    amount_minor: funds,
                    currency: "USD".into(),
                }),
            })
            .await
            .expect("deposit");
    }
    id
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let run = format!(
        "{:x}",
        std::process::id() as u64 * 1_000_003 + Instant::now().elapsed().subsec_nanos() as u64
    );
    let setup = Channel::from_shared(args.target.clone())
        .unwrap()
        .connect()
        .await
        .expect("connect");
    let mut accounts = AccountServiceClient::new(setup);
    let mut payers = Vec::new();
    for i in 0..args.payers {
        payers.push(open(&mut accounts, &run, i, 1_000_000_000_000).await);
    }
    let mut payees = Vec::new();
    for i in 0..args.payees {
        payees.push(open(&mut accounts, &run, args.payers + i, 0).await);
    }
    let payers = Arc::new(payers);
    let payees = Arc::new(payees);
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..args.clients {
        let channel = Channel::from_shared(args.target.clone())
            .unwrap()
            .connect()
            .await
            .expect("connect");
        let mut client = PaymentServiceClient::new(channel);
        let (payers, payees, measuring, stop, run) = (
            payers.clone(),
            payees.clone(),
            measuring.clone(),
            stop.clone(),
            run.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((w as u64 + 1) * 0x1000_0001));
            let mut lat = Vec::with_capacity(100_000);
            let (mut ok, mut err) = (0u64, 0u64);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let req = pb::CreatePaymentRequest {
                    idempotency_key: format!("{run}-{w}-{n}"),
                    payer_account_id: payers[(rng.next() % payers.len() as u64) as usize].clone(),
                    payee_account_id: payees[(rng.next() % payees.len() as u64) as usize].clone(),
                    amount: Some(pb::Money {
                        amount_minor: 100 + (rng.next() % 10_000) as i64,
                        currency: "USD".into(),
                    }),
                    capture_method: pb::CaptureMethod::Automatic as i32,
                    description: "load test".into(),
                    metadata: Default::default(),
                };
                let t = Instant::now();
                let r = client.create_payment(req).await;
                if measuring.load(Ordering::Relaxed) {
                    lat.push(t.elapsed().as_micros() as u32);
                    match r {
                        Ok(_) => ok += 1,
                        Err(_) => err += 1,
                    }
                }
            }
            (ok, err, lat)
        }));
    }
    tokio::time::sleep(args.warmup).await;
    measuring.store(true, Ordering::Relaxed);
    let start = Instant::now();
    tokio::time::sleep(args.duration).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut err, mut lat) = (0, 0, Vec::new());
    for w in workers {
        let (o, e, l) = w.await.unwrap();
        ok += o;
        err += e;
        lat.extend(l);
    }
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "calls={} ok={ok} errors={err} tps={:.0} p50_us={} p99_us={}",
        ok + err,
        ok as f64 / elapsed.as_secs_f64(),
        pct(0.50),
        pct(0.99)
    );
}
