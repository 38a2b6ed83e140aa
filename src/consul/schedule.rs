//! Discovery's timing decisions, without I/O: when a blocking query may start and with which
//! index ([`Poll`], [`CatalogPoll`]), and when a table is published ([`Rebuilds`]).
//!
//! Every decision takes the caller's `now`, so the loops stay thin and the rules are tested
//! with tokio's paused clock.

use std::time::Duration;

use tokio::time::Instant;

use super::supervise::Backoff;

/// Least time between two queries of one loop, so a hot key cannot spin a watcher.
pub(crate) const MIN_QUERY_GAP: Duration = Duration::from_millis(50);
/// Longest wait for every service's first read before the table goes live anyway.
pub(crate) const READY_DEADLINE: Duration = Duration::from_secs(10);
/// Longest pause of the catalog loop after failures: it is one cheap request, and the router
/// that started with Consul down goes live within this of Consul's first answer.
pub(crate) const CATALOG_MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Consul's rules for the next blocking index: reset to 0 when it goes backwards (a new
/// leader or a restored snapshot), and never block on 0.
pub(crate) fn next_index(prev: u64, got: u64) -> u64 {
    let got = got.max(1);
    if got < prev {
        0
    } else {
        got
    }
}

/// One blocking-query loop: its index, its pacing and its backoff.
#[derive(Debug, Default)]
pub(crate) struct Poll {
    index: u64,
    last_start: Option<Instant>,
    /// Set after a failure: no query before then.
    retry_at: Option<Instant>,
    backoff: Backoff,
}

impl Poll {
    /// The index to send (0: answer at once).
    pub(crate) fn index(&self) -> u64 {
        self.index
    }

    /// When the next query may start: [`MIN_QUERY_GAP`] after the last start and, after a
    /// failure, once its backoff has passed. `None`: at once.
    pub(crate) fn next_start(&self) -> Option<Instant> {
        let paced = self.last_start.map(|t| t + MIN_QUERY_GAP);
        paced.max(self.retry_at)
    }

    /// A query starts now.
    pub(crate) fn started(&mut self, now: Instant) {
        self.last_start = Some(now);
        self.retry_at = None;
    }

    /// An answer carrying `X-Consul-Index: got`. Returns false for an answer without an index,
    /// which counts as a failure: it could not be waited on.
    pub(crate) fn answered(&mut self, now: Instant, got: u64) -> bool {
        if got == 0 {
            self.failed(now);
            return false;
        }
        self.backoff.reset();
        self.index = next_index(self.index, got);
        true
    }

    /// The query failed: back off before the next one.
    pub(crate) fn failed(&mut self, now: Instant) {
        self.retry_at = Some(now + self.backoff.next_delay());
    }

    /// Forgets the index, so the next query answers at once (the loop paused).
    pub(crate) fn forget_index(&mut self) {
        self.index = 0;
    }
}

/// What to do with a catalog answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CatalogStep {
    /// Apply it.
    Apply,
    /// Its index went back: apply only the leader's (`consistent`) answer.
    Confirm,
    /// No index: a failure, already backed off.
    NoIndex,
}

/// The catalog loop: a [`Poll`] that also remembers the index last applied. That one never
/// resets to 0 as the blocking index does, so a rewind is always noticed. Its backoff stops
/// at [`CATALOG_MAX_BACKOFF`].
#[derive(Debug)]
pub(crate) struct CatalogPoll {
    /// The blocking query's position.
    pub(crate) poll: Poll,
    applied: u64,
}

impl Default for CatalogPoll {
    fn default() -> Self {
        CatalogPoll {
            poll: Poll {
                backoff: Backoff::with_max(CATALOG_MAX_BACKOFF),
                ..Poll::default()
            },
            applied: 0,
        }
    }
}

impl CatalogPoll {
    /// Judges an answer with index `got`. `Apply` has already advanced the index.
    pub(crate) fn judge(&mut self, now: Instant, got: u64) -> CatalogStep {
        if got == 0 {
            self.poll.failed(now);
            return CatalogStep::NoIndex;
        }
        self.poll.backoff.reset();
        if got < self.applied {
            // A restarted cluster, or a stale server far behind: only the leader may say.
            return CatalogStep::Confirm;
        }
        self.confirmed(got);
        CatalogStep::Apply
    }

    /// An answer with index `got` is applied (after [`CatalogStep::Confirm`], the leader's).
    pub(crate) fn confirmed(&mut self, got: u64) {
        self.poll.index = next_index(self.poll.index, got);
        self.applied = got;
    }
}

