//! What tests read back to check an outcome: balances, whether the books
//! balance, a payment's status.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use tollgate_proto::payments::v1 as pb;

use super::backend::Backend;

// === impl Backend ===

impl Backend {
    /// The `(available, held)` balances of `account`.
    pub(crate) async fn balance(&mut self, account: &str) -> (i64, i64) {
        let b = self
            .accounts
            .get_account_balance(pb::GetAccountBalanceRequest {
                account_id: account.into(),
            })
            .await
            .expect("balance")
            .into_inner();
        (
            b.available.unwrap().amount_minor,
            b.held.unwrap().amount_minor,
        )
    }

    /// Asserts that the books balance.
    pub(crate) async fn assert_ledger_balanced(&self) {
        let report = self.store.verify_ledger().await.expect("verify ledger");
        assert!(report.is_balanced(), "ledger does not balance: {report:#?}");
    }
}

pub(crate) fn status_of(p: &pb::Payment) -> pb::PaymentStatus {
    pb::PaymentStatus::try_from(p.status).unwrap()
}
