//! `tollgate inspect`: a key's state in the store a running tollgate
//! uses, asked of its admin server's `/limits` (which changes nothing),
//! printed for a person; or the routes and limits it could be asked of.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;

/// What to ask `/limits`.
#[derive(Debug, Default)]
pub(crate) struct Query {
    /// A route's name, or a call's `/package.Service/Method`.
    pub(crate) route: Option<String>,
    /// A limit's name.
    pub(crate) limit: Option<String>,
    /// The key's values, joined by `/` (as `tollgate explain` prints them).
    pub(crate) key: Option<String>,
}

impl Query {
    /// The request's path and query, each value percent-encoded.
    pub(crate) fn path(&self) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (name, value) in [
            ("route", &self.route),
            ("limit", &self.limit),
            ("key", &self.key),
        ] {
            if let Some(v) = value {
                q.append_pair(name, v);
            }
        }
        let q = q.finish();
        if q.is_empty() {
            "/limits".to_owned()
        } else {
            format!("/limits?{q}")
        }
    }
}

/// `/limits`'s answer, for a person.
pub(crate) fn render(v: &Value) -> String {
    let mut out = String::new();
    let text = |v: &Value| v.as_str().unwrap_or("").to_owned();
    let store = text(&v["store"]);
    if v.get("key").is_some() {
        let l = &v["limit"];
        let _ = writeln!(
            out,
            "route {}, limit {}: {}",
            text(&v["route"]),
            text(&l["name"]),
            limit_line(l)
        );
        let _ = writeln!(
            out,
            "  key     {} = {:?}",
            text(&l["key"]),
            text(&v["value"])
        );
        let _ = writeln!(out, "  stored  {:?} ({store})", text(&v["key"]));
        let _ = writeln!(out, "  now     {}", state_line(&v["state"], &store));
        if let Some(local) = v.get("local_share") {
            let _ = writeln!(
                out,
                "  local   {} (this replica's share, counted while Redis cannot answer)",
                state_line(local, "memory")
            );
        }
        return out;
    }
    let routes: Vec<&Value> = match v["routes"].as_array() {
        Some(rs) => rs.iter().collect(),
        None => vec![v],
    };
    let _ = writeln!(out, "store: {store}");
    if routes.is_empty() {
        let _ = writeln!(out, "no route has limits");
    }
    for r in routes {
        let _ = writeln!(out, "route {}", text(&r["route"]));
        for l in r["limits"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "  {}: {}; key {}",
                text(&l["name"]),
                limit_line(l),
                text(&l["key"])
            );
        }
    }
    out
}

/// A limit's rate, algorithm and modes, in one line.
fn limit_line(l: &Value) -> String {
    let mut s = format!(
        "{} {}, {}",
        l["rate"].as_str().unwrap_or(""),
        l["counts"].as_str().unwrap_or(""),
        l["algorithm"].as_str().unwrap_or("")
    );
    if let Some(b) = l["burst"].as_u64() {
        let _ = write!(s, ", burst {b}");
    }
    if l["overridden"].as_bool() == Some(true) {
        s.push_str(" (an override's rate)");
    }
    if l["shadow"].as_bool() == Some(true) {
        s.push_str(", shadow");
    }
    let _ = write!(
        s,
        ", failure mode {}",
        l["failure_mode"].as_str().unwrap_or("")
    );
    s
}

/// A key's figures, in one line.
fn state_line(s: &Value, store: &str) -> String {
    if s.is_null() {
        return format!(
            "not held: the {store} store is full of other keys, and a call would take the limit's over_capacity mode"
        );
    }
    let n = |k: &str| s[k].as_u64().unwrap_or(0);
    let reset =
        Duration::from_millis((s["reset_seconds"].as_f64().unwrap_or(0.0) * 1e3).round() as u64);
    if n("used") == 0 {
        return format!("used 0 of {0}, {0} left (unused, or not held)", n("limit"));
    }
    format!(
        "used {} of {}, {} left, whole again in {}",
        n("used"),
        n("limit"),
        n("remaining"),
        humantime::format_duration(reset)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_percent_encoded_in_the_query() {
        let q = Query {
            route: Some("/payments.v1.PaymentService/CreatePayment".into()),
            limit: Some("payer daily".into()),
            key: Some("acct-1/EUR&x=1".into()),
        };
        assert_eq!(
            q.path(),
            "/limits?route=%2Fpayments.v1.PaymentService%2FCreatePayment&limit=payer+daily&key=acct-1%2FEUR%26x%3D1"
        );
        assert_eq!(Query::default().path(), "/limits");
    }
}
