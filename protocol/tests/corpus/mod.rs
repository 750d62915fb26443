//! The fuzzing corpus shared by the property tests (`protocol/tests/fuzz.rs`) and the
//! long-running driver (`examples/fuzz.rs`, which includes this file by path): every decoder
//! a peer's bytes reach, a few valid encodings of each, and a seeded mutator.
//!
//! A decoder here is the path the receiving code takes: decode under the message's cap, then
//! (where the receiver does) the checks that follow. Each returns the length of the decoded
//! value re-encoded, so that callers can check that a decode never produced more than it was
//! given (a value larger than its input would mean a claim was honoured past the input).

#![allow(dead_code, unreachable_pub)]

use futures::io::Cursor;
use libp2p::{identity::Keypair, Multiaddr, PeerId};
use serde::{de::DeserializeOwned, Serialize};
use shoal_protocol::{
    codec,
    frame::read_frame,
    limits::*,
    manifest::{check_digest_list, ManifestBuilder, SignedHeader},
    wire::*,
    BlockRange, FileId, Manifest,
};

/// One decoder under test.
pub struct Decoder {
    /// A short name for reports.
    pub name: &'static str,
    /// The cap its input is decoded under.
    pub cap: usize,
    /// Decodes (and checks, as the receiver would); `Ok` is the re-encoded length.
    pub decode: fn(&[u8]) -> Result<usize, String>,
    /// Valid inputs to mutate.
    pub samples: Vec<Vec<u8>>,
    /// Whether inputs are frames (a `u32` LE length first).
    pub framed: bool,
}

fn decode_as<T: DeserializeOwned + Serialize, const CAP: usize>(b: &[u8]) -> Result<T, String> {
    codec::decode::<T>(b, CAP).map_err(|e| e.to_string())
}

fn reencoded<T: Serialize>(v: &T) -> Result<usize, String> {
    codec::encode(v).map(|b| b.len()).map_err(|e| e.to_string())
}

fn plain<T: DeserializeOwned + Serialize, const CAP: usize>(b: &[u8]) -> Result<usize, String> {
    reencoded(&decode_as::<T, CAP>(b)?)
}

fn framed<T: DeserializeOwned + Serialize, const CAP: usize>(b: &[u8]) -> Result<usize, String> {
    let mut cursor = Cursor::new(b);
    let v: T =
        futures::executor::block_on(read_frame(&mut cursor, CAP)).map_err(|e| e.to_string())?;
    // Frames carry their own length: the frame plus its prefix is what was consumed.
    reencoded(&v).map(|n| n + 4)
}

/// A publish request is decoded, then checked as the master does before it countersigns.
fn publish_request(b: &[u8]) -> Result<usize, String> {
    let r = decode_as::<PublishRequest, MAX_PUBLISH_REQUEST>(b)?;
    let n = reencoded(&r)?;
    if r.header.verify().is_ok() {
        let _ = check_digest_list(&r.header.body, &r.digests);
    }
    Ok(n)
}

/// A manifest as stored on disk: decoded under its file cap, then verified.
fn manifest_file(b: &[u8]) -> Result<usize, String> {
    let m = decode_as::<Manifest, MAX_MANIFEST_FILE>(b)?;
    let n = reencoded(&m)?;
    let _ = m.verify(None);
    Ok(n)
}

/// Authority events go through their own entry point.
fn authority(b: &[u8]) -> Result<usize, String> {
    reencoded(&decode_authority(b).map_err(|e| e.to_string())?)
}

/// A digest response whose header is checked as the node checks it.
fn digest_response(b: &[u8]) -> Result<usize, String> {
    let r = decode_as::<DigestResponse, MAX_DIGEST_RESPONSE>(b)?;
    if let DigestResponse::Header(h) = &r {
        let _ = h.verify();
    }
    reencoded(&r)
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    codec::encode(v).expect("samples encode")
}

fn frame(bytes: &[u8]) -> Vec<u8> {
    let mut out = (bytes.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(bytes);
    out
}

fn key(n: u8) -> Keypair {
    Keypair::ed25519_from_bytes([n; 32]).expect("32 bytes")
}

fn peer(n: u8) -> PeerId {
    key(n).public().to_peer_id()
}

/// A valid countersigned manifest of a small file (3 blocks of 4 KiB, the last one short).
pub fn sample_manifest() -> Manifest {
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 31 % 251) as u8).collect();
    let (publisher, master) = (key(1), key(2));
    let mut b = ManifestBuilder::new(MIN_BLOCK_SIZE);
    b.update(&data);
    let (body, digests) = b.finish(
        "sample.bin".into(),
        publisher.public().encode_protobuf(),
        master.public().to_peer_id(),
        1_700_000_000,
    );
    let header = body
        .sign(&publisher)
        .expect("sign")
        .countersign(&master)
        .expect("countersign");
    Manifest { header, digests }
}

