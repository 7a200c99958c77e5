//! The double-entry ledger: every balance change is a group of entries that
//! sums to zero, written in the same transaction as the payment change, and
//! the cached balances on `accounts` move with it.

use sqlx::Row;

use super::batch::{Batch, Value};
use super::Store;
use crate::error::Error;

/// Bucket of a customer account's spendable money.
const AVAILABLE: &str = "available";
/// Bucket of a customer account's money held by authorizations.
const HELD: &str = "held";
/// Bucket of the outside world (deposits come from there).
const EXTERNAL: &str = "external";

/// One leg of a ledger transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Leg<'a> {
    pub(super) account: &'a str,
    pub(super) bucket: &'static str,
    pub(super) amount: i64,
}

/// Where money of a [`transfer`] leaves from or arrives at: one bucket of
/// one account. Built only through the constructors, so a bucket is always
/// one of the three the ledger knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Pocket<'a> {
    account: &'a str,
    bucket: &'static str,
}

// === impl Pocket ===

impl<'a> Pocket<'a> {
    /// The spendable money of a customer account.
    pub(super) fn available(account: &'a str) -> Self {
        Self {
            account,
            bucket: AVAILABLE,
        }
    }

    /// The money of a customer account held by authorizations.
    pub(super) fn held(account: &'a str) -> Self {
        Self {
            account,
            bucket: HELD,
        }
    }

    /// The outside world, `external:<CUR>`.
    pub(super) fn external(account: &'a str) -> Self {
        Self {
            account,
            bucket: EXTERNAL,
        }
    }
}

/// The two legs that move `amount` from one pocket to another: the debit
/// of `from` first, then the credit of `to`, the order in which they are
/// stored. They sum to zero by construction, so [`post`] can only refuse a
/// transaction a caller assembled by hand.
pub(super) fn transfer<'a>(from: Pocket<'a>, to: Pocket<'a>, amount: i64) -> [Leg<'a>; 2] {
    [
        Leg {
            account: from.account,
            bucket: from.bucket,
            amount: -amount,
        },
        Leg {
            account: to.account,
            bucket: to.bucket,
            amount,
        },
    ]
}

/// Adds one balanced ledger transaction to `writes`, and the move of the
/// cached balances of the customer accounts it touches (one statement for
/// all of them). The callers hold those accounts' row locks; the CHECK
/// constraints on `accounts` make an overdraft fail the whole transaction.
pub(super) fn post(
    writes: &mut Batch,
    kind: &str,
    currency: &str,
    payment_id: Option<&str>,
    now: i64,
    legs: &[Leg<'_>],
) -> Result<String, Error> {
    let sum: i64 = legs.iter().map(|l| l.amount).sum();
    if sum != 0 || legs.len() < 2 {
        return Err(Error::Internal(format!(
            "unbalanced ledger transaction {kind}: legs {legs:?} sum to {sum}"
        )));
    }
    let txn_id = super::new_id("ltx");
    let mut sql = String::from(
        "INSERT INTO ledger_entries (txn_id, kind, account_id, bucket, amount, currency, payment_id, created_at) VALUES ",
    );
    let mut args: Vec<Value> = vec![
        (&txn_id).into(),
        kind.into(),
        currency.into(),
        payment_id.into(),
        now.into(),
    ];
    for (i, l) in legs.iter().enumerate() {
        let b = i * 3;
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!(
            "($1, $2, ${}, ${}, ${}, $3, $4, $5)",
            b + 6,
            b + 7,
            b + 8
        ));
        args.extend([l.account.into(), l.bucket.into(), l.amount.into()]);
    }
    writes.push_expect(
        sql,
        args,
        legs.len() as u64,
        format!("ledger entries of {kind}"),
    );

    // Net change per customer account.
    let mut deltas: Vec<(&str, i64, i64)> = Vec::new();
    for l in legs.iter().filter(|l| l.bucket != EXTERNAL) {
        let (a, h) = if l.bucket == AVAILABLE {
            (l.amount, 0)
        } else {
            (0, l.amount)
        };
        match deltas.iter_mut().find(|d| d.0 == l.account) {
            Some(d) => {
                d.1 += a;
                d.2 += h;
            }
            None => deltas.push((l.account, a, h)),
        }
    }
    deltas.sort_unstable_by(|x, y| x.0.cmp(y.0));
    let mut available = String::from("CASE id");
    let mut held = String::from("CASE id");
    let mut ids = Vec::new();
    let mut args: Vec<Value> = vec![now.into()];
    for (i, (account, a, h)) in deltas.iter().enumerate() {
        let b = i * 3 + 2;
        available.push_str(&format!(" WHEN ${b} THEN ${}", b + 1));
        held.push_str(&format!(" WHEN ${b} THEN ${}", b + 2));
        ids.push(format!("${b}"));
        args.extend([(*account).into(), (*a).into(), (*h).into()]);
    }
    let sql = format!(
        "UPDATE accounts SET available = available + {available} ELSE 0 END, \
         held = held + {held} ELSE 0 END, updated_at = $1 WHERE id IN ({})",
        ids.join(", ")
    );
    writes.push_expect(
        sql,
        args,
        deltas.len() as u64,
        format!("account balances of {kind}"),
    );
    Ok(txn_id)
}

