//! `payments.v1.PaymentService`.

use tollgate_proto::payments::v1 as pb;
use tollgate_proto::payments::v1::payment_service_server::PaymentService;
use tonic::{Request, Response, Status};

use super::{check_id, check_text, respond, status, Cutoff, Text};
use crate::error::shown;
use crate::error::Violations;
use crate::idempotency::Scope;
use crate::money::{check_amount, check_currency};
use crate::payment;
use crate::store::{micros, NewPayment, PaymentFilter, Store};

const DEFAULT_PAGE_SIZE: i32 = 50;
const MAX_PAGE_SIZE: i32 = 500;
const MAX_METADATA_PAIRS: usize = 50;
const MAX_METADATA_KEY_CHARS: usize = 40;
const MAX_METADATA_VALUE_CHARS: usize = 500;

/// The payment API over a [`Store`].
#[derive(Debug, Clone)]
pub struct PaymentApi {
    store: Store,
    scope: Scope,
    cutoff: Cutoff,
}

impl PaymentApi {
    /// Serves payments from `store`, scoping idempotency keys by `scope`; `cutoff` ends calls at shutdown.
    pub fn new(store: Store, scope: Scope, cutoff: Cutoff) -> Self {
        PaymentApi {
            store,
            scope,
            cutoff: cutoff.serving("payments.v1.PaymentService"),
        }
    }
}

fn page_size(v: &mut Violations, field: &str, size: i32) -> u32 {
    match size {
        0 => DEFAULT_PAGE_SIZE as u32,
        1..=MAX_PAGE_SIZE => size as u32,
        _ => {
            v.add(
                field,
                format!("must be between 1 and {MAX_PAGE_SIZE} (0 means {DEFAULT_PAGE_SIZE}), got {size}"),
            );
            0
        }
    }
}

fn check_optional_amount(v: &mut Violations, amount: Option<i64>) {
    if let Some(a) = amount {
        v.check("amount_minor", check_amount(a));
    }
}

#[tonic::async_trait]
impl PaymentService for PaymentApi {
    async fn create_payment(
        &self,
        request: Request<pb::CreatePaymentRequest>,
    ) -> Result<Response<pb::Payment>, Status> {
        self.cutoff
            .run("CreatePayment", request.metadata(), async {
                let r = request.get_ref();
                let idem = self.scope.idempotency(&request).map_err(status)?;
                let mut v = Violations::default();
                v.check("payer_account_id", check_id(&r.payer_account_id, "acct"));
                v.check("payee_account_id", check_id(&r.payee_account_id, "acct"));
                if !r.payer_account_id.is_empty() && r.payer_account_id == r.payee_account_id {
                    v.add("payee_account_id", "must differ from payer_account_id");
                }
                match &r.amount {
                    None => v.add("amount", "required: {amount_minor, currency}"),
                    Some(m) => {
                        v.check("amount.amount_minor", check_amount(m.amount_minor));
                        v.check("amount.currency", check_currency(&m.currency));
                    }
                }
                let automatic = match pb::CaptureMethod::try_from(r.capture_method) {
                    Ok(pb::CaptureMethod::Unspecified | pb::CaptureMethod::Automatic) => true,
                    Ok(pb::CaptureMethod::Manual) => false,
                    Err(_) => {
                        v.add(
                            "capture_method",
                            format!("unknown value {}", r.capture_method),
                        );
                        true
                    }
                };
                v.check("description", check_text(&r.description, 1000, Text::Prose));
                if r.metadata.len() > MAX_METADATA_PAIRS {
                    v.add("metadata", format!("at most {MAX_METADATA_PAIRS} pairs"));
                }
                for (k, val) in &r.metadata {
                    let field = format!("metadata[{}]", shown(k));
                    if k.is_empty() {
                        v.add(&field, "keys must be 1 to 40 characters");
                    } else {
                        v.check(&field, check_text(k, MAX_METADATA_KEY_CHARS, Text::Line));
                    }
                    v.check(
                        &field,
                        check_text(val, MAX_METADATA_VALUE_CHARS, Text::Line),
                    );
                }
                v.finish().map_err(status)?;
                let m = r.amount.as_ref().cloned().unwrap_or_default();
                let new = NewPayment {
                    payer_account_id: r.payer_account_id.clone(),
                    payee_account_id: r.payee_account_id.clone(),
                    amount: m.amount_minor,
                    currency: m.currency,
                    automatic_capture: automatic,
                    description: r.description.clone(),
                    metadata: r.metadata.clone(),
                };
                self.store
                    .create_payment(&idem, &new)
                    .await
                    .map(respond)
                    .map_err(status)
            })
            .await
    }

    async fn capture_payment(
        &self,
        request: Request<pb::CapturePaymentRequest>,
    ) -> Result<Response<pb::Payment>, Status> {
        self.cutoff
            .run("CapturePayment", request.metadata(), async {
                let r = request.get_ref();
                let idem = self.scope.idempotency(&request).map_err(status)?;
                let mut v = Violations::default();
                v.check("payment_id", check_id(&r.payment_id, "pay"));
                check_optional_amount(&mut v, r.amount_minor);
                v.finish().map_err(status)?;
                self.store
                    .capture_payment(&idem, &r.payment_id, r.amount_minor)
                    .await
                    .map(respond)
                    .map_err(status)
            })
            .await
    }

