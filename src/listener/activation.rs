//! systemd socket activation (`sd_listen_fds(3)`): listening sockets passed from fd 3 on,
//! with `LISTEN_PID` (must be this process), `LISTEN_FDS` (how many) and `LISTEN_FDNAMES`
//! (their `FileDescriptorName=`s, `:`-separated). With the `.socket` unit, systemd holds
//! the listening sockets across a restart, so connections wait in the backlog instead of
//! being refused.
//!
//! An inherited socket serves a listener when its name is the listener's role (`http`,
//! `https`, `admin`), else when its address is the configured one (an unspecified address
//! matches the other family's: systemd's `ListenStream=80` is `[::]:80`).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;

/// The role names matched against `FileDescriptorName=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The plain proxy listener (`listen`).
    Http,
    /// The TLS listener (`tls.listen`).
    Https,
    /// The admin listener (`admin_listen`).
    Admin,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Http => "http",
            Role::Https => "https",
            Role::Admin => "admin",
        }
    }
}

/// Why the inherited sockets could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// An inherited fd is not a TCP socket.
    #[error("socket activation: fd {fd} ({name:?}) is not a TCP listening socket: {source}")]
    NotTcp {
        /// The descriptor.
        fd: usize,
        /// Its `FileDescriptorName=`, or "".
        name: String,
        /// The cause.
        source: std::io::Error,
    },
    /// An inherited fd is a connected socket (`Accept=yes` in the `.socket` unit passes one
    /// per connection): `accept` on it would fail for ever.
    #[error(
        "socket activation: fd {fd} ({name:?}) is a connected socket (peer {peer}), not a \
         listening one: set Accept=no (the default) in the .socket unit"
    )]
    Connected {
        /// The descriptor.
        fd: usize,
        /// Its `FileDescriptorName=`, or "".
        name: String,
        /// The connection's peer.
        peer: SocketAddr,
    },
}

/// One inherited listening socket.
#[derive(Debug)]
struct Socket {
    name: String,
    addr: SocketAddr,
    listener: TcpListener,
}

impl Socket {
    /// `listener` (fd `fd`, named `name`) checked: a TCP socket with no peer.
    fn inherited(fd: usize, name: String, listener: TcpListener) -> Result<Self, ActivationError> {
        // listenfd checks the family and type only. A listening socket has no peer
        // (ENOTCONN); a connected one does.
        let stream = TcpStream::from(OwnedFd::from(listener));
        if let Ok(peer) = stream.peer_addr() {
            return Err(ActivationError::Connected { fd, name, peer });
        }
        let listener = TcpListener::from(OwnedFd::from(stream));
        let addr = listener
            .local_addr()
            .map_err(|source| ActivationError::NotTcp {
                fd,
                name: name.clone(),
                source,
            })?;
        tracing::info!(fd, name, %addr, "inherited a listening socket");
        Ok(Socket {
            name,
            addr,
            listener,
        })
    }
}

/// The listening sockets systemd passed, not yet taken by a listener.
#[derive(Debug, Default)]
pub struct Inherited {
    sockets: Vec<Socket>,
}

impl Inherited {
    /// No inherited sockets: every listener binds its own.
    pub fn none() -> Self {
        Inherited::default()
    }

    /// Takes the sockets passed to this process and removes `LISTEN_PID`, `LISTEN_FDS` and
    /// `LISTEN_FDNAMES` from the environment, so children do not see them. Sockets meant
    /// for another process (`LISTEN_PID` set to another pid) are left alone. Call it before
    /// any other thread starts (the environment is changed).
    pub fn from_env() -> Result<Self, ActivationError> {
        let pid = std::env::var("LISTEN_PID").ok();
        let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
        std::env::remove_var("LISTEN_FDNAMES");
        let ours = pid
            .as_deref()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .is_some_and(|p| p == std::process::id());
        if !ours {
            std::env::remove_var("LISTEN_PID");
            std::env::remove_var("LISTEN_FDS");
            return Ok(Inherited::none());
        }
        // Removes LISTEN_PID and LISTEN_FDS.
        let mut fds = listenfd::ListenFd::from_env();
        let mut names = names.split(':');
        let mut sockets = Vec::with_capacity(fds.len());
        for i in 0..fds.len() {
            let name = names.next().unwrap_or("").to_owned();
            let err = |source| ActivationError::NotTcp {
                fd: 3 + i,
                name: name.clone(),
                source,
            };
            let listener = fds
                .take_tcp_listener(i)
                .map_err(err)?
                .ok_or_else(|| err(std::io::ErrorKind::NotFound.into()))?;
            sockets.push(Socket::inherited(3 + i, name, listener)?);
        }
        Ok(Inherited { sockets })
    }

