//! Host normalisation without allocation: case folded, port stripped, trailing dot dropped.

/// Longest host name we accept (DNS limit).
pub const MAX_HOST: usize = 253;

/// Why a request has no usable host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// No Host header and no authority in the target.
    #[error("missing Host header")]
    Missing,
    /// A Host that is not a host name or address with an optional port.
    #[error("invalid Host header")]
    Invalid,
}

/// Normalises `raw` (a Host header or URI authority) into `buf` and returns it as `&str`.
///
/// `Chat.App.Example.NET.:8080` becomes `chat.app.example.net`. Bracketed IPv6 literals are
/// kept with their brackets; they never match a route but are not malformed.
pub fn normalize<'b>(raw: &[u8], buf: &'b mut [u8; MAX_HOST + 2]) -> Result<&'b str, HostError> {
    if raw.is_empty() {
        return Err(HostError::Missing);
    }
    let host = if raw[0] == b'[' {
        let end = raw
            .iter()
            .position(|&b| b == b']')
            .ok_or(HostError::Invalid)?;
        check_port(&raw[end + 1..])?;
        &raw[..=end]
    } else {
        match raw.iter().position(|&b| b == b':') {
            Some(colon) => {
                check_port(&raw[colon..])?;
                &raw[..colon]
            }
            None => raw,
        }
    };
    let host = host.strip_suffix(b".").unwrap_or(host);
    if host.is_empty() || host.len() > MAX_HOST + 2 {
        return Err(HostError::Invalid);
    }
    let out = &mut buf[..host.len()];
    for (o, &b) in out.iter_mut().zip(host) {
        let ok = b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'[' | b']' | b':');
        if !ok {
            return Err(HostError::Invalid);
        }
        *o = b.to_ascii_lowercase();
    }
    // Only ASCII was written, so this cannot fail.
    std::str::from_utf8(out).map_err(|_| HostError::Invalid)
}

/// `rest` is empty or `:` followed by 1 to 5 digits.
fn check_port(rest: &[u8]) -> Result<(), HostError> {
    match rest {
        [] => Ok(()),
        [b':', digits @ ..]
            if (1..=5).contains(&digits.len()) && digits.iter().all(u8::is_ascii_digit) =>
        {
            Ok(())
        }
        _ => Err(HostError::Invalid),
    }
}

/// Whether `name` can be the single label before a domain: lowercase letters, digits, dashes.
pub fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Result<String, HostError> {
        let mut buf = [0u8; MAX_HOST + 2];
        normalize(s.as_bytes(), &mut buf).map(str::to_owned)
    }

    #[test]
    fn normalises() {
        assert_eq!(n("Chat.App.Example.NET").unwrap(), "chat.app.example.net");
        assert_eq!(
            n("chat.app.example.net:8080").unwrap(),
            "chat.app.example.net"
        );
        assert_eq!(n("chat.app.example.net.").unwrap(), "chat.app.example.net");
        assert_eq!(
            n("chat.app.example.net.:80").unwrap(),
            "chat.app.example.net"
        );
        assert_eq!(n("[::1]:8080").unwrap(), "[::1]");
        assert_eq!(n("127.0.0.1:80").unwrap(), "127.0.0.1");
    }

    #[test]
    fn refuses_garbage() {
        assert_eq!(n(""), Err(HostError::Missing));
        for bad in [
            "a b",
            "a:b",
            "a:",
            "a:123456",
            "x/y",
            ".",
            "[::1",
            "a@b",
            "ü.example",
        ] {
            assert_eq!(n(bad), Err(HostError::Invalid), "{bad}");
        }
        assert_eq!(n(&"a".repeat(300)), Err(HostError::Invalid));
    }
}
