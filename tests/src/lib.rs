//! Test support for Meridian: run REAL `meridian` processes on loopback as a
//! cluster ([`Cluster`]), inject network faults between them with a userspace UDP
//! relay ([`Relay`]), and talk to them over HTTP ([`Client`]).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use std::time::Duration;
//! use meridian_tests::{Cluster, ClusterSpec, Fault};
//!
//! let cluster = Cluster::start(ClusterSpec::default().relays(true)).await?;
//! cluster.partition(&[0], &[1, 2])?;
//! cluster.node(0).client().incr("hits", 5).await?;
//! cluster.heal()?;
//! cluster.set_all_links(&Fault::delayed(Duration::from_millis(20)))?;
//! let value = cluster
//!     .wait_converged(Duration::from_secs(10), |c| async move { c.counter("hits").await })
//!     .await?;
//! assert_eq!(value, 5);
//! # Ok(())
//! # }
//! ```
//!
//! The `meridian` binary must be built first (`cargo build -p meridian-server`, or
//! any `cargo test --workspace`, which builds it); see [`meridian_bin`].

pub mod bench_env;
pub mod client;
pub mod cluster;
pub mod config;
pub mod ports;
pub mod relay;

pub use client::{
    ApiResponse, Client, Credentials, holdings, wait_all_equal, wait_for, wait_until,
};
pub use cluster::{Cluster, ClusterSpec, ConfigHook, LinkControl, Node, NodeLaunch, meridian_bin};
pub use config::NodeConfig;
pub use relay::{Direction, DirectionStats, Fault, Relay, RelayControl, RelayOptions};
pub use toml;
