//! Keeps secrets out of `/config` and logs.

use crate::config::Config;

/// The config as `/config` shows it: Redis passwords masked.
pub fn config(c: &Config) -> Config {
    let mut c = c.clone();
    if let Some(r) = &mut c.limiter.redis {
        r.url = r.url.as_deref().map(url);
        r.urls = r.urls.iter().map(|u| url(u)).collect();
    }
    c
}

/// A URL with its password (the part between `user:` and `@`) masked:
/// `redis://app:secret@host:6379` becomes `redis://app:***@host:6379`.
pub fn url(u: &str) -> String {
    let Some(scheme_end) = u.find("://").map(|i| i + 3) else {
        return u.to_owned();
    };
    let rest = &u[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return u.to_owned();
    };
    let userinfo = &rest[..at];
    let user = match userinfo.split_once(':') {
        Some((user, _)) => user,
        None if !userinfo.is_empty() => {
            // `redis://secret@host`: a password alone.
            return format!("{}***{}", &u[..scheme_end], &rest[at..]);
        }
        None => return u.to_owned(),
    };
    format!("{}{user}:***{}", &u[..scheme_end], &rest[at..])
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
        assert_eq!(url("redis://h:6379/0?x=a@b"), "redis://h:6379/0?x=a@b");
    }
}
