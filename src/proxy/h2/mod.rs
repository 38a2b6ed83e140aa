//! The HTTP/2 path: hyper serves the connection (see `server.rs`), and [`handle`] takes each
//! request through the same core as the HTTP/1 fast path: target check, routing, request
//! ID, field rules (a `HeaderMap` writer), attempts, and `finish` when the response body
//! ends. Bodies stream both ways, never buffered.

mod backend;
pub mod body;
pub mod client;
pub mod direct;
pub mod fields;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};

use super::answer::{AnswerBody, LocalAnswer};
use super::auth::{self, Outcome};
use super::core::{ConnFacts, Core, Finished, LogFields, Protocol, Refused, RequestId, Routed};
use super::error::{Error, ErrorType};
use super::fields::PeerText;
use super::target;
use crate::routing::{HostError, Service};
use crate::upstream::ErrorKind;

pub use body::{ProxyBody, UpstreamBody};

/// Handles one request that arrived over HTTP/2 on connection `conn`.
pub async fn handle(
    core: &Arc<Core>,
    mut req: Request<Incoming>,
    conn: &ConnFacts,
) -> Response<ProxyBody> {
    let sent_id = req.headers().get(fields::X_REQUEST_ID);
    let request_id = core.request_id(conn, sent_id.map(HeaderValue::as_bytes));
    let start = Instant::now();
    let log = core.logs().then(|| log_fields(&req, conn));
    let routed = route(core, &req, conn);
    let routed = match routed {
        Ok(r) => r,
        Err(mut refused) => {
            let mut answer = refused.answer();
            if super::h2up::is_grpc(req.headers()) {
                answer = backend::grpc_form(answer);
            }
            let service = refused.service.as_deref();
            return local(core, answer, service, start, &request_id, log, None);
        }
    };
    let log = log.map(|mut l| {
        l.client = routed.client;
        l
    });
    // Made once: sent to the backend and returned to the client.
    let id_value =
        HeaderValue::from_bytes(request_id.as_bytes()).unwrap_or(HeaderValue::from_static("-"));
    if let Err(e) = prepare_request(core, &mut req, conn, &routed, &request_id, &id_value) {
        return refuse(core, &e, &routed, &request_id, log, None);
    }

    let mut auth = None;
    if let Some(spec) = routed.auth() {
        // The question is the backend's head, as the HTTP/1 path sends it.
        let mut head = Vec::with_capacity(512);
        direct::write_head(&req, &mut head);
        let decision = auth::authorize(core, &routed, spec, &head).await;
        auth = Some(decision.outcome);
        match decision.result {
            Ok(grant) => auth::amend_map(req.headers_mut(), &spec.copy, &grant),
            Err(mut refused) => {
                // The auth service's own answer goes back as it is; the router's (no
                // answer: 503) takes gRPC's form for a gRPC call, as other refusals do.
                let mut answer = refused.answer();
                if refused.error.kind != ErrorType::AuthDenied
                    && super::h2up::is_grpc(req.headers())
                {
                    answer = backend::grpc_form(answer);
                }
                let service = Some(&*routed.service);
                return local(core, answer, service, routed.start, &request_id, log, auth);
            }
        }
    }
    let copy = routed.auth().map_or(&[][..], |s| &s.copy[..]);
    fields::limit_trailers(req.headers_mut(), copy);
    if routed.service.proto.is_h2() {
        let log = (log, auth);
        return backend::exchange(core, req, routed, request_id, id_value, log).await;
    }
    if hyper::body::Body::is_end_stream(req.body()) {
        return bodiless(core, req, routed, request_id, id_value, log, auth).await;
    }
    // Only a request with a body pays for a counter of its bytes.
    let received = Some(Arc::default());
    let mut attempts = core.attempts(&routed, false);
    let answer = client::send(&mut attempts, req, received.clone()).await;
    let retries = attempts.retries();
    let service = &routed.service;
    let client::Answer {
        mut response,
        sender,
        in_flight,
        instance,
    } = match answer {
        Ok(a) => a,
        Err(e) => return no_answer(core, &e, &routed, &request_id, log, auth),
    };
    let upstream_time = routed.start.elapsed();

    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        // HTTP/2 has no HTTP/1.1 upgrades (WebSocket takes the fast path), so a 101
        // answers nothing that was asked and cannot be relayed.
        let e = Error::upstream(ErrorKind::BadResponse).because("unexpected 101");
        service
            .stats
            .metrics
            .get()
            .upstream_error(ErrorKind::BadResponse);
        return refuse(core, &e, &routed, &request_id, log, auth);
    }
    response_fields(core, response.headers_mut(), &in_flight, id_value);
    let closing = Box::new(body::Closing {
        core: core.clone(),
        status: response.status().as_u16(),
        service: routed.service.clone(),
        instance,
        start: routed.start,
        upstream: upstream_time,
        retries,
        request_id,
        log,
        received,
        auth,
    });
    let stall = core.rules().response_timeout;
    response.map(|b| {
        Either::Left(Either::Left(UpstreamBody::new(
            b,
            Some(sender),
            in_flight,
            stall,
            Some(closing),
        )))
    })
}

