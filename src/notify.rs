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

/// A reload begins (for the SIGHUP reload): `RELOADING=1` with the `MONOTONIC_USEC` that
/// systemd 253 and later need for `Type=notify-reload`. Send [`ready`] when it is done.
pub fn reloading(status: &str) {
    notify(&reloading_state(status, monotonic_usec()));
}

/// A free-form status line for `systemctl status`.
pub fn status(status: &str) {
    notify(&format!("STATUS={}", one_line(status)));
}

fn reloading_state(status: &str, usec: Option<u64>) -> String {
    let mut s = String::from("RELOADING=1\n");
    if let Some(usec) = usec {
        s.push_str(&format!("MONOTONIC_USEC={usec}\n"));
    }
    s.push_str("STATUS=");
    s.push_str(&one_line(status));
    s
}

/// A value on one line: a newline would start another assignment.
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

/// `CLOCK_MONOTONIC` now, in microseconds, as `MONOTONIC_USEC` wants it.
///
/// std reads that clock for `Instant` on Linux but does not expose its value, and this crate
/// takes no `unsafe` (nor a crate for one call), so the value is read from `Instant`'s
/// `Debug` form, `Instant { tv_sec: S, tv_nsec: N }`. `None` if that form ever changes:
/// the notification then goes without it.
pub fn monotonic_usec() -> Option<u64> {
    if !cfg!(any(target_os = "linux", target_os = "android")) {
        return None;
    }
    parse_instant_debug(&format!("{:?}", std::time::Instant::now()))
}

fn parse_instant_debug(s: &str) -> Option<u64> {
    let field = |name: &str| -> Option<u64> {
        let rest = &s[s.find(name)? + name.len()..];
        let rest = rest.trim_start_matches(|c: char| !c.is_ascii_digit());
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        rest[..end].parse().ok()
    };
    let sec = field("tv_sec:")?;
    let nsec = field("tv_nsec:")?;
    if nsec >= 1_000_000_000 {
        return None;
    }
    sec.checked_mul(1_000_000)?.checked_add(nsec / 1_000)
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
        assert_eq!(
            reloading_state("reloading\nconfig", Some(42)),
            "RELOADING=1\nMONOTONIC_USEC=42\nSTATUS=reloading config"
        );
        assert_eq!(
            reloading_state("reloading", None),
            "RELOADING=1\nSTATUS=reloading"
        );
    }

    #[test]
    fn instant_debug_parses() {
        assert_eq!(
            parse_instant_debug("Instant { tv_sec: 12, tv_nsec: 345678901 }"),
            Some(12_345_678)
        );
        assert_eq!(parse_instant_debug("Instant(12s)"), None);
        assert_eq!(
            parse_instant_debug("Instant { tv_sec: 1, tv_nsec: 1000000000 }"),
            None
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn monotonic_usec_is_the_monotonic_clock() {
        let a = monotonic_usec().expect("Instant's Debug form has tv_sec and tv_nsec");
        std::thread::sleep(Duration::from_millis(20));
        let b = monotonic_usec().unwrap();
        assert!(b >= a + 20_000, "{a} then {b}");
        assert!(b < a + 5_000_000, "{a} then {b}");
        // CLOCK_MONOTONIC counts from boot, without suspended time: at most the uptime
        // (CLOCK_BOOTTIME), which /proc/uptime gives in seconds with two decimals.
        let uptime = std::fs::read_to_string("/proc/uptime").unwrap();
        let uptime: f64 = uptime.split_whitespace().next().unwrap().parse().unwrap();
        let uptime_usec = (uptime * 1e6) as u64;
        assert!(b <= uptime_usec + 1_000_000, "{b} > uptime {uptime_usec}");
    }
}
