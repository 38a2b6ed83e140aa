//! Passive health of one instance (outlier detection) and its slow-start ramp, on atomics
//! only: the request path counts consecutive failures, ejects with a compare-and-swap, and
//! reads "ejected until" with one load. Times are milliseconds since the routing state's
//! epoch (`ServiceStats::millis`), passed in by the caller, so every rule here is tested
//! with an injected clock.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// How failures become ejections (`[proxy] outlier_*`, `max_ejection_percent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierRules {
    /// Consecutive failures that eject an instance; 0 turns ejection off.
    pub consecutive_failures: u32,
    /// The first ejection's length, in ms; each further one adds as much.
    pub base_ms: u64,
    /// The longest ejection, in ms.
    pub max_ms: u64,
    /// Most of a service's routable instances ejected at once, in percent.
    pub max_ejection_percent: u32,
    /// Slow-start window, in ms; 0: an instance gets its full share at once.
    pub slow_start_ms: u64,
}

impl OutlierRules {
    /// The rules from the config's durations.
    pub fn new(
        consecutive_failures: u32,
        base: Duration,
        max: Duration,
        max_ejection_percent: u32,
        slow_start: Duration,
    ) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        OutlierRules {
            consecutive_failures,
            base_ms: ms(base).max(1),
            max_ms: ms(max).max(1),
            max_ejection_percent,
            slow_start_ms: ms(slow_start),
        }
    }

    /// Whether `ejected` instances out of `routable` may become one more.
    pub fn may_eject(&self, ejected: usize, routable: usize) -> bool {
        (ejected as u64 + 1) * 100 <= u64::from(self.max_ejection_percent) * routable as u64
    }
}

impl Default for OutlierRules {
    /// The config's defaults: 5 failures, 30 s growing to 5 min, half the instances, no ramp.
    fn default() -> Self {
        OutlierRules::new(
            5,
            Duration::from_secs(30),
            Duration::from_secs(300),
            50,
            Duration::ZERO,
        )
    }
}

/// The least share a ramping instance gets, so its first requests warm it (Envoy's 10 %).
const MIN_RAMP: f64 = 0.1;

/// One instance's passive health and ramp. A few atomics: it lives in every
/// `InstanceState`, trafficked or not.
#[derive(Debug, Default)]
pub struct Outlier {
    /// Failures since the last success.
    failures: AtomicU32,
    /// When the current or last ejection ends (0: never ejected).
    until: AtomicU64,
    /// The backoff's level: ejections not yet forgiven.
    level: AtomicU32,
    /// Ejections since the instance was first seen.
    total: AtomicU64,
    /// When it last became routable (0: whole at once, or never: no ramp).
    since: AtomicU64,
    /// Whether it was routable in the last table.
    routable: AtomicBool,
}

impl Outlier {
    /// Whether it is ejected at `now`.
    pub fn is_ejected(&self, now: u64) -> bool {
        self.until.load(Relaxed) > now
    }

    /// When its current or last ejection ends (0: never ejected).
    pub fn ejected_until(&self) -> u64 {
        self.until.load(Relaxed)
    }

    /// Ejections so far.
    pub fn ejections(&self) -> u64 {
        self.total.load(Relaxed)
    }

    /// A success: the failure run ends. A load first, so a healthy instance's cache line
    /// is only read.
    pub fn success(&self) {
        if self.failures.load(Relaxed) != 0 {
            self.failures.store(0, Relaxed);
        }
    }

    /// A failure at `now`; true when the run reached `rules`' threshold, so it may be
    /// ejected. Not counted while it is ejected: requests in flight at the ejection, and
    /// fallback picks, would otherwise build a run that re-ejects it, a level higher, on
    /// its first failure back.
    pub fn failure(&self, now: u64, rules: &OutlierRules) -> bool {
        if self.is_ejected(now) {
            return false;
        }
        let run = self.failures.fetch_add(1, Relaxed).saturating_add(1);
        rules.consecutive_failures > 0 && run >= rules.consecutive_failures
    }

