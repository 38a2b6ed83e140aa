//! Sending a request to a service's instances: pooled or fresh connection, timeouts, and a
//! bounded retry on another instance when nothing was sent.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use crate::balance::Exclude;
use crate::config::ProxyConfig;
use crate::routing::{Instance, Service};

use super::core::{Failed, Next};
use super::{Proxy, ProxyError};
use crate::upstream::ErrorKind;
use crate::upstream::{connect_tcp, InFlight, RequestBody, Sender, Stall};

/// Longest wait for a pooled connection to finish its previous exchange.
const POOLED_READY_WAIT: Duration = Duration::from_millis(100);

/// Connection settings toward backends.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub(crate) connect_timeout: Duration,
    pub(crate) response_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) retries: u32,
}

/// A backend's answer with what the response body needs to keep.
#[derive(Debug)]
pub struct Answer {
    /// The response as received.
    pub response: Response<Incoming>,
    /// The connection, to pool after the body.
    pub sender: Sender,
    /// In-flight accounting for the chosen instance.
    pub in_flight: InFlight,
    /// The instance's Consul ID.
    pub instance: Box<str>,
    /// Attempts after the first.
    pub retries: u32,
}

enum Attempt {
    Done(Answer),
    /// Nothing reached the backend: the request is handed back for another instance.
    Unsent(Request<RequestBody>, ProxyError),
    Failed(ProxyError),
}

impl Upstream {
    /// From the proxy settings.
    pub fn new(cfg: &ProxyConfig) -> Self {
        Upstream {
            connect_timeout: cfg.connect_timeout,
            response_timeout: cfg.response_timeout,
            idle_timeout: cfg.idle_timeout,
            retries: cfg.retries,
        }
    }

    /// Sends `req` to an instance of `svc` picked for `key`; after a failure, the core's
    /// retry rule (`Proxy::after_failure`) says whether another instance is tried. The
    /// request body is failed, and its backend connection closed, if the client stalls it
    /// for `response_timeout`. Every failure is counted for the service. The body's data
    /// bytes are counted into `received`, if given.
    pub async fn send(
        &self,
        core: &Proxy,
        svc: &Service,
        key: u64,
        req: Request<Incoming>,
        received: Option<Arc<AtomicU64>>,
    ) -> Result<Answer, ProxyError> {
        let mut req = req.map(|b| Stall::new(b, self.response_timeout).counting(received));
        let mut exclude = Exclude::default();
        let mut last = ProxyError::NoHealthyInstance;
        let mut tries = 0;
        while let Some((pos, inst)) = svc.pick(key, exclude) {
            exclude.add(pos);
            tries += 1;
            match self.attempt(inst, req).await {
                Attempt::Done(answer) => {
                    return Ok(Answer {
                        retries: tries - 1,
                        ..answer
                    })
                }
                Attempt::Failed(e) => {
                    if let Some(kind) = e.upstream_kind() {
                        svc.stats.metrics.get().upstream_error(kind);
                    }
                    return Err(e);
                }
                Attempt::Unsent(r, e) => {
                    tracing::debug!(service = %svc.name, instance = %inst.id, error = %e, "attempt failed before sending");
                    let failed = Failed {
                        kind: e.upstream_kind().unwrap_or(ErrorKind::Reset),
                        reused: false,
                        unsent: true,
                        replayable: false,
                        tries,
                    };
                    req = r;
                    last = e;
                    if core.after_failure(svc, failed) != Next::OtherInstance {
                        break;
                    }
                }
            }
        }
        Err(last)
    }

    async fn attempt(&self, inst: &Instance, req: Request<RequestBody>) -> Attempt {
        let in_flight = InFlight::new(inst.state.clone());
        let mut req = req;
        // Idle connections first; one that died while idle hands the request back.
        while let Some(mut sender) = inst
            .state
            .idle_hyper
            .take(self.idle_timeout, std::time::Instant::now())
        {
            // Pooled the moment its last response body ended; the connection task may not
            // have caught up yet, and waiting briefly beats a new connection. One still
            // sending a stalled upload never gets ready: give up on it.
            if !sender.is_ready() {
                match tokio::time::timeout(POOLED_READY_WAIT, sender.ready()).await {
                    Ok(Ok(())) => {}
                    _ => continue,
                }
            }
            match self.exchange(sender, req).await {
                Ok((response, sender)) => {
                    return Attempt::Done(Answer {
                        response,
                        sender,
                        in_flight,
                        instance: inst.id.clone(),
                        retries: 0,
                    })
                }
                Err(Attempt::Unsent(r, _)) => req = r,
                Err(other) => return other,
            }
        }
        let sender = match self.connect(inst).await {
            Ok(s) => s,
            Err(e) => return Attempt::Unsent(req, e),
        };
        match self.exchange(sender, req).await {
            Ok((response, sender)) => Attempt::Done(Answer {
                response,
                sender,
                in_flight,
                instance: inst.id.clone(),
                retries: 0,
            }),
            Err(a) => a,
        }
    }

    async fn exchange(
        &self,
        mut sender: Sender,
        req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Sender), Attempt> {
        match tokio::time::timeout(self.response_timeout, sender.try_send_request(req)).await {
            Err(_) => Err(Attempt::Failed(ProxyError::ResponseTimeout)),
            Ok(Ok(resp)) => Ok((resp, sender)),
            Ok(Err(mut e)) => match e.take_message() {
                Some(req) => Err(Attempt::Unsent(
                    req,
                    ProxyError::Upstream(e.into_error().to_string()),
                )),
                None => Err(Attempt::Failed(ProxyError::Upstream(
                    e.into_error().to_string(),
                ))),
            },
        }
    }

    async fn connect(&self, inst: &Instance) -> Result<Sender, ProxyError> {
        let stream =
            connect_tcp(inst.socket, &inst.address, inst.port, self.connect_timeout).await?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ProxyError::Connect(e.to_string()))?;
        let peer: Option<SocketAddr> = inst.socket;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(?peer, error = %e, "backend connection closed with error");
            }
        });
        Ok(sender)
    }
}
