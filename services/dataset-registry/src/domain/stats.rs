//! Length distributions of a version's rows (characters at upload, tokens on request).
//!
//! Uploads may hold billions of rows, so lengths are not kept per row: a [`LengthHistogram`]
//! counts them in bounded memory. Count, sum, min, max and mean are exact. Percentiles are
//! exact for lengths below [`EXACT_BELOW`]; above it, lengths share buckets of 1/128 of an
//! octave, and a percentile is its bucket's lower bound (kept within the exact min and max),
//! so it is at most 1/128 (0.79%) below the true nearest-rank value and never above it.

use serde::{Deserialize, Serialize};

/// Lengths below this are counted one by one.
pub const EXACT_BELOW: u64 = 1 << EXACT_BITS;
const EXACT_BITS: u32 = 10;
/// Each octave above [`EXACT_BELOW`] is cut into `2^SUB_BITS` buckets.
const SUB_BITS: u32 = 7;
const OCTAVES: usize = (64 - EXACT_BITS) as usize;
const BUCKETS: usize = EXACT_BELOW as usize + (OCTAVES << SUB_BITS);

/// Min, nearest-rank percentiles, max and mean of per-row lengths; all zero for no rows.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LengthStats {
    pub min: u64,
    pub p50: u64,
    pub p90: u64,
    pub max: u64,
    pub mean: f64,
    /// Sum over all rows.
    pub total: u64,
}

/// Per-row lengths gathered in fixed memory (about 62 KiB, whatever the row count).
#[derive(Debug, Clone)]
pub struct LengthHistogram {
    counts: Vec<u64>,
    rows: u64,
    total: u64,
    min: u64,
    max: u64,
}

impl Default for LengthHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LengthHistogram {
    pub fn new() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            rows: 0,
            total: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    pub fn add(&mut self, length: u64) {
        self.counts[bucket(length)] += 1;
        self.rows += 1;
        self.total = self.total.saturating_add(length);
        self.min = self.min.min(length);
        self.max = self.max.max(length);
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    pub fn stats(&self) -> LengthStats {
        if self.rows == 0 {
            return LengthStats {
                min: 0,
                p50: 0,
                p90: 0,
                max: 0,
                mean: 0.0,
                total: 0,
            };
        }
        LengthStats {
            min: self.min,
            p50: self.nearest_rank(50),
            p90: self.nearest_rank(90),
            max: self.max,
            mean: self.total as f64 / self.rows as f64,
            total: self.total,
        }
    }

    /// The lower bound of the bucket holding the value of nearest rank `percent`.
    fn nearest_rank(&self, percent: u64) -> u64 {
        let rank = (u128::from(percent) * u128::from(self.rows))
            .div_ceil(100)
            .max(1);
        let mut seen = 0u128;
        for (index, count) in self.counts.iter().enumerate() {
            seen += u128::from(*count);
            if seen >= rank {
                return lower_bound(index).clamp(self.min, self.max);
            }
        }
        self.max
    }
}

fn bucket(length: u64) -> usize {
    if length < EXACT_BELOW {
        return length as usize;
    }
    let octave = 63 - length.leading_zeros();
    let sub = (length >> (octave - SUB_BITS)) & ((1 << SUB_BITS) - 1);
    EXACT_BELOW as usize + (((octave - EXACT_BITS) as usize) << SUB_BITS) + sub as usize
}

fn lower_bound(index: usize) -> u64 {
    if index < EXACT_BELOW as usize {
        return index as u64;
    }
    let above = index - EXACT_BELOW as usize;
    let octave = (above >> SUB_BITS) as u32 + EXACT_BITS;
    let sub = (above & ((1 << SUB_BITS) - 1)) as u64;
    (1u64 << octave) | (sub << (octave - SUB_BITS))
}

impl LengthStats {
    /// Summarises `lengths` through a [`LengthHistogram`].
    pub fn from_lengths(lengths: impl IntoIterator<Item = u64>) -> Self {
        let mut histogram = LengthHistogram::new();
        for length in lengths {
            histogram.add(length);
        }
        histogram.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exact nearest-rank percentile, as the reference.
    fn exact_rank(lengths: &[u64], percent: usize) -> u64 {
        let mut sorted = lengths.to_vec();
        sorted.sort_unstable();
        sorted[(percent * sorted.len()).div_ceil(100).max(1) - 1]
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        // 1..=10: the 50th percentile is the 5th value, the 90th the 9th.
        let stats = LengthStats::from_lengths((1..=10).rev());
        assert_eq!((stats.min, stats.p50, stats.p90, stats.max), (1, 5, 9, 10));
        assert_eq!(stats.total, 55);
        assert!((stats.mean - 5.5).abs() < 1e-12);
    }

    #[test]
    fn one_row_is_every_percentile() {
        let stats = LengthStats::from_lengths([7]);
        assert_eq!((stats.min, stats.p50, stats.p90, stats.max), (7, 7, 7, 7));
    }

    #[test]
    fn every_bucket_holds_its_lower_bound_and_buckets_are_in_order() {
        let mut previous = None;
        for index in 0..BUCKETS {
            let low = lower_bound(index);
            assert_eq!(bucket(low), index, "lower bound of bucket {index}");
            assert!(previous < Some(low));
            previous = Some(low);
        }
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn large_lengths_are_within_the_stated_relative_error() {
        // A spread of lengths from 1 to ~10^7 (a multiplicative walk), against exact ranks.
        let lengths: Vec<u64> = (0..5000u64)
            .map(|i| 1 + (i * i * 397) % 10_000_000)
            .collect();
        let stats = LengthStats::from_lengths(lengths.iter().copied());
        for (percent, got) in [(50, stats.p50), (90, stats.p90)] {
            let exact = exact_rank(&lengths, percent);
            // Never above the exact value, at most 1/128 of it below.
            assert!(got <= exact, "p{percent}: {got} > {exact}");
            assert!(
                (exact - got) as f64 <= exact as f64 / 128.0,
                "p{percent}: {got} vs {exact}"
            );
        }
        assert_eq!(stats.min, *lengths.iter().min().expect("rows"));
        assert_eq!(stats.max, *lengths.iter().max().expect("rows"));
        assert_eq!(stats.total, lengths.iter().sum::<u64>());
    }

    #[test]
    fn a_million_rows_take_the_memory_of_one() {
        // The defect: one u64 kept per row. The histogram's buckets are allocated up front
        // and never grow, whatever the row count.
        let mut histogram = LengthHistogram::new();
        let before = histogram.counts.capacity();
        for row in 0..1_000_000u64 {
            histogram.add(row % 5000);
        }
        assert_eq!(histogram.counts.capacity(), before);
        assert_eq!(before, BUCKETS);
        assert_eq!(histogram.rows(), 1_000_000);
    }

    #[test]
    fn short_lengths_are_exact() {
        // Below EXACT_BELOW each length has its own bucket: the percentiles equal the exact
        // nearest-rank values.
        let lengths: Vec<u64> = (0..3001u64).map(|i| (i * 7919) % EXACT_BELOW).collect();
        let stats = LengthStats::from_lengths(lengths.iter().copied());
        assert_eq!(stats.p50, exact_rank(&lengths, 50));
        assert_eq!(stats.p90, exact_rank(&lengths, 90));
    }
}
