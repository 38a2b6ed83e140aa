//! Relaying one exchange's bodies: the request body from client to backend, and the
//! response (head, 1xx, body) from backend to client, each checked against its framing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::framing::{Framing, FramingError};
use super::head::slots;
use super::response::{parse_response, ClientHead};
use super::timer::Timer;
use super::{Exchange, BACKEND_BUF, BODY_BUF};
use crate::proxy::core::LoadHeader;
use crate::proxy::error::{Error, ErrorType};
use crate::upstream::ErrorKind;

/// Writes `a` then `b` with vectored writes: one system call for both in the usual case,
/// and no copy of `b` into `a`'s buffer.
pub(super) async fn write_pair<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut a: &[u8],
    mut b: &[u8],
) -> std::io::Result<()> {
    if b.is_empty() {
        return w.write_all(a).await;
    }
    while !a.is_empty() {
        let n = w
            .write_vectored(&[std::io::IoSlice::new(a), std::io::IoSlice::new(b)])
            .await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        if n < a.len() {
            a = &a[n..];
        } else {
            b = &b[n - a.len()..];
            a = &[];
        }
    }
    w.write_all(b).await
}

/// A relay step's result: an I/O error or a timeout both cut the exchange off.
pub(super) fn timed<T>(r: Option<std::io::Result<T>>) -> Result<T, Error> {
    match r {
        Some(Ok(v)) => Ok(v),
        _ => Err(aborted()),
    }
}

/// The exchange broke off where no answer can be given any more.
fn aborted() -> Error {
    Error::new(ErrorType::Aborted)
}

/// What a response got to before it ended or broke: its status once its head went to the
/// client, and the time from routing to its head.
#[derive(Debug, Default)]
pub(super) struct Tally {
    pub(super) status: u16,
    pub(super) upstream: Option<Duration>,
    /// Response body bytes written to the client.
    pub(super) bytes_out: u64,
}

/// A relayed response.
pub(super) struct Relayed {
    pub(super) keep_client: bool,
    pub(super) end: End,
}

pub(super) enum End {
    /// The body ended; whether the backend connection can be reused.
    Complete { backend_reusable: bool },
    /// A 101 was relayed; these backend bytes followed it.
    Upgraded(Vec<u8>),
}

/// Streams the rest of a request body from the client to the backend.
pub(super) async fn upload<R, W>(
    client: &mut R,
    cbuf: &mut Vec<u8>,
    cpos: &mut usize,
    mut body: Framing,
    backend: &mut W,
    stall: Duration,
    relayed: &mut u64,
) -> Result<(), UploadError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    while !body.is_done() {
        if *cpos == cbuf.len() {
            cbuf.clear();
            *cpos = 0;
        }
        if cbuf.capacity() - cbuf.len() < 1024 {
            cbuf.reserve(BODY_BUF);
        }
        // The response side holds the connection's timer: these use their own.
        let read = tokio::time::timeout(stall, client.read_buf(cbuf));
        if read.await.map_err(|_| UploadError::Stalled)?? == 0 {
            return Err(UploadError::Eof);
        }
        let avail = &cbuf[*cpos..];
        let n = body.advance(avail)?;
        tokio::time::timeout(stall, backend.write_all(&avail[..n]))
            .await
            .map_err(|_| UploadError::Stalled)??;
        *cpos += n;
        *relayed += n as u64;
    }
    Ok(())
}

