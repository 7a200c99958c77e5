//! Payments and refunds: each operation locks the rows it changes, asks
//! [`crate::payment`] what may happen, and writes the payment, its ledger
//! entries and its outbox event in one transaction.

use std::collections::BTreeMap;

use base64::Engine as _;
use sha2::{Digest, Sha256};
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};
use tollgate_proto::payments::v1 as pb;

use super::accounts::{not_found as account_not_found, AccountRow, ACCOUNT_COLUMNS};
use super::batch::Batch;
use super::ledger::{self, Pocket};
use super::{timestamp, KeyGuard, Record, Store};
use crate::error::Error;
use crate::idempotency::{Idempotency, Outcome};
use crate::money::money;
use crate::payment::{self, AccountView, Amounts, CaptureMethod, Decline, EventKind, Status};

const PAYMENT_COLUMNS: &str = "id, payer_account_id, payee_account_id, currency, amount, \
     amount_capturable, amount_captured, amount_refunded, status, capture_method, decline_code, \
     description, metadata, cancellation_reason, created_at, updated_at, authorization_expires_at, event_seq";

/// Longest page token this service issues is well below this.
const MAX_PAGE_TOKEN_LEN: usize = 512;

const REFUND_COLUMNS: &str = "id, payment_id, amount, currency, status, reason, created_at";

/// A validated CreatePayment request.
#[derive(Debug, Clone)]
pub struct NewPayment {
    /// Account the money comes from.
    pub payer_account_id: String,
    /// Account the money goes to.
    pub payee_account_id: String,
    /// Minor units.
    pub amount: i64,
    /// ISO 4217 code.
    pub currency: String,
    /// Capture at once (`true`) or authorize only.
    pub automatic_capture: bool,
    /// Free text.
    pub description: String,
    /// Caller's key/value pairs.
    pub metadata: BTreeMap<String, String>,
}

/// Filters and page of a ListPayments call.
#[derive(Debug, Clone, Default)]
pub struct PaymentFilter {
    /// Payer or payee.
    pub account_id: Option<String>,
    /// Only this status.
    pub status: Option<Status>,
    /// Created at or after (µs).
    pub created_after: Option<i64>,
    /// Created before (µs).
    pub created_before: Option<i64>,
    /// Rows per page.
    pub page_size: u32,
    /// Opaque token from the previous page.
    pub page_token: String,
}

#[derive(Debug, Clone)]
struct PaymentRow {
    id: String,
    payer: String,
    payee: String,
    currency: String,
    amounts: Amounts,
    capture_method: CaptureMethod,
    decline: Option<Decline>,
    description: String,
    metadata: BTreeMap<String, String>,
    cancellation_reason: String,
    created_at: i64,
    updated_at: i64,
    expires_at: Option<i64>,
    event_seq: i64,
}

// === impl PaymentRow ===

impl PaymentRow {
    fn from_row(r: &AnyRow) -> Result<Self, Error> {
        let metadata: String = r.try_get("metadata")?;
        let decline: Option<String> = r.try_get("decline_code")?;
        Ok(PaymentRow {
            id: r.try_get("id")?,
            payer: r.try_get("payer_account_id")?,
            payee: r.try_get("payee_account_id")?,
            currency: r.try_get("currency")?,
            amounts: Amounts {
                status: Status::parse(&r.try_get::<String, _>("status")?)?,
                amount: r.try_get("amount")?,
                capturable: r.try_get("amount_capturable")?,
                captured: r.try_get("amount_captured")?,
                refunded: r.try_get("amount_refunded")?,
            },
            capture_method: CaptureMethod::parse(&r.try_get::<String, _>("capture_method")?)?,
            decline: decline.as_deref().map(Decline::parse).transpose()?,
            description: r.try_get("description")?,
            metadata: serde_json::from_str(&metadata)
                .map_err(|e| Error::Internal(format!("stored metadata is not JSON: {e}")))?,
            cancellation_reason: r.try_get("cancellation_reason")?,
            created_at: r.try_get("created_at")?,
            updated_at: r.try_get("updated_at")?,
            expires_at: r.try_get("authorization_expires_at")?,
            event_seq: r.try_get("event_seq")?,
        })
    }

