//! A peer that stalls after the response frame: a raw-frame server (its own swarm, not the
//! node code) claims every block at the master, then answers each piece request with `Ok` and
//! sends nothing more, holding the stream open. An honest node sent to it must drop each such
//! stream within its stall deadline, fetch the exact bytes elsewhere, and the staller must not
//! be banned: a stall is a timeout, which the node reports as `Unreachable` (issue 7 item 3: "a
//! reset, a cut-off stream or a timeout is reported as what it is ... not as corrupt data"),
//! and only corrupt data is an accusation.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::identity::Keypair;
use shoal_node::FetchOptions;
use shoal_protocol::{
    codec,
    frame::read_frame,
    limits::{MAX_PIECE_FRAME, PIECE_PROTOCOL},
    wire::{MasterRequest, MasterResponse, PieceRequest, PieceResponse},
    BlockRange,
};
use shoal_tests::raw::{frame, RawPeer};

/// Per piece stream the staller answered: its range, and how long after `Ok` the requester
/// let go of it (`None`: not within [`WATCH`]).
type Held = Arc<Mutex<Vec<(BlockRange, Option<Duration>)>>>;

/// How long a held stream is watched for the node to let go of it.
const WATCH: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stalls_after_ok_is_left_within_the_deadline_and_not_banned(
) -> anyhow::Result<()> {
    shoal_tests::init_tracing();
    let tmp = tempfile::tempdir()?;
    let shoal_tests::Published {
        master,
        bootstrap,
        file,
        src,
    } = shoal_tests::published(tmp.path(), 8 * 1024 * 1024, 29, None).await?;
    let mid = master.peer_id();
    let blocks = master.status(file).await.context("status")?.blocks;

    // The staller: listens (identify tells the master where), joins, claims every block.
    let staller = RawPeer::start(Keypair::generate_ed25519(), true, Some(&bootstrap)).await?;
    let mut incoming = staller
        .control()
        .accept(PIECE_PROTOCOL)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let held: Held = Arc::default();
    let server = tokio::spawn({
        let held = held.clone();
        async move {
            while let Some((_, mut stream)) = incoming.next().await {
                let held = held.clone();
                tokio::spawn(async move {
                    let Ok(req) = read_frame::<_, PieceRequest>(&mut stream, MAX_PIECE_FRAME).await
                    else {
                        return;
                    };
                    let ok = frame(&codec::encode(&PieceResponse::Ok).expect("encodes"));
                    if stream.write_all(&ok).await.is_err() || stream.flush().await.is_err() {
                        return;
                    }
                    let sent = Instant::now();
                    let i = {
                        let mut h = held.lock().expect("lock");
                        h.push((req.range, None));
                        h.len() - 1
                    };
                    // Nothing more: wait for the requester to close or reset the stream.
                    let mut buf = [0u8; 64];
                    let released = tokio::time::timeout(WATCH, async {
                        loop {
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(_) => {}
                            }
                        }
                    })
                    .await;
                    if released.is_ok() {
                        held.lock().expect("lock")[i].1 = Some(sent.elapsed());
                    }
                });
            }
        }
    });
    for req in [
        MasterRequest::Hello {
            region: String::new(),
        },
        MasterRequest::Have {
            file,
            ranges: vec![BlockRange::new(0, blocks)],
            peer_bytes: 0,
        },
    ] {
        let answer = staller.master_request(mid, &req).await?;
        anyhow::ensure!(
            answer == MasterResponse::Ack,
            "the master answered {answer:?} to the staller's {req:?}"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = master.status(file).await.context("status")?;
        if status
            .mirrors
            .iter()
            .any(|m| m.peer == staller.peer_id() && m.live && m.blocks == blocks)
        {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the staller is not a live mirror of every block after 20 s: {:?}",
            status.mirrors
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Identify must have told the master the staller's address, or it is never a redirect
    // target; a moment for it.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The honest fetch, with the node's default deadlines: a transfer is abandoned after
    // `stall` without a byte, or when its overall deadline passes. Each stalled transfer costs
    // at most one such deadline and the node then avoids the staller; the rest of an 8 MiB
    // fetch from the master takes seconds.
    let dir = tmp.path().join("honest");
    let honest = shoal_tests::start_node(&dir, &bootstrap, None).await?;
    let out = dir.join("out.bin");
    let opts = FetchOptions::new(file, &out);
    let deadlines = opts.scheduler.deadlines.clone();
    let size = std::fs::metadata(&src)?.len();
    let block = size.div_ceil(u64::from(blocks));
    let deadline_of = |r: &BlockRange| {
        let bytes = (u64::from(r.end) * block).min(size) - u64::from(r.start) * block;
        deadlines.stall.min(deadlines.overall(bytes))
    };
    let bound = deadlines.stall + Duration::from_secs(30);
    let started = Instant::now();
    let report = tokio::time::timeout(
        bound + Duration::from_secs(60),
        shoal_node::fetch(&honest, opts),
    )
    .await
    .with_context(|| {
        format!(
            "the honest fetch did not finish within {:?}",
            bound + Duration::from_secs(60)
        )
    })??;
    let elapsed = started.elapsed();
    anyhow::ensure!(
        std::fs::read(&out)? == std::fs::read(&src)?,
        "the honest node wrote wrong bytes"
    );
    let streams = held.lock().expect("lock").clone();
    eprintln!(
        "fetch took {:.1} s ({} retries); the staller held {} piece streams: {:?}",
        elapsed.as_secs_f64(),
        report.retries,
        streams.len(),
        streams
    );
    anyhow::ensure!(
        !streams.is_empty(),
        "the honest node was never sent to the staller: this test tested nothing"
    );
    // Every stream the staller answered was let go within the transfer's deadline (counted
    // from the stream's opening, a little before `Ok`; 1.5 s of slack for a busy machine).
    for (range, released) in &streams {
        let limit = deadline_of(range) + Duration::from_millis(1500);
        match released {
            Some(after) => anyhow::ensure!(
                *after <= limit,
                "the node held a stalled stream for {range:?} {after:?} after Ok (its deadline: {:?})",
                deadline_of(range)
            ),
            None => anyhow::bail!(
                "the node never let go of the stalled stream for {range:?} (watched {WATCH:?})"
            ),
        }
    }
    anyhow::ensure!(
        elapsed <= bound,
        "the fetch took {elapsed:?} with one stalling peer (bound {bound:?}: one stall deadline of {:?} plus 30 s)",
        deadlines.stall
    );
    let status = master.status(file).await.context("status")?;
    anyhow::ensure!(
        !status.banned.contains(&staller.peer_id()) && status.banned_total == 0,
        "a stall is not corruption, yet banned: {:?} (staller {})",
        status.banned,
        staller.peer_id()
    );
    server.abort();
    Ok(())
}
