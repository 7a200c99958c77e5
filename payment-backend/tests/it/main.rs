//! The backend's integration tests in one binary (each test binary links
//! the whole crate and librdkafka; one link instead of five). Tests that read
//! the process-wide metrics exactly while other backends in the process
//! would move them run in processes of their own: `events.rs`, `outage.rs`.

/// The shared harness, all of it (`#[path]` on an inline module names the
/// directory of its files: `tests/common/`).
#[macro_use]
#[path = "../common"]
mod common {
    mod backend;
    #[macro_use]
    mod cases;
    mod checks;
    mod health;
    mod locks;
    mod outbox;
    mod payments;

    pub(crate) use self::backend::*;
    pub(crate) use self::checks::*;
    pub(crate) use self::health::*;
    pub(crate) use self::locks::*;
    pub(crate) use self::outbox::*;
}

mod conformance;
mod drain;
mod edges;
mod field_limits;
mod migrations;
mod shutdown;
mod through_tollgate;
mod traces;

use tollgate_proto::payments::v1 as pb;
use tollgate_proto::payments::v1::account_service_client::AccountServiceClient;

/// Opens a USD account through `accounts` and deposits `funds` (minor
/// units) into it; its id.
#[allow(clippy::unwrap_used)]
async fn open_account(
    accounts: &AccountServiceClient<tonic::transport::Channel>,
    funds: i64,
) -> String {
    let mut accounts = accounts.clone();
    let a = accounts
        .create_account(pb::CreateAccountRequest {
            idempotency_key: common::key(),
            owner: "o".into(),
            currency: "USD".into(),
        })
        .await
        .unwrap()
        .into_inner();
    if funds > 0 {
        accounts
            .deposit(pb::DepositRequest {
                idempotency_key: common::key(),
                account_id: a.id.clone(),
                amount: Some(common::usd(funds)),
            })
            .await
            .unwrap();
    }
    a.id
}
