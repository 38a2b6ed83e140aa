//! The request path's one error type, in the spirit of pingora-error: what went wrong (a
//! kind, which decides the client's answer and the metric label), what the backend saw
//! of the request (which decides whether it may be retried, and how), and a source for the
//! debug log. Both protocol paths and [`super::attempts::Attempts`] use it.

use http::StatusCode;

use crate::routing::HostError;
use crate::upstream::{ConnectError, ErrorKind};

use super::answer::LocalAnswer;

/// What went wrong with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorType {
    /// No Host (nor authority).
    MissingHost,
    /// A Host that is not a valid host name.
    InvalidHost,
    /// A request target that is invalid, or invalid for its method.
    BadTarget,
    /// No service for this host.
    UnknownHost,
    /// CONNECT tunnels are not offered.
    ConnectMethod,
    /// A plain request to a host served on TLS (`tls.redirect_http`).
    RedirectHttps,
    /// The first routing table has not been built yet.
    NotReady,
    /// The service is known but no instance may take traffic.
    NoHealthyInstance,
    /// The request body's framing is broken.
    BadBody,
    /// The client's address is not on the service's allow-list (`router.allow=`).
    Forbidden,
    /// The auth service refused: its own answer goes to the client.
    AuthDenied,
    /// The service's auth service gave no answer (down, slow, no instance): the request
    /// never passes.
    AuthUnavailable,
    /// A backend failed the exchange.
    Upstream(ErrorKind),
    /// The exchange broke off after the answer began, or the client went away or broke
    /// its side: nothing more can be sent, and the connection closes.
    Aborted,
}

impl ErrorType {
    /// The status and short body the client gets.
    pub fn answer(self) -> (StatusCode, &'static str) {
        match self {
            ErrorType::MissingHost => (StatusCode::BAD_REQUEST, "missing Host header\n"),
            ErrorType::InvalidHost => (StatusCode::BAD_REQUEST, "invalid Host header\n"),
            ErrorType::BadTarget => (StatusCode::BAD_REQUEST, "invalid request target\n"),
            ErrorType::UnknownHost => (StatusCode::NOT_FOUND, "no service for this host\n"),
            ErrorType::ConnectMethod => {
                (StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not supported\n")
            }
            ErrorType::RedirectHttps => (StatusCode::PERMANENT_REDIRECT, "redirecting to https\n"),
            ErrorType::NotReady => (
                StatusCode::SERVICE_UNAVAILABLE,
                "routing table not loaded yet\n",
            ),
            ErrorType::NoHealthyInstance => {
                (StatusCode::SERVICE_UNAVAILABLE, "no healthy instance\n")
            }
            ErrorType::BadBody => (StatusCode::BAD_REQUEST, "malformed request body\n"),
            ErrorType::Forbidden => (StatusCode::FORBIDDEN, "forbidden\n"),
            // Never sent: the auth service's answer is.
            ErrorType::AuthDenied => (StatusCode::FORBIDDEN, "forbidden\n"),
            ErrorType::AuthUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "authorization service unavailable\n",
            ),
            ErrorType::Upstream(ErrorKind::ResponseTimeout) => {
                (StatusCode::GATEWAY_TIMEOUT, "gateway timeout\n")
            }
            ErrorType::Upstream(_) => (StatusCode::BAD_GATEWAY, "bad gateway\n"),
            // Never sent; the access log says 499 (as nginx) or the status that went out.
            ErrorType::Aborted => (StatusCode::BAD_REQUEST, "aborted\n"),
        }
    }

    /// Whether the message itself is malformed, so the connection closes after the answer.
    pub fn is_malformed(self) -> bool {
        matches!(
            self,
            ErrorType::MissingHost
                | ErrorType::InvalidHost
                | ErrorType::BadTarget
                | ErrorType::BadBody
                | ErrorType::ConnectMethod
        )
    }
}

/// An error on the request path.
#[derive(Debug)]
pub struct Error {
    /// What went wrong.
    pub kind: ErrorType,
    /// The request did not get through whole, so no backend acted on it: it may go to
    /// another instance.
    pub unsent: bool,
    /// The connection came from the idle pool: a break before any response byte is likely
    /// the backend closing it as we took it, worth one replay on a fresh connection.
    pub reused: bool,
    /// What the error came from, for the debug log.
    source: Option<Box<str>>,
}

impl Error {
    /// An error of `kind`.
    pub fn new(kind: ErrorType) -> Self {
        Error {
            kind,
            unsent: false,
            reused: false,
            source: None,
        }
    }

    /// A backend failure of `kind`.
    pub fn upstream(kind: ErrorKind) -> Self {
        Error {
            unsent: kind.before_send(),
            ..Error::new(ErrorType::Upstream(kind))
        }
    }

    /// Adds what the error came from.
    pub fn because(mut self, source: impl std::fmt::Display) -> Self {
        self.source = Some(source.to_string().into_boxed_str());
        self
    }

    /// Marks the request as not (wholly) sent.
    pub fn unsent(mut self) -> Self {
        self.unsent = true;
        self
    }

    /// The backend failure kind, if this is one (the metric label).
    pub fn upstream_kind(&self) -> Option<ErrorKind> {
        match self.kind {
            ErrorType::Upstream(k) => Some(k),
            _ => None,
        }
    }

    /// The local answer the client gets.
    pub fn answer(&self) -> LocalAnswer {
        let (status, text) = self.kind.answer();
        LocalAnswer::text(status, text)
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (_, text) = self.kind.answer();
        f.write_str(text.trim_end())?;
        if let ErrorType::Upstream(k) = self.kind {
            write!(f, " ({})", k.as_str())?;
        }
        if let Some(s) = &self.source {
            write!(f, ": {s}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

impl From<ErrorType> for Error {
    fn from(kind: ErrorType) -> Self {
        Error::new(kind)
    }
}

impl From<HostError> for Error {
    fn from(e: HostError) -> Self {
        Error::new(match e {
            HostError::Missing => ErrorType::MissingHost,
            HostError::Invalid => ErrorType::InvalidHost,
        })
    }
}

impl From<ConnectError> for Error {
    fn from(e: ConnectError) -> Self {
        match e {
            ConnectError::Failed(e) => Error::upstream(ErrorKind::ConnectRefused).because(e),
            ConnectError::Timeout => Error::upstream(ErrorKind::ConnectTimeout),
            ConnectError::Tls(e) => Error::upstream(ErrorKind::Tls).because(e),
            ConnectError::Handshake(e) => Error::upstream(ErrorKind::ConnectRefused).because(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_answer_and_say_what_happened() {
        let e = Error::upstream(ErrorKind::ConnectRefused).because("refused");
        assert!(e.unsent);
        assert_eq!(e.answer().status, StatusCode::BAD_GATEWAY);
        assert_eq!(e.to_string(), "bad gateway (connect_refused): refused");
        let t = Error::upstream(ErrorKind::ResponseTimeout);
        assert!(!t.unsent);
        assert_eq!(t.answer().status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            Error::from(HostError::Missing).answer().status,
            StatusCode::BAD_REQUEST
        );
        assert!(ErrorType::BadTarget.is_malformed());
        assert!(!ErrorType::UnknownHost.is_malformed());
    }
}
