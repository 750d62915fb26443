//! # shoal-net
//!
//! The tokio shell pieces that the master and the node both need, each written once:
//!
//! - [`serve`]: the piece server. Inbound `/shoal/piece/1` streams are answered within upload
//!   slots, under a request deadline, an overall per-stream deadline and a minimum rate, with
//!   an optional upload rate limit; what to serve comes from a [`serve::PieceSource`].
//! - [`keyfile`]: identity keys loaded or created with mode 0600, and durable atomic writes.
//! - [`swarm`]: the libp2p swarm (TCP with TLS or noise, then yamux; QUIC; the shoal
//!   [`Behaviour`]).
//! - [`tcp`]: the TCP transport, with the kernel's keepalive on every connection.
//! - [`tls`]: libp2p's TLS 1.3 handshake with AES-GCM preferred where the CPU has AES.
//! - [`coalesce`]: fewer, larger socket reads and TLS writes under yamux.
//! - [`mux`]: yamux sending frames as large as a block.
//! - [`relay_meter`]: the bytes the master's relay carries, counted under its muxers.
//! - [`cli`]: logging set-up and one-line error reports for the binaries.
//! - [`lock`]: one process per data directory ("data dir X is in use by process N").
//! - [`task`]: supervision of event-loop tasks, so that a panic ends the process with a
//!   non-zero exit instead of leaving it running deaf.
//!
//! Non-goals: protocol types and rules (those are `shoal-protocol`'s), policy, scheduling.
//!
//! [`Behaviour`]: shoal_protocol::behaviour::Behaviour
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod cli;
pub mod coalesce;
pub mod keyfile;
pub mod lock;
pub mod mux;
pub mod relay_meter;
pub mod serve;
pub mod swarm;
pub mod task;
pub mod tcp;
#[cfg(test)]
mod testing;
pub mod tls;

pub use keyfile::{load_or_create_key, write_atomic, KeyError};
pub use lock::{lock_data_dir, DataDirLock, LockError};
pub use relay_meter::RelayMeter;
pub use serve::{BlockReader, FileBlocks, PieceServer, PieceSource, Serve, ServeConfig};
pub use swarm::{build_swarm, SwarmError, SwarmOptions};
pub use task::{spawn_critical, CriticalTask, PanicWatch};
