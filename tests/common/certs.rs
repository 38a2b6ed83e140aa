//! Test certificates made with the `openssl` command (ECDSA P-256, PKCS#8 keys, valid for
//! 2 days): self-signed ones, and a test CA with leaves it signs, so a client that trusts
//! the CA (`consul_router::tls::client_config(Some(ca))`, or a rustls root store) verifies
//! the router. Independent of the other common helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs openssl, panicking with its stderr if it fails.
fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

fn san(sans: &[&str]) -> String {
    // `IP:127.0.0.1` is taken as written; anything else is a DNS name.
    let names: Vec<String> = sans
        .iter()
        .map(|s| match s.strip_prefix("IP:") {
            Some(_) => s.to_string(),
            None => format!("DNS:{s}"),
        })
        .collect();
    format!("subjectAltName={}", names.join(","))
}

/// A fresh, empty directory for one test's certificates under the system temp dir.
pub fn cert_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cr-certs-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the cert dir");
    dir
}

/// A self-signed end-entity certificate for `sans` (DNS names; the first is also the CN)
/// written to `dir/<name>.pem` and `dir/<name>.key`; returns (cert, key). A client can
/// trust the certificate itself as its root (it is not a CA).
pub fn make_cert(dir: &Path, name: &str, sans: &[&str]) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    let subj = format!("/CN={}", sans.first().copied().unwrap_or(name));
    let san = san(sans);
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
        "-addext",
        "basicConstraints=critical,CA:FALSE",
    ];
    if !sans.is_empty() {
        args.extend(["-addext", &san]);
    }
    args.extend(["-keyout", path_str(&key), "-out", path_str(&cert)]);
    openssl(&args);
    (cert, key)
}

/// A test CA: `dir/<name>.pem` and `dir/<name>.key`.
#[derive(Debug, Clone)]
pub struct Ca {
    /// The CA certificate (what a client trusts).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// A self-signed CA named `name`.
pub fn make_ca(dir: &Path, name: &str) -> Ca {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    let subj = format!("/CN={name} test CA");
    openssl(&[
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
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout",
        path_str(&key),
        "-out",
        path_str(&cert),
    ]);
    Ca { cert, key }
}

/// A server certificate for `sans` signed by `ca`, written to `dir/<name>.pem` and
/// `dir/<name>.key`; returns (cert, key). The cert file holds the leaf only (the CA is
/// the client's root).
pub fn make_cert_signed(dir: &Path, name: &str, sans: &[&str], ca: &Ca) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    let csr = dir.join(format!("{name}.csr"));
    let ext = dir.join(format!("{name}.ext"));
    let subj = format!("/CN={}", sans.first().copied().unwrap_or(name));
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        &subj,
        "-keyout",
        path_str(&key),
        "-out",
        path_str(&csr),
    ]);
    let mut extensions = String::from(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    );
    if !sans.is_empty() {
        extensions.push_str(&san(sans));
        extensions.push('\n');
    }
    std::fs::write(&ext, extensions).expect("write the extensions file");
    // A random serial, so leaves reissued in one test differ.
    let serial = format!("0x{:016x}{:016x}", rand_u64(), rand_u64());
    openssl(&[
        "x509",
        "-req",
        "-in",
        path_str(&csr),
        "-CA",
        path_str(&ca.cert),
        "-CAkey",
        path_str(&ca.key),
        "-set_serial",
        &serial,
        "-days",
        "2",
        "-extfile",
        path_str(&ext),
        "-out",
        path_str(&cert),
    ]);
    (cert, key)
}

/// Good enough for serial numbers: std's randomly seeded hasher.
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish()
}
