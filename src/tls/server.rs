//! TLS termination: the certificate store chosen by SNI, its reload, the server config and
//! the classification of failed handshakes.

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::TlsError;

/// The ALPN name of HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";
/// The ALPN name of HTTP/1.1.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// One `[[tls.certs]]` entry: a PEM certificate chain (leaf first) and its PEM private key
/// (PKCS#8, SEC1 or PKCS#1).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertSpec {
    /// The certificate chain file.
    pub cert: PathBuf,
    /// The private key file.
    pub key: PathBuf,
}

/// Name maps; foldhash is seeded per process, so client-chosen names cannot collide on
/// purpose.
type NameMap = HashMap<Box<str>, Arc<CertifiedKey>, foldhash::fast::RandomState>;

/// One immutable set of certificates by name; a reload swaps the whole set.
#[derive(Debug)]
struct Names {
    exact: NameMap,
    /// `*.app.example.net` under the key `app.example.net`.
    wildcard: NameMap,
    default: Arc<CertifiedKey>,
}

impl Names {
    /// Earlier entries win a name that several certificates hold, as the first is the default.
    fn build(entries: &[Entry]) -> Option<Names> {
        let default = entries.first()?.loaded.key.clone();
        let mut exact = NameMap::default();
        let mut wildcard = NameMap::default();
        for entry in entries {
            for name in &entry.loaded.names {
                let (map, key) = match name.strip_prefix("*.") {
                    Some(parent) => (&mut wildcard, parent),
                    None => (&mut exact, &**name),
                };
                map.entry(key.into())
                    .or_insert_with(|| entry.loaded.key.clone());
            }
        }
        Some(Names {
            exact,
            wildcard,
            default,
        })
    }

    fn pick(&self, sni: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(sni) = sni else {
            return &self.default;
        };
        // rustls hands the SNI lowercased without a trailing dot; other callers may not.
        let name = normalize(sni);
        if let Some(key) = self.exact.get(&*name) {
            return key;
        }
        // A wildcard covers exactly one label, which must not be empty.
        if let Some((label, parent)) = name.split_once('.') {
            if !label.is_empty() {
                if let Some(key) = self.wildcard.get(parent) {
                    return key;
                }
            }
        }
        &self.default
    }
}

fn normalize(name: &str) -> Cow<'_, str> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    }
}

/// A certificate as loaded from its files.
#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    /// Lowercase DNS names, wildcards as `*.suffix`.
    names: Vec<Box<str>>,
    /// A hash of both files' bytes: a reload re-parses only what changed.
    fingerprint: u64,
}

/// What a file looked like at the last check; any difference means "read it again".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    /// A file replaced by rename (or a Kubernetes secret's symlink swap) gets a new inode.
    ino: u64,
}

/// Both files' stamps; `None` for a file that could not be stat'ed.
type Stamps = [Option<Stamp>; 2];

#[derive(Debug)]
struct Entry {
    loaded: Loaded,
    seen: Stamps,
}

/// The server certificates, chosen by SNI at each handshake.
///
/// Names come from each certificate's SAN DNS names (its CN only when it has none). Exact
/// names are tried first, then wildcards (`*.app.example.net` covers exactly one more
/// label); no SNI or an unknown name gets the first certificate. A name held by several
/// certificates goes to the earliest. Lookups are two hash probes on a snapshot behind an
/// `ArcSwap`; a reload swaps the whole snapshot, and open connections keep theirs.
pub struct CertStore {
    specs: Vec<CertSpec>,
    provider: Arc<CryptoProvider>,
    names: ArcSwap<Names>,
    /// Reload state; only reloads take this lock, never a handshake.
    entries: Mutex<Vec<Entry>>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("specs", &self.specs)
            .finish_non_exhaustive()
    }
}

/// What [`CertStore::reload`] did.
#[derive(Debug, Default)]
pub struct ReloadReport {
    /// Entries of `tls.certs` (by index) whose files changed and are now in force.
    pub reloaded: Vec<usize>,
    /// Entries whose files could not be used; each keeps its previous certificate. Each
    /// error names the entry and the file.
    pub refused: Vec<TlsError>,
}

