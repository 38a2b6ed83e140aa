//! The request target's form (RFC 9112 §3.2), one rule for both protocol paths: an HTTP/1
//! request line's target and an HTTP/2 request's `:path` pass the same check.

/// A request target that passed [`check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// `/path?query`.
    Origin,
    /// `*`, for OPTIONS only.
    Asterisk,
    /// `http://authority/path?query`: its authority and what follows it (empty, `/...` or
    /// `?...`).
    Absolute {
        /// The authority, without userinfo.
        authority: &'a str,
        /// What follows the authority.
        rest: &'a str,
    },
    /// Whatever a CONNECT carries; the core refuses CONNECT anyway.
    Connect,
}

/// Why a target was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid request target")]
pub struct BadTarget;

/// Checks `target` for `method`: origin-form; absolute-form with an http(s) scheme and no
/// userinfo; `*` with OPTIONS only; anything with CONNECT (refused later with 405). No
/// fragment and nothing outside visible ASCII. An authority-form target with any other
/// method, or `*` with any method but OPTIONS, is refused: a backend would read it its own
/// way.
pub fn check<'a>(method: &str, target: &'a str) -> Result<Target<'a>, BadTarget> {
    if method == "CONNECT" {
        return Ok(Target::Connect);
    }
    if target.bytes().any(|b| b == b'#' || !b.is_ascii_graphic()) {
        return Err(BadTarget);
    }
    if target.starts_with('/') {
        return Ok(Target::Origin);
    }
    if target == "*" {
        return if method == "OPTIONS" {
            Ok(Target::Asterisk)
        } else {
            Err(BadTarget)
        };
    }
    let (scheme, rest) = target.split_once("://").ok_or(BadTarget)?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Err(BadTarget);
    }
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, rest) = rest.split_at(end);
    // No userinfo (`user@host`): RFC 9110 §4.2.4 forbids it in http(s) URIs.
    if authority.is_empty() || authority.contains('@') {
        return Err(BadTarget);
    }
    Ok(Target::Absolute { authority, rest })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_by_method() {
        assert_eq!(check("GET", "/a?b"), Ok(Target::Origin));
        assert_eq!(check("OPTIONS", "*"), Ok(Target::Asterisk));
        assert_eq!(check("GET", "*"), Err(BadTarget));
        assert_eq!(check("GET", "example.com:80"), Err(BadTarget));
        assert_eq!(check("CONNECT", "example.com:443"), Ok(Target::Connect));
        assert_eq!(
            check("GET", "http://h?q=1"),
            Ok(Target::Absolute {
                authority: "h",
                rest: "?q=1"
            })
        );
        for bad in [
            "http://u@h/",
            "ftp://h/",
            "/a#b",
            "/\u{e9}",
            "http:///x",
            "",
            "a/b",
        ] {
            assert_eq!(check("GET", bad), Err(BadTarget), "{bad:?}");
        }
    }
}
