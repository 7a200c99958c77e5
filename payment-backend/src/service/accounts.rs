//! `payments.v1.AccountService`.

use tollgate_proto::payments::v1 as pb;
use tollgate_proto::payments::v1::account_service_server::AccountService;
use tonic::{Request, Response, Status};

use super::{check_id, check_text, respond, status, Cutoff, Text};
use crate::error::Violations;
use crate::idempotency::Scope;
use crate::money::{check_amount, check_currency};
use crate::store::Store;

/// The account API over a [`Store`].
#[derive(Debug, Clone)]
pub struct AccountApi {
    store: Store,
    scope: Scope,
    cutoff: Cutoff,
}

impl AccountApi {
    /// Serves accounts from `store`, scoping idempotency keys by `scope`; `cutoff` ends calls at shutdown.
    pub fn new(store: Store, scope: Scope, cutoff: Cutoff) -> Self {
        AccountApi {
            store,
            scope,
            cutoff: cutoff.serving("payments.v1.AccountService"),
        }
    }
}

#[tonic::async_trait]
impl AccountService for AccountApi {
    async fn create_account(
        &self,
        request: Request<pb::CreateAccountRequest>,
    ) -> Result<Response<pb::Account>, Status> {
        self.cutoff
            .run("CreateAccount", request.metadata(), async {
                let r = request.get_ref();
                let idem = self.scope.idempotency(&request).map_err(status)?;
                let mut v = Violations::default();
                if r.owner.trim().is_empty() {
                    v.add("owner", "required: who owns the account");
                }
                v.check("owner", check_text(&r.owner, 200, Text::Line));
                v.check("currency", check_currency(&r.currency));
                v.finish().map_err(status)?;
                self.store
                    .create_account(&idem, &r.owner, &r.currency)
                    .await
                    .map(respond)
                    .map_err(status)
            })
            .await
    }

    async fn deposit(
        &self,
        request: Request<pb::DepositRequest>,
    ) -> Result<Response<pb::DepositResponse>, Status> {
        self.cutoff
            .run("Deposit", request.metadata(), async {
                let r = request.get_ref();
                let idem = self.scope.idempotency(&request).map_err(status)?;
                let mut v = Violations::default();
                v.check("account_id", check_id(&r.account_id, "acct"));
                match &r.amount {
                    None => v.add("amount", "required: {amount_minor, currency}"),
                    Some(m) => {
                        v.check("amount.amount_minor", check_amount(m.amount_minor));
                        v.check("amount.currency", check_currency(&m.currency));
                    }
                }
                v.finish().map_err(status)?;
                let m = r.amount.as_ref().cloned().unwrap_or_default();
                self.store
                    .deposit(&idem, &r.account_id, m.amount_minor, &m.currency)
                    .await
                    .map(respond)
                    .map_err(status)
            })
            .await
    }

    async fn get_account_balance(
        &self,
        request: Request<pb::GetAccountBalanceRequest>,
    ) -> Result<Response<pb::AccountBalance>, Status> {
        self.cutoff
            .run("GetAccountBalance", request.metadata(), async {
                let r = request.get_ref();
                let mut v = Violations::default();
                v.check("account_id", check_id(&r.account_id, "acct"));
                v.finish().map_err(status)?;
                self.store
                    .balance(&r.account_id)
                    .await
                    .map(Response::new)
                    .map_err(status)
            })
            .await
    }

    async fn get_account(
        &self,
        request: Request<pb::GetAccountRequest>,
    ) -> Result<Response<pb::Account>, Status> {
        self.cutoff
            .run("GetAccount", request.metadata(), async {
                let r = request.get_ref();
                let mut v = Violations::default();
                v.check("account_id", check_id(&r.account_id, "acct"));
                v.finish().map_err(status)?;
                self.store
                    .get_account(&r.account_id)
                    .await
                    .map(Response::new)
                    .map_err(status)
            })
            .await
    }
}
