//! Instance selection: the four strategies, over the routable instances of one service.
//!
//! Everything a pick needs is precomputed when the routing table is built ([`Picker::new`]);
//! a pick allocates nothing and reads only atomics.

mod hash;
mod least_load;
mod random;

pub use hash::{bounded, hash_bytes, rendezvous};

use std::fmt;
use std::str::FromStr;

/// How a service chooses among its healthy instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Strategy {
    /// Weighted random.
    Random,
    /// Consistent hash of the client IP.
    IpHash,
    /// Consistent hash of the path (and query, if configured).
    UrlHash,
    /// Power of two choices over reported load and our in-flight count.
    LeastLoad,
}

impl Strategy {
    /// All strategies, in their canonical order.
    pub const ALL: [Strategy; 4] = [
        Strategy::Random,
        Strategy::IpHash,
        Strategy::UrlHash,
        Strategy::LeastLoad,
    ];

    /// The name used in config, flags and tags.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Random => "random",
            Strategy::IpHash => "ip-hash",
            Strategy::UrlHash => "url-hash",
            Strategy::LeastLoad => "least-load",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Strategy::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!("unknown strategy {s:?}; expected random, ip-hash, url-hash or least-load")
            })
    }
}

/// What a strategy needs to know of one instance.
pub trait Candidate {
    /// Relative weight; never zero for a routable instance.
    fn weight(&self) -> u32;
    /// Stable hash of the instance's identity (its Consul service ID).
    fn id_hash(&self) -> u64;
    /// Load the instance reported, lower is less loaded.
    fn reported_load(&self) -> Option<f64>;
    /// Requests this router has in flight to it now.
    fn in_flight(&self) -> u64;
}

/// Instance positions to skip (those that already failed). Fixed size, no allocation:
/// retries are bounded (at most 10), so 16 slots always suffice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Exclude {
    slots: [u32; 16],
    len: u8,
}

impl Exclude {
    /// Adds position `i` (ignored once 16 are held).
    pub fn add(&mut self, i: usize) {
        if usize::from(self.len) < self.slots.len() && !self.contains(i) {
            self.slots[usize::from(self.len)] = u32::try_from(i).unwrap_or(u32::MAX);
            self.len += 1;
        }
    }
    /// Whether position `i` is excluded.
    pub fn contains(&self, i: usize) -> bool {
        self.slots[..usize::from(self.len)]
            .iter()
            .any(|&s| s as usize == i)
    }
    /// How many positions are excluded (at most 16).
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }
    /// Whether nothing is excluded.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Precomputed selection state for one service's routable instances.
#[derive(Debug, Clone)]
pub struct Picker {
    strategy: Strategy,
    /// Running sums of weights, for weighted random by binary search.
    cumulative: Box<[u64]>,
    /// The hash strategies' bound on an instance's in-flight requests, in percent of the
    /// average (`router.hash-balance-factor=`); `None`: unbounded.
    balance_factor: Option<u32>,
}

impl Picker {
    /// Builds the picker for `candidates` (the routable instances, in table order).
    pub fn new<C: Candidate>(strategy: Strategy, candidates: &[C]) -> Self {
        let mut sum = 0u64;
        let cumulative = candidates
            .iter()
            .map(|c| {
                sum += u64::from(c.weight());
                sum
            })
            .collect();
        Picker {
            strategy,
            cumulative,
            balance_factor: None,
        }
    }

    /// The same picker with hashing bounded to `factor` percent of the average in-flight
    /// count (ignored by the other strategies).
    pub fn with_balance_factor(mut self, factor: Option<u32>) -> Self {
        self.balance_factor =
            factor.filter(|_| matches!(self.strategy, Strategy::IpHash | Strategy::UrlHash));
        self
    }

    /// The bounded-load factor in force, in percent.
    pub fn balance_factor(&self) -> Option<u32> {
        self.balance_factor
    }

    /// The strategy this picker applies.
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// Picks a position in `candidates`. `key` is the hash of the client IP or URL for the
    /// hash strategies (ignored otherwise). Returns `None` when every candidate is excluded.
    pub fn pick<C: Candidate>(
        &self,
        candidates: &[C],
        key: u64,
        exclude: Exclude,
    ) -> Option<usize> {
        match candidates.len() {
            0 => None,
            1 => (!exclude.contains(0)).then_some(0),
            _ => match self.strategy {
                Strategy::Random => random::pick(&self.cumulative, candidates, exclude),
                Strategy::IpHash | Strategy::UrlHash => match self.balance_factor {
                    Some(f) => bounded(candidates, key, exclude, f),
                    None => rendezvous(candidates, key, exclude),
                },
                Strategy::LeastLoad => least_load::pick(candidates, exclude),
            },
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::Candidate;

    /// A plain candidate for unit tests and benches.
    #[derive(Debug, Clone)]
    pub struct TestCandidate {
        pub weight: u32,
        pub id: u64,
        pub load: Option<f64>,
        pub in_flight: u64,
    }

    impl Candidate for TestCandidate {
        fn weight(&self) -> u32 {
            self.weight
        }
        fn id_hash(&self) -> u64 {
            self.id
        }
        fn reported_load(&self) -> Option<f64> {
            self.load
        }
        fn in_flight(&self) -> u64 {
            self.in_flight
        }
    }

    pub fn equal(n: usize) -> Vec<TestCandidate> {
        (0..n)
            .map(|i| TestCandidate {
                weight: 1,
                id: super::hash_bytes(format!("instance-{i}").as_bytes()),
                load: None,
                in_flight: 0,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in Strategy::ALL {
            assert_eq!(s.as_str().parse::<Strategy>().unwrap(), s);
        }
        assert!("rr".parse::<Strategy>().is_err());
    }

    #[test]
    fn exclusion_works_beyond_64_instances() {
        let c = equal(100);
        let mut ex = Exclude::default();
        let p = Picker::new(Strategy::UrlHash, &c);
        let first = p.pick(&c, 42, ex).unwrap();
        ex.add(first);
        let second = p.pick(&c, 42, ex).unwrap();
        assert_ne!(first, second);
        assert!(ex.contains(first) && !ex.contains(second));
    }

    #[test]
    fn exclusion_is_respected_by_every_strategy() {
        let c = equal(3);
        for s in Strategy::ALL {
            let p = Picker::new(s, &c);
            let mut ex = Exclude::default();
            ex.add(0);
            ex.add(2);
            for key in 0..50 {
                assert_eq!(p.pick(&c, key, ex), Some(1), "{s}");
            }
            ex.add(1);
            assert_eq!(p.pick(&c, 7, ex), None, "{s}");
        }
    }
}