    /// Ejects it at `now` unless it is ejected already (another request won the
    /// compare-and-swap); the end of the ejection when this call made it. The length is
    /// `base × level`, capped, where the level grows by one per ejection and drops by one
    /// per `base` of time since the last ejection ended.
    pub fn eject(&self, now: u64, rules: &OutlierRules) -> Option<u64> {
        let prev = self.until.load(Relaxed);
        if prev > now {
            return None;
        }
        let forgiven = if prev == 0 {
            u64::MAX
        } else {
            (now - prev) / rules.base_ms
        };
        let kept = u64::from(self.level.load(Relaxed)).saturating_sub(forgiven);
        let level = kept + 1;
        let length = rules.base_ms.saturating_mul(level).min(rules.max_ms);
        let end = now.saturating_add(length).max(1);
        self.until
            .compare_exchange(prev, end, Relaxed, Relaxed)
            .ok()?;
        self.level
            .store(u32::try_from(level).unwrap_or(u32::MAX), Relaxed);
        self.total.fetch_add(1, Relaxed);
        self.failures.store(0, Relaxed);
        Some(end)
    }

    /// Notes whether it is routable in a new table built at `now`; one that just became
    /// routable starts its ramp, unless `whole` (its service had no routable instance to
    /// ramp against: the first table, or a service back from none).
    pub fn set_routable(&self, routable: bool, now: u64, whole: bool) {
        if self.routable.swap(routable, Relaxed) != routable && routable {
            self.since
                .store(if whole { 0 } else { now.max(1) }, Relaxed);
        }
    }

    /// Its share of its weight at `now` under a ramp of `window` ms: from [`MIN_RAMP`] to 1
    /// over the window after it became routable or came back from an ejection; 1 outside.
    pub fn ramp(&self, now: u64, window: u64) -> f64 {
        if window == 0 {
            return 1.0;
        }
        let start = self.since.load(Relaxed).max(self.until.load(Relaxed));
        if start == 0 || now >= start.saturating_add(window) {
            return 1.0;
        }
        let done = now.saturating_sub(start) as f64 / window as f64;
        done.max(MIN_RAMP)
    }
}

/// Which response statuses count as an instance's failure (`router.outlier-5xx=`): a set
/// of 5xx codes, 502, 503 and 504 by default. A bit per code, so a check is one shift.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct FailureStatuses(u128);

impl Default for FailureStatuses {
    fn default() -> Self {
        FailureStatuses::of(&[502, 503, 504])
    }
}

impl FailureStatuses {
    /// No status counts.
    pub const NONE: FailureStatuses = FailureStatuses(0);
    /// Every 5xx counts.
    pub const ALL: FailureStatuses = FailureStatuses((1 << 100) - 1);

    fn of(codes: &[u16]) -> Self {
        FailureStatuses(codes.iter().fold(0, |m, c| m | 1 << (c - 500)))
    }

    /// Whether `status` counts as a failure.
    pub fn contains(self, status: u16) -> bool {
        status.wrapping_sub(500) < 100 && self.0 >> (status - 500) & 1 == 1
    }

    /// Parses a tag's value: `all`, `none`, or 5xx codes separated by commas.
    pub fn parse(value: &str) -> Result<Self, String> {
        match value.trim() {
            v if v.eq_ignore_ascii_case("all") => return Ok(Self::ALL),
            v if v.eq_ignore_ascii_case("none") => return Ok(Self::NONE),
            _ => {}
        }
        let mut codes = Vec::new();
        for part in value.split(',') {
            match part.trim().parse::<u16>() {
                Ok(c) if (500..600).contains(&c) => codes.push(c),
                _ => {
                    return Err(format!(
                        "{part:?} is not a 5xx status; expected all, none or codes like 502,503"
                    ))
                }
            }
        }
        Ok(Self::of(&codes))
    }

