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
    let mut best: Option<(usize, f64)> = None;
    for (i, c) in candidates.iter().enumerate() {
        if exclude.contains(i) {
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

    #[test]
    fn hash_is_stable() {
        assert_eq!(hash_bytes(b"/chat?x=1"), hash_bytes(b"/chat?x=1"));
        assert_ne!(hash_bytes(b"/a"), hash_bytes(b"/b"));
    }
}