/// A request without a body, exchanged in this stream's task ([`direct`]).
async fn bodiless(
    core: &Arc<Core>,
    req: Request<Incoming>,
    routed: Routed,
    request_id: RequestId,
    id_value: HeaderValue,
    log: Option<LogFields>,
    auth: Option<Outcome>,
) -> Response<ProxyBody> {
    let mut head = Vec::with_capacity(512);
    direct::write_head(&req, &mut head);
    let head_request = req.method() == http::Method::HEAD;
    let replayable = super::attempts::is_idempotent(req.method().as_str());
    drop(req);
    let mut attempts = core.attempts(&routed, replayable);
    let answer = direct::send(core, &mut attempts, &head, head_request).await;
    let retries = attempts.retries();
    let direct::Answer {
        status,
        mut headers,
        body,
        instance,
    } = match answer {
        Ok(a) => a,
        Err(e) => return no_answer(core, &e, &routed, &request_id, log, auth),
    };
    headers.insert(fields::X_REQUEST_ID, unindexed(id_value));
    let closing = Box::new(body::Closing {
        core: core.clone(),
        status: status.as_u16(),
        service: routed.service.clone(),
        instance,
        start: routed.start,
        upstream: routed.start.elapsed(),
        retries,
        request_id,
        log,
        received: None,
        auth,
    });
    let mut resp = Response::new(Either::Left(Either::Right(body.closing(closing))));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// The target check and routing, as on the HTTP/1 path.
fn route(core: &Core, req: &Request<Incoming>, conn: &ConnFacts) -> Result<Routed, Refused> {
    let method = req.method().as_str();
    let path = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    // `:path` must be origin-form, or `*` for OPTIONS: the same rule as a request line.
    match target::check(method, path) {
        Ok(target::Target::Origin | target::Target::Asterisk | target::Target::Connect) => {}
        Ok(target::Target::Absolute { .. }) | Err(_) => {
            return Err(ErrorType::BadTarget.into());
        }
    }
    let host = request_host(req)?;
    let xff = req
        .headers()
        .get_all(fields::X_FORWARDED_FOR)
        .iter()
        .map(HeaderValue::as_bytes);
    core.route(conn, method, host, path.as_bytes(), xff)
}

/// The access log's copy of a request's fields.
fn log_fields(req: &Request<Incoming>, conn: &ConnFacts) -> LogFields {
    let field = |name| {
        req.headers()
            .get(name)
            .map_or(&b""[..], HeaderValue::as_bytes)
    };
    let mut log = LogFields::default();
    log.fill(
        conn,
        Protocol::Http2,
        [
            req.method().as_str().as_bytes(),
            req.uri()
                .path_and_query()
                .map_or(&b"/"[..], |pq| pq.as_str().as_bytes()),
            request_host(req).ok().flatten().unwrap_or(b""),
            field(header::REFERER),
            field(header::USER_AGENT),
        ],
    );
    log
}

/// The answer when no backend gave one.
fn no_answer(
    core: &Core,
    e: &Error,
    routed: &Routed,
    request_id: &RequestId,
    log: Option<LogFields>,
    auth: Option<Outcome>,
) -> Response<ProxyBody> {
    tracing::debug!(service = %routed.service.name, error = %e, "no backend answer");
    refuse(core, e, routed, request_id, log, auth)
}

/// The error's own answer for a routed request, closed in the core.
fn refuse(
    core: &Core,
    e: &Error,
    routed: &Routed,
    request_id: &RequestId,
    log: Option<LogFields>,
    auth: Option<Outcome>,
) -> Response<ProxyBody> {
    let (service, start) = (Some(&*routed.service), routed.start);
    local(core, e.answer(), service, start, request_id, log, auth)
}

/// A local answer on the HTTP/2 path, closed in the core like any request.
fn local(
    core: &Core,
    answer: LocalAnswer,
    service: Option<&Service>,
    start: Instant,
    request_id: &RequestId,
    log: Option<LogFields>,
    auth: Option<Outcome>,
) -> Response<ProxyBody> {
    let bytes_out = answer.body_len().unwrap_or(0) as u64;
    let resp = answer_response(answer, request_id);
    core.finish(
        &Finished {
            service,
            status: resp.status().as_u16(),
            start: Some(start),
            bytes_out,
            request_id: request_id.as_bytes(),
            auth,
            ..Finished::default()
        },
        log.as_ref(),
    );
    resp
}

/// A [`LocalAnswer`] as an HTTP/2 response.
pub fn answer_response(answer: LocalAnswer, request_id: &RequestId) -> Response<ProxyBody> {
    let implied = answer.implied();
    let body = match answer.body {
        AnswerBody::Static(s) => Either::Left(Full::new(Bytes::from_static(s.as_bytes()))),
        AnswerBody::Bytes(b) => Either::Left(Full::new(b)),
        AnswerBody::Stream(s) => Either::Right(s),
    };
    let mut resp = Response::new(Either::Right(body));
    *resp.status_mut() = answer.status;
    let h = resp.headers_mut();
    *h = answer.headers;
    for (_, name, value) in implied.into_iter().flatten() {
        h.insert(name, HeaderValue::from_static(value));
    }
    set_request_id(h, request_id);
    resp
}

/// A backend's response fields for the client: the field rules, the load header read
/// (and removed), the request ID.
fn response_fields(
    core: &Core,
    headers: &mut http::HeaderMap,
    in_flight: &crate::upstream::InFlight,
    id_value: HeaderValue,
) {
    fields::rewrite_response(headers);
    if let Some(name) = core.load_header_name() {
        if let Some(value) = headers.remove(name) {
            core.load_header(&in_flight.state().load)
                .report(value.as_bytes());
        }
    }
    headers.insert(fields::X_REQUEST_ID, unindexed(id_value));
}

/// A request ID for the client's HPACK never to index: each is unique, so indexing would
/// only fill the connection's table and push useful entries out of it.
fn unindexed(mut id: HeaderValue) -> HeaderValue {
    id.set_sensitive(true);
    id
}

/// Sets `X-Request-Id` on a response for the client.
fn set_request_id(headers: &mut http::HeaderMap, id: &RequestId) {
    if let Ok(v) = HeaderValue::from_bytes(id.as_bytes()) {
        headers.insert(fields::X_REQUEST_ID, unindexed(v));
    }
}

/// The raw host of a request: the absolute-form target's (or HTTP/2 `:authority`)
/// authority, else the single Host header.
fn request_host(req: &Request<Incoming>) -> Result<Option<&[u8]>, HostError> {
    if let Some(auth) = req.uri().authority() {
        return Ok(Some(auth.as_str().as_bytes()));
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(h), None) => Ok(Some(h.as_bytes())),
        (None, _) => Ok(None),
        (Some(_), Some(_)) => Err(HostError::Invalid),
    }
}

