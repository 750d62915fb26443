//! # shoal-master
//!
//! The master of a shoal swarm: it holds the registry of files (manifests it countersigned and
//! the files' bytes), keeps the ownership table of which peer holds which blocks, answers
//! Locate requests with assignments (itself for first copies, a redirect to a holder after),
//! serves pieces, pulls announced files from their publishers, publishes authority events and
//! is the swarm's Kademlia bootstrap node.
//!
//! The decisions live in pure cores: [`policy`] (redirects, ownership) and [`bans`] (the ban
//! rule). [`service`] is the shell: the event loop that owns the swarm and routes events to
//! one module per concern:
//! - `announce`: who may publish, announce handling;
//! - `pull`: pulling announced files from their publishers;
//! - `serve`: serving pieces;
//! - `report`: reports from nodes;
//! - `enforce`: carrying out bans (disconnect, persist, publish) and probes;
//! - [`registry`]: the data directory, and the rescan for files added with `shoal-master add`;
//! - [`config`]: [`MasterConfig`] and [`MasterError`].
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod announce;
pub mod bans;
pub mod config;
mod enforce;
mod held;
mod listing;
pub mod location;
pub mod metrics;
pub mod policy;
pub mod probe;
mod pull;
pub mod registry;
mod report;
mod serve;
pub mod service;
pub mod vivaldi;

pub use config::{
    parse_publisher_keys, MasterConfig, MasterError, PublishPolicy, PublishQuotas, PullLimits,
};
pub use policy::{Policy, PolicyConfig};
pub use service::Master;
