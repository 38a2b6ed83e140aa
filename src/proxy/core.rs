//! The request core: the policy both protocol paths share, in one place. The connection's
//! facts, routing and the balancing key, the client's address, the request ID, the
//! attempts on backends (`attempts.rs`), and the one `finish` that closes every request
//! (metrics, access log). The HTTP/1 fast path and the HTTP/2 path call these with
//! borrowed facts; nothing here allocates or locks, and nothing here knows either path.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use ipnet::IpNet;

use crate::access_log::{AccessLog, Record};
use crate::balance::{hash_bytes, Strategy};
use crate::config::{Config, UnderscoreHeaders};
use crate::routing::{normalize, AuthSpec, HostError, Routes, Service, MAX_HOST};
use crate::upstream::{parse_load, ReportedLoad};

use super::answer::LocalAnswer;
use super::attempts::{AttemptRules, Attempts};
use super::auth::{Auth, Outcome};
use super::error::{Error, ErrorType};
use super::fields::{self, Forwarding, PeerText, Scheme};

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

/// The policy both protocol paths share, with its settings.
#[derive(Debug)]
pub struct Core {
    routes: Arc<Routes>,
    trusted: Box<[IpNet]>,
    hash_query: bool,
    /// Drop every request field name with `_` (else only the lookalikes).
    drop_underscores: bool,
    /// Retries and timeouts toward backends.
    rules: AttemptRules,
    /// Client connections accepted, numbering them for request IDs.
    conns: AtomicU64,
    /// This process's request ID prefix.
    salt: u32,
    /// Where `finish` writes each request's line (off by default).
    access_log: AccessLog,
    /// `proxy.load_header`: read as the instance's load, never relayed.
    load_header: Option<http::HeaderName>,
    /// `tls.redirect_http`: the TLS listener's port plain requests are redirected to.
    redirect_https: Option<u16>,
    /// Forward auth's rules and decision cache.
    auth: Auth,
    /// HTTP/2 backend connections (`router.proto=h2c`/`h2`).
    h2_backends: crate::upstream::H2Settings,
}

impl Core {
    /// The core for `cfg`, reading `routes`, logging requests to `access_log`.
    pub fn new(cfg: &Config, routes: Arc<Routes>, access_log: AccessLog) -> Self {
        let rules = AttemptRules {
            retries: cfg.proxy.retries,
            connect_timeout: cfg.proxy.connect_timeout,
            response_timeout: cfg.proxy.response_timeout,
            idle_timeout: cfg.proxy.idle_timeout,
            outlier: cfg.proxy.outlier,
            budget: cfg.proxy.retry_budget,
        };
        Core {
            routes,
            trusted: cfg.trusted_proxies.clone().into_boxed_slice(),
            hash_query: cfg.hash_query,
            drop_underscores: cfg.underscore_headers == UnderscoreHeaders::All,
            rules,
            auth: Auth::new(rules, cfg.proxy.auth_timeout),
            conns: AtomicU64::new(0),
            salt: fastrand::u32(..),
            access_log,
            load_header: cfg.proxy.load_header.clone(),
            redirect_https: cfg
                .tls
                .as_ref()
                .filter(|t| t.redirect_http)
                .map(|t| t.listen.port()),
            h2_backends: super::h2up::settings(cfg),
        }
    }

    /// How HTTP/2 backend connections are made and shared.
    pub fn h2_backends(&self) -> &crate::upstream::H2Settings {
        &self.h2_backends
    }

    /// Whether a request on `conn` gets a redirect to https: `tls.redirect_http` is on, the
    /// connection is plain, and the peer is not a trusted proxy (which says the scheme it
    /// saw in X-Forwarded-Proto, and redirects itself).
    fn redirects(&self, conn: &ConnFacts) -> bool {
        self.redirect_https.is_some() && conn.scheme == Scheme::Http && !conn.trusted
    }