impl ReloadReport {
    /// Nothing was reloaded or refused.
    pub fn is_empty(&self) -> bool {
        self.reloaded.is_empty() && self.refused.is_empty()
    }
}

impl CertStore {
    /// Reads and checks every certificate and key. The first error is returned, naming the
    /// entry and the file (`tls.certs[1].key /path: no private key found`).
    pub fn load(specs: &[CertSpec]) -> Result<Arc<CertStore>, TlsError> {
        let provider = super::provider();
        let entries = specs
            .iter()
            .enumerate()
            .map(|(index, spec)| {
                let seen = stamps(spec);
                let (cert, key) = read_files(index, spec)?;
                let loaded = parse(index, spec, &cert, &key, &provider)?;
                Ok(Entry { loaded, seen })
            })
            .collect::<Result<Vec<_>, TlsError>>()?;
        let names = Names::build(&entries).ok_or(TlsError::NoCertificates)?;
        Ok(Arc::new(CertStore {
            specs: specs.to_vec(),
            provider,
            names: ArcSwap::from_pointee(names),
            entries: Mutex::new(entries),
        }))
    }

    /// The entries this store was loaded from.
    pub fn specs(&self) -> &[CertSpec] {
        &self.specs
    }

    /// The certificate a handshake with this SNI would get.
    pub fn lookup(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        self.names.load().pick(sni).clone()
    }

    /// Reads every file again (SIGHUP). Entries whose content changed are parsed and, if
    /// good, swapped in together; a bad one is refused with a warning naming its file and
    /// keeps its previous certificate. Connections already open are unaffected.
    pub fn reload(&self) -> ReloadReport {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let mut report = ReloadReport::default();
        for (index, (spec, entry)) in self.specs.iter().zip(entries.iter_mut()).enumerate() {
            // Stat before reading, so a write during the read shows at the next poll.
            entry.seen = stamps(spec);
            let parsed = read_files(index, spec).and_then(|(cert, key)| {
                if fingerprint(&cert, &key) == entry.loaded.fingerprint {
                    return Ok(None);
                }
                parse(index, spec, &cert, &key, &self.provider).map(Some)
            });
            match parsed {
                Ok(None) => {}
                Ok(Some(loaded)) => {
                    entry.loaded = loaded;
                    report.reloaded.push(index);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "TLS certificate refused; the previous one stays in use");
                    report.refused.push(e);
                }
            }
        }
        if !report.reloaded.is_empty() {
            if let Some(names) = Names::build(&entries) {
                self.names.store(Arc::new(names));
            }
            tracing::info!(entries = ?report.reloaded, "TLS certificates reloaded");
        }
        report
    }

    /// Reloads if any file's mtime, length or inode changed since the last look (a stat per
    /// file, no read otherwise), for polling every few seconds. `None` when nothing changed.
    pub fn reload_if_changed(&self) -> Option<ReloadReport> {
        let changed = {
            let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
            self.specs
                .iter()
                .zip(entries.iter())
                .any(|(spec, entry)| stamps(spec) != entry.seen)
        };
        changed.then(|| self.reload())
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.lookup(hello.server_name()))
    }
}

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        ino: meta.ino(),
    })
}

fn stamps(spec: &CertSpec) -> Stamps {
    [stamp(&spec.cert), stamp(&spec.key)]
}

fn file_error(index: usize, field: &'static str, path: &Path, message: String) -> TlsError {
    TlsError::CertFile {
        index,
        field,
        path: path.to_owned(),
        message,
    }
}

fn read_files(index: usize, spec: &CertSpec) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    let read = |field, path: &Path| {
        std::fs::read(path).map_err(|e| file_error(index, field, path, e.to_string()))
    };
    Ok((read("cert", &spec.cert)?, read("key", &spec.key)?))
}

