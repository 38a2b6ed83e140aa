//! A pooled HTTP/1 connection to a backend: just the socket. Read buffers belong to the
//! client connection using it, so idle backend connections cost no memory of ours.

use std::task::{Context, Poll, Waker};

use tokio::net::TcpStream;

use crate::proxy::pool::Pooled;

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
