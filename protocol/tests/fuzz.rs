//! Property tests for every decoder a peer's bytes (or a file on disk) reach: arbitrary bytes
//! and mutations of valid encodings (bit flips, truncations, splices, length prefixes rewritten
//! to huge claims) never panic, and a decode is an error or a value no larger than its input.
//! Hostile length claims (2^40, 2^62 bytes) in every string and vector field are refused,
//! quickly: a claim honoured before the input is checked would allocate terabytes and abort
//! the process, which these tests would not survive.
//!
//! The long-running driver over the same corpus is `examples/fuzz.rs`.

mod corpus;

use std::time::{Duration, Instant};

use corpus::{claim, decoders, hostile_claims, Decoder, Rng};
use futures::io::Cursor;
use proptest::prelude::*;
use serde::Serialize;
use shoal_protocol::{
    codec, frame::read_frame, limits::*, manifest::PublisherHeader, wire::*, BlockDigest,
    BlockRange, FileId, Manifest,
};

/// A generous bound on one decode of at most a few KiB; honouring a hostile claim (allocating
/// and zeroing gigabytes, or reading until the claim is met) takes far longer or aborts.
const QUICK: Duration = Duration::from_secs(2);

/// Runs one decode and checks the property: no panic (a panic fails the test), and an `Ok`
/// value re-encodes to no more bytes than it was decoded from.
fn check(d: &Decoder, input: &[u8]) {
    let started = Instant::now();
    let result = (d.decode)(input);
    let took = started.elapsed();
    assert!(
        took < QUICK,
        "{}: decoding {} bytes took {took:?}: {}",
        d.name,
        input.len(),
        hex(input)
    );
    if let Ok(n) = result {
        assert!(
            n <= input.len(),
            "{}: decoded a value of {n} encoded bytes from {} input bytes: {}",
            d.name,
            input.len(),
            hex(input)
        );
    }
}

fn hex(b: &[u8]) -> String {
    let shown: String = b.iter().take(256).map(|x| format!("{x:02x}")).collect();
    if b.len() > 256 {
        format!("{shown}... ({} bytes)", b.len())
    } else {
        shown
    }
}

#[test]
fn every_sample_decodes_to_itself() {
    // The corpus must be valid, or mutating it tests nothing.
    for d in decoders() {
        for s in &d.samples {
            assert_eq!((d.decode)(s), Ok(s.len()), "{}: sample {}", d.name, hex(s));
        }
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
        for d in decoders() {
            check(&d, &bytes);
            if d.framed {
                // The same bytes behind a matching length, so they reach the decoder.
                let mut framed = (bytes.len() as u32).to_le_bytes().to_vec();
                framed.extend_from_slice(&bytes);
                check(&d, &framed);
            }
        }
    }

    #[test]
    fn mutated_encodings_never_panic(seed in any::<u64>()) {
        let all = decoders();
        let mut rng = Rng::new(seed);
        for d in &all {
            for _ in 0..8 {
                check(d, &corpus::case(&mut rng, d, &all));
            }
        }
    }
}

#[test]
fn a_hostile_length_prefix_at_any_position_is_harmless() {
    // Every position of every sample, the prefix replacing a byte or inserted there: wherever
    // a length is read, it is this claim.
    for d in decoders() {
        for s in &d.samples {
            // The long samples (manifests, digest lists) are mostly digests: their first
            // 512 bytes hold every length field, and the tail keeps the test fast.
            for pos in 0..=s.len().min(512) {
                for c in hostile_claims(d.cap) {
                    let mut replaced = s.clone();
                    replaced.splice(pos..(pos + 1).min(s.len()), claim(c));
                    check(&d, &replaced);
                    let mut inserted = s.clone();
                    inserted.splice(pos..pos, claim(c));
                    check(&d, &inserted);
                }
            }
        }
    }
}

/// `empty` and `one` encode the same value but for one string or vector field, empty in the
/// first and of length one in the second: the first byte where they differ is that field's
/// length. Returns `empty` with that length rewritten to claim `len`.
fn claiming_at_field(empty: &[u8], one: &[u8], len: u64) -> Vec<u8> {
    let pos = empty
        .iter()
        .zip(one)
        .position(|(a, b)| a != b)
        .expect("the encodings differ");
    assert_eq!(
        empty[pos], 0,
        "the field's length is 0 in the empty encoding"
    );
    let mut b = empty[..pos].to_vec();
    b.extend_from_slice(&claim(len));
    b.extend_from_slice(&empty[pos + 1..]);
    b
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    codec::encode(v).expect("encodes")
}

