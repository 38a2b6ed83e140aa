//! The attempts of one request on a service's instances, one rule for both protocol paths
//! and auth calls: pick an instance not tried yet (not ejected, ramping ones by their
//! share), take an idle connection before a fresh one, count each error and each retry,
//! decide what follows a failure (within the service's retry budget), hold the one
//! deadline every try shares, and feed each try's outcome to the instance's outlier state.

use std::time::{Duration, Instant};

use crate::balance::{Exclude, Strategy};
use crate::routing::{Instance, Service};
use crate::upstream::{
    connect_tcp, BackendConn, BudgetRules, ErrorKind, IdlePool, OutlierRules, Pooled,
};

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
    /// When failures eject an instance, and the slow-start ramp.
    pub outlier: OutlierRules,
    /// What retries may add to a service's requests.
    pub budget: BudgetRules,
}

/// Picks after which an instance is taken even if ejected or ramping: every candidate
/// was one (or the rest were tried).
const MAX_SKIPS: usize = 8;

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
    /// `start` on the outlier clock (ms since the routing state's epoch).
    now: u64,
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
            now: service.stats.millis(start),
            current: None,
            next: Next::OtherInstance,
            last: None,
        }
    }

    /// The next instance to try, never one tried already for this request. An ejected
    /// instance is passed over, and one in its slow-start ramp is kept with the chance of
    /// its ramp (random and least-load only: a hash key stays put); the next pick skips
    /// it. When every pick is passed over, the first passed over only for its ramp is
    /// taken, else the first ejected one: ejection is a guess, and
    /// `max_ejection_percent` keeps it from covering a whole service.
    fn next_instance(&mut self) -> Option<&'a Instance> {
        let ramps = self.rules.outlier.slow_start_ms > 0
            && matches!(
                self.service.strategy(),
                Strategy::Random | Strategy::LeastLoad
            );
        let mut skip = self.exclude;
        // The first pick passed over only for its ramp, and the first passed over at all:
        // a live one is taken before an ejected one.
        let (mut first_live, mut first_any) = (None, None);
        for _ in 0..MAX_SKIPS {
            let Some((pos, inst)) = self.service.pick(self.key, skip) else {
                break;
            };
            let o = &inst.state.outlier;
            let ejected = o.is_ejected(self.now);
            let skipped = ejected
                || (ramps && fastrand::f64() >= o.ramp(self.now, self.rules.outlier.slow_start_ms));
            if !skipped {
                self.exclude.add(pos);
                return Some(inst);
            }
            if !ejected {
                first_live.get_or_insert((pos, inst));
            }
            first_any.get_or_insert((pos, inst));
            skip.add(pos);
        }
        let (pos, inst) = first_live.or(first_any)?;
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
    /// pool); the rule decides what [`Attempts::next_try`] gives next. A backend's failure
    /// counts against the instance tried, except a pooled connection the backend had
    /// closed (a stale keep-alive is not the instance's fault).
    pub fn try_failed(&mut self, mut error: Error, reused: bool) {
        error.reused = reused;
        tracing::debug!(service = %self.service.name, instance = ?self.current.map(|i| &i.id), error = %error, reused, "attempt failed");
        let stale = reused && error.upstream_kind() == Some(ErrorKind::Reset);
        if error.upstream_kind().is_some() && !stale {
            self.instance_failed();
        }
        self.next = self.failed(&error);
        self.last = Some(error);
    }

    /// Reports the status of the response the current try got: a status of the service's
    /// `router.outlier-5xx=` set counts against the instance, any other ends its failure run.
    pub fn answered(&mut self, status: u16) {
        if self.service.outlier_5xx.contains(status) {
            self.instance_failed();
        } else if let Some(inst) = self.current {
            inst.state.outlier.success();
        }
    }

    /// One more failure for the current instance; at the threshold it is ejected, if the
    /// service keeps `max_ejection_percent` of its routable instances (the clock is read
    /// only then), counted and ejected by one request of the service at a time.
    fn instance_failed(&mut self) {
        let Some(inst) = self.current else {
            return;
        };
        let (outlier, rules) = (&inst.state.outlier, &self.rules.outlier);
        // The request's start on the outlier clock: an ejection made while it was in
        // flight ends after it, so its failure is not counted either.
        if !outlier.failure(self.now, rules) {
            return;
        }
        let now = self.service.stats.millis(Instant::now());
        let service = self.service;
        let ejected = service.stats.ejecting(|| {
            if !rules.may_eject(service.ejected(now), service.routable) {
                return None;
            }
            outlier.eject(now, rules)
        });
        if let Some(until) = ejected {
            tracing::info!(
                service = %self.service.name, instance = %inst.id,
                seconds = until.saturating_sub(now) as f64 / 1000.0,
                ejections = outlier.ejections(),
                "instance ejected after consecutive failures"
            );
        }
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
    /// through whole goes to another instance, up to `retries` and while one not tried
    /// remains (only then is the budget asked); anything else is answered.
    fn failed(&mut self, e: &Error) -> Next {
        let Some(kind) = e.upstream_kind() else {
            return Next::Answer;
        };
        let metrics = self.service.stats.metrics.get();
        metrics.upstream_error(kind);
        if e.reused && kind == ErrorKind::Reset && (e.unsent || self.replayable) {
            Next::FreshConnection
        } else if e.unsent
            && self.tries <= self.rules.retries
            && self.exclude.len() < self.service.routable
        {
            // The budget refills from the service's finished requests (the fresh
            // connection after a stale pooled one is not counted: the request never
            // reached the application).
            let requests: u64 = metrics.requests().iter().sum();
            let now = self.service.stats.millis(Instant::now());
            let stats = &self.service.stats;
            if stats
                .retry_budget
                .withdraw(requests, now, &self.rules.budget)
            {
                Next::OtherInstance
            } else {
                metrics.retry_budget_exhausted();
                Next::Answer
            }
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
        outlier: OutlierRules {
            consecutive_failures: 2,
            base_ms: 60_000,
            max_ms: 60_000,
            max_ejection_percent: 50,
            slow_start_ms: 0,
        },
        budget: BudgetRules {
            percent: 20,
            min_per_second: 10,
        },
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
        assert_eq!(a.failed(&refused), Next::Answer, "no instance left to try");
        assert!(a.next_instance().is_none());
        assert_eq!(a.retries(), 1, "a retry counts only when it happens");
        let mut a = Attempts::new(&RULES, svc, 0, start, true);
        for _ in 0..3 {
            a.begin();
        }
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

    fn four(name: &str) -> crate::routing::RoutingTable {
        let specs = (1..=4)
            .map(|i| spec(&format!("{name}-{i}"), i, Health::Passing, &[]))
            .collect();
        table(vec![(name, specs)])
    }

    /// With two instances ejected and two ramping, a pick that passes over everything
    /// takes a ramping one, never an ejected one.
    #[test]
    fn the_fallback_pick_prefers_a_live_instance() {
        let t = four("fallback");
        let svc = &t.services["fallback"];
        let rules = AttemptRules {
            outlier: OutlierRules {
                slow_start_ms: 60_000,
                ..RULES.outlier
            },
            ..RULES
        };
        let start = Instant::now();
        let now = svc.stats.millis(start);
        let inst = svc.routable();
        for i in &inst[..2] {
            assert!(i.state.outlier.eject(now, &rules.outlier).is_some());
        }
        for i in &inst[2..] {
            i.state.outlier.set_routable(false, now, false);
            i.state.outlier.set_routable(true, now, false);
        }
        for _ in 0..1_000 {
            let mut a = Attempts::new(&rules, svc, 0, start, true);
            let got = a.next_instance().unwrap();
            assert!(!got.state.outlier.is_ejected(now), "picked {}", got.id);
        }
    }

    /// Requests failing different instances at once eject no more than
    /// `max_ejection_percent` (half of 4) between them: one request of a service counts
    /// and ejects at a time, and a failure at the threshold while another ejects leaves
    /// the ejection to the instance's next failure.
    #[test]
    fn concurrent_ejections_keep_the_share() {
        let t = four("busy");
        let svc = &t.services["busy"];
        let start = Instant::now();
        let mut a = Attempts::new(&RULES, svc, 0, start, true);
        a.current = Some(&svc.routable()[0]);
        a.answered(502);
        svc.stats.ejecting(|| {
            a.answered(502);
            None::<()>
        });
        assert_eq!(svc.ejected(svc.stats.millis(Instant::now())), 0);
        a.answered(502);
        assert_eq!(svc.ejected(svc.stats.millis(Instant::now())), 1);

        for _ in 0..100 {
            let t = four("race");
            let svc = &t.services["race"];
            let start = Instant::now();
            let barrier = std::sync::Barrier::new(4);
            std::thread::scope(|s| {
                for inst in svc.routable() {
                    let barrier = &barrier;
                    s.spawn(move || {
                        let mut a = Attempts::new(&RULES, svc, 0, start, true);
                        a.current = Some(inst);
                        a.answered(502);
                        barrier.wait();
                        a.answered(502);
                    });
                }
            });
            let now = svc.stats.millis(Instant::now());
            assert!(svc.ejected(now) <= 2, "{} of 4 ejected", svc.ejected(now));
        }
    }

    /// A service of one instance has nothing to retry on: its failures take nothing from
    /// the retry budget and count no exhausted budget.
    #[test]
    fn no_instance_left_spends_no_budget() {
        let t = table(vec![("single", vec![spec("s-1", 1, Health::Passing, &[])])]);
        let svc = &t.services["single"];
        let start = Instant::now();
        for _ in 0..150 {
            let mut a = Attempts::new(&RULES, svc, 0, start, true);
            assert!(a.next_try_with(|_| None::<()>).is_some());
            a.try_failed(Error::upstream(ErrorKind::ConnectRefused).unsent(), false);
            assert!(a.next_try_with(|_| None::<()>).is_none());
        }
        let now = svc.stats.millis(start);
        let left = (0..200)
            .take_while(|_| svc.stats.retry_budget.withdraw(0, now, &RULES.budget))
            .count();
        assert_eq!(left, 100, "the bucket is still full");
    }

    /// Failures eject an instance that picks then pass over, never beyond
    /// `max_ejection_percent`; a success ends a failure run; the budget stops retries.
    #[test]
    fn outcomes_feed_the_outlier_state_and_the_budget() {
        let specs = (1..=4)
            .map(|i| spec(&format!("o-{i}"), i, Health::Passing, &[]))
            .collect();
        let t = table(vec![("outliers", specs)]);
        let svc = &t.services["outliers"];
        let start = Instant::now();
        let fail_twice = |id: &str| {
            for _ in 0..2 {
                let mut a = Attempts::new(&RULES, svc, 0, start, true);
                a.current = svc.instances.iter().find(|i| &*i.id == id);
                a.answered(502);
            }
        };
        // A success between two failures: no ejection.
        let mut a = Attempts::new(&RULES, svc, 0, start, true);
        a.current = Some(&svc.instances[0]);
        a.answered(502);
        a.answered(200);
        a.answered(503);
        assert_eq!(svc.ejected(u64::MAX / 2), 0);
        fail_twice("o-1");
        fail_twice("o-2");
        fail_twice("o-3");
        let now = svc.stats.millis(Instant::now());
        assert_eq!(svc.ejected(now), 2, "half of 4 at most");
        let ejected: Vec<&str> = svc
            .routable()
            .iter()
            .filter(|i| i.state.outlier.is_ejected(now))
            .map(|i| &*i.id)
            .collect();
        assert_eq!(ejected, ["o-1", "o-2"]);
        for _ in 0..200 {
            let mut a = Attempts::new(&RULES, svc, 0, start, true);
            let id = &a.next_instance().unwrap().id;
            assert!(!ejected.contains(&&**id), "picked {id}");
        }
        // Tried o-3 and o-4: the rest are ejected, taken all the same.
        let mut a = Attempts::new(&RULES, svc, 0, start, true);
        let mut seen: Vec<Box<str>> = (0..4)
            .map(|_| a.next_instance().unwrap().id.clone())
            .collect();
        seen.sort();
        assert_eq!(seen.len(), 4);
        assert!(a.next_instance().is_none());

        // The budget: refused connections on every retry of every request; the full
        // bucket's hundred retries (ten seconds of the floor), then none (no request has
        // finished to add any).
        let refused = Error::upstream(ErrorKind::ConnectRefused).unsent();
        let mut allowed = 0;
        for _ in 0..150 {
            let mut a = Attempts::new(&RULES, svc, 0, start, true);
            a.begin();
            if a.failed(&refused) == Next::OtherInstance {
                allowed += 1;
            }
        }
        assert!((100..=102).contains(&allowed), "{allowed}");
    }
}
