//! The environment variables the ignored benchmarks in `tests/tests/bench_*.rs` take.

use std::str::FromStr;

/// `name` parsed, or `default` when it is unset. Panics naming the variable when it does not
/// parse: a benchmark run with a typo should stop, not measure the default.
pub fn env_or<T: FromStr>(name: &str, default: T) -> T {
    std::env::var(name).map_or(default, |value| {
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}: cannot parse {value:?}"))
    })
}

/// `MERIDIAN_BENCH_DELAYS_MS`: the link delays to run, comma-separated milliseconds
/// (default `0,50`).
pub fn link_delays_ms() -> Vec<u64> {
    std::env::var("MERIDIAN_BENCH_DELAYS_MS")
        .unwrap_or_else(|_| "0,50".into())
        .split(',')
        .map(|delay| {
            delay.trim().parse().unwrap_or_else(|_| {
                panic!("MERIDIAN_BENCH_DELAYS_MS: {delay:?} is not milliseconds")
            })
        })
        .collect()
}