/// Result of [`Store::verify_ledger`]: empty lists mean the books balance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LedgerReport {
    /// Ledger transactions whose entries do not sum to zero.
    pub unbalanced_transactions: Vec<String>,
    /// Accounts whose cached balances differ from their entries.
    pub mismatched_accounts: Vec<String>,
    /// Accounts with a negative balance.
    pub negative_accounts: Vec<String>,
    /// Number of entries checked.
    pub entries: i64,
}

// === impl LedgerReport ===

impl LedgerReport {
    /// Whether the books balance.
    pub fn is_balanced(&self) -> bool {
        self.unbalanced_transactions.is_empty()
            && self.mismatched_accounts.is_empty()
            && self.negative_accounts.is_empty()
    }
}

// === impl Store ===

impl Store {
    /// Checks the books: every ledger transaction sums to zero, every
    /// account's cached balances equal the sum of its entries, and no
    /// balance is negative.
    pub async fn verify_ledger(&self) -> Result<LedgerReport, Error> {
        // Full scans: not bound by the statement timeout of calls.
        let mut conn = self.maintenance_connection().await?;
        let unbalanced = sqlx::query(
            "SELECT txn_id FROM ledger_entries GROUP BY txn_id HAVING SUM(amount) <> 0 ORDER BY txn_id",
        )
        .fetch_all(&mut conn)
        .await?
        .iter()
        .map(|r| r.try_get::<String, _>(0))
        .collect::<Result<Vec<_>, _>>()?;
        let mismatched = sqlx::query(
            "SELECT a.id FROM accounts a \
             WHERE a.available <> COALESCE((SELECT CAST(SUM(e.amount) AS BIGINT) FROM ledger_entries e WHERE e.account_id = a.id AND e.bucket = 'available'), 0) \
                OR a.held <> COALESCE((SELECT CAST(SUM(e.amount) AS BIGINT) FROM ledger_entries e WHERE e.account_id = a.id AND e.bucket = 'held'), 0) \
             ORDER BY a.id",
        )
        .fetch_all(&mut conn)
        .await?
        .iter()
        .map(|r| r.try_get::<String, _>(0))
        .collect::<Result<Vec<_>, _>>()?;
        let negative =
            sqlx::query("SELECT id FROM accounts WHERE available < 0 OR held < 0 ORDER BY id")
                .fetch_all(&mut conn)
                .await?
                .iter()
                .map(|r| r.try_get::<String, _>(0))
                .collect::<Result<Vec<_>, _>>()?;
        let entries: i64 = sqlx::query("SELECT COUNT(*) FROM ledger_entries")
            .fetch_one(&mut conn)
            .await?
            .try_get(0)?;
        Ok(LedgerReport {
            unbalanced_transactions: unbalanced,
            mismatched_accounts: mismatched,
            negative_accounts: negative,
            entries,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_debits_from_and_credits_to() {
        let legs = transfer(Pocket::held("acct_a"), Pocket::available("acct_b"), 250);
        assert_eq!(
            legs,
            [
                Leg {
                    account: "acct_a",
                    bucket: HELD,
                    amount: -250,
                },
                Leg {
                    account: "acct_b",
                    bucket: AVAILABLE,
                    amount: 250,
                },
            ]
        );
        assert_eq!(legs.iter().map(|l| l.amount).sum::<i64>(), 0);
    }

    #[test]
    fn transfer_from_outside_leaves_external() {
        let [debit, credit] = transfer(
            Pocket::external("external:EUR"),
            Pocket::available("acct_a"),
            7,
        );
        assert_eq!(
            (debit.account, debit.bucket, debit.amount),
            ("external:EUR", EXTERNAL, -7)
        );
        assert_eq!(
            (credit.account, credit.bucket, credit.amount),
            ("acct_a", AVAILABLE, 7)
        );
    }
}
