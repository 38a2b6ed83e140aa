//! HTTP/2 clients to HTTP/2 backends (`router.proto=h2c`/`h2`): the request, its body
//! streamed as it comes (never buffered), goes on the instance's pool ([`crate::proxy::h2up`]);
//! the response's body and trailers (gRPC's `grpc-status`) stream back.

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Either};
use hyper::body::{Body, Incoming};
use hyper::Request;

use super::body::{self, Closing, ProxyBody, UpstreamBody};
use super::{local, no_answer, refuse};
use crate::proxy::answer::{AnswerBody, LocalAnswer};
use crate::proxy::auth::Outcome;
use crate::proxy::core::{Core, LogFields, RequestId, Routed};
use crate::proxy::error::{Error, ErrorType};
use crate::proxy::h2up;
use crate::upstream::{ErrorKind, H2Body, Stall};

/// Exchanges a request already rewritten by the field rules with the service's HTTP/2
/// instances.
pub(super) async fn exchange(
    core: &Arc<Core>,
    req: Request<Incoming>,
    routed: Routed,
    request_id: RequestId,
    id_value: HeaderValue,
    (log, auth): (Option<LogFields>, Option<Outcome>),
) -> Response<ProxyBody> {
    let grpc = h2up::is_grpc(req.headers());
    let head_request = req.method() == http::Method::HEAD;
    let call_deadline = grpc
        .then(|| h2up::grpc_deadline(req.headers(), routed.start))
        .flatten();
    let rules = core.rules();
    // gRPC messages may be far apart: only other requests' bodies are timed.
    let stall = (!grpc).then_some(rules.response_timeout);
    let received = Some(Arc::default());
    // The body's frames go on as they come, trailers too: those a trailer may not carry
    // (as on the HTTP/1 path) and the fields forward auth grants are taken out of them.
    let copy: Arc<[http::HeaderName]> = routed
        .auth()
        .map_or_else(|| Arc::from([]), |s| Arc::from(&s.copy[..]));
    let mut req = req.map(|b| -> H2Body {
        Stall::limited(b, stall)
            .counting(received.clone())
            .map_frame(move |f| super::fields::clean_trailers(f, &copy))
            .boxed_unsync()
    });
    if let Err(e) = h2up::to_h2(&mut req, routed.service.proto) {
        return refuse(core, &e, &routed, &request_id, log, auth);
    }
    let replayable =
        req.body().is_end_stream() && crate::proxy::attempts::is_idempotent(req.method().as_str());
    let mut attempts = core.attempts(&routed, replayable);
    let head_deadline = call_deadline.unwrap_or_else(|| attempts.deadline());
    let answer = h2up::send(core.h2_backends(), &mut attempts, req, head_deadline).await;
    let retries = attempts.retries();
    let h2up::Answer {
        mut response,
        lease,
        in_flight,
        instance,
    } = match answer {
        Ok(a) => a,
        Err(e) if grpc => {
            tracing::debug!(service = %routed.service.name, error = %e, "no backend answer");
            let answer = grpc_answer(&e, call_deadline.is_some());
            return local(
                core,
                answer,
                Some(&routed.service),
                routed.start,
                &request_id,
                log,
                auth,
            );
        }
        Err(e) => return no_answer(core, &e, &routed, &request_id, log, auth),
    };
    super::response_fields(core, response.headers_mut(), &in_flight, id_value);
    let closing = Box::new(Closing {
        core: core.clone(),
        status: response.status().as_u16(),
        service: routed.service.clone(),
        instance,
        start: routed.start,
        upstream: routed.start.elapsed(),
        retries,
        request_id,
        log,
        auth,
        received,
    });
    let deadline = call_deadline.map(tokio::time::Instant::from_std);
    // No body may follow (RFC 9110 §6.4.1): said at once, so the head goes out with
    // END_STREAM, whatever the backend's stream state.
    let status = response.status();
    let bodiless = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    response.map(|b| {
        Either::Left(Either::Left(UpstreamBody::h2(
            (!bodiless).then_some(b),
            lease,
            in_flight,
            stall,
            deadline,
            closing,
        )))
    })
}

/// A gRPC call the router could not get an answer for, as gRPC clients expect it (see
/// [`grpc_form`]): a response timeout under the call's own deadline is DEADLINE_EXCEEDED
/// (4); anything else as its HTTP status maps (502, 504: UNAVAILABLE).
pub fn grpc_answer(e: &Error, has_deadline: bool) -> LocalAnswer {
    if e.kind == ErrorType::Upstream(ErrorKind::ResponseTimeout) && has_deadline {
        let mut a = grpc_form(LocalAnswer::text(StatusCode::OK, ""));
        a.headers.extend(body::deadline_trailers());
        return a;
    }
    grpc_form(e.answer())
}

/// A local answer to a gRPC call in gRPC form: a trailers-only response (status 200,
/// `content-type: application/grpc`, the status in the head, no body), its HTTP status
/// mapped as gRPC's HTTP-to-gRPC table does (400: INTERNAL, 401: UNAUTHENTICATED, 403:
/// PERMISSION_DENIED, 404: UNIMPLEMENTED, 429/502/503/504: UNAVAILABLE, else UNKNOWN) and
/// its text as `grpc-message`. A gRPC client reads no plain-text body.
pub fn grpc_form(answer: LocalAnswer) -> LocalAnswer {
    let code = match answer.status.as_u16() {
        200 => "0",
        400 => "13",
        401 => "16",
        403 => "7",
        404 => "12",
        429 | 502..=504 => "14",
        _ => "2",
    };
    let text = match &answer.body {
        AnswerBody::Static(t) => t.trim_end(),
        _ => "",
    };
    let mut a = LocalAnswer {
        status: StatusCode::OK,
        headers: answer.headers,
        body: AnswerBody::Bytes(bytes::Bytes::new()),
    };
    a.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    a.headers.remove(header::RETRY_AFTER);
    a.headers
        .insert("grpc-status", HeaderValue::from_static(code));
    // The router's own texts are ASCII words: spaces are the only percent-encoding.
    if let Ok(v) = HeaderValue::from_str(&text.replace(' ', "%20")) {
        if !text.is_empty() {
            a.headers.insert("grpc-message", v);
        }
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_forms() {
        let a = grpc_form(LocalAnswer::text(
            StatusCode::NOT_FOUND,
            "no service for this host\n",
        ));
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.headers["grpc-status"], "12");
        assert_eq!(
            a.headers["grpc-message"],
            "no%20service%20for%20this%20host"
        );
        assert_eq!(a.headers["content-type"], "application/grpc");
        assert_eq!(a.body_len(), Some(0));
        let e = Error::upstream(ErrorKind::ResponseTimeout);
        assert_eq!(grpc_answer(&e, true).headers["grpc-status"], "4");
        assert_eq!(grpc_answer(&e, false).headers["grpc-status"], "14");
        let down = LocalAnswer::text(StatusCode::SERVICE_UNAVAILABLE, "no healthy instance\n");
        let a = grpc_form(down);
        assert_eq!(a.headers["grpc-status"], "14");
        assert!(
            a.implied().iter().all(Option::is_none),
            "no Retry-After, no text type"
        );
    }
}