fn fingerprint(cert: &[u8], key: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    cert.hash(&mut h);
    key.hash(&mut h);
    h.finish()
}

fn parse(
    index: usize,
    spec: &CertSpec,
    cert_pem: &[u8],
    key_pem: &[u8],
    provider: &CryptoProvider,
) -> Result<Loaded, TlsError> {
    let cert_err = |message: String| file_error(index, "cert", &spec.cert, message);
    let key_err = |message: String| file_error(index, "key", &spec.key, message);

    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(format!("cannot parse PEM: {e}")))?;
    let Some(leaf) = chain.first() else {
        return Err(cert_err("no certificate found".into()));
    };
    let names = cert_names(leaf).map_err(|e| cert_err(format!("cannot parse certificate: {e}")))?;
    if names.is_empty() {
        // Still usable as the default certificate.
        tracing::warn!(index, path = %spec.cert.display(), "TLS certificate holds no DNS name (SAN or CN)");
    }

    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
        pem::Error::NoItemsFound => key_err("no private key found".into()),
        e => key_err(format!("cannot parse PEM: {e}")),
    })?;
    let signer = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| key_err(format!("unsupported private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signer);
    match certified.keys_match() {
        // Unknown: the key type cannot tell its public key (none of ring's).
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(_)) => {
            return Err(key_err(format!(
                "does not match the certificate in {}",
                spec.cert.display()
            )))
        }
        Err(e) => return Err(cert_err(e.to_string())),
    }
    Ok(Loaded {
        key: Arc::new(certified),
        names,
        fingerprint: fingerprint(cert_pem, key_pem),
    })
}

/// The leaf's SAN DNS names, or its subject CN when it has none; lowercase, deduplicated.
fn cert_names(leaf: &CertificateDer<'_>) -> Result<Vec<Box<str>>, webpki::Error> {
    let cert = webpki::EndEntityCert::try_from(leaf)?;
    let mut names: Vec<Box<str>> = cert
        .valid_dns_names()
        .map(|n| normalize(n).into())
        .collect();
    if names.is_empty() {
        if let Some(cn) = common_name(cert.subject()).filter(|cn| is_dns_name(cn)) {
            names.push(normalize(cn).into());
        }
    }
    names.sort_unstable();
    names.dedup();
    Ok(names)
}

fn is_dns_name(name: &str) -> bool {
    let name = name.strip_prefix("*.").unwrap_or(name);
    DnsName::try_from(name).is_ok()
}

/// The first CN in a DER `Name` (the content of its outer SEQUENCE, as webpki gives it).
/// rustls-webpki parses SANs but not the subject, and this is all we need of it.
fn common_name(subject: &[u8]) -> Option<&str> {
    const SET: u8 = 0x31;
    const SEQUENCE: u8 = 0x30;
    const OID: u8 = 0x06;
    const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
    let mut rdns = subject;
    while !rdns.is_empty() {
        let (tag, rdn, rest) = der_tlv(rdns)?;
        rdns = rest;
        if tag != SET {
            return None;
        }
        let mut atvs = rdn;
        while !atvs.is_empty() {
            let (tag, atv, rest) = der_tlv(atvs)?;
            atvs = rest;
            if tag != SEQUENCE {
                return None;
            }
            let (tag, oid, value) = der_tlv(atv)?;
            if tag == OID && oid == OID_CN {
                let (tag, text, _) = der_tlv(value)?;
                // UTF8String, PrintableString, IA5String.
                return match tag {
                    0x0c | 0x13 | 0x16 => std::str::from_utf8(text).ok(),
                    _ => None,
                };
            }
        }
    }
    None
}

/// One DER tag-length-value: the tag, the value and what follows.
fn der_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, after) = rest.split_at(n);
        rest = after;
        bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
    };
    if rest.len() < len {
        return None;
    }
    let (value, after) = rest.split_at(len);
    Some((tag, value, after))
}

