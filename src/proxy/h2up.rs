//! Exchanges with HTTP/2 backends (`router.proto=h2c`/`h2`), for both client paths: the
//! request made an HTTP/2 one (`:scheme`, `:authority`, `te: trailers`), tried by the core's
//! [`Attempts`] on the instance's pool of multiplexed connections, and the gRPC deadline
//! rule.
//!
//! **gRPC deadlines.** A request is gRPC when its `content-type` starts with
//! `application/grpc`. With a `grpc-timeout`, that deadline replaces
//! `proxy.response_timeout` for the whole call: the response head may take until then, and
//! at the deadline the response ends with `grpc-status: 4` (DEADLINE_EXCEEDED) while the
//! backend's stream is reset. Without one, `proxy.response_timeout` bounds the response head
//! only. Either way the gaps between a gRPC call's messages are not timed (a healthy stream
//! may be quiet for hours); a dead backend is found by the connection's PINGs
//! (`proxy.h2_backend_ping_interval`) and the call fails. Other requests keep the usual
//! rules: the head within `response_timeout`, and a body that stalls that long fails.

use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;

use super::attempts::Attempts;
use super::error::Error;
use crate::config::Config;
use crate::upstream::h2pool::Target;
use crate::upstream::{ErrorKind, H2Body, H2Lease, H2Settings, InFlight, Proto};

/// The pools' settings for `cfg`. The CA file was read when the configuration was
/// checked; if it has become unreadable since, no certificate is trusted (fail closed).
pub fn settings(cfg: &Config) -> H2Settings {
    let ca = cfg.upstream_tls.ca_file.as_deref();
    let tls = crate::tls::client_config(ca).unwrap_or_else(|e| {
        tracing::error!(error = %e, "upstream_tls.ca_file: unusable; h2 backends are not trusted");
        rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map(|b| {
                b.with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth()
            })
            .unwrap_or_else(|_| unreachable!("ring supports the default versions"))
    });
    let p = &cfg.proxy;
    H2Settings::new(
        p.h2_backend_max_streams,
        p.h2_backend_max_connections,
        p.h2_backend_ping_interval,
        tls,
    )
}

/// Whether a request with these fields is a gRPC call.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// A `grpc-timeout` value (1 to 8 digits and a unit: `H`, `M`, `S`, `m`, `u`, `n`).
pub fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A gRPC call's deadline from its `grpc-timeout`, counted from `start`.
pub fn grpc_deadline(headers: &HeaderMap, start: Instant) -> Option<Instant> {
    let t = parse_grpc_timeout(headers.get("grpc-timeout")?.as_bytes())?;
    start.checked_add(t)
}

/// Makes a request already rewritten by the field rules (hop-by-hop fields gone, `Host`
/// set) an HTTP/2 one for a `proto` backend: `:scheme` and `:authority` from the `Host`
/// (which goes), and `te: trailers`, which the router may say for itself since it relays
/// trailers (gRPC servers require it).
pub fn to_h2<B>(req: &mut Request<B>, proto: Proto) -> Result<(), Error> {
    let host = req
        .headers_mut()
        .remove(header::HOST)
        .ok_or(crate::routing::HostError::Missing)?;
    let authority = Authority::try_from(host.as_bytes())
        .map_err(|_| Error::from(crate::routing::HostError::Invalid))?;
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(match proto {
        Proto::H2 => Scheme::HTTPS,
        _ => Scheme::HTTP,
    });
    parts.authority = Some(authority);
    parts.path_and_query = req.uri().path_and_query().cloned();
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    *req.uri_mut() = Uri::from_parts(parts).map_err(|_| crate::routing::HostError::Invalid)?;
    *req.version_mut() = Version::HTTP_2;
    req.headers_mut()
        .insert(header::TE, HeaderValue::from_static("trailers"));
    Ok(())
}

/// A backend's answer with what its body must hold.
#[derive(Debug)]
pub struct Answer {
    /// The response head and body.
    pub response: Response<Incoming>,
    /// The stream slot on its connection.
    pub lease: H2Lease,
    /// In-flight accounting for the instance.
    pub in_flight: InFlight,
    /// The instance's Consul ID.
    pub instance: Box<str>,
}

