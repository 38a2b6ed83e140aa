//! Loopback ports and the kernel's view of TCP connections.

use std::net::{SocketAddr, TcpListener};

/// A loopback port free now (bound, then released: a process beside may take it first).
/// Nothing listens on it, so connecting to it is refused.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// `127.0.0.1:<free_port()>`.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// TCP states as /proc/net/tcp numbers them.
pub const ESTABLISHED: u8 = 0x01;
pub const CLOSE_WAIT: u8 = 0x08;

/// One IPv4 TCP socket of this machine (Linux: a line of /proc/net/tcp).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpConn {
    pub local_port: u16,
    pub remote_port: u16,
    pub state: u8,
}

/// Every IPv4 TCP socket of the machine (listeners included, with remote port 0).
pub fn tcp_conns() -> Vec<TcpConn> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let port = |col: Option<&&str>| {
        col.and_then(|a| a.rsplit_once(':'))
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
    };
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            Some(TcpConn {
                local_port: port(cols.get(1))?,
                remote_port: port(cols.get(2))?,
                state: u8::from_str_radix(cols.get(3)?, 16).ok()?,
            })
        })
        .collect()
}

/// Established TCP connections whose local port is `port` (accepted by a listener there).
pub fn established_on(port: u16) -> usize {
    tcp_conns()
        .iter()
        .filter(|c| c.local_port == port && c.state == ESTABLISHED)
        .count()
}

/// Established TCP connections to remote port `port` (opened towards a listener there).
pub fn established_to(port: u16) -> usize {
    tcp_conns()
        .iter()
        .filter(|c| c.remote_port == port && c.state == ESTABLISHED)
        .count()
}
