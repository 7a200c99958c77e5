//! Payment calls with the tests' defaults (a fresh idempotency key, USD),
//! expecting success.

#![allow(clippy::expect_used)]

use tollgate_proto::payments::v1 as pb;

use super::backend::{create_req, key, Backend};

// === impl Backend ===

impl Backend {
    /// Creates a payment of `amount` USD minor units; `manual` only
    /// authorizes it.
    pub(crate) async fn pay(
        &mut self,
        payer: &str,
        payee: &str,
        amount: i64,
        manual: bool,
    ) -> pb::Payment {
        self.payments
            .create_payment(create_req(payer, payee, amount, manual))
            .await
            .expect("create payment")
            .into_inner()
    }

    /// Captures `amount` (all of it: `None`) of an authorization.
    pub(crate) async fn capture(&mut self, payment_id: &str, amount: Option<i64>) -> pb::Payment {
        self.payments
            .capture_payment(pb::CapturePaymentRequest {
                idempotency_key: key(),
                payment_id: payment_id.into(),
                amount_minor: amount,
            })
            .await
            .expect("capture")
            .into_inner()
    }

    /// Refunds `amount` (all that is left: `None`) of a payment.
    pub(crate) async fn refund(&mut self, payment_id: &str, amount: Option<i64>) -> pb::Refund {
        self.payments
            .refund_payment(pb::RefundPaymentRequest {
                idempotency_key: key(),
                payment_id: payment_id.into(),
                amount_minor: amount,
                reason: "test".into(),
            })
            .await
            .expect("refund")
            .into_inner()
    }
}
