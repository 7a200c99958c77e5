//! Idempotency keys: where a call's key comes from, whose key it is, and the
//! fingerprint that tells a retry from a different request.
//!
//! The store enforces uniqueness with the primary key of
//! `idempotency_keys (scope, key)`; this module only prepares the values.

use prost::Message;
use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;

use crate::error::{Error, Violations};

/// Metadata header that may carry the key instead of the request field.
pub const KEY_HEADER: &str = "idempotency-key";
/// Metadata header naming the caller; keys are scoped per caller.
pub const CLIENT_HEADER: &str = "x-client-id";
/// Response metadata set when a stored response is replayed.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

const MAX_KEY_LEN: usize = 255;
const MAX_SCOPE_LEN: usize = 128;

/// The idempotency facts of one mutating call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    /// The caller (`x-client-id`), empty when absent.
    pub scope: String,
    /// The key the caller chose.
    pub key: String,
    /// The RPC, e.g. `CreatePayment`.
    pub method: &'static str,
    /// SHA-256 of the method and the request without its key.
    pub fingerprint: Vec<u8>,
}

/// The result of a mutating call: done now, or a stored earlier result.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome<T> {
    /// The call ran now.
    Executed(T),
    /// An earlier call with the same key and request ran; this is its result.
    Replayed(T),
}

// === impl Outcome ===

impl<T> Outcome<T> {
    /// The response, however it came about.
    pub fn into_inner(self) -> T {
        match self {
            Outcome::Executed(t) | Outcome::Replayed(t) => t,
        }
    }

    /// Whether the response is a replay.
    pub fn is_replay(&self) -> bool {
        matches!(self, Outcome::Replayed(_))
    }
}

/// A mutating request: it carries an idempotency key field.
pub trait Keyed: Message + Clone {
    /// The RPC's name, e.g. `CreatePayment`.
    const METHOD: &'static str;
    /// The key field.
    fn key_field(&self) -> &str;
    /// Clears the key field (the fingerprint is of the rest).
    fn clear_key(&mut self);
}

macro_rules! keyed {
    ($($t:ident => $m:literal),* $(,)?) => {$(
        impl Keyed for tollgate_proto::payments::v1::$t {
            const METHOD: &'static str = $m;
            fn key_field(&self) -> &str {
                &self.idempotency_key
            }
            fn clear_key(&mut self) {
                self.idempotency_key.clear();
            }
        }
    )*};
}

keyed!(
    CreateAccountRequest => "CreateAccount",
    DepositRequest => "Deposit",
    CreatePaymentRequest => "CreatePayment",
    CapturePaymentRequest => "CapturePayment",
    CancelPaymentRequest => "CancelPayment",
    RefundPaymentRequest => "RefundPayment",
);

// === impl Idempotency ===

impl Idempotency {
    /// The idempotency facts of a mutating call.
    pub fn of<T: Keyed>(request: &tonic::Request<T>) -> Result<Self, Error> {
        let r = request.get_ref();
        Self::from_call(
            request.metadata(),
            T::METHOD,
            r,
            r.key_field(),
            T::clear_key,
        )
    }

    /// Reads the key (request field or `idempotency-key` header) and the
    /// caller scope, and fingerprints `request` with its key field cleared by
    /// `without_key`.
    pub fn from_call<T: Message + Clone>(
        metadata: &MetadataMap,
        method: &'static str,
        request: &T,
        field_key: &str,
        without_key: impl FnOnce(&mut T),
    ) -> Result<Self, Error> {
        let header_key = match metadata.get(KEY_HEADER) {
            Some(v) => Some(v.to_str().map_err(|_| {
                Error::invalid(KEY_HEADER, "metadata value must be printable ASCII")
            })?),
            None => None,
        };
        let key = match (field_key, header_key) {
            ("", None) => {
                return Err(Error::invalid(
                    "idempotency_key",
                    "required: set the idempotency_key field or the idempotency-key metadata header to a unique value per operation, and reuse it only to retry that operation",
                ))
            }
            ("", Some(h)) => h,
            (f, None) => f,
            (f, Some(h)) if f == h => f,
            (_, Some(_)) => {
                return Err(Error::invalid(
                    "idempotency_key",
                    "differs from the idempotency-key metadata header; send one of them, or the same value in both",
                ))
            }
        };
        let mut v = Violations::default();
        v.check("idempotency_key", check_token(key, MAX_KEY_LEN));
        let scope = match metadata.get(CLIENT_HEADER).map(|v| v.to_str()) {
            None => "",
            Some(Ok(s)) => {
                v.check(CLIENT_HEADER, check_token(s, MAX_SCOPE_LEN));
                s
            }
            Some(Err(_)) => {
                v.add(CLIENT_HEADER, "metadata value must be printable ASCII");
                ""
            }
        };
        v.finish()?;

        let mut stripped = request.clone();
        without_key(&mut stripped);
        let mut h = Sha256::new();
        h.update(method.as_bytes());
        h.update([0]);
        h.update(stripped.encode_to_vec());
        Ok(Idempotency {
            scope: scope.to_owned(),
            key: key.to_owned(),
            method,
            fingerprint: h.finalize().to_vec(),
        })
    }
}

fn check_token(s: &str, max: usize) -> Result<(), String> {
    if s.is_empty() {
        Err("must not be empty".into())
    } else if s.len() > max {
        Err(format!("must be at most {max} characters, got {}", s.len()))
    } else if !s.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        Err("must be printable ASCII without spaces".into())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_proto::payments::v1::CancelPaymentRequest;

    fn req(key: &str, reason: &str) -> CancelPaymentRequest {
        CancelPaymentRequest {
            idempotency_key: key.into(),
            payment_id: "pay_1".into(),
            reason: reason.into(),
        }
    }

    fn idem(md: &MetadataMap, r: &CancelPaymentRequest) -> Result<Idempotency, Error> {
        Idempotency::from_call(md, "CancelPayment", r, &r.idempotency_key, |r| {
            r.idempotency_key.clear()
        })
    }

    #[test]
    fn same_request_same_fingerprint_whatever_the_key_source() {
        let mut md = MetadataMap::new();
        let a = idem(&md, &req("k1", "dup")).unwrap();
        md.insert(KEY_HEADER, "k1".parse().unwrap());
        let b = idem(&md, &req("", "dup")).unwrap();
        assert_eq!(a, b);
        let c = idem(&md, &req("k1", "other reason")).unwrap();
        assert_ne!(a.fingerprint, c.fingerprint);
    }

    #[test]
    fn missing_or_conflicting_keys_are_invalid() {
        let mut md = MetadataMap::new();
        assert!(matches!(
            idem(&md, &req("", "x")),
            Err(Error::InvalidArgument(_))
        ));
        md.insert(KEY_HEADER, "k2".parse().unwrap());
        assert!(matches!(
            idem(&md, &req("k1", "x")),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            idem(&MetadataMap::new(), &req("has space", "x")),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn keys_are_scoped_per_client() {
        let mut md = MetadataMap::new();
        md.insert(CLIENT_HEADER, "shop-1".parse().unwrap());
        assert_eq!(idem(&md, &req("k1", "x")).unwrap().scope, "shop-1");
        assert_eq!(
            idem(&MetadataMap::new(), &req("k1", "x")).unwrap().scope,
            ""
        );
    }
}
