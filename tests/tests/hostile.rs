//! A hostile client that speaks raw frames on shoal's own protocols (its own minimal swarm, not
//! the node code: [`shoal_tests::raw`]) attacks a real master holding a published file, one
//! attack after another. Afterwards the master still runs, an honest node fetches the exact
//! bytes, and nobody is banned (issue 7, "Tests that must exist and pass").
//!
//! Each attack's outcome is checked where it happens; checks that do not end the test at once
//! (the master is still alive, else nothing after it means anything) are collected and
//! reported together at the end, so one run shows every attack that got through.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use futures::AsyncWriteExt;
use libp2p::{identity::Keypair, PeerId, StreamProtocol};
use serde::Serialize;
use shoal_master::{Master, PublishPolicy};
use shoal_node::FetchOptions;
use shoal_protocol::{
    codec,
    limits::*,
    manifest::{digest_list_sha256, HeaderBody},
    wire::*,
    BlockDigest, BlockRange, FileId,
};
use shoal_tests::raw::{claim, frame, unframe, RawPeer};

/// Checks that do not stop the test; reported together at the end.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            let msg = what();
            eprintln!("FAILED: {msg}");
            self.0.push(msg);
        }
    }
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    codec::encode(v).expect("encodes")
}

/// `empty` and `one` encode the same value but for one string or vector field (empty, then of
/// length one): the first byte where they differ is that field's length. Returns `empty` with
/// that length rewritten to claim `len` bytes.
fn claiming_at_field(empty: &[u8], one: &[u8], len: u64) -> Vec<u8> {
    let pos = empty
        .iter()
        .zip(one)
        .position(|(a, b)| a != b)
        .expect("the encodings differ");
    let mut b = empty[..pos].to_vec();
    b.extend_from_slice(&claim(len));
    b.extend_from_slice(&empty[pos + 1..]);
    b
}

/// One liveness probe: the master's handle answers a status (`Ok(false)` if its loop is gone),
/// and so does its network loop (a raw Status request from `raw`).
async fn status_answers(master: &Master, file: FileId, raw: &RawPeer) -> anyhow::Result<bool> {
    let status = tokio::time::timeout(Duration::from_secs(10), master.status(file))
        .await
        .context("the master's loop did not answer a status in 10 s")?;
    if status.is_none() {
        return Ok(false);
    }
    let answer = raw
        .master_request(master.peer_id(), &MasterRequest::Status { file })
        .await
        .context("a Status over the network failed")?;
    anyhow::ensure!(
        matches!(answer, MasterResponse::Status(_)),
        "Status over the network answered {answer:?}"
    );
    Ok(true)
}

/// The master is alive after `after`. A master that answers only after a while (an event loop
/// stalled by the attack, catching up) is a recorded failure; one whose loop is gone, or that
/// has not answered for 60 s, ends the test: nothing after that would mean anything.
async fn alive(
    master: &Master,
    file: FileId,
    raw: &RawPeer,
    after: &str,
    failures: &mut Failures,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        match status_answers(master, file, raw).await {
            Ok(true) => break,
            Ok(false) => anyhow::bail!("after {after}: the master's loop is gone"),
            Err(e) if started.elapsed() > Duration::from_secs(60) => {
                return Err(e.context(format!(
                    "after {after}: the master has not answered a Status for 60 s"
                )))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    let took = started.elapsed();
    failures.check(took < Duration::from_secs(10), || {
        format!(
            "after {after}: the master took {took:.1?} to answer a Status (its loop was stalled)"
        )
    });
    Ok(())
}

/// Every file under `dir` with its size.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, u64> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            match e.metadata() {
                Ok(m) if m.is_dir() => todo.push(p),
                Ok(m) => {
                    out.insert(p, m.len());
                }
                Err(_) => {}
            }
        }
    }
    out
}

/// Sends raw `bytes` on `protocol` and classifies what came back: `None` when the master
/// answered nothing (it refused to decode and dropped or reset the stream), or the answer.
async fn send_raw(
    raw: &RawPeer,
    master: PeerId,
    protocol: StreamProtocol,
    bytes: &[u8],
) -> anyhow::Result<Option<Vec<u8>>> {
    match raw
        .exchange(master, protocol.clone(), bytes, Duration::from_secs(15))
        .await
        .with_context(|| format!("sending {} raw bytes on {protocol}", bytes.len()))?
    {
        Ok(answer) if answer.is_empty() => Ok(None),
        Ok(answer) => Ok(Some(answer)),
        Err(_) => Ok(None),
    }
}

