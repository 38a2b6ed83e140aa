//! The proxy's listeners: accept, then the PROXY header (optional), then TLS (optional),
//! then the protocol (by ALPN on TLS, by the preface on plain TCP), then the HTTP/1 fast
//! path or hyper's HTTP/2. Each connection's facts (peer, client address, trust, scheme,
//! port, SNI, ALPN) are built here once; nothing below this module knows how the bytes
//! arrived.

pub mod activation;
pub(crate) mod h2;
mod limit;
pub mod prefixed;
pub mod proxy_protocol;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::proxy::{h1, ConnFacts, Proxy, TlsFacts};
use crate::routing::Routes;
use crate::server::{next_conn, stopped};
use crate::tls::CertStore;

pub use activation::{ActivationError, Inherited};
pub use limit::ConnLimit;
use prefixed::Prefixed;
pub use proxy_protocol::ProxyProtocol;

/// The HTTP/2 client preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// What the first read of a connection gets room for (the HTTP/1 path keeps the buffer).
const FIRST_READ: usize = 4 * 1024;
/// After the grace period, how long connections that close themselves then (upgraded
/// ones, with a clean shutdown of both sides) get before the rest are dropped.
const CLOSE_WAIT: Duration = Duration::from_millis(500);

/// What a listener puts in front of HTTP.
#[derive(Debug, Clone)]
pub struct Layers {
    /// Whether connections start with a PROXY header.
    pub proxy_protocol: ProxyProtocol,
    /// TLS termination, with the certificates to choose from.
    pub tls: Option<Arc<Tls>>,
    /// The open-connection limit, shared by the proxy's listeners.
    pub limit: Arc<ConnLimit>,
    /// Accept only once this table is ready (10 s at most): an inherited socket after a
    /// restart keeps its connections in the backlog until they can be routed, rather than
    /// answer 503.
    pub hold_until_ready: Option<Arc<Routes>>,
}

impl Layers {
    /// Plain HTTP, no PROXY header, no connection limit.
    pub fn plain() -> Self {
        Layers {
            proxy_protocol: ProxyProtocol::Off,
            tls: None,
            limit: ConnLimit::new(0),
            hold_until_ready: None,
        }
    }
}

/// TLS termination: the rustls configuration, built once from the certificate store.
pub struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
    /// The certificates, reloaded in place.
    pub store: Arc<CertStore>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("store", &self.store).finish()
    }
}

impl Tls {
    /// TLS with the certificates in `store`.
    pub fn new(store: Arc<CertStore>) -> Result<Self, crate::tls::TlsError> {
        let config = crate::tls::server_config(store.clone())?;
        Ok(Tls {
            acceptor: tokio_rustls::TlsAcceptor::from(config),
            store,
        })
    }
}

/// Serves a proxy listener with `layers`. Each connection takes the proxy in `current` when
/// it is accepted and keeps it for its life, so a reload applies to new connections without
/// touching open ones. On shutdown it stops accepting, lets connections finish their
/// current request for at most `proxy.shutdown_grace` (as configured then), then closes
/// the rest.
pub async fn serve(
    listener: TcpListener,
    current: Arc<ArcSwap<Proxy>>,
    layers: Layers,
    mut shutdown: watch::Receiver<bool>,
) {
    let layers = Arc::new(layers);
    let port = listener.local_addr().map_or(0, |a| a.port());
    let mut conns = tokio::task::JoinSet::new();
    if let Some(routes) = &layers.hold_until_ready {
        // Bounded: with Consul down, the provisional table (static services, 503s with
        // Retry-After) is better than a backlog that never moves.
        tokio::select! {
            _ = tokio::time::timeout(HOLD_LIMIT, routes_ready(routes)) => {}
            _ = stopped(&mut shutdown) => {}
        }
    }
    loop {
        // At max_connections, new connections wait in the kernel's backlog. The slot is
        // taken after accept, so a loop idle in accept holds none; if another listener
        // took the last one meanwhile, this connection waits for the next.
        tokio::select! {
            () = layers.limit.room() => {}
            _ = stopped(&mut shutdown) => break,
        }
        let Some((stream, peer)) = next_conn(&listener, &mut shutdown).await else {
            break;
        };
        let slot = tokio::select! {
            slot = layers.limit.admit() => slot,
            _ = stopped(&mut shutdown) => break,
        };
        let proxy = current.load_full();
        let stop = shutdown.clone();
        let layers = layers.clone();
        while conns.try_join_next().is_some() {}
        conns.spawn(async move {
            let _slot = slot;
            connection(proxy, &layers, stream, peer, port, stop).await;
        });
    }
    drop(listener);
    let grace = current.load().shutdown_grace;
    let drained =
        tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            while conns.join_next().await.is_some() {}
        })
        .await;
        if !conns.is_empty() {
            tracing::warn!(
                ?grace,
                open = conns.len(),
                "grace period over; closing remaining connections"
            );
        }
    }
    conns.abort_all();
}

/// The longest an inherited socket's connections wait in the backlog for the first table.
const HOLD_LIMIT: Duration = Duration::from_secs(10);

