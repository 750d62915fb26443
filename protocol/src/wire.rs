//! Wire messages of every shoal protocol, and the request-response codec that frames them.
//!
//! | protocol | messages |
//! |---|---|
//! | `/shoal/master/1` | [`MasterRequest`] / [`MasterResponse`] |
//! | `/shoal/publish/1` | [`PublishRequest`] / [`MasterResponse`] |
//! | `/shoal/digest/1` | [`DigestRequest`] / [`DigestResponse`] |
//! | `/shoal/piece/1`  | [`PieceRequest`] / [`PieceResponse`], then raw block bytes |
//! | `/shoal/authority/1` (gossipsub) | [`AuthorityEvent`] |

use std::{io, marker::PhantomData};

use futures::{AsyncRead, AsyncWrite};
use libp2p::{request_response, Multiaddr, PeerId, StreamProtocol};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::block::{BlockDigest, BlockRange};
use crate::frame::{read_frame, write_frame};
use crate::limits::*;
use crate::manifest::{FileId, PublisherHeader, SignedHeader};

/// A publisher announces a file on `/shoal/publish/1`; the master countersigns it and then
/// pulls its pieces. It has a protocol of its own because it is the one large request (it
/// carries the whole digest list): every request on `/shoal/master/1` is capped far lower.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishRequest {
    /// The publisher-signed header.
    pub header: PublisherHeader,
    /// The block digest list.
    pub digests: Vec<BlockDigest>,
}

/// A request to the master.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MasterRequest {
    /// A node names blocks it lacks and asks where to get them.
    Locate {
        /// The file.
        file: FileId,
        /// Blocks the node still needs (and has not in flight).
        need: Vec<BlockRange>,
    },
    /// A node now holds these verified blocks and serves them.
    Have {
        /// The file.
        file: FileId,
        /// Newly held ranges.
        ranges: Vec<BlockRange>,
        /// Piece bytes received from other peers since the last Have (for status).
        peer_bytes: u64,
    },
    /// A node could not get blocks from an assigned peer.
    Report {
        /// The file.
        file: FileId,
        /// The peer at fault.
        peer: PeerId,
        /// What went wrong.
        problem: Problem,
    },
    /// What the master knows of a file.
    Status {
        /// The file.
        file: FileId,
    },
    /// Join the swarm: the node's region, for nearby redirects.
    Hello {
        /// Free-form region label ("eu-west", "rack-3"); empty for none.
        region: String,
    },
    /// The node is leaving: drop it from every mirror list.
    Leave,
    /// The files the master holds (`shoal ls`).
    List,
    /// Round-trip times the node measured (libp2p ping) to peers it talks to, for the
    /// master's network coordinates. At most [`MAX_RTT_SAMPLES`] samples; the master refuses
    /// a longer report, takes at most one report per peer every few seconds, and ignores
    /// samples about peers it does not know.
    Rtt {
        /// The samples.
        samples: Vec<RttSample>,
    },
}

/// One measured round-trip time to a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RttSample {
    /// The peer pinged.
    pub peer: PeerId,
    /// Its round-trip time, in microseconds.
    pub rtt_us: u32,
}

/// A problem with an assigned source. Each says only what the reporter saw: a peer that died
/// looks exactly like [`Problem::Unreachable`] or [`Problem::Truncated`] to its downloaders,
/// so only [`Problem::Corrupt`] (bytes that failed their digest) is evidence of lying.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Problem {
    /// The peer could not be reached, reset the stream, or timed out (open, stall, or too slow).
    Unreachable,
    /// The peer refused because all its upload slots were busy (not a fault).
    Busy,
    /// The peer served bytes that failed their digest.
    Corrupt {
        /// The blocks that failed.
        blocks: Vec<BlockRange>,
    },
    /// The peer answered `Ok`, then the stream ended (cleanly or not) before these blocks
    /// arrived.
    Truncated {
        /// The blocks not delivered.
        blocks: Vec<BlockRange>,
    },
    /// The peer refused with `NotHeld` blocks the master said it holds.
    NotHeld {
        /// The blocks it refused.
        blocks: Vec<BlockRange>,
    },
}

