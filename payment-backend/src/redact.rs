//! Keeps credentials out of logs and error messages: a database URL is
//! printed only through [`database_url`].

/// Query parameters of a database URL that carry secrets (libpq and sqlx
/// accept a password as `?password=`; the rest are matched by name).
fn is_secret_parameter(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["password", "passwd", "secret", "token"]
        .iter()
        .any(|s| name.contains(s))
}

/// `url` as it may be printed, otherwise as written: the password of its
/// user info and every password-like query parameter replaced by `***`.
///
/// The user info is taken to end at the last `@`, so a password holding a
/// raw `/`, `?`, `#` or `@` (a URL the client cannot parse either) is still
/// masked whole; an `@` further on (in a query) then masks more than it
/// needs to, never less.
pub fn database_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (userinfo, tail) = match rest.rsplit_once('@') {
        Some((userinfo, tail)) => (Some(userinfo), tail),
        None => (None, rest),
    };
    let mut out = format!("{scheme}://");
    if let Some(userinfo) = userinfo {
        match userinfo.split_once(':') {
            Some((user, _)) => out.push_str(&format!("{user}:***@")),
            // A user name alone is no secret.
            None => out.push_str(&format!("{userinfo}@")),
        }
    }
    out.push_str(&mask_query(tail));
    out
}

/// `tail` (host, path, query) with the values of password-like query
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
    use super::database_url;

    #[test]
    fn passwords_are_hidden_wherever_they_are() {
        for (url, shown) in [
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
            assert_eq!(database_url(url), shown, "{url}");
        }
    }

    #[test]
    fn a_password_that_breaks_the_url_is_masked_whole() {
        // A raw `/`, `?`, `#` or `@` in the password: the URL does not parse
        // (or parses wrongly), and the password still must not show.
        for url in [
            "postgres://app:pa/ss@db/pay",
            "postgres://app:pa?ss@db/pay",
            "postgres://app:pa#ss@db/pay",
            "postgres://app:12/pass@db/pay",
            "postgres://app:12?pass@db/pay",
            "postgres://app:p@ss@db/pay",
        ] {
            assert_eq!(database_url(url), "postgres://app:***@db/pay", "{url}");
        }
        // Even where the URL itself is invalid (a port out of range).
        assert_eq!(
            database_url("postgres://app:pw@db:99999/pay"),
            "postgres://app:***@db:99999/pay"
        );
    }
}
