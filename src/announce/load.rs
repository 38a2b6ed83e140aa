//! The load formula and the write policy: pure functions of a reading and the caller's
//! clock, so both are tested with explicit values.

use std::time::Duration;

use super::measure::Reading;

/// Weight of CPU in the load: CPU is what least-load mostly balances.
pub const CPU_WEIGHT: f64 = 0.7;
/// Weight of memory in the load.
pub const MEM_WEIGHT: f64 = 0.2;
/// Weight of the task count in the load.
pub const PROCS_WEIGHT: f64 = 0.1;
/// The task count that counts as full when neither `--max-procs` nor the cgroup's
/// `pids.max` gives one.
pub const DEFAULT_MAX_PROCS: u64 = 1000;
/// Below this many points, a change is noise and never written, however old the last write.
pub const SMALL_CHANGE: u8 = 2;

/// The load on a 0–100 scale, CPU-dominant:
///
/// `load = round(0.7 × cpu + 0.2 × mem + 0.1 × procs%)`, clamped to 0–100, where
/// - `cpu` is the CPU time used during the interval in % of the CPUs available (the cgroup
///   quota, else the online CPUs), 0–100;
/// - `mem` is the memory in use in % of the memory limit (the cgroup's `memory.max`, else
///   the machine's `MemTotal`), 0–100;
/// - `procs%` is `100 × min(1, procs / max_procs)`, with `max_procs` from `--max-procs`,
///   else the cgroup's `pids.max`, else [`DEFAULT_MAX_PROCS`].
pub fn load(r: &Reading, max_procs: Option<u64>) -> u8 {
    let max_procs = max_procs
        .or(r.procs_limit)
        .unwrap_or(DEFAULT_MAX_PROCS)
        .max(1);
    let procs = 100.0 * (r.procs as f64 / max_procs as f64).min(1.0);
    let l = CPU_WEIGHT * pct(r.cpu) + MEM_WEIGHT * pct(r.mem) + PROCS_WEIGHT * procs;
    // In 0..=100 by construction (weights sum to 1), so the cast cannot truncate.
    l.round().clamp(0.0, 100.0) as u8
}

/// A percentage clamped to 0–100 (NaN counts as 0).
fn pct(v: f64) -> f64 {
    if v.is_nan() {
        0.0
    } else {
        v.clamp(0.0, 100.0)
    }
}

/// A load value that reached Consul, and when (the caller's monotonic clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// The load written.
    pub load: u8,
    /// When it was written.
    pub at: Duration,
}

/// When a new load is worth a write. Each write re-registers the service: a Raft write in
/// Consul that wakes every watcher of the service, so writes are kept few.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WritePolicy {
    /// A change of at least this many points is written once `min_gap` has passed.
    pub step: u8,
    /// Least time between two writes.
    pub min_gap: Duration,
    /// A smaller change (at least [`SMALL_CHANGE`] points) is written once this long passed.
    pub refresh: Duration,
}

impl Default for WritePolicy {
    fn default() -> Self {
        WritePolicy {
            step: 10,
            min_gap: Duration::from_secs(10),
            refresh: Duration::from_secs(30),
        }
    }
}

impl WritePolicy {
    /// Whether `load`, measured at `now`, should be written, given the `last` write (none
    /// yet: always). Never twice within `min_gap`; then a move of `step` points or more, or
    /// after `refresh` a move of [`SMALL_CHANGE`] points or more.
    pub fn should_write(&self, last: Option<Written>, load: u8, now: Duration) -> bool {
        let Some(last) = last else { return true };
        let since = now.saturating_sub(last.at);
        if since < self.min_gap {
            return false;
        }
        let moved = load.abs_diff(last.load);
        moved >= self.step.max(1) || (since >= self.refresh && moved >= SMALL_CHANGE)
    }