    fn to_proto(&self) -> pb::Payment {
        let a = &self.amounts;
        let c = &self.currency;
        pb::Payment {
            id: self.id.clone(),
            status: a.status.to_proto() as i32,
            payer_account_id: self.payer.clone(),
            payee_account_id: self.payee.clone(),
            amount: Some(money(a.amount, c)),
            amount_capturable: Some(money(a.capturable, c)),
            amount_captured: Some(money(a.captured, c)),
            amount_refunded: Some(money(a.refunded, c)),
            capture_method: self.capture_method.to_proto() as i32,
            decline_code: self
                .decline
                .map_or(pb::DeclineCode::Unspecified, Decline::to_proto)
                as i32,
            description: self.description.clone(),
            metadata: self.metadata.clone(),
            cancellation_reason: self.cancellation_reason.clone(),
            created_at: Some(timestamp(self.created_at)),
            updated_at: Some(timestamp(self.updated_at)),
            authorization_expires_at: self.expires_at.map(timestamp),
        }
    }
}

fn refund_from_row(r: &AnyRow) -> Result<pb::Refund, Error> {
    let currency: String = r.try_get("currency")?;
    Ok(pb::Refund {
        id: r.try_get("id")?,
        payment_id: r.try_get("payment_id")?,
        amount: Some(money(r.try_get("amount")?, &currency)),
        status: pb::RefundStatus::Succeeded as i32,
        reason: r.try_get("reason")?,
        created_at: Some(timestamp(r.try_get("created_at")?)),
    })
}

fn payment_not_found(id: &str) -> Error {
    Error::NotFound {
        kind: "payment",
        id: id.to_owned(),
    }
}

// === impl Store ===

impl Store {
    /// Authorizes (and, with automatic capture, captures) a payment, or
    /// stores it DECLINED with the reason.
    pub async fn create_payment(
        &self,
        idem: &Idempotency,
        new: &NewPayment,
    ) -> Result<Outcome<pb::Payment>, Error> {
        self.idempotent(idem, self.create_payment_once(idem, new))
            .await
    }

    async fn create_payment_once(
        &self,
        idem: &Idempotency,
        new: &NewPayment,
    ) -> Result<Option<pb::Payment>, Error> {
        let mut tx = self.begin().await?;
        let (payer, payee) = self
            .lock_pair(
                &mut tx,
                &new.payer_account_id,
                &new.payee_account_id,
                Some(KeyGuard::new(idem)),
            )
            .await?;
        let now = self.now_micros();
        let decision = payment::authorize(&view(&payer), &view(&payee), new.amount, &new.currency);
        if decision.is_ok() && new.automatic_capture {
            payment::check_credit(&payee.id, payee.available, payee.held, new.amount)?;
        }
        let (status, capturable, captured, expires_at) = match decision {
            Err(_) => (Status::Declined, 0, 0, None),
            Ok(()) if new.automatic_capture => (Status::Captured, 0, new.amount, None),
            Ok(()) => (
                Status::RequiresCapture,
                new.amount,
                0,
                Some(now.saturating_add(self.authorization_ttl_micros)),
            ),
        };
        // Inserted in its final state, with its first event.
        let p = PaymentRow {
            id: super::new_id("pay"),
            payer: new.payer_account_id.clone(),
            payee: new.payee_account_id.clone(),
            currency: new.currency.clone(),
            amounts: Amounts {
                status,
                amount: new.amount,
                capturable,
                captured,
                refunded: 0,
            },
            capture_method: if new.automatic_capture {
                CaptureMethod::Automatic
            } else {
                CaptureMethod::Manual
            },
            decline: decision.err(),
            description: new.description.clone(),
            metadata: new.metadata.clone(),
            cancellation_reason: String::new(),
            created_at: now,
            updated_at: now,
            expires_at,
            event_seq: 1,
        };
        let mut writes = Batch::default();
        writes.push_expect(
            format!(
                "INSERT INTO payments ({PAYMENT_COLUMNS}) VALUES \
                 ($1, $2, $3, $4, $5, $6, $7, 0, $8, $9, $10, $11, $12, '', $13, $13, $14, 1)"
            ),
            vec![
                (&p.id).into(),
                (&p.payer).into(),
                (&p.payee).into(),
                (&p.currency).into(),
                p.amounts.amount.into(),
                capturable.into(),
                captured.into(),
                status.as_str().into(),
                p.capture_method.as_str().into(),
                p.decline.map(Decline::as_str).into(),
                (&p.description).into(),
                serde_json::to_string(&p.metadata)
                    .unwrap_or_else(|_| "{}".into())
                    .into(),
                now.into(),
                expires_at.into(),
            ],
            1,
            "new payment",
        );
        let amount = new.amount;
        let event = match status {
            Status::Declined => EventKind::Declined,
            Status::Captured => {
                ledger::post(
                    &mut writes,
                    "capture",
                    &p.currency,
                    Some(&p.id),
                    now,
                    &ledger::transfer(
                        Pocket::available(&p.payer),
                        Pocket::available(&p.payee),
                        amount,
                    ),
                )?;
                EventKind::Captured
            }
            _ => {
                ledger::post(
                    &mut writes,
                    "authorize",
                    &p.currency,
                    Some(&p.id),
                    now,
                    &ledger::transfer(Pocket::available(&p.payer), Pocket::held(&p.payer), amount),
                )?;
                EventKind::Authorized
            }
        };
        let response = emit(&mut writes, &p, event, None, now);
        let committed = self.commit_response(tx, writes, idem, response).await?;
        if committed.is_some() {
            crate::metrics::payment_transition(status);
        }
        Ok(committed)
    }

