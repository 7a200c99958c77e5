//! Money: integer minor units plus an ISO 4217 currency code. No floats.
//!
//! Validation lives here so every RPC rejects the same bad amounts with the
//! same words.

use crate::error::shown;

/// Active ISO 4217 alphabetic codes (list 1, 2024), sorted for binary search.
const ISO_4217: &[&str] = &[
    "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT",
    "BGN", "BHD", "BIF", "BMD", "BND", "BOB", "BOV", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD",
    "CAD", "CDF", "CHE", "CHF", "CHW", "CLF", "CLP", "CNY", "COP", "COU", "CRC", "CUP", "CVE",
    "CZK", "DJF", "DKK", "DOP", "DZD", "EGP", "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL",
    "GHS", "GIP", "GMD", "GNF", "GTQ", "GYD", "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR",
    "IQD", "IRR", "ISK", "JMD", "JOD", "JPY", "KES", "KGS", "KHR", "KMF", "KPW", "KRW", "KWD",
    "KYD", "KZT", "LAK", "LBP", "LKR", "LRD", "LSL", "LYD", "MAD", "MDL", "MGA", "MKD", "MMK",
    "MNT", "MOP", "MRU", "MUR", "MVR", "MWK", "MXN", "MXV", "MYR", "MZN", "NAD", "NGN", "NIO",
    "NOK", "NPR", "NZD", "OMR", "PAB", "PEN", "PGK", "PHP", "PKR", "PLN", "PYG", "QAR", "RON",
    "RSD", "RUB", "RWF", "SAR", "SBD", "SCR", "SDG", "SEK", "SGD", "SHP", "SLE", "SOS", "SRD",
    "SSP", "STN", "SVC", "SYP", "SZL", "THB", "TJS", "TMT", "TND", "TOP", "TRY", "TTD", "TWD",
    "TZS", "UAH", "UGX", "USD", "USN", "UYI", "UYU", "UYW", "UZS", "VED", "VES", "VND", "VUV",
    "WST", "XAF", "XAG", "XAU", "XCD", "XCG", "XOF", "XPD", "XPF", "XPT", "XSU", "XUA", "YER",
    "ZAR", "ZMW", "ZWG",
];

/// Largest amount accepted in one call: keeps every sum of amounts that the
/// ledger computes far from `i64` overflow.
pub const MAX_AMOUNT_MINOR: i64 = 1_000_000_000_000_000;

/// Largest balance an account may hold, available and held together, in
/// minor units of its currency (10^17: a hundred times the largest single
/// amount, far below `i64` overflow). A deposit, capture or refund that
/// would take an account above it is refused; both databases also refuse to
/// store a balance above it.
pub const MAX_BALANCE_MINOR: i64 = 100_000_000_000_000_000;

/// Whether `code` is an active ISO 4217 alphabetic code (upper case).
pub fn is_known_currency(code: &str) -> bool {
    ISO_4217.binary_search(&code).is_ok()
}

/// Why a currency code was refused; the text is shown to the caller.
pub fn check_currency(code: &str) -> Result<(), String> {
    if code.is_empty() {
        return Err("required: an ISO 4217 code such as \"USD\"".into());
    }
    if is_known_currency(code) {
        Ok(())
    } else if code.len() == 3 && is_known_currency(&code.to_ascii_uppercase()) {
        Err(format!(
            "{} must be upper case: \"{}\"",
            shown(code),
            code.to_ascii_uppercase()
        ))
    } else {
        Err(format!("{} is not an ISO 4217 currency code", shown(code)))
    }
}

/// Why an amount in minor units was refused; the text is shown to the caller.
pub fn check_amount(amount_minor: i64) -> Result<(), String> {
    if amount_minor <= 0 {
        Err(format!(
            "must be a positive number of minor units, got {amount_minor}"
        ))
    } else if amount_minor > MAX_AMOUNT_MINOR {
        Err(format!(
            "must be at most {MAX_AMOUNT_MINOR} minor units, got {amount_minor}"
        ))
    } else {
        Ok(())
    }
}

/// Builds the wire form of an amount.
pub fn money(amount_minor: i64, currency: &str) -> tollgate_proto::payments::v1::Money {
    tollgate_proto::payments::v1::Money {
        amount_minor,
        currency: currency.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_so_binary_search_works() {
        assert!(ISO_4217.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn currencies() {
        assert!(check_currency("USD").is_ok());
        assert!(check_currency("JPY").is_ok());
        assert!(check_currency("usd").unwrap_err().contains("upper case"));
        assert!(check_currency("XYZ")
            .unwrap_err()
            .contains("not an ISO 4217"));
        assert!(check_currency("").unwrap_err().contains("required"));
    }

    #[test]
    fn amounts() {
        assert!(check_amount(1).is_ok());
        assert!(check_amount(0).is_err());
        assert!(check_amount(-5).is_err());
        assert!(check_amount(MAX_AMOUNT_MINOR + 1).is_err());
    }
}
