//! The request core: the policy both protocol paths share, in one place. Routing and the
//! balancing key, the client's address, the request ID, the retry rule, and the one
//! `finish` that closes every request (metrics, access log). The HTTP/1 fast path and the
//! HTTP/2 path call these with borrowed facts; nothing here allocates or locks.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::access_log::Record;

use crate::balance::{hash_bytes, Strategy};
use crate::routing::{normalize, HostError, Service, MAX_HOST};
use crate::upstream::{parse_load, ErrorKind, ReportedLoad};

use super::h1::head::PeerText;
use super::headers;
use super::{Proxy, ProxyError};

pub use crate::access_log::Protocol;

/// A backend's load header (`proxy.load_header`): the field is never relayed, and a valid
/// value becomes the instance's load at once, ahead of the next report in Consul.
#[derive(Debug, Clone, Copy)]
pub struct LoadHeader<'a> {
    /// The field's name, lowercase; empty when the feature is off.
    pub name: &'a [u8],
    instance: &'a ReportedLoad,
}

impl LoadHeader<'_> {
    /// Takes the field's value; one that is not a finite, non-negative number is ignored.
    pub fn report(&self, value: &[u8]) {
        if let Some(load) = parse_load(value) {
            self.instance.report(load);
        }
    }
}

/// Facts about one client connection, fixed for its life.
#[derive(Debug)]
pub struct ClientConn {
    /// The peer's address.
    pub peer: SocketAddr,
    /// The peer's IP (IPv4-mapped IPv6 as IPv4).
    pub peer_ip: IpAddr,
    /// The peer's IP as text, formatted once.
    pub peer_text: PeerText,
    /// Whether the peer is a trusted proxy.
    pub trusted: bool,
    /// This connection's number, for request IDs.
    id: u64,
    /// Requests started on it (HTTP/2 streams run concurrently, hence atomic).
    seq: AtomicU64,
}

impl ClientConn {
    /// Facts for a new connection from `peer`.
    pub fn new(proxy: &Proxy, peer: SocketAddr) -> Self {
        let peer_ip = headers::canonical(peer.ip());
        ClientConn {
            peer,
            peer_ip,
            peer_text: PeerText::new(peer_ip),
            trusted: headers::is_trusted(peer_ip, &proxy.trusted),
            id: proxy.conns.fetch_add(1, Ordering::Relaxed),
            seq: AtomicU64::new(0),
        }
    }

    /// A fresh request ID: the process's salt, this connection's number and the request's
    /// place on it, in hex (`5f3a9c01-1a-7`). Unique per process, short, and no syscall.
    pub fn next_request_id(&self, salt: u32) -> RequestId {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut id = RequestId::default();
        id.push_hex(u64::from(salt), 8);
        id.push(b'-');
        id.push_hex(self.id, 0);
        id.push(b'-');
        id.push_hex(seq, 0);
        id
    }
}

/// A request ID as text, on the stack.
#[derive(Debug, Clone, Copy)]
pub struct RequestId {
    buf: [u8; 64],
    len: usize,
}

impl Default for RequestId {
    fn default() -> Self {
        RequestId {
            buf: [0; 64],
            len: 0,
        }
    }
}

impl RequestId {
    /// A request ID sent by a trusted peer, if it is a usable one (1 to 64 visible ASCII
    /// bytes).
    pub fn from_peer(value: &[u8]) -> Option<Self> {
        let value = value.trim_ascii();
        if value.is_empty() || value.len() > 64 || !value.iter().all(u8::is_ascii_graphic) {
            return None;
        }
        let mut id = RequestId::default();
        id.buf[..value.len()].copy_from_slice(value);
        id.len = value.len();
        Some(id)
    }

    /// The ID's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The ID as text.
    pub fn as_str(&self) -> &str {
        // Only visible ASCII is ever stored.
        std::str::from_utf8(self.as_bytes()).unwrap_or("-")
    }

    fn push(&mut self, b: u8) {
        if self.len < self.buf.len() {
            self.buf[self.len] = b;
            self.len += 1;
        }
    }