    /// How many inherited sockets no listener has taken yet.
    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    /// Whether every inherited socket was taken (or none was passed).
    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// Whether an inherited socket serves `role` configured at `addr`.
    pub(crate) fn holds(&self, role: Role, addr: SocketAddr) -> bool {
        self.find(role, addr).is_some()
    }

    fn find(&self, role: Role, addr: SocketAddr) -> Option<usize> {
        let by_name = self.sockets.iter().position(|s| s.name == role.name());
        by_name.or_else(|| self.sockets.iter().position(|s| same_place(s.addr, addr)))
    }

    /// The inherited socket for `role` configured at `addr`: by name, else by address.
    pub(crate) fn take(&mut self, role: Role, addr: SocketAddr) -> Option<TcpListener> {
        let at = self.find(role, addr)?;
        let s = self.sockets.swap_remove(at);
        if s.addr != addr {
            tracing::info!(role = role.name(), configured = %addr, inherited = %s.addr,
                "the inherited socket's address is used");
        }
        Some(s.listener)
    }

    /// Logs the sockets no listener took; they stay open (a reload may take them).
    pub(crate) fn report_unused(&self) {
        for s in &self.sockets {
            tracing::warn!(name = s.name, addr = %s.addr,
                "an inherited socket matches no configured listener");
        }
    }
}

/// Whether an inherited socket bound at `have` serves a listener configured at `want`.
fn same_place(have: SocketAddr, want: SocketAddr) -> bool {
    have == want
        || (want.port() != 0
            && have.port() == want.port()
            && have.ip().is_unspecified()
            && want.ip().is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket(name: &str) -> Socket {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        Socket {
            name: name.into(),
            addr: listener.local_addr().unwrap(),
            listener,
        }
    }

    #[test]
    fn takes_by_name_then_by_address() {
        let a = socket("consul-router.socket");
        let b = socket("admin");
        let (a_addr, b_addr) = (a.addr, b.addr);
        let mut inh = Inherited {
            sockets: vec![a, b],
        };
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        // By name, whatever the configured address.
        let admin = inh.take(Role::Admin, any).unwrap();
        assert_eq!(admin.local_addr().unwrap(), b_addr);
        assert!(inh.take(Role::Https, any).is_none());
        // By address.
        let http = inh.take(Role::Http, a_addr).unwrap();
        assert_eq!(http.local_addr().unwrap(), a_addr);
        assert!(inh.is_empty());
    }

    #[test]
    fn a_connected_socket_is_refused_and_a_listening_one_taken() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        let client = TcpStream::connect(addr).unwrap();
        let connected = TcpListener::from(OwnedFd::from(client));
        let err = Socket::inherited(3, "http".into(), connected).unwrap_err();
        assert!(
            matches!(err, ActivationError::Connected { fd: 3, peer, .. } if peer == addr),
            "{err}"
        );
        assert!(err.to_string().contains("Accept=no"), "{err}");
        let taken = Socket::inherited(4, "http".into(), server).unwrap();
        assert_eq!(taken.addr, addr);
    }

    #[test]
    fn unspecified_addresses_match_across_families() {
        let v4: SocketAddr = "0.0.0.0:80".parse().unwrap();
        let v6: SocketAddr = "[::]:80".parse().unwrap();
        assert!(same_place(v6, v4));
        assert!(!same_place("[::]:81".parse().unwrap(), v4));
        assert!(!same_place("127.0.0.1:80".parse().unwrap(), v4));
        assert!(!same_place(
            "[::]:0".parse().unwrap(),
            "0.0.0.0:0".parse().unwrap()
        ));
    }
}
