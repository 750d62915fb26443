//! # shoal-master
//!
//! The master of a shoal swarm: it holds the registry of files (manifests it countersigned and
//! the files' bytes), keeps the ownership table of which peer holds which blocks, answers
//! Locate requests with assignments (itself for first copies, a redirect to a holder after),
//! serves pieces, pulls announced files from their publishers, publishes authority events and
//! is the swarm's Kademlia bootstrap node.
//!
//! The decisions live in [`policy`], a pure state machine; [`service`] is the shell that owns
//! the swarm and moves messages and bytes.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod bans;
pub mod metrics;
pub mod policy;
pub mod probe;
pub mod registry;
mod report;
pub mod service;

pub use policy::{Policy, PolicyConfig};
pub use service::{Master, MasterConfig, MasterError};
