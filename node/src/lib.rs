//! # shoal-node
//!
//! A shoal peer: joins a swarm from the master's bootstrap address, fetches files following
//! the master's assignments, verifies every block before it is written, serves what it holds
//! to other nodes, and publishes files of its own.
//!
//! - [`scheduler`]: the pure download state machine;
//! - [`store`]: the file on disk and the journal of verified blocks;
//! - [`service`]: the swarm event loop, the [`Client`] handle and the piece server;
//! - [`fetch`]: fetch, publish and seed, driving the scheduler through the client;
//! - [`nat`]: when a node behind NAT listens through the master's relay;
//! - [`peers`]: how many peers a node keeps connected, and which it lets go;
//! - [`progress`]: live counters of a fetch, for bars and progress lines;
//! - [`metrics`]: the node's Prometheus endpoint (`--metrics-addr`).
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod chaos;
pub mod fetch;
pub mod metrics;
pub mod nat;
pub mod peers;
pub mod progress;
pub mod provenance;
pub mod scheduler;
pub mod service;
pub mod store;

pub use fetch::{fetch, publish, seed, status, FetchOptions, FetchReport};
pub use nat::RelayMode;
pub use service::{start, Client, NodeConfig, NodeError};