    /// Captures all or part of an authorization; the rest is released.
    pub async fn capture_payment(
        &self,
        idem: &Idempotency,
        payment_id: &str,
        amount: Option<i64>,
    ) -> Result<Outcome<pb::Payment>, Error> {
        self.idempotent(idem, self.capture_payment_once(idem, payment_id, amount))
            .await
    }

    async fn capture_payment_once(
        &self,
        idem: &Idempotency,
        payment_id: &str,
        amount: Option<i64>,
    ) -> Result<Option<pb::Payment>, Error> {
        let mut tx = self.begin().await?;
        let mut p = self
            .lock_payment(&mut tx, payment_id, Some(KeyGuard::new(idem)))
            .await?;
        let now = self.now_micros();
        if p.amounts.status == Status::RequiresCapture && payment::is_expired(p.expires_at, now) {
            // Expired, and the sweeper has not come by yet: release the hold
            // now, and answer (and store under the key) that it expired.
            let error = payment::authorization_expired(payment_id, p.expires_at);
            let mut writes = Batch::default();
            expire(&mut writes, &mut p, now)?;
            let status = error.into_status();
            if !self
                .finish(tx, writes, idem, Record::Failed(&status))
                .await?
            {
                return Ok(None);
            }
            crate::metrics::payment_transition(Status::Expired);
            return Err(Error::Recorded {
                status,
                replayed: false,
            });
        }
        let plan = payment::plan_capture(payment_id, &p.amounts, p.expires_at, now, amount)?;
        // Payment first, then both accounts in id order: the one lock order
        // of every call, so no two calls wait on each other in a cycle.
        let (_, payee) = self.lock_pair(&mut tx, &p.payer, &p.payee, None).await?;
        payment::check_credit(&p.payee, payee.available, payee.held, plan.capture)?;
        let mut legs = ledger::transfer(
            Pocket::held(&p.payer),
            Pocket::available(&p.payee),
            plan.capture,
        )
        .to_vec();
        if plan.release > 0 {
            legs.extend(ledger::transfer(
                Pocket::held(&p.payer),
                Pocket::available(&p.payer),
                plan.release,
            ));
        }
        let mut writes = Batch::default();
        ledger::post(
            &mut writes,
            "capture",
            &p.currency,
            Some(payment_id),
            now,
            &legs,
        )?;
        p.amounts.status = Status::Captured;
        p.amounts.capturable = 0;
        p.amounts.captured = plan.capture;
        p.expires_at = None;
        let response = save_event(&mut writes, &mut p, EventKind::Captured, None, now);
        let committed = self.commit_response(tx, writes, idem, response).await?;
        if committed.is_some() {
            crate::metrics::payment_transition(Status::Captured);
        }
        Ok(committed)
    }

