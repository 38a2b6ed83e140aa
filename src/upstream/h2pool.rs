//! HTTP/2 to backends (`router.proto=h2c`, or `h2` over TLS): each instance keeps a small
//! pool of multiplexed connections. A request leases a stream slot on the first connection
//! under its limit (the server's `SETTINGS_MAX_CONCURRENT_STREAMS`, capped by
//! `proxy.h2_backend_max_streams`); when every connection is full and fewer than
//! `proxy.h2_backend_max_connections` are open (or opening), it opens another. At that
//! maximum, the least busy connection takes the stream anyway and h2 queues it until a slot
//! frees. Keepalive PINGs find dead connections; closed ones are dropped when seen.
//!
//! The request path takes no lock: the connection list is an `ArcSwapOption` (read with
//! `load`), stream counts are atomics, and only opening or dropping a connection replaces
//! the list (`rcu`). An instance without HTTP/2 traffic holds a null pointer and a counter.

use std::fmt;
use std::future::Future as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{connect_tcp, BoxError, ConnectError};

/// The request body type of HTTP/2 backend exchanges (either client path's, boxed once).
pub type H2Body = UnsyncBoxBody<Bytes, BoxError>;

/// A handle to send requests on one HTTP/2 backend connection.
pub type H2Sender = http2::SendRequest<H2Body>;

/// The protocol an instance is spoken to in, from its `router.proto=` tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Proto {
    /// HTTP/1.1 over TCP (no tag).
    #[default]
    Http1,
    /// HTTP/2 over cleartext TCP (prior knowledge).
    H2c,
    /// HTTP/2 over TLS (ALPN `h2`), the certificate verified.
    H2,
}

impl Proto {
    /// The tag value's protocol; `None` for a value the router does not know.
    pub fn from_tag(value: &str) -> Option<Proto> {
        match value {
            "http1" | "http/1.1" => Some(Proto::Http1),
            "h2c" => Some(Proto::H2c),
            "h2" => Some(Proto::H2),
            _ => None,
        }
    }

    /// Whether requests go through the HTTP/2 pool.
    pub fn is_h2(self) -> bool {
        self != Proto::Http1
    }

    /// The name used in tags and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Http1 => "http1",
            Proto::H2c => "h2c",
            Proto::H2 => "h2",
        }
    }
}

/// Process-wide series of the HTTP/2 backend pools.
#[derive(Clone)]
pub struct H2Metrics {
    /// `consul_router_h2_backend_connections_opened_total`.
    opened: metrics::Counter,
    /// `consul_router_h2_backend_connections`: open now.
    open: metrics::Gauge,
    /// `consul_router_h2_backend_streams_queued_total`: streams put on a connection already
    /// at its limit because the instance had its most connections.
    queued: metrics::Counter,
}

impl fmt::Debug for H2Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("H2Metrics")
    }
}

impl H2Metrics {
    /// The handles, registered in the process's recorder.
    pub fn new() -> Self {
        H2Metrics {
            opened: metrics::counter!("consul_router_h2_backend_connections_opened_total"),
            open: metrics::gauge!("consul_router_h2_backend_connections"),
            queued: metrics::counter!("consul_router_h2_backend_streams_queued_total"),
        }
    }
}

impl Default for H2Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// How HTTP/2 backend connections are made and shared (`[proxy]` and `[upstream_tls]`).
#[derive(Debug, Clone)]
pub struct H2Settings {
    /// Most streams per connection (the server's own limit applies when lower).
    pub max_streams: usize,
    /// Most connections per instance.
    pub max_connections: usize,
    /// PING period on every connection, and how long its answer may take.
    pub ping_interval: Duration,
    /// TLS for `router.proto=h2` (ALPN `h2` set here).
    pub tls: Arc<rustls::ClientConfig>,
    /// The pools' series.
    pub metrics: H2Metrics,
}

impl H2Settings {
    /// Settings with `tls` (its ALPN replaced by `h2`).
    pub fn new(
        max_streams: usize,
        max_connections: usize,
        ping_interval: Duration,
        mut tls: rustls::ClientConfig,
    ) -> Self {
        tls.alpn_protocols = vec![b"h2".to_vec()];
        H2Settings {
            max_streams,
            max_connections,
            ping_interval,
            tls: Arc::new(tls),
            metrics: H2Metrics::new(),
        }
    }
}

/// One multiplexed connection to an instance.
pub struct H2Conn {
    sender: H2Sender,
    /// Streams leased now.
    active: AtomicUsize,
    /// The most streams: the server's limit, capped by ours; kept current by the task
    /// that drives the connection.
    limit: Arc<AtomicUsize>,
    /// A stream was leased since the reaper last looked.
    used: AtomicBool,
}

impl fmt::Debug for H2Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H2Conn")
            .field("active", &self.active.load(Ordering::Relaxed))
            .field("limit", &self.limit.load(Ordering::Relaxed))
            .finish()
    }
}

