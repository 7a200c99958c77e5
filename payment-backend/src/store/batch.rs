//! Write batches: the writes of one call, sent to PostgreSQL in one round
//! trip.
//!
//! Each call of the API ends with several independent writes (payment row,
//! ledger entries, account balances, outbox event, idempotency response).
//! On this machine the cost of a call is dominated by round trips to the
//! database (kernel send/receive and wake-ups), not by SQL work, so on
//! PostgreSQL they go out as one statement of data-modifying CTEs:
//!
//! ```text
//! WITH w1 AS (INSERT … RETURNING 1), w2 AS (UPDATE … RETURNING 1), …
//! SELECT (SELECT count(*) FROM w1), (SELECT count(*) FROM w2), …
//! ```
//!
//! All parts run against one snapshot, so a batch only holds writes that do
//! not read each other's rows. SQLite (local, no round trips) runs the
//! parts one after another. Either way each part's row count is checked
//! against what the caller expects.

use sqlx::{AnyConnection, Row};

use super::Dialect;
use crate::error::Error;

/// A bound value.
#[derive(Debug, Clone)]
pub(super) enum Value {
    I64(i64),
    OptI64(Option<i64>),
    Text(String),
    OptText(Option<String>),
    Bytes(Vec<u8>),
    OptBytes(Option<Vec<u8>>),
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::I64(v)
    }
}
impl From<Option<i64>> for Value {
    fn from(v: Option<i64>) -> Self {
        Value::OptI64(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_owned())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}
impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Value::Text(v.clone())
    }
}
impl From<Option<&str>> for Value {
    fn from(v: Option<&str>) -> Self {
        Value::OptText(v.map(str::to_owned))
    }
}
impl From<Option<Vec<u8>>> for Value {
    fn from(v: Option<Vec<u8>>) -> Self {
        Value::OptBytes(v)
    }
}
impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Self {
        Value::Bytes(v)
    }
}

struct Part {
    /// SQL with its own `$1…$n` placeholders.
    sql: String,
    args: Vec<Value>,
    /// Rows the statement must touch, and what it means if it does not.
    expect: Option<(u64, String)>,
}

/// The writes of one call.
#[derive(Default)]
pub(super) struct Batch {
    parts: Vec<Part>,
}

// === impl Batch ===

impl Batch {
    /// Adds a write that must touch exactly `rows` rows; otherwise the whole
    /// transaction fails with INTERNAL and `what`.
    pub(super) fn push_expect(
        &mut self,
        sql: impl Into<String>,
        args: Vec<Value>,
        rows: u64,
        what: impl Into<String>,
    ) {
        self.parts.push(Part {
            sql: sql.into(),
            args,
            expect: Some((rows, what.into())),
        });
    }

    /// Adds a write whose row count the caller checks itself; returns its
    /// index in the counts that [`Batch::execute`] returns.
    pub(super) fn push_counted(&mut self, sql: impl Into<String>, args: Vec<Value>) -> usize {
        self.parts.push(Part {
            sql: sql.into(),
            args,
            expect: None,
        });
        self.parts.len() - 1
    }

    /// Runs every write inside the caller's transaction; returns the rows
    /// each part touched.
    pub(super) async fn execute(
        self,
        conn: &mut AnyConnection,
        dialect: Dialect,
    ) -> Result<Vec<u64>, Error> {
        let counts = match (dialect, self.parts.len()) {
            (_, 0) => Vec::new(),
            (Dialect::Sqlite, _) | (Dialect::Postgres, 1) => {
                let mut counts = Vec::with_capacity(self.parts.len());
                for p in &self.parts {
                    let q = bind_all(sqlx::query(&p.sql), &p.args);
                    counts.push(q.execute(&mut *conn).await?.rows_affected());
                }
                counts
            }
            (Dialect::Postgres, n) => {
                let (sql, args) = self.combined();
                let row = bind_all(sqlx::query(&sql), &args)
                    .fetch_one(&mut *conn)
                    .await?;
                (0..n)
                    .map(|i| row.try_get::<i64, _>(i).map(|c| c.max(0) as u64))
                    .collect::<Result<_, _>>()?
            }
        };
        for (part, count) in self.parts.iter().zip(&counts) {
            if let Some((rows, what)) = &part.expect {
                if count != rows {
                    return Err(Error::Internal(format!(
                        "{what}: expected {rows} rows, touched {count}"
                    )));
                }
            }
        }
        Ok(counts)
    }

    /// One PostgreSQL statement doing every part, returning each count.
    fn combined(&self) -> (String, Vec<Value>) {
        let mut sql = String::from("WITH ");
        let mut args = Vec::new();
        for (i, p) in self.parts.iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("w{i} AS ("));
            sql.push_str(&renumber(&p.sql, args.len()));
            sql.push_str(" RETURNING 1)");
            args.extend(p.args.iter().cloned());
        }
        sql.push_str(" SELECT ");
        let counts: Vec<String> = (0..self.parts.len())
            .map(|i| format!("(SELECT count(*) FROM w{i})"))
            .collect();
        sql.push_str(&counts.join(", "));
        (sql, args)
    }
}

pub(super) fn bind_all<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    args: &'q [Value],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    for a in args {
        q = match a {
            Value::I64(v) => q.bind(*v),
            Value::OptI64(v) => q.bind(*v),
            Value::Text(v) => q.bind(v.as_str()),
            Value::OptText(v) => q.bind(v.as_deref()),
            Value::Bytes(v) => q.bind(v.as_slice()),
            Value::OptBytes(v) => q.bind(v.as_deref()),
        };
    }
    q
}

/// Shifts every `$n` placeholder in `sql` by `offset`.
fn renumber(sql: &str, offset: usize) -> String {
    if offset == 0 {
        return sql.to_owned();
    }
    let mut out = String::with_capacity(sql.len() + 16);
    let mut chars = sql.char_indices().peekable();
    while let Some((_, c)) = chars.next() {
        out.push(c);
        if c != '$' {
            continue;
        }
        let mut n = 0usize;
        let mut digits = false;
        while let Some(&(_, d)) = chars.peek() {
            match d.to_digit(10) {
                Some(v) => {
                    n = n * 10 + v as usize;
                    digits = true;
                    chars.next();
                }
                None => break,
            }
        }
        if digits {
            out.push_str(&(n + offset).to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_shifted() {
        assert_eq!(renumber("a = $1 AND b = $12", 3), "a = $4 AND b = $15");
        assert_eq!(renumber("x = $2", 0), "x = $2");
    }

    #[test]
    fn parts_become_one_statement_with_counts() {
        let mut b = Batch::default();
        b.push_expect("INSERT INTO t (a) VALUES ($1)", vec![1.into()], 1, "t");
        b.push_expect(
            "UPDATE u SET x = $1 WHERE id = $2",
            vec![2.into(), "k".into()],
            1,
            "u",
        );
        let (sql, args) = b.combined();
        assert_eq!(
            sql,
            "WITH w0 AS (INSERT INTO t (a) VALUES ($1) RETURNING 1), \
             w1 AS (UPDATE u SET x = $2 WHERE id = $3 RETURNING 1) \
             SELECT (SELECT count(*) FROM w0), (SELECT count(*) FROM w1)"
        );
        assert_eq!(args.len(), 3);
    }
}