/// Sends `req` by `attempts` on the instances' HTTP/2 pools: a connection with a free
/// stream, else a new one (or a shared one at the instance's most connections). A request
/// the connection did not take is tried again as the rule says (another instance, or once
/// more on a fresh connection after a pooled one broke). The response head must come by
/// `deadline`.
pub async fn send(
    settings: &H2Settings,
    attempts: &mut Attempts<'_>,
    req: Request<H2Body>,
    deadline: Instant,
) -> Result<Answer, Error> {
    let connect_timeout = attempts.rules().connect_timeout;
    let mut req = req;
    while let Some(t) = attempts.next_try_with(|inst| inst.state.h2.lease()) {
        let pool = &t.inst.state.h2;
        let target = Target {
            socket: t.inst.socket,
            host: &t.inst.address,
            port: t.inst.port,
            tls: t.inst.proto == Proto::H2,
            dns: &t.inst.state.dns,
        };
        // Opening a connection (TCP, TLS, the preface) is a large future and the rare
        // case: boxed, so every request's future (and the stream task that holds it)
        // stays small instead of carrying ~8 KB it moves around and never uses.
        let got = match t.conn {
            Some(lease) => Ok((lease, true)),
            // A fresh connection after a pooled one broke: never a shared one.
            None if attempts.fresh_connection_next() => {
                Box::pin(pool.open(target, settings, connect_timeout))
                    .await
                    .map(|l| (l, false))
            }
            None => Box::pin(pool.open_or_share(target, settings, connect_timeout)).await,
        };
        let (lease, reused) = match got {
            Ok(x) => x,
            Err(e) => {
                attempts.try_failed(Error::from(e).unsent(), false);
                continue;
            }
        };
        let in_flight = InFlight::new(t.inst.state.clone());
        let mut sender = lease.sender();
        let due = tokio::time::Instant::from_std(deadline);
        let error = match tokio::time::timeout_at(due, sender.try_send_request(req)).await {
            Ok(Ok(response)) => {
                attempts.answered(response.status().as_u16());
                return Ok(Answer {
                    response,
                    lease,
                    in_flight,
                    instance: t.inst.id.clone(),
                });
            }
            Err(_) => {
                attempts.try_failed(Error::upstream(ErrorKind::ResponseTimeout), reused);
                break;
            }
            Ok(Err(mut e)) => {
                let back = e.take_message();
                let mut error = Error::upstream(ErrorKind::Reset).because(e.into_error());
                // hyper hands the request back only when none of it was sent.
                error.unsent = back.is_some();
                match back {
                    Some(r) => {
                        req = r;
                        error
                    }
                    None => {
                        attempts.try_failed(error, reused);
                        break;
                    }
                }
            }
        };
        attempts.try_failed(error, reused);
    }
    Err(attempts.last_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(
            parse_grpc_timeout(b"100m"),
            Some(Duration::from_millis(100))
        );
        assert_eq!(parse_grpc_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_grpc_timeout(b"99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in [&b""[..], b"S", b"123456789S", b"1x", b"-1S", b"1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn requests_become_http2() {
        let mut req = Request::get("/svc/Method?x=1")
            .header("host", "grpc.app.test:8080")
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        assert!(is_grpc(req.headers()));
        to_h2(&mut req, Proto::H2c).unwrap();
        assert_eq!(
            req.uri().to_string(),
            "http://grpc.app.test:8080/svc/Method?x=1"
        );
        assert_eq!(req.version(), Version::HTTP_2);
        assert!(req.headers().get("host").is_none());
        assert_eq!(req.headers()["te"], "trailers");
        let mut tls = Request::get("/").header("host", "a").body(()).unwrap();
        to_h2(&mut tls, Proto::H2).unwrap();
        assert_eq!(tls.uri().to_string(), "https://a/");
        let mut none = Request::get("/").body(()).unwrap();
        assert!(to_h2(&mut none, Proto::H2c).is_err());
    }
}
