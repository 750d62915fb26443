//! Protocol names and the size caps every decoder enforces.

use libp2p::StreamProtocol;

/// Request-response protocol spoken with the master: announce, locate, have, report, status.
pub const MASTER_PROTOCOL: StreamProtocol = StreamProtocol::new("/shoal/master/1");
/// Request-response protocol on which publishers announce files (the one large request).
pub const PUBLISH_PROTOCOL: StreamProtocol = StreamProtocol::new("/shoal/publish/1");
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

/// Most blocks one piece request may ask for: a request covers at most one piece.
pub const MAX_PIECE_BLOCKS: u32 = 256;
/// Most mirrors a status answer lists (it also carries the total).
pub const MAX_STATUS_MIRRORS: usize = 1_024;
/// Most banned peers a status answer lists (it also carries the total).
pub const MAX_STATUS_BANNED: usize = 1_024;
/// Most files a `List` answer carries (it also carries the total); about 300 bytes each at
/// most, well within [`MAX_MASTER_RESPONSE`].
pub const MAX_LIST_FILES: usize = 1_000;
/// Most samples one RTT report may carry.
pub const MAX_RTT_SAMPLES: usize = 32;
/// Longest region label the master keeps.
pub const MAX_REGION_LEN: usize = 64;

/// Cap on an encoded master request (a Locate or Have of [`MAX_RANGES_PER_MESSAGE`] ranges is
/// at most about 40 KiB).
pub const MAX_MASTER_REQUEST: usize = 64 * 1024;
/// Cap on an encoded publish request (it carries the whole digest list: 8 MiB at
/// [`MAX_BLOCKS`]).
pub const MAX_PUBLISH_REQUEST: usize = 9 * 1024 * 1024;
/// Cap on a manifest file on disk (header plus digest list).
pub const MAX_MANIFEST_FILE: usize = MAX_PUBLISH_REQUEST;
/// Cap on an encoded master response (1,024 assignments with full hints, or a status of
/// [`MAX_STATUS_MIRRORS`] mirrors, fit well within it).
pub const MAX_MASTER_RESPONSE: usize = 1024 * 1024;
/// Cap on an encoded digest request.
pub const MAX_DIGEST_REQUEST: usize = 1024;
/// Cap on an encoded digest response.
pub const MAX_DIGEST_RESPONSE: usize = 600 * 1024;
/// Cap on one control frame of a piece stream.
pub const MAX_PIECE_FRAME: usize = 4 * 1024;
/// Cap on an encoded authority event.
pub const MAX_AUTHORITY_EVENT: usize = 4 * 1024;