    /// A 308 to the same host and target on the TLS listener.
    fn redirect(&self, host: &str, target: &[u8], service: Option<Arc<Service>>) -> Refused {
        let port = match self.redirect_https {
            Some(443) | None => String::new(),
            Some(p) => format!(":{p}"),
        };
        let target = String::from_utf8_lossy(target);
        let location = format!("https://{host}{port}{target}");
        let answer = http::HeaderValue::from_str(&location)
            .ok()
            .map(|l| Box::new(LocalAnswer::redirect(l)));
        Refused {
            error: ErrorType::RedirectHttps.into(),
            service,
            answer,
        }
    }

    /// Whether `ip` is one of `trusted_proxies`.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        fields::is_trusted(ip, &self.trusted)
    }

    /// The rules attempts on backends follow.
    pub fn rules(&self) -> &AttemptRules {
        &self.rules
    }

    /// Forward auth's rules and cache.
    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    /// The live routing table.
    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    /// The attempts of a request `routed` here; `replayable` as [`Attempts::new`].
    pub fn attempts<'a>(&'a self, routed: &'a Routed, replayable: bool) -> Attempts<'a> {
        Attempts::new(
            &self.rules,
            &routed.service,
            routed.key,
            routed.start,
            replayable,
        )
    }

    /// The request's ID: a trusted peer's `X-Request-Id` if usable, else a fresh one.
    pub fn request_id(&self, conn: &ConnFacts, sent: Option<&[u8]>) -> RequestId {
        sent.filter(|_| conn.trusted)
            .and_then(RequestId::from_peer)
            .unwrap_or_else(|| conn.next_request_id(self.salt))
    }

    /// How a request's forwarding fields are written, for `client` (from [`Routed`]).
    pub fn forwarding<'a>(
        &self,
        conn: &'a ConnFacts,
        client: &'a PeerText,
        request_id: &'a RequestId,
    ) -> Forwarding<'a> {
        Forwarding {
            peer: &conn.peer_text,
            trusted: conn.trusted,
            client,
            drop_underscores: self.drop_underscores,
            request_id: request_id.as_bytes(),
            scheme: conn.scheme,
            port: conn.port_text(),
        }
    }
}

/// What TLS said about a connection, when it came over TLS.
#[derive(Debug, Clone, Default)]
pub struct TlsFacts {
    /// The server name the client asked for.
    pub sni: Option<Box<str>>,
    /// The protocol chosen by ALPN (`h2`, `http/1.1`), empty if none.
    pub alpn: &'static str,
    /// `TLSv1.2` or `TLSv1.3`.
    pub version: &'static str,
}

/// Facts about one client connection, built once by the listener and fixed for its life.
#[derive(Debug)]
pub struct ConnFacts {
    /// The client's address: the TCP peer, or the source a trusted PROXY header gave.
    pub peer: SocketAddr,
    /// The peer's IP (IPv4-mapped IPv6 as IPv4).
    pub peer_ip: IpAddr,
    /// The peer's IP as text, formatted once.
    pub peer_text: PeerText,
    /// Whether the peer is a trusted proxy (its forwarding fields are believed).
    pub trusted: bool,
    /// `https` when TLS was terminated here.
    pub scheme: Scheme,
    /// TLS details, when TLS was terminated here.
    pub tls: Option<TlsFacts>,
    /// The port the client connected to, as text (`X-Forwarded-Port`).
    port: [u8; 5],
    port_len: u8,
    /// This connection's number, for request IDs.
    id: u64,
    /// Requests started on it (HTTP/2 streams run concurrently, hence atomic).
    seq: AtomicU64,
    /// Header values of the facts above, made on the first HTTP/2 request.
    values: OnceLock<ConnValues>,
}

/// A connection's facts as header values, shared by its HTTP/2 requests (a clone is a
/// reference count, where making one is an allocation).
#[derive(Debug)]
pub struct ConnValues {
    /// The peer's address.
    pub peer: http::HeaderValue,
    /// The local port.
    pub port: http::HeaderValue,
    /// `http` or `https`.
    pub scheme: http::HeaderValue,
}