/// Where to get a range of blocks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    /// From the master itself.
    Master,
    /// From a peer (a redirect), with the addresses the master knows for it.
    Peer {
        /// The holder.
        peer: PeerId,
        /// Where to dial it: the redirect hint.
        addrs: Vec<Multiaddr>,
    },
}

/// One answer to a Locate: get `range` from `source`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The blocks.
    pub range: BlockRange,
    /// Who serves them.
    pub source: Source,
}

/// A mirror in a status report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorStatus {
    /// The mirror.
    pub peer: PeerId,
    /// Its region label.
    pub region: String,
    /// Blocks it holds.
    pub blocks: u32,
    /// Whether the master currently considers it live.
    pub live: bool,
}

/// What the master knows of a file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStatus {
    /// The file.
    pub file: FileId,
    /// The file name.
    pub name: String,
    /// File size in bytes.
    pub size: u64,
    /// Number of blocks.
    pub blocks: u32,
    /// Blocks the master itself holds (all of them once a publish completed).
    pub master_blocks: u32,
    /// Mirrors known for the file: at most [`MAX_STATUS_MIRRORS`], most blocks first.
    pub mirrors: Vec<MirrorStatus>,
    /// How many mirrors there are in all (`mirrors` may list fewer).
    pub mirrors_total: u32,
    /// Blocks no live mirror holds.
    pub master_only_blocks: u32,
    /// Piece bytes the master has sent for this file.
    pub bytes_from_master: u64,
    /// Piece bytes peers reported having received from other peers.
    pub bytes_from_peers: u64,
    /// Peers banned swarm-wide: at most [`MAX_STATUS_BANNED`].
    pub banned: Vec<PeerId>,
    /// How many peers are banned in all (`banned` may list fewer).
    pub banned_total: u32,
    /// Bytes the master's relay carried for nodes behind NAT since it started, both
    /// directions, all files and circuits together (it cannot tell which file a circuit
    /// carries).
    pub relayed_bytes: u64,
}

/// An answer from the master.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MasterResponse {
    /// The announce was accepted; the header is countersigned.
    Announced {
        /// The file id.
        file: FileId,
        /// The countersigned header.
        header: Box<SignedHeader>,
    },
    /// Where to get blocks. An empty list with `retry_after_ms` means "ask again later".
    Assignments {
        /// The assignments.
        assignments: Vec<Assignment>,
        /// When nothing could be assigned now, how long to wait before asking again.
        retry_after_ms: u32,
    },
    /// Accepted.
    Ack,
    /// A status report.
    Status(Box<FileStatus>),
    /// Refused, with a reason for humans.
    Refused {
        /// Why.
        reason: String,
    },
    /// The files the master holds: at most [`crate::limits::MAX_LIST_FILES`], by name.
    Files {
        /// The files.
        files: Vec<ListedFile>,
        /// How many files there are in all (`files` may list fewer).
        total: u32,
    },
}

/// One file in a [`MasterResponse::Files`] answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedFile {
    /// The file.
    pub file: FileId,
    /// Its name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its blocks.
    pub blocks: u32,
    /// Blocks the master holds.
    pub master_blocks: u32,
    /// Mirrors (peers holding some of it).
    pub mirrors: u32,
}

/// A request for manifest parts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DigestRequest {
    /// The countersigned header.
    Header {
        /// The file.
        file: FileId,
    },
    /// Block digests `[start, start + count)`.
    Digests {
        /// The file.
        file: FileId,
        /// First block.
        start: u32,
        /// How many (capped at [`MAX_DIGESTS_PER_RESPONSE`]).
        count: u32,
    },
    /// Which blocks of the file the responder holds (asked of providers found through
    /// Kademlia while the master is unreachable).
    Holdings {
        /// The file.
        file: FileId,
    },
}

