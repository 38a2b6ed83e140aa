//! TLS: the client side for https to Consul ([`client_config`]) and TLS termination for the
//! proxy listener ([`CertStore`], [`server_config`], [`handshake_failure_reason`]).
//!
//! One crypto provider serves the whole crate (see [`provider`]), so only one crypto
//! library is linked.

mod client;
mod server;

use std::path::PathBuf;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;

pub use client::client_config;
pub use server::{
    handshake_failure_reason, server_config, CertSpec, CertStore, ReloadReport, ALPN_H2,
    ALPN_HTTP11, HANDSHAKE_FAILURE_REASONS,
};

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The CA file could not be read or holds no certificate.
    #[error("consul.ca_file {path}: {message}")]
    CaFile {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// A certificate or key file of `tls.certs` is unusable.
    #[error("tls.certs[{index}].{field} {}: {message}", path.display())]
    CertFile {
        /// The entry's place in `tls.certs`.
        index: usize,
        /// `"cert"` or `"key"`.
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// `tls.certs` is empty.
    #[error("tls.certs: no certificate given")]
    NoCertificates,
    /// rustls refused the configuration.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The crypto provider for every TLS connection of the process, client and server.
///
/// ring, by measurement against aws-lc-rs (full TLS 1.3 handshakes with a P-256
/// certificate and bulk records): handshakes within about 15% either way by key exchange,
/// AES-GCM records 30-50% faster, ChaCha20 even, and no C/cmake build. aws-lc-rs would
/// add X25519MLKEM768 (post-quantum) key exchange, which ring lacks.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