    /// Voids an uncaptured authorization and releases its hold.
    pub async fn cancel_payment(
        &self,
        idem: &Idempotency,
        payment_id: &str,
        reason: &str,
    ) -> Result<Outcome<pb::Payment>, Error> {
        self.idempotent(idem, self.cancel_payment_once(idem, payment_id, reason))
            .await
    }

    async fn cancel_payment_once(
        &self,
        idem: &Idempotency,
        payment_id: &str,
        reason: &str,
    ) -> Result<Option<pb::Payment>, Error> {
        let mut tx = self.begin().await?;
        let mut p = self
            .lock_payment(&mut tx, payment_id, Some(KeyGuard::new(idem)))
            .await?;
        let release = payment::plan_cancel(payment_id, &p.amounts)?;
        let now = self.now_micros();
        let mut writes = Batch::default();
        release_hold(&mut writes, &mut p, release, Status::Canceled, now)?;
        p.cancellation_reason = reason.to_owned();
        let response = save_event(&mut writes, &mut p, EventKind::Canceled, None, now);
        let committed = self.commit_response(tx, writes, idem, response).await?;
        if committed.is_some() {
            crate::metrics::payment_transition(Status::Canceled);
        }
        Ok(committed)
    }

    /// Refunds all or part of what was captured and not yet refunded.
    pub async fn refund_payment(
        &self,
        idem: &Idempotency,
        payment_id: &str,
        amount: Option<i64>,
        reason: &str,
    ) -> Result<Outcome<pb::Refund>, Error> {
        self.idempotent(
            idem,
            self.refund_payment_once(idem, payment_id, amount, reason),
        )
        .await
    }

    async fn refund_payment_once(
        &self,
        idem: &Idempotency,
        payment_id: &str,
        amount: Option<i64>,
        reason: &str,
    ) -> Result<Option<pb::Refund>, Error> {
        let mut tx = self.begin().await?;
        let mut p = self
            .lock_payment(&mut tx, payment_id, Some(KeyGuard::new(idem)))
            .await?;
        let (refund_amount, status) = payment::plan_refund(payment_id, &p.amounts, amount)?;
        // Payment first, then both accounts in id order (as capture and
        // create lock them).
        let (payer, payee) = self.lock_pair(&mut tx, &p.payer, &p.payee, None).await?;
        if payee.available < refund_amount {
            return Err(Error::FailedPrecondition {
                reason: "PAYEE_INSUFFICIENT_FUNDS",
                subject: format!("accounts/{}", p.payee),
                description: format!(
                    "payee account {} has less available than the refund of {refund_amount} {}; fund it, then retry with a new idempotency key",
                    p.payee, p.currency
                ),
            });
        }
        payment::check_credit(&p.payer, payer.available, payer.held, refund_amount)?;
        let now = self.now_micros();
        let mut writes = Batch::default();
        ledger::post(
            &mut writes,
            "refund",
            &p.currency,
            Some(payment_id),
            now,
            &ledger::transfer(
                Pocket::available(&p.payee),
                Pocket::available(&p.payer),
                refund_amount,
            ),
        )?;
        let refund = pb::Refund {
            id: super::new_id("re"),
            payment_id: payment_id.to_owned(),
            amount: Some(money(refund_amount, &p.currency)),
            status: pb::RefundStatus::Succeeded as i32,
            reason: reason.to_owned(),
            created_at: Some(timestamp(now)),
        };
        writes.push_expect(
            format!(
                "INSERT INTO refunds ({REFUND_COLUMNS}) VALUES ($1, $2, $3, $4, 'SUCCEEDED', $5, $6)"
            ),
            vec![
                (&refund.id).into(),
                payment_id.into(),
                refund_amount.into(),
                (&p.currency).into(),
                reason.into(),
                now.into(),
            ],
            1,
            "new refund",
        );
        p.amounts.refunded += refund_amount;
        p.amounts.status = status;
        save_event(
            &mut writes,
            &mut p,
            EventKind::RefundSucceeded,
            Some(&refund),
            now,
        );
        let committed = self.commit_response(tx, writes, idem, refund).await?;
        if committed.is_some() {
            crate::metrics::payment_transition(status);
        }
        Ok(committed)
    }

