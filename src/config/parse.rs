//! Value parsers the sections share. Each takes the key it reads, so its error names it.

use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;

use super::{invalid, ConfigError};

/// An `IP:port` address, or `default` when the key is absent.
pub(super) fn parse_addr(
    key: &'static str,
    value: Option<&str>,
    default: &str,
) -> Result<SocketAddr, ConfigError> {
    let v = value.unwrap_or(default);
    v.parse()
        .map_err(|_| invalid(key, format!("{v:?} is not an IP:port address")))
}

/// A duration like `500ms` or `5m`, or `default` when the key is absent.
pub(super) fn parse_duration(
    key: &'static str,
    value: Option<&str>,
    default: &str,
) -> Result<Duration, ConfigError> {
    let v = value.unwrap_or(default);
    humantime::parse_duration(v).map_err(|e| {
        invalid(
            key,
            format!("{v:?} is not a duration like 500ms, 2s, 5m ({e})"),
        )
    })
}

/// A CIDR, or a bare address meaning that one host.
pub(super) fn parse_cidr(key: &'static str, s: &str) -> Result<IpNet, ConfigError> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net);
    }
    s.parse::<std::net::IpAddr>()
        .map(IpNet::from)
        .map_err(|_| invalid(key, format!("{s:?} is not an IP or CIDR")))
}

/// A CIDR written in the source.
pub(super) fn cidr(s: &str) -> IpNet {
    s.parse()
        .unwrap_or_else(|_| unreachable!("static CIDR {s}"))
}

/// One of the named `choices`; the first when the key is absent. The error lists them all:
/// `"x" is not "a", "b" or "c"`.
pub(super) fn parse_choice<T: Copy>(
    key: &'static str,
    value: Option<&str>,
    choices: &[(&str, T)],
) -> Result<T, ConfigError> {
    let Some(v) = value else {
        return match choices.first() {
            Some(&(_, first)) => Ok(first),
            None => unreachable!("{key} has no choices"),
        };
    };
    if let Some(&(_, c)) = choices.iter().find(|(name, _)| *name == v) {
        return Ok(c);
    }
    let mut names = String::new();
    for (i, (name, _)) in choices.iter().enumerate() {
        if i > 0 {
            names.push_str(if i + 1 == choices.len() { " or " } else { ", " });
        }
        names.push_str(&format!("{name:?}"));
    }
    Err(invalid(key, format!("{v:?} is not {names}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choice_messages() {
        let two = [("all", 1), ("tagged", 2)];
        assert_eq!(parse_choice("k", None, &two).unwrap(), 1);
        assert_eq!(parse_choice("k", Some("tagged"), &two).unwrap(), 2);
        assert_eq!(
            parse_choice("k", Some("x"), &two).unwrap_err().to_string(),
            "k: \"x\" is not \"all\" or \"tagged\""
        );
        let four = [("off", 0), ("v1", 1), ("v2", 2), ("optional", 3)];
        assert_eq!(
            parse_choice("k", Some("v3"), &four)
                .unwrap_err()
                .to_string(),
            "k: \"v3\" is not \"off\", \"v1\", \"v2\" or \"optional\""
        );
    }
}
