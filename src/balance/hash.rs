//! Hashing for the consistent strategies: FNV-1a for keys, weighted rendezvous for the pick.
//!
//! Rendezvous (highest random weight) hashing scores every instance against the key and takes
//! the best; when an instance leaves, only the keys it won move, and they spread over the rest.

use super::{Candidate, Exclude};

/// A fast, stable 64-bit hash of `bytes` (FNV-1a, then a finaliser to spread the bits).
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

/// splitmix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Weighted rendezvous: the candidate maximising `weight / -ln(u)`, with `u` uniform in (0, 1)
/// from the pair (key, instance). Equal weights reduce to plain highest-random-weight.
pub fn rendezvous<C: Candidate>(candidates: &[C], key: u64, exclude: Exclude) -> Option<usize> {
    best(candidates, key, |i, _| !exclude.contains(i))
}

/// Rendezvous with bounded loads (consistent hashing with bounded loads, HAProxy's
/// `hash-balance-factor`): the key's first candidate, in its own rendezvous order, whose
/// in-flight count is under `factor` percent of the average over the candidates not
/// excluded, counting this request
/// (`⌈factor × (total + 1) / n⌉`). The first in that order under the bound is the best
/// score among those under it, so one pass finds it. A key moves only while its own
/// instance is over the bound, and then to its next instance. When every one is over
/// (never, with a factor of at least 100), the plain choice.
pub fn bounded<C: Candidate>(
    candidates: &[C],
    key: u64,
    exclude: Exclude,
    factor: u32,
) -> Option<usize> {
    // The average over the candidates that may take the key: excluded ones (tried, or
    // ejected and passed over) carry next to nothing and would pull the bound under every
    // live instance, turning the bound off.
    let (total, n) = candidates
        .iter()
        .enumerate()
        .filter(|&(i, _)| !exclude.contains(i))
        .fold((0u64, 0u64), |(t, n), (_, c)| (t + c.in_flight(), n + 1));
    let n = n.max(1);
    let bound = (u64::from(factor) * (total + 1)).div_ceil(100 * n);
    best(candidates, key, |i, c| {
        !exclude.contains(i) && c.in_flight() < bound
    })
    .or_else(|| rendezvous(candidates, key, exclude))
}

