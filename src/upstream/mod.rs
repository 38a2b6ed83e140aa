//! The backends' side, below routing: what can go wrong talking to an instance.

/// Why an exchange with a backend failed, as counted in
/// `consul_router_upstream_errors_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The instance refused the connection (or it failed before it was made).
    ConnectRefused,
    /// The connection was not made within `proxy.connect_timeout`.
    ConnectTimeout,
    /// The connection broke before or while the response came.
    Reset,
    /// No response head within `proxy.response_timeout`, or a body that stalled.
    ResponseTimeout,
    /// The response could not be parsed or framed.
    BadResponse,
}

impl ErrorKind {
    /// Every kind, in label order.
    pub const ALL: [ErrorKind; 5] = [
        ErrorKind::ConnectRefused,
        ErrorKind::ConnectTimeout,
        ErrorKind::Reset,
        ErrorKind::ResponseTimeout,
        ErrorKind::BadResponse,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::ConnectRefused => "connect_refused",
            ErrorKind::ConnectTimeout => "connect_timeout",
            ErrorKind::Reset => "reset",
            ErrorKind::ResponseTimeout => "response_timeout",
            ErrorKind::BadResponse => "bad_response",
        }
    }

    /// Whether nothing reached the backend, so the request may go to another instance.
    pub fn before_send(self) -> bool {
        matches!(self, ErrorKind::ConnectRefused | ErrorKind::ConnectTimeout)
    }
}