/// An answer with manifest parts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DigestResponse {
    /// The header.
    Header(Box<SignedHeader>),
    /// Digests starting at `start`.
    Digests {
        /// First block.
        start: u32,
        /// The digests.
        digests: Vec<BlockDigest>,
    },
    /// The blocks the responder holds: at most [`MAX_RANGES_PER_MESSAGE`] ranges (the first
    /// ones, if it holds more).
    Holdings {
        /// The ranges.
        ranges: Vec<BlockRange>,
    },
    /// The responder does not know this file.
    NotFound,
}

/// The first frame of a piece stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceRequest {
    /// The file.
    pub file: FileId,
    /// The blocks wanted.
    pub range: BlockRange,
}

/// The server's answer frame; on `Ok` the block bytes follow, in order, each block exactly
/// its length.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PieceResponse {
    /// The bytes follow.
    Ok,
    /// The server refuses.
    Refused(RefuseReason),
}

/// Why a server refused a piece request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseReason {
    /// It does not know the file.
    UnknownFile,
    /// It does not hold every block of the range.
    NotHeld,
    /// All upload slots are busy.
    Busy,
    /// The requester is banned.
    Banned,
    /// The range is empty, outside the file, or longer than [`MAX_PIECE_BLOCKS`] blocks.
    BadRange,
}

/// A master-signed event on the authority topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthorityEvent {
    /// A file was announced.
    FileAnnounced {
        /// The file.
        file: FileId,
        /// Its name.
        name: String,
        /// Its size.
        size: u64,
    },
    /// A peer was banned swarm-wide.
    PeerBanned {
        /// The peer.
        peer: PeerId,
    },
    /// A peer was removed from the mirror lists (dead or left).
    MirrorRemoved {
        /// The peer.
        peer: PeerId,
    },
}

/// A length-prefixed bincode codec for request-response, with per-direction size caps.
pub struct RrCodec<Req, Resp> {
    max_request: usize,
    max_response: usize,
    _types: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> Clone for RrCodec<Req, Resp> {
    fn clone(&self) -> Self {
        Self {
            max_request: self.max_request,
            max_response: self.max_response,
            _types: PhantomData,
        }
    }
}

/// The codec of `/shoal/master/1`.
pub type MasterCodec = RrCodec<MasterRequest, MasterResponse>;
/// The codec of `/shoal/digest/1`.
pub type DigestCodec = RrCodec<DigestRequest, DigestResponse>;
/// The codec of `/shoal/publish/1`.
pub type PublishCodec = RrCodec<PublishRequest, MasterResponse>;

impl Default for PublishCodec {
    fn default() -> Self {
        Self::new(MAX_PUBLISH_REQUEST, MAX_MASTER_RESPONSE)
    }
}

impl Default for MasterCodec {
    fn default() -> Self {
        Self::new(MAX_MASTER_REQUEST, MAX_MASTER_RESPONSE)
    }
}

impl Default for DigestCodec {
    fn default() -> Self {
        Self::new(MAX_DIGEST_REQUEST, MAX_DIGEST_RESPONSE)
    }
}

impl<Req, Resp> RrCodec<Req, Resp> {
    /// A codec with the given caps.
    pub fn new(max_request: usize, max_response: usize) -> Self {
        Self {
            max_request,
            max_response,
            _types: PhantomData,
        }
    }
}

impl<Req, Resp> request_response::Codec for RrCodec<Req, Resp>
where
    Req: Serialize + DeserializeOwned + Send + Sync + 'static,
    Resp: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    type Protocol = StreamProtocol;
    type Request = Req;
    type Response = Resp;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Req>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.max_request).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Resp>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.max_response).await
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Req) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req, self.max_request).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Resp,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &res, self.max_response).await
    }
}

impl DigestRequest {
    /// The file asked about.
    pub fn file(&self) -> FileId {
        match self {
            Self::Header { file } | Self::Digests { file, .. } | Self::Holdings { file } => *file,
        }
    }