/// A field of each message type: (decoder name, encoding with it empty, with one element).
fn variable_fields() -> Vec<(&'static str, Vec<u8>, Vec<u8>)> {
    let file = FileId([9; 32]);
    let m = corpus::sample_manifest();
    let r = |n: usize| vec![BlockRange::new(0, 1); n];
    let s = |n: usize| "x".repeat(n);
    let peer = m.header.body.master;
    let report = |blocks: Vec<BlockRange>, kind: u8| MasterRequest::Report {
        file,
        peer,
        problem: match kind {
            0 => Problem::Corrupt { blocks },
            1 => Problem::Truncated { blocks },
            _ => Problem::NotHeld { blocks },
        },
    };
    let mut named = m.clone();
    named.header.body.name = String::new();
    let mut named_one = m.clone();
    named_one.header.body.name = s(1);
    let with_name = |h: &Manifest| PublishRequest {
        header: PublisherHeader {
            body: h.header.body.clone(),
            publisher_sig: h.header.publisher_sig.clone(),
        },
        digests: h.digests.clone(),
    };
    let mut no_sig = m.clone();
    no_sig.header.publisher_sig.clear();
    let mut one_sig = m.clone();
    one_sig.header.publisher_sig = vec![1];
    let mut no_key = m.clone();
    no_key.header.body.publisher_key.clear();
    let mut one_key = m.clone();
    one_key.header.body.publisher_key = vec![1];
    let mut no_digests = m.clone();
    no_digests.digests.clear();
    let mut one_digest = m.clone();
    one_digest.digests = vec![BlockDigest([0; 32])];
    let mut no_master_sig = m.clone();
    no_master_sig.header.master_sig.clear();
    let mut one_master_sig = m.clone();
    one_master_sig.header.master_sig = vec![1];
    let status = |mirrors: usize, banned: usize, name: usize| {
        MasterResponse::Status(Box::new(FileStatus {
            file,
            name: s(name),
            size: 1,
            blocks: 1,
            master_blocks: 1,
            mirrors: vec![
                MirrorStatus {
                    peer,
                    region: String::new(),
                    blocks: 1,
                    live: true
                };
                mirrors
            ],
            mirrors_total: 0,
            master_only_blocks: 0,
            bytes_from_master: 0,
            bytes_from_peers: 0,
            banned: vec![peer; banned],
            banned_total: 0,
            relayed_bytes: 0,
        }))
    };
    let assignments = |n: usize, addrs: usize| MasterResponse::Assignments {
        assignments: vec![
            Assignment {
                range: BlockRange::new(0, 1),
                source: Source::Peer {
                    peer,
                    addrs: vec!["/ip4/127.0.0.1/tcp/1".parse().expect("addr"); addrs],
                },
            };
            n
        ],
        retry_after_ms: 0,
    };
    let one_assignment = |addrs: usize| assignments(1, addrs);
    let listed = |n: usize, name: usize| MasterResponse::Files {
        files: vec![
            ListedFile {
                file,
                name: s(name),
                size: 1,
                blocks: 1,
                master_blocks: 1,
                mirrors: 0,
            };
            n
        ],
        total: 0,
    };
    vec![
        (
            "MasterRequest",
            enc(&MasterRequest::Locate { file, need: r(0) }),
            enc(&MasterRequest::Locate { file, need: r(1) }),
        ),
        (
            "MasterRequest",
            enc(&MasterRequest::Have {
                file,
                ranges: r(0),
                peer_bytes: 0,
            }),
            enc(&MasterRequest::Have {
                file,
                ranges: r(1),
                peer_bytes: 0,
            }),
        ),
        (
            "MasterRequest",
            enc(&report(r(0), 0)),
            enc(&report(r(1), 0)),
        ),
        (
            "MasterRequest",
            enc(&report(r(0), 1)),
            enc(&report(r(1), 1)),
        ),
        (
            "MasterRequest",
            enc(&report(r(0), 2)),
            enc(&report(r(1), 2)),
        ),
        (
            "MasterRequest",
            enc(&MasterRequest::Hello { region: s(0) }),
            enc(&MasterRequest::Hello { region: s(1) }),
        ),
        (
            "MasterRequest",
            enc(&MasterRequest::Rtt { samples: vec![] }),
            enc(&MasterRequest::Rtt {
                samples: vec![RttSample { peer, rtt_us: 1 }],
            }),
        ),
        (
            "PublishRequest",
            enc(&with_name(&named)),
            enc(&with_name(&named_one)),
        ),
        (
            "PublishRequest",
            enc(&with_name(&no_key)),
            enc(&with_name(&one_key)),
        ),
        (
            "PublishRequest",
            enc(&with_name(&no_sig)),
            enc(&with_name(&one_sig)),
        ),
        (
            "PublishRequest",
            enc(&with_name(&no_digests)),
            enc(&with_name(&one_digest)),
        ),
        ("Manifest", enc(&named), enc(&named_one)),
        ("Manifest", enc(&no_key), enc(&one_key)),
        ("Manifest", enc(&no_sig), enc(&one_sig)),
        ("Manifest", enc(&no_master_sig), enc(&one_master_sig)),
        ("Manifest", enc(&no_digests), enc(&one_digest)),
        (
            "MasterResponse",
            enc(&MasterResponse::Refused { reason: s(0) }),
            enc(&MasterResponse::Refused { reason: s(1) }),
        ),
        (
            "MasterResponse",
            enc(&assignments(0, 0)),
            enc(&assignments(1, 0)),
        ),
        (
            "MasterResponse",
            enc(&one_assignment(0)),
            enc(&one_assignment(1)),
        ),
        ("MasterResponse", enc(&listed(0, 0)), enc(&listed(1, 0))),
        ("MasterResponse", enc(&listed(1, 0)), enc(&listed(1, 1))),
        (
            "MasterResponse",
            enc(&status(0, 0, 0)),
            enc(&status(0, 0, 1)),
        ),
        (
            "MasterResponse",
            enc(&status(0, 0, 0)),
            enc(&status(1, 0, 0)),
        ),
        (
            "MasterResponse",
            enc(&status(0, 0, 0)),
            enc(&status(0, 1, 0)),
        ),
        (
            "MasterResponse",
            enc(&MasterResponse::Announced {
                file,
                header: Box::new(named.header.clone()),
            }),
            enc(&MasterResponse::Announced {
                file,
                header: Box::new(named_one.header.clone()),
            }),
        ),
        (
            "DigestResponse",
            enc(&DigestResponse::Digests {
                start: 0,
                digests: vec![],
            }),
            enc(&DigestResponse::Digests {
                start: 0,
                digests: vec![BlockDigest([0; 32])],
            }),
        ),
        (
            "DigestResponse",
            enc(&DigestResponse::Header(Box::new(
                no_master_sig.header.clone(),
            ))),
            enc(&DigestResponse::Header(Box::new(
                one_master_sig.header.clone(),
            ))),
        ),
        (
            "AuthorityEvent",
            enc(&AuthorityEvent::FileAnnounced {
                file,
                name: s(0),
                size: 1,
            }),
            enc(&AuthorityEvent::FileAnnounced {
                file,
                name: s(1),
                size: 1,
            }),
        ),
    ]
}