/// The highest-scoring candidate `ok` accepts.
fn best<C: Candidate>(candidates: &[C], key: u64, ok: impl Fn(usize, &C) -> bool) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, c) in candidates.iter().enumerate() {
        if !ok(i, c) {
            continue;
        }
        let h = mix(key ^ c.id_hash());
        // 53 random bits into (0, 1): never 0, so ln is finite.
        let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let score = f64::from(c.weight()) / -u.ln();
        if best.is_none_or(|(_, s)| score > s) {
            best = Some((i, score));
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    fn owner(c: &[TestCandidate], key: u64) -> u64 {
        c[rendezvous(c, key, Exclude::default()).unwrap()].id
    }

    /// The property: remove any one of N instances, and exactly the keys it owned move;
    /// every other key keeps its instance. Checked over many sizes and 5,000 keys each.
    #[test]
    fn only_the_leaving_instances_keys_move() {
        let mut rng = fastrand::Rng::with_seed(42);
        for n in 2..=12 {
            let all = equal(n);
            let leaving = rng.usize(..n);
            let mut rest = all.clone();
            let gone = rest.remove(leaving).id;
            let mut moved = 0;
            for _ in 0..5_000 {
                let key = rng.u64(..);
                let before = owner(&all, key);
                let after = owner(&rest, key);
                if before == gone {
                    moved += 1;
                    assert_ne!(after, gone);
                } else {
                    assert_eq!(before, after, "n={n}: a key moved that {gone} did not own");
                }
            }
            // And the leaving instance owned about its fair share.
            let share = moved as f64 / 5_000.0;
            assert!((share - 1.0 / n as f64).abs() < 0.05, "n={n} share={share}");
        }
    }

    #[test]
    fn adding_an_instance_only_takes_keys() {
        let mut rng = fastrand::Rng::with_seed(7);
        let small = equal(4);
        let big = equal(5);
        let newcomer = big[4].id;
        for _ in 0..5_000 {
            let key = rng.u64(..);
            let after = owner(&big, key);
            if after != newcomer {
                assert_eq!(owner(&small, key), after);
            }
        }
    }

    #[test]
    fn weights_shift_the_share() {
        let mut c = equal(2);
        c[0].weight = 3;
        let mut rng = fastrand::Rng::with_seed(1);
        let n = 20_000;
        let heavy = (0..n).filter(|_| owner(&c, rng.u64(..)) == c[0].id).count();
        let share = heavy as f64 / n as f64;
        assert!((share - 0.75).abs() < 0.03, "share={share}");
    }

    /// Bounded loads: with nothing in flight, the plain owner; a hot key's owner over the
    /// bound spills to the key's next instance, and only keys whose owner is over move.
    #[test]
    fn a_hot_key_spills_to_its_next_instance() {
        let mut c = equal(4);
        let mut rng = fastrand::Rng::with_seed(3);
        let keys: Vec<u64> = (0..2_000).map(|_| rng.u64(..)).collect();
        for &k in &keys {
            assert_eq!(
                bounded(&c, k, Exclude::default(), 125),
                rendezvous(&c, k, Exclude::default())
            );
        }
        let hot = keys[0];
        let owner = rendezvous(&c, hot, Exclude::default()).unwrap();
        let mut ex = Exclude::default();
        ex.add(owner);
        let next = rendezvous(&c, hot, ex).unwrap();
        // 12 in flight, all on the owner: the bound is ⌈1.25 × 13 / 4⌉ = 5.
        c[owner].in_flight = 12;
        assert_eq!(bounded(&c, hot, Exclude::default(), 125), Some(next));
        let mut moved = 0;
        for &k in &keys {
            let plain = rendezvous(&c, k, Exclude::default()).unwrap();
            let got = bounded(&c, k, Exclude::default(), 125).unwrap();
            if plain == owner {
                moved += 1;
                assert_ne!(got, owner);
            } else {
                assert_eq!(got, plain, "a key whose owner is under the bound stayed");
            }
        }
        assert!(moved > 300, "the owner's keys moved: {moved}");
        // Two candidates out (tried, or ejected and passed over), nothing in flight on
        // them: the bound is over the other two, ⌈1.25 × 31 / 2⌉ = 20, not ⌈1.25 × 31 / 4⌉
        // = 10, so the other one at 10 takes the hot key off its owner at 20.
        let mut ex = Exclude::default();
        for i in (0..4).filter(|&i| i != owner && i != next) {
            ex.add(i);
            c[i].in_flight = 0;
        }
        c[owner].in_flight = 20;
        c[next].in_flight = 10;
        assert_eq!(bounded(&c, hot, ex, 125), Some(next));
        // Spread evenly again (3 each, bound 5): every key is home.
        c.iter_mut().for_each(|x| x.in_flight = 3);
        for &k in &keys {
            assert_eq!(
                bounded(&c, k, Exclude::default(), 125),
                rendezvous(&c, k, Exclude::default())
            );
        }
    }

    /// Simulated traffic: one hot key among uniform ones, requests staying in flight. With
    /// the bound, no instance holds more than the factor over the average.
    #[test]
    fn the_bound_holds_under_a_hot_key() {
        let mut c = equal(5);
        let mut rng = fastrand::Rng::with_seed(9);
        for r in 0..500u64 {
            let key = if r % 2 == 0 { 42 } else { rng.u64(..) };
            let i = bounded(&c, key, Exclude::default(), 150).unwrap();
            c[i].in_flight += 1;
            let total: u64 = c.iter().map(|x| x.in_flight).sum();
            let max = c.iter().map(|x| x.in_flight).max().unwrap();
            assert!(max <= (150 * total).div_ceil(500) + 1, "{c:?}");
        }
    }

    #[test]
    fn hash_is_stable() {
        assert_eq!(hash_bytes(b"/chat?x=1"), hash_bytes(b"/chat?x=1"));
        assert_ne!(hash_bytes(b"/a"), hash_bytes(b"/b"));
    }
}