    /// The answer from `manifest`, the responder's manifest of [`DigestRequest::file`] if it
    /// has one, and `have`, the blocks of it the responder holds. Digest ranges are clamped to
    /// the file and to [`MAX_DIGESTS_PER_RESPONSE`]; holdings to [`MAX_RANGES_PER_MESSAGE`]
    /// ranges.
    pub fn answer(
        &self,
        manifest: Option<&crate::VerifiedManifest>,
        have: Option<&crate::block::Blocks>,
    ) -> DigestResponse {
        let Some(m) = manifest else {
            return DigestResponse::NotFound;
        };
        match *self {
            Self::Holdings { .. } => {
                let mut ranges = have.map(|h| h.ranges()).unwrap_or_default();
                ranges.truncate(MAX_RANGES_PER_MESSAGE);
                DigestResponse::Holdings { ranges }
            }
            Self::Header { .. } => DigestResponse::Header(Box::new(m.header().clone())),
            Self::Digests { start, count, .. } => {
                let all = m.digests();
                let start = (start as usize).min(all.len());
                let end = start
                    .saturating_add(count.min(MAX_DIGESTS_PER_RESPONSE) as usize)
                    .min(all.len());
                DigestResponse::Digests {
                    start: start as u32,
                    digests: all[start..end].to_vec(),
                }
            }
        }
    }
}

/// Encodes an authority event for gossipsub.
pub fn encode_authority(event: &AuthorityEvent) -> Vec<u8> {
    crate::codec::encode(event).unwrap_or_default()
}

