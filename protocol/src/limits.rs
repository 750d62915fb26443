//! Protocol names and the size caps every decoder enforces.

use libp2p::StreamProtocol;

/// Request-response protocol spoken with the master: announce, locate, have, report, status.
pub const MASTER_PROTOCOL: StreamProtocol = StreamProtocol::new("/shoal/master/1");
/// Request-response protocol for manifest headers and block digest ranges.
pub const DIGEST_PROTOCOL: StreamProtocol = StreamProtocol::new("/shoal/digest/1");
/// Stream protocol carrying one block range per stream.
pub const PIECE_PROTOCOL: StreamProtocol = StreamProtocol::new("/shoal/piece/1");
/// Kademlia protocol name of the shoal DHT.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/shoal/kad/1");
/// Gossipsub topic of master-signed authority events.
pub const AUTHORITY_TOPIC: &str = "/shoal/authority/1";

/// Smallest block size a manifest may declare.
pub const MIN_BLOCK_SIZE: u32 = 4 * 1024;
/// Default block size (the unit of verification).
pub const DEFAULT_BLOCK_SIZE: u32 = 64 * 1024;
/// Largest block size a manifest may declare.
pub const MAX_BLOCK_SIZE: u32 = 16 * 1024 * 1024;
/// Target upper bound on the number of blocks: past it, publishers double the block size.
pub const TARGET_MAX_BLOCKS: u64 = 65_536;
/// Hard cap on the number of blocks of one file (bounds the digest list to 8 MiB).
pub const MAX_BLOCKS: u64 = 1 << 18;
/// Longest file name a manifest may carry.
pub const MAX_NAME_LEN: usize = 255;
/// Longest signature or encoded public key accepted.
pub const MAX_KEY_OR_SIG_LEN: usize = 1024;

/// Most digests one digest response may carry (512 KiB of digests).
pub const MAX_DIGESTS_PER_RESPONSE: u32 = 16_384;
/// Most ranges a Locate or Have message may carry.
pub const MAX_RANGES_PER_MESSAGE: usize = 4_096;
/// Most assignments one Locate answer may carry.
pub const MAX_ASSIGNMENTS: usize = 1_024;
/// Most addresses in one redirect hint.
pub const MAX_HINT_ADDRS: usize = 8;

/// Cap on an encoded master request (an announce carries the whole digest list).
pub const MAX_MASTER_REQUEST: usize = 9 * 1024 * 1024;
/// Cap on an encoded master response.
pub const MAX_MASTER_RESPONSE: usize = 2 * 1024 * 1024;
/// Cap on an encoded digest request.
pub const MAX_DIGEST_REQUEST: usize = 1024;
/// Cap on an encoded digest response.
pub const MAX_DIGEST_RESPONSE: usize = 600 * 1024;
/// Cap on one control frame of a piece stream.
pub const MAX_PIECE_FRAME: usize = 4 * 1024;
/// Cap on an encoded authority event.
pub const MAX_AUTHORITY_EVENT: usize = 4 * 1024;
