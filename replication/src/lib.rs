//! Meridian's node-to-node protocol.
pub mod store;
