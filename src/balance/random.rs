//! Weighted random choice.

use super::{Candidate, Exclude};

/// Picks by weight: a binary search over running sums, or a linear pass over the
/// candidates not yet excluded when retrying.
pub fn pick<C: Candidate>(cumulative: &[u64], candidates: &[C], exclude: Exclude) -> Option<usize> {
    if exclude.is_empty() {
        let total = *cumulative.last()?;
        let r = fastrand::u64(..total);
        return Some(cumulative.partition_point(|&s| s <= r));
    }
    let total: u64 = candidates
        .iter()
        .enumerate()
        .filter(|(i, _)| !exclude.contains(*i))
        .map(|(_, c)| u64::from(c.weight()))
        .sum();
    if total == 0 {
        return None;
    }
    let mut r = fastrand::u64(..total);
    for (i, c) in candidates.iter().enumerate() {
        if exclude.contains(i) {
            continue;
        }
        let w = u64::from(c.weight());
        if r < w {
            return Some(i);
        }
        r -= w;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::{Picker, Strategy};
    use super::*;

    #[test]
    fn follows_weights() {
        let mut c = equal(3);
        c[0].weight = 1;
        c[1].weight = 2;
        c[2].weight = 7;
        let p = Picker::new(Strategy::Random, &c);
        let mut counts = [0u32; 3];
        for _ in 0..30_000 {
            counts[p.pick(&c, 0, Exclude::default()).unwrap()] += 1;
        }
        let share = |i: usize| f64::from(counts[i]) / 30_000.0;
        assert!((share(0) - 0.1).abs() < 0.02, "{counts:?}");
        assert!((share(2) - 0.7).abs() < 0.02, "{counts:?}");
    }
}