/// Decodes an authority event from gossipsub.
pub fn decode_authority(bytes: &[u8]) -> Result<AuthorityEvent, crate::codec::DecodeError> {
    crate::codec::decode(bytes, MAX_AUTHORITY_EVENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};
    use libp2p::identity::Keypair;
    use proptest::prelude::*;

    fn arb_range() -> impl Strategy<Value = BlockRange> {
        (any::<u32>(), any::<u32>()).prop_map(|(a, b)| BlockRange::new(a.min(b), a.max(b)))
    }

    fn arb_peer() -> impl Strategy<Value = PeerId> {
        any::<[u8; 32]>().prop_map(|seed| {
            Keypair::ed25519_from_bytes(seed)
                .expect("32 bytes")
                .public()
                .to_peer_id()
        })
    }

    fn arb_request() -> impl Strategy<Value = MasterRequest> {
        let file = any::<[u8; 32]>().prop_map(FileId);
        prop_oneof![
            (file.clone(), proptest::collection::vec(arb_range(), 0..50))
                .prop_map(|(file, need)| MasterRequest::Locate { file, need }),
            (
                file.clone(),
                arb_peer(),
                proptest::collection::vec(arb_range(), 0..5)
            )
                .prop_map(|(file, peer, blocks)| MasterRequest::Report {
                    file,
                    peer,
                    problem: Problem::Truncated { blocks }
                }),
            (file.clone(), proptest::collection::vec(arb_range(), 0..50)).prop_map(
                |(file, ranges)| MasterRequest::Have {
                    file,
                    ranges,
                    peer_bytes: 3
                }
            ),
            (
                file.clone(),
                arb_peer(),
                proptest::collection::vec(arb_range(), 0..5)
            )
                .prop_map(|(file, peer, blocks)| MasterRequest::Report {
                    file,
                    peer,
                    problem: Problem::Corrupt { blocks }
                }),
            ".{0,40}".prop_map(|region| MasterRequest::Hello { region }),
            Just(MasterRequest::Leave),
            Just(MasterRequest::List),
            proptest::collection::vec((arb_peer(), any::<u32>()), 0..8).prop_map(|s| {
                MasterRequest::Rtt {
                    samples: s
                        .into_iter()
                        .map(|(peer, rtt_us)| RttSample { peer, rtt_us })
                        .collect(),
                }
            }),
        ]
    }

    #[test]
    fn the_largest_listing_fits_the_response_cap() {
        let f = ListedFile {
            file: FileId([9; 32]),
            name: "n".repeat(crate::limits::MAX_NAME_LEN),
            size: u64::MAX,
            blocks: u32::MAX,
            master_blocks: u32::MAX,
            mirrors: u32::MAX,
        };
        let resp = MasterResponse::Files {
            files: vec![f; crate::limits::MAX_LIST_FILES],
            total: u32::MAX,
        };
        let bytes = encode(&resp).unwrap();
        assert!(bytes.len() <= MAX_MASTER_RESPONSE, "{} bytes", bytes.len());
        let back: MasterResponse = decode(&bytes, MAX_MASTER_RESPONSE).unwrap();
        assert_eq!(back, resp);
    }

    proptest! {
        #[test]
        fn master_requests_round_trip(req in arb_request()) {
            let bytes = encode(&req).unwrap();
            let back: MasterRequest = decode(&bytes, MAX_MASTER_REQUEST).unwrap();
            prop_assert_eq!(back, req);
        }

        #[test]
        fn assignments_round_trip(ranges in proptest::collection::vec(arb_range(), 0..40), peer in arb_peer(), port in any::<u16>()) {
            let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap();
            let assignments: Vec<Assignment> = ranges.iter().enumerate().map(|(i, r)| Assignment {
                range: *r,
                source: if i % 2 == 0 { Source::Master } else { Source::Peer { peer, addrs: vec![addr.clone()] } },
            }).collect();
            let resp = MasterResponse::Assignments { assignments, retry_after_ms: 7 };
            let bytes = encode(&resp).unwrap();
            let back: MasterResponse = decode(&bytes, MAX_MASTER_RESPONSE).unwrap();
            prop_assert_eq!(back, resp);
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<MasterRequest>(&bytes, MAX_MASTER_REQUEST);
            let _ = decode::<MasterResponse>(&bytes, MAX_MASTER_RESPONSE);
            let _ = decode::<DigestResponse>(&bytes, MAX_DIGEST_RESPONSE);
            let _ = decode::<PieceRequest>(&bytes, MAX_PIECE_FRAME);
            let _ = decode_authority(&bytes);
        }

        #[test]
        fn piece_requests_round_trip(file in any::<[u8; 32]>(), range in arb_range()) {
            let req = PieceRequest { file: FileId(file), range };
            let back: PieceRequest = decode(&encode(&req).unwrap(), MAX_PIECE_FRAME).unwrap();
            prop_assert_eq!(back, req);
        }

        #[test]
        fn digest_responses_over_the_cap_are_refused(n in 0u32..40_000) {
            let resp = DigestResponse::Digests { start: 0, digests: vec![BlockDigest([7; 32]); n as usize] };
            let bytes = encode(&resp).unwrap();
            let decoded = decode::<DigestResponse>(&bytes, MAX_DIGEST_RESPONSE);
            prop_assert_eq!(decoded.is_ok(), bytes.len() <= MAX_DIGEST_RESPONSE);
        }
    }

    #[test]
    fn authority_events_round_trip() {
        let peer = Keypair::generate_ed25519().public().to_peer_id();
        let e = AuthorityEvent::PeerBanned { peer };
        assert_eq!(decode_authority(&encode_authority(&e)).unwrap(), e);
    }

    #[test]
    fn the_largest_holdings_answer_fits_and_is_capped() {
        // Every other block held: the most ranges a file can have.
        let mut have = crate::block::Blocks::new(3 * MAX_RANGES_PER_MESSAGE as u32);
        for b in (0..have.capacity()).step_by(2) {
            have.insert(b);
        }
        let req = DigestRequest::Holdings {
            file: FileId([1; 32]),
        };
        // No manifest: not found, whatever is held.
        assert_eq!(req.answer(None, Some(&have)), DigestResponse::NotFound);
        let resp = DigestResponse::Holdings {
            ranges: have.ranges()[..MAX_RANGES_PER_MESSAGE].to_vec(),
        };
        let bytes = encode(&resp).unwrap();
        assert!(bytes.len() <= MAX_DIGEST_RESPONSE, "{} bytes", bytes.len());
        assert_eq!(
            decode::<DigestResponse>(&bytes, MAX_DIGEST_RESPONSE).unwrap(),
            resp
        );
        assert!(encode(&req).unwrap().len() <= MAX_DIGEST_REQUEST);
    }
}