    async fn cancel_payment(
        &self,
        request: Request<pb::CancelPaymentRequest>,
    ) -> Result<Response<pb::Payment>, Status> {
        self.cutoff
            .run("CancelPayment", request.metadata(), async {
                let r = request.get_ref();
                let idem = self.scope.idempotency(&request).map_err(status)?;
                let mut v = Violations::default();
                v.check("payment_id", check_id(&r.payment_id, "pay"));
                v.check("reason", check_text(&r.reason, 500, Text::Prose));
                v.finish().map_err(status)?;
                self.store
                    .cancel_payment(&idem, &r.payment_id, &r.reason)
                    .await
                    .map(respond)
                    .map_err(status)
            })
            .await
    }

    async fn refund_payment(
        &self,
        request: Request<pb::RefundPaymentRequest>,
    ) -> Result<Response<pb::Refund>, Status> {
        self.cutoff
            .run("RefundPayment", request.metadata(), async {
                let r = request.get_ref();
                let idem = self.scope.idempotency(&request).map_err(status)?;
                let mut v = Violations::default();
                v.check("payment_id", check_id(&r.payment_id, "pay"));
                check_optional_amount(&mut v, r.amount_minor);
                v.check("reason", check_text(&r.reason, 500, Text::Prose));
                v.finish().map_err(status)?;
                self.store
                    .refund_payment(&idem, &r.payment_id, r.amount_minor, &r.reason)
                    .await
                    .map(respond)
                    .map_err(status)
            })
            .await
    }

    async fn get_payment(
        &self,
        request: Request<pb::GetPaymentRequest>,
    ) -> Result<Response<pb::Payment>, Status> {
        self.cutoff
            .run("GetPayment", request.metadata(), async {
                let r = request.get_ref();
                let mut v = Violations::default();
                v.check("payment_id", check_id(&r.payment_id, "pay"));
                v.finish().map_err(status)?;
                self.store
                    .get_payment(&r.payment_id)
                    .await
                    .map(Response::new)
                    .map_err(status)
            })
            .await
    }

    async fn list_payments(
        &self,
        request: Request<pb::ListPaymentsRequest>,
    ) -> Result<Response<pb::ListPaymentsResponse>, Status> {
        self.cutoff
            .run("ListPayments", request.metadata(), async {
                let r = request.get_ref();
                let mut v = Violations::default();
                if !r.account_id.is_empty() {
                    v.check("account_id", check_id(&r.account_id, "acct"));
                }
                let status_filter = match pb::PaymentStatus::try_from(r.status) {
                    Ok(s) => payment::Status::from_proto(s),
                    Err(_) => {
                        v.add("status", format!("unknown value {}", r.status));
                        None
                    }
                };
                let size = page_size(&mut v, "page_size", r.page_size);
                let after = r.created_after.as_ref().map(micros);
                let before = r.created_before.as_ref().map(micros);
                if let (Some(a), Some(b)) = (after, before) {
                    if a >= b {
                        v.add("created_before", "must be later than created_after");
                    }
                }
                v.finish().map_err(status)?;
                let filter = PaymentFilter {
                    account_id: (!r.account_id.is_empty()).then(|| r.account_id.clone()),
                    status: status_filter,
                    created_after: after,
                    created_before: before,
                    page_size: size,
                    page_token: r.page_token.clone(),
                };
                let (payments, next_page_token) =
                    self.store.list_payments(&filter).await.map_err(status)?;
                let count = payments.len();
                Ok(counted(
                    Response::new(pb::ListPaymentsResponse {
                        payments,
                        next_page_token,
                    }),
                    count,
                ))
            })
            .await
    }

    async fn list_refunds(
        &self,
        request: Request<pb::ListRefundsRequest>,
    ) -> Result<Response<pb::ListRefundsResponse>, Status> {
        self.cutoff
            .run("ListRefunds", request.metadata(), async {
                let r = request.get_ref();
                let mut v = Violations::default();
                v.check("payment_id", check_id(&r.payment_id, "pay"));
                let size = page_size(&mut v, "page_size", r.page_size);
                v.finish().map_err(status)?;
                let (refunds, next_page_token) = self
                    .store
                    .list_refunds(&r.payment_id, size, &r.page_token)
                    .await
                    .map_err(status)?;
                let count = refunds.len();
                Ok(counted(
                    Response::new(pb::ListRefundsResponse {
                        refunds,
                        next_page_token,
                    }),
                    count,
                ))
            })
            .await
    }
}

/// A list's response with header `x-result-count`: how many items it
/// holds, for a sidecar that charges reads by what they return
/// (tollgate's `charge: { header: x-result-count }`).
fn counted<T>(mut response: Response<T>, count: usize) -> Response<T> {
    response
        .metadata_mut()
        .insert("x-result-count", (count as u64).into());
    response
}