/// A rustls server config for the proxy listener: the safe defaults (TLS 1.3 and 1.2, the
/// provider's suites), ALPN `h2` then `http/1.1`, no client auth, certificates from
/// `store`. Resumption is rustls's default: session IDs (TLS 1.2) and stateful tickets
/// (TLS 1.3) in a 256-entry in-memory cache; stateless tickets are off, so there is no
/// ticket key to rotate or share.
pub fn server_config(store: Arc<CertStore>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(store.provider.clone())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(store);
    cfg.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
    Ok(Arc::new(cfg))
}

/// Every reason [`handshake_failure_reason`] can return, for metrics to register up front.
pub const HANDSHAKE_FAILURE_REASONS: &[&str] = &[
    "eof",
    "reset",
    "timeout",
    "not_tls",
    "protocol_version",
    "no_shared_cipher",
    "no_alpn",
    "bad_certificate",
    "incompatible",
    "bad_message",
    "alert",
    "other",
];

/// A short reason for a failed `TlsAcceptor::accept`, for a metric label: the rustls error
/// inside the io error if any, else the io error's kind. One of
/// [`HANDSHAKE_FAILURE_REASONS`].
pub fn handshake_failure_reason(e: &io::Error) -> &'static str {
    if let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        return rustls_reason(tls);
    }
    match e.kind() {
        io::ErrorKind::UnexpectedEof => "eof",
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => "reset",
        io::ErrorKind::TimedOut => "timeout",
        _ => "other",
    }
}

