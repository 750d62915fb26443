//! # shoal-protocol
//!
//! Everything the master and the nodes must agree on, and nothing that does I/O of its own.
//!
//! Goals:
//! - the content model: files cut into fixed [`block`]s, verified against SHA-256 digests
//!   signed by the publisher and countersigned by the master ([`manifest`]);
//! - the wire messages of every shoal protocol ([`wire`]), their protocol names and size
//!   limits ([`limits`]);
//! - one codec module ([`codec`]) behind which all encoding lives, so the encoding can be
//!   swapped in one place;
//! - length-prefixed frames with caps checked before allocation ([`frame`]);
//! - the two halves of piece streams ([`piece`]), generic over `futures` I/O traits so that the
//!   caller owns the socket;
//! - a pure upload-rate limiter ([`rate`]) that is told the time instead of reading a clock;
//! - the caps of the master's relay and the AutoNAT settings for nodes behind NAT ([`relay`]);
//! - shareable [`ticket`]s: a file id and the master's addresses in one string.
//!
//! Non-goals: sockets, files, timers, tasks. Those live in `shoal-master` and `shoal-node`.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod behaviour;
pub mod block;
pub mod codec;
pub mod frame;
pub mod inbound;
pub mod limits;
pub mod manifest;
pub mod piece;
pub mod rate;
pub mod relay;
pub mod ticket;
pub mod wire;

pub use block::{BlockDigest, BlockRange, Blocks};
pub use manifest::{FileId, Manifest, ManifestError, VerifiedManifest};
