//! The attempts of one request on a service's instances, one rule for both protocol paths
//! (and later for auth calls): pick an instance not tried yet, take an idle connection
//! before a fresh one, count each error and each retry, decide what follows a failure, and
//! hold the one deadline every try shares. The outlier detector will read its outcomes.

use std::time::{Duration, Instant};

use crate::balance::Exclude;
use crate::routing::{Instance, Service};
use crate::upstream::{connect_tcp, BackendConn, ErrorKind, IdlePool, Pooled};

use super::error::{Error, ErrorType};

/// What to do after an attempt on a backend failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Nothing reached the backend: try another instance.
    OtherInstance,
    /// A kept-alive connection broke before any response byte and the request can be
    /// replayed: try once more on a fresh connection to the same instance.
    FreshConnection,
    /// Answer the client with the error.
    Answer,
}

/// Whether resending a request with `method` on another connection is harmless (RFC 9110
/// §9.2.2); with no body, such a request may be replayed on a fresh connection.
pub fn is_idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}

/// The settings attempts follow (`[proxy]`).
#[derive(Debug, Clone, Copy)]
pub struct AttemptRules {
    /// Instances tried after the first, at most.
    pub retries: u32,
    /// Longest wait for a connection.
    pub connect_timeout: Duration,
    /// Longest wait for the response head, all tries together; and for any body stall.
    pub response_timeout: Duration,
    /// Idle pooled connections older than this are not used.
    pub idle_timeout: Duration,
}

/// One request's attempts on `service`.
#[derive(Debug)]
pub struct Attempts<'a> {
    rules: &'a AttemptRules,
    service: &'a Service,
    key: u64,
    exclude: Exclude,
    tries: u32,
    replayable: bool,
    start: Instant,
    /// The instance of the last try.
    current: Option<&'a Instance>,
    /// What the last failure calls for (another instance before the first try).
    next: Next,
    last: Option<Error>,
}

/// One try: the instance, and an idle connection to it if one was taken.
#[derive(Debug)]
pub struct Try<'a, C> {
    /// The instance.
    pub inst: &'a Instance,
    /// A pooled connection; `None`: connect.
    pub conn: Option<C>,
}

impl<'a> Attempts<'a> {
    /// Attempts for a request routed at `start` with balancing `key`; `replayable`: it has
    /// no body and an idempotent method, so a kept-alive connection that broke may get it
    /// again.
    pub fn new(
        rules: &'a AttemptRules,
        service: &'a Service,
        key: u64,
        start: Instant,
        replayable: bool,
    ) -> Self {
        Attempts {
            rules,
            service,
            key,
            exclude: Exclude::default(),
            tries: 0,
            replayable,
            start,
            current: None,
            next: Next::OtherInstance,
            last: None,
        }
    }