impl H2Conn {
    /// Takes a stream slot if the connection is under its limit.
    fn try_acquire(&self) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        let mut n = self.active.load(Ordering::Relaxed);
        loop {
            if n >= limit {
                return false;
            }
            match self
                .active
                .compare_exchange_weak(n, n + 1, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(now) => n = now,
            }
        }
        self.mark_used();
        true
    }

    fn mark_used(&self) {
        // A load first: a busy connection does not write the line on every stream.
        if !self.used.load(Ordering::Relaxed) {
            self.used.store(true, Ordering::Relaxed);
        }
    }

    fn is_open(&self) -> bool {
        !self.sender.is_closed()
    }
}

/// A stream slot on a connection, held until the response body is done with.
#[derive(Debug)]
pub struct H2Lease(Arc<H2Conn>);

impl H2Lease {
    /// A sender for this connection's next stream.
    pub fn sender(&self) -> H2Sender {
        self.0.sender.clone()
    }
}

impl Drop for H2Lease {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

type ConnList = Vec<Arc<H2Conn>>;

/// An instance's HTTP/2 connections. Empty: a null pointer and a counter.
#[derive(Default)]
pub struct H2Pool {
    conns: ArcSwapOption<ConnList>,
    /// Connections being opened now, so concurrent requests stay within the maximum.
    opening: AtomicUsize,
}

impl fmt::Debug for H2Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (conns, streams) = self.usage();
        f.debug_struct("H2Pool")
            .field("connections", &conns)
            .field("streams", &streams)
            .finish()
    }
}

/// Gives the opening slot back, opened or not.
struct Opening<'a>(&'a AtomicUsize);

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where to connect and how.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The socket address when the instance's address is an IP.
    pub socket: Option<SocketAddr>,
    /// The address as registered: resolved when not an IP, and the TLS server name.
    pub host: &'a str,
    /// The port.
    pub port: u16,
    /// TLS (`h2`) or cleartext (`h2c`).
    pub tls: bool,
    /// The instance's resolved addresses, when `host` is a name.
    pub dns: &'a super::DnsCache,
}

impl H2Pool {
    /// Connections open and streams leased now.
    pub fn usage(&self) -> (usize, usize) {
        let guard = self.conns.load();
        guard.as_deref().map_or((0, 0), |list| {
            let streams = list.iter().map(|c| c.active.load(Ordering::Relaxed)).sum();
            (list.len(), streams)
        })
    }

    /// A stream slot on an open connection under its limit, if any. Closed connections
    /// seen on the way are dropped from the pool.
    pub fn lease(&self) -> Option<H2Lease> {
        let guard = self.conns.load();
        let list = guard.as_deref()?;
        let mut closed = false;
        let mut found = None;
        for c in list {
            if !c.is_open() {
                closed = true;
            } else if c.try_acquire() {
                found = Some(H2Lease(c.clone()));
                break;
            }
        }
        drop(guard);
        if closed {
            self.prune(|c| c.is_open());
        }
        found
    }

    /// A stream on the least busy open connection, past its limit: for when the instance
    /// has its most connections. h2 holds the stream until the server allows it.
    fn lease_over(&self, metrics: &H2Metrics) -> Option<H2Lease> {
        let guard = self.conns.load();
        let c = guard
            .as_deref()?
            .iter()
            .filter(|c| c.is_open())
            .min_by_key(|c| c.active.load(Ordering::Relaxed))?;
        c.active.fetch_add(1, Ordering::Relaxed);
        c.mark_used();
        metrics.queued.increment(1);
        Some(H2Lease(c.clone()))
    }

