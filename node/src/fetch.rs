//! Fetching, publishing and seeding: the drivers that run the [`Scheduler`] against the
//! network through a [`Client`].

use std::{
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures::{AsyncRead, AsyncWrite};

use serde::Serialize;
use shoal_protocol::{
    block::{BlockRange, Blocks},
    limits::{MAX_DIGESTS_PER_RESPONSE, MAX_RANGES_PER_MESSAGE, PIECE_PROTOCOL},
    manifest::{choose_block_size, ManifestBuilder},
    piece::{receive_blocks_overlapped, ReceiveError},
    wire::{
        DigestRequest, DigestResponse, FileStatus, MasterRequest, MasterResponse, PieceResponse,
        PublishRequest,
    },
    FileId, Manifest, VerifiedManifest,
};
use tokio::sync::mpsc;

use crate::chaos::ChaosMode;
use crate::scheduler::{
    plan_rarest_first, Action, Ending, Failure, Scheduler, SchedulerConfig, Transfer,
    TransferClock, TransferDeadlines, TransferId,
};
use crate::service::{Client, NodeError};
use crate::store::PieceStore;

/// A transfer that makes no progress for this long is abandoned (the default of
/// [`TransferDeadlines::stall`]).
pub const STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Called with (bytes held, file size) as a download progresses.
pub type ProgressFn = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// What to fetch and how.
#[derive(Clone)]
pub struct FetchOptions {
    /// The file.
    pub file: FileId,
    /// Where to write it.
    pub out: PathBuf,
    /// Scheduler tunables.
    pub scheduler: SchedulerConfig,
    /// Progress callback.
    pub progress: Option<ProgressFn>,
    /// Live counters (resumed blocks, bytes by source), for progress displays.
    pub live: Option<Arc<crate::progress::FetchProgress>>,
    /// The file's manifest, when the caller has it (`shoal fetch --manifest`): then the
    /// master is not asked for it, and the fetch can start while the master is down. It must
    /// be the manifest of `file`, countersigned by this node's master. Default none: the
    /// master's, or, when the master is unreachable, the one an earlier fetch of the file
    /// saved in the data dir.
    pub manifest: Option<Arc<VerifiedManifest>>,
    /// Also hash the whole file and compare it with the header's `file_sha256` before
    /// renaming it into place. Default off: every block is already checked against the signed
    /// digest list, which fixes every byte of the file; the whole-file hash only re-checks that
    /// the publisher's header is consistent with its own digest list (the master checks that
    /// when it pulls a file) and costs a second SHA-256 pass over the file, about a third of a
    /// fetch's CPU. `shoal verify` checks a copy against it offline.
    pub check_whole_file: bool,
    /// Write whole blocks to the output file with `O_DIRECT`, past the page cache, writing
    /// them on the blocking pool while the next ones arrive, and read them back that way when
    /// serving them (see [`PieceStore::open_with`]). Default off: it saves a lone fetch about a
    /// third of its CPU (the copy into the page cache), but a node in a crowd then reads what
    /// it serves back from the disk, and crowds finished later with it. Where the file system
    /// refuses `O_DIRECT`, the page cache is used either way.
    pub direct_io: bool,
}

impl FetchOptions {
    /// Fetch `file` to `out` with default tunables.
    pub fn new(file: FileId, out: impl Into<PathBuf>) -> Self {
        Self {
            file,
            out: out.into(),
            scheduler: SchedulerConfig::default(),
            progress: None,
            live: None,
            manifest: None,
            check_whole_file: false,
            direct_io: false,
        }
    }

    /// Also check the whole-file SHA-256 at the end (see [`FetchOptions::check_whole_file`]).
    pub fn with_whole_file_check(mut self, check: bool) -> Self {
        self.check_whole_file = check;
        self
    }

    /// Use this manifest instead of asking the master for it.
    pub fn with_manifest(mut self, manifest: Arc<VerifiedManifest>) -> Self {
        self.manifest = Some(manifest);
        self
    }
}

/// Checks that `m` is the manifest of `file` and that this node's master countersigned it.
/// (Its signatures, id and digest list were checked when it was made a [`VerifiedManifest`].)
pub fn check_manifest(
    m: &VerifiedManifest,
    file: FileId,
    master: libp2p::PeerId,
) -> Result<(), NodeError> {
    if m.id() != file {
        return Err(NodeError::WrongManifest(format!(
            "it is the manifest of file {}, not of {file}",
            m.id()
        )));
    }
    if m.body().master != master {
        return Err(NodeError::WrongManifest(format!(
            "it was countersigned by master {}, but this node's master (from the bootstrap \
             address) is {master}",
            m.body().master
        )));
    }
    Ok(())
}

/// The manifest a fetch uses: the caller's; else the master's; else, with the master
/// unreachable, the one saved in the data dir by an earlier fetch of the file.
async fn manifest_for(
    client: &Client,
    opts: &FetchOptions,
) -> Result<Arc<VerifiedManifest>, NodeError> {
    if let Some(m) = &opts.manifest {
        check_manifest(m, opts.file, client.master())?;
        return Ok(m.clone());
    }
    let e = match get_manifest(client, opts.file).await {
        Err(NodeError::Network(e) | NodeError::Unreachable(e)) => e,
        r => return r.map(Arc::new),
    };
    let saved = crate::provenance::manifest_path(client.data_dir(), &opts.file);
    if !saved.exists() {
        return Err(NodeError::Network(format!(
            "{e}; the master is needed for the manifest of {} (or pass the manifest: \
             `shoal fetch --manifest FILE`, as saved by `shoal inspect --save-manifest`)",
            opts.file
        )));
    }
    let m = crate::provenance::load_manifest(&saved, Some(&opts.file))?;
    check_manifest(&m, opts.file, client.master())?;
    tracing::info!(error = %e, path = %saved.display(), "master unreachable; using the manifest saved by an earlier fetch");
    Ok(Arc::new(m))
}

/// A summary of one fetch (what `shoal fetch --report` writes).
#[derive(Clone, Debug, Serialize)]
pub struct FetchReport {
    /// The fetching node.
    pub peer_id: String,
    /// The file.
    pub file: String,
    /// Piece bytes received from the master.
    pub bytes_from_master: u64,
    /// Piece bytes received from other peers.
    pub bytes_from_peers: u64,
    /// Piece bytes received from each peer, by PeerId (at most [`MAX_REPORTED_SOURCES`]
    /// peers; the rest count in `bytes_from_peers` only).
    pub bytes_by_peer: std::collections::BTreeMap<String, u64>,
    /// The blocks received from the master (merged ranges).
    pub blocks_from_master: Vec<shoal_protocol::BlockRange>,
    /// Piece bytes this node served to others during the fetch.
    pub bytes_uploaded: u64,
    /// Blocks in the file.
    pub blocks: u32,
    /// Blocks already held when the fetch started (a resume).
    pub blocks_resumed: u32,
    /// Transfers that ended early and were retried.
    pub retries: u64,
    /// Locates answered by the node itself from providers found through Kademlia, because
    /// the master was unreachable.
    pub swarm_locates: u64,
    /// Wall-clock seconds.
    pub elapsed_s: f64,
}

/// Most peers a [`FetchReport`] lists bytes for.
pub const MAX_REPORTED_SOURCES: usize = 1_024;

/// Aborts a task when dropped (a failed fetch must not leave its hasher running).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Gets the manifest of `file` from the master and checks it.
pub async fn get_manifest(client: &Client, file: FileId) -> Result<VerifiedManifest, NodeError> {
    let master = client.master();
    let header = match client
        .digest_request(master, DigestRequest::Header { file })
        .await?
    {
        DigestResponse::Header(h) => *h,
        DigestResponse::NotFound => {
            return Err(NodeError::Refused(format!(
                "the master does not know file {file}"
            )))
        }
        _ => return Err(NodeError::Unexpected),
    };
    header.verify_id(&file)?;
    let blocks = header.body.geometry().blocks();
    let mut digests = Vec::with_capacity(blocks as usize);
    while (digests.len() as u32) < blocks {
        let start = digests.len() as u32;
        let req = DigestRequest::Digests {
            file,
            start,
            count: MAX_DIGESTS_PER_RESPONSE,
        };
        match client.digest_request(master, req).await? {
            DigestResponse::Digests {
                start: s,
                digests: d,
            } if s == start && !d.is_empty() => digests.extend(d),
            _ => return Err(NodeError::Unexpected),
        }
    }
    Ok(Manifest { header, digests }.verify(Some(&file))?)
}

struct TransferEnd {
    id: TransferId,
    peer: Option<libp2p::PeerId>,
    range: shoal_protocol::BlockRange,
    delivered: u32,
    failure: Option<Failure>,
    from_master: bool,
    bytes: u64,
}

enum Event {
    /// The answer to a Locate, and whether it came from the swarm (master unreachable).
    Located(Result<MasterResponse, NodeError>, bool),
    Ended(TransferEnd),
    /// A transfer's first `.1` blocks are verified and stored (it goes on).
    Progress(TransferId, u32),
}

/// How often a running transfer tells the fetch loop how far it got (the scheduler then
/// paces the Haves to the master on its own interval).
const PROGRESS_EVERY: Duration = Duration::from_millis(50);

/// Providers asked for their holdings in one swarm locate.
pub const MAX_PROVIDERS_ASKED: usize = 16;

/// Largest piece of a swarm locate, in blocks: small pieces spread the load over every
/// holder (nobody balances it for the nodes while the master is away).
pub const SWARM_PIECE_BLOCKS: u32 = 16;

/// How long a provider has to say which blocks it holds.
pub const HOLDINGS_TIMEOUT: Duration = Duration::from_secs(5);

/// Most peers one fetch stops asking (without the master) after they served bad or short
/// data; past it, the oldest is asked again.
pub const MAX_AVOIDED: usize = 256;

/// Where to get `need` of `file` (of `blocks` blocks) with the master unreachable: the
/// providers found through Kademlia (less the `avoid`ed and the banned) say which blocks they
/// hold, and [`plan_rarest_first`] spreads the blocks among them. Every byte is still checked
/// against the manifest.
async fn locate_in_swarm(
    client: &Client,
    file: FileId,
    blocks: u32,
    need: &[BlockRange],
    avoid: &[libp2p::PeerId],
) -> Result<MasterResponse, NodeError> {
    let providers = tokio::time::timeout(
        shoal_protocol::behaviour::KAD_QUERY_TIMEOUT + Duration::from_secs(2),
        client.find_providers(file),
    )
    .await
    .map_err(|_| NodeError::Network("provider lookup timed out".into()))??;
    let asks = providers
        .into_iter()
        .filter(|p| !avoid.contains(p) && !client.is_banned(p))
        .take(MAX_PROVIDERS_ASKED)
        .map(|p| async move {
            let ask = || {
                tokio::time::timeout(
                    HOLDINGS_TIMEOUT,
                    client.digest_request(p, DigestRequest::Holdings { file }),
                )
            };
            let mut r = ask().await;
            // A provider this node cannot reach yet (no address known, or stale ones): look
            // it up, then ask once more.
            if matches!(
                r,
                Ok(Err(NodeError::Network(_) | NodeError::Unreachable(_)))
            ) && client.find_peer(p).await
            {
                r = ask().await;
            }
            match r {
                Ok(Ok(DigestResponse::Holdings { ranges })) => Some((p, holdings(blocks, ranges))),
                other => {
                    tracing::debug!(peer = %p, answer = ?other.map(|r| r.map(|_| ())), "no holdings");
                    None
                }
            }
        });
    let held: Vec<_> = futures::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect();
    if held.is_empty() {
        return Err(NodeError::Network(
            "the master is unreachable and Kademlia found no provider that answered".into(),
        ));
    }
    let assignments = plan_rarest_first(need, &held, SWARM_PIECE_BLOCKS);
    tracing::debug!(
        providers = held.len(),
        assignments = assignments.len(),
        "located in the swarm"
    );
    Ok(MasterResponse::Assignments {
        assignments,
        retry_after_ms: 1_000,
    })
}

/// The blocks a provider says it holds, clamped to the file. The ranges are merged first, so
/// the work is bounded by the file's block count however they overlap.
fn holdings(blocks: u32, mut ranges: Vec<BlockRange>) -> Blocks {
    ranges.truncate(MAX_RANGES_PER_MESSAGE);
    ranges.sort_by_key(|r| r.start);
    let mut have = Blocks::new(blocks);
    let mut next = 0u32;
    for r in ranges {
        let r = BlockRange::new(r.start.max(next).min(blocks), r.end.min(blocks));
        have.insert_range(r);
        next = next.max(r.end);
    }
    have
}

/// Fetches a file: manifest, then blocks as the master assigns them, each verified before it
/// is written; serves what it holds meanwhile; checks the whole file at the end.
pub async fn fetch(client: &Client, opts: FetchOptions) -> Result<FetchReport, NodeError> {
    let started = Instant::now();
    let manifest = manifest_for(client, &opts).await?;
    // Kept for provenance: `shoal verify` checks a copy against it later, offline.
    crate::provenance::save_manifest(
        &manifest,
        &crate::provenance::manifest_path(client.data_dir(), &opts.file),
    )?;
    let journal = client
        .data_dir()
        .join("journals")
        .join(format!("{}.journal", opts.file));
    // Written as OUT.part and renamed to OUT once the whole file verified: a file at OUT is
    // always complete. A resume continues the .part.
    let part = part_path(&opts.out);
    let store = {
        // Reopening re-checks every journaled block: blocking work.
        let (m, out, j, direct) = (
            manifest.clone(),
            part.clone(),
            journal.clone(),
            opts.direct_io,
        );
        Arc::new(blocking(move || PieceStore::open_with(m, &out, &j, direct)).await??)
    };
    client.share(store.clone());
    let geometry = manifest.geometry();
    let mut whole_file = opts.check_whole_file.then(|| {
        AbortOnDrop(tokio::spawn({
            let store = store.clone();
            async move { store.hash_as_written().await }
        }))
    });
    let resumed = store.have();
    let blocks_resumed = resumed.count();
    let uploaded_before = client.bytes_uploaded();
    let mut sched = Scheduler::new(resumed, opts.scheduler.clone());
    let (tx, mut rx) = mpsc::channel::<Event>(64);
    if client.chaos() == Some(ChaosMode::LieHave) {
        let lie = MasterRequest::Have {
            file: opts.file,
            ranges: vec![geometry.all()],
            peer_bytes: 0,
        };
        let _ = client.master_request(lie).await;
    }
    let (mut from_master, mut from_peers, mut unreported_peer_bytes) = (0u64, 0u64, 0u64);
    let mut swarm_locates = 0u64;
    let mut by_peer = std::collections::BTreeMap::<String, u64>::new();
    let mut master_blocks = shoal_protocol::block::Blocks::new(manifest.blocks());
    let mut avoided: std::collections::VecDeque<libp2p::PeerId> = Default::default();
    let held = Arc::new(AtomicU64::new(
        geometry.range_bytes(geometry.all()) - missing_bytes(&store),
    ));
    if let Some(live) = &opts.live {
        live.start(
            geometry.size,
            manifest.blocks(),
            blocks_resumed,
            held.load(Ordering::Relaxed),
        );
    }
    tracing::info!(file = %opts.file, blocks = manifest.blocks(), resumed = blocks_resumed, "fetch started");

    loop {
        while let Some(action) = sched.poll(Instant::now()) {
            match action {
                Action::Locate { need } => {
                    let (c, tx, file) = (client.clone(), tx.clone(), opts.file);
                    let (blocks, avoid) = (
                        geometry.blocks(),
                        avoided.iter().copied().collect::<Vec<_>>(),
                    );
                    tokio::spawn(async move {
                        let r = c
                            .master_request(MasterRequest::Locate {
                                file,
                                need: need.clone(),
                            })
                            .await;
                        let (r, swarm) = match r {
                            // The master is unreachable: keep going with the swarm.
                            Err(NodeError::Network(e) | NodeError::Unreachable(e)) => {
                                tracing::info!(error = %e, "master unreachable; locating through Kademlia");
                                (locate_in_swarm(&c, file, blocks, &need, &avoid).await, true)
                            }
                            r => (r, false),
                        };
                        let _ = tx.send(Event::Located(r, swarm)).await;
                    });
                }
                Action::Start(t) => {
                    let (c, tx, m, s, h, p, l) = (
                        client.clone(),
                        tx.clone(),
                        manifest.clone(),
                        store.clone(),
                        held.clone(),
                        opts.progress.clone(),
                        opts.live.clone(),
                    );
                    let d = opts.scheduler.deadlines.clone();
                    tokio::spawn(async move {
                        let end = run_transfer(&c, &m, &s, t, &d, &h, p, l, &tx).await;
                        let _ = tx.send(Event::Ended(end)).await;
                    });
                }
                Action::Have(ranges) => {
                    // No sync first: the blocks are served from the page cache at once, and
                    // if this process dies its connection drops and the master forgets it
                    // anyway; the journal (synced every 8 MiB) is only for resuming.
                    let (c, file) = (client.clone(), opts.file);
                    let peer_bytes = std::mem::take(&mut unreported_peer_bytes);
                    tokio::spawn(async move {
                        if let Err(e) = c
                            .master_request(MasterRequest::Have {
                                file,
                                ranges,
                                peer_bytes,
                            })
                            .await
                        {
                            tracing::debug!(error = %e, "have report failed");
                        }
                    });
                }
                Action::Report { peer, problem } => {
                    if problem == shoal_protocol::wire::Problem::Busy {
                        tracing::debug!(%peer, "source busy");
                    } else {
                        tracing::info!(%peer, ?problem, "reporting a bad source");
                    }
                    let (c, file) = (client.clone(), opts.file);
                    tokio::spawn(async move {
                        let _ = c
                            .master_request(MasterRequest::Report {
                                file,
                                peer,
                                problem,
                            })
                            .await;
                    });
                }
            }
        }
        if sched.is_complete() && sched.is_idle() {
            break;
        }
        let timeout = sched.poll_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            Some(ev) = rx.recv() => match ev {
                Event::Located(Ok(MasterResponse::Assignments { assignments, retry_after_ms }), swarm) => {
                    swarm_locates += u64::from(swarm);
                    sched.on_assignments(Instant::now(), assignments, Duration::from_millis(retry_after_ms.into()));
                }
                Event::Located(Ok(MasterResponse::Refused { reason }), _) => {
                    return Err(NodeError::Refused(reason));
                }
                Event::Located(other, _) => {
                    if let Err(e) = other { tracing::warn!(error = %e, "locate failed; retrying"); }
                    sched.on_locate_failed(Instant::now());
                }
                Event::Ended(end) => {
                    if end.from_master {
                        from_master = from_master.saturating_add(end.bytes);
                        // Blocks arrive in order: the first `delivered` of the range.
                        let got = end.range.start + end.delivered.min(end.range.len());
                        master_blocks.insert_range(shoal_protocol::BlockRange::new(end.range.start, got));
                    } else {
                        if let Some(peer) = end.peer {
                            let key = peer.to_string();
                            if by_peer.len() < MAX_REPORTED_SOURCES || by_peer.contains_key(&key) {
                                let e = by_peer.entry(key).or_default();
                                *e = e.saturating_add(end.bytes);
                            }
                        }
                        from_peers = from_peers.saturating_add(end.bytes);
                        unreported_peer_bytes = unreported_peer_bytes.saturating_add(end.bytes);
                    }
                    // A false accuser accuses every peer it was sent to, whether the transfer
                    // worked or failed (a peer that died mid-transfer included).
                    if let (Some(ChaosMode::FalseAccuse), Some(peer)) = (client.chaos(), end.peer) {
                        let (c, file, range) = (client.clone(), opts.file, end.range);
                        tokio::spawn(async move {
                            let problem = shoal_protocol::wire::Problem::Corrupt { blocks: vec![range] };
                            let _ = c.master_request(MasterRequest::Report { file, peer, problem }).await;
                        });
                    }
                    if let (Some(peer), Some(Failure::Corrupt { .. } | Failure::Truncated { .. })) = (end.peer, &end.failure) {
                        // Without the master nobody judges it: stop asking it ourselves.
                        if !avoided.contains(&peer) {
                            avoided.push_back(peer);
                            if avoided.len() > MAX_AVOIDED {
                                avoided.pop_front();
                            }
                        }
                    }
                    sched.on_transfer_end(Instant::now(), end.id, end.delivered, end.failure);
                }
                Event::Progress(id, delivered) => sched.on_progress(Instant::now(), id, delivered),
            },
            _ = async { match timeout { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {}
        }
    }
    store.flush()?;
    if let Some(whole_file) = whole_file.as_mut() {
        let digest = (&mut whole_file.0)
            .await
            .map_err(|e| NodeError::Io(std::io::Error::other(e.to_string())))??;
        if digest != manifest.body().file_sha256 {
            return Err(NodeError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "every block verified but the whole-file SHA-256 differs (manifest inconsistent)",
            )));
        }
    }
    std::fs::rename(&part, &opts.out)?;
    let _ = std::fs::remove_file(&journal);
    let report = FetchReport {
        peer_id: client.peer_id().to_string(),
        file: opts.file.to_string(),
        bytes_from_master: from_master,
        bytes_from_peers: from_peers,
        bytes_by_peer: by_peer,
        blocks_from_master: master_blocks.ranges(),
        bytes_uploaded: client.bytes_uploaded().saturating_sub(uploaded_before),
        blocks: manifest.blocks(),
        blocks_resumed,
        retries: sched.retries(),
        swarm_locates,
        elapsed_s: started.elapsed().as_secs_f64(),
    };
    tracing::info!(file = %opts.file, elapsed_s = report.elapsed_s, "fetch complete");
    Ok(report)
}

