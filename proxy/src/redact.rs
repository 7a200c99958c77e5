//! Keeps secrets out of logs, `/config` and error messages: a URL is shown
//! only through [`url`]. One source for both binaries: the payment backend
//! compiles this file as its own `redact` module, so a Redis URL and a
//! database URL are masked by the same rules.

/// What a user info without `:` is: Redis reads `redis://secret@host` as a
/// password alone, PostgreSQL reads `postgres://app@db` as a user name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bare {
    /// Masked: `redis://***@host`.
    Password,
    /// Kept: a user name alone is no secret.
    User,
}

/// Query parameters that carry secrets: `pass` (Redis Unix socket URLs),
/// and any name containing password, passwd, secret or token (libpq and
/// sqlx take `?password=`, `?sslpassword=`).
fn is_secret_parameter(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name == "pass"
        || ["password", "passwd", "secret", "token"]
            .iter()
            .any(|s| name.contains(s))
}

/// `u` as it may be shown, otherwise as written: the password of its user
/// info and every secret query parameter replaced by `***`:
/// `redis://app:secret@host:6379` becomes `redis://app:***@host:6379`.
///
/// The user info is taken to end at the last `@`, so a password holding a
/// raw `/`, `?`, `#` or `@` (a URL the client cannot parse either) is still
/// masked whole; an `@` further on (in a query) then masks more than it
/// needs to, never less.
pub fn url(u: &str, bare: Bare) -> String {
    let Some((scheme, rest)) = u.split_once("://") else {
        return u.to_owned();
    };
    let (userinfo, tail) = match rest.rsplit_once('@') {
        Some((userinfo, tail)) => (Some(userinfo), tail),
        None => (None, rest),
    };
    let mut out = format!("{scheme}://");
    if let Some(userinfo) = userinfo {
        match (userinfo.split_once(':'), bare) {
            (Some((user, _)), _) => out.push_str(&format!("{user}:***@")),
            (None, Bare::Password) => out.push_str("***@"),
            (None, Bare::User) => out.push_str(&format!("{userinfo}@")),
        }
    }
    out.push_str(&mask_query(tail));
    out
}

/// `tail` (host, path, query, fragment) with the values of secret query
/// parameters replaced by `***`.
fn mask_query(tail: &str) -> String {
    let Some((before, query)) = tail.split_once('?') else {
        return tail.to_owned();
    };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let params: Vec<String> = query
        .split('&')
        .map(|p| match p.split_once('=') {
            Some((k, _)) if is_secret_parameter(k) => format!("{k}=***"),
            _ => p.to_owned(),
        })
        .collect();
    let mut out = format!("{before}?{}", params.join("&"));
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{url, Bare};

    fn redis(u: &str) -> String {
        url(u, Bare::Password)
    }

    fn database(u: &str) -> String {
        url(u, Bare::User)
    }

    #[test]
    fn redis_passwords_are_masked() {
        assert_eq!(
            redis("redis://app:s3cr%40t@h:6379/0"),
            "redis://app:***@h:6379/0"
        );
        assert_eq!(redis("rediss://:pw@h:6380"), "rediss://:***@h:6380");
        assert_eq!(redis("redis://pw@h"), "redis://***@h");
        assert_eq!(redis("redis://h:6379"), "redis://h:6379");
        assert_eq!(
            redis("redis+unix:///run/redis.sock?db=1&pass=pw"),
            "redis+unix:///run/redis.sock?db=1&pass=***"
        );
        assert_eq!(redis("redis://:a%2Fb@h:6379"), "redis://:***@h:6379");
    }

    #[test]
    fn a_redis_password_that_breaks_the_url_is_not_shown() {
        for u in [
            "redis://:pa#ss@h:6379",
            "redis://:12/pass@h",
            "redis://:pa?ss@h",
        ] {
            let shown = redis(u);
            assert!(
                !shown.contains("pa") && !shown.contains("12"),
                "{u} → {shown}"
            );
        }
    }

    #[test]
    fn database_passwords_are_hidden_wherever_they_are() {
        for (u, shown) in [
            (
                "postgres://app:s3cr@t@db:5432/pay?sslmode=require",
                "postgres://app:***@db:5432/pay?sslmode=require",
            ),
            // Characters that end the authority, percent-encoded in a password.
            (
                "postgres://app:a%2Fb%3Fc%23d@db/pay",
                "postgres://app:***@db/pay",
            ),
            (
                "postgres://app@db/pay?password=hunter2&sslmode=require",
                "postgres://app@db/pay?password=***&sslmode=require",
            ),
            (
                "postgresql://db/pay?user=app&Password=x&sslpassword=y",
                "postgresql://db/pay?user=app&Password=***&sslpassword=***",
            ),
            ("postgres://db:5432/pay", "postgres://db:5432/pay"),
            ("sqlite://payments.db", "sqlite://payments.db"),
            (
                "sqlite://payments.db?mode=rwc",
                "sqlite://payments.db?mode=rwc",
            ),
        ] {
            assert_eq!(database(u), shown, "{u}");
        }
    }

    #[test]
    fn a_database_password_that_breaks_the_url_is_masked_whole() {
        // A raw `/`, `?`, `#` or `@` in the password: the URL does not parse
        // (or parses wrongly), and the password still must not show.
        for u in [
            "postgres://app:pa/ss@db/pay",
            "postgres://app:pa?ss@db/pay",
            "postgres://app:pa#ss@db/pay",
            "postgres://app:12/pass@db/pay",
            "postgres://app:12?pass@db/pay",
            "postgres://app:p@ss@db/pay",
        ] {
            assert_eq!(database(u), "postgres://app:***@db/pay", "{u}");
        }
        // Even where the URL itself is invalid (a port out of range).
        assert_eq!(
            database("postgres://app:pw@db:99999/pay"),
            "postgres://app:***@db:99999/pay"
        );
    }
}
