//! The payment state machine and its arithmetic, as pure functions.
//!
//! The store reads and locks rows, asks these functions what may happen, and
//! writes the result in the same transaction. Nothing here touches a
//! database, so every rule is unit-tested below.
//!
//! ```text
//!  CreatePayment ──manual──▶ REQUIRES_CAPTURE ──capture──▶ CAPTURED ──refund──▶ PARTIALLY_REFUNDED ──▶ REFUNDED
//!        │                        │  │                        └──────────refund (all)──────────────────▲
//!        ├──automatic─────────────┼──┼──────────────────────▶ CAPTURED
//!        └──decline──▶ DECLINED   │  └──sweeper──▶ EXPIRED
//!                                 └──cancel──▶ CANCELED
//! ```

use tollgate_proto::payments::v1 as pb;

use crate::error::Error;
use crate::money::MAX_BALANCE_MINOR;

/// The stored status of a payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Authorized; the amount is held on the payer's account.
    RequiresCapture,
    /// Money moved to the payee; refundable.
    Captured,
    /// Part of the captured amount was refunded.
    PartiallyRefunded,
    /// Everything captured was refunded.
    Refunded,
    /// The authorization was voided before capture.
    Canceled,
    /// Refused at creation (see the decline code); no money moved.
    Declined,
    /// The authorization was not captured in time and was released.
    Expired,
}

/// The stored status of an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountStatus {
    /// Pays and is paid.
    Active,
    /// Neither pays nor is paid, for now (an operator's decision).
    Frozen,
    /// Neither pays nor is paid, for good.
    Closed,
}

/// How a payment is captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureMethod {
    /// At creation: the money moves at once.
    Automatic,
    /// Later, by CapturePayment: the amount is held until then.
    Manual,
}

/// What happened to a payment, as its outbox event names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Authorized; the amount is held.
    Authorized,
    /// Money moved to the payee (at creation or by a capture).
    Captured,
    /// Refused at creation.
    Declined,
    /// The authorization was voided.
    Canceled,
    /// The authorization lapsed.
    Expired,
    /// A refund of it succeeded.
    RefundSucceeded,
}

/// Why a payment was declined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decline {
    /// The payer's available balance is below the amount.
    InsufficientFunds,
    /// The payer or payee account is frozen or closed.
    AccountInactive,
    /// The amount's currency differs from an account's currency.
    CurrencyMismatch,
}

/// An account as the rules see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountView<'a> {
    /// Account status.
    pub status: AccountStatus,
    /// ISO 4217 code.
    pub currency: &'a str,
    /// Spendable balance in minor units.
    pub available: i64,
}

/// A payment's amounts and status as the rules see them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Amounts {
    /// Current status.
    pub status: Status,
    /// The authorized amount.
    pub amount: i64,
    /// What may still be captured.
    pub capturable: i64,
    /// What was captured.
    pub captured: i64,
    /// What was refunded so far.
    pub refunded: i64,
}

/// What a capture does: move `capture` to the payee and release `release`
/// back to the payer's available balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapturePlan {
    /// Moved from the payer's hold to the payee.
    pub capture: i64,
    /// Returned from the payer's hold to the payer.
    pub release: i64,
}

// === impl AccountStatus ===

impl AccountStatus {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            AccountStatus::Active => "ACTIVE",
            AccountStatus::Frozen => "FROZEN",
            AccountStatus::Closed => "CLOSED",
        }
    }

    /// Parses the stored name.
    pub fn parse(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "ACTIVE" => AccountStatus::Active,
            "FROZEN" => AccountStatus::Frozen,
            "CLOSED" => AccountStatus::Closed,
            other => {
                return Err(Error::Internal(format!(
                    "unknown stored account status {other:?}"
                )))
            }
        })
    }

    /// The API enum.
    pub fn to_proto(self) -> pb::AccountStatus {
        match self {
            AccountStatus::Active => pb::AccountStatus::Active,
            AccountStatus::Frozen => pb::AccountStatus::Frozen,
            AccountStatus::Closed => pb::AccountStatus::Closed,
        }
    }
}