/// A request the master must not act on: it answers nothing, or a refusal.
fn not_accepted(answer: &Option<Vec<u8>>) -> bool {
    match answer {
        None => true,
        Some(bytes) => matches!(
            unframe::<MasterResponse>(bytes, MAX_MASTER_RESPONSE),
            Ok(MasterResponse::Refused { .. })
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_client_cannot_crash_stall_fill_or_ban_through_the_master() -> anyhow::Result<()>
{
    shoal_tests::init_tracing();
    let started = Instant::now();
    let tmp = tempfile::tempdir()?;
    let size = 16 * 1024 * 1024;
    // A master that trusts one publisher (as a public master would be run), holding a file
    // that publisher published; the publisher has left.
    let src = tmp.path().join("source.bin");
    shoal_tests::write_random_file(&src, size, 21)?;
    let publisher_dir = tmp.path().join("publisher");
    std::fs::create_dir_all(&publisher_dir)?;
    let trusted = shoal_node::service::load_or_create_key(&publisher_dir.join("identity.key"))?
        .public()
        .to_peer_id();
    let master_dir = tmp.path().join("master");
    let master = Master::start(
        shoal_tests::master_config(&master_dir, None)
            .with_publishing(PublishPolicy::Trusted([trusted].into())),
    )
    .await
    .context("starting the master")?;
    let bootstrap = master.addrs()[0].clone();
    let (publisher, file) = shoal_tests::publish(&publisher_dir, &bootstrap, &src).await?;
    publisher.shutdown().await;
    let mid = master.peer_id();
    let blocks = master
        .status(file)
        .await
        .context("status of the published file")?
        .blocks;
    let mut failures = Failures::default();

    let hostile = RawPeer::start(Keypair::generate_ed25519(), false, Some(&bootstrap)).await?;
    anyhow::ensure!(
        hostile.connections() == 1,
        "the hostile client could not connect"
    );
    alive(&master, file, &hostile, "connecting", &mut failures).await?;

    // 1. Length claims of 2^40 and 2^62 bytes in every string or vector field of every
    // request type. Before bounded decoding, one 13-byte Hello aborted the master.
    let file_id = FileId([5; 32]);
    let any_peer = Keypair::generate_ed25519().public().to_peer_id();
    let r = |n: usize| vec![BlockRange::new(0, 1); n];
    let report = |blocks: Vec<BlockRange>, kind: u8| MasterRequest::Report {
        file: file_id,
        peer: any_peer,
        problem: match kind {
            0 => Problem::Corrupt { blocks },
            1 => Problem::Truncated { blocks },
            _ => Problem::NotHeld { blocks },
        },
    };
    let publisher = Keypair::generate_ed25519();
    let body = |name: &str, key: Vec<u8>| HeaderBody {
        name: name.into(),
        size: 10,
        block_size: MIN_BLOCK_SIZE,
        file_sha256: [0; 32],
        digest_list_sha256: [0; 32],
        publisher_key: key,
        master: mid,
        created_unix_s: 0,
    };
    let publish = |name: &str, key: Vec<u8>, sig: Vec<u8>, digests: usize| PublishRequest {
        header: shoal_protocol::manifest::PublisherHeader {
            body: body(name, key),
            publisher_sig: sig,
        },
        digests: vec![BlockDigest([0; 32]); digests],
    };
    let key = publisher.public().encode_protobuf();
    let master_fields: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        (
            "Locate.need",
            enc(&MasterRequest::Locate {
                file: file_id,
                need: r(0),
            }),
            enc(&MasterRequest::Locate {
                file: file_id,
                need: r(1),
            }),
        ),
        (
            "Have.ranges",
            enc(&MasterRequest::Have {
                file: file_id,
                ranges: r(0),
                peer_bytes: 0,
            }),
            enc(&MasterRequest::Have {
                file: file_id,
                ranges: r(1),
                peer_bytes: 0,
            }),
        ),
        (
            "Report.Corrupt.blocks",
            enc(&report(r(0), 0)),
            enc(&report(r(1), 0)),
        ),
        (
            "Report.Truncated.blocks",
            enc(&report(r(0), 1)),
            enc(&report(r(1), 1)),
        ),
        (
            "Report.NotHeld.blocks",
            enc(&report(r(0), 2)),
            enc(&report(r(1), 2)),
        ),
        (
            "Hello.region",
            enc(&MasterRequest::Hello {
                region: String::new(),
            }),
            enc(&MasterRequest::Hello { region: "x".into() }),
        ),
        (
            "Rtt.samples",
            enc(&MasterRequest::Rtt { samples: vec![] }),
            enc(&MasterRequest::Rtt {
                samples: vec![RttSample {
                    peer: any_peer,
                    rtt_us: 1,
                }],
            }),
        ),
    ];
    let publish_fields: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        (
            "Publish.name",
            enc(&publish("", key.clone(), vec![], 0)),
            enc(&publish("x", key.clone(), vec![], 0)),
        ),
        (
            "Publish.publisher_key",
            enc(&publish("n", vec![], vec![], 0)),
            enc(&publish("n", vec![1], vec![], 0)),
        ),
        (
            "Publish.publisher_sig",
            enc(&publish("n", key.clone(), vec![], 0)),
            enc(&publish("n", key.clone(), vec![1], 0)),
        ),
        (
            "Publish.digests",
            enc(&publish("n", key.clone(), vec![], 0)),
            enc(&publish("n", key.clone(), vec![], 1)),
        ),
    ];
    for len in [1u64 << 40, 1 << 62] {
        for (field, empty, one) in &master_fields {
            let bytes = frame(&claiming_at_field(empty, one, len));
            let answer = send_raw(&hostile, mid, MASTER_PROTOCOL, &bytes).await?;
            failures.check(not_accepted(&answer), || {
                format!("{field} claiming {len} bytes was answered: {answer:?}")
            });
        }
        // Report.peer: a PeerId is a byte string too.
        let mut bytes = vec![2u8];
        bytes.extend_from_slice(&file_id.0);
        bytes.extend_from_slice(&claim(len));
        let answer = send_raw(&hostile, mid, MASTER_PROTOCOL, &frame(&bytes)).await?;
        failures.check(not_accepted(&answer), || {
            format!("Report.peer claiming {len} bytes was answered: {answer:?}")
        });
        for (field, empty, one) in &publish_fields {
            let bytes = frame(&claiming_at_field(empty, one, len));
            let answer = send_raw(&hostile, mid, PUBLISH_PROTOCOL, &bytes).await?;
            failures.check(not_accepted(&answer), || {
                format!("{field} claiming {len} bytes was answered: {answer:?}")
            });
        }
        // Digest and piece requests have no string or vector field: the claim lands where
        // their fixed-size fields are.
        for (protocol, tag) in [(DIGEST_PROTOCOL, Some(1u8)), (PIECE_PROTOCOL, None)] {
            let mut bytes: Vec<u8> = tag.into_iter().collect();
            bytes.extend_from_slice(&claim(len));
            bytes.extend_from_slice(&[0; 40]);
            let answer = send_raw(&hostile, mid, protocol.clone(), &frame(&bytes)).await?;
            let ok = match &answer {
                None => true,
                // A digest answer of NotFound is harmless; a piece refusal too.
                Some(a) => {
                    unframe::<DigestResponse>(a, MAX_DIGEST_RESPONSE)
                        .is_ok_and(|r| r == DigestResponse::NotFound)
                        || unframe::<PieceResponse>(a, MAX_PIECE_FRAME)
                            .is_ok_and(|r| matches!(r, PieceResponse::Refused(_)))
                }
            };
            failures.check(ok, || {
                format!("{protocol} claiming {len} bytes was answered: {answer:?}")
            });
        }
        alive(
            &master,
            file,
            &hostile,
            &format!("length claims of {len} bytes"),
            &mut failures,
        )
        .await?;
    }

    // 1b. Well-formed Locates and Haves for a file the master does not know: a refusal or an
    // empty answer, not a crash (a lone-piece cap once computed before the file lookup made
    // such a Locate panic the master's loop).
    for request in [
        MasterRequest::Locate {
            file: file_id,
            need: r(1),
        },
        MasterRequest::Have {
            file: file_id,
            ranges: r(1),
            peer_bytes: 0,
        },
    ] {
        send_raw(&hostile, mid, MASTER_PROTOCOL, &frame(&enc(&request))).await?;
    }
    alive(
        &master,
        file,
        &hostile,
        "a Locate and a Have for an unknown file",
        &mut failures,
    )
    .await?;

    // 2. Oversized frame lengths: u32::MAX, and one byte over each protocol's cap. Only the
    // length is sent: the master must refuse it from the length alone.
    for (protocol, cap) in [
        (MASTER_PROTOCOL, MAX_MASTER_REQUEST),
        (PUBLISH_PROTOCOL, MAX_PUBLISH_REQUEST),
        (DIGEST_PROTOCOL, MAX_DIGEST_REQUEST),
        (PIECE_PROTOCOL, MAX_PIECE_FRAME),
    ] {
        for len in [u32::MAX, cap as u32 + 1] {
            let answer = send_raw(&hostile, mid, protocol.clone(), &len.to_le_bytes()).await?;
            failures.check(answer.is_none(), || {
                format!("{protocol}: a frame of {len} bytes (cap {cap}) was answered: {answer:?}")
            });
        }
    }
    alive(
        &master,
        file,
        &hostile,
        "oversized frame lengths",
        &mut failures,
    )
    .await?;

    // 3. Unknown enum variants.
    let peer_bytes = any_peer.to_bytes();
    let mut unknown_problem = vec![2u8];
    unknown_problem.extend_from_slice(&file.0);
    unknown_problem.push(peer_bytes.len() as u8);
    unknown_problem.extend_from_slice(&peer_bytes);
    unknown_problem.push(5);
    // MasterRequest has 8 variants (Locate ... List, Rtt), Problem 5, DigestRequest fewer
    // than 9: the first bytes below name none of them.
    for (protocol, bytes) in [
        (MASTER_PROTOCOL, vec![8u8]),
        (MASTER_PROTOCOL, vec![250]),
        (MASTER_PROTOCOL, unknown_problem),
        (DIGEST_PROTOCOL, vec![9]),
        (DIGEST_PROTOCOL, vec![7, 1, 2, 3]),
    ] {
        let answer = send_raw(&hostile, mid, protocol.clone(), &frame(&bytes)).await?;
        failures.check(answer.is_none(), || {
            format!("{protocol}: unknown variant {bytes:?} was answered: {answer:?}")
        });
    }
    alive(&master, file, &hostile, "unknown variants", &mut failures).await?;

    // 3b. RTT reports: over the sample cap (one over, and as many as fit in a request) they
    // are refused whole; garbage samples (unknown peers, itself, zero, 71 minutes) are taken
    // as nothing; a second report at once is refused (rate limit); a report whose sample
    // list is cut off or holds a bogus PeerId does not decode.
    let sample = |peer, rtt_us| RttSample { peer, rtt_us };
    let me = hostile.peer_id();
    for n in [MAX_RTT_SAMPLES + 1, 1_400] {
        let bytes = frame(&enc(&MasterRequest::Rtt {
            samples: vec![sample(any_peer, 1_000); n],
        }));
        anyhow::ensure!(
            bytes.len() <= MAX_MASTER_REQUEST + 4,
            "{n} samples exceed the request cap"
        );
        let answer = send_raw(&hostile, mid, MASTER_PROTOCOL, &bytes).await?;
        failures.check(not_accepted(&answer), || {
            format!("an RTT report of {n} samples was answered: {answer:?}")
        });
    }
    let garbage: Vec<RttSample> = (0..MAX_RTT_SAMPLES as u32)
        .map(|i| match i % 4 {
            0 => sample(Keypair::generate_ed25519().public().to_peer_id(), 1_000),
            1 => sample(me, 1),
            2 => sample(mid, 0),
            _ => sample(mid, u32::MAX),
        })
        .collect();
    let garbage = frame(&enc(&MasterRequest::Rtt { samples: garbage }));
    let answer = send_raw(&hostile, mid, MASTER_PROTOCOL, &garbage).await?;
    failures.check(
        answer.as_ref().is_some_and(|a| {
            unframe::<MasterResponse>(a, MAX_MASTER_RESPONSE)
                .is_ok_and(|r| r == MasterResponse::Ack)
        }),
        || format!("a report of garbage samples was not simply acknowledged: {answer:?}"),
    );
    let answer = send_raw(&hostile, mid, MASTER_PROTOCOL, &garbage).await?;
    failures.check(not_accepted(&answer), || {
        format!("a second RTT report at once was answered: {answer:?}")
    });
    let whole = enc(&MasterRequest::Rtt {
        samples: vec![sample(any_peer, 5); 2],
    });
    let mut bogus_peer = whole.clone();
    // The first sample's PeerId: its length byte, then a multihash; spoil the multihash code.
    bogus_peer[3] ^= 0xff;
    for (what, bytes) in [
        ("cut off", whole[..whole.len() - 3].to_vec()),
        ("with a bogus PeerId", bogus_peer),
    ] {
        let answer = send_raw(&hostile, mid, MASTER_PROTOCOL, &frame(&bytes)).await?;
        failures.check(answer.is_none(), || {
            format!("an RTT report {what} was answered: {answer:?}")
        });
    }
    alive(&master, file, &hostile, "RTT reports", &mut failures).await?;

    // 4. An announce from a key the master was not told to trust: refused, and no disk used
    // (no manifest stored, no space reserved, no pull).
    let untrusted = Keypair::generate_ed25519();
    let announcer = RawPeer::start(untrusted.clone(), false, Some(&bootstrap)).await?;
    let announced_size: u64 = 64 << 30;
    let digests = vec![BlockDigest([7; 32]); (announced_size / (1 << 20)) as usize];
    let header = HeaderBody {
        name: "fill-the-disk.bin".into(),
        size: announced_size,
        block_size: 1 << 20,
        file_sha256: [1; 32],
        digest_list_sha256: digest_list_sha256(&digests),
        publisher_key: untrusted.public().encode_protobuf(),
        master: mid,
        created_unix_s: 1,
    }
    .sign(&untrusted)
    .context("signing the untrusted header")?;
    // The published file's own entries may still be settling (its completion marker is
    // written after the pull): only what is not the published file counts.
    let published = file.to_string();
    let others = |snap: BTreeMap<PathBuf, u64>| -> BTreeMap<PathBuf, u64> {
        snap.into_iter()
            .filter(|(p, _)| !p.to_string_lossy().contains(&published))
            .collect()
    };
    let before = others(snapshot(&master_dir));
    let answer = send_raw(
        &announcer,
        mid,
        PUBLISH_PROTOCOL,
        &frame(&enc(&PublishRequest { header, digests })),
    )
    .await?;
    failures.check(not_accepted(&answer), || {
        let said = match answer
            .as_deref()
            .map(|a| unframe::<MasterResponse>(a, MAX_MASTER_RESPONSE))
        {
            Some(Ok(MasterResponse::Announced { file, .. })) => format!("Announced {file}"),
            other => format!("{other:?}"),
        };
        format!(
            "an announce of {announced_size} bytes from untrusted {} was accepted: {said}",
            untrusted.public().to_peer_id(),
        )
    });
    // A pull would start at once; give it a moment to touch the disk.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = others(snapshot(&master_dir));
    failures.check(before == after, || {
        let changed: Vec<_> = after
            .iter()
            .filter(|(p, s)| before.get(*p) != Some(*s))
            .map(|(p, s)| format!("{} ({s} bytes)", p.display()))
            .collect();
        format!("the refused announce changed the master's data dir: {changed:?}")
    });
    drop(announcer);
    alive(
        &master,
        file,
        &hostile,
        "an untrusted announce",
        &mut failures,
    )
    .await?;

    // 5. A flood of Have and Locate requests with 4,096 overlapping full ranges, from several
    // peers and streams, while an honest node's normal Locate is timed.
    let honest_dir = tmp.path().join("honest");
    let honest = shoal_tests::start_node(&honest_dir, &bootstrap, None).await?;
    let full: Vec<BlockRange> = (0..MAX_RANGES_PER_MESSAGE)
        .map(|i| {
            if i % 2 == 0 {
                BlockRange::new(0, u32::MAX)
            } else {
                BlockRange::new(0, blocks)
            }
        })
        .collect();
    let flood_have = frame(&enc(&MasterRequest::Have {
        file,
        ranges: full.clone(),
        peer_bytes: 0,
    }));
    let flood_locate = frame(&enc(&MasterRequest::Locate { file, need: full }));
    anyhow::ensure!(flood_have.len() <= MAX_MASTER_REQUEST + 4);
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let mut flooders = Vec::new();
    let mut flood_tasks = Vec::new();
    for _ in 0..4 {
        let f =
            Arc::new(RawPeer::start(Keypair::generate_ed25519(), false, Some(&bootstrap)).await?);
        for stream in 0..6 {
            let (f, stop, answered) = (f.clone(), stop.clone(), answered.clone());
            let msg = if stream % 2 == 0 {
                flood_have.clone()
            } else {
                flood_locate.clone()
            };
            flood_tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(Ok(Ok(a))) = tokio::time::timeout(
                        Duration::from_secs(5),
                        f.exchange(mid, MASTER_PROTOCOL, &msg, Duration::from_secs(5)),
                    )
                    .await
                    {
                        if !a.is_empty() {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        flooders.push(f);
    }
    // Let the flood get going, then time a normal Locate (every block, as a fetch starts).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut latencies = Vec::new();
    for _ in 0..9 {
        let t = Instant::now();
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            honest.master_request(MasterRequest::Locate {
                file,
                need: vec![BlockRange::new(0, blocks)],
            }),
        )
        .await;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        latencies.push(ms);
        match answer {
            Ok(Ok(MasterResponse::Assignments { .. })) => {}
            other => failures.check(false, || {
                format!("an honest Locate during the flood was not answered: {other:?} after {ms:.0} ms")
            }),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in flood_tasks {
        let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
    }
    let flood_answers = answered.load(Ordering::Relaxed);
    let (median, max) = shoal_tests::median_max(latencies.clone());
    eprintln!(
        "range flood: {flood_answers} flood requests answered; honest Locate median {median:.1} ms, max {max:.1} ms ({latencies:?})"
    );
    failures.check(median < 100.0, || {
        format!("an honest Locate took a median of {median:.1} ms (max {max:.1} ms) during the range flood ({flood_answers} flood requests answered): the bound is 100 ms")
    });
    drop(flooders);
    alive(&master, file, &hostile, "the range flood", &mut failures).await?;

    // 6. Reports about blocks the reporters were never assigned, against an honest node, and
    // reports against the master itself, from several identities (more than any accuser
    // threshold).
    let mut reporters = vec![];
    for _ in 0..4 {
        reporters.push(RawPeer::start(Keypair::generate_ed25519(), false, Some(&bootstrap)).await?);
    }
    for reporter in &reporters {
        for culprit in [honest.peer_id(), mid] {
            for problem in [
                Problem::Corrupt {
                    blocks: vec![BlockRange::new(0, 4)],
                },
                Problem::Truncated {
                    blocks: vec![BlockRange::new(0, 4)],
                },
                Problem::NotHeld {
                    blocks: vec![BlockRange::new(0, 4)],
                },
            ] {
                let req = MasterRequest::Report {
                    file,
                    peer: culprit,
                    problem,
                };
                // The answer does not matter (an Ack or a refusal); what follows from it does.
                let _ = reporter.master_request(mid, &req).await;
            }
        }
    }
    // Give any probe the reports may have started time to end (a probe is bounded at 15 s).
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(reporters);
    alive(&master, file, &hostile, "false reports", &mut failures).await?;

    // 7. 200 connections from one address, with distinct PeerIds, and 8 with one PeerId
    // (over the per-peer cap of 2).
    let dials: Vec<_> = (0..200)
        .map(|_| {
            let b = bootstrap.clone();
            tokio::spawn(async move {
                RawPeer::start(Keypair::generate_ed25519(), false, Some(&b)).await
            })
        })
        .collect();
    let same = Keypair::generate_ed25519();
    let mut same_key = Vec::new();
    for _ in 0..8 {
        same_key.push(RawPeer::start(same.clone(), false, Some(&bootstrap)).await?);
    }
    let mut crowd = Vec::new();
    for d in dials {
        if let Ok(Ok(p)) = d.await {
            crowd.push(p);
        }
    }
    // Refused connections close shortly after their handshake: let them settle.
    let settle = Instant::now() + Duration::from_secs(10);
    let live_same = loop {
        let n: usize = same_key.iter().map(RawPeer::connections).sum();
        if n <= 2 || Instant::now() > settle {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let live_crowd: usize = crowd.iter().map(RawPeer::connections).sum();
    eprintln!("200 dials: {} settled, {live_crowd} connected; one PeerId dialled 8 times: {live_same} connected", crowd.len());
    failures.check(live_same <= 2, || {
        format!("one PeerId holds {live_same} connections to the master (per-peer cap 2)")
    });
    alive(&master, file, &hostile, "200 connections", &mut failures).await?;
    drop(crowd);
    drop(same_key);

    // 8. 96 piece requests of 8 blocks (512 KiB, twice a yamux stream window) that are never
    // read, held open while an honest node fetches: the master's upload slots (64) must come
    // back without the requester's help. They are paced a little, since a listener may drop
    // inbound streams that arrive faster than it accepts them (that is no fault); those that
    // fail are counted.
    let mut unread = Vec::new();
    let mut dropped = 0;
    for i in 0..96u32 {
        let start = (i * 8) % blocks.saturating_sub(8).max(1);
        let req = frame(&enc(&PieceRequest {
            file,
            range: BlockRange::new(start, (start + 8).min(blocks)),
        }));
        let mut s = hostile
            .open(mid, PIECE_PROTOCOL)
            .await
            .with_context(|| format!("opening unread piece stream {i}"))?;
        match async {
            s.write_all(&req).await?;
            s.flush().await
        }
        .await
        {
            Ok(()) => unread.push(s),
            Err(_) => dropped += 1,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "unread piece requests: {} held, {dropped} dropped by the master",
        unread.len()
    );
    failures.check(unread.len() >= 64, || {
        format!(
            "only {} of 96 unread piece requests could be sent (the attack did not happen)",
            unread.len()
        )
    });
    // What a further request sees while they are held (informational: Busy, a dropped stream,
    // or Ok if the master caps slots per peer).
    let seen = send_raw(
        &hostile,
        mid,
        PIECE_PROTOCOL,
        &frame(&enc(&PieceRequest {
            file,
            range: BlockRange::new(0, 1),
        })),
    )
    .await;
    eprintln!(
        "with the unread piece streams held, a further piece request saw {:?}",
        seen.as_ref().map(|a| a.as_ref().map(|b| b.len()))
    );
    let out = honest_dir.join("out.bin");
    let fetched = tokio::time::timeout(
        Duration::from_secs(90),
        shoal_node::fetch(&honest, FetchOptions::new(file, &out)),
    )
    .await;
    match fetched {
        Ok(Ok(report)) => {
            eprintln!("honest fetch with unread piece streams held: {:.1} s", report.elapsed_s);
            failures.check(std::fs::read(&out)? == std::fs::read(&src)?, || {
                "the honest node's fetch completed with the wrong bytes".into()
            });
        }
        Ok(Err(e)) => failures.check(false, || format!("the honest fetch failed: {e}")),
        Err(_) => failures.check(false, || {
            "the honest fetch did not complete within 90 s while piece requests were held unread (upload slots held forever?)".into()
        }),
    }
    drop(unread);

    // Afterwards: the master runs, and nobody is banned.
    alive(&master, file, &hostile, "every attack", &mut failures).await?;
    let status = tokio::time::timeout(Duration::from_secs(10), master.status(file))
        .await
        .context("the final status took over 10 s")?
        .context("final status")?;
    failures.check(status.banned_total == 0 && status.banned.is_empty(), || {
        let who: Vec<String> = status
            .banned
            .iter()
            .map(|p| {
                if *p == mid {
                    format!("{p} (the master itself)")
                } else if *p == honest.peer_id() {
                    format!("{p} (the honest node)")
                } else {
                    p.to_string()
                }
            })
            .collect();
        format!("{} peers banned: {who:?}", status.banned_total)
    });
    eprintln!("hostile test ran {:.1} s", started.elapsed().as_secs_f64());
    anyhow::ensure!(
        failures.0.is_empty(),
        "{} checks failed:\n- {}",
        failures.0.len(),
        failures.0.join("\n- ")
    );
    Ok(())
}