    /// Releases authorizations whose time ran out (EXPIRED), at most `limit`
    /// of them; returns how many.
    pub async fn expire_authorizations(&self, limit: u32) -> Result<u32, Error> {
        let now = self.now_micros();
        let due: Vec<String> = sqlx::query(
            "SELECT id FROM payments WHERE status = 'REQUIRES_CAPTURE' AND authorization_expires_at <= $1 \
             ORDER BY authorization_expires_at LIMIT $2",
        )
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
        let mut expired = 0;
        for id in due {
            let mut tx = self.begin().await?;
            let mut p = self.lock_payment(&mut tx, &id, None).await?;
            // Captured or canceled since the scan: nothing to do.
            if p.amounts.status != Status::RequiresCapture
                || !payment::is_expired(p.expires_at, now)
            {
                continue;
            }
            let mut writes = Batch::default();
            expire(&mut writes, &mut p, now)?;
            writes.execute(&mut tx, self.dialect).await?;
            tx.commit().await?;
            crate::metrics::payment_transition(Status::Expired);
            expired += 1;
        }
        Ok(expired)
    }

    /// Reads a payment.
    pub async fn get_payment(&self, payment_id: &str) -> Result<pb::Payment, Error> {
        let row = sqlx::query(&format!(
            "SELECT {PAYMENT_COLUMNS} FROM payments WHERE id = $1"
        ))
        .bind(payment_id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| payment_not_found(payment_id))?;
        Ok(PaymentRow::from_row(&row)?.to_proto())
    }

