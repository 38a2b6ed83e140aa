//! Connections to a backend: opening one, the fast path's pooled HTTP/1 connection (just
//! the socket: read buffers belong to the client connection using it, so idle backend
//! connections cost no memory of ours), and hyper's sender for the HTTP/2 path.

use std::net::SocketAddr;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use hyper::client::conn::http1::SendRequest;
use tokio::net::TcpStream;

use super::dns::DnsCache;
use super::pool::Pooled;
use super::RequestBody;

/// A sender to a backend connection, ready for a request (the HTTP/2 path's pool).
pub type Sender = SendRequest<RequestBody>;

impl Pooled for Sender {
    fn is_open(&self) -> bool {
        !self.is_closed()
    }
}

/// Why a connection to an instance was not made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Refused, unreachable, or the name did not resolve.
    #[error("cannot connect to backend: {0}")]
    Failed(std::io::Error),
    /// Not made within the connect timeout.
    #[error("backend connect timeout")]
    Timeout,
    /// The TLS handshake failed, or did not settle on HTTP/2.
    #[error("backend TLS: {0}")]
    Tls(String),
    /// The HTTP/2 handshake failed.
    #[error("backend HTTP/2 handshake: {0}")]
    Handshake(hyper::Error),
}

/// Opens a TCP connection within `timeout`, with Nagle off: to `socket` when the address is
/// an IP (the usual case), else to `host:port` resolved through the instance's `dns` cache
/// (each address in turn).
pub async fn connect_tcp(
    socket: Option<SocketAddr>,
    host: &str,
    port: u16,
    dns: &DnsCache,
    timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    let connecting = async {
        match socket {
            Some(addr) => TcpStream::connect(addr).await,
            None => {
                let resolved = dns.addrs(host, port).await?;
                TcpStream::connect(&resolved.addrs[..]).await
            }
        }
    };
    let stream = match tokio::time::timeout(timeout, connecting).await {
        Err(_) => return Err(ConnectError::Timeout),
        Ok(Err(e)) => return Err(ConnectError::Failed(e)),
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// A keep-alive connection to a backend, owned by one exchange at a time.
#[derive(Debug)]
pub struct BackendConn {
    /// The socket.
    pub stream: TcpStream,
}

impl Pooled for BackendConn {
    /// Whether the backend has not closed the connection while it sat idle. The runtime
    /// records readiness from epoll without a syscall of ours; only when it says readable
    /// (a FIN, a reset or stray bytes, or a stale mark from the last read) does one `recv`
    /// tell which.
    fn is_open(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => matches!(
                self.stream.try_read(&mut [0u8; 1]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
            ),
        }
    }
}