/// Resolves once the first routing table is live.
async fn routes_ready(routes: &Routes) {
    while !routes.load().ready {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Why a connection was closed before any HTTP.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("PROXY header: {0}")]
    ProxyHeader(#[from] proxy_protocol::ProxyProtocolError),
    #[error("PROXY header from a peer not in trusted_proxies")]
    UntrustedProxy,
    #[error("TLS handshake: {0}")]
    Handshake(std::io::Error),
    #[error("no request within the header timeout")]
    Timeout,
    #[error("connection closed before a request")]
    Closed,
}

/// One connection through the layers.
async fn connection(
    proxy: Arc<Proxy>,
    layers: &Layers,
    mut stream: TcpStream,
    peer: SocketAddr,
    port: u16,
    stop: watch::Receiver<bool>,
) {
    let due = tokio::time::Instant::now() + proxy.header_timeout;
    // TLS without a PROXY header reads nothing here: no buffer to carry over.
    let reads = layers.tls.is_none() || layers.proxy_protocol != ProxyProtocol::Off;
    let mut read = Vec::with_capacity(if reads { FIRST_READ } else { 0 });
    let (client, port) =
        match proxy_header(&proxy, layers, &mut stream, peer, port, &mut read, due).await {
            Ok(addrs) => addrs,
            Err(e) => return refused(&e, peer),
        };
    let facts = ConnFacts::new(&proxy.core, client, port);
    match &layers.tls {
        Some(tls) => {
            let io = Prefixed::new(read, stream);
            let accepted = tokio::time::timeout_at(due, tls.acceptor.accept(io)).await;
            let tls_stream = match accepted {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    let reason = crate::tls::handshake_failure_reason(&e);
                    metrics::counter!("consul_router_tls_handshake_failures_total", "reason" => reason)
                        .increment(1);
                    return refused(&Refusal::Handshake(e), peer);
                }
                Err(_) => {
                    metrics::counter!("consul_router_tls_handshake_failures_total", "reason" => "timeout")
                        .increment(1);
                    return refused(&Refusal::Timeout, peer);
                }
            };
            metrics::counter!("consul_router_tls_handshakes_total").increment(1);
            let session = tls_stream.get_ref().1;
            let alpn = match session.alpn_protocol() {
                Some(b"h2") => "h2",
                Some(b"http/1.1") => "http/1.1",
                _ => "",
            };
            let version = match session.protocol_version() {
                Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
                Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
                _ => "",
            };
            let facts = facts.with_tls(TlsFacts {
                sni: session.server_name().map(Box::from),
                alpn,
                version,
            });
            if alpn == "h2" {
                serve_h2(proxy, tls_stream, facts, stop).await;
            } else {
                let _open = Open::new(&proxy.open_connections[0]);
                h1::serve(proxy.h1(), tls_stream, Vec::new(), facts, stop).await;
            }
        }
        None => match preface(&mut stream, &mut read, due).await {
            Ok(true) => serve_h2(proxy, Prefixed::new(read, stream), facts, stop).await,
            Ok(false) => {
                let _open = Open::new(&proxy.open_connections[0]);
                h1::serve(proxy.h1(), stream, read, facts, stop).await;
            }
            Err(e) => refused(&e, peer),
        },
    }
}

/// Serves an HTTP/2 connection, counted while open.
async fn serve_h2<T>(proxy: Arc<Proxy>, io: T, facts: ConnFacts, stop: watch::Receiver<bool>)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let _open = Open::new(&proxy.open_connections[1]);
    let builder = h2::h2_builder(&proxy);
    h2::serve_h2(io, proxy, &builder, facts, stop).await;
}

/// The client address and the port it connected to: from a PROXY header when the layer
/// asks for one (bytes read past it stay in `read`), else the TCP peer's and ours.
async fn proxy_header(
    proxy: &Proxy,
    layers: &Layers,
    stream: &mut TcpStream,
    peer: SocketAddr,
    port: u16,
    read: &mut Vec<u8>,
    due: tokio::time::Instant,
) -> Result<(SocketAddr, u16), Refusal> {
    let mode = layers.proxy_protocol;
    if mode == ProxyProtocol::Off {
        return Ok((peer, port));
    }
    // Only a trusted proxy may say who the client is. In `optional` mode an untrusted
    // peer's bytes are left for HTTP, where a PROXY line is a malformed request.
    if !proxy.core.trusts(peer.ip()) {
        return match mode {
            ProxyProtocol::Optional => Ok((peer, port)),
            _ => Err(Refusal::UntrustedProxy),
        };
    }
    let header = tokio::time::timeout_at(due, proxy_protocol::read_header(stream, mode, read))
        .await
        .map_err(|_| Refusal::Timeout)??;
    Ok(match header {
        Some(addrs) => (addrs.source, addrs.destination.port()),
        None => (peer, port),
    })
}

/// Reads until the first bytes tell HTTP/2's preface from HTTP/1; true for HTTP/2.
async fn preface(
    stream: &mut TcpStream,
    read: &mut Vec<u8>,
    due: tokio::time::Instant,
) -> Result<bool, Refusal> {
    loop {
        let n = read.len().min(H2_PREFACE.len());
        if read[..n] != H2_PREFACE[..n] {
            return Ok(false);
        }
        if n == H2_PREFACE.len() {
            return Ok(true);
        }
        match tokio::time::timeout_at(due, stream.read_buf(read)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Err(Refusal::Closed),
            Ok(Ok(_)) => {}
            Err(_) => return Err(Refusal::Timeout),
        }
    }
}

/// Logs a connection closed before HTTP.
fn refused(e: &Refusal, peer: SocketAddr) {
    if let Refusal::ProxyHeader(_) | Refusal::UntrustedProxy = e {
        metrics::counter!("consul_router_proxy_protocol_refused_total").increment(1);
    }
    tracing::debug!(%peer, error = %e, "connection closed before HTTP");
}

/// Counts one open client connection in a gauge while it lives.
struct Open(metrics::Gauge);

impl Open {
    fn new(gauge: &metrics::Gauge) -> Self {
        gauge.increment(1.0);
        Open(gauge.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// How often certificate files are checked for changes.
pub const CERT_POLL: Duration = Duration::from_secs(5);