#[test]
fn every_string_and_vector_field_refuses_huge_claims() {
    let all = decoders();
    let by_name = |n: &str| all.iter().find(|d| d.name == n).expect("decoder");
    for (name, empty, one) in variable_fields() {
        let plain = by_name(name);
        assert!(
            (plain.decode)(&empty).is_ok(),
            "{name}: the empty-field encoding decodes"
        );
        for len in [1u64 << 40, 1 << 62, u64::MAX] {
            let hostile = claiming_at_field(&empty, &one, len);
            let started = Instant::now();
            let r = (plain.decode)(&hostile);
            assert!(
                r.is_err(),
                "{name}: a field claiming {len} bytes decoded: {r:?}"
            );
            assert!(
                started.elapsed() < QUICK,
                "{name}: refusing a claim of {len} took long"
            );
            // The same through a frame reader, where the wire's bytes arrive (manifests and
            // authority events are not framed).
            let mut frame = (hostile.len() as u32).to_le_bytes().to_vec();
            frame.extend_from_slice(&hostile);
            if let Some(f) = all.iter().find(|d| d.name == format!("frame:{name}")) {
                assert!(
                    (f.decode)(&frame).is_err(),
                    "frame:{name}: claim of {len} decoded"
                );
            }
        }
    }
}

#[test]
fn unknown_variants_are_errors() {
    let all = decoders();
    let by_name = |n: &str| all.iter().find(|d| d.name == n).expect("decoder");
    let file = [9u8; 32];
    let peer = corpus::sample_manifest().header.body.master.to_bytes();
    let mut report_unknown_problem = vec![2u8];
    report_unknown_problem.extend_from_slice(&file);
    report_unknown_problem.push(peer.len() as u8);
    report_unknown_problem.extend_from_slice(&peer);
    report_unknown_problem.push(5); // Problem has variants 0..=4
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("MasterRequest", vec![8]), // MasterRequest has 8 variants (Locate ... List, Rtt)
        ("MasterRequest", vec![250]),
        ("MasterRequest", vec![251, 0xff, 0xff]),
        (
            "MasterRequest",
            [vec![253], u64::MAX.to_le_bytes().to_vec()].concat(),
        ),
        ("MasterRequest", report_unknown_problem),
        ("MasterResponse", vec![6]), // MasterResponse has 6 (Announced ... Files)
        ("DigestRequest", vec![3]),  // Header, Digests, Holdings
        ("DigestResponse", vec![4]), // Header, Digests, Holdings, NotFound
        ("PieceResponse", vec![2]),
        ("PieceResponse", vec![1, 5]), // RefuseReason has variants 0..=4
        ("AuthorityEvent", vec![3]),
    ];
    for (name, bytes) in cases {
        let r = (by_name(name).decode)(&bytes);
        assert!(
            r.is_err(),
            "{name}: unknown variant {} decoded: {r:?}",
            hex(&bytes)
        );
    }
}