fn ranges() -> Vec<BlockRange> {
    vec![
        BlockRange::new(0, 3),
        BlockRange::new(7, 300),
        BlockRange::new(0, u32::MAX),
    ]
}

/// Every decoder with its samples.
pub fn decoders() -> Vec<Decoder> {
    let m = sample_manifest();
    let file = FileId([7; 32]);
    let header: SignedHeader = m.header.clone();
    let addr: Multiaddr = "/ip4/127.0.0.1/tcp/4001".parse().expect("addr");
    let master_requests = vec![
        enc(&MasterRequest::Locate {
            file,
            need: ranges(),
        }),
        enc(&MasterRequest::Have {
            file,
            ranges: ranges(),
            peer_bytes: 1 << 40,
        }),
        enc(&MasterRequest::Report {
            file,
            peer: peer(3),
            problem: Problem::Corrupt { blocks: ranges() },
        }),
        enc(&MasterRequest::Report {
            file,
            peer: peer(3),
            problem: Problem::Truncated { blocks: ranges() },
        }),
        enc(&MasterRequest::Report {
            file,
            peer: peer(3),
            problem: Problem::NotHeld { blocks: ranges() },
        }),
        enc(&MasterRequest::Report {
            file,
            peer: peer(3),
            problem: Problem::Unreachable,
        }),
        enc(&MasterRequest::Report {
            file,
            peer: peer(3),
            problem: Problem::Busy,
        }),
        enc(&MasterRequest::Status { file }),
        enc(&MasterRequest::Hello {
            region: "eu-west".into(),
        }),
        enc(&MasterRequest::Leave),
    ];
    let status = FileStatus {
        file,
        name: "sample.bin".into(),
        size: 10_000,
        blocks: 3,
        master_blocks: 3,
        mirrors: vec![MirrorStatus {
            peer: peer(4),
            region: "rack-3".into(),
            blocks: 2,
            live: true,
        }],
        mirrors_total: 1,
        master_only_blocks: 1,
        bytes_from_master: 5,
        bytes_from_peers: 6,
        banned: vec![peer(5)],
        banned_total: 1,
        relayed_bytes: 0,
    };
    let master_responses = vec![
        enc(&MasterResponse::Announced {
            file,
            header: Box::new(header.clone()),
        }),
        enc(&MasterResponse::Assignments {
            assignments: vec![
                Assignment {
                    range: BlockRange::new(0, 2),
                    source: Source::Master,
                },
                Assignment {
                    range: BlockRange::new(2, 3),
                    source: Source::Peer {
                        peer: peer(4),
                        addrs: vec![addr.clone(), addr.clone()],
                    },
                },
            ],
            retry_after_ms: 250,
        }),
        enc(&MasterResponse::Ack),
        enc(&MasterResponse::Status(Box::new(status))),
        enc(&MasterResponse::Refused {
            reason: "banned".into(),
        }),
    ];
    let publish = vec![enc(&PublishRequest {
        header: shoal_protocol::manifest::PublisherHeader {
            body: m.header.body.clone(),
            publisher_sig: m.header.publisher_sig.clone(),
        },
        digests: m.digests.clone(),
    })];
    let digest_requests = vec![
        enc(&DigestRequest::Header { file }),
        enc(&DigestRequest::Digests {
            file,
            start: 1,
            count: MAX_DIGESTS_PER_RESPONSE,
        }),
    ];
    let digest_responses = vec![
        enc(&DigestResponse::Header(Box::new(header))),
        enc(&DigestResponse::Digests {
            start: 0,
            digests: m.digests.clone(),
        }),
        enc(&DigestResponse::NotFound),
    ];
    let piece_requests = vec![enc(&PieceRequest {
        file,
        range: BlockRange::new(3, 259),
    })];
    let piece_responses = vec![
        enc(&PieceResponse::Ok),
        enc(&PieceResponse::Refused(RefuseReason::UnknownFile)),
        enc(&PieceResponse::Refused(RefuseReason::NotHeld)),
        enc(&PieceResponse::Refused(RefuseReason::Busy)),
        enc(&PieceResponse::Refused(RefuseReason::Banned)),
        enc(&PieceResponse::Refused(RefuseReason::BadRange)),
    ];
    let authority_events = vec![
        enc(&AuthorityEvent::FileAnnounced {
            file,
            name: "sample.bin".into(),
            size: 10_000,
        }),
        enc(&AuthorityEvent::PeerBanned { peer: peer(5) }),
        enc(&AuthorityEvent::MirrorRemoved { peer: peer(6) }),
    ];
    let manifests = vec![enc(&m)];

    let d = |name, cap, decode, samples: &Vec<Vec<u8>>| Decoder {
        name,
        cap,
        decode,
        samples: samples.clone(),
        framed: false,
    };
    let f = |name, cap, decode, samples: &Vec<Vec<u8>>| Decoder {
        name,
        cap,
        decode,
        samples: samples.iter().map(|s| frame(s)).collect(),
        framed: true,
    };
    vec![
        d(
            "MasterRequest",
            MAX_MASTER_REQUEST,
            plain::<MasterRequest, MAX_MASTER_REQUEST>,
            &master_requests,
        ),
        d(
            "MasterResponse",
            MAX_MASTER_RESPONSE,
            plain::<MasterResponse, MAX_MASTER_RESPONSE>,
            &master_responses,
        ),
        d(
            "PublishRequest",
            MAX_PUBLISH_REQUEST,
            publish_request,
            &publish,
        ),
        d(
            "DigestRequest",
            MAX_DIGEST_REQUEST,
            plain::<DigestRequest, MAX_DIGEST_REQUEST>,
            &digest_requests,
        ),
        d(
            "DigestResponse",
            MAX_DIGEST_RESPONSE,
            digest_response,
            &digest_responses,
        ),
        d(
            "PieceRequest",
            MAX_PIECE_FRAME,
            plain::<PieceRequest, MAX_PIECE_FRAME>,
            &piece_requests,
        ),
        d(
            "PieceResponse",
            MAX_PIECE_FRAME,
            plain::<PieceResponse, MAX_PIECE_FRAME>,
            &piece_responses,
        ),
        d(
            "AuthorityEvent",
            MAX_AUTHORITY_EVENT,
            authority,
            &authority_events,
        ),
        d("Manifest", MAX_MANIFEST_FILE, manifest_file, &manifests),
        f(
            "frame:MasterRequest",
            MAX_MASTER_REQUEST,
            framed::<MasterRequest, MAX_MASTER_REQUEST>,
            &master_requests,
        ),
        f(
            "frame:MasterResponse",
            MAX_MASTER_RESPONSE,
            framed::<MasterResponse, MAX_MASTER_RESPONSE>,
            &master_responses,
        ),
        f(
            "frame:PublishRequest",
            MAX_PUBLISH_REQUEST,
            framed::<PublishRequest, MAX_PUBLISH_REQUEST>,
            &publish,
        ),
        f(
            "frame:DigestRequest",
            MAX_DIGEST_REQUEST,
            framed::<DigestRequest, MAX_DIGEST_REQUEST>,
            &digest_requests,
        ),
        f(
            "frame:DigestResponse",
            MAX_DIGEST_RESPONSE,
            framed::<DigestResponse, MAX_DIGEST_RESPONSE>,
            &digest_responses,
        ),
        f(
            "frame:PieceRequest",
            MAX_PIECE_FRAME,
            framed::<PieceRequest, MAX_PIECE_FRAME>,
            &piece_requests,
        ),
        f(
            "frame:PieceResponse",
            MAX_PIECE_FRAME,
            framed::<PieceResponse, MAX_PIECE_FRAME>,
            &piece_responses,
        ),
    ]
}

