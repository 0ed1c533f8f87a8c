//! Orders computed on the fly, never materialized: a seeded bijection of `[0, n)` (a Feistel
//! network with cycle walking), the keys of each (seed, source, epoch), and the deterministic
//! mixing schedule of several sources.
//!
//! The permutation is written down so that any implementation can reproduce it:
//! - `half = max(1, ceil(bits(n - 1) / 2))`, the domain is `[0, 4^half)` (less than `4n` for
//!   `n >= 2`), split into a left and a right half of `half` bits each;
//! - six rounds `(L, R) <- (R, L ^ (splitmix64(R ^ k_r) & mask))` with round keys
//!   `k_r = splitmix64(key + r * 0x9e3779b97f4a7c15)`;
//! - cycle walking: encrypt again until the value falls below `n` (a bijection of `[0, 4^half)`
//!   restricted this way is a bijection of `[0, n)`; on average fewer than four encryptions).
//!
//! It needs O(1) memory and O(1) time per index, so start-up is instant at any dataset size and
//! there is no index array to overflow.

use crate::shard::splitmix64;

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
const ROUNDS: usize = 6;

/// A seeded bijection of `[0, n)`.
#[derive(Debug, Clone)]
pub struct Feistel {
    n: u64,
    half: u32,
    mask: u64,
    keys: [u64; ROUNDS],
}

impl Feistel {
    pub fn new(n: u64, key: u64) -> Feistel {
        let bits = 64 - n.saturating_sub(1).leading_zeros();
        let half = bits.div_ceil(2).max(1);
        let mut keys = [0u64; ROUNDS];
        for (r, k) in keys.iter_mut().enumerate() {
            *k = splitmix64(key.wrapping_add((r as u64).wrapping_mul(GOLDEN)));
        }
        Feistel {
            n,
            half,
            mask: (1u64 << half) - 1,
            keys,
        }
    }

    pub fn len(&self) -> u64 {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    fn encrypt(&self, x: u64) -> u64 {
        let (mut left, mut right) = (x >> self.half, x & self.mask);
        for &k in &self.keys {
            let next = left ^ (splitmix64(right ^ k) & self.mask);
            left = right;
            right = next;
        }
        (left << self.half) | right
    }

    fn decrypt(&self, x: u64) -> u64 {
        let (mut left, mut right) = (x >> self.half, x & self.mask);
        for &k in self.keys.iter().rev() {
            let previous = right ^ (splitmix64(left ^ k) & self.mask);
            right = left;
            left = previous;
        }
        (left << self.half) | right
    }

    /// The image of `i` (`i < n`).
    pub fn apply(&self, i: u64) -> u64 {
        debug_assert!(i < self.n, "index {i} outside [0, {})", self.n);
        if self.n <= 1 {
            return i;
        }
        let mut x = self.encrypt(i);
        while x >= self.n {
            x = self.encrypt(x);
        }
        x
    }

    /// The `i` with `apply(i) == y`.
    pub fn invert(&self, y: u64) -> u64 {
        if self.n <= 1 {
            return y;
        }
        let mut x = self.decrypt(y);
        while x >= self.n {
            x = self.decrypt(x);
        }
        x
    }
}

/// The permutation key of one source in one epoch: every epoch reshuffles, every source has its
/// own order, and nothing depends on the number of ranks, workers or threads.
pub fn epoch_key(seed: u64, source: usize, epoch: u64) -> u64 {
    splitmix64(splitmix64(splitmix64(seed) ^ source as u64) ^ epoch.wrapping_mul(GOLDEN))
}

/// Which source each global row comes from: smooth weighted round-robin over integer weights.
///
/// Every step adds each source's weight to its credit, picks the source with the largest credit
/// (the lowest index on ties) and takes the sum of the weights from it. The sequence repeats with
/// period `P = sum(weights)`, and in every period source `s` gets exactly `weights[s]` rows,
/// spread as evenly as integers allow. The period is precomputed (at most 2^20 entries).
#[derive(Debug, Clone)]
pub struct Schedule {
    weights: Vec<u64>,
    period: Vec<u32>,
}

/// The largest schedule period accepted (sum of the integer weights).
pub const MAX_PERIOD: u64 = 1 << 20;

impl Schedule {
    pub fn new(weights: &[u64]) -> crate::Result<Schedule> {
        use crate::error::Error;
        if weights.is_empty() || weights.contains(&0) {
            return Err(Error::invalid(format!(
                "mixing weights must be positive, got {weights:?}"
            )));
        }
        let total: u64 = weights
            .iter()
            .try_fold(0u64, |a, &w| a.checked_add(w))
            .unwrap_or(u64::MAX);
        if total > MAX_PERIOD {
            return Err(Error::invalid(format!(
                "mixing weights {weights:?} sum to {total}: reduce them to integers summing to at most {MAX_PERIOD}"
            )));
        }
        let mut credit = vec![0i64; weights.len()];
        let mut period = Vec::with_capacity(total as usize);
        for _ in 0..total {
            let mut best = 0;
            for s in 0..weights.len() {
                credit[s] += weights[s] as i64;
                if credit[s] > credit[best] {
                    best = s;
                }
            }
            credit[best] -= total as i64;
            period.push(best as u32);
        }
        Ok(Schedule {
            weights: weights.to_vec(),
            period,
        })
    }

    pub fn num_sources(&self) -> usize {
        self.weights.len()
    }

    pub fn weights(&self) -> &[u64] {
        &self.weights
    }

    /// The source of global row `row`.
    #[inline]
    pub fn source(&self, row: u64) -> usize {
        self.period[(row % self.period.len() as u64) as usize] as usize
    }

    /// How many of the global rows `[0, row)` come from each source.
    pub fn counts_before(&self, row: u64) -> Vec<u64> {
        let p = self.period.len() as u64;
        let mut counts: Vec<u64> = self.weights.iter().map(|w| (row / p) * w).collect();
        for &s in &self.period[..(row % p) as usize] {
            counts[s as usize] += 1;
        }
        counts
    }
}

/// The global rows of one rank's batch at global position `position`: ranks take consecutive
/// blocks of `batch_size` rows of the global step `[position, position + world_size * batch_size)`.
pub fn rank_rows(position: u64, rank: usize, batch_size: usize) -> std::ops::Range<u64> {
    let start = position + (rank * batch_size) as u64;
    start..start + batch_size as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feistel_is_a_bijection_for_small_sizes() {
        for n in 0..300u64 {
            let f = Feistel::new(n, 42 + n);
            let mut seen = vec![false; n as usize];
            for i in 0..n {
                let y = f.apply(i);
                assert!(y < n && !seen[y as usize], "n={n} i={i} y={y}");
                seen[y as usize] = true;
                assert_eq!(f.invert(y), i);
            }
        }
    }

    #[test]
    fn schedule_gives_exact_proportions() {
        let s = Schedule::new(&[3, 1, 2]).unwrap();
        let counts = s.counts_before(600);
        assert_eq!(counts, vec![300, 100, 200]);
        let mut running = vec![0u64; 3];
        for row in 0..1000u64 {
            assert_eq!(s.counts_before(row), running);
            running[s.source(row)] += 1;
        }
    }
}
