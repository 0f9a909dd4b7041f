//! The Meridian node.
//!
//! # Layout
//! - [`config`]: the TOML configuration `meridian cluster init` writes.
//! - [`auth`]: bearer tokens and roles, checked in the API's `guard` middleware.
//! - [`tls`]: the HTTP API's reloadable TLS certificate; certificate fingerprints.
//! - [`storage`]: redb tables, the group-commit writer, reads; implements replication's
//!   `ReplicaStore`.
//! - [`api`]: the axum HTTP API, problem+json errors, limits.
//! - [`http`]: serving it over hyper with a timer (slowloris guard) and graceful shutdown.
//! - [`cluster`]: this node's view of its peers for `/v1/cluster` and `/metrics`.
//! - [`metrics`]: Prometheus metrics.
//! - [`replication`]: starting the replicator for a node with peers; WAL truncation.
//! - [`session`]: session tokens (HMAC-authenticated version vectors).
//! - [`node`]: wiring them into one running node.
//!
//! The `meridian` binary (`main.rs`) adds the CLI: `serve`, `cluster init`, `dev`, client
//! commands and `bench`.

pub mod api;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod http;
pub mod metrics;
pub mod node;
pub mod replication;
pub mod session;
pub mod storage;
pub mod tls;