    /// The set as a tag would write it.
    pub fn describe(self) -> String {
        match self {
            Self::ALL => "all".into(),
            Self::NONE => "none".into(),
            _ => (500..600)
                .filter(|&c| self.contains(c))
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(","),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: OutlierRules = OutlierRules {
        consecutive_failures: 3,
        base_ms: 1_000,
        max_ms: 2_500,
        max_ejection_percent: 50,
        slow_start_ms: 10_000,
    };

    #[test]
    fn a_run_of_failures_ejects_once_and_a_success_ends_the_run() {
        let o = Outlier::default();
        assert!(!o.failure(0, &RULES));
        assert!(!o.failure(0, &RULES));
        o.success();
        assert!(!o.failure(0, &RULES));
        assert!(!o.failure(0, &RULES));
        assert!(o.failure(0, &RULES), "the third in a row");
        assert_eq!(o.eject(100, &RULES), Some(1_100));
        assert!(o.is_ejected(100) && o.is_ejected(1_099) && !o.is_ejected(1_100));
        assert_eq!(o.eject(500, &RULES), None, "no double ejection");
        assert_eq!(o.ejections(), 1);
        let off = OutlierRules {
            consecutive_failures: 0,
            ..RULES
        };
        assert!(!Outlier::default().failure(0, &off));
    }

    /// Failures while ejected (requests in flight, fallback picks) are not a run: back
    /// from the ejection, one failure does not eject it again.
    #[test]
    fn failures_while_ejected_do_not_count() {
        let o = Outlier::default();
        assert_eq!(o.eject(100, &RULES), Some(1_100));
        for t in [100, 500, 900, 1_000, 1_099] {
            assert!(!o.failure(t, &RULES), "at {t}");
        }
        assert!(!o.failure(1_100, &RULES), "one failure back is not a run");
        assert!(!o.failure(1_200, &RULES));
        assert!(o.failure(1_300, &RULES), "a new run of three");
    }

    #[test]
    fn the_backoff_grows_is_capped_and_decays() {
        let o = Outlier::default();
        assert_eq!(o.eject(0, &RULES), Some(1_000));
        // Failed again soon after it came back: twice as long, then the cap.
        assert_eq!(o.eject(1_200, &RULES), Some(3_200));
        assert_eq!(o.eject(3_300, &RULES), Some(5_800));
        // Good for two base lengths: two levels forgiven (3 → 1), so the next is 2 × base.
        assert_eq!(o.eject(7_800, &RULES), Some(9_800));
        // Good for long: back to the base.
        assert_eq!(o.eject(60_000, &RULES), Some(61_000));
        assert_eq!(o.ejections(), 5);
    }

    #[test]
    fn at_most_the_share_is_ejected() {
        assert!(RULES.may_eject(0, 4) && RULES.may_eject(1, 4));
        assert!(!RULES.may_eject(2, 4));
        assert!(!RULES.may_eject(0, 1), "never the only instance at 50 %");
        assert!(RULES.may_eject(0, 2) && !RULES.may_eject(1, 2));
        let all = OutlierRules {
            max_ejection_percent: 100,
            ..RULES
        };
        assert!(all.may_eject(3, 4) && !all.may_eject(4, 4));
    }

    #[test]
    fn the_ramp_follows_the_clock() {
        let o = Outlier::default();
        // In the first table: whole at once.
        o.set_routable(true, 5_000, true);
        assert_eq!(o.ramp(5_000, 10_000), 1.0);
        // Gone, then back in a later table: ramps from 10 % to whole over the window.
        o.set_routable(false, 6_000, false);
        o.set_routable(true, 20_000, false);
        assert_eq!(o.ramp(20_000, 10_000), MIN_RAMP);
        assert!((o.ramp(25_000, 10_000) - 0.5).abs() < 1e-9);
        assert_eq!(o.ramp(30_000, 10_000), 1.0);
        assert_eq!(o.ramp(20_000, 0), 1.0, "no window, no ramp");
        // A rebuild that keeps it routable does not restart the ramp.
        o.set_routable(true, 29_000, false);
        assert_eq!(o.ramp(30_000, 10_000), 1.0);
        // Back from an ejection: ramps again from its end.
        o.eject(40_000, &RULES);
        assert!((o.ramp(41_000 + 7_500, 10_000) - 0.75).abs() < 1e-9);
    }

    #[test]
    fn failure_statuses() {
        let d = FailureStatuses::default();
        assert!(d.contains(502) && d.contains(503) && d.contains(504));
        assert!(!d.contains(500) && !d.contains(200) && !d.contains(404) && !d.contains(0));
        assert!(!FailureStatuses::ALL.contains(600) && FailureStatuses::ALL.contains(599));
        assert_eq!(FailureStatuses::parse("all"), Ok(FailureStatuses::ALL));
        assert_eq!(FailureStatuses::parse("None"), Ok(FailureStatuses::NONE));
        let s = FailureStatuses::parse("500, 502").unwrap();
        assert!(s.contains(500) && s.contains(502) && !s.contains(503));
        assert_eq!(s.describe(), "500,502");
        assert_eq!(d.describe(), "502,503,504");
        for bad in ["", "404", "5xx", "502;503", "600"] {
            assert!(FailureStatuses::parse(bad).is_err(), "{bad}");
        }
    }
}