/// Where a download to `out` is written until it is complete: `out` with `.part` appended.
pub fn part_path(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_os_string();
    name.push(".part");
    PathBuf::from(name)
}

/// Runs `f` (disk work: reading and hashing whole files) on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NodeError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| NodeError::Io(std::io::Error::other(e.to_string())))
}

fn missing_bytes(store: &PieceStore) -> u64 {
    let g = store.manifest().geometry();
    store
        .have()
        .missing()
        .iter()
        .map(|r| g.range_bytes(*r))
        .sum()
}

/// What a transfer's stream has shown so far: when bytes last arrived, and whether the first
/// bytes were the `Ok` frame. Shared between the receiving task and its watchdog.
#[derive(Debug)]
struct Meter {
    clock: TransferClock,
    /// The first bytes read (the response frame starts the stream), up to the Ok frame's
    /// length.
    head: Vec<u8>,
}

/// The encoded `Ok` response frame (length prefix and body).
fn ok_frame() -> Vec<u8> {
    let body = shoal_protocol::codec::encode(&PieceResponse::Ok).unwrap_or_default();
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(&body);
    f
}

/// A stream that records reads in a [`Meter`].
struct Metered<'a, S> {
    inner: S,
    meter: &'a Mutex<Meter>,
    ok_len: usize,
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            if *n > 0 {
                let mut m = this.meter.lock().expect("meter lock");
                m.clock.progress(Instant::now());
                let room = this.ok_len.saturating_sub(m.head.len()).min(*n);
                m.head.extend_from_slice(&buf[..room]);
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// What a receive error shows, `after_ok` when the stream's first bytes were the `Ok` frame.
fn ending_of(e: ReceiveError, after_ok: bool) -> Ending {
    match e {
        ReceiveError::Corrupt { block } => Ending::BadDigest { block },
        ReceiveError::Refused(r) => Ending::Refused(r),
        ReceiveError::Sink { .. } => Ending::Local,
        // The stream ended cleanly after the Ok frame: truncated. A peer that died looks
        // exactly like this, so it is never taken for bad data.
        ReceiveError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && after_ok => {
            Ending::EndedAfterOk
        }
        ReceiveError::Io(_) | ReceiveError::BadRange(_) => Ending::Broken,
    }
}

/// Receives one transfer under its deadlines (see [`TransferDeadlines`]) and says how it
/// ended: the facts go through [`Ending::failure`], so only a digest failure reads as
/// corruption.
#[allow(clippy::too_many_arguments)] // each is a different shared piece of one fetch
async fn run_transfer(
    client: &Client,
    manifest: &VerifiedManifest,
    store: &Arc<PieceStore>,
    t: Transfer,
    deadlines: &TransferDeadlines,
    held: &AtomicU64,
    progress: Option<crate::fetch::ProgressFn>,
    live: Option<Arc<crate::progress::FetchProgress>>,
    events: &mpsc::Sender<Event>,
) -> TransferEnd {
    let peer = t.peer().unwrap_or(client.master());
    let from_master = t.peer().is_none();
    let g = manifest.geometry();
    if !t.hint().is_empty() {
        let hint = match client.chaos() {
            Some(ChaosMode::WrongHints) => {
                vec![crate::chaos::WRONG_HINT.parse().expect("valid multiaddr")]
            }
            _ => t.hint().to_vec(),
        };
        client.hint(peer, hint).await;
    }
    // Taken before the dial, so the fresh connection is not let go for the peer budget.
    let _in_use = client.in_use(peer);
    let stream = match open_piece_stream(client, peer, !from_master, deadlines.stall).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "cannot open piece stream");
            return TransferEnd {
                id: t.id,
                peer: t.peer(),
                range: t.range,
                delivered: 0,
                failure: Some(Ending::Broken.failure(t.range, 0)),
                from_master,
                bytes: 0,
            };
        }
    };
    let delivered = AtomicU64::new(0);
    let ok = ok_frame();
    let meter = Mutex::new(Meter {
        clock: TransferClock::start(Instant::now(), g.range_bytes(t.range), deadlines),
        head: Vec::with_capacity(ok.len()),
    });
    let total = g.size;
    let mut told = Instant::now();
    let work = async {
        let mut stream = Metered {
            inner: stream,
            meter: &meter,
            ok_len: ok.len(),
        };
        let depth = store.write_depth();
        let write = |b, buf, len| store.write_owned(b, buf, len);
        receive_blocks_overlapped(&mut stream, manifest, t.range, depth, write, |_, len| {
            let n = delivered.fetch_add(1, Ordering::Relaxed) + 1;
            if told.elapsed() >= PROGRESS_EVERY {
                // Counts only grow: a report dropped on a full channel is made good by the
                // next one, or by the transfer's end.
                told = Instant::now();
                let _ = events.try_send(Event::Progress(t.id, n as u32));
            }
            let now = held.fetch_add(len as u64, Ordering::Relaxed) + len as u64;
            if let Some(l) = &live {
                l.add(from_master, len as u64);
            }
            if let Some(p) = &progress {
                p(now, total);
            }
        })
        .await
    };
    let watchdog = async {
        loop {
            let next = meter.lock().expect("meter lock").clock.next_check();
            tokio::time::sleep_until(tokio::time::Instant::from_std(next)).await;
            if let Some(e) = meter
                .lock()
                .expect("meter lock")
                .clock
                .expired(Instant::now())
            {
                return e;
            }
        }
    };
    let ending = tokio::select! {
        r = work => match r {
            Ok(()) => None,
            Err(e) => {
                tracing::debug!(%peer, range = ?t.range, error = %e, "transfer ended early");
                let after_ok = meter.lock().expect("meter lock").head == ok;
                Some(ending_of(e, after_ok))
            }
        },
        e = watchdog => {
            tracing::debug!(%peer, range = ?t.range, expiry = ?e, "transfer abandoned at its deadline");
            Some(Ending::Expired(e))
        }
    };
    let n = delivered.load(Ordering::Relaxed) as u32;
    TransferEnd {
        id: t.id,
        peer: t.peer(),
        range: t.range,
        delivered: n,
        failure: ending.map(|e| e.failure(t.range, n)),
        from_master,
        bytes: g.range_bytes(shoal_protocol::BlockRange::new(
            t.range.start,
            t.range.start + n,
        )),
    }
}

