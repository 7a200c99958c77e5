//! Reading a few fields of a protobuf message by walking its wire format
//! (protobuf.dev/programming-guides/encoding): no schema at run time, no
//! decode of the whole message, no allocation. A field is named by its
//! path of field numbers (`4.2`: field 2 of the message in field 4).
//!
//! The value found is the one a protobuf parser would keep: for a singular
//! field sent more than once, the last; for a message field sent more than
//! once, the fields merged, later ones winning. A client that repeats
//! `payer_account_id` to pick its own budget is keyed on the value the
//! upstream reads.

/// A field's value as it is on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WireValue<'a> {
    /// Wire type 0: int32, int64, uint32, uint64, sint32, sint64, bool, enum.
    Varint(u64),
    /// Wire type 1: fixed64, sfixed64, double.
    Fixed64(u64),
    /// Wire type 2: string, bytes, a message, packed repeated.
    Len(&'a [u8]),
    /// Wire type 5: fixed32, sfixed32, float.
    Fixed32(u32),
}

/// Why a message's bytes cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WireError {
    /// The bytes end inside a field, or a length runs past them.
    Truncated,
    /// A varint longer than 10 bytes.
    LongVarint,
    /// Field number 0, a group (wire types 3 and 4, long deprecated) or an
    /// unknown wire type.
    Unsupported,
    /// The field on the path holds a scalar where a message must be.
    NotAMessage,
    /// The field comes more than once with different wire types.
    MixedWireTypes,
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WireError::Truncated => "is not valid protobuf: it ends inside a field",
            WireError::LongVarint => "is not valid protobuf: a varint runs past 10 bytes",
            WireError::Unsupported => {
                "uses protobuf groups, field number 0 or an unknown wire type"
            }
            WireError::NotAMessage => "holds a scalar where the field path needs a message",
            WireError::MixedWireTypes => {
                "carries the field more than once with different wire types"
            }
        })
    }
}

/// The value at `path` in `message`, as a parser would keep it; `None`
/// when the field is absent. Occurrences of the field with different wire
/// types are an error: parsers disagree on them (prost refuses the
/// message; others skip the ones that do not match the declared type), so
/// no one value is the one the upstream reads.
pub(crate) fn find<'a>(
    message: &'a [u8],
    path: &[u32],
) -> Result<Option<WireValue<'a>>, WireError> {
    let mut found = None;
    walk(message, path, &mut found)?;
    Ok(found)
}

