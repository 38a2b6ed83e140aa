//! The admin listener: `admin_listen`, `admin_token`, `admin_token_file` (top-level keys).

use std::net::SocketAddr;

use super::parse::parse_addr;
use super::{invalid, ConfigError, Overrides};

/// The admin listener's bearer token. Its `Debug` form hides the value, so it never lands
/// in a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    /// Checks a token as written in the file (`key` names it in the error): surrounding
    /// whitespace is dropped, and what is left must be 1 to 4096 visible ASCII characters,
    /// so it fits an `Authorization: Bearer` header as is.
    pub fn new(key: &'static str, text: &str) -> Result<Self, ConfigError> {
        let t = text.trim();
        if t.is_empty() {
            return Err(invalid(key, "the token is empty"));
        }
        if t.len() > 4096 {
            return Err(invalid(key, "the token is longer than 4096 characters"));
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                key,
                "the token must be visible ASCII characters (no spaces or control bytes)",
            ));
        }
        Ok(AdminToken(t.to_owned()))
    }

    /// The token's bytes, to compare a request's credentials with.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// This group's keys as written (taken from the top level of the file).
#[derive(Debug, Default)]
pub(super) struct FileAdmin {
    /// `admin_listen`
    pub admin_listen: Option<String>,
    /// `admin_token`
    pub admin_token: Option<String>,
    /// `admin_token_file`
    pub admin_token_file: Option<String>,
}

/// This group, validated.
#[derive(Debug)]
pub(super) struct AdminConfig {
    /// Admin listen address.
    pub listen: SocketAddr,
    /// Bearer token the admin API requires.
    pub token: Option<AdminToken>,
}

/// Checks the admin keys (`--admin-listen` wins) and reads `admin_token_file`.
pub(super) fn validate(file: FileAdmin, o: &Overrides) -> Result<AdminConfig, ConfigError> {
    let listen = parse_addr(
        "admin_listen",
        o.admin_listen.as_deref().or(file.admin_listen.as_deref()),
        "127.0.0.1:9090",
    )?;
    let inline = file.admin_token.as_deref().filter(|t| !t.is_empty());
    let token_file = file.admin_token_file.as_deref().filter(|f| !f.is_empty());
    // One or the other, never both.
    let token = match (inline, token_file) {
        (None, None) => None,
        (Some(_), Some(_)) => {
            return Err(invalid(
                "admin_token_file",
                "set admin_token or admin_token_file, not both",
            ))
        }
        (Some(t), None) => Some(AdminToken::new("admin_token", t)?),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| invalid("admin_token_file", format!("cannot read {path}: {e}")))?;
            Some(AdminToken::new("admin_token_file", &text)?)
        }
    };
    Ok(AdminConfig { listen, token })
}