#[test]
fn oversized_frame_lengths_are_refused_before_reading() {
    // Only the length is there: a reader that honoured it would wait for (or allocate) the
    // body and fail with an end of input; the cap check refuses it as invalid data first.
    fn refused<T: serde::de::DeserializeOwned>(len: u32, cap: usize) {
        let mut c = Cursor::new(len.to_le_bytes().to_vec());
        let r = futures::executor::block_on(read_frame::<_, T>(&mut c, cap));
        let e = r.err().expect("an oversized frame is an error");
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::InvalidData,
            "length {len}, cap {cap}: {e}"
        );
    }
    for len in [u32::MAX, u32::MAX - 1, 1 << 31] {
        refused::<MasterRequest>(len, MAX_MASTER_REQUEST);
        refused::<PublishRequest>(len, MAX_PUBLISH_REQUEST);
        refused::<MasterResponse>(len, MAX_MASTER_RESPONSE);
        refused::<DigestRequest>(len, MAX_DIGEST_REQUEST);
        refused::<DigestResponse>(len, MAX_DIGEST_RESPONSE);
        refused::<PieceRequest>(len, MAX_PIECE_FRAME);
        refused::<PieceResponse>(len, MAX_PIECE_FRAME);
    }
    refused::<MasterRequest>(MAX_MASTER_REQUEST as u32 + 1, MAX_MASTER_REQUEST);
    refused::<PublishRequest>(MAX_PUBLISH_REQUEST as u32 + 1, MAX_PUBLISH_REQUEST);
    refused::<MasterResponse>(MAX_MASTER_RESPONSE as u32 + 1, MAX_MASTER_RESPONSE);
    refused::<DigestRequest>(MAX_DIGEST_REQUEST as u32 + 1, MAX_DIGEST_REQUEST);
    refused::<DigestResponse>(MAX_DIGEST_RESPONSE as u32 + 1, MAX_DIGEST_RESPONSE);
    refused::<PieceRequest>(MAX_PIECE_FRAME as u32 + 1, MAX_PIECE_FRAME);
    refused::<PieceResponse>(MAX_PIECE_FRAME as u32 + 1, MAX_PIECE_FRAME);
    // Manifests and authority events are whole inputs, not frames: their caps apply to
    // the input itself.
    let too_big = vec![0u8; MAX_MANIFEST_FILE + 1];
    assert!(codec::decode::<Manifest>(&too_big, MAX_MANIFEST_FILE).is_err());
    assert!(decode_authority(&vec![0u8; MAX_AUTHORITY_EVENT + 1]).is_err());
}