fn rustls_reason(e: &rustls::Error) -> &'static str {
    use rustls::{AlertDescription as A, Error as E, InvalidMessage as M, PeerIncompatible as P};
    match e {
        // Typically plain HTTP sent to the TLS port.
        E::InvalidMessage(M::InvalidContentType | M::UnknownProtocolVersion) => "not_tls",
        E::PeerIncompatible(
            P::SupportedVersionsExtensionRequired
            | P::Tls12NotOffered
            | P::Tls12NotOfferedOrEnabled
            | P::ServerDoesNotSupportTls12Or13,
        )
        | E::AlertReceived(A::ProtocolVersion) => "protocol_version",
        E::PeerIncompatible(
            P::NoCipherSuitesInCommon
            | P::NoKxGroupsInCommon
            | P::NoSignatureSchemesInCommon
            | P::NoEcPointFormatsInCommon,
        )
        | E::AlertReceived(A::HandshakeFailure | A::InsufficientSecurity) => "no_shared_cipher",
        E::PeerIncompatible(_) => "incompatible",
        E::NoApplicationProtocol | E::AlertReceived(A::NoApplicationProtocol) => "no_alpn",
        // The client refused our certificate (unknown CA, expired, wrong name).
        E::AlertReceived(
            A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA,
        )
        | E::InvalidCertificate(_)
        | E::NoCertificatesPresented => "bad_certificate",
        E::AlertReceived(_) => "alert",
        E::InvalidMessage(_)
        | E::InappropriateMessage { .. }
        | E::InappropriateHandshakeMessage { .. }
        | E::PeerMisbehaved(_)
        | E::PeerSentOversizedRecord
        | E::DecryptError => "bad_message",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;

    fn openssl(args: &[&str]) {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn tmpdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cr-tls-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A self-signed ECDSA P-256 certificate with subject CN `cn` and these SAN DNS names
    /// (none: no SAN extension), as `<name>.pem` and `<name>.key` (PKCS#8) in `dir`.
    fn make(dir: &Path, name: &str, cn: &str, sans: &[&str]) -> CertSpec {
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}.key"));
        let subj = format!("/CN={cn}");
        let mut args = vec![
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &subj,
        ];
        let san = format!(
            "subjectAltName={}",
            sans.iter()
                .map(|s| format!("DNS:{s}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        if !sans.is_empty() {
            args.extend(["-addext", &san]);
        }
        args.extend([
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ]);
        openssl(&args);
        CertSpec { cert, key }
    }

    fn leaf(spec: &CertSpec) -> CertificateDer<'static> {
        CertificateDer::pem_file_iter(&spec.cert)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
    }

    fn served(store: &CertStore, sni: Option<&str>) -> CertificateDer<'static> {
        store.lookup(sni).cert[0].clone()
    }

    /// Replaces `to` by `from` with a rename, as deployment tools do (a new inode).
    fn replace(from: &Path, to: &Path) {
        std::fs::rename(from, to).unwrap();
    }

    #[test]
    fn names_exact_then_wildcard_then_default() {
        let dir = tmpdir("names");
        let a = make(&dir, "a", "ignored.example.net", &["default.example.net"]);
        let b = make(&dir, "b", "b", &["www.example.net", "*.app.example.net"]);
        let c = make(&dir, "c", "cn.example.net", &[]);
        let d = make(
            &dir,
            "d",
            "d",
            &["exact.app.example.net", "www.example.net"],
        );
        let store = CertStore::load(&[a.clone(), b.clone(), c.clone(), d.clone()]).unwrap();
        let cases = [
            (Some("default.example.net"), &a),
            (Some("www.example.net"), &b),
            (Some("WWW.Example.NET."), &b),
            (Some("x.app.example.net"), &b),
            (Some("exact.app.example.net"), &d),
            (Some("cn.example.net"), &c),
            // The CN is not used when there are SANs.
            (Some("ignored.example.net"), &a),
            // A wildcard covers one label only, and not its parent.
            (Some("a.b.app.example.net"), &a),
            (Some("app.example.net"), &a),
            (Some(".app.example.net"), &a),
            (Some("unknown.example.org"), &a),
            (None, &a),
        ];
        for (sni, want) in cases {
            assert_eq!(served(&store, sni), leaf(want), "{sni:?}");
        }
    }

    #[test]
    fn key_formats() {
        let dir = tmpdir("formats");
        let ec = make(&dir, "ec", "ec", &["ec.example.net"]);
        let sec1 = dir.join("ec.sec1");
        openssl(&[
            "ec",
            "-in",
            ec.key.to_str().unwrap(),
            "-out",
            sec1.to_str().unwrap(),
        ]);
        assert!(std::fs::read_to_string(&sec1)
            .unwrap()
            .contains("BEGIN EC PRIVATE KEY"));
        let rsa_cert = dir.join("rsa.pem");
        let rsa_key = dir.join("rsa.key");
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=rsa.example.net",
            "-keyout",
            rsa_key.to_str().unwrap(),
            "-out",
            rsa_cert.to_str().unwrap(),
        ]);
        let pkcs1 = dir.join("rsa.pkcs1");
        openssl(&[
            "rsa",
            "-in",
            rsa_key.to_str().unwrap(),
            "-traditional",
            "-out",
            pkcs1.to_str().unwrap(),
        ]);
        assert!(std::fs::read_to_string(&pkcs1)
            .unwrap()
            .contains("BEGIN RSA PRIVATE KEY"));
        let store = CertStore::load(&[
            CertSpec {
                cert: ec.cert.clone(),
                key: sec1,
            },
            CertSpec {
                cert: rsa_cert.clone(),
                key: pkcs1,
            },
        ])
        .unwrap();
        let rsa = CertSpec {
            cert: rsa_cert,
            key: rsa_key,
        };
        assert_eq!(served(&store, Some("rsa.example.net")), leaf(&rsa));
        assert_eq!(served(&store, Some("ec.example.net")), leaf(&ec));
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tmpdir("bad");
        let a = make(&dir, "a", "a", &["a.example.net"]);
        let b = make(&dir, "b", "b", &["b.example.net"]);
        let err = |specs: &[CertSpec]| CertStore::load(specs).unwrap_err().to_string();

        let missing = CertSpec {
            cert: dir.join("nope.pem"),
            key: a.key.clone(),
        };
        let e = err(&[a.clone(), missing]);
        assert!(
            e.starts_with(&format!(
                "tls.certs[1].cert {}: ",
                dir.join("nope.pem").display()
            )),
            "{e}"
        );

        // A key file holding only a certificate.
        let no_key = CertSpec {
            cert: b.cert.clone(),
            key: b.cert.clone(),
        };
        let e = err(&[a.clone(), no_key]);
        assert_eq!(
            e,
            format!(
                "tls.certs[1].key {}: no private key found",
                b.cert.display()
            )
        );

        let no_cert = CertSpec {
            cert: a.key.clone(),
            key: a.key.clone(),
        };
        let e = err(&[no_cert]);
        assert_eq!(
            e,
            format!(
                "tls.certs[0].cert {}: no certificate found",
                a.key.display()
            )
        );

        let mismatch = CertSpec {
            cert: a.cert.clone(),
            key: b.key.clone(),
        };
        let e = err(&[mismatch]);
        assert!(
            e.starts_with(&format!(
                "tls.certs[0].key {}: does not match",
                b.key.display()
            )),
            "{e}"
        );

        let garbage = dir.join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = err(&[CertSpec {
            cert: garbage,
            key: a.key.clone(),
        }]);
        assert!(e.starts_with("tls.certs[0].cert "), "{e}");

        assert!(matches!(
            CertStore::load(&[]),
            Err(TlsError::NoCertificates)
        ));
    }

    #[test]
    fn reload_swaps_changed_certs_and_keeps_old_on_error() {
        let dir = tmpdir("reload");
        let a = make(&dir, "a", "a", &["a.example.net"]);
        let b = make(&dir, "b", "b", &["b.example.net"]);
        let store = CertStore::load(&[a.clone(), b.clone()]).unwrap();
        assert!(store.reload_if_changed().is_none());
        assert!(store.reload().is_empty());
        let old_a = leaf(&a);
        let held = store.lookup(Some("b.example.net"));

        // b's files replaced by a certificate for another name.
        let b2 = make(&dir, "b2", "b2", &["new.example.net"]);
        replace(&b2.cert, &b.cert);
        replace(&b2.key, &b.key);
        let report = store.reload_if_changed().unwrap();
        assert_eq!(report.reloaded, [1]);
        assert!(report.refused.is_empty());
        assert_eq!(served(&store, Some("new.example.net")), leaf(&b));
        assert_eq!(served(&store, Some("b.example.net")), old_a);
        // What a handshake already took is unchanged.
        assert_ne!(held.cert[0], leaf(&b));

        // a's key broken: refused, named, and the old a stays.
        let broken = dir.join("broken");
        std::fs::write(&broken, "not a key\n").unwrap();
        replace(&broken, &a.key);
        let report = store.reload_if_changed().unwrap();
        assert!(report.reloaded.is_empty());
        let [e] = &report.refused[..] else {
            panic!("{report:?}")
        };
        assert_eq!(
            e.to_string(),
            format!("tls.certs[0].key {}: no private key found", a.key.display())
        );
        assert_eq!(served(&store, None), old_a);
        // Polling does not retry (or warn again) until the files change.
        assert!(store.reload_if_changed().is_none());
        // A key that is not the certificate's.
        std::fs::copy(&b.key, &broken).unwrap();
        replace(&broken, &a.key);
        let e = store
            .reload_if_changed()
            .unwrap()
            .refused
            .remove(0)
            .to_string();
        assert!(e.contains("does not match"), "{e}");
        assert_eq!(served(&store, None), old_a);

        // Both files fixed together.
        let a2 = make(&dir, "a2", "a2", &["a2.example.net"]);
        replace(&a2.cert, &a.cert);
        replace(&a2.key, &a.key);
        let report = store.reload();
        assert_eq!(report.reloaded, [0]);
        assert_eq!(served(&store, None), leaf(&a));
        assert_eq!(served(&store, Some("a2.example.net")), leaf(&a));
    }

    /// Accepts any certificate (the tests check which one was served) but checks the
    /// handshake's signatures.
    #[derive(Debug)]
    struct AnyCert(Arc<CryptoProvider>);

    impl ServerCertVerifier for AnyCert {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    fn client(
        alpn: &[&[u8]],
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> rustls::ClientConfig {
        let provider = crate::tls::provider();
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        cfg
    }

    struct Done {
        cert: CertificateDer<'static>,
        alpn: Option<Vec<u8>>,
        version: Option<rustls::ProtocolVersion>,
        server_sni: Option<String>,
    }

    /// A handshake over an in-memory pipe, then a few bytes each way.
    async fn handshake(
        server: Arc<rustls::ServerConfig>,
        client: rustls::ClientConfig,
        sni: Option<&str>,
    ) -> Done {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let acceptor = TlsAcceptor::from(server);
        let server = tokio::spawn(async move {
            let mut tls = acceptor.accept(s).await.unwrap();
            let mut hello = [0u8; 5];
            tls.read_exact(&mut hello).await.unwrap();
            assert_eq!(&hello, b"hello");
            tls.write_all(b"world").await.unwrap();
            tls.flush().await.unwrap();
            let conn = tls.get_ref().1;
            (
                conn.alpn_protocol().map(<[u8]>::to_vec),
                conn.server_name().map(str::to_owned),
            )
        });
        // An IP address as the name: rustls sends no SNI then.
        let name = match sni {
            Some(n) => ServerName::try_from(n.to_owned()).unwrap(),
            None => ServerName::try_from("127.0.0.1").unwrap(),
        };
        let mut tls = TlsConnector::from(Arc::new(client))
            .connect(name, c)
            .await
            .unwrap();
        tls.write_all(b"hello").await.unwrap();
        tls.flush().await.unwrap();
        let mut world = [0u8; 5];
        tls.read_exact(&mut world).await.unwrap();
        assert_eq!(&world, b"world");
        let (server_alpn, server_sni) = server.await.unwrap();
        let conn = tls.get_ref().1;
        assert_eq!(conn.alpn_protocol().map(<[u8]>::to_vec), server_alpn);
        Done {
            cert: conn.peer_certificates().unwrap()[0].clone().into_owned(),
            alpn: server_alpn,
            version: conn.protocol_version(),
            server_sni,
        }
    }

    #[tokio::test]
    async fn real_handshakes_pick_the_cert_and_alpn() {
        let dir = tmpdir("handshake");
        let a = make(&dir, "a", "a", &["a.example.net"]);
        let b = make(&dir, "b", "b", &["*.b.example.net"]);
        let store = CertStore::load(&[a.clone(), b.clone()]).unwrap();
        let cfg = server_config(store.clone()).unwrap();
        let tls13: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
        let tls12: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];

        let done = handshake(
            cfg.clone(),
            client(&[b"h2", b"http/1.1"], tls13),
            Some("x.b.example.net"),
        )
        .await;
        assert_eq!(done.cert, leaf(&b));
        assert_eq!(done.alpn.as_deref(), Some(&b"h2"[..]));
        assert_eq!(done.version, Some(rustls::ProtocolVersion::TLSv1_3));
        assert_eq!(done.server_sni.as_deref(), Some("x.b.example.net"));

        let done = handshake(
            cfg.clone(),
            client(&[b"http/1.1"], tls12),
            Some("A.example.net"),
        )
        .await;
        assert_eq!(done.cert, leaf(&a));
        assert_eq!(done.alpn.as_deref(), Some(&b"http/1.1"[..]));
        assert_eq!(done.version, Some(rustls::ProtocolVersion::TLSv1_2));

        // No SNI and no ALPN: the default certificate, no protocol (HTTP/1.1 then).
        let done = handshake(cfg.clone(), client(&[], tls13), None).await;
        assert_eq!(done.cert, leaf(&a));
        assert_eq!(done.alpn, None);
        assert_eq!(done.server_sni, None);

        // After a reload new handshakes get the new certificate.
        let b2 = make(&dir, "b2", "b2", &["*.b.example.net"]);
        replace(&b2.cert, &b.cert);
        replace(&b2.key, &b.key);
        assert_eq!(store.reload().reloaded, [1]);
        let done = handshake(cfg, client(&[b"h2"], tls13), Some("y.b.example.net")).await;
        assert_eq!(done.cert, leaf(&b));
    }

    /// The server's error for a handshake the client side drives with `client`.
    async fn server_failure<F, Fut>(server: Arc<rustls::ServerConfig>, client: F) -> io::Error
    where
        F: FnOnce(tokio::io::DuplexStream) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let client = tokio::spawn(client(c));
        let e = TlsAcceptor::from(server).accept(s).await.err().unwrap();
        client.await.unwrap();
        e
    }

    #[tokio::test]
    async fn failed_handshakes_are_classified() {
        let dir = tmpdir("failures");
        let a = make(&dir, "a", "a", &["a.example.net"]);
        let cfg = server_config(CertStore::load(&[a]).unwrap()).unwrap();
        let name = || ServerName::try_from("a.example.net").unwrap();

        let e = server_failure(cfg.clone(), |c| async move {
            let cfg = client(&[b"acme-tls/1"], &[&rustls::version::TLS13]);
            assert!(TlsConnector::from(Arc::new(cfg))
                .connect(name(), c)
                .await
                .is_err());
        })
        .await;
        assert_eq!(handshake_failure_reason(&e), "no_alpn", "{e}");

        // A client that trusts only the webpki roots refuses the self-signed certificate.
        let e = server_failure(cfg.clone(), |c| async move {
            let cfg = crate::tls::client_config(None).unwrap();
            assert!(TlsConnector::from(Arc::new(cfg))
                .connect(name(), c)
                .await
                .is_err());
        })
        .await;
        assert_eq!(handshake_failure_reason(&e), "bad_certificate", "{e}");

        let e = server_failure(cfg.clone(), |mut c| async move {
            c.write_all(b"GET / HTTP/1.1\r\nHost: a.example.net\r\n\r\n")
                .await
                .unwrap();
            let mut rest = Vec::new();
            let _ = c.read_to_end(&mut rest).await;
        })
        .await;
        assert_eq!(handshake_failure_reason(&e), "not_tls", "{e}");

        let e = server_failure(cfg, |c| async move { drop(c) }).await;
        assert_eq!(handshake_failure_reason(&e), "eof", "{e}");
    }

    #[test]
    fn reasons_of_rustls_errors() {
        use rustls::{AlertDescription as A, Error as E, PeerIncompatible as P};
        let io = |e: E| io::Error::new(io::ErrorKind::InvalidData, e);
        let cases = [
            (
                io(E::PeerIncompatible(P::Tls12NotOffered)),
                "protocol_version",
            ),
            (
                io(E::PeerIncompatible(P::SupportedVersionsExtensionRequired)),
                "protocol_version",
            ),
            (
                io(E::PeerIncompatible(P::NoCipherSuitesInCommon)),
                "no_shared_cipher",
            ),
            (
                io(E::PeerIncompatible(P::NoKxGroupsInCommon)),
                "no_shared_cipher",
            ),
            (
                io(E::PeerIncompatible(P::NullCompressionRequired)),
                "incompatible",
            ),
            (io(E::AlertReceived(A::UnknownCA)), "bad_certificate"),
            (io(E::AlertReceived(A::CloseNotify)), "alert"),
            (io(E::General("x".into())), "other"),
            (io::Error::from(io::ErrorKind::UnexpectedEof), "eof"),
            (io::Error::from(io::ErrorKind::ConnectionReset), "reset"),
            (io::Error::from(io::ErrorKind::TimedOut), "timeout"),
            (io::Error::other("x"), "other"),
        ];
        for (e, want) in cases {
            let got = handshake_failure_reason(&e);
            assert_eq!(got, want, "{e}");
            assert!(HANDSHAKE_FAILURE_REASONS.contains(&got));
        }
    }
}