/// A bincode varint (standard config) claiming `len`: the `u64` marker, then the value.
pub fn claim(len: u64) -> Vec<u8> {
    let mut b = vec![253u8];
    b.extend_from_slice(&len.to_le_bytes());
    b
}

/// Hostile lengths a prefix may claim.
pub fn hostile_claims(cap: usize) -> [u64; 5] {
    [1 << 40, 1 << 62, u64::MAX, cap as u64 + 1, u32::MAX as u64]
}

/// A small deterministic generator (SplitMix64): the corpus needs no `rand`, and a case is
/// reproduced from its seed alone.
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// Random bytes of a random length up to `max` (short lengths favoured).
pub fn random_input(rng: &mut Rng, max: usize) -> Vec<u8> {
    let len = match rng.below(4) {
        0 => rng.below(16),
        1 => rng.below(128),
        _ => rng.below(max + 1),
    };
    rng.bytes(len)
}

/// Bytes that often matter to bincode: varint markers, enum tags, lengths.
const INTERESTING: [u8; 12] = [0, 1, 2, 5, 0x7f, 0x80, 250, 251, 252, 253, 254, 255];

/// Applies one to four random mutations to `input`; `other` is a second valid encoding to
/// splice from; `cap` is the decoder's cap (for prefix rewrites).
pub fn mutate(rng: &mut Rng, input: &[u8], other: &[u8], cap: usize) -> Vec<u8> {
    let mut b = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let pos = rng.below(b.len() + 1);
        match rng.below(11) {
            0 if !b.is_empty() => {
                let i = pos.min(b.len() - 1);
                b[i] ^= 1 << rng.below(8);
            }
            1 if !b.is_empty() => {
                let i = pos.min(b.len() - 1);
                b[i] = rng.next_u64() as u8;
            }
            2 if !b.is_empty() => {
                let i = pos.min(b.len() - 1);
                b[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            3 => b.truncate(pos),
            4 => {
                let n = 1 + rng.below(16);
                let ins = rng.bytes(n);
                b.splice(pos..pos, ins);
            }
            5 => {
                let end = (pos + 1 + rng.below(32)).min(b.len());
                if pos < end {
                    b.drain(pos..end);
                }
            }
            6 => {
                // Splice: our head, then another encoding's tail.
                let from = rng.below(other.len() + 1);
                b.truncate(pos);
                b.extend_from_slice(&other[from..]);
            }
            7 => {
                // A length prefix rewritten to a huge claim, replacing one byte or inserted.
                let claims = hostile_claims(cap);
                let mut c = claim(claims[rng.below(claims.len())]);
                if rng.below(4) == 0 {
                    c = claim(rng.next_u64());
                }
                let end = if rng.below(2) == 0 {
                    (pos + 1).min(b.len())
                } else {
                    pos
                };
                b.splice(pos..end, c);
            }
            8 => {
                let end = (pos + 1 + rng.below(64)).min(b.len());
                let seg = b[pos.min(end)..end].to_vec();
                b.splice(pos..pos, seg);
            }
            9 if b.len() >= 4 => {
                // A frame length rewritten: huge, just over the cap, or off by a little.
                let len = match rng.below(5) {
                    0 => u32::MAX,
                    1 => (cap + 1) as u32,
                    2 => cap as u32,
                    3 => (b.len() as u32)
                        .wrapping_sub(4)
                        .wrapping_add(rng.below(3) as u32)
                        .wrapping_sub(1),
                    _ => rng.next_u64() as u32,
                };
                b[..4].copy_from_slice(&len.to_le_bytes());
            }
            _ => {
                // A small varint marker placed anywhere (u16/u32/u64/u128 lengths).
                let marker = 251 + rng.below(4) as u8;
                if !b.is_empty() {
                    let i = pos.min(b.len() - 1);
                    b[i] = marker;
                }
            }
        }
    }
    b
}

/// One fuzz case for `d`: random bytes or a mutated sample, chosen by `rng`.
pub fn case(rng: &mut Rng, d: &Decoder, all: &[Decoder]) -> Vec<u8> {
    if rng.below(4) == 0 {
        let max = d.samples.iter().map(Vec::len).max().unwrap_or(64) * 2;
        let mut b = random_input(rng, max.min(64 * 1024));
        if d.framed && b.len() >= 4 && rng.below(2) == 0 {
            // Random bodies behind a length that matches, so the decoder sees them.
            let n = (b.len() - 4) as u32;
            b[..4].copy_from_slice(&n.to_le_bytes());
        }
        return b;
    }
    let sample = &d.samples[rng.below(d.samples.len())];
    let other_d = &all[rng.below(all.len())];
    let other = &other_d.samples[rng.below(other_d.samples.len())];
    let mut b = mutate(rng, sample, other, d.cap);
    if d.framed && b.len() >= 4 && rng.below(2) == 0 {
        // Keep the frame length consistent so that the body reaches the decoder.
        let n = (b.len() - 4) as u32;
        b[..4].copy_from_slice(&n.to_le_bytes());
    }
    b
}
