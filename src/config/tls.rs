//! The `[tls]` section: the TLS listener and its certificates. Absent, there is none.
//!
//! Certificate files are read and checked by the TLS module at start, not here.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::listener::{ProxyProtocol, PROXY_PROTOCOL};
use super::parse::{parse_addr, parse_choice};
use super::{invalid, ConfigError};

/// The raw `[tls]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
    /// TLS listen address (required).
    pub listen: Option<String>,
    /// PROXY protocol on the TLS listener: `off`, `v1`, `v2` or `optional`.
    pub proxy_protocol: Option<String>,
    /// Answer plain-HTTP requests with a 308 to https.
    pub redirect_http: Option<bool>,
    /// `[[tls.certs]]`: the first is the default certificate.
    pub certs: Option<Vec<FileCert>>,
}

/// One raw `[[tls.certs]]` entry.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCert {
    /// PEM certificate chain, leaf first.
    pub cert: Option<String>,
    /// PEM private key.
    pub key: Option<String>,
}

/// Validated TLS listener settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// Where the TLS listener binds.
    pub listen: SocketAddr,
    /// PROXY protocol on the TLS listener.
    pub proxy_protocol: ProxyProtocol,
    /// Plain-HTTP requests to routed hosts get a 308 to the same URL in https.
    pub redirect_http: bool,
    /// At least one; the first is the default certificate (no SNI, or no name matched).
    pub certs: Vec<CertPaths>,
}

/// One certificate's files, as written (relative paths are the process's working directory's,
/// as for `access_log_file` and `consul.ca_file`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPaths {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// Checks `[tls]`; `taken` are the other listeners' keys and addresses, which `tls.listen`
/// must differ from (port 0 aside: each bind takes its own port).
pub(super) fn validate(
    file: Option<FileTls>,
    taken: &[(&'static str, SocketAddr)],
) -> Result<Option<TlsConfig>, ConfigError> {
    let Some(t) = file else { return Ok(None) };
    let Some(listen) = t.listen.as_deref() else {
        return Err(invalid(
            "tls.listen",
            "required in [tls]: the TLS listener's IP:port address",
        ));
    };
    let listen = parse_addr("tls.listen", Some(listen), "")?;
    if listen.port() != 0 {
        if let Some((key, _)) = taken.iter().find(|(_, addr)| *addr == listen) {
            return Err(invalid(
                "tls.listen",
                format!("{listen} is already the address of {key}"),
            ));
        }
    }
    let proxy_protocol = parse_choice(
        "tls.proxy_protocol",
        t.proxy_protocol.as_deref(),
        &PROXY_PROTOCOL,
    )?;
    let certs = t
        .certs
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let path = |name: &str, value: Option<String>| {
                value
                    .filter(|p| !p.is_empty())
                    .map(PathBuf::from)
                    .ok_or_else(|| {
                        invalid("tls.certs", format!("entry {} has no {name} path", i + 1))
                    })
            };
            Ok(CertPaths {
                cert: path("cert", c.cert)?,
                key: path("key", c.key)?,
            })
        })
        .collect::<Result<Vec<_>, ConfigError>>()?;
    if certs.is_empty() {
        return Err(invalid("tls.certs", "at least one certificate is required"));
    }
    Ok(Some(TlsConfig {
        listen,
        proxy_protocol,
        redirect_http: t.redirect_http.unwrap_or(false),
        certs,
    }))
}