/// Opens a piece stream to `peer`, each attempt within `within`. When the first attempt fails
/// and `look_up` (a peer, not the master), the peer is looked up in Kademlia (its hinted
/// addresses may be wrong or stale, or there were none) and, if found, tried once more.
async fn open_piece_stream(
    client: &Client,
    peer: libp2p::PeerId,
    look_up: bool,
    within: Duration,
) -> Result<libp2p::Stream, String> {
    let open = || async {
        let mut control = client.control();
        match tokio::time::timeout(within, control.open_stream(peer, PIECE_PROTOCOL)).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no stream within {} s", within.as_secs())),
        }
    };
    let e = match open().await {
        Ok(s) => return Ok(s),
        Err(e) if look_up => e,
        Err(e) => return Err(e),
    };
    tracing::debug!(%peer, error = %e, "peer unreachable at its known addresses; looking it up");
    client.count_lookup(false);
    if !client.find_peer(peer).await {
        return Err(format!("{e}; and Kademlia did not find it"));
    }
    let s = open().await?;
    client.count_lookup(true);
    tracing::debug!(%peer, "reached through Kademlia");
    Ok(s)
}

/// Publishes the file at `path`: signs its manifest with this node's key, announces it, serves
/// it while the master pulls it, and returns once the master holds every block.
pub async fn publish(
    client: &Client,
    key: &libp2p::identity::Keypair,
    path: &Path,
) -> Result<FileId, NodeError> {
    let f = std::fs::File::open(path)?;
    let size = f.metadata()?.len();
    let builder = blocking(move || {
        ManifestBuilder::hash_reader(std::io::BufReader::new(f), choose_block_size(size))
    })
    .await??;
    let name = shoal_protocol::manifest::name_for(path);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (body, digests) =
        builder.finish(name, key.public().encode_protobuf(), client.master(), now);
    let header = body.sign(key)?;
    let announce = PublishRequest {
        header,
        digests: digests.clone(),
    };
    let (file, signed) = match client.publish_request(announce).await? {
        MasterResponse::Announced { file, header } => (file, header),
        MasterResponse::Refused { reason } => return Err(NodeError::Refused(reason)),
        _ => return Err(NodeError::Unexpected),
    };
    let manifest = Arc::new(
        Manifest {
            header: *signed,
            digests,
        }
        .verify(Some(&file))?,
    );
    let (m, p) = (manifest.clone(), path.to_path_buf());
    client.share(Arc::new(
        blocking(move || PieceStore::open_complete(m, &p)).await??,
    ));
    wait_until_master_holds(client, file, manifest.blocks()).await?;
    Ok(file)
}