// === impl CaptureMethod ===

impl CaptureMethod {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            CaptureMethod::Automatic => "AUTOMATIC",
            CaptureMethod::Manual => "MANUAL",
        }
    }

    /// Parses the stored name.
    pub fn parse(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "AUTOMATIC" => CaptureMethod::Automatic,
            "MANUAL" => CaptureMethod::Manual,
            other => {
                return Err(Error::Internal(format!(
                    "unknown stored capture method {other:?}"
                )))
            }
        })
    }

    /// The API enum.
    pub fn to_proto(self) -> pb::CaptureMethod {
        match self {
            CaptureMethod::Automatic => pb::CaptureMethod::Automatic,
            CaptureMethod::Manual => pb::CaptureMethod::Manual,
        }
    }
}

// === impl EventKind ===

impl EventKind {
    /// The `event_type` of the event (stored in the outbox and published).
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Authorized => "payment.authorized",
            EventKind::Captured => "payment.captured",
            EventKind::Declined => "payment.declined",
            EventKind::Canceled => "payment.canceled",
            EventKind::Expired => "payment.expired",
            EventKind::RefundSucceeded => "refund.succeeded",
        }
    }
}

// === impl Status ===

impl Status {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::RequiresCapture => "REQUIRES_CAPTURE",
            Status::Captured => "CAPTURED",
            Status::PartiallyRefunded => "PARTIALLY_REFUNDED",
            Status::Refunded => "REFUNDED",
            Status::Canceled => "CANCELED",
            Status::Declined => "DECLINED",
            Status::Expired => "EXPIRED",
        }
    }

    /// Parses the stored name.
    pub fn parse(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "REQUIRES_CAPTURE" => Status::RequiresCapture,
            "CAPTURED" => Status::Captured,
            "PARTIALLY_REFUNDED" => Status::PartiallyRefunded,
            "REFUNDED" => Status::Refunded,
            "CANCELED" => Status::Canceled,
            "DECLINED" => Status::Declined,
            "EXPIRED" => Status::Expired,
            other => return Err(Error::Internal(format!("unknown stored status {other:?}"))),
        })
    }

    /// The API enum.
    pub fn to_proto(self) -> pb::PaymentStatus {
        match self {
            Status::RequiresCapture => pb::PaymentStatus::RequiresCapture,
            Status::Captured => pb::PaymentStatus::Captured,
            Status::PartiallyRefunded => pb::PaymentStatus::PartiallyRefunded,
            Status::Refunded => pb::PaymentStatus::Refunded,
            Status::Canceled => pb::PaymentStatus::Canceled,
            Status::Declined => pb::PaymentStatus::Declined,
            Status::Expired => pb::PaymentStatus::Expired,
        }
    }

    /// From the API enum; `None` for UNSPECIFIED.
    pub fn from_proto(s: pb::PaymentStatus) -> Option<Self> {
        Some(match s {
            pb::PaymentStatus::Unspecified => return None,
            pb::PaymentStatus::RequiresCapture => Status::RequiresCapture,
            pb::PaymentStatus::Captured => Status::Captured,
            pb::PaymentStatus::PartiallyRefunded => Status::PartiallyRefunded,
            pb::PaymentStatus::Refunded => Status::Refunded,
            pb::PaymentStatus::Canceled => Status::Canceled,
            pb::PaymentStatus::Declined => Status::Declined,
            pb::PaymentStatus::Expired => Status::Expired,
        })
    }
}

// === impl Decline ===

impl Decline {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Decline::InsufficientFunds => "INSUFFICIENT_FUNDS",
            Decline::AccountInactive => "ACCOUNT_INACTIVE",
            Decline::CurrencyMismatch => "CURRENCY_MISMATCH",
        }
    }

    /// Parses the stored name.
    pub fn parse(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "INSUFFICIENT_FUNDS" => Decline::InsufficientFunds,
            "ACCOUNT_INACTIVE" => Decline::AccountInactive,
            "CURRENCY_MISMATCH" => Decline::CurrencyMismatch,
            other => return Err(Error::Internal(format!("unknown stored decline {other:?}"))),
        })
    }

    /// The API enum.
    pub fn to_proto(self) -> pb::DeclineCode {
        match self {
            Decline::InsufficientFunds => pb::DeclineCode::InsufficientFunds,
            Decline::AccountInactive => pb::DeclineCode::AccountInactive,
            Decline::CurrencyMismatch => pb::DeclineCode::CurrencyMismatch,
        }
    }
}

