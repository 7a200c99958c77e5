//! Keeps secrets out of `/config` and logs.

/// A Redis URL with its password masked, otherwise as written:
/// `redis://app:secret@host:6379` becomes `redis://app:***@host:6379`,
/// `redis://secret@host` (a password alone) `redis://***@host`, and a
/// `pass`/`password` query parameter (Unix socket URLs) `***`.
///
/// The user info is taken to end at the last `@`, so a password holding a
/// raw `/`, `?`, `#` or `@` (a URL the client cannot parse either) is still
/// masked whole; an `@` further on (in a query) then masks more than it
/// needs to, never less.
pub(crate) fn url(u: &str) -> String {
    let Some((scheme, rest)) = u.split_once("://") else {
        return u.to_owned();
    };
    let (userinfo, tail) = match rest.rsplit_once('@') {
        Some((userinfo, tail)) => (Some(userinfo), tail),
        None => (None, rest),
    };
    let mut out = format!("{scheme}://");
    match userinfo.map(|i| i.split_once(':')) {
        None => {}
        Some(Some((user, _))) => out.push_str(&format!("{user}:***@")),
        Some(None) => out.push_str("***@"),
    }
    match tail.split_once('?') {
        None => out.push_str(tail),
        Some((before, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _))
                        if k.eq_ignore_ascii_case("pass") || k.eq_ignore_ascii_case("password") =>
                    {
                        format!("{k}=***")
                    }
                    _ => p.to_owned(),
                })
                .collect();
            out.push_str(&format!("{before}?{}", params.join("&")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::url;

    #[test]
    fn passwords_are_masked() {
        assert_eq!(
            url("redis://app:s3cr%40t@h:6379/0"),
            "redis://app:***@h:6379/0"
        );
        assert_eq!(url("rediss://:pw@h:6380"), "rediss://:***@h:6380");
        assert_eq!(url("redis://pw@h"), "redis://***@h");
        assert_eq!(url("redis://h:6379"), "redis://h:6379");
        assert_eq!(
            url("redis+unix:///run/redis.sock?db=1&pass=pw"),
            "redis+unix:///run/redis.sock?db=1&pass=***"
        );
        assert_eq!(url("redis://:a%2Fb@h:6379"), "redis://:***@h:6379");
    }

    #[test]
    fn a_password_that_breaks_the_url_is_not_shown() {
        for u in [
            "redis://:pa#ss@h:6379",
            "redis://:12/pass@h",
            "redis://:pa?ss@h",
        ] {
            let shown = url(u);
            assert!(
                !shown.contains("pa") && !shown.contains("12"),
                "{u} → {shown}"
            );
        }
    }
}