async fn wait_until_master_holds(
    client: &Client,
    file: FileId,
    blocks: u32,
) -> Result<(), NodeError> {
    let mut last = (0, Instant::now());
    loop {
        let s = status(client, file).await?;
        if s.master_blocks >= blocks {
            return Ok(());
        }
        if s.master_blocks > last.0 {
            last = (s.master_blocks, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(60) {
            return Err(NodeError::Network(format!(
                "the master stopped pulling at {}/{blocks} blocks",
                s.master_blocks
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the master knows of `file`.
pub async fn status(client: &Client, file: FileId) -> Result<FileStatus, NodeError> {
    match client
        .master_request(MasterRequest::Status { file })
        .await?
    {
        MasterResponse::Status(s) => Ok(*s),
        MasterResponse::Refused { reason } => Err(NodeError::Refused(reason)),
        _ => Err(NodeError::Unexpected),
    }
}

/// Serves a complete local copy of `file` at `path`, after checking every block.
pub async fn seed(client: &Client, file: FileId, path: &Path) -> Result<(), NodeError> {
    let manifest = Arc::new(get_manifest(client, file).await?);
    let (m, p) = (manifest.clone(), path.to_path_buf());
    let store = Arc::new(blocking(move || PieceStore::open_complete(m, &p)).await??);
    client.share(store);
    match client
        .master_request(MasterRequest::Have {
            peer_bytes: 0,
            file,
            ranges: vec![manifest.geometry().all()],
        })
        .await?
    {
        MasterResponse::Ack => Ok(()),
        MasterResponse::Refused { reason } => Err(NodeError::Refused(reason)),
        _ => Err(NodeError::Unexpected),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;
    use libp2p::identity::Keypair;
    use shoal_protocol::{wire::RefuseReason, BlockRange};

    /// Reads a canned answer; swallows what is written.
    struct Canned(Cursor<Vec<u8>>);

    impl AsyncRead for Canned {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Canned {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn manifest(data: &[u8]) -> VerifiedManifest {
        let k = Keypair::generate_ed25519();
        let mut b = ManifestBuilder::new(4096);
        b.update(data);
        let (body, digests) = b.finish(
            "t".into(),
            k.public().encode_protobuf(),
            k.public().to_peer_id(),
            0,
        );
        let header = body.sign(&k).unwrap().countersign(&k).unwrap();
        Manifest { header, digests }.verify(None).unwrap()
    }

    /// Receives `answer` through a [`Metered`] stream, as `run_transfer` does.
    fn ending(answer: Vec<u8>, m: &VerifiedManifest) -> Option<Ending> {
        let ok = ok_frame();
        let meter = Mutex::new(Meter {
            clock: TransferClock::start(Instant::now(), 0, &TransferDeadlines::default()),
            head: Vec::new(),
        });
        let mut s = Metered {
            inner: Canned(Cursor::new(answer)),
            meter: &meter,
            ok_len: ok.len(),
        };
        let r = futures::executor::block_on(shoal_protocol::piece::receive_blocks(
            &mut s,
            m,
            BlockRange::new(0, 3),
            |_, _| Ok(()),
        ));
        let after_ok = meter.lock().unwrap().head == ok;
        r.err().map(|e| ending_of(e, after_ok))
    }

    #[test]
    fn only_a_stream_cut_after_an_actual_ok_is_truncation() {
        let data: Vec<u8> = (0..12_288u32).map(|i| (i % 247) as u8).collect();
        let m = manifest(&data);
        let ok = ok_frame();
        let with = |tail: &[u8]| [ok.as_slice(), tail].concat();
        assert_eq!(ending(with(&data), &m), None);
        // Ok, one block and a half, then the end: truncated.
        assert_eq!(ending(with(&data[..6000]), &m), Some(Ending::EndedAfterOk));
        // Ok and nothing else: truncated too.
        assert_eq!(ending(ok.clone(), &m), Some(Ending::EndedAfterOk));
        // Cut inside the response frame, or nothing at all: the peer is gone, not lying.
        assert_eq!(ending(ok[..3].to_vec(), &m), Some(Ending::Broken));
        assert_eq!(ending(Vec::new(), &m), Some(Ending::Broken));
        // A bad byte in block 1: corrupt.
        let mut bad = data.clone();
        bad[5000] ^= 1;
        assert_eq!(ending(with(&bad), &m), Some(Ending::BadDigest { block: 1 }));
        // A refusal frame.
        let mut refused = Vec::new();
        futures::executor::block_on(shoal_protocol::piece::refuse(
            &mut refused,
            RefuseReason::Busy,
        ))
        .unwrap();
        assert_eq!(
            ending(refused, &m),
            Some(Ending::Refused(RefuseReason::Busy))
        );
    }

    #[test]
    fn a_given_manifest_must_be_of_the_file_and_from_this_nodes_master() {
        let m = manifest(&[7u8; 10_000]);
        let other = manifest(&[8u8; 10_000]);
        let master = m.body().master;
        check_manifest(&m, m.id(), master).unwrap();
        let e = check_manifest(&other, m.id(), master)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not of"), "{e}");
        let e = check_manifest(&m, m.id(), libp2p::PeerId::random())
            .unwrap_err()
            .to_string();
        assert!(e.contains("countersigned by master"), "{e}");
    }

    #[test]
    fn holdings_are_clamped_and_merged_whatever_a_peer_sends() {
        let n = 100;
        // Overlapping, unsorted, past the end, inverted, and many copies of the whole range.
        let mut ranges = vec![
            BlockRange {
                start: 90,
                end: u32::MAX,
            },
            BlockRange { start: 10, end: 20 },
            BlockRange { start: 15, end: 25 },
            BlockRange { start: 50, end: 40 },
        ];
        ranges.extend(std::iter::repeat_n(BlockRange::new(0, 5), 10_000));
        let have = holdings(n, ranges);
        assert_eq!(have.capacity(), n);
        assert_eq!(
            have.ranges(),
            vec![
                BlockRange::new(0, 5),
                BlockRange::new(10, 25),
                BlockRange::new(90, 100)
            ]
        );
    }
}