    /// Lists payments newest first, in a stable keyset order
    /// (`created_at`, `id`); returns the page and the next page's token.
    pub async fn list_payments(
        &self,
        f: &PaymentFilter,
    ) -> Result<(Vec<pb::Payment>, String), Error> {
        let filter_hash = filter_hash(&[
            f.account_id.as_deref().unwrap_or(""),
            f.status.map_or("", Status::as_str),
            &f.created_after.map(|t| t.to_string()).unwrap_or_default(),
            &f.created_before.map(|t| t.to_string()).unwrap_or_default(),
        ]);
        let after = decode_page_token(&f.page_token, &filter_hash)?;
        let mut sql = format!("SELECT {PAYMENT_COLUMNS} FROM payments WHERE 1 = 1");
        let mut n = 0;
        let mut next = || {
            n += 1;
            n
        };
        if f.account_id.is_some() {
            let i = next();
            sql.push_str(&format!(
                " AND (payer_account_id = ${i} OR payee_account_id = ${i})"
            ));
        }
        if f.status.is_some() {
            sql.push_str(&format!(" AND status = ${}", next()));
        }
        if f.created_after.is_some() {
            sql.push_str(&format!(" AND created_at >= ${}", next()));
        }
        if f.created_before.is_some() {
            sql.push_str(&format!(" AND created_at < ${}", next()));
        }
        if after.is_some() {
            let (t, i) = (next(), next());
            sql.push_str(&format!(
                " AND (created_at < ${t} OR (created_at = ${t} AND id < ${i}))"
            ));
        }
        sql.push_str(&format!(
            " ORDER BY created_at DESC, id DESC LIMIT ${}",
            next()
        ));
        let mut q = sqlx::query(&sql);
        if let Some(a) = &f.account_id {
            q = q.bind(a);
        }
        if let Some(s) = f.status {
            q = q.bind(s.as_str());
        }
        if let Some(t) = f.created_after {
            q = q.bind(t);
        }
        if let Some(t) = f.created_before {
            q = q.bind(t);
        }
        if let Some((t, id)) = &after {
            q = q.bind(*t).bind(id.clone());
        }
        q = q.bind(i64::from(f.page_size) + 1);
        let rows = q.fetch_all(&self.pool).await?;
        let mut payments = rows
            .iter()
            .map(PaymentRow::from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let token = if payments.len() > f.page_size as usize {
            payments.truncate(f.page_size as usize);
            payments
                .last()
                .map(|p| encode_page_token(p.created_at, &p.id, &filter_hash))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok((payments.iter().map(PaymentRow::to_proto).collect(), token))
    }

    /// Lists a payment's refunds newest first.
    pub async fn list_refunds(
        &self,
        payment_id: &str,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<pb::Refund>, String), Error> {
        let filter_hash = filter_hash(&[payment_id]);
        let after = decode_page_token(page_token, &filter_hash)?;
        // NOT_FOUND for an unknown payment rather than an empty list.
        self.get_payment(payment_id).await?;
        let first_page = format!(
            "SELECT {REFUND_COLUMNS} FROM refunds WHERE payment_id = $1 \
             ORDER BY created_at DESC, id DESC LIMIT $2"
        );
        let later_page = format!(
            "SELECT {REFUND_COLUMNS} FROM refunds WHERE payment_id = $1 \
             AND (created_at < $2 OR (created_at = $2 AND id < $3)) \
             ORDER BY created_at DESC, id DESC LIMIT $4"
        );
        let limit = i64::from(page_size) + 1;
        let rows = match &after {
            None => sqlx::query(&first_page).bind(payment_id).bind(limit),
            Some((t, id)) => sqlx::query(&later_page)
                .bind(payment_id)
                .bind(*t)
                .bind(id.clone())
                .bind(limit),
        }
        .fetch_all(&self.pool)
        .await?;
        let mut refunds = rows
            .iter()
            .map(|r| Ok((r.try_get::<i64, _>("created_at")?, refund_from_row(r)?)))
            .collect::<Result<Vec<_>, Error>>()?;
        let token = if refunds.len() > page_size as usize {
            refunds.truncate(page_size as usize);
            refunds
                .last()
                .map(|(t, r)| encode_page_token(*t, &r.id, &filter_hash))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok((refunds.into_iter().map(|(_, r)| r).collect(), token))
    }

    /// Locks a payment until commit. With a `guard`, finds nothing (NOT
    /// FOUND) when the call's idempotency key is taken, without locking.
    async fn lock_payment(
        &self,
        conn: &mut AnyConnection,
        payment_id: &str,
        guard: Option<KeyGuard<'_>>,
    ) -> Result<PaymentRow, Error> {
        let sql = format!(
            "SELECT {PAYMENT_COLUMNS} FROM payments WHERE id = $1{}{}",
            guard.as_ref().map_or(String::new(), |g| g.sql(2)),
            self.dialect.lock_rows()
        );
        let mut q = sqlx::query(&sql).bind(payment_id);
        if let Some(g) = &guard {
            q = g.bind(q);
        }
        match (q.fetch_optional(&mut *conn).await?, guard) {
            (Some(row), _) => PaymentRow::from_row(&row),
            (None, None) => Err(payment_not_found(payment_id)),
            (None, Some(g)) => Err(g
                .miss(conn, "payments", &[payment_id], payment_not_found)
                .await),
        }
    }

    /// Locks payer and payee in id order (so two calls between the same
    /// accounts, in either direction, cannot deadlock). With a `guard`, as
    /// [`Store::lock_payment`].
    async fn lock_pair(
        &self,
        conn: &mut AnyConnection,
        payer: &str,
        payee: &str,
        guard: Option<KeyGuard<'_>>,
    ) -> Result<(AccountRow, AccountRow), Error> {
        let sql = format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id IN ($1, $2){} ORDER BY id{}",
            guard.as_ref().map_or(String::new(), |g| g.sql(3)),
            self.dialect.lock_rows()
        );
        let mut q = sqlx::query(&sql).bind(payer).bind(payee);
        if let Some(g) = &guard {
            q = g.bind(q);
        }
        let rows = q.fetch_all(&mut *conn).await?;
        if rows.is_empty() {
            if let Some(g) = guard {
                return Err(g
                    .miss(conn, "accounts", &[payer, payee], account_not_found)
                    .await);
            }
        }
        let rows = rows
            .iter()
            .map(AccountRow::from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let find = |id: &str| {
            rows.iter()
                .find(|a| a.id == id)
                .cloned()
                .ok_or_else(|| account_not_found(id))
        };
        Ok((find(payer)?, find(payee)?))
    }
}

/// Expires an authorization: releases its hold and writes its event.
fn expire(writes: &mut Batch, p: &mut PaymentRow, now: i64) -> Result<(), Error> {
    let release = p.amounts.capturable;
    release_hold(writes, p, release, Status::Expired, now)?;
    save_event(writes, p, EventKind::Expired, None, now);
    Ok(())
}

/// Releases an authorization's hold back to the payer.
fn release_hold(
    writes: &mut Batch,
    p: &mut PaymentRow,
    release: i64,
    status: Status,
    now: i64,
) -> Result<(), Error> {
    if release > 0 {
        let kind = if status == Status::Expired {
            "expire"
        } else {
            "cancel"
        };
        ledger::post(
            writes,
            kind,
            &p.currency,
            Some(&p.id),
            now,
            &ledger::transfer(Pocket::held(&p.payer), Pocket::available(&p.payer), release),
        )?;
    }
    p.amounts.status = status;
    p.amounts.capturable = 0;
    if status != Status::Expired {
        // An expired payment keeps the time it expired at.
        p.expires_at = None;
    }
    Ok(())
}

/// Writes the payment's new state (all mutable columns) and its outbox
/// event; returns the payment as the caller sees it.
fn save_event(
    writes: &mut Batch,
    p: &mut PaymentRow,
    kind: EventKind,
    refund: Option<&pb::Refund>,
    now: i64,
) -> pb::Payment {
    p.event_seq += 1;
    p.updated_at = now;
    writes.push_expect(
        "UPDATE payments SET status = $1, amount_capturable = $2, amount_captured = $3, \
         amount_refunded = $4, cancellation_reason = $5, updated_at = $6, \
         authorization_expires_at = $7, event_seq = $8 WHERE id = $9",
        vec![
            p.amounts.status.as_str().into(),
            p.amounts.capturable.into(),
            p.amounts.captured.into(),
            p.amounts.refunded.into(),
            (&p.cancellation_reason).into(),
            now.into(),
            p.expires_at.into(),
            p.event_seq.into(),
            (&p.id).into(),
        ],
        1,
        "payment update",
    );
    emit(writes, p, kind, refund, now)
}

/// Writes the outbox event of the payment's latest change (sequence
/// `p.event_seq`) and returns the payment as the caller sees it.
fn emit(
    writes: &mut Batch,
    p: &PaymentRow,
    kind: EventKind,
    refund: Option<&pb::Refund>,
    now: i64,
) -> pb::Payment {
    let payment = p.to_proto();
    let event = pb::PaymentEvent {
        event_id: super::new_id("evt"),
        event_type: kind.as_str().to_owned(),
        payment_id: p.id.clone(),
        occurred_at: Some(timestamp(now)),
        payment: Some(payment.clone()),
        refund: refund.cloned(),
        sequence: p.event_seq,
    };
    super::outbox::insert(writes, &event, now);
    payment
}

fn view(a: &AccountRow) -> AccountView<'_> {
    AccountView {
        status: a.status,
        currency: &a.currency,
        available: a.available,
    }
}

fn filter_hash(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    let d = h.finalize();
    d[..6].iter().map(|b| format!("{b:02x}")).collect()
}

fn encode_page_token(created_at: i64, id: &str, filter_hash: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!("v1|{created_at}|{id}|{filter_hash}"))
}

fn decode_page_token(token: &str, filter_hash: &str) -> Result<Option<(i64, String)>, Error> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || {
        Error::invalid(
            "page_token",
            "not a token this service issued; pass next_page_token from the previous response unchanged",
        )
    };
    if token.len() > MAX_PAGE_TOKEN_LEN {
        return Err(bad());
    }
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let raw = String::from_utf8(raw).map_err(|_| bad())?;
    let mut parts = raw.splitn(4, '|');
    let (Some("v1"), Some(t), Some(id), Some(h)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    if h != filter_hash {
        return Err(Error::invalid(
            "page_token",
            "was issued for different filters; repeat the first request's filters, or start again without a page_token",
        ));
    }
    Ok(Some((t.parse().map_err(|_| bad())?, id.to_owned())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_bind_to_filters() {
        let h = filter_hash(&["acct_1", ""]);
        let t = encode_page_token(42, "pay_x", &h);
        assert_eq!(
            decode_page_token(&t, &h).unwrap(),
            Some((42, "pay_x".into()))
        );
        let other = filter_hash(&["acct_2", ""]);
        assert!(decode_page_token(&t, &other).is_err());
        assert!(decode_page_token("garbage!", &h).is_err());
        assert_eq!(decode_page_token("", &h).unwrap(), None);
    }
}