/// Whether to publish a table now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Publish {
    /// Not yet.
    Wait,
    /// Build and publish.
    Now {
        /// The first table: it makes the router ready.
        first: bool,
        /// Some listed service was not read yet (only for a first table past its deadline).
        incomplete: bool,
    },
}

/// When tables are published: a change waits `window` so a burst becomes one table, and the
/// first table waits until every listed service was read, or [`READY_DEADLINE`].
#[derive(Debug)]
pub(crate) struct Rebuilds {
    window: Duration,
    /// A change not yet in a table is due then.
    due: Option<Instant>,
    /// The first look at a catalog; the deadline counts from it.
    first_catalog: Option<Instant>,
    live: bool,
}

impl Rebuilds {
    /// Coalesces changes over `window`.
    pub(crate) fn new(window: Duration) -> Self {
        Rebuilds {
            window,
            due: None,
            first_catalog: None,
            live: false,
        }
    }

    /// Something changed. Later changes before the build join it.
    pub(crate) fn changed(&mut self, now: Instant) {
        self.due.get_or_insert(now + self.window);
    }

    /// When [`Rebuilds::decide`] is next needed; `None`: only after a change.
    pub(crate) fn wake_at(&self) -> Option<Instant> {
        let deadline = match self.live {
            true => None,
            false => self.first_catalog.map(|t| t + READY_DEADLINE),
        };
        match (self.due, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Decides at a wake-up. `complete` is `None` before the first catalog, else whether every
    /// listed service has been read.
    pub(crate) fn decide(&mut self, now: Instant, complete: Option<bool>) -> Publish {
        if self.wake_at().is_none_or(|t| now < t) {
            return Publish::Wait;
        }
        self.due = None;
        let Some(complete) = complete else {
            return Publish::Wait;
        };
        let since = *self.first_catalog.get_or_insert(now);
        if !self.live && !complete && now < since + READY_DEADLINE {
            return Publish::Wait;
        }
        let first = !self.live;
        self.live = true;
        Publish::Now {
            first,
            incomplete: !complete,
        }
    }

    /// Whether a table was published.
    #[cfg(test)]
    pub(crate) fn is_live(&self) -> bool {
        self.live
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn index_rules() {
        assert_eq!(next_index(0, 0), 1, "never block on 0");
        assert_eq!(next_index(10, 12), 12);
        assert_eq!(next_index(10, 10), 10);
        assert_eq!(next_index(10, 3), 0, "backwards resets");
    }

    #[tokio::test(start_paused = true)]
    async fn queries_are_paced_and_errors_back_off() {
        let mut p = Poll::default();
        assert_eq!(p.next_start(), None, "the first query starts at once");
        let t0 = Instant::now();
        p.started(t0);
        assert!(p.answered(t0, 7));
        assert_eq!(p.index(), 7);
        // An answer at once (a hot key) still waits out the gap.
        assert_eq!(p.next_start(), Some(t0 + MIN_QUERY_GAP));

        advance(MIN_QUERY_GAP).await;
        let t1 = Instant::now();
        p.started(t1);
        advance(5 * MS).await;
        p.failed(Instant::now());
        // First backoff: 250 ms scaled by 0.5 to 1.0.
        let retry = p.next_start().expect("backing off");
        assert!(retry >= t1 + 5 * MS + 125 * MS && retry <= t1 + 5 * MS + 250 * MS);
        assert_eq!(p.index(), 7, "a failure keeps the index");

        // Failures grow the delay; an answer without index is one of them.
        let mut last = retry - Instant::now();
        for _ in 0..4 {
            tokio::time::sleep_until(p.next_start().expect("backing off")).await;
            p.started(Instant::now());
            assert!(!p.answered(Instant::now(), 0));
            let d = p.next_start().expect("backing off") - Instant::now();
            assert!(d > last / 2 && d <= Duration::from_secs(30), "{d:?}");
            last = d;
        }
        assert!(last >= Duration::from_secs(2), "{last:?} after 5 failures");

        // A success resets the backoff: the next failure waits 250 ms at most again.
        tokio::time::sleep_until(p.next_start().expect("backing off")).await;
        p.started(Instant::now());
        assert!(p.answered(Instant::now(), 8));
        assert_eq!(p.next_start(), Some(Instant::now() + MIN_QUERY_GAP));
        p.failed(Instant::now());
        assert!(p.next_start().expect("backing off") <= Instant::now() + 250 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rewound_index_resets_and_a_forgotten_one_answers_at_once() {
        let mut p = Poll::default();
        let now = Instant::now();
        assert!(p.answered(now, 100));
        assert!(p.answered(now, 40));
        assert_eq!(p.index(), 0, "backwards: start over");
        assert!(p.answered(now, 41));
        assert_eq!(p.index(), 41);
        p.forget_index();
        assert_eq!(p.index(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rewound_catalog_is_applied_only_once_the_leader_confirms() {
        let mut c = CatalogPoll::default();
        let now = Instant::now();
        assert_eq!(c.judge(now, 0), CatalogStep::NoIndex);
        assert!(c.poll.next_start().is_some(), "backed off");
        assert_eq!(c.judge(now, 100), CatalogStep::Apply);
        assert_eq!(c.judge(now, 120), CatalogStep::Apply);
        assert_eq!(c.poll.index(), 120);

        // A stale server far behind: not applied, and the index stays until confirmed.
        assert_eq!(c.judge(now, 90), CatalogStep::Confirm);
        assert_eq!(c.poll.index(), 120);
        // The leader says 95: a restored snapshot. Apply it and start over from there.
        c.confirmed(95);
        assert_eq!(c.poll.index(), 0);
        assert_eq!(c.judge(now, 96), CatalogStep::Apply);
        assert_eq!(c.judge(now, 95), CatalogStep::Confirm, "still below 96");

        // The confirmation failed: back off, keep waiting on the old index.
        c.poll.failed(now);
        assert!(c.poll.next_start().is_some_and(|t| t > now));
        assert_eq!(c.poll.index(), 96);
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_changes_becomes_one_table() {
        let mut r = Rebuilds::new(100 * MS);
        let t0 = Instant::now();
        assert_eq!(r.wake_at(), None, "nothing to do before a change");
        r.changed(t0);
        for _ in 0..9 {
            advance(10 * MS).await;
            r.changed(Instant::now());
        }
        assert_eq!(
            r.wake_at(),
            Some(t0 + 100 * MS),
            "later changes join the first"
        );
        assert_eq!(r.decide(Instant::now(), Some(true)), Publish::Wait, "early");
        advance(10 * MS).await;
        assert_eq!(
            r.decide(Instant::now(), Some(true)),
            Publish::Now {
                first: true,
                incomplete: false
            }
        );
        assert!(r.is_live());
        assert_eq!(r.wake_at(), None);

        // Once live, each change is published one window after it.
        advance(Duration::from_secs(3)).await;
        let t1 = Instant::now();
        r.changed(t1);
        assert_eq!(r.wake_at(), Some(t1 + 100 * MS));
        advance(100 * MS).await;
        assert_eq!(
            r.decide(Instant::now(), Some(false)),
            Publish::Now {
                first: false,
                incomplete: true
            },
            "a live table follows every change"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_table_waits_for_every_read_or_ten_seconds() {
        let mut r = Rebuilds::new(100 * MS);
        // A change before any catalog (a service answer racing it): nothing to build.
        r.changed(Instant::now());
        advance(100 * MS).await;
        assert_eq!(r.decide(Instant::now(), None), Publish::Wait);
        assert_eq!(r.wake_at(), None);

        // The catalog arrives; its services are not read yet.
        let t0 = Instant::now();
        r.changed(t0);
        advance(100 * MS).await;
        let seen = Instant::now();
        assert_eq!(r.decide(seen, Some(false)), Publish::Wait);
        assert_eq!(r.wake_at(), Some(seen + READY_DEADLINE), "the deadline");

        // A read that still leaves some unread.
        advance(Duration::from_secs(4)).await;
        r.changed(Instant::now());
        advance(100 * MS).await;
        assert_eq!(r.decide(Instant::now(), Some(false)), Publish::Wait);
        assert!(!r.is_live());

        // Ten seconds after the catalog: live anyway, the unread services answer 503.
        tokio::time::sleep_until(r.wake_at().expect("deadline")).await;
        assert_eq!(Instant::now(), seen + READY_DEADLINE);
        assert_eq!(
            r.decide(Instant::now(), Some(false)),
            Publish::Now {
                first: true,
                incomplete: true
            }
        );
        assert_eq!(r.wake_at(), None, "no deadline once live");
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_table_goes_live_as_soon_as_every_service_is_read() {
        let mut r = Rebuilds::new(100 * MS);
        r.changed(Instant::now());
        advance(100 * MS).await;
        assert_eq!(r.decide(Instant::now(), Some(false)), Publish::Wait);
        advance(300 * MS).await;
        r.changed(Instant::now());
        advance(100 * MS).await;
        assert_eq!(
            r.decide(Instant::now(), Some(true)),
            Publish::Now {
                first: true,
                incomplete: false
            }
        );
    }
}