    /// Lowercase hex of `v`, at least `width` digits.
    fn push_hex(&mut self, v: u64, width: usize) {
        let digits = ((64 - v.leading_zeros() as usize).div_ceil(4))
            .max(width)
            .max(1);
        for i in (0..digits).rev() {
            let d = ((v >> (4 * i)) & 0xf) as u8;
            self.push(if d < 10 { b'0' + d } else { b'a' + d - 10 });
        }
    }
}

/// A request the core routed: the service, the balancing key, and the client's address.
#[derive(Debug)]
pub struct Routed {
    /// The service.
    pub service: Arc<Service>,
    /// The strategy's key (0 for strategies without one).
    pub key: u64,
    /// The client's address: the peer, or from a trusted peer's X-Forwarded-For chain.
    pub client: IpAddr,
    /// When routing was done.
    pub start: Instant,
}

/// A request the core answers itself, and the service it was for, if any.
#[derive(Debug)]
pub struct Refused {
    /// Why.
    pub error: ProxyError,
    /// The service, when the host named one.
    pub service: Option<Arc<Service>>,
}

impl From<ProxyError> for Refused {
    fn from(error: ProxyError) -> Self {
        Refused {
            error,
            service: None,
        }
    }
}

/// What to do after an attempt on a backend failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Nothing reached the backend: try another instance.
    OtherInstance,
    /// A kept-alive connection broke before any response byte and the request can be
    /// replayed: try once more on a fresh connection to the same instance.
    FreshConnection,
    /// Answer the client with the error.
    Answer,
}

/// One failed attempt, as the retry rule sees it.
#[derive(Debug, Clone, Copy)]
pub struct Failed {
    /// What went wrong.
    pub kind: ErrorKind,
    /// The connection came from the idle pool.
    pub reused: bool,
    /// The request did not get through whole, so no backend acted on it.
    pub unsent: bool,
    /// The request has no body and an idempotent method.
    pub replayable: bool,
    /// Attempts made so far for this request, this one included.
    pub tries: u32,
}

/// A finished request, for metrics and the access log.
#[derive(Debug, Default)]
pub struct Finished<'a> {
    /// The service, if the host named one.
    pub service: Option<&'a Service>,
    /// The Consul ID of the instance that answered, if one did.
    pub instance: &'a str,
    /// The status the client got (499 if it went away before any).
    pub status: u16,
    /// When the request was routed (or its head read).
    pub start: Option<Instant>,
    /// Time from routing to the backend's response head, if one came.
    pub upstream: Option<Duration>,
    /// Attempts after the first.
    pub retries: u32,
    /// Request body bytes read from the client.
    pub bytes_in: u64,
    /// Response body bytes sent to the client.
    pub bytes_out: u64,
    /// The request's ID.
    pub request_id: &'a [u8],
}

/// What the access log needs of a request's head, copied out of the read buffer (which the
/// body may overwrite before the request ends) into one buffer the connection reuses.
/// Filled only when the access log is on.
#[derive(Debug)]
pub struct LogFields {
    buf: Vec<u8>,
    /// Ends of method, path, host, referer and user agent in `buf`.
    ends: [usize; 5],
    /// When the head arrived.
    pub time: SystemTime,
    /// The client's address.
    pub client: IpAddr,
    /// The client's protocol.
    pub protocol: Protocol,
}

impl Default for LogFields {
    fn default() -> Self {
        LogFields {
            buf: Vec::new(),
            ends: [0; 5],
            time: SystemTime::UNIX_EPOCH,
            client: IpAddr::from([0, 0, 0, 0]),
            protocol: Protocol::Http11,
        }
    }
}

impl LogFields {
    /// Copies a request's fields: method, path (as sent), host, `Referer`, `User-Agent`.
    pub fn fill(&mut self, client: IpAddr, protocol: Protocol, parts: [&[u8]; 5]) {
        self.time = SystemTime::now();
        self.client = client;
        self.protocol = protocol;
        self.buf.clear();
        for (end, part) in self.ends.iter_mut().zip(parts) {
            self.buf.extend_from_slice(part);
            *end = self.buf.len();
        }
    }

