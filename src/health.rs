//! `consul-router health`: a probe of a running router's `/healthz`, for Docker's
//! `HEALTHCHECK` in an image that has no curl. 200 is healthy; any other answer, a refused
//! connection or no answer in time is not.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::uri::Scheme;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The admin listener to probe, parsed from a URL such as `http://127.0.0.1:9090`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminUrl {
    /// Host name or address, without IPv6 brackets.
    host: String,
    port: u16,
    /// `host[:port]` as written, for the Host field.
    authority: String,
    /// The URL's path with `/healthz` appended.
    path: String,
}

/// `--admin` is not a URL the probe can use (exit status 2).
#[derive(Debug, thiserror::Error)]
#[error("bad admin URL {url:?}: {why}")]
pub struct BadUrl {
    url: String,
    why: &'static str,
}

/// Why the router is not healthy (exit status 1).
#[derive(Debug, thiserror::Error)]
pub enum Unhealthy {
    /// The admin listener answered something other than 200.
    #[error("{status} from {url}{}", reason_suffix(.reason))]
    Status {
        /// The answer's status.
        status: StatusCode,
        /// The probed URL.
        url: String,
        /// The first line of the answer's body (the router says why it is not ready).
        reason: String,
    },
    /// Nothing listens there.
    #[error("connection refused by {0}")]
    Refused(String),
    /// No full answer within the timeout.
    #[error("no answer from {url} within {}", humantime::format_duration(*.after))]
    Timeout {
        /// The probed URL.
        url: String,
        /// The timeout.
        after: Duration,
    },
    /// The host name did not resolve.
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        /// The host name.
        host: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Any other failure to connect or to exchange the request.
    #[error("{url}: {reason}")]
    Failed {
        /// The probed URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
}

fn reason_suffix(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(": {reason}")
    }
}

impl AdminUrl {
    /// Parses `http://host[:port][/prefix]`; the probe GETs `<prefix>/healthz`. The admin
    /// listener speaks plain HTTP only, so other schemes are refused.
    pub fn parse(url: &str) -> Result<AdminUrl, BadUrl> {
        let bad = |why| BadUrl {
            url: url.to_owned(),
            why,
        };
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        if uri.scheme() != Some(&Scheme::HTTP) {
            return Err(bad("the admin listener speaks http:// only"));
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("user information is not supported"));
        }
        if uri.query().is_some() {
            return Err(bad("a query is not supported"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("no host"));
        }
        // Read by hand: `http` takes an out-of-range port for no port at all (80).
        let port = match authority.as_str()[authority.host().len()..].strip_prefix(':') {
            None | Some("") => 80,
            Some(p) => p.parse().map_err(|_| bad("the port is not 0 to 65535"))?,
        };
        Ok(AdminUrl {
            host: host.to_owned(),
            port,
            authority: authority.as_str().to_owned(),
            path: format!("{}/healthz", uri.path().trim_end_matches('/')),
        })
    }
}

impl std::fmt::Display for AdminUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.authority, self.path)
    }
}

/// GETs `/healthz` once, all of it (resolving, connecting, the answer) within `timeout`.
pub async fn check(url: &AdminUrl, timeout: Duration) -> Result<(), Unhealthy> {
    match tokio::time::timeout(timeout, probe(url)).await {
        Ok(result) => result,
        Err(_) => Err(Unhealthy::Timeout {
            url: url.to_string(),
            after: timeout,
        }),
    }
}

async fn probe(url: &AdminUrl) -> Result<(), Unhealthy> {
    let failed = |reason: String| Unhealthy::Failed {
        url: url.to_string(),
        reason,
    };
    let stream = connect(url).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| failed(e.to_string()))?;
    tokio::spawn(conn);
    let req = Request::get(url.path.as_str())
        .header(http::header::HOST, url.authority.as_str())
        .header(http::header::USER_AGENT, "consul-router-health")
        .body(Empty::<Bytes>::new())
        .map_err(|e| failed(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let status = resp.status();
    if status == StatusCode::OK {
        return Ok(());
    }
    // The router's 503 says why in its body; a small cap keeps a stranger's page out.
    let body = Limited::new(resp.into_body(), 4096)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let reason = String::from_utf8_lossy(&body)
        .lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(120)
        .collect();
    Err(Unhealthy::Status {
        status,
        url: url.to_string(),
        reason,
    })
}

/// Connects to the first address of the host that accepts.
async fn connect(url: &AdminUrl) -> Result<TcpStream, Unhealthy> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((url.host.as_str(), url.port))
        .await
        .map_err(|source| Unhealthy::Resolve {
            host: url.host.clone(),
            source,
        })?
        .collect();
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Unhealthy::Refused(format!("{}:{}", url.host, url.port))
        }
        Some(e) => Unhealthy::Failed {
            url: url.to_string(),
            reason: e.to_string(),
        },
        None => Unhealthy::Resolve {
            host: url.host.clone(),
            source: std::io::Error::other("no address"),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_admin_urls() {
        let u = AdminUrl::parse("http://127.0.0.1:9090").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("127.0.0.1", 9090));
        assert_eq!(u.to_string(), "http://127.0.0.1:9090/healthz");
        let u = AdminUrl::parse("HTTP://[::1]:9090/").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 9090));
        assert_eq!(u.to_string(), "http://[::1]:9090/healthz");
        let u = AdminUrl::parse("http://router.internal/admin/").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("router.internal", 80));
        assert_eq!(u.path, "/admin/healthz");
        assert_eq!(u.authority, "router.internal");
    }

    #[test]
    fn refuses_what_it_cannot_probe() {
        for bad in [
            "",
            "127.0.0.1:9090",
            "https://127.0.0.1:9090",
            "ftp://h",
            "http://",
            "http://a b",
            "http://u:p@h:1",
            "http://h:1/?x=1",
            "http://h:99999",
            "/healthz",
        ] {
            assert!(AdminUrl::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
