//! The `[upstream_tls]` section: how `router.proto=h2` backends' certificates are verified.
//! Absent, or without `ca_file`, the webpki (Mozilla) roots are trusted.

use std::path::PathBuf;

use serde::Deserialize;

use super::{invalid, ConfigError};
use crate::tls::TlsError;

/// The raw `[upstream_tls]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUpstreamTls {
    /// PEM file of the CA certificates backends' certificates must chain to.
    pub ca_file: Option<String>,
}

/// Validated settings for TLS to backends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamTlsConfig {
    /// The CA file; `None`: the webpki roots.
    pub ca_file: Option<PathBuf>,
}

/// Checks `[upstream_tls]`: the CA file is read now, so a bad one stops the start (or the
/// reload) with the key's name.
pub(super) fn validate(t: Option<FileUpstreamTls>) -> Result<UpstreamTlsConfig, ConfigError> {
    let Some(ca_file) = t.and_then(|t| t.ca_file) else {
        return Ok(UpstreamTlsConfig::default());
    };
    if ca_file.trim().is_empty() {
        return Err(invalid("upstream_tls.ca_file", "must name a PEM file"));
    }
    let path = PathBuf::from(ca_file);
    if let Err(e) = crate::tls::client_config(Some(&path)) {
        let message = match e {
            TlsError::CaFile { path, message } => format!("{path}: {message}"),
            other => other.to_string(),
        };
        return Err(invalid("upstream_tls.ca_file", message));
    }
    Ok(UpstreamTlsConfig {
        ca_file: Some(path),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_file_is_checked_and_named() {
        assert_eq!(validate(None).unwrap(), UpstreamTlsConfig::default());
        let none = FileUpstreamTls { ca_file: None };
        assert_eq!(validate(Some(none)).unwrap().ca_file, None);
        for bad in ["", "/nonexistent/ca.pem"] {
            let e = validate(Some(FileUpstreamTls {
                ca_file: Some(bad.into()),
            }))
            .unwrap_err()
            .to_string();
            assert!(e.starts_with("upstream_tls.ca_file: "), "{e}");
        }
    }
}
