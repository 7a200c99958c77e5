//! Accounts: open, fund, read balances.

use sqlx::any::AnyRow;
use sqlx::Row;
use tollgate_proto::payments::v1 as pb;

use super::batch::Batch;
use super::ledger::{self, Pocket};
use super::{timestamp, KeyGuard, Store};
use crate::error::Error;
use crate::idempotency::{Idempotency, Outcome};
use crate::money::money;
use crate::payment::{self, AccountStatus};

pub(super) const ACCOUNT_COLUMNS: &str = "id, owner, currency, status, available, held, created_at";

/// An account row.
#[derive(Debug, Clone)]
pub(super) struct AccountRow {
    pub(super) id: String,
    pub(super) owner: String,
    pub(super) currency: String,
    pub(super) status: AccountStatus,
    pub(super) available: i64,
    pub(super) held: i64,
    pub(super) created_at: i64,
}

// === impl AccountRow ===

impl AccountRow {
    pub(super) fn from_row(r: &AnyRow) -> Result<Self, Error> {
        Ok(AccountRow {
            id: r.try_get("id")?,
            owner: r.try_get("owner")?,
            currency: r.try_get("currency")?,
            status: AccountStatus::parse(&r.try_get::<String, _>("status")?)?,
            available: r.try_get("available")?,
            held: r.try_get("held")?,
            created_at: r.try_get("created_at")?,
        })
    }

    pub(super) fn to_proto(&self) -> pb::Account {
        let status = self.status.to_proto();
        pb::Account {
            id: self.id.clone(),
            owner: self.owner.clone(),
            currency: self.currency.clone(),
            status: status as i32,
            created_at: Some(timestamp(self.created_at)),
        }
    }

    pub(super) fn balance(&self) -> pb::AccountBalance {
        pb::AccountBalance {
            account_id: self.id.clone(),
            available: Some(money(self.available, &self.currency)),
            held: Some(money(self.held, &self.currency)),
        }
    }
}

// === impl Store ===

impl Store {
    /// Opens an ACTIVE account with zero balances.
    pub async fn create_account(
        &self,
        idem: &Idempotency,
        owner: &str,
        currency: &str,
    ) -> Result<Outcome<pb::Account>, Error> {
        // Nothing to lock: look the key up first, so a retry writes nothing.
        if let Some(outcome) = self.stored(idem).await? {
            return outcome.map(Outcome::Replayed);
        }
        self.idempotent(idem, self.create_account_once(idem, owner, currency))
            .await
    }

    async fn create_account_once(
        &self,
        idem: &Idempotency,
        owner: &str,
        currency: &str,
    ) -> Result<Option<pb::Account>, Error> {
        let tx = self.begin().await?;
        let now = self.now_micros();
        let account = AccountRow {
            id: super::new_id("acct"),
            owner: owner.to_owned(),
            currency: currency.to_owned(),
            status: AccountStatus::Active,
            available: 0,
            held: 0,
            created_at: now,
        };
        let mut writes = Batch::default();
        writes.push_expect(
            "INSERT INTO accounts (id, owner, currency, status, available, held, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, 0, 0, $5, $5)",
            vec![
                (&account.id).into(),
                (&account.owner).into(),
                (&account.currency).into(),
                account.status.as_str().into(),
                now.into(),
            ],
            1,
            "new account",
        );
        let response = account.to_proto();
        let committed = self.commit_response(tx, writes, idem, response).await?;
        Ok(committed)
    }

    /// Adds `amount` (minor units of `currency`) to an account's available
    /// balance, from the outside world.
    pub async fn deposit(
        &self,
        idem: &Idempotency,
        account_id: &str,
        amount: i64,
        currency: &str,
    ) -> Result<Outcome<pb::DepositResponse>, Error> {
        self.idempotent(idem, self.deposit_once(idem, account_id, amount, currency))
            .await
    }

