//! Keeps credentials out of logs: passwords in URLs are replaced before a
//! URL is printed anywhere.

/// Returns `url` with the password (if any) replaced by `***`.
pub fn url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    let redacted = match userinfo.find(':') {
        Some(colon) => format!("{}:***", &userinfo[..colon]),
        None => userinfo.to_owned(),
    };
    format!("{}{}@{}", &url[..scheme_end + 3], redacted, &rest[at + 1..])
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            super::url("postgres://app:s3cr@t@db:5432/pay?sslmode=require"),
            "postgres://app:***@db:5432/pay?sslmode=require"
        );
        assert_eq!(
            super::url("postgres://db:5432/pay"),
            "postgres://db:5432/pay"
        );
        assert_eq!(super::url("sqlite://payments.db"), "sqlite://payments.db");
        assert_eq!(super::url("redis://user@h:1"), "redis://user@h:1");
    }
}
