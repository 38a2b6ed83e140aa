//! The HTTP/2 path's exchange with a backend: hyper's HTTP/1 client on pooled or fresh
//! connections, tried by the core's [`Attempts`].

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use crate::proxy::attempts::{connect_backend, Attempts};
use crate::proxy::error::Error;
use crate::routing::Instance;
use crate::upstream::{ErrorKind, InFlight, RequestBody, Sender, Stall};

/// Longest wait for a pooled connection to finish its previous exchange.
const POOLED_READY_WAIT: Duration = Duration::from_millis(100);

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
}

/// One failed exchange: the error, and the request when it came back unsent.
type Failed = (Error, Option<Request<RequestBody>>);

/// Sends `req` by `attempts`: an idle connection first, then a fresh one, another instance
/// when the rule says so. The request body is failed, and its backend connection closed,
/// if the client stalls it for `response_timeout`; its data bytes are counted into
/// `received`, if given. Every failure is counted by `attempts`.
pub async fn send(
    attempts: &mut Attempts<'_>,
    req: Request<Incoming>,
    received: Option<Arc<AtomicU64>>,
) -> Result<Answer, Error> {
    let stall = attempts.rules().response_timeout;
    let mut req = req.map(|b| Stall::new(b, stall).counting(received));
    while let Some(t) = attempts.next_try(|inst| &inst.state.idle_hyper) {
        let reused = t.conn.is_some();
        let sender = match t.conn {
            Some(s) => ready(s).await,
            None => connect(t.inst, attempts).await.map_err(|e| e.unsent()),
        };
        // Counted in flight from here, for least-load picks.
        let in_flight = InFlight::new(t.inst.state.clone());
        let result = match sender {
            Ok(sender) => exchange(sender, req, attempts).await,
            Err(e) => Err((e, Some(req))),
        };
        match result {
            Ok((response, sender)) => {
                attempts.answered(response.status().as_u16());
                return Ok(Answer {
                    response,
                    sender,
                    in_flight,
                    instance: t.inst.id.clone(),
                });
            }
            // The request is handed back when none of it was written; else no retry.
            Err((error, Some(back))) => {
                req = back;
                attempts.try_failed(error, reused);
            }
            Err((error, None)) => {
                attempts.try_failed(error, reused);
                return Err(attempts.last_error());
            }
        }
    }
    Err(attempts.last_error())
}

/// A pooled connection, once it has finished its previous exchange. It was pooled the
/// moment its last response body ended, and the connection task may not have caught up
/// yet: waiting briefly beats a new connection. One still sending a stalled upload never
/// gets ready: it counts as closed.
async fn ready(mut sender: Sender) -> Result<Sender, Error> {
    if !sender.is_ready() {
        match tokio::time::timeout(POOLED_READY_WAIT, sender.ready()).await {
            Ok(Ok(())) => {}
            _ => return Err(Error::upstream(ErrorKind::Reset).unsent()),
        }
    }
    Ok(sender)
}

async fn exchange(
    mut sender: Sender,
    req: Request<RequestBody>,
    attempts: &Attempts<'_>,
) -> Result<(Response<Incoming>, Sender), Failed> {
    let due = tokio::time::Instant::from_std(attempts.deadline());
    match tokio::time::timeout_at(due, sender.try_send_request(req)).await {
        Err(_) => Err((Error::upstream(ErrorKind::ResponseTimeout), None)),
        Ok(Ok(resp)) => Ok((resp, sender)),
        Ok(Err(mut e)) => {
            let back = e.take_message();
            let mut error = Error::upstream(ErrorKind::Reset).because(e.into_error());
            // hyper hands the request back only when none of it was written.
            error.unsent = back.is_some();
            Err((error, back))
        }
    }
}

async fn connect(inst: &Instance, attempts: &Attempts<'_>) -> Result<Sender, Error> {
    let limit = attempts.rules().connect_timeout;
    let stream = connect_backend(inst, limit).await?.stream;
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Error::upstream(ErrorKind::ConnectRefused).because(e))?;
    let peer: Option<SocketAddr> = inst.socket;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(?peer, error = %e, "backend connection closed with error");
        }
    });
    Ok(sender)
}