/// Decides whether a payment of `amount` in `currency` from `payer` to
/// `payee` is authorized, or why it is declined. Checked in the order a
/// customer would want to be told: wrong account state first, then currency,
/// then funds.
pub fn authorize(
    payer: &AccountView<'_>,
    payee: &AccountView<'_>,
    amount: i64,
    currency: &str,
) -> Result<(), Decline> {
    if payer.status != AccountStatus::Active || payee.status != AccountStatus::Active {
        return Err(Decline::AccountInactive);
    }
    if payer.currency != currency || payee.currency != currency {
        return Err(Decline::CurrencyMismatch);
    }
    if payer.available < amount {
        return Err(Decline::InsufficientFunds);
    }
    Ok(())
}

fn subject(payment_id: &str) -> String {
    format!("payments/{payment_id}")
}

/// Checks that an account holding `available + held` may be credited
/// `amount` more without passing [`MAX_BALANCE_MINOR`].
pub fn check_credit(account_id: &str, available: i64, held: i64, amount: i64) -> Result<(), Error> {
    let after = available
        .checked_add(held)
        .and_then(|t| t.checked_add(amount));
    match after {
        Some(total) if total <= MAX_BALANCE_MINOR => Ok(()),
        _ => Err(Error::FailedPrecondition {
            reason: "BALANCE_LIMIT",
            subject: format!("accounts/{account_id}"),
            description: format!(
                "crediting {amount} would take account {account_id} above the largest balance an account may hold, {MAX_BALANCE_MINOR} minor units (available and held together); move money out of it, then retry with a new idempotency key"
            ),
        }),
    }
}

/// Whether an authorization that ran until `expires_at` has run out at `now`.
pub fn is_expired(expires_at: Option<i64>, now: i64) -> bool {
    expires_at.is_some_and(|t| t <= now)
}

/// Plans a capture of `requested` (or everything capturable) at `now`.
pub fn plan_capture(
    payment_id: &str,
    p: &Amounts,
    expires_at: Option<i64>,
    now: i64,
    requested: Option<i64>,
) -> Result<CapturePlan, Error> {
    if p.status == Status::Expired
        || (p.status == Status::RequiresCapture && is_expired(expires_at, now))
    {
        return Err(authorization_expired(payment_id, expires_at));
    }
    if p.status != Status::RequiresCapture {
        return Err(Error::FailedPrecondition {
            reason: "PAYMENT_NOT_CAPTURABLE",
            subject: subject(payment_id),
            description: format!(
                "payment {payment_id} is {} and cannot be captured; only REQUIRES_CAPTURE payments can",
                p.status.as_str()
            ),
        });
    }
    let capture = requested.unwrap_or(p.capturable);
    if capture <= 0 {
        return Err(Error::invalid(
            "amount_minor",
            format!("must be a positive number of minor units, got {capture}"),
        ));
    }
    if capture > p.capturable {
        return Err(Error::FailedPrecondition {
            reason: "AMOUNT_EXCEEDS_CAPTURABLE",
            subject: subject(payment_id),
            description: format!(
                "cannot capture {capture}: only {} of payment {payment_id} is capturable",
                p.capturable
            ),
        });
    }
    Ok(CapturePlan {
        capture,
        release: p.capturable - capture,
    })
}

