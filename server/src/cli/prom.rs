//! Reading a histogram out of a node's `/metrics` text, and its quantiles between two scrapes
//! the way Prometheus' `histogram_quantile` computes them: linear within the bucket that holds
//! the rank.

/// A histogram's cumulative bucket counts: `(upper bound, observations at or below it)`, in
/// the order of the exposition (ascending bounds, `+Inf` last).
pub type Buckets = Vec<(f64, u64)>;

/// The buckets of the unlabelled histogram `name` in Prometheus/OpenMetrics text, or `None`
/// when the text has none.
pub fn buckets(text: &str, name: &str) -> Option<Buckets> {
    let prefix = format!("{name}_bucket{{le=\"");
    let buckets: Buckets = text
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (bound, rest) = rest.split_once("\"}")?;
            let bound = match bound {
                "+Inf" => f64::INFINITY,
                finite => finite.parse().ok()?,
            };
            let count = rest.split_whitespace().next()?.parse().ok()?;
            Some((bound, count))
        })
        .collect();
    (!buckets.is_empty()).then_some(buckets)
}

/// The `q` quantile (0..=1) of what was observed between the scrapes `before` and `after`,
/// and how many observations that was; `None` when nothing was observed or the two scrapes
/// do not have the same buckets. A rank in the `+Inf` bucket answers the highest finite bound.
pub fn quantile_between(before: &Buckets, after: &Buckets, q: f64) -> Option<(f64, u64)> {
    // Both scrapes print the same bounds the same way, so they parse to identical bits.
    let same_bound = |(b, a): (&(f64, u64), &(f64, u64))| b.0.to_bits() == a.0.to_bits();
    if before.len() != after.len() || !before.iter().zip(after).all(same_bound) {
        return None;
    }
    let counts: Vec<(f64, u64)> = before
        .iter()
        .zip(after)
        .map(|(b, a)| (a.0, a.1.saturating_sub(b.1)))
        .collect();
    let total = counts.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let (mut lower, mut below) = (0.0, 0u64);
    for &(bound, cumulative) in &counts {
        // The rank's bucket is the first to reach it that holds an observation at all.
        if cumulative > 0 && cumulative as f64 >= rank {
            if bound.is_infinite() {
                return Some((lower, total));
            }
            let inside = (cumulative - below) as f64;
            let fraction = if inside > 0.0 {
                (rank - below as f64) / inside
            } else {
                1.0
            };
            return Some((lower + (bound - lower) * fraction, total));
        }
        (lower, below) = (bound, cumulative);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = "# HELP lag_seconds Lag.\n# TYPE lag_seconds histogram\n\
        lag_seconds_sum 1.5\nlag_seconds_count 10\n\
        lag_seconds_bucket{le=\"0.01\"} 2\nlag_seconds_bucket{le=\"0.02\"} 6\n\
        lag_seconds_bucket{le=\"0.04\"} 10\nlag_seconds_bucket{le=\"+Inf\"} 10\n\
        other_bucket{le=\"1.0\"} 99\n";

    #[test]
    fn reads_the_named_histogram_only() {
        let b = buckets(SCRAPE, "lag_seconds").unwrap();
        assert_eq!(
            b,
            vec![(0.01, 2), (0.02, 6), (0.04, 10), (f64::INFINITY, 10)]
        );
        assert!(buckets(SCRAPE, "missing").is_none());
    }

    #[test]
    fn quantiles_interpolate_within_the_bucket_of_the_rank() {
        let zero: Buckets = vec![(0.01, 0), (0.02, 0), (0.04, 0), (f64::INFINITY, 0)];
        let after = buckets(SCRAPE, "lag_seconds").unwrap();
        // Rank 5 of 10 is the 3rd of the 4 observations in (0.01, 0.02].
        let (p50, n) = quantile_between(&zero, &after, 0.5).unwrap();
        assert_eq!(n, 10);
        assert!((p50 - 0.0175).abs() < 1e-12, "{p50}");
        // Rank 1 lies in the first bucket, interpolated from zero.
        let (p10, _) = quantile_between(&zero, &after, 0.1).unwrap();
        assert!((p10 - 0.005).abs() < 1e-12, "{p10}");
        assert!((quantile_between(&zero, &after, 1.0).unwrap().0 - 0.04).abs() < 1e-12);
    }

    #[test]
    fn only_what_happened_between_the_scrapes_counts() {
        let before: Buckets = vec![(0.01, 2), (0.02, 6), (0.04, 6), (f64::INFINITY, 6)];
        let after = buckets(SCRAPE, "lag_seconds").unwrap();
        // The 4 new observations all fell in (0.02, 0.04].
        let (p0, n) = quantile_between(&before, &after, 0.0).unwrap();
        assert_eq!(n, 4);
        assert!((p0 - 0.02).abs() < 1e-12, "{p0}");
        assert!(
            quantile_between(&after, &after, 0.5).is_none(),
            "nothing new"
        );
    }

    #[test]
    fn ranks_beyond_the_last_bound_answer_it_and_mismatched_scrapes_answer_nothing() {
        let zero: Buckets = vec![(0.01, 0), (f64::INFINITY, 0)];
        let after: Buckets = vec![(0.01, 1), (f64::INFINITY, 4)];
        assert_eq!(quantile_between(&zero, &after, 0.99), Some((0.01, 4)));
        let other: Buckets = vec![(0.02, 0), (f64::INFINITY, 0)];
        assert!(quantile_between(&other, &after, 0.5).is_none());
    }
}