    /// The most writes an hour this policy allows: one per `min_gap`.
    pub fn max_writes_per_hour(&self) -> u64 {
        let gap = self.min_gap.as_millis().max(1);
        (3_600_000 / gap) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(cpu: f64, mem: f64, procs: u64) -> Reading {
        Reading {
            cpu,
            mem,
            procs,
            procs_limit: None,
        }
    }

    #[test]
    fn formula_weighs_cpu_most() {
        assert_eq!(load(&reading(0.0, 0.0, 0), None), 0);
        assert_eq!(load(&reading(100.0, 100.0, 1000), None), 100);
        assert_eq!(load(&reading(100.0, 0.0, 0), None), 70);
        assert_eq!(load(&reading(0.0, 100.0, 0), None), 20);
        assert_eq!(load(&reading(0.0, 0.0, 1000), None), 10);
        // 0.7 × 50 + 0.2 × 25 + 0.1 × 10 = 35 + 5 + 1
        assert_eq!(load(&reading(50.0, 25.0, 100), None), 41);
        // Rounded to the nearest point.
        assert_eq!(load(&reading(10.0, 0.0, 0), None), 7);
        assert_eq!(load(&reading(0.5, 0.0, 0), None), 0);
    }

    #[test]
    fn formula_clamps_and_takes_the_task_limit() {
        // Out-of-range inputs (a quota change mid-interval) stay on the scale.
        assert_eq!(load(&reading(180.0, 120.0, 5000), None), 100);
        assert_eq!(load(&reading(-3.0, f64::NAN, 0), None), 0);
        // The cgroup's pids.max, unless --max-procs says otherwise.
        let mut r = reading(0.0, 0.0, 50);
        r.procs_limit = Some(100);
        assert_eq!(load(&r, None), 5);
        assert_eq!(load(&r, Some(500)), 1);
        assert_eq!(load(&r, Some(0)), 10);
    }

    const S: Duration = Duration::from_secs(1);

    fn at(load: u8, secs: u64) -> Option<Written> {
        Some(Written {
            load,
            at: S * secs as u32,
        })
    }

    #[test]
    fn policy_writes_big_moves_after_the_gap_and_small_ones_after_refresh() {
        let p = WritePolicy::default();
        assert!(p.should_write(None, 0, Duration::ZERO));
        // A big move waits for min_gap (10 s), then goes.
        assert!(!p.should_write(at(10, 0), 60, S * 9));
        assert!(p.should_write(at(10, 0), 60, S * 10));
        assert!(p.should_write(at(60, 0), 50, S * 10));
        // A move under the step waits for refresh (30 s).
        assert!(!p.should_write(at(10, 0), 19, S * 29));
        assert!(p.should_write(at(10, 0), 19, S * 30));
        assert!(p.should_write(at(10, 0), 8, S * 30));
        // One point is noise, whatever the age.
        assert!(!p.should_write(at(10, 0), 11, S * 3600));
        assert!(!p.should_write(at(10, 0), 10, S * 3600));
        // A clock that went backwards counts as no time passed.
        assert!(!p.should_write(at(10, 100), 90, S * 50));
    }

    #[test]
    fn policy_with_step_one_writes_every_change_after_the_gap() {
        let p = WritePolicy {
            step: 1,
            min_gap: S,
            refresh: S * 30,
        };
        assert!(p.should_write(at(10, 0), 11, S));
        assert!(!p.should_write(at(10, 0), 10, S * 100));
        let zero = WritePolicy { step: 0, ..p };
        assert!(!zero.should_write(at(10, 0), 10, S * 100));
    }

    /// Counts the writes the policy makes over `secs` one-second samples of `trace`.
    fn writes_over(p: &WritePolicy, secs: u64, trace: impl Fn(u64) -> u8) -> u64 {
        let mut last = None;
        let mut n = 0;
        for t in 0..secs {
            let load = trace(t);
            let now = S * t as u32;
            if p.should_write(last, load, now) {
                last = Some(Written { load, at: now });
                n += 1;
            }
        }
        n
    }

    #[test]
    fn writes_per_hour_stay_within_the_derived_bounds() {
        let p = WritePolicy::default();
        assert_eq!(p.max_writes_per_hour(), 360);
        let hour = 3600;
        // Idle: 0 or 1 (noise under SMALL_CHANGE): the first write only.
        assert_eq!(writes_over(&p, hour, |t| (t % 2) as u8), 1);
        // Steady busy, wandering ±4 around 60: at most one write per refresh.
        let steady = writes_over(&p, hour, |t| 56 + ((t * 7919) % 9) as u8);
        assert!(steady <= 3600 / 30 + 1, "{steady}");
        // Worst case, swinging 0 ↔ 100 every second: about one write per min_gap (every
        // 11 s here, as the value at 10 s is the one last written).
        let swing = writes_over(&p, hour, |t| if t % 2 == 0 { 0 } else { 100 });
        assert!(swing <= p.max_writes_per_hour() + 1, "{swing}");
        assert!(swing >= 3600 / 11, "{swing}");
    }
}
