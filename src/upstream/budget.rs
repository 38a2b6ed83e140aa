//! A service's retry budget (as Envoy's and linkerd's): retries may add at most a share of
//! the service's requests, plus a small floor per second, so they never multiply an
//! outage. A token bucket on atomics, refilled lazily when a retry asks: by the requests
//! finished since the last ask (the service's own request counter, so a request pays
//! nothing) and by the time passed. Amounts are in thousandths of a retry.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// One retry, in thousandths.
const RETRY: u64 = 1_000;
/// The floor's window (linkerd's 10 s): the bucket holds at most this much of the floor,
/// and starts full.
const WINDOW_MS: u64 = 10_000;

/// The budget's settings (`[proxy] retry_budget_percent`, `retry_budget_min_per_second`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetRules {
    /// Retries per 100 requests.
    pub percent: u32,
    /// Retries allowed per second whatever the request rate.
    pub min_per_second: u32,
}

impl Default for BudgetRules {
    fn default() -> Self {
        BudgetRules {
            percent: 20,
            min_per_second: 10,
        }
    }
}

impl BudgetRules {
    /// The most the bucket holds: the window's worth of the floor, and at least ten retries
    /// (with no floor, the window of one a second), so a share-only budget keeps some.
    fn cap(&self) -> u64 {
        u64::from(self.min_per_second).max(1) * WINDOW_MS / 1_000 * RETRY
    }
}

/// A service's retry bucket; it outlives table rebuilds with the service's stats.
#[derive(Debug, Default)]
pub struct RetryBudget {
    /// Thousandths of a retry available.
    tokens: AtomicU64,
    /// The request count at the last refill.
    requests: AtomicU64,
    /// When it was last refilled, in ms since the epoch (0: never).
    refilled: AtomicU64,
}

impl RetryBudget {
    /// Takes one retry if the budget allows it, after a refill for `requests` (the
    /// service's requests so far) at `now` (ms since the epoch).
    pub fn withdraw(&self, requests: u64, now: u64, rules: &BudgetRules) -> bool {
        // fetch_max: concurrent callers may read the counter and clock out of order, and
        // each request and millisecond must be deposited once.
        let seen = self.requests.fetch_max(requests, Relaxed);
        // Stored one ahead, so the epoch's first millisecond is not "never".
        let now = now.saturating_add(1);
        let last = self.refilled.fetch_max(now, Relaxed);
        // The first ask finds the bucket full: a window of the floor.
        let elapsed = if last == 0 {
            WINDOW_MS
        } else {
            now.saturating_sub(last)
        };
        let deposit = requests.saturating_sub(seen) * u64::from(rules.percent) * (RETRY / 100)
            + elapsed * u64::from(rules.min_per_second);
        let cap = rules.cap();
        let mut taken = false;
        let _ = self.tokens.fetch_update(Relaxed, Relaxed, |t| {
            let t = t.saturating_add(deposit).min(cap);
            taken = t >= RETRY;
            Some(if taken { t - RETRY } else { t })
        });
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(b: &RetryBudget, requests: u64, now: u64, r: &BudgetRules) -> u32 {
        let mut n = 0;
        while b.withdraw(requests, now, r) {
            n += 1;
            assert!(n < 10_000, "unbounded");
        }
        n
    }

    #[test]
    fn retries_follow_the_request_rate_plus_a_floor() {
        let r = BudgetRules::default();
        let b = RetryBudget::default();
        // A full bucket at first: ten seconds of the floor.
        assert_eq!(drain(&b, 0, 1_000, &r), 100);
        // 100 more requests in the same millisecond: 20 more.
        assert_eq!(drain(&b, 100, 1_000, &r), 20);
        // Half a second later, nothing new but the floor: 5.
        assert_eq!(drain(&b, 100, 1_500, &r), 5);
        // After a long quiet: the cap, ten seconds of the floor.
        assert_eq!(drain(&b, 100, 600_000, &r), 100);
    }

    #[test]
    fn no_floor_no_share_no_retry() {
        let r = BudgetRules {
            percent: 0,
            min_per_second: 0,
        };
        let b = RetryBudget::default();
        assert_eq!(drain(&b, 1_000, 5_000, &r), 0);
        let share = BudgetRules {
            percent: 50,
            min_per_second: 0,
        };
        assert_eq!(drain(&b, 1_010, 5_000, &share), 5);
        // No floor: the bucket still keeps ten retries of the share, not none.
        assert_eq!(drain(&b, 2_000, 5_000, &share), 10);
    }
}