/// Why a request body could not be relayed.
#[derive(Debug, thiserror::Error)]
pub(super) enum UploadError {
    #[error("client closed mid-body")]
    Eof,
    #[error("no progress within the timeout")]
    Stalled,
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Framing(#[from] FramingError),
}

/// Reads the backend's response head (relaying any 1xx), writes the client's head and
/// streams the body through.
#[allow(clippy::too_many_arguments)]
pub(super) async fn respond<C, B>(
    client: &mut C,
    backend: &mut B,
    bbuf: &mut Vec<u8>,
    wbuf: &mut Vec<u8>,
    timer: &mut Timer,
    timeout: Duration,
    ex: &Exchange,
    closing: bool,
    sent: &AtomicBool,
    tally: &mut Tally,
    load: LoadHeader<'_>,
) -> Result<Relayed, Error>
where
    C: AsyncWrite + Unpin,
    B: AsyncRead + Unpin,
{
    bbuf.clear();
    if bbuf.capacity() < BACKEND_BUF {
        bbuf.reserve(BACKEND_BUF);
    }
    let deadline = Instant::from_std(ex.routed.start) + timeout;
    let mut received = false;
    loop {
        // Parse what we have; read more until a head is complete.
        let parsed = {
            let mut slots = slots();
            match parse_response(bbuf, &mut slots, ex.head_request) {
                Ok(Some(h)) => {
                    let interim = (100..200).contains(&h.status) && h.status != 101;
                    // HTTP/1.0 clients cannot take chunked (RFC 9112 §7.1): they get the
                    // payload delimited by close, as nginx sends it.
                    let dechunk = ex.http10 && h.body.is_chunked();
                    let close =
                        !ex.keep_alive || closing || h.body == Framing::UntilClose || dechunk;
                    wbuf.clear();
                    let how = ClientHead {
                        close: close && !interim,
                        keep_alive_10: ex.http10 && !close,
                        dechunk,
                        request_id: ex.request_id.as_bytes(),
                        load_header: load.name,
                    };
                    if let Some(value) = h.write_client(wbuf, &how) {
                        load.report(value);
                    }
                    Some((
                        h.len,
                        h.status,
                        h.body,
                        h.keep_alive,
                        interim,
                        close,
                        dechunk,
                    ))
                }
                Ok(None) => None,
                Err(e) => {
                    tracing::debug!(error = %e, "bad response head from backend");
                    return Err(Error::upstream(ErrorKind::BadResponse).because(e));
                }
            }
        };
        let Some((len, status, mut body, backend_keep, interim, close, dechunk)) = parsed else {
            if bbuf.capacity() - bbuf.len() < 1024 {
                bbuf.reserve(BACKEND_BUF);
            }
            let read = timer.before(deadline, backend.read_buf(bbuf)).await;
            // A connection that breaks before any response byte is a reset (a kept-alive
            // one may get a replay); one that breaks mid-head sent a bad response.
            let kind = if received {
                ErrorKind::BadResponse
            } else {
                ErrorKind::Reset
            };
            match read {
                None => return Err(Error::upstream(ErrorKind::ResponseTimeout)),
                Some(Ok(0)) => {
                    return Err(Error::upstream(kind).because("connection closed before response"))
                }
                Some(Err(e)) => return Err(Error::upstream(kind).because(e)),
                Some(Ok(_)) => received = true,
            }
            continue;
        };
        if interim {
            // 100 Continue and friends go to the client as they are, except to HTTP/1.0
            // clients, which must never get one (RFC 9110 §15.2); the real answer follows.
            if !ex.http10 {
                sent.store(true, Ordering::Relaxed);
                timed(timer.within(timeout, client.write_all(wbuf)).await)?;
            }
            bbuf.drain(..len);
            continue;
        }
        tally.upstream = Some(ex.routed.start.elapsed());
        if status == 101 {
            if !ex.upgrade {
                return Err(Error::upstream(ErrorKind::BadResponse).because("unexpected 101"));
            }
            sent.store(true, Ordering::Relaxed);
            tally.status = status;
            timed(timer.within(timeout, client.write_all(wbuf)).await)?;
            return Ok(Relayed {
                keep_client: false,
                end: End::Upgraded(bbuf[len..].to_vec()),
            });
        }
        // Head plus the body bytes that came with it, in one vectored write: the body goes
        // straight from the read buffer, never copied. A body we cannot follow is never
        // relayed: before the head went out that is a 502, after it a cut.
        let rest = &bbuf[len..];
        let head_len = wbuf.len();
        let n = if dechunk {
            body.advance_payload(rest, wbuf)
        } else {
            body.advance(rest)
        }
        .map_err(|e| Error::upstream(ErrorKind::BadResponse).because(e))?;
        let mut leftover = rest.len() > n;
        let first_body: &[u8] = if dechunk { &[] } else { &rest[..n] };
        tally.bytes_out = (wbuf.len() - head_len + first_body.len()) as u64;
        // From here each read and write may stall at most `timeout` (as nginx's
        // proxy_read_timeout and send_timeout); a stalled body is cut off.
        sent.store(true, Ordering::Relaxed);
        tally.status = status;
        timed(
            timer
                .within(timeout, write_pair(client, wbuf, first_body))
                .await,
        )?;
        while !body.is_done() {
            bbuf.clear();
            if bbuf.capacity() < BODY_BUF {
                // A body larger than what came with the head: read it in bigger pieces.
                bbuf.reserve(BODY_BUF);
            }
            let n = match timer.within(timeout, backend.read_buf(bbuf)).await {
                Some(Ok(0)) if body == Framing::UntilClose => break,
                Some(Ok(0)) | Some(Err(_)) | None => return Err(aborted()),
                Some(Ok(n)) => n,
            };
            let out = if dechunk {
                wbuf.clear();
                let used = body
                    .advance_payload(&bbuf[..n], wbuf)
                    .map_err(|_| aborted())?;
                leftover |= used < n;
                &wbuf[..]
            } else {
                let used = body.advance(&bbuf[..n]).map_err(|_| aborted())?;
                leftover |= used < n;
                &bbuf[..used]
            };
            timed(timer.within(timeout, client.write_all(out)).await)?;
            tally.bytes_out += out.len() as u64;
        }
        return Ok(Relayed {
            keep_client: !close,
            end: End::Complete {
                backend_reusable: backend_keep && !leftover,
            },
        });
    }
}
