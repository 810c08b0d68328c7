//! Length distributions of a version's rows (characters at upload, tokens on request).

use serde::{Deserialize, Serialize};

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

impl LengthStats {
    /// Summarises `lengths` (sorted in place).
    pub fn from_lengths(lengths: &mut [u64]) -> Self {
        if lengths.is_empty() {
            return Self {
                min: 0,
                p50: 0,
                p90: 0,
                max: 0,
                mean: 0.0,
                total: 0,
            };
        }
        lengths.sort_unstable();
        let total: u64 = lengths.iter().sum();
        Self {
            min: lengths[0],
            p50: nearest_rank(lengths, 50),
            p90: nearest_rank(lengths, 90),
            max: lengths[lengths.len() - 1],
            mean: total as f64 / lengths.len() as f64,
            total,
        }
    }
}

/// The smallest value with at least `percent`% of the values at or below it.
fn nearest_rank(sorted: &[u64], percent: usize) -> u64 {
    let rank = (percent * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        // 1..=10: the 50th percentile is the 5th value, the 90th the 9th.
        let mut lengths: Vec<u64> = (1..=10).rev().collect();
        let stats = LengthStats::from_lengths(&mut lengths);
        assert_eq!((stats.min, stats.p50, stats.p90, stats.max), (1, 5, 9, 10));
        assert_eq!(stats.total, 55);
        assert!((stats.mean - 5.5).abs() < 1e-12);
    }

    #[test]
    fn one_row_is_every_percentile() {
        let stats = LengthStats::from_lengths(&mut [7]);
        assert_eq!((stats.min, stats.p50, stats.p90, stats.max), (7, 7, 7, 7));
    }
}