/// Rewrites the request for the backend: HTTP/1.1, origin-form target, Host set from the
/// authority, cookies joined, then the field rules.
fn prepare_request(
    core: &Core,
    req: &mut Request<Incoming>,
    conn: &ConnFacts,
    routed: &Routed,
    request_id: &RequestId,
    id_value: &HeaderValue,
) -> Result<(), Error> {
    if let Some(auth) = req.uri().authority() {
        let host = HeaderValue::from_str(auth.as_str()).map_err(|_| HostError::Invalid)?;
        req.headers_mut().insert(header::HOST, host);
        let pq = req.uri().path_and_query().cloned();
        let mut parts = http::uri::Parts::default();
        parts.path_and_query =
            Some(pq.unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")));
        *req.uri_mut() = Uri::from_parts(parts).map_err(|_| HostError::Invalid)?;
    }
    let from_h2 = req.version() == Version::HTTP_2;
    *req.version_mut() = Version::HTTP_11;
    let headers = req.headers_mut();
    if from_h2 {
        fields::join_cookies(headers);
    }
    let host = headers
        .get(header::HOST)
        .cloned()
        .ok_or(HostError::Missing)?;
    let client_text;
    let client = if routed.client == conn.peer_ip {
        &conn.peer_text
    } else {
        client_text = PeerText::new(routed.client);
        &client_text
    };
    let fwd = core.forwarding(conn, client, request_id);
    let v = conn.values();
    let known = [&host, &v.peer, &v.port, &v.scheme, id_value];
    fields::rewrite_request(headers, &fwd, &host, &known);
    Ok(())
}
