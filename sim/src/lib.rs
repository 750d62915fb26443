//! # shoal-sim
//!
//! Swarm simulations for researchers. A scenario file ([`scenario`]) describes a swarm: the
//! file, the master, groups of nodes with their regions and capacities, latencies, arrivals,
//! churn and misbehaving nodes. The virtual engine ([`engine`]) runs it in virtual time with
//! the master's real policy ([`shoal_master::Policy`]), each node's real scheduler
//! ([`shoal_node::scheduler::Scheduler`]) and the real ban rule
//! ([`shoal_master::bans::BanBook`]), over a bandwidth model ([`net`]); two baselines
//! ([`redirect`]) answer the same Locates differently. [`report`] turns a run into
//! `summary.json`, `nodes.csv` and a text summary, [`plot`] into pictures, with the
//! Kumar-Ross lower bound ([`bound`]) beside every result.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod bound;
pub mod draw;
pub mod engine;
pub mod live;
pub mod net;
pub mod plot;
pub mod redirect;
pub mod report;
pub mod scenario;
pub mod timers;

pub use engine::{run, Outcome, Progress};
pub use redirect::PolicyKind;
pub use scenario::Scenario;