    async fn deposit_once(
        &self,
        idem: &Idempotency,
        account_id: &str,
        amount: i64,
        currency: &str,
    ) -> Result<Option<pb::DepositResponse>, Error> {
        let mut tx = self.begin().await?;
        let mut account = self
            .lock_account(&mut tx, account_id, Some(KeyGuard::new(idem)))
            .await?;
        if account.currency != currency {
            return Err(Error::FailedPrecondition {
                reason: "CURRENCY_MISMATCH",
                subject: format!("accounts/{account_id}"),
                description: format!(
                    "account {account_id} holds {}, not {currency}; deposit in {}",
                    account.currency, account.currency
                ),
            });
        }
        if account.status != AccountStatus::Active {
            return Err(Error::FailedPrecondition {
                reason: "ACCOUNT_INACTIVE",
                subject: format!("accounts/{account_id}"),
                description: format!("account {account_id} is {}", account.status.as_str()),
            });
        }
        payment::check_credit(account_id, account.available, account.held, amount)?;
        let external = format!("external:{currency}");
        let now = self.now_micros();
        let mut writes = Batch::default();
        let txn = ledger::post(
            &mut writes,
            "deposit",
            currency,
            None,
            now,
            &ledger::transfer(
                Pocket::external(&external),
                Pocket::available(account_id),
                amount,
            ),
        )?;
        account.available = account.available.saturating_add(amount);
        let response = pb::DepositResponse {
            deposit_id: txn,
            account_id: account_id.to_owned(),
            amount: Some(money(amount, currency)),
            balance: Some(account.balance()),
        };
        let committed = self.commit_response(tx, writes, idem, response).await?;
        Ok(committed)
    }

    /// Reads an account.
    pub async fn get_account(&self, account_id: &str) -> Result<pb::Account, Error> {
        Ok(self.read_account(account_id).await?.to_proto())
    }

    /// Reads an account's balances.
    pub async fn balance(&self, account_id: &str) -> Result<pb::AccountBalance, Error> {
        Ok(self.read_account(account_id).await?.balance())
    }

    /// Sets an account's status; an operator action, not part of the public
    /// API.
    pub async fn set_account_status(
        &self,
        account_id: &str,
        status: AccountStatus,
    ) -> Result<(), Error> {
        let r = sqlx::query("UPDATE accounts SET status = $1, updated_at = $2 WHERE id = $3")
            .bind(status.as_str())
            .bind(self.now_micros())
            .bind(account_id)
            .execute(&self.pool)
            .await?;
        if r.rows_affected() == 0 {
            return Err(not_found(account_id));
        }
        Ok(())
    }

    async fn read_account(&self, account_id: &str) -> Result<AccountRow, Error> {
        let row = sqlx::query(&format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = $1"
        ))
        .bind(account_id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| not_found(account_id))?;
        AccountRow::from_row(&row)
    }

    /// Locks one account until commit. With a `guard`, finds nothing (NOT
    /// FOUND) when the call's idempotency key is taken, without locking.
    pub(super) async fn lock_account(
        &self,
        conn: &mut sqlx::AnyConnection,
        account_id: &str,
        guard: Option<KeyGuard<'_>>,
    ) -> Result<AccountRow, Error> {
        let sql = format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = $1{}{}",
            guard.as_ref().map_or(String::new(), |g| g.sql(2)),
            self.dialect.lock_rows()
        );
        let mut q = sqlx::query(&sql).bind(account_id);
        if let Some(g) = &guard {
            q = g.bind(q);
        }
        match (q.fetch_optional(&mut *conn).await?, guard) {
            (Some(row), _) => AccountRow::from_row(&row),
            (None, None) => Err(not_found(account_id)),
            (None, Some(g)) => Err(g.miss(conn, "accounts", &[account_id], not_found).await),
        }
    }
}

pub(super) fn not_found(account_id: &str) -> Error {
    Error::NotFound {
        kind: "account",
        id: account_id.to_owned(),
    }
}