fn walk<'a>(
    message: &'a [u8],
    path: &[u32],
    found: &mut Option<WireValue<'a>>,
) -> Result<(), WireError> {
    let Some((&number, rest)) = path.split_first() else {
        return Ok(());
    };
    let mut r = Reader(message);
    while let Some((n, value)) = r.field()? {
        if n != number {
            continue;
        }
        if rest.is_empty() {
            if found.is_some_and(|f| std::mem::discriminant(&f) != std::mem::discriminant(&value)) {
                return Err(WireError::MixedWireTypes);
            }
            *found = Some(value);
            continue;
        }
        match value {
            // Each occurrence merges into the message: what a later one
            // carries replaces what an earlier one did.
            WireValue::Len(inner) => walk(inner, rest, found)?,
            _ => return Err(WireError::NotAMessage),
        }
    }
    Ok(())
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// The next field: its number and value; `None` at the end.
    fn field(&mut self) -> Result<Option<(u32, WireValue<'a>)>, WireError> {
        if self.0.is_empty() {
            return Ok(None);
        }
        let tag = self.varint()?;
        let number = u32::try_from(tag >> 3).map_err(|_| WireError::Unsupported)?;
        if number == 0 {
            return Err(WireError::Unsupported);
        }
        let value = match tag & 7 {
            0 => WireValue::Varint(self.varint()?),
            1 => WireValue::Fixed64(u64::from_le_bytes(
                self.take(8)?.try_into().unwrap_or_default(),
            )),
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| WireError::Truncated)?;
                WireValue::Len(self.take(len)?)
            }
            5 => WireValue::Fixed32(u32::from_le_bytes(
                self.take(4)?.try_into().unwrap_or_default(),
            )),
            _ => return Err(WireError::Unsupported),
        };
        Ok(Some((number, value)))
    }

    fn varint(&mut self) -> Result<u64, WireError> {
        let mut n: u64 = 0;
        for (i, &b) in self.0.iter().enumerate().take(10) {
            n |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                self.0 = &self.0[i + 1..];
                return Ok(n);
            }
        }
        Err(if self.0.len() >= 10 {
            WireError::LongVarint
        } else {
            WireError::Truncated
        })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if n > self.0.len() {
            return Err(WireError::Truncated);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;
    use tollgate_proto::payments::v1::{CreatePaymentRequest, Money};

    use super::*;

    fn payment(payer: &str, amount: i64, currency: &str) -> Vec<u8> {
        CreatePaymentRequest {
            idempotency_key: "k-1".into(),
            payer_account_id: payer.into(),
            payee_account_id: "acc-payee".into(),
            amount: Some(Money {
                amount_minor: amount,
                currency: currency.into(),
            }),
            description: "x".repeat(300),
            metadata: [("a".to_string(), "b".to_string())].into(),
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn fields_are_found_by_their_numbers_as_prost_encodes_them() {
        let m = payment("acc-1", 12_345, "USD");
        assert_eq!(find(&m, &[2]), Ok(Some(WireValue::Len(b"acc-1"))));
        assert_eq!(find(&m, &[4, 1]), Ok(Some(WireValue::Varint(12_345))));
        assert_eq!(find(&m, &[4, 2]), Ok(Some(WireValue::Len(b"USD"))));
        assert_eq!(find(&m, &[9]), Ok(None));
        assert_eq!(find(&m, &[4, 9]), Ok(None));
        // A negative int64 is ten bytes of varint.
        let m = payment("acc-1", -5, "USD");
        assert_eq!(find(&m, &[4, 1]), Ok(Some(WireValue::Varint(-5i64 as u64))));
        // proto3 leaves zero values out: absent.
        let m = payment("", 0, "USD");
        assert_eq!((find(&m, &[2]), find(&m, &[4, 1])), (Ok(None), Ok(None)));
    }

    #[test]
    fn a_repeated_field_reads_as_a_parser_keeps_it() {
        // Two payers and two amounts, concatenated as a client may send
        // them: prost keeps the last payer and merges the amounts.
        let mut m = payment("victim", 100, "USD");
        m.extend(
            CreatePaymentRequest {
                payer_account_id: "attacker".into(),
                amount: Some(Money {
                    amount_minor: 7,
                    currency: String::new(),
                }),
                ..Default::default()
            }
            .encode_to_vec(),
        );
        let parsed = CreatePaymentRequest::decode(m.as_slice()).unwrap();
        assert_eq!(parsed.payer_account_id, "attacker");
        assert_eq!(find(&m, &[2]), Ok(Some(WireValue::Len(b"attacker"))));
        let amount = parsed.amount.unwrap();
        assert_eq!((amount.amount_minor, amount.currency.as_str()), (7, "USD"));
        assert_eq!(find(&m, &[4, 1]), Ok(Some(WireValue::Varint(7))));
        assert_eq!(find(&m, &[4, 2]), Ok(Some(WireValue::Len(b"USD"))));
    }

    #[test]
    fn broken_bytes_are_errors_never_panics() {
        let m = payment("acc-1", 12_345, "USD");
        for cut in 1..m.len() {
            // Every prefix either reads or says why not.
            let _ = find(&m[..cut], &[4, 1]);
            let _ = find(&m[..cut], &[7]);
        }
        assert_eq!(find(&m[..m.len() - 1], &[9]), Err(WireError::Truncated));
        let mut long = vec![0x08];
        long.extend([0xff; 10]);
        long.push(0x01);
        assert_eq!(find(&long, &[1]), Err(WireError::LongVarint));
        assert_eq!(find(&[0x08, 0x80], &[1]), Err(WireError::Truncated));
        // A length far past the end.
        assert_eq!(
            find(&[0x12, 0xff, 0xff, 0xff, 0xff, 0x0f, 1], &[2]),
            Err(WireError::Truncated)
        );
        // A group, field 0, wire type 7.
        assert_eq!(find(&[0x0b, 0x0c], &[1]), Err(WireError::Unsupported));
        assert_eq!(find(&[0x00, 0x01], &[1]), Err(WireError::Unsupported));
        assert_eq!(find(&[0x0f], &[1]), Err(WireError::Unsupported));
        // A scalar where the path goes on into a message.
        assert_eq!(find(&[0x08, 0x01], &[1, 1]), Err(WireError::NotAMessage));
        // Field 1 as a varint, then as a fixed64: which one an upstream
        // keeps depends on its parser, so neither is read.
        let mut mixed = vec![0x08, 0x05, 0x09];
        mixed.extend(1u64.to_le_bytes());
        assert_eq!(find(&mixed, &[1]), Err(WireError::MixedWireTypes));
        // Across merged occurrences of a message too.
        let nested = [0x22, 0x02, 0x08, 0x05, 0x22, 0x05, 0x0d, 1, 0, 0, 0];
        assert_eq!(find(&nested, &[4, 1]), Err(WireError::MixedWireTypes));
        // Fixed-width values.
        let mut f = vec![0x09];
        f.extend(7u64.to_le_bytes());
        f.push(0x15);
        f.extend(9u32.to_le_bytes());
        assert_eq!(find(&f, &[1]), Ok(Some(WireValue::Fixed64(7))));
        assert_eq!(find(&f, &[2]), Ok(Some(WireValue::Fixed32(9))));
    }
}