/// The error of a capture of an authorization that expired at `expires_at`
/// (µs since the epoch; unknown for payments expired by older versions).
pub fn authorization_expired(payment_id: &str, expires_at: Option<i64>) -> Error {
    let when = expires_at.map_or(String::new(), |t| {
        // Before the epoch (never written): shown as the epoch.
        let at =
            std::time::UNIX_EPOCH + std::time::Duration::from_micros(u64::try_from(t).unwrap_or(0));
        format!(" at {}", humantime::format_rfc3339_micros(at))
    });
    Error::FailedPrecondition {
        reason: "AUTHORIZATION_EXPIRED",
        subject: subject(payment_id),
        description: format!(
            "the authorization of payment {payment_id} expired{when} and its hold was released; create a new payment"
        ),
    }
}

/// Checks that a payment may be canceled; returns the hold to release.
pub fn plan_cancel(payment_id: &str, p: &Amounts) -> Result<i64, Error> {
    if p.status != Status::RequiresCapture {
        return Err(Error::FailedPrecondition {
            reason: "PAYMENT_NOT_CANCELABLE",
            subject: subject(payment_id),
            description: format!(
                "payment {payment_id} is {} and cannot be canceled; only uncaptured (REQUIRES_CAPTURE) payments can, refund a captured one instead",
                p.status.as_str()
            ),
        });
    }
    Ok(p.capturable)
}