    fn part(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.buf[start..self.ends[i]]
    }

    fn text(&self, i: usize) -> &str {
        std::str::from_utf8(self.part(i)).unwrap_or("")
    }
}

impl Proxy {
    /// Routes a request: the routing table's service for its host, the balancing key and
    /// the client's address. `path` is the origin-form target (query included) and `xff`
    /// the X-Forwarded-For values in order.
    pub fn route<'x>(
        &self,
        conn: &ClientConn,
        method: &str,
        host: Option<&[u8]>,
        path: &[u8],
        xff: impl DoubleEndedIterator<Item = &'x [u8]>,
    ) -> Result<Routed, Refused> {
        if method == "CONNECT" {
            return Err(ProxyError::Connect405.into());
        }
        let service = {
            let table = self.routes.load();
            if !table.ready {
                return Err(ProxyError::NotReady.into());
            }
            let mut buf = [0u8; MAX_HOST + 2];
            let host = match host.map(|h| normalize(h, &mut buf)) {
                Some(Ok(h)) => h,
                Some(Err(e)) => return Err(ProxyError::BadHost(e).into()),
                None => return Err(ProxyError::BadHost(HostError::Missing).into()),
            };
            match table.lookup(host) {
                Some(s) => s.clone(),
                None => return Err(ProxyError::UnknownHost.into()),
            }
        };
        let start = Instant::now();
        service.stats.touch_at(start);
        if service.routable == 0 {
            return Err(Refused {
                error: ProxyError::NoHealthyInstance,
                service: Some(service),
            });
        }
        let client = if conn.trusted {
            headers::client_ip_in(xff, conn.peer_ip, &self.trusted)
        } else {
            conn.peer_ip
        };
        let key = match service.strategy() {
            Strategy::IpHash => match client {
                IpAddr::V4(v4) => hash_bytes(&v4.octets()),
                IpAddr::V6(v6) => hash_bytes(&v6.octets()),
            },
            Strategy::UrlHash if self.hash_query => hash_bytes(path),
            Strategy::UrlHash => {
                let end = path.iter().position(|&b| b == b'?').unwrap_or(path.len());
                hash_bytes(&path[..end])
            }
            Strategy::Random | Strategy::LeastLoad => 0,
        };
        Ok(Routed {
            service,
            key,
            client,
            start,
        })
    }

    /// The retry rule: what follows a failed attempt. Counts the error, and the retry if
    /// there is one, for the service.
    pub fn after_failure(&self, service: &Service, f: Failed) -> Next {
        service.stats.metrics.get().upstream_error(f.kind);
        let unsent = f.unsent || f.kind.before_send();
        let next = if f.reused && f.kind == ErrorKind::Reset && (unsent || f.replayable) {
            // A kept-alive connection the backend closed as we took it: common, and not
            // the instance's fault.
            Next::FreshConnection
        } else if unsent && f.tries <= self.upstream.retries {
            Next::OtherInstance
        } else {
            Next::Answer
        };
        if next != Next::Answer {
            service.stats.metrics.get().retry();
        }
        next
    }

    /// Where a response's load header goes: its name (lowercase; empty when off) and the
    /// instance that answered.
    pub fn load_header<'a>(&'a self, instance: &'a ReportedLoad) -> LoadHeader<'a> {
        LoadHeader {
            name: self
                .load_header
                .as_ref()
                .map_or(&b""[..], |h| h.as_str().as_bytes()),
            instance,
        }
    }

    /// Whether `finish` wants [`LogFields`] (the access log is on).
    pub fn logs(&self) -> bool {
        self.access_log.is_on()
    }

    /// Closes a request: its status and durations go to the service's metrics (or to
    /// `unknown` when no service took it), and its line to the access log.
    pub fn finish(&self, done: &Finished<'_>, log: Option<&LogFields>) {
        let metrics = done
            .service
            .map_or(&self.routes.unrouted, |s| s.stats.metrics.get());
        let duration = done.start.map_or(Duration::ZERO, |s| s.elapsed());
        metrics.count(done.status);
        metrics.duration.record(duration);
        if let Some(u) = done.upstream {
            metrics.upstream_duration.record(u);
        }
        if let Some(log) = log.filter(|_| self.access_log.is_on()) {
            self.access_log.log(&Record {
                time: log.time,
                client: log.client,
                host: log.text(2),
                service: done.service.map_or("", |s| &s.name),
                instance: done.instance,
                method: log.text(0),
                path: log.text(1),
                protocol: log.protocol,
                status: done.status,
                bytes_in: done.bytes_in,
                bytes_out: done.bytes_out,
                duration,
                upstream: done.upstream,
                retries: done.retries,
                request_id: done.request_id,
                referer: log.part(3),
                user_agent: log.part(4),
                tls_version: "",
                alpn: "",
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::routing::testing::{spec, table};
    use crate::routing::Health;

    fn proxy_and_service() -> (Proxy, Arc<Service>) {
        let table = table(vec![(
            "core-test",
            vec![spec("core-1", 1, Health::Passing, &[])],
        )]);
        let service = table.services["core-test"].clone();
        let cfg = Config::default();
        let routes = Arc::new(crate::routing::Routes::new());
        let proxy = Proxy::new(&cfg, routes, crate::access_log::AccessLog::off());
        (proxy, service)
    }

    #[test]
    fn the_retry_rule() {
        let (proxy, svc) = proxy_and_service();
        let f = |kind, reused, unsent, replayable, tries| Failed {
            kind,
            reused,
            unsent,
            replayable,
            tries,
        };
        // retries = 2 by default: a refused connect goes elsewhere twice, then is answered.
        let refused = |tries| f(ErrorKind::ConnectRefused, false, true, false, tries);
        assert_eq!(proxy.after_failure(&svc, refused(1)), Next::OtherInstance);
        assert_eq!(proxy.after_failure(&svc, refused(2)), Next::OtherInstance);
        assert_eq!(proxy.after_failure(&svc, refused(3)), Next::Answer);
        // A stale pooled connection: once more, fresh, if nothing was done or it can replay.
        let stale = f(ErrorKind::Reset, true, false, true, 1);
        assert_eq!(proxy.after_failure(&svc, stale), Next::FreshConnection);
        let stale_post = f(ErrorKind::Reset, true, false, false, 1);
        assert_eq!(proxy.after_failure(&svc, stale_post), Next::Answer);
        // A reset on a fresh connection after the request went out, or a timeout: answered.
        let reset = f(ErrorKind::Reset, false, false, true, 1);
        assert_eq!(proxy.after_failure(&svc, reset), Next::Answer);
        let slow = f(ErrorKind::ResponseTimeout, true, false, true, 1);
        assert_eq!(proxy.after_failure(&svc, slow), Next::Answer);
    }

    #[test]
    fn request_ids() {
        let (proxy, _) = proxy_and_service();
        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let conn = ClientConn::new(&proxy, peer);
        let a = conn.next_request_id(0x5f3a_9c01);
        let b = conn.next_request_id(0x5f3a_9c01);
        assert!(a.as_str().starts_with("5f3a9c01-"), "{}", a.as_str());
        assert!(a.as_str().ends_with("-0") && b.as_str().ends_with("-1"));
        assert_ne!(a.as_str(), b.as_str());
        let other = ClientConn::new(&proxy, peer).next_request_id(0x5f3a_9c01);
        assert_ne!(a.as_str(), other.as_str());
        assert_eq!(RequestId::from_peer(b" abc-1 ").unwrap().as_str(), "abc-1");
        assert!(RequestId::from_peer(b"").is_none());
        assert!(RequestId::from_peer(b"a b").is_none());
        assert!(RequestId::from_peer(&[b'x'; 65]).is_none());
    }
}