impl ConnFacts {
    /// Facts for a new plain connection from `peer` to local `port`.
    pub fn new(core: &Core, peer: SocketAddr, port: u16) -> Self {
        let peer_ip = fields::canonical(peer.ip());
        let mut text = [0u8; 5];
        let mut w = &mut text[..];
        // At most 5 digits: always fits.
        let _ = std::io::Write::write_fmt(&mut w, format_args!("{port}"));
        let len = 5 - w.len();
        ConnFacts {
            peer,
            peer_ip,
            peer_text: PeerText::new(peer_ip),
            trusted: fields::is_trusted(peer_ip, &core.trusted),
            scheme: Scheme::Http,
            tls: None,
            port: text,
            port_len: len as u8,
            id: core.conns.fetch_add(1, Ordering::Relaxed),
            seq: AtomicU64::new(0),
            values: OnceLock::new(),
        }
    }

    /// The same facts for a connection that came over TLS.
    pub fn with_tls(mut self, tls: TlsFacts) -> Self {
        self.scheme = Scheme::Https;
        self.tls = Some(tls);
        self
    }

    /// This connection's facts as header values.
    pub fn values(&self) -> &ConnValues {
        self.values.get_or_init(|| {
            let value = |b: &[u8]| {
                http::HeaderValue::from_bytes(b).unwrap_or(http::HeaderValue::from_static(""))
            };
            ConnValues {
                peer: value(self.peer_text.as_bytes()),
                port: value(self.port_text().as_bytes()),
                scheme: http::HeaderValue::from_static(self.scheme.as_str()),
            }
        })
    }