/// Plans a refund of `requested` (or everything not yet refunded); returns
/// the amount and the payment's status afterwards.
pub fn plan_refund(
    payment_id: &str,
    p: &Amounts,
    requested: Option<i64>,
) -> Result<(i64, Status), Error> {
    if !matches!(p.status, Status::Captured | Status::PartiallyRefunded) {
        return Err(Error::FailedPrecondition {
            reason: "PAYMENT_NOT_REFUNDABLE",
            subject: subject(payment_id),
            description: format!(
                "payment {payment_id} is {} and cannot be refunded; only captured payments can",
                p.status.as_str()
            ),
        });
    }
    let refundable = p.captured - p.refunded;
    let amount = requested.unwrap_or(refundable);
    if amount <= 0 {
        return Err(Error::invalid(
            "amount_minor",
            format!("must be a positive number of minor units, got {amount}"),
        ));
    }
    if amount > refundable {
        return Err(Error::FailedPrecondition {
            reason: "AMOUNT_EXCEEDS_REFUNDABLE",
            subject: subject(payment_id),
            description: format!(
                "cannot refund {amount}: only {refundable} of the {} captured on payment {payment_id} is not yet refunded",
                p.captured
            ),
        });
    }
    let status = if amount == refundable {
        Status::Refunded
    } else {
        Status::PartiallyRefunded
    };
    Ok((amount, status))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn active(available: i64) -> AccountView<'static> {
        AccountView {
            status: AccountStatus::Active,
            currency: "USD",
            available,
        }
    }

    fn amounts(status: Status, amount: i64, captured: i64, refunded: i64) -> Amounts {
        Amounts {
            status,
            amount,
            capturable: if status == Status::RequiresCapture {
                amount
            } else {
                0
            },
            captured,
            refunded,
        }
    }

    #[test]
    fn authorization_declines_in_order() {
        let frozen = AccountView {
            status: AccountStatus::Frozen,
            ..active(1_000)
        };
        let eur = AccountView {
            currency: "EUR",
            ..active(1_000)
        };
        assert_eq!(authorize(&active(100), &active(0), 100, "USD"), Ok(()));
        assert_eq!(
            authorize(&active(99), &active(0), 100, "USD"),
            Err(Decline::InsufficientFunds)
        );
        assert_eq!(
            authorize(&frozen, &active(0), 1, "USD"),
            Err(Decline::AccountInactive)
        );
        assert_eq!(
            authorize(&active(0), &frozen, 1, "USD"),
            Err(Decline::AccountInactive)
        );
        assert_eq!(
            authorize(&active(1_000), &eur, 1, "USD"),
            Err(Decline::CurrencyMismatch)
        );
    }

    #[test]
    fn capture_full_partial_and_over() {
        let p = amounts(Status::RequiresCapture, 1_000, 0, 0);
        assert_eq!(
            plan_capture("p", &p, None, 0, None).unwrap(),
            CapturePlan {
                capture: 1_000,
                release: 0
            }
        );
        assert_eq!(
            plan_capture("p", &p, None, 0, Some(400)).unwrap(),
            CapturePlan {
                capture: 400,
                release: 600
            }
        );
        assert!(matches!(
            plan_capture("p", &p, None, 0, Some(1_001)),
            Err(Error::FailedPrecondition {
                reason: "AMOUNT_EXCEEDS_CAPTURABLE",
                ..
            })
        ));
        assert!(matches!(
            plan_capture("p", &p, None, 0, Some(0)),
            Err(Error::InvalidArgument(_))
        ));
        let captured = amounts(Status::Captured, 1_000, 1_000, 0);
        assert!(matches!(
            plan_capture("p", &captured, None, 0, None),
            Err(Error::FailedPrecondition {
                reason: "PAYMENT_NOT_CAPTURABLE",
                ..
            })
        ));
    }

    #[test]
    fn an_expired_authorization_cannot_be_captured() {
        let p = amounts(Status::RequiresCapture, 1_000, 0, 0);
        assert!(plan_capture("p", &p, Some(10), 9, None).is_ok());
        let swept = amounts(Status::Expired, 1_000, 0, 0);
        for (p, now) in [(&p, 10), (&p, 11), (&swept, 11)] {
            assert!(matches!(
                plan_capture("p", p, Some(10), now, None),
                Err(Error::FailedPrecondition {
                    reason: "AUTHORIZATION_EXPIRED",
                    ..
                })
            ));
        }
    }

    #[test]
    fn credits_stop_at_the_largest_balance() {
        assert!(check_credit("a", MAX_BALANCE_MINOR - 10, 5, 5).is_ok());
        for (available, held, amount) in [
            (MAX_BALANCE_MINOR - 10, 5, 6),
            (MAX_BALANCE_MINOR, 0, 1),
            (i64::MAX, 0, 1),
            (1, i64::MAX, 1),
        ] {
            assert!(matches!(
                check_credit("a", available, held, amount),
                Err(Error::FailedPrecondition {
                    reason: "BALANCE_LIMIT",
                    ..
                })
            ));
        }
    }

    #[test]
    fn cancel_only_uncaptured() {
        assert_eq!(
            plan_cancel("p", &amounts(Status::RequiresCapture, 500, 0, 0)).unwrap(),
            500
        );
        for s in [
            Status::Captured,
            Status::Canceled,
            Status::Declined,
            Status::Expired,
        ] {
            assert!(plan_cancel("p", &amounts(s, 500, 0, 0)).is_err(), "{s:?}");
        }
    }

    #[test]
    fn refunds_never_exceed_captured() {
        let p = amounts(Status::Captured, 1_000, 800, 0);
        assert_eq!(
            plan_refund("p", &p, Some(300)).unwrap(),
            (300, Status::PartiallyRefunded)
        );
        assert_eq!(plan_refund("p", &p, None).unwrap(), (800, Status::Refunded));
        let partly = amounts(Status::PartiallyRefunded, 1_000, 800, 300);
        assert_eq!(
            plan_refund("p", &partly, Some(500)).unwrap(),
            (500, Status::Refunded)
        );
        assert!(matches!(
            plan_refund("p", &partly, Some(501)),
            Err(Error::FailedPrecondition {
                reason: "AMOUNT_EXCEEDS_REFUNDABLE",
                ..
            })
        ));
        assert!(plan_refund("p", &amounts(Status::RequiresCapture, 1, 0, 0), None).is_err());
        assert!(plan_refund("p", &amounts(Status::Refunded, 1, 1, 1), None).is_err());
    }

    #[test]
    fn stored_names_round_trip() {
        for s in [
            Status::RequiresCapture,
            Status::Captured,
            Status::PartiallyRefunded,
            Status::Refunded,
            Status::Canceled,
            Status::Declined,
            Status::Expired,
        ] {
            assert_eq!(Status::parse(s.as_str()).unwrap(), s);
            assert_eq!(Status::from_proto(s.to_proto()), Some(s));
        }
    }
}
