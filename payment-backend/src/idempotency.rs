//! Idempotency keys: where a call's key comes from, whose key it is, and the
//! fingerprint that tells a retry from a different request.
//!
//! The store enforces uniqueness with the primary key of
//! `idempotency_keys (scope, key)`; this module only prepares the values.

use prost::Message;
use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;

use tollgate_proto::payments::v1 as pb;

use crate::error::{Error, Violations};

/// Metadata header that may carry the key instead of the request field.
pub const KEY_HEADER: &str = "idempotency-key";
/// Metadata header naming the caller when no other is configured; keys are
/// scoped per caller.
pub const CLIENT_HEADER: &str = "x-client-id";
/// Response metadata set when a stored response is replayed (defined with
/// the errors, which carry it on replayed failures).
pub use crate::error::REPLAYED_HEADER;

const MAX_KEY_LEN: usize = 255;
const MAX_SCOPE_LEN: usize = 128;

/// Whose keys a call's key is: the metadata header that names the caller.
///
/// The default reads `x-client-id` and lets it be absent, which puts every
/// caller without it in one shared scope: fine on a laptop. In production
/// the scope must come from the caller's authenticated identity, set by the
/// sidecar (tollgate), not chosen by the client: configure that header with
/// [`Scope::required`] and a call without it is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    header: String,
    required: bool,
}

impl Default for Scope {
    fn default() -> Self {
        Scope {
            header: CLIENT_HEADER.to_owned(),
            required: false,
        }
    }
}

// === impl Scope ===

impl Scope {
    /// Scopes keys by `header`, which every mutating call must carry.
    /// `header` must be a valid, lower-case, ASCII metadata key.
    pub fn required(header: &str) -> Result<Self, String> {
        let valid = !header.is_empty()
            && !header.ends_with("-bin")
            && header
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
        if valid {
            Ok(Scope {
                header: header.to_owned(),
                required: true,
            })
        } else {
            Err(format!(
                "{} is not a metadata header name: use lower-case letters, digits, '-', '_' or '.', not ending in -bin (e.g. x-client-id)",
                crate::error::shown(header)
            ))
        }
    }

    /// The header that names the caller.
    pub fn header(&self) -> &str {
        &self.header
    }

    /// The idempotency facts of a mutating call.
    pub fn idempotency<T: Keyed>(&self, request: &tonic::Request<T>) -> Result<Idempotency, Error> {
        let r = request.get_ref();
        Idempotency::from_call(
            request.metadata(),
            self,
            T::METHOD,
            r,
            r.key_field(),
            T::canonicalize,
        )
    }
}

/// The idempotency facts of one mutating call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    /// The caller (the [`Scope`] header), empty when absent.
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
    /// Turns the request into the form that is fingerprinted: the key field
    /// cleared, and every field the API defaults set to its default, so two
    /// requests that mean the same have the same fingerprint.
    fn canonicalize(&mut self);
}

macro_rules! keyed {
    ($($t:ident => $m:literal $(, defaults: $defaults:path)?);* $(;)?) => {$(
        impl Keyed for pb::$t {
            const METHOD: &'static str = $m;
            fn key_field(&self) -> &str {
                &self.idempotency_key
            }
            fn canonicalize(&mut self) {
                self.idempotency_key.clear();
                $($defaults(self);)?
            }
        }
    )*};
}

keyed!(
    CreateAccountRequest => "CreateAccount";
    DepositRequest => "Deposit";
    CreatePaymentRequest => "CreatePayment", defaults: capture_method_default;
    CapturePaymentRequest => "CapturePayment";
    CancelPaymentRequest => "CancelPayment";
    RefundPaymentRequest => "RefundPayment";
);

/// An UNSPECIFIED capture method means AUTOMATIC (the documented default).
fn capture_method_default(r: &mut pb::CreatePaymentRequest) {
    if r.capture_method == pb::CaptureMethod::Unspecified as i32 {
        r.capture_method = pb::CaptureMethod::Automatic as i32;
    }
}

// === impl Idempotency ===

impl Idempotency {
    /// Reads the key (request field or `idempotency-key` header) and the
    /// caller's scope, and fingerprints `request` as `canonical` rewrites it
    /// (key field cleared, defaults filled in).
    pub fn from_call<T: Message + Clone>(
        metadata: &MetadataMap,
        scope: &Scope,
        method: &'static str,
        request: &T,
        field_key: &str,
        canonical: impl FnOnce(&mut T),
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
        let header = scope.header.as_str();
        if metadata.get_all(header).iter().nth(1).is_some() {
            v.add(
                header,
                "sent more than once: the caller is named by exactly one value",
            );
        }
        let scope = match metadata.get(header).map(|v| v.to_str()) {
            None if scope.required => {
                v.add(
                    header,
                    "required: this metadata header names the caller whose idempotency keys these are; the sidecar in front of this service sets it from the caller's authenticated identity",
                );
                ""
            }
            None => "",
            Some(Ok(s)) => {
                v.check(header, check_token(s, MAX_SCOPE_LEN));
                s
            }
            Some(Err(_)) => {
                v.add(header, "metadata value must be printable ASCII");
                ""
            }
        };
        v.finish()?;

        let mut stripped = request.clone();
        canonical(&mut stripped);
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
        Idempotency::from_call(
            md,
            &Scope::default(),
            "CancelPayment",
            r,
            &r.idempotency_key,
            Keyed::canonicalize,
        )
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
    fn an_unspecified_capture_method_fingerprints_as_automatic() {
        let fingerprint = |method: pb::CaptureMethod| {
            let r = pb::CreatePaymentRequest {
                idempotency_key: "k".into(),
                capture_method: method as i32,
                ..Default::default()
            };
            Idempotency::from_call(
                &MetadataMap::new(),
                &Scope::default(),
                "CreatePayment",
                &r,
                "k",
                Keyed::canonicalize,
            )
            .unwrap()
            .fingerprint
        };
        let unspecified = fingerprint(pb::CaptureMethod::Unspecified);
        assert_eq!(unspecified, fingerprint(pb::CaptureMethod::Automatic));
        assert_ne!(unspecified, fingerprint(pb::CaptureMethod::Manual));
    }

    #[test]
    fn a_required_scope_header_must_be_present() {
        let scope = Scope::required("x-tollgate-identity").unwrap();
        let r = req("k1", "x");
        let call = |md: &MetadataMap| {
            Idempotency::from_call(
                md,
                &scope,
                "CancelPayment",
                &r,
                &r.idempotency_key,
                Keyed::canonicalize,
            )
        };
        let mut md = MetadataMap::new();
        // The default header does not count once another is configured.
        md.insert(CLIENT_HEADER, "shop-1".parse().unwrap());
        let Err(Error::InvalidArgument(v)) = call(&md) else {
            panic!("a call without the scope header is refused");
        };
        assert_eq!(v[0].field, "x-tollgate-identity");
        md.insert("x-tollgate-identity", "spiffe-shop-1".parse().unwrap());
        assert_eq!(call(&md).unwrap().scope, "spiffe-shop-1");
        // A second value (a client's own ahead of the sidecar's) is refused.
        md.append("x-tollgate-identity", "spiffe-shop-2".parse().unwrap());
        assert!(matches!(call(&md), Err(Error::InvalidArgument(_))));
        for bad in ["", "X-Upper", "x-id-bin", "sp ace"] {
            assert!(Scope::required(bad).is_err(), "{bad:?}");
        }
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
