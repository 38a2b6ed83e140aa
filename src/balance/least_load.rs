//! Power of two choices over reported load and in-flight requests.
//!
//! Two random candidates are compared and the less loaded wins. Reported load arrives at most
//! once a second, so our own in-flight count is folded in: a burst between reports still
//! spreads instead of piling on the instance that last looked idle.

use super::{Candidate, Exclude};

/// Lower is better: `(1 + load) * (1 + in_flight) / weight`; without a report, in-flight only.
pub fn cost<C: Candidate>(c: &C) -> f64 {
    let load = c.reported_load().unwrap_or(0.0).max(0.0);
    (1.0 + load) * (1.0 + c.in_flight() as f64) / f64::from(c.weight().max(1))
}

/// Picks the cheaper of two distinct random candidates not excluded.
pub fn pick<C: Candidate>(candidates: &[C], exclude: Exclude) -> Option<usize> {
    let n = candidates.len();
    let first = random_allowed(n, exclude, None)?;
    let Some(second) = random_allowed(n, exclude, Some(first)) else {
        return Some(first);
    };
    if cost(&candidates[second]) < cost(&candidates[first]) {
        Some(second)
    } else {
        Some(first)
    }
}

/// A random position that is neither excluded nor `not`; a few random probes, then a scan.
fn random_allowed(n: usize, exclude: Exclude, not: Option<usize>) -> Option<usize> {
    let ok = |i: usize| !exclude.contains(i) && Some(i) != not;
    for _ in 0..4 {
        let i = fastrand::usize(..n);
        if ok(i) {
            return Some(i);
        }
    }
    let start = fastrand::usize(..n);
    (0..n).map(|k| (start + k) % n).find(|&i| ok(i))
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::{Picker, Strategy};
    use super::*;

    #[test]
    fn avoids_the_loaded_instance() {
        let mut c = equal(2);
        c[0].load = Some(50.0);
        c[1].load = Some(1.0);
        let p = Picker::new(Strategy::LeastLoad, &c);
        for _ in 0..100 {
            assert_eq!(p.pick(&c, 0, Exclude::default()), Some(1));
        }
    }

    #[test]
    fn in_flight_spreads_a_burst_between_reports() {
        let mut c = equal(3);
        c[0].load = Some(0.0);
        c[1].load = Some(0.0);
        c[2].load = Some(0.0);
        let p = Picker::new(Strategy::LeastLoad, &c);
        // Simulate 300 requests that stay in flight: none may take more than its fair share
        // by much, although the reported loads never change.
        for _ in 0..300 {
            let i = p.pick(&c, 0, Exclude::default()).unwrap();
            c[i].in_flight += 1;
        }
        for x in &c {
            assert!((80..=120).contains(&x.in_flight), "{:?}", c);
        }
    }

    #[test]
    fn missing_load_falls_back_to_in_flight() {
        let mut c = equal(2);
        c[0].in_flight = 10;
        let p = Picker::new(Strategy::LeastLoad, &c);
        for _ in 0..100 {
            assert_eq!(p.pick(&c, 0, Exclude::default()), Some(1));
        }
    }
}