    /// The next instance to try, never one tried already for this request.
    fn next_instance(&mut self) -> Option<&'a Instance> {
        let (pos, inst) = self.service.pick(self.key, self.exclude)?;
        self.exclude.add(pos);
        Some(inst)
    }

    /// Marks the start of a try; every try after the first counts as a retry.
    fn begin(&mut self) {
        if self.tries > 0 {
            self.service.stats.metrics.get().retry();
        }
        self.tries += 1;
    }

    /// Tries after the first, so far.
    pub fn retries(&self) -> u32 {
        self.tries.saturating_sub(1)
    }

    /// When the response head must have come, whatever the number of tries.
    pub fn deadline(&self) -> Instant {
        self.start + self.rules.response_timeout
    }

    /// Whether the current try is the fresh connection a broken pooled one calls for.
    pub fn fresh_connection_next(&self) -> bool {
        self.next == Next::FreshConnection
    }

    /// The rules in force.
    pub fn rules(&self) -> &AttemptRules {
        self.rules
    }

    /// The next try, or `None` when the rule says to answer with [`Attempts::last_error`]:
    /// after a fresh-connection verdict the same instance without a pooled connection;
    /// otherwise an instance never tried for this request, with an idle connection from
    /// `pool` if one is young enough. Every try after the first counts as a retry. The
    /// caller connects when `conn` is `None`, exchanges, and reports a failure with
    /// [`Attempts::try_failed`]; both protocol paths loop this way.
    pub fn next_try<C: Pooled + 'a>(
        &mut self,
        pool: impl Fn(&'a Instance) -> &'a IdlePool<C>,
    ) -> Option<Try<'a, C>> {
        let (idle_timeout, now) = (self.rules.idle_timeout, self.start);
        self.next_try_with(|inst| pool(inst).take(idle_timeout, now))
    }

    /// [`Attempts::next_try`] for connections kept elsewhere than an [`IdlePool`] (the
    /// HTTP/2 pools): `take` gives an existing connection to the instance, if any; it is
    /// not called when the rule calls for a fresh connection.
    pub fn next_try_with<C>(
        &mut self,
        take: impl FnOnce(&'a Instance) -> Option<C>,
    ) -> Option<Try<'a, C>> {
        let inst = match self.next {
            Next::Answer => return None,
            Next::FreshConnection => self.current?,
            Next::OtherInstance => {
                let inst = self.next_instance()?;
                self.current = Some(inst);
                self.begin();
                return Some(Try {
                    inst,
                    conn: take(inst),
                });
            }
        };
        self.begin();
        Some(Try { inst, conn: None })
    }

    /// Reports that a try failed with `error` (`reused`: its connection came from the
    /// pool); the rule decides what [`Attempts::next_try`] gives next.
    pub fn try_failed(&mut self, mut error: Error, reused: bool) {
        error.reused = reused;
        tracing::debug!(service = %self.service.name, instance = ?self.current.map(|i| &i.id), error = %error, reused, "attempt failed");
        self.next = self.failed(&error);
        self.last = Some(error);
    }

    /// The error to answer with once [`Attempts::next_try`] gives `None`.
    pub fn last_error(&mut self) -> Error {
        self.last
            .take()
            .unwrap_or_else(|| Error::new(ErrorType::NoHealthyInstance))
    }

    /// The retry rule: counts the error for the service and says what follows it. A
    /// kept-alive connection that broke before any response byte gets one fresh try when
    /// nothing was done or the request can be replayed; a request that did not get
    /// through whole goes to another instance, up to `retries`; anything else is answered.
    fn failed(&mut self, e: &Error) -> Next {
        let Some(kind) = e.upstream_kind() else {
            return Next::Answer;
        };
        self.service.stats.metrics.get().upstream_error(kind);
        if e.reused && kind == ErrorKind::Reset && (e.unsent || self.replayable) {
            Next::FreshConnection
        } else if e.unsent && self.tries <= self.rules.retries {
            Next::OtherInstance
        } else {
            Next::Answer
        }
    }
}

/// A new connection to `inst` for the fast path's exchanges, within `limit`.
pub async fn connect_backend(inst: &Instance, limit: Duration) -> Result<BackendConn, Error> {
    let stream = connect_tcp(
        inst.socket,
        &inst.address,
        inst.port,
        &inst.state.dns,
        limit,
    )
    .await?;
    Ok(BackendConn { stream })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::testing::{spec, table};
    use crate::routing::Health;

    const RULES: AttemptRules = AttemptRules {
        retries: 2,
        connect_timeout: Duration::from_secs(1),
        response_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(60),
    };

    #[test]
    fn the_retry_rule() {
        let t = table(vec![(
            "attempts",
            vec![
                spec("a-1", 1, Health::Passing, &[]),
                spec("a-2", 2, Health::Passing, &[]),
            ],
        )]);
        let svc = &t.services["attempts"];
        let start = Instant::now();
        let mut a = Attempts::new(&RULES, svc, 0, start, true);
        assert_eq!(a.deadline(), start + RULES.response_timeout);
        let first = a.next_instance().unwrap().id.clone();
        a.begin();
        let refused = Error::upstream(ErrorKind::ConnectRefused);
        assert_eq!(a.failed(&refused), Next::OtherInstance);
        let second = a.next_instance().unwrap().id.clone();
        assert_ne!(first, second, "a tried instance is never picked again");
        a.begin();
        assert_eq!(a.failed(&refused), Next::OtherInstance);
        assert!(a.next_instance().is_none());
        assert_eq!(a.retries(), 1, "a retry counts only when it happens");
        a.begin();
        assert_eq!(a.failed(&refused), Next::Answer, "retries = 2 used up");

        // A stale pooled connection: once more, fresh, if it can replay.
        let mut stale = Error::upstream(ErrorKind::Reset);
        stale.reused = true;
        let mut a = Attempts::new(&RULES, svc, 0, start, true);
        a.begin();
        assert_eq!(a.failed(&stale), Next::FreshConnection);
        let mut post = Attempts::new(&RULES, svc, 0, start, false);
        post.begin();
        assert_eq!(post.failed(&stale), Next::Answer);
        // A reset on a fresh connection after the request went out, or a timeout: answered.
        assert_eq!(a.failed(&Error::upstream(ErrorKind::Reset)), Next::Answer);
        assert_eq!(
            a.failed(&Error::upstream(ErrorKind::ResponseTimeout)),
            Next::Answer
        );
        // Not a backend's failure: answered, not counted.
        assert_eq!(a.failed(&Error::new(ErrorType::BadBody)), Next::Answer);
    }
}
