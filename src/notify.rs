//! systemd's readiness protocol (`sd_notify(3)`), without libsystemd.
//!
//! Under a `Type=notify` unit, systemd sets `$NOTIFY_SOCKET` to a Unix datagram socket: a
//! path, or an abstract name written with a leading `@`. A notification is one datagram of
//! newline-separated `VARIABLE=value` assignments (`READY=1`, `STOPPING=1`, `STATUS=...`).
//! Without `$NOTIFY_SOCKET` (not under systemd) nothing is sent. A notification that cannot
//! be sent is logged, never fatal: the router works the same without systemd.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::net::UnixDatagram;

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Why a notification was not sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `$NOTIFY_SOCKET` is neither an absolute path nor an abstract name (`@name`).
    #[error("NOTIFY_SOCKET={0:?}: not an absolute path or an abstract socket name (@name)")]
    Address(OsString),
    /// The socket could not be created or the datagram not sent.
    #[error("cannot notify systemd at NOTIFY_SOCKET={addr:?}: {source}")]
    Send {
        /// `$NOTIFY_SOCKET`.
        addr: OsString,
        /// The cause.
        source: io::Error,
    },
}

/// Whether `$NOTIFY_SOCKET` is set (the router runs under a `Type=notify` unit).
pub fn enabled() -> bool {
    std::env::var_os(NOTIFY_SOCKET).is_some_and(|s| !s.is_empty())
}

/// Sends `state` to `$NOTIFY_SOCKET` if it is set; failures are logged, never fatal.
/// `state` is one or more `VARIABLE=value` lines, e.g. `"READY=1\nSTATUS=routing 3 services"`.
pub fn notify(state: &str) {
    let Some(addr) = std::env::var_os(NOTIFY_SOCKET).filter(|s| !s.is_empty()) else {
        return;
    };
    match send_to(&addr, state) {
        Ok(()) => tracing::debug!(state, "notified systemd"),
        Err(e) => tracing::warn!("{e}"),
    }
}

/// Startup is finished: the first routing table is live. `status` is shown by
/// `systemctl status`.
pub fn ready(status: &str) {
    notify(&format!("READY=1\nSTATUS={}", one_line(status)));
}

/// The router is stopping: it drains in-flight requests, then exits.
pub fn stopping(status: &str) {
    notify(&format!("STOPPING=1\nSTATUS={}", one_line(status)));
}

/// The router re-reads its configuration (SIGHUP); `READY=1` follows when it is done.
/// systemd wants the `CLOCK_MONOTONIC` time beside it, to tell this reload from an earlier one.
pub fn reloading(status: &str) {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000;
    notify(&format!(
        "RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS={}",
        one_line(status)
    ));
}

/// A free-form status line for `systemctl status`.
pub fn status(status: &str) {
    notify(&format!("STATUS={}", one_line(status)));
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// Sends one datagram holding `state` to the socket at `addr`, written as systemd writes
/// `$NOTIFY_SOCKET`: an absolute path, or `@name` for Linux's abstract namespace.
pub fn send_to(addr: &OsStr, state: &str) -> Result<(), NotifyError> {
    let err = |source| NotifyError::Send {
        addr: addr.to_owned(),
        source,
    };
    let sock = UnixDatagram::unbound().map_err(err)?;
    // Never wait: systemd reads its socket promptly, and a notification is not worth
    // stalling the runtime for.
    sock.set_nonblocking(true).map_err(err)?;
    let bytes = addr.as_encoded_bytes();
    let sent = match bytes.first() {
        Some(b'/') => sock.send_to(state.as_bytes(), addr),
        Some(b'@') => abstract_send(&sock, &bytes[1..], state.as_bytes()),
        _ => return Err(NotifyError::Address(addr.to_owned())),
    };
    match sent {
        Ok(n) if n == state.len() => Ok(()),
        Ok(n) => Err(err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("sent {n} of {} bytes", state.len()),
        ))),
        Err(e) => Err(err(e)),
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_send(sock: &UnixDatagram, name: &[u8], msg: &[u8]) -> io::Result<usize> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt as _;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt as _;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    sock.send_to_addr(msg, &addr)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_send(_: &UnixDatagram, _: &[u8], _: &[u8]) -> io::Result<usize> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract socket names exist on Linux only",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn recv(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("a datagram");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn sends_to_a_socket_path() {
        let dir = std::env::temp_dir().join(format!("cr-notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        send_to(path.as_os_str(), "READY=1\nSTATUS=routing 2 services").unwrap();
        assert_eq!(recv(&sock), "READY=1\nSTATUS=routing 2 services");
        send_to(path.as_os_str(), "STOPPING=1").unwrap();
        assert_eq!(recv(&sock), "STOPPING=1");
        drop(sock);
        // Nobody listens any more: an error, not a panic.
        let e = send_to(path.as_os_str(), "READY=1").unwrap_err();
        assert!(matches!(e, NotifyError::Send { .. }), "{e}");
        assert!(e.to_string().contains("notify.sock"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sends_to_an_abstract_name() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("consul-router-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        send_to(OsStr::new(&format!("@{name}")), "READY=1").unwrap();
        assert_eq!(recv(&sock), "READY=1");
        // A path of the same name is another socket.
        assert!(send_to(OsStr::new(&format!("/{name}")), "READY=1").is_err());
    }

    #[test]
    fn refuses_relative_and_empty_addresses() {
        for a in ["", "notify.sock", "vsock:2:1234"] {
            let e = send_to(OsStr::new(a), "READY=1").unwrap_err();
            assert!(matches!(e, NotifyError::Address(_)), "{a}: {e}");
        }
    }

    #[test]
    fn values_stay_on_one_line() {
        assert_eq!(one_line("a\nb\r\nc"), "a b  c");
    }
}