    /// The local port as text.
    pub fn port_text(&self) -> &str {
        std::str::from_utf8(&self.port[..usize::from(self.port_len)]).unwrap_or("")
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

impl Routed {
    /// The service's forward auth, if it requires it.
    pub fn auth(&self) -> Option<&AuthSpec> {
        self.service.access.as_ref()?.auth.as_ref()
    }
}

/// A request the core answers itself, and the service it was for, if any.
#[derive(Debug)]
pub struct Refused {
    /// Why.
    pub error: Error,
    /// The service, when the host named one.
    pub service: Option<Arc<Service>>,
    /// The answer, when it is not the error's own (a redirect; rare, hence boxed).
    pub answer: Option<Box<LocalAnswer>>,
}

impl<E: Into<Error>> From<E> for Refused {
    fn from(error: E) -> Self {
        Refused {
            error: error.into(),
            service: None,
            answer: None,
        }
    }
}

impl Refused {
    /// The answer the client gets.
    pub fn answer(&mut self) -> LocalAnswer {
        self.answer
            .take()
            .map_or_else(|| self.error.answer(), |a| *a)
    }
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
    /// What forward auth decided, if the service has it.
    pub auth: Option<Outcome>,
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
    /// The TLS version and ALPN protocol, empty on plain connections.
    pub tls: (&'static str, &'static str),
}

impl Default for LogFields {
    fn default() -> Self {
        LogFields {
            buf: Vec::new(),
            ends: [0; 5],
            time: SystemTime::UNIX_EPOCH,
            client: IpAddr::from([0, 0, 0, 0]),
            protocol: Protocol::Http11,
            tls: ("", ""),
        }
    }
}

impl LogFields {
    /// Copies a request's fields: method, path (as sent), host, `Referer`, `User-Agent`, and
    /// the connection's TLS details.
    pub fn fill(&mut self, conn: &ConnFacts, protocol: Protocol, parts: [&[u8]; 5]) {
        let client = conn.peer_ip;
        self.tls = conn.tls.as_ref().map_or(("", ""), |t| (t.version, t.alpn));
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

impl Core {
    /// Routes a request: the routing table's service for its host, the balancing key and
    /// the client's address. `path` is the origin-form target (query included) and `xff`
    /// the X-Forwarded-For values in order.
    pub fn route<'x>(
        &self,
        conn: &ConnFacts,
        method: &str,
        host: Option<&[u8]>,
        path: &[u8],
        xff: impl DoubleEndedIterator<Item = &'x [u8]>,
    ) -> Result<Routed, Refused> {
        if method == "CONNECT" {
            return Err(ErrorType::ConnectMethod.into());
        }
        let service = {
            let table = self.routes.load();
            let mut buf = [0u8; MAX_HOST + 2];
            let host = match host.map(|h| normalize(h, &mut buf)) {
                Some(Ok(h)) => h,
                // Before the first table is live, whatever is not in it yet is a 503.
                _ if !table.ready => return Err(ErrorType::NotReady.into()),
                Some(Err(e)) => return Err(e.into()),
                None => return Err(HostError::Missing.into()),
            };
            // A table not live yet still routes what it knows: the static services, and
            // the services Consul listed (503 until their instances are read).
            match table.lookup(host) {
                Some(s) if self.redirects(conn) => {
                    return Err(self.redirect(host, path, Some(s.clone())))
                }
                Some(s) => s.clone(),
                None if !table.ready => return Err(ErrorType::NotReady.into()),
                None => return Err(ErrorType::UnknownHost.into()),
            }
        };
        let start = Instant::now();
        service.stats.touch_at(start);
        let client = if conn.trusted {
            fields::client_ip_in(xff, conn.peer_ip, &self.trusted)
        } else {
            conn.peer_ip
        };
        // The allow-list first: a refused client learns nothing of the service's state.
        let refused = |kind: ErrorType| Refused {
            error: kind.into(),
            service: Some(service.clone()),
            answer: None,
        };
        if service.access.as_ref().is_some_and(|a| !a.allows(client)) {
            return Err(refused(ErrorType::Forbidden));
        }
        if service.routable == 0 {
            return Err(refused(ErrorType::NoHealthyInstance));
        }
        let key = self.balance_key(&service, client, path);
        Ok(Routed {
            service,
            key,
            client,
            start,
        })
    }

    /// The balancing key of `service`'s strategy for a request from `client` for `path`.
    pub fn balance_key(&self, service: &Service, client: IpAddr, path: &[u8]) -> u64 {
        match service.strategy() {
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
        }
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

    /// The load header's name, when the feature is on.
    pub fn load_header_name(&self) -> Option<&http::HeaderName> {
        self.load_header.as_ref()
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
                tls_version: log.tls.0,
                alpn: log.tls.1,
                auth: done.auth.map_or("", Outcome::as_str),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core() -> Core {
        let routes = Arc::new(Routes::new());
        Core::new(&Config::default(), routes, AccessLog::off())
    }

    #[test]
    fn request_ids() {
        let core = core();
        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let conn = ConnFacts::new(&core, peer, 8080);
        assert_eq!(conn.port_text(), "8080");
        let a = conn.next_request_id(0x5f3a_9c01);
        let b = conn.next_request_id(0x5f3a_9c01);
        assert!(a.as_str().starts_with("5f3a9c01-"), "{}", a.as_str());
        assert!(a.as_str().ends_with("-0") && b.as_str().ends_with("-1"));
        assert_ne!(a.as_str(), b.as_str());
        let other = ConnFacts::new(&core, peer, 80).next_request_id(0x5f3a_9c01);
        assert_ne!(a.as_str(), other.as_str());
        assert_eq!(RequestId::from_peer(b" abc-1 ").unwrap().as_str(), "abc-1");
        assert!(RequestId::from_peer(b"").is_none());
        assert!(RequestId::from_peer(b"a b").is_none());
        assert!(RequestId::from_peer(&[b'x'; 65]).is_none());
        // A peer's ID is taken only from a trusted peer (loopback is, by default).
        assert_eq!(core.request_id(&conn, Some(b"mine")).as_str(), "mine");
        let far = ConnFacts::new(&core, "203.0.113.9:5000".parse().unwrap(), 80);
        assert_ne!(core.request_id(&far, Some(b"mine")).as_str(), "mine");
    }
}