    /// A slot to open one more connection, if the instance has fewer than `max` open or
    /// opening.
    fn may_open(&self, max: usize) -> Option<Opening<'_>> {
        let open = self.conns.load().as_deref().map_or(0, Vec::len);
        let before = self.opening.fetch_add(1, Ordering::Relaxed);
        let slot = Opening(&self.opening);
        (open + before < max).then_some(slot)
    }

    /// A stream for a request when [`H2Pool::lease`] found none: a new connection if the
    /// instance may have one more, else a stream over the limit of an open one (the
    /// second item says it was an existing connection). Opening takes at most
    /// `connect_timeout` for TCP, TLS and the HTTP/2 preface together.
    pub async fn open_or_share(
        &self,
        target: Target<'_>,
        settings: &H2Settings,
        connect_timeout: Duration,
    ) -> Result<(H2Lease, bool), ConnectError> {
        let Some(slot) = self.may_open(settings.max_connections) else {
            if let Some(lease) = self.lease_over(&settings.metrics) {
                return Ok((lease, true));
            }
            // Every connection closed meanwhile: open one all the same.
            return Ok((self.open(target, settings, connect_timeout).await?, false));
        };
        let lease = self.open(target, settings, connect_timeout).await;
        drop(slot);
        Ok((lease?, false))
    }

    /// Opens a connection, with one stream leased on it, and adds it to the pool.
    pub async fn open(
        &self,
        target: Target<'_>,
        settings: &H2Settings,
        connect_timeout: Duration,
    ) -> Result<H2Lease, ConnectError> {
        let connecting = connect(target, settings, connect_timeout);
        let conn = match tokio::time::timeout(connect_timeout, connecting).await {
            Err(_) => return Err(ConnectError::Timeout),
            Ok(r) => r?,
        };
        settings.metrics.opened.increment(1);
        conn.active.store(1, Ordering::Relaxed);
        conn.used.store(true, Ordering::Relaxed);
        let lease = H2Lease(conn.clone());
        self.conns.rcu(|cur| {
            let mut list: ConnList = cur.as_deref().map_or_else(Vec::new, |l| {
                l.iter().filter(|c| c.is_open()).cloned().collect()
            });
            list.push(conn.clone());
            Some(Arc::new(list))
        });
        Ok(lease)
    }

    /// Drops connections that carried no stream since the last call and have none now, and
    /// closed ones (the reaper calls this every few seconds). A dropped connection closes
    /// once its last stream ends.
    pub fn evict_idle(&self) {
        let Some(list) = self.conns.load_full() else {
            return;
        };
        let gone: Vec<*const H2Conn> = list
            .iter()
            .filter(|c| {
                let used = c.used.swap(false, Ordering::Relaxed);
                !c.is_open() || (!used && c.active.load(Ordering::Relaxed) == 0)
            })
            .map(Arc::as_ptr)
            .collect();
        if !gone.is_empty() {
            // By identity: a connection leased since it was looked at goes all the same,
            // and closes once that stream ends.
            self.prune(|c| !gone.iter().any(|g| std::ptr::eq(*g, c)));
        }
    }

    /// Keeps the connections `keep` picks; an empty pool frees its list.
    fn prune(&self, keep: impl Fn(&H2Conn) -> bool) {
        self.conns.rcu(|cur| {
            let list: ConnList = cur.as_deref().map_or_else(Vec::new, |l| {
                l.iter().filter(|c| keep(c)).cloned().collect()
            });
            (!list.is_empty()).then(|| Arc::new(list))
        });
    }
}

/// TCP, then TLS if asked, then the HTTP/2 handshake; the connection's task is spawned.
async fn connect(
    target: Target<'_>,
    settings: &H2Settings,
    limit: Duration,
) -> Result<Arc<H2Conn>, ConnectError> {
    let tcp = connect_tcp(target.socket, target.host, target.port, target.dns, limit).await?;
    if !target.tls {
        return handshake(tcp, settings).await;
    }
    let name = ServerName::try_from(target.host.to_owned())
        .map_err(|e| ConnectError::Tls(format!("server name {}: {e}", target.host)))?;
    let tls = tokio_rustls::TlsConnector::from(settings.tls.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| ConnectError::Tls(e.to_string()))?;
    if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
        return Err(ConnectError::Tls(
            "the backend did not choose h2 by ALPN".into(),
        ));
    }
    handshake(tls, settings).await
}

async fn handshake<T>(io: T, settings: &H2Settings) -> Result<Arc<H2Conn>, ConnectError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, mut conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(settings.ping_interval)
        .keep_alive_timeout(settings.ping_interval)
        .keep_alive_while_idle(true)
        // One stream until the server's SETTINGS say how many (h2 then takes its value, or
        // no limit if it names none): a burst on a new connection spreads over new ones
        // instead of queueing past a limit not yet known.
        .initial_max_send_streams(1)
        .handshake::<_, H2Body>(TokioIo::new(io))
        .await
        .map_err(ConnectError::Handshake)?;
    let cap = settings.max_streams;
    let limit = Arc::new(AtomicUsize::new(cap));
    let seen = limit.clone();
    let open = settings.metrics.open.clone();
    open.increment(1.0);
    tokio::spawn(async move {
        let mut last = cap;
        // Polled here so the server's SETTINGS_MAX_CONCURRENT_STREAMS is read as it
        // arrives or changes.
        let result = std::future::poll_fn(|cx| {
            let polled = std::pin::Pin::new(&mut conn).poll(cx);
            let now = conn.current_max_send_streams().clamp(1, cap);
            if now != last {
                last = now;
                seen.store(now, Ordering::Relaxed);
            }
            polled
        })
        .await;
        open.decrement(1.0);
        if let Err(e) = result {
            tracing::debug!(error = %e, "HTTP/2 backend connection closed with error");
        }
    });
    Ok(Arc::new(H2Conn {
        sender,
        active: AtomicUsize::new(0),
        limit,
        used: AtomicBool::new(false),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proto_tags() {
        assert_eq!(Proto::from_tag("h2c"), Some(Proto::H2c));
        assert_eq!(Proto::from_tag("h2"), Some(Proto::H2));
        assert_eq!(Proto::from_tag("http1"), Some(Proto::Http1));
        assert_eq!(Proto::from_tag("h3"), None);
        assert_eq!(Proto::from_tag("H2C"), None);
        assert!(Proto::H2c.is_h2() && !Proto::Http1.is_h2());
    }

    #[test]
    fn an_unused_pool_is_small() {
        assert!(std::mem::size_of::<H2Pool>() <= 16);
        let p = H2Pool::default();
        assert!(p.lease().is_none());
        assert_eq!(p.usage(), (0, 0));
        p.evict_idle();
    }
}
