//! The master's redirect policy: a pure state machine over the ownership table.
//!
//! It owns, per file, which peer holds which blocks, which blocks the master has handed out
//! and to whom, and per peer its addresses, region, liveness and load (blocks assigned to it
//! and not yet confirmed). It does no I/O and reads no clock: every call that depends on time
//! takes `now`. The swarm code around it feeds it events and carries out its answers.
//!
//! The rule for a Locate, block by block over what the node lacks:
//! 1. a live peer holds it: redirect to the nearest, least-loaded holder that the requester
//!    has not had trouble with (nearest: same region label, then same network prefix, then
//!    lowest estimated RTT; see [`crate::location`]);
//! 2. no live peer holds it and the master has not handed it out (or the handout expired):
//!    the master serves it (first copies first), at most one master piece per answer, and the
//!    piece shrinks as the master's load grows;
//! 3. otherwise (its first copy is on its way to another node) skip it: the node asks again
//!    after `retry_after` and will then be redirected to the new holder.
//!
//! With the region budget ([`PolicyConfig::region_budget`]) a block enters each region once:
//! a requester with no holder in its region is sent across regions (or to the master) only
//! if no other copy is on its way into that region, and the master's "one first copy at a
//! time" holds per region instead of swarm-wide.

use std::collections::{BTreeSet, VecDeque};

/// The policy's hash maps and sets, hashed as their key type says ([`Keyed`]): nearly every
/// lookup of a Locate is by `PeerId`, and with std's SipHash the hashing was most of a
/// Locate's time (perf, simulator).
type HashMap<K, V> = std::collections::HashMap<K, V, <K as Keyed>::Build>;
type HashSet<K> = std::collections::HashSet<K, <K as Keyed>::Build>;

/// How a key type of the policy's maps is hashed.
trait Keyed {
    /// The hasher builder of maps with this key.
    type Build: std::hash::BuildHasher + Default + Clone;
}

/// foldhash: fast, and seeded at random per process and per map, so that nobody can aim keys
/// at one bucket without knowing the seed.
macro_rules! folded {
    ($($t:ty),*) => {$(impl Keyed for $t { type Build = foldhash::fast::RandomState; })*};
}
folded!(FileId, NetPrefix, String, u32);
#[cfg(test)]
impl Keyed for (&str, u32) {
    type Build = foldhash::fast::RandomState;
}

impl Keyed for PeerId {
    type Build = PeerIdHash;
}

/// Hashes a `PeerId` by the last 8 bytes of its digest, mixed with a per-map random seed.
/// Those bytes are the tail of an ed25519 public key (identity multihash) or of a SHA-256
/// (other key types): as random as the whole, and a peer can only grind its key for them, not
/// choose them; hashing all ~40 bytes and the code, as `PeerId`'s `Hash` asks, cost a
/// Locate a quarter of its time (perf, patent-650 in the simulator). Equality still compares
/// whole ids.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PeerIdHash(u64);

impl Default for PeerIdHash {
    fn default() -> Self {
        use std::hash::BuildHasher;
        Self(foldhash::fast::RandomState::default().hash_one(0x5eed_u64))
    }
}

impl std::hash::BuildHasher for PeerIdHash {
    type Hasher = PeerIdHasher;
    fn build_hasher(&self) -> PeerIdHasher {
        PeerIdHasher(self.0)
    }
}

/// See [`PeerIdHash`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct PeerIdHasher(u64);

impl PeerIdHasher {
    fn mix(&mut self, v: u64) {
        let m = u128::from(self.0 ^ v) * 0x9E37_79B9_7F4A_7C15;
        self.0 = (m as u64) ^ ((m >> 64) as u64);
    }
}

impl std::hash::Hasher for PeerIdHasher {
    fn write(&mut self, bytes: &[u8]) {
        // The digest's last 8 bytes (all of it, when shorter).
        let tail = &bytes[bytes.len().saturating_sub(8)..];
        let mut v = [0u8; 8];
        v[..tail.len()].copy_from_slice(tail);
        self.mix(u64::from_le_bytes(v));
    }
    fn write_u64(&mut self, v: u64) {
        self.mix(v);
    }
    fn write_usize(&mut self, v: usize) {
        self.mix(v as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use shoal_protocol::block::{normalize, BlockRange, Blocks};
use shoal_protocol::limits::{
    MAX_ASSIGNMENTS, MAX_HINT_ADDRS, MAX_PIECE_BLOCKS, MAX_RANGES_PER_MESSAGE,
};
use shoal_protocol::wire::{Assignment, FileStatus, MirrorStatus, RttSample, Source};
use shoal_protocol::FileId;

use crate::held::Held;
use crate::location::{Locations, NetPrefix, ReportRefused, Vantage};

/// Most relayed addresses hinted for one peer (one per address of the master's, first ones
/// first), out of the [`MAX_HINT_ADDRS`] of a hint.
pub const MAX_RELAYED_HINTS: usize = 2;

/// Most peers one peer avoids at once: past it, the avoidance ending first is dropped (an
/// avoidance "for good" only when every one is for good).
pub const MAX_AVOID_PER_PEER: usize = 1_024;

/// Most holders one Locate considers as redirect targets (the nearest, least-loaded ones):
/// with the block walk bounded too, an answer costs at most blocks x holders of these caps.
pub const MAX_CANDIDATES: usize = 1_024;

/// Blocks one Locate looks for a source for, per block it may assign: a request whose blocks
/// can mostly not be assigned (first copies on their way elsewhere) stops after
/// `LOCATE_SCAN_FACTOR * max_blocks_per_answer` of them.
pub const LOCATE_SCAN_FACTOR: u32 = 16;

/// A holder the requester avoids for at most this long more (it was `Busy`) is waited for, not
/// replaced by the master: a busy holder frees a slot in moments, and sending the block from
/// the master again would cost origin traffic (the simulator showed a hot first holder making
/// the master resend 2,331 blocks of 650 MiB this way).
pub const BRIEF_AVOID: Duration = Duration::from_secs(5);

/// A requester's master pieces grow past `max_master_piece` (up to `lone_master_piece`) only
/// to this fraction of its fair share of first copies: its share still comes in at least
/// this many pieces, and a crowd's requesters (small shares) are not affected.
pub const LONE_SHARE_PIECES: u32 = 16;

/// A lone requester's answer of master pieces is at most what the master's upload sends in
/// this long: its cap (see [`PolicyConfig::master_upload_rate`]), or else what it sent in the
/// last this long ([`Policy::master_sent`]); its pieces do not shrink below
/// `max_master_piece` for it.
pub const LONE_HORIZON: Duration = Duration::from_millis(250);

/// [`Policy::master_sent`] keeps about one sample of the master's sent bytes this often.
const SENT_SAMPLE: Duration = Duration::from_millis(10);

/// Most samples of the master's sent bytes kept (those within [`LONE_HORIZON`] are about
/// `LONE_HORIZON / SENT_SAMPLE`; this bounds the table whatever the calls).
const SENT_SAMPLES_MAX: usize = 64;

/// What the master's piece server has sent (counted as each piece stream ends), sampled (see
/// [`Policy::master_sent`]).
#[derive(Debug, Default)]
struct SentWindow {
    /// `(when, total sent by then)`, oldest first: every sample of the last
    /// [`LONE_HORIZON`], and the last one before it.
    samples: VecDeque<(Instant, u64)>,
}

impl SentWindow {
    fn note(&mut self, now: Instant, total: u64) {
        // A counter only grows; a smaller total (a clock or counter gone back) counts as no
        // bytes, not as a negative amount.
        let total = self.samples.back().map_or(total, |&(_, t)| t.max(total));
        // The last sample follows the counter; it stays, and a new one follows, once it is
        // `SENT_SAMPLE` past the one before it.
        let n = self.samples.len();
        let moving = n >= 2 && now.saturating_duration_since(self.samples[n - 2].0) < SENT_SAMPLE;
        match self.samples.back_mut() {
            Some(last) if moving => *last = (now, total),
            _ => {
                if n == SENT_SAMPLES_MAX {
                    self.samples.pop_front();
                }
                self.samples.push_back((now, total));
            }
        }
        while self
            .samples
            .get(1)
            .is_some_and(|&(t, _)| now.saturating_duration_since(t) >= LONE_HORIZON)
        {
            self.samples.pop_front();
        }
    }

    /// Bytes sent in the last [`LONE_HORIZON`] before `now`, as far as the samples reach
    /// (less while they cover less: a master that just started has sent nothing yet). The
    /// counter's value at the horizon's start is interpolated between the samples either
    /// side of it: samples come only with Locates, and bytes counted after a quiet minute
    /// may have gone out at any time in it, not all in the last 250 ms.
    fn in_horizon(&self, now: Instant) -> u64 {
        let (Some(&(_, first)), Some(&(_, last))) = (self.samples.front(), self.samples.back())
        else {
            return 0;
        };
        // Samples at or before the horizon's start come first (time only moves on).
        let start = now.checked_sub(LONE_HORIZON);
        let before = start.map_or(0, |st| self.samples.partition_point(|&(t, _)| t <= st));
        let prev = before.checked_sub(1).map(|i| self.samples[i]);
        let from = match (start, prev, self.samples.get(before)) {
            (Some(start), Some((ta, va)), Some(&(tb, vb))) => {
                let span = tb.saturating_duration_since(ta).as_nanos().max(1);
                let part = start.saturating_duration_since(ta).as_nanos();
                let grown = u128::from(vb.saturating_sub(va)).saturating_mul(part) / span;
                va.saturating_add(u64::try_from(grown).unwrap_or(u64::MAX))
            }
            // Every sample is before the start: nothing was counted since.
            (_, Some(_), None) => last,
            // No sample before the start: from the oldest.
            _ => first,
        };
        last.saturating_sub(from)
    }
}

/// Tunables of the policy. The defaults suit 64 KiB blocks.
#[derive(Clone, Debug)]
pub struct PolicyConfig {
    /// Largest piece the master serves itself, in blocks (when idle), to a requester among
    /// others (see `lone_master_piece`).
    pub max_master_piece: u32,
    /// Largest master piece, in blocks, for a requester whose fair share of first copies is
    /// at least [`LONE_SHARE_PIECES`] such pieces (a lone fetch, or one of a few): its master
    /// pieces may grow from `max_master_piece` up to this, to a sixteenth of its share.
    /// Fewer, longer piece streams cost fewer round trips and less CPU per byte on both
    /// sides (`bench/e2e.sh 512`: 270-300 -> 380-410 MB/s); a crowd's requesters have small
    /// shares and keep `max_master_piece`, so its first copies are still spread thin.
    pub lone_master_piece: u32,
    /// Smallest piece the master serves itself, in blocks (under heavy load).
    pub min_master_piece: u32,
    /// Most master pieces in one answer (when idle; one under load).
    pub max_master_pieces: u32,
    /// Master load (blocks in flight) at which the master piece has halved.
    pub master_load_half: u32,
    /// Largest redirected piece, in blocks.
    pub max_peer_piece: u32,
    /// Most blocks assigned in one answer.
    pub max_blocks_per_answer: u32,
    /// Most runs (piece streams) in one answer: about what a node runs at once (its
    /// scheduler's default is 8 transfers). More would sit in its queue while holding a slot
    /// at each holder (which then looks full to everyone else), and cost the walk.
    pub max_runs_per_answer: u32,
    /// How long an assignment counts as load (and a master handout blocks re-handouts)
    /// without the requester confirming the blocks.
    pub assignment_timeout: Duration,
    /// What to tell a node to wait when nothing can be assigned now (at least).
    pub retry_after: Duration,
    /// Empty answers per second the master paces its waiting requesters to: with `W` of them
    /// waiting, each is told to wait `max(retry_after, W / waiting_polls_per_s)`, so a crowd
    /// waiting for full holders asks at a fixed total rate whatever its size, and a freed slot
    /// is still found within about `1 / waiting_polls_per_s`.
    pub waiting_polls_per_s: u32,
    /// The master's upload slots (piece streams it serves at once; more are refused). Master
    /// pieces go to at most `master_slots / pieces per answer` requesters at a time, one
    /// answer's worth each, so that what the policy hands out the master can serve: more
    /// would be refused, and the refused nodes would only ask again.
    pub master_slots: u32,
    /// The master's upload cap in bytes a second (`--max-upload-rate`), if any. Master pieces
    /// grow past `max_master_piece` for a lone requester only while one answer's worth of
    /// them is at most what this upload sends in [`LONE_HORIZON`]. Whatever the master hands
    /// one requester, no one else gets from the master until it arrives: a node that asked a
    /// moment before a crowd would otherwise be handed seconds of the capped upload's first
    /// copies, and then be their only source at its own, slower upload. Without a cap, what
    /// the master sent in the last [`LONE_HORIZON`] stands for it ([`Policy::master_sent`]):
    /// a link, not a flag, may be the limit.
    pub master_upload_rate: Option<u64>,
    /// A node's upload slots (its piece server's default): a holder with this many
    /// requesters on their way to it is full; a block whose holders are all full is waited
    /// for (`retry_after`), neither refused by the holder nor sent again by the master.
    pub peer_slots: u32,
    /// How long after an assignment's window closed (it expired, was replaced, or its blocks
    /// were confirmed) a report about it still counts: a failed transfer never produces a
    /// `Have`, and its report may arrive after the node already asked again.
    pub report_grace: Duration,
    /// One copy of each block enters each region: a requester whose region has no holder of
    /// a block is sent across regions or to the master only if no other copy of it is on its
    /// way into that region, and the master hands out a first copy once per region (not once
    /// swarm-wide). Costs master egress (up to one copy per region) for traffic that stays
    /// inside regions. Requesters without a region label are not budgeted.
    pub region_budget: bool,
    /// One copy of a block enters a labelled region at a time: a requester whose region has
    /// no usable holder of a block is sent across regions only if no other copy of it is
    /// already on its way into that region (else it waits for that copy, then gets it inside),
    /// and a run from outside the region is not continued. Unlike `region_budget`, the master
    /// still sends one first copy swarm-wide, so it costs no origin egress; it keeps the
    /// crowd of a region from all crossing for the same blocks before the first copy lands.
    pub one_entry_per_region: bool,
    /// Each requester walks the blocks it needs from a block fixed by its id, not from block
    /// 0, so that a crowd soon holds different blocks to trade (see [`start_block`]).
    pub spread_start: bool,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            max_master_piece: 8,
            lone_master_piece: 64,
            min_master_piece: 4,
            max_master_pieces: 4,
            master_load_half: 256,
            max_peer_piece: 8,
            max_blocks_per_answer: 512,
            max_runs_per_answer: 16,
            assignment_timeout: Duration::from_secs(20),
            retry_after: Duration::from_millis(200),
            waiting_polls_per_s: 1_000,
            report_grace: Duration::from_secs(10),
            master_slots: 64,
            master_upload_rate: None,
            peer_slots: 16,
            region_budget: false,
            one_entry_per_region: true,
            spread_start: true,
        }
    }
}

/// The answer to a Locate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocateAnswer {
    /// Where to get what.
    pub assignments: Vec<Assignment>,
    /// When nothing was assigned, how long to wait before asking again.
    pub retry_after: Duration,
}

/// Why a request cannot be answered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    /// The master does not know the file.
    #[error("unknown file {0}")]
    UnknownFile(FileId),
}

#[derive(Debug, Default)]
struct PeerState {
    addrs: Vec<Multiaddr>,
    /// Its addresses through the master's relay, while it holds a reservation there (a node
    /// behind NAT): hinted before `addrs`, which it may not be reachable at.
    relayed: Vec<Multiaddr>,
    region: String,
    /// The network prefix of the address its connection comes from (observed).
    prefix: Option<NetPrefix>,
    live: bool,
    /// Blocks assigned to this peer as a source and not yet confirmed by their requester.
    load: u32,
    /// Runs (piece streams) assigned from this peer whose requester has not confirmed all
    /// it was assigned from it (a run counts until its requester's last block from this peer
    /// is confirmed: a little over, never under). At `peer_slots` it is full.
    serving: u32,
    /// As a requester: per holder, (blocks assigned from it and not confirmed, runs).
    sources: HashMap<PeerId, (u32, u32)>,
    /// Its last Locate was answered with nothing (it is waiting).
    waiting: bool,
    /// Peers this one could not get data from: never sent there again.
    /// Until when (`None`: for good).
    avoid: HashMap<PeerId, Option<Instant>>,
    /// Whether it is in the [`LoadIndex`] (once it has held a block).
    indexed: bool,
    /// Its place among peers of equal load, once it has held a block: 32 bits of its id,
    /// then its number (see [`Numbers`]) in the low 32 bits. The id's bits spread the ties
    /// as an order by id would (an order by number alone sends the first holders more).
    tie: u64,
}

/// Per region, and per network prefix, the peers that have held blocks, ordered by (load,
/// number): a Locate walks it from the least loaded up and stops at the first usable holder,
/// instead of scanning every holder. `open` lists only the peers with a free serving slot, so
/// that a walk for a holder to send a requester to does not step over the full ones (in a
/// busy crowd, nearly all of them).
#[derive(Debug, Default)]
struct LoadIndex {
    all: LoadSets,
    open: LoadSets,
    /// How many times a peer was placed or taken out: an [`Unheld`] from an earlier count
    /// may be out of date.
    changes: u64,
}

#[derive(Debug, Default)]
struct LoadSets {
    by_region: HashMap<String, BTreeSet<(u32, u64)>>,
    by_prefix: HashMap<NetPrefix, BTreeSet<(u32, u64)>>,
}

/// Dense numbers for the peers that hold blocks: the load index and the per-block holder
/// lists name peers by number (cheaper to compare and copy than a `PeerId`; the index's key
/// carries it in [`PeerState::tie`]). A peer that
/// leaves gives its number back, and the next new holder takes it, so the table is as large
/// as the most peers held at once, not the most ever seen.
#[derive(Debug, Default)]
struct Numbers {
    of: HashMap<PeerId, u32>,
    peer: Vec<PeerId>,
    free: Vec<u32>,
}

/// A block held by at most this many peers is looked up in its own holder list; above it,
/// by walking the [`LoadIndex`] (where about one peer in `peers / holders` holds it).
const RARE_HOLDERS: usize = 128;

#[derive(Debug, Clone, Copy)]
struct Pending {
    source: Option<PeerId>,
    deadline: Instant,
}

/// A copy of a block on its way into a region (region budget only).
#[derive(Debug, Clone)]
struct Entering {
    region: String,
    requester: PeerId,
    source: Option<PeerId>,
    deadline: Instant,
}

/// Most holders outside the requester's region one Locate ranks by nearness for a widely held
/// block: the least loaded ones, found by walking the load index.
const CROSS_REGION_CANDIDATES: usize = 64;

/// Most peers one walk of the load index steps over for one block (a region's, a prefix's, or
/// the other regions' merged). Walks are only for blocks held by more than [`RARE_HOLDERS`]
/// peers, so in a set of up to 16 x 128 peers each holder of the block is within reach; in a
/// larger one a usable holder past the first 512 of a set is missed (the requester asks again,
/// or the block crosses from another region) rather than every Locate paying for the whole
/// set. Without it, a crowd of 10,000 in four regions spent nine tenths of the simulator's time
/// walking regions whose holders of a block were all busy.
const MAX_WALK: usize = 512;

/// Most closed assignments remembered per requester and file (for checking reports).
const MAX_PAST_PER_REQUESTER: usize = 256;

/// A redirect whose window closed, remembered for `report_grace` so that a late report
/// about it can still be checked.
#[derive(Debug, Clone, Copy)]
struct Past {
    source: PeerId,
    range: BlockRange,
    /// Until when a report about it counts.
    until: Instant,
    /// The requester confirmed these blocks (`Have`) while this was its assignment.
    confirmed: bool,
}

#[derive(Debug)]
struct FileState {
    name: String,
    size: u64,
    blocks: u32,
    master_has: Blocks,
    /// What each holder holds, by peer number (see [`Numbers`]): a walk of the load index
    /// tests a block by indexing, not by hashing a `PeerId`.
    held: Held,
    /// Per requester, per block: what it was assigned and until when that counts.
    pending: HashMap<PeerId, HashMap<u32, Pending>>,
    /// Per block, the requester a master copy is on its way to.
    handouts: HashMap<u32, (PeerId, Instant)>,
    /// Per block, the copies on their way into a region from outside it (region budget).
    entering: HashMap<u32, Vec<Entering>>,
    /// Per requester, its closed redirects (oldest first, capped).
    past: HashMap<PeerId, VecDeque<Past>>,
    bytes_from_master: u64,
    bytes_from_peers: u64,
    /// Per block, how many peers hold it.
    holder_count: Vec<u32>,
    /// Holders of every block (seeds): they need no first copies.
    complete: u32,
    /// Per block, its holders (peer numbers, may name peers that no longer hold it) while
    /// few hold it; `None` once there were too many to list (rebuilt when they are few again).
    rare_holders: Vec<Option<Vec<u32>>>,
}

/// The ownership table and the redirect rule.
#[derive(Debug)]
pub struct Policy {
    cfg: PolicyConfig,
    files: HashMap<FileId, FileState>,
    peers: HashMap<PeerId, PeerState>,
    banned: HashSet<PeerId>,
    master_load: u32,
    /// Per requester, its blocks on their way from the master (pending, any file).
    master_pending: HashMap<PeerId, u32>,
    /// Peers whose last Locate was answered with nothing.
    waiting: u32,
    /// Live peers.
    live: u32,
    index: LoadIndex,
    /// Observed prefixes and network coordinates.
    locations: Locations,
    /// Peer numbers, for the load index and the per-block holder lists.
    numbers: Numbers,
    /// No pending assignment or handout expires before this (`None`: none pending), so a
    /// Locate only walks every pending list when something may have expired.
    expiry_floor: Option<Instant>,
    /// What the master sent lately, for lone pieces under no upload cap.
    sent: SentWindow,
}

impl Policy {
    /// An empty table.
    pub fn new(cfg: PolicyConfig) -> Self {
        Self {
            cfg,
            files: HashMap::default(),
            peers: HashMap::default(),
            banned: HashSet::default(),
            master_load: 0,
            master_pending: HashMap::default(),
            waiting: 0,
            live: 0,
            index: LoadIndex::default(),
            locations: Locations::default(),
            numbers: Numbers::default(),
            expiry_floor: None,
            sent: SentWindow::default(),
        }
    }

    /// The master's piece server has sent `total` bytes so far (a counter; the master calls
    /// this before each Locate). Without an upload cap, a lone requester's answer is at most
    /// what was sent in the last [`LONE_HORIZON`]: an idle master's first answers are a
    /// crowd's, and grow as fast as the bytes go out, as TCP's window does.
    pub fn master_sent(&mut self, now: Instant, total: u64) {
        self.sent.note(now, total);
    }

    /// Registers a file of `blocks` blocks, of which the master holds `master_has`.
    pub fn add_file(&mut self, file: FileId, name: String, size: u64, master_has: Blocks) {
        let blocks = master_has.capacity();
        self.files.entry(file).or_insert_with(|| FileState {
            name,
            size,
            blocks,
            master_has,
            held: Held::new(blocks),
            pending: HashMap::default(),
            handouts: HashMap::default(),
            entering: HashMap::default(),
            past: HashMap::default(),
            bytes_from_master: 0,
            bytes_from_peers: 0,
            holder_count: vec![0; blocks as usize],
            complete: 0,
            rare_holders: vec![Some(Vec::new()); blocks as usize],
        });
    }

    /// Whether the file is known.
    pub fn has_file(&self, file: &FileId) -> bool {
        self.files.contains_key(file)
    }

    /// The master now holds `block` of `file` itself.
    pub fn master_stored(&mut self, file: &FileId, block: u32) {
        if let Some(f) = self.files.get_mut(file) {
            f.master_has.insert(block);
        }
    }

    /// How many blocks `file` has, if the master knows it.
    pub fn file_blocks(&self, file: &FileId) -> Option<u32> {
        self.files.get(file).map(|f| f.blocks)
    }

    /// Whether the master holds every block of `file`.
    pub fn master_complete(&self, file: &FileId) -> bool {
        self.files.get(file).is_some_and(|f| f.master_has.is_full())
    }

    /// A peer connected (or its addresses changed).
    pub fn peer_up(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        if self.banned.contains(&peer) {
            return;
        }
        let p = self.peers.entry(peer).or_default();
        if !p.live {
            p.live = true;
            self.live += 1;
        }
        for a in addrs {
            if !p.addrs.contains(&a) {
                p.addrs.push(a);
            }
        }
        p.addrs.truncate(MAX_HINT_ADDRS);
    }

    /// `peer` is reachable at `addrs` through the master's relay (it holds a reservation), or
    /// no longer (`addrs` empty). At most [`MAX_RELAYED_HINTS`] are kept. Only a connected
    /// peer (one [`Policy::peer_up`] told of) can hold a reservation; others are ignored.
    pub fn set_relayed(&mut self, peer: PeerId, mut addrs: Vec<Multiaddr>) {
        addrs.truncate(MAX_RELAYED_HINTS);
        if let Some(p) = self.peers.get_mut(&peer) {
            p.relayed = addrs;
        }
    }

    /// A peer's region label.
    pub fn set_region(&mut self, peer: PeerId, region: String) {
        let p = self.peers.entry(peer).or_default();
        reindex(p, &mut self.index, self.cfg.peer_slots, |p| {
            p.region = region
        });
    }

    /// The connection from `peer` comes from `addr` (the remote address of the connection, as
    /// the master sees it): its network prefix.
    pub fn observe_addr(&mut self, peer: PeerId, addr: &Multiaddr) {
        let Some(prefix) = NetPrefix::of(addr) else {
            return;
        };
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        reindex(p, &mut self.index, self.cfg.peer_slots, |p| {
            p.prefix = Some(prefix);
        });
    }

    /// The master's ping to `peer` took `rtt`.
    pub fn master_rtt(&mut self, peer: PeerId, rtt: Duration) {
        if self.peers.contains_key(&peer) {
            self.locations.master_rtt(peer, rtt);
        }
    }

    /// `reporter` measured these RTTs to other peers (see [`Locations::report`]); only
    /// samples about peers the master sees count. Returns how many were taken.
    pub fn rtt_report(
        &mut self,
        now: Instant,
        reporter: PeerId,
        samples: &[RttSample],
    ) -> Result<usize, ReportRefused> {
        if !self.peers.contains_key(&reporter) {
            return Ok(0);
        }
        let peers = &self.peers;
        self.locations.report(now, reporter, samples, |p| {
            peers.get(p).is_some_and(|s| s.live)
        })
    }

    /// The estimated RTT between two peers, from their network coordinates.
    pub fn estimated_rtt(&self, a: &PeerId, b: &PeerId) -> Option<Duration> {
        self.locations.estimate(a, b)
    }

    /// A peer is gone (disconnected, failed its liveness check, or left): it leaves every
    /// mirror list at once, and its assignments stop counting. Returns whether it was a mirror.
    pub fn peer_down(&mut self, peer: &PeerId) -> bool {
        let mut was_mirror = false;
        let number = self.numbers.of.get(peer).copied();
        for f in self.files.values_mut() {
            if let Some(held) = number.and_then(|n| f.held.take(n)) {
                was_mirror = true;
                f.complete -= u32::from(held.is_full());
                for r in held.ranges() {
                    for b in r.iter() {
                        f.holder_count[b as usize] -= 1;
                    }
                }
            }
            if let Some(pending) = f.pending.remove(peer) {
                for p in pending.values() {
                    release(
                        &mut self.peers,
                        &mut self.index,
                        &mut self.master_load,
                        &mut self.master_pending,
                        self.cfg.peer_slots,
                        *peer,
                        p.source,
                    );
                }
            }
            f.handouts.retain(|_, (to, _)| to != peer);
            f.entering.retain(|_, list| {
                list.retain(|e| e.requester != *peer && e.source != Some(*peer));
                !list.is_empty()
            });
            // Redirects to it die with it: a report about them (its downloaders see it die)
            // is not about this peer's next session, should it come back with its key.
            for (requester, pending) in f.pending.iter_mut() {
                pending.retain(|_, p| {
                    let keep = p.source != Some(*peer);
                    if !keep {
                        release(
                            &mut self.peers,
                            &mut self.index,
                            &mut self.master_load,
                            &mut self.master_pending,
                            self.cfg.peer_slots,
                            *requester,
                            p.source,
                        );
                    }
                    keep
                });
            }
            f.past.remove(peer);
            for log in f.past.values_mut() {
                log.retain(|x| x.source != *peer);
            }
            f.past.retain(|_, log| !log.is_empty());
        }
        if let Some(p) = self.peers.get(peer) {
            // Out of the load index: walks never step over it.
            self.index.unplace(p, self.cfg.peer_slots);
        }
        self.numbers.forget(peer);
        // Its addresses, region, location and avoidances go with it: a peer that comes back
        // starts afresh, and the table holds only connected peers.
        if let Some(p) = self.peers.remove(peer) {
            if p.waiting {
                self.waiting = self.waiting.saturating_sub(1);
            }
            if p.live {
                self.live = self.live.saturating_sub(1);
            }
        }
        self.locations.forget(peer);
        was_mirror
    }

    /// Whether the master considers `peer` live.
    pub fn is_live(&self, peer: &PeerId) -> bool {
        self.peers.get(peer).is_some_and(|p| p.live)
    }

    /// `peer` holds the whole file (a publisher announcing it).
    pub fn holds_all(&mut self, file: &FileId, peer: PeerId) {
        if let Some(f) = self.files.get_mut(file) {
            let n = index_peer(
                &mut self.peers,
                &mut self.index,
                &mut self.numbers,
                peer,
                self.cfg.peer_slots,
            );
            let before = f.held.get(n).cloned();
            f.held.set_full(n);
            f.complete += u32::from(!before.as_ref().is_some_and(|h| h.is_full()));
            for b in 0..f.blocks {
                if !before.as_ref().is_some_and(|h| h.contains(b)) {
                    f.added_holder(b, n);
                }
            }
        }
    }

    /// `peer` now holds `ranges` of `file`: it becomes a mirror of them, and the assignments
    /// that brought them stop counting as load.
    pub fn have(&mut self, file: &FileId, peer: PeerId, ranges: &[BlockRange]) {
        let Some(f) = self.files.get_mut(file) else {
            return;
        };
        let geometry_blocks = f.blocks;
        let n = index_peer(
            &mut self.peers,
            &mut self.index,
            &mut self.numbers,
            peer,
            self.cfg.peer_slots,
        );
        let was_full = f.held.get(n).is_some_and(Blocks::is_full);
        let pending = f.pending.entry(peer).or_default();
        let grace = self.cfg.report_grace;
        let mut added = Vec::new();
        // Merged and clamped first: overlapping ranges cost one pass over the file at most.
        for r in normalize(ranges, geometry_blocks, MAX_RANGES_PER_MESSAGE) {
            for b in r.iter() {
                if f.held.insert(n, b) {
                    added.push(b);
                }
                // Its copy has entered its region: the region holds it now.
                if let Some(list) = f.entering.get_mut(&b) {
                    list.retain(|e| e.requester != peer);
                    if list.is_empty() {
                        f.entering.remove(&b);
                    }
                }
                if let Some(p) = pending.remove(&b) {
                    release(
                        &mut self.peers,
                        &mut self.index,
                        &mut self.master_load,
                        &mut self.master_pending,
                        self.cfg.peer_slots,
                        peer,
                        p.source,
                    );
                    remember(&mut f.past, peer, b, p, true, grace);
                }
            }
        }
        if !was_full && f.held.get(n).is_some_and(Blocks::is_full) {
            f.complete += 1;
        }
        for b in added {
            f.added_holder(b, n);
        }
    }

    /// Accounts piece bytes served, for status.
    pub fn count_bytes(&mut self, file: &FileId, from_master: u64, from_peers: u64) {
        if let Some(f) = self.files.get_mut(file) {
            f.bytes_from_master = f.bytes_from_master.saturating_add(from_master);
            f.bytes_from_peers = f.bytes_from_peers.saturating_add(from_peers);
        }
    }

    /// `reporter` could not get data from `peer`: never send it there again.
    /// `until` bounds it (`None`: for good, as after corrupt data).
    pub fn avoid(&mut self, reporter: PeerId, peer: PeerId, until: Option<Instant>) {
        let avoid = &mut self.peers.entry(reporter).or_default().avoid;
        if avoid.len() >= MAX_AVOID_PER_PEER && !avoid.contains_key(&peer) {
            // Full: drop the avoidance that ends first ("for good" sorts last).
            let first = avoid
                .iter()
                .min_by_key(|(p, until)| (until.is_none(), **until, **p))
                .map(|(p, _)| *p);
            if let Some(p) = first {
                avoid.remove(&p);
            }
        }
        let entry = avoid.entry(peer).or_insert(until);
        // Never shorten an avoidance: "for good" stays for good.
        *entry = match (*entry, until) {
            (None, _) | (_, None) => None,
            (Some(a), Some(b)) => Some(a.max(b)),
        };
    }

    /// Bans `peer`: gone from every list, never assigned again.
    pub fn ban(&mut self, peer: PeerId) {
        self.peer_down(&peer);
        self.banned.insert(peer);
    }

    /// Whether `peer` is banned.
    pub fn is_banned(&self, peer: &PeerId) -> bool {
        self.banned.contains(peer)
    }

    /// The live mirrors of `file` (peers with at least one block).
    pub fn mirrors(&self, file: &FileId) -> Vec<PeerId> {
        self.files
            .get(file)
            .map(|f| f.holders(&self.numbers).map(|(p, _)| *p).collect())
            .unwrap_or_default()
    }

    /// Drops avoidances whose time ran out (walks every peer: call it on a timer, not per
    /// request).
    pub fn expire_avoidance(&mut self, now: Instant) {
        for p in self.peers.values_mut() {
            p.avoid.retain(|_, until| until.is_none_or(|u| u > now));
        }
    }

    /// Drops assignments whose time ran out.
    pub fn expire(&mut self, now: Instant) {
        let grace = self.cfg.report_grace;
        let mut floor: Option<Instant> = None;
        let mut lower = |d: Instant| floor = Some(floor.map_or(d, |f| f.min(d)));
        for f in self.files.values_mut() {
            for (requester, pending) in f.pending.iter_mut() {
                pending.retain(|b, p| {
                    let keep = p.deadline > now;
                    if keep {
                        lower(p.deadline);
                    } else {
                        release(
                            &mut self.peers,
                            &mut self.index,
                            &mut self.master_load,
                            &mut self.master_pending,
                            self.cfg.peer_slots,
                            *requester,
                            p.source,
                        );
                        remember(&mut f.past, *requester, *b, *p, false, grace);
                    }
                    keep
                });
            }
            f.pending.retain(|_, pending| !pending.is_empty());
            f.handouts.retain(|_, (_, deadline)| {
                let keep = *deadline > now;
                if keep {
                    lower(*deadline);
                }
                keep
            });
            f.entering.retain(|_, list| {
                list.retain(|e| e.deadline > now);
                list.iter().for_each(|e| lower(e.deadline));
                !list.is_empty()
            });
            for log in f.past.values_mut() {
                log.retain(|x| x.until > now);
            }
            f.past.retain(|_, log| !log.is_empty());
        }
        self.expiry_floor = floor;
    }

    /// Scales `max` down as the master's load grows: `max * half / (half + load)`.
    fn under_load(&self, max: u32) -> u32 {
        let half = u64::from(self.cfg.master_load_half);
        ((u64::from(max) * half).div_ceil(half + u64::from(self.master_load))) as u32
    }

    /// The master's piece for a requester whose fair share of first copies is `share`
    /// blocks: `max_master_piece`, or up to `lone` (see [`Policy::lone_piece`]) for a large
    /// share; smaller under load.
    fn master_piece(&self, share: u32, lone: u32) -> u32 {
        let lone = lone.max(self.cfg.max_master_piece);
        let max = (share / LONE_SHARE_PIECES).clamp(self.cfg.max_master_piece, lone);
        self.under_load(max).clamp(self.cfg.min_master_piece, max)
    }

    /// The largest master piece a lone requester of `f` may get: `lone_master_piece`, or less
    /// so that one answer's pieces are at most what the master's upload sends in
    /// [`LONE_HORIZON`] (its cap, or else what it sent in the last one); never below
    /// `max_master_piece`.
    fn lone_piece(&self, now: Instant, f: &FileState) -> u32 {
        let lone = self.cfg.lone_master_piece.max(self.cfg.max_master_piece);
        let in_horizon = match self.cfg.master_upload_rate {
            Some(rate) => u128::from(rate) * LONE_HORIZON.as_millis() / 1000,
            None => u128::from(self.sent.in_horizon(now)),
        };
        let block = f.size.div_ceil(u64::from(f.blocks.max(1))).max(1);
        let answer = in_horizon / u128::from(block);
        let piece = answer / u128::from(self.cfg.max_master_pieces.max(1));
        u32::try_from(piece)
            .unwrap_or(u32::MAX)
            .clamp(self.cfg.max_master_piece, lone)
    }

    /// Requesters that may have master pieces on their way at once: the master's slots over
    /// the pieces of two answers (each may have one answer on its way and ask for the next).
    fn master_clients(&self, share: u32, lone: u32) -> u32 {
        let pieces = self
            .under_load(self.cfg.max_master_pieces)
            .min(share.div_ceil(self.master_piece(share, lone).max(1)))
            .max(1);
        (self.cfg.master_slots / (2 * pieces)).max(1)
    }

    /// A requester's fair share of first copies of `f`, in blocks: the file over the peers
    /// that may want it (live, not holding all of it). The first node of a crowd that asks
    /// must not take every first copy (it alone would then serve the whole crowd, through its
    /// slots, while every other upload sits idle): with 30 nodes and 32 blocks, each gets
    /// about one, and all of them have something to serve at once. A lone node's share is
    /// the whole file (the answer budget bounds it then).
    fn first_copy_share(&self, f: &FileState) -> u32 {
        let wanting = self.live.saturating_sub(f.complete).max(1);
        f.blocks.div_ceil(wanting).max(1)
    }

    /// Blocks the master hands out in one answer: several pieces when idle, one when busy.
    fn master_budget(&self, share: u32, lone: u32) -> u32 {
        self.master_piece(share, lone) * self.under_load(self.cfg.max_master_pieces).max(1)
    }

    /// Answers a Locate from `requester` for the blocks `need` of `file`.
    pub fn locate(
        &mut self,
        now: Instant,
        requester: PeerId,
        file: &FileId,
        need: &[BlockRange],
    ) -> Result<LocateAnswer, PolicyError> {
        // Walk the pending lists only when an assignment may have run out.
        if self.expiry_floor.is_some_and(|t| now >= t) {
            self.expire(now);
        }
        // An unknown file is refused before anything is computed for it.
        let (share, lone) = self
            .files
            .get(file)
            .map(|f| (self.first_copy_share(f), self.lone_piece(now, f)))
            .ok_or(PolicyError::UnknownFile(*file))?;
        let master_piece = self.master_piece(share, lone);
        let master_budget = self.master_budget(share, lone).min(share);
        let master_clients = self.master_clients(share, lone);
        let cfg = self.cfg.clone();
        let f = self
            .files
            .get_mut(file)
            .ok_or(PolicyError::UnknownFile(*file))?;
        let avoid = self
            .peers
            .get(&requester)
            .map(|p| p.avoid.clone())
            .unwrap_or_default();
        // Live holders this requester avoids only for a moment (they were busy).
        let briefly_avoided: Vec<PeerId> = avoid
            .iter()
            .filter(|(p, until)| {
                until.is_some_and(|u| u > now && u <= now + BRIEF_AVOID)
                    && self.peers.get(*p).is_some_and(|s| s.live)
            })
            .map(|(p, _)| *p)
            .collect();
        let my_region = self
            .peers
            .get(&requester)
            .map(|p| p.region.clone())
            .unwrap_or_default();
        let mine = f.held_by(&self.numbers, &requester).cloned();
        let deadline = now + cfg.assignment_timeout;
        let vantage = self.locations.vantage(
            requester,
            &my_region,
            self.peers.get(&requester).and_then(|p| p.prefix),
        );
        let budgeted = cfg.region_budget && !my_region.is_empty();
        let regional = (budgeted || cfg.one_entry_per_region) && !my_region.is_empty();
        // Within a region, holders are looked for inside it first.
        let scope = if regional {
            Scope::Region
        } else {
            Scope::Anywhere
        };
        let in_my_region = |peers: &HashMap<PeerId, PeerState>, p: &PeerId| {
            peers.get(p).is_some_and(|s| s.region == my_region)
        };
        // Merged and clamped first: the walk below visits each block of the file once at
        // most, whatever the request repeats.
        let mut need = normalize(need, f.blocks, MAX_RANGES_PER_MESSAGE);
        if cfg.spread_start {
            rotate(&mut need, start_block(&requester, f.blocks));
        }
        // Whom this requester may be sent to: not itself, not a peer it had trouble with, and
        // only a peer it can dial (live, with addresses to hint).
        let reachable = |p: &PeerId, s: &PeerState| {
            s.live
                && !(s.addrs.is_empty() && s.relayed.is_empty())
                && *p != requester
                && (avoid.is_empty()
                    || !avoid
                        .get(p)
                        .is_some_and(|until| until.is_none_or(|u| u > now)))
        };
        // ... and not full.
        let usable = |p: &PeerId, s: &PeerState| s.serving < cfg.peer_slots && reachable(p, s);
        let mut runs: Vec<(BlockRange, Option<PeerId>)> = Vec::new();
        let run_room = cfg.max_runs_per_answer.max(1);
        let mut budget = cfg.max_blocks_per_answer;
        let mut scans = cfg.max_blocks_per_answer.saturating_mul(LOCATE_SCAN_FACTOR);
        let mut master_given = 0u32;
        // New first copies only to a requester with less than two answers' worth on its way
        // from the master (so it can ask for the next before the last arrive: with one, a lone
        // fetch ran at a third of its speed), and to a new requester only while the master's
        // slots can take two more answers' worth of pieces.
        let master_open = match self.master_pending.get(&requester) {
            Some(n) => *n < 2 * master_budget,
            None => self.master_pending.len() < master_clients as usize,
        };

        // What the two walks in the requester's region (for open holders it may be sent to;
        // for any holder there it could reach) last stepped over in vain.
        let (mut open_here, mut all_here) = (Unheld::default(), Unheld::default());
        'outer: for r in &need {
            for b in r.iter() {
                if budget == 0 || runs.len() >= MAX_ASSIGNMENTS {
                    break 'outer;
                }
                if mine.as_ref().is_some_and(|m| m.contains(b)) {
                    continue;
                }
                if scans == 0 {
                    break 'outer;
                }
                scans -= 1;
                // Keep extending the current run from the same holder: pieces stay whole.
                let continuing = match runs.last() {
                    Some((run, Some(h)))
                        if run.end == b
                            && run.len() < cfg.max_peer_piece
                            && f.held_by(&self.numbers, h)
                                .is_some_and(|held| held.contains(b)) =>
                    {
                        Some(*h)
                    }
                    _ => None,
                };
                // Within a region (one entry per region, or the budget) a run from outside it
                // is not continued: a holder inside may have appeared since the run began.
                let continuing = continuing.filter(|h| !regional || in_my_region(&self.peers, h));
                // Else the nearest, least-loaded usable holder, ties by id bits (within a
                // region, first looked for inside it).
                let near = |f: &mut FileState,
                            walk: Walk,
                            ok: &Eligible<'_>,
                            cache: Option<&mut Unheld>| {
                    nearest_least_loaded(
                        f,
                        &self.peers,
                        &self.index,
                        &self.numbers,
                        b,
                        &vantage,
                        walk,
                        ok,
                        cache,
                    )
                };
                let mut best = continuing
                    .or_else(|| near(f, Walk::open(scope), &usable, Some(&mut open_here)));
                if regional && best.is_none() {
                    if f.entering.get(&b).is_some_and(|list| {
                        list.iter()
                            .any(|e| e.region == my_region && e.requester != requester)
                    }) {
                        // A copy is on its way into the region: wait for it, then get it there.
                        continue;
                    }
                    if near(
                        f,
                        Walk::all(Scope::Region),
                        &|p, s| reachable(p, s) && s.region == my_region,
                        Some(&mut all_here),
                    )
                    .is_some()
                    {
                        // Its holders in the region are only full: wait for a slot there
                        // rather than cross (each crossing is one more copy between regions).
                        continue;
                    }
                    best = near(f, Walk::open(Scope::Beyond), &usable, None);
                }
                let from_outside = regional && !best.is_some_and(|h| in_my_region(&self.peers, &h));
                let master_may = f.master_has.contains(b)
                    && match f.handouts.get(&b) {
                        // Again to the requester it was handed to (its transfer failed).
                        Some((to, _)) if *to == requester => true,
                        // One first copy at a time: swarm-wide, or per region under the
                        // budget (checked above).
                        Some(_) if !budgeted => false,
                        _ => master_open || master_given > 0,
                    }
                    && master_given < master_budget
                    && !briefly_avoided
                        .iter()
                        .any(|p| f.held_by(&self.numbers, p).is_some_and(|h| h.contains(b)));
                let source = if budgeted && from_outside && master_may {
                    // Under the budget a region's copy comes from the master, which pays for
                    // it, rather than across regions.
                    None
                } else if best.is_some() {
                    best
                } else if master_may
                    // A holder that is only full frees a slot soon: wait for it rather than
                    // send the block from the master again. (Of more than `RARE_HOLDERS`
                    // holders one is taken to be reachable: a bounded walk may not meet it.)
                    && (f.holder_count[b as usize] == 0
                        || f.holder_count[b as usize] as usize <= RARE_HOLDERS
                            && near(f, Walk::all(Scope::Anywhere), &reachable, None)
                        .is_none())
                {
                    None
                } else {
                    // Its first copy is on the way elsewhere, or the master's share of this
                    // answer is used up.
                    continue;
                };
                let max_len = if source.is_some() {
                    cfg.max_peer_piece
                } else {
                    master_piece
                };
                let extends = matches!(runs.last(),
                    Some((run, src)) if *src == source && run.end == b && run.len() < max_len);
                if !extends && runs.len() as u32 >= run_room {
                    break 'outer;
                }
                // Retract any older assignment of this block to this requester.
                let pending = f.pending.entry(requester).or_default();
                if let Some(old) = pending.remove(&b) {
                    release(
                        &mut self.peers,
                        &mut self.index,
                        &mut self.master_load,
                        &mut self.master_pending,
                        self.cfg.peer_slots,
                        requester,
                        old.source,
                    );
                    remember(&mut f.past, requester, b, old, false, cfg.report_grace);
                }
                pending.insert(b, Pending { source, deadline });
                if regional {
                    let list = f.entering.entry(b).or_default();
                    list.retain(|e| e.requester != requester);
                    if from_outside {
                        list.push(Entering {
                            region: my_region.clone(),
                            requester,
                            source,
                            deadline,
                        });
                    }
                    if list.is_empty() {
                        f.entering.remove(&b);
                    }
                }
                self.expiry_floor = Some(self.expiry_floor.map_or(deadline, |t| t.min(deadline)));
                match source {
                    Some(p) => {
                        // A new run from it (not the current run continued): one more stream.
                        let new_run = !matches!(runs.last(), Some((r, Some(h)))
                            if *h == p && r.end == b && r.len() < cfg.max_peer_piece);
                        let counted = self.peers.get_mut(&requester).is_some_and(|r| {
                            let (blocks, n) = r.sources.entry(p).or_default();
                            *blocks += 1;
                            *n += u32::from(new_run);
                            true
                        });
                        if let Some(s) = self.peers.get_mut(&p) {
                            let serving = s.serving + u32::from(counted && new_run);
                            let load = s.load + 1;
                            reindex(s, &mut self.index, cfg.peer_slots, |s| {
                                s.serving = serving;
                                s.load = load;
                            });
                        }
                    }
                    None => {
                        self.master_load += 1;
                        *self.master_pending.entry(requester).or_default() += 1;
                        master_given += 1;
                        f.handouts.insert(b, (requester, deadline));
                    }
                }
                budget -= 1;
                match runs.last_mut() {
                    Some((run, _)) if extends => run.end = b + 1,
                    _ => runs.push((BlockRange::new(b, b + 1), source)),
                }
            }
        }

        let assignments: Vec<Assignment> = runs
            .into_iter()
            .map(|(range, src)| Assignment {
                range,
                source: match src {
                    None => Source::Master,
                    Some(peer) => Source::Peer {
                        peer,
                        addrs: self.hint(&peer, &requester),
                    },
                },
            })
            .collect();
        let waits = assignments.is_empty();
        if let Some(p) = self.peers.get_mut(&requester) {
            if p.waiting != waits {
                p.waiting = waits;
                self.waiting = if waits {
                    self.waiting + 1
                } else {
                    self.waiting.saturating_sub(1)
                };
            }
        }
        let retry_after = if waits {
            cfg.retry_after.max(Duration::from_secs_f64(
                f64::from(self.waiting) / f64::from(cfg.waiting_polls_per_s.max(1)),
            ))
        } else {
            Duration::ZERO
        };
        Ok(LocateAnswer {
            assignments,
            retry_after,
        })
    }

    /// Whether the master sent `reporter` to `peer` for every block of `blocks` of `file`
    /// (for any block when `blocks` is empty) and that assignment is still open, or closed
    /// less than `report_grace` ago without `reporter` confirming the blocks. Only such a
    /// report is about something the master did; any other is ignored. At most
    /// [`MAX_PIECE_BLOCKS`] blocks are looked at: a longer list is not a report about one
    /// piece, and does not match.
    pub fn assigned(
        &self,
        reporter: &PeerId,
        file: &FileId,
        peer: &PeerId,
        blocks: &[BlockRange],
        now: Instant,
    ) -> bool {
        let Some(f) = self.files.get(file) else {
            return false;
        };
        let grace = self.cfg.report_grace;
        let pending = f.pending.get(reporter);
        let past = f.past.get(reporter);
        let open = |p: &Pending| p.source == Some(*peer) && p.deadline + grace > now;
        let closed = |x: &Past| x.source == *peer && !x.confirmed && x.until > now;
        if blocks.is_empty() {
            return pending.is_some_and(|m| m.values().any(open))
                || past.is_some_and(|log| log.iter().any(closed));
        }
        let total: u64 = blocks.iter().map(|r| u64::from(r.len())).sum();
        if total == 0
            || total > u64::from(MAX_PIECE_BLOCKS)
            || blocks.iter().any(|r| r.end > f.blocks)
        {
            return false;
        }
        blocks.iter().flat_map(|r| r.iter()).all(|b| {
            pending.and_then(|m| m.get(&b)).is_some_and(open)
                || past.is_some_and(|log| log.iter().any(|x| closed(x) && x.range.contains(b)))
        })
    }

    /// `peer` refused `blocks` of `file` as not held: it no longer holds them as far as the
    /// master is concerned, so nobody is sent there for them again. Returns how many of its
    /// claims were dropped. (It claims them again with a new `Have`.)
    pub fn forget_claims(&mut self, file: &FileId, peer: &PeerId, blocks: &[BlockRange]) -> u32 {
        let Some(f) = self.files.get_mut(file) else {
            return 0;
        };
        let Some(n) = self.numbers.of.get(peer).copied() else {
            return 0;
        };
        let Some(was_full) = f.held.get(n).map(Blocks::is_full) else {
            return 0;
        };
        let mut dropped = 0;
        for r in blocks {
            for b in BlockRange::new(r.start, r.end.min(f.blocks)).iter() {
                // A row left empty is dropped: it is no longer a mirror.
                if f.held.remove(n, b) {
                    dropped += 1;
                    // The rare-holder lists drop stale entries lazily; the count is exact.
                    f.holder_count[b as usize] -= 1;
                }
            }
        }
        f.complete -= u32::from(was_full);
        f.complete += u32::from(f.held.get(n).is_some_and(Blocks::is_full));
        dropped
    }

    /// Whether `peer` claims every block of `blocks` of `file`.
    pub fn claims(&self, file: &FileId, peer: &PeerId, blocks: BlockRange) -> bool {
        self.files
            .get(file)
            .and_then(|f| f.held_by(&self.numbers, peer))
            .is_some_and(|h| !blocks.is_empty() && h.contains_range(blocks))
    }

    /// The addresses to hint `requester` for `source`: those it declared; for a source that
    /// holds a reservation on the master's relay (it is behind a NAT), its relayed addresses,
    /// and the ones it declared only to a requester on the same network as it (same observed
    /// prefix: behind the same NAT). To anyone else they are private or unreachable, and a
    /// dial to them can hang for seconds (a dial in progress delays a stream to that peer).
    pub fn hint(&self, source: &PeerId, requester: &PeerId) -> Vec<Multiaddr> {
        let Some(s) = self.peers.get(source) else {
            return Vec::new();
        };
        if s.relayed.is_empty() {
            return s.addrs.clone();
        }
        let same_net =
            s.prefix.is_some() && s.prefix == self.peers.get(requester).and_then(|r| r.prefix);
        s.relayed
            .iter()
            .chain(s.addrs.iter().filter(|_| same_net))
            .take(MAX_HINT_ADDRS)
            .cloned()
            .collect()
    }

    /// Whether `peer` holds a reservation on the master's relay.
    pub fn is_relayed(&self, peer: &PeerId) -> bool {
        self.peers.get(peer).is_some_and(|p| !p.relayed.is_empty())
    }

    /// Every address the master knows for `peer`: through the master's relay first while it
    /// holds a reservation there, then those it declared; at most [`MAX_HINT_ADDRS`].
    pub fn addrs(&self, peer: &PeerId) -> Vec<Multiaddr> {
        self.peers
            .get(peer)
            .map(|p| {
                p.relayed
                    .iter()
                    .chain(p.addrs.iter())
                    .take(MAX_HINT_ADDRS)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Peers the table keeps state for (connected ones only: a peer that leaves is dropped).
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// How many peers `reporter` avoids now.
    pub fn avoid_count(&self, reporter: &PeerId) -> usize {
        self.peers.get(reporter).map_or(0, |p| p.avoid.len())
    }

    /// Current load of `peer` as a source, in blocks.
    pub fn load(&self, peer: &PeerId) -> u32 {
        self.peers.get(peer).map_or(0, |p| p.load)
    }

    /// One line per registered file, for `shoal ls` (unsorted).
    pub fn listing(&self) -> impl Iterator<Item = shoal_protocol::wire::ListedFile> + '_ {
        self.files
            .iter()
            .map(|(id, f)| shoal_protocol::wire::ListedFile {
                file: *id,
                name: f.name.clone(),
                size: f.size,
                blocks: f.blocks,
                master_blocks: f.master_has.count(),
                mirrors: f.held.holders() as u32,
            })
    }

    /// What the master knows of `file`.
    pub fn status(&self, file: &FileId) -> Option<FileStatus> {
        let f = self.files.get(file)?;
        let mut mirrors: Vec<MirrorStatus> = f
            .holders(&self.numbers)
            .map(|(peer, held)| {
                let p = self.peers.get(peer);
                MirrorStatus {
                    peer: *peer,
                    region: p.map(|p| p.region.clone()).unwrap_or_default(),
                    blocks: held.count(),
                    live: p.is_some_and(|p| p.live),
                }
            })
            .collect();
        // Most blocks first; the list is capped, the total is not.
        mirrors.sort_by_key(|m| (std::cmp::Reverse(m.blocks), m.peer));
        let mirrors_total = mirrors.len() as u32;
        mirrors.truncate(shoal_protocol::limits::MAX_STATUS_MIRRORS);
        // A word-level union over the live holders: bounded by holders x blocks / 64, not
        // holders x blocks.
        let mut covered = Blocks::new(f.blocks);
        for (_, h) in f.holders(&self.numbers).filter(|(p, _)| self.is_live(p)) {
            if covered.is_full() {
                break;
            }
            covered.union_with(h);
        }
        let master_only_blocks = f.blocks - covered.count();
        let mut banned: Vec<PeerId> = self.banned.iter().copied().collect();
        banned.sort();
        let banned_total = banned.len() as u32;
        banned.truncate(shoal_protocol::limits::MAX_STATUS_BANNED);
        Some(FileStatus {
            file: *file,
            name: f.name.clone(),
            size: f.size,
            blocks: f.blocks,
            master_blocks: f.master_has.count(),
            mirrors,
            mirrors_total,
            master_only_blocks,
            bytes_from_master: f.bytes_from_master,
            bytes_from_peers: f.bytes_from_peers,
            banned,
            banned_total,
            // The service fills it in: the policy sees no traffic.
            relayed_bytes: 0,
        })
    }
}

/// Remembers that `requester`'s assignment `p` of `block` closed (`confirmed` by its `Have`,
/// or replaced or expired), for checking late reports. Master handouts are not remembered:
/// reports about the master are ignored anyway.
fn remember(
    past: &mut HashMap<PeerId, VecDeque<Past>>,
    requester: PeerId,
    block: u32,
    p: Pending,
    confirmed: bool,
    grace: Duration,
) {
    let Some(source) = p.source else {
        return;
    };
    let until = p.deadline + grace;
    let log = past.entry(requester).or_default();
    if let Some(last) = log.back_mut() {
        if last.source == source
            && last.confirmed == confirmed
            && last.until == until
            && last.range.end == block
        {
            last.range.end = block + 1;
            return;
        }
    }
    if log.len() >= MAX_PAST_PER_REQUESTER {
        log.pop_front();
    }
    log.push_back(Past {
        source,
        range: BlockRange::new(block, block + 1),
        until,
        confirmed,
    });
}

fn release(
    peers: &mut HashMap<PeerId, PeerState>,
    index: &mut LoadIndex,
    master_load: &mut u32,
    master_pending: &mut HashMap<PeerId, u32>,
    slots: u32,
    requester: PeerId,
    source: Option<PeerId>,
) {
    match source {
        Some(p) => {
            let done_runs = peers
                .get_mut(&requester)
                .map_or(0, |r| match r.sources.get_mut(&p) {
                    Some((blocks, runs)) => {
                        *blocks = blocks.saturating_sub(1);
                        if *blocks == 0 {
                            let runs = *runs;
                            r.sources.remove(&p);
                            runs
                        } else {
                            0
                        }
                    }
                    None => 0,
                });
            if let Some(s) = peers.get_mut(&p) {
                let serving = s.serving.saturating_sub(done_runs);
                let load = s.load.saturating_sub(1);
                reindex(s, index, slots, |s| {
                    s.serving = serving;
                    s.load = load;
                });
            }
        }
        None => {
            *master_load = master_load.saturating_sub(1);
            if let Some(n) = master_pending.get_mut(&requester) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    master_pending.remove(&requester);
                }
            }
        }
    }
}

/// Changes what places a peer in the load index (load, serving runs, region, prefix),
/// keeping its place there.
fn reindex(
    s: &mut PeerState,
    index: &mut LoadIndex,
    slots: u32,
    change: impl FnOnce(&mut PeerState),
) {
    index.unplace(s, slots);
    change(s);
    index.place(s, slots);
}

/// Puts a peer that holds blocks into the load index (once), numbering it. Returns its number.
fn index_peer(
    peers: &mut HashMap<PeerId, PeerState>,
    index: &mut LoadIndex,
    numbers: &mut Numbers,
    peer: PeerId,
    slots: u32,
) -> u32 {
    let s = peers.entry(peer).or_default();
    if !s.indexed {
        // The id's last 4 bytes above, its number below.
        s.tie = (id_tail(&peer) & 0xFFFF_FFFF_0000_0000) | u64::from(numbers.number(peer));
        s.indexed = true;
        index.place(s, slots);
    }
    s.tie as u32
}

impl Numbers {
    /// `peer`'s number: its own if it has one, else a free one, else the next.
    fn number(&mut self, peer: PeerId) -> u32 {
        if let Some(n) = self.of.get(&peer) {
            return *n;
        }
        let n = match self.free.pop() {
            Some(n) => {
                self.peer[n as usize] = peer;
                n
            }
            None => {
                self.peer.push(peer);
                (self.peer.len() - 1) as u32
            }
        };
        self.of.insert(peer, n);
        n
    }

    /// `peer` left: its number is free. Holder lists that still name the number are checked
    /// against the holder table wherever they are read.
    fn forget(&mut self, peer: &PeerId) {
        if let Some(n) = self.of.remove(peer) {
            self.free.push(n);
        }
    }
}

impl LoadSets {
    fn insert(&mut self, s: &PeerState) {
        let key = (s.load, s.tie);
        self.by_region
            .entry(s.region.clone())
            .or_default()
            .insert(key);
        if let Some(prefix) = s.prefix {
            self.by_prefix.entry(prefix).or_default().insert(key);
        }
    }

    fn remove(&mut self, s: &PeerState) {
        let key = (s.load, s.tie);
        if let Some(set) = self.by_region.get_mut(&s.region) {
            set.remove(&key);
        }
        if let Some(prefix) = s.prefix {
            if let Some(set) = self.by_prefix.get_mut(&prefix) {
                set.remove(&key);
                // Prefixes are many: an empty set goes (regions are few and stay).
                if set.is_empty() {
                    self.by_prefix.remove(&prefix);
                }
            }
        }
    }
}

impl LoadIndex {
    /// Enters an indexed peer (in `open` too if it has a free slot of `slots`).
    fn place(&mut self, s: &PeerState, slots: u32) {
        self.changes += 1;
        if s.indexed {
            self.all.insert(s);
            if s.serving < slots {
                self.open.insert(s);
            }
        }
    }

    /// Takes a peer out, as [`LoadIndex::place`] put it in.
    fn unplace(&mut self, s: &PeerState, slots: u32) {
        self.changes += 1;
        if s.indexed {
            self.all.remove(s);
            if s.serving < slots {
                self.open.remove(s);
            }
        }
    }
}

impl FileState {
    /// What `peer` holds.
    fn held_by(&self, numbers: &Numbers, peer: &PeerId) -> Option<&Blocks> {
        numbers.of.get(peer).and_then(|n| self.held.get(*n))
    }

    /// The holders and what they hold.
    fn holders<'a>(
        &'a self,
        numbers: &'a Numbers,
    ) -> impl Iterator<Item = (&'a PeerId, &'a Blocks)> {
        self.held
            .iter()
            .filter_map(|(n, h)| Some((numbers.peer.get(n as usize)?, h)))
    }

    /// Peer number `n` now holds block `b`.
    fn added_holder(&mut self, b: u32, n: u32) {
        let i = b as usize;
        self.holder_count[i] += 1;
        if let Some(list) = self.rare_holders[i].as_mut() {
            if list.len() >= RARE_HOLDERS {
                // Drop entries of peers that no longer hold it before giving up on the list.
                compact(list, b, &self.held);
            }
            if list.len() < RARE_HOLDERS {
                list.push(n);
            } else {
                self.rare_holders[i] = None;
            }
        }
    }
}

/// Keeps the entries of `list` whose peers hold `b` (by `held`, per peer number), once each.
fn compact(list: &mut Vec<u32>, b: u32, held: &Held) {
    list.sort_unstable();
    list.dedup();
    list.retain(|n| held.holds(*n, b));
}

/// What the peers of a walk in the requester's region that found nothing hold, for one
/// 64-block word of the file: a later walk there, for a block of the same word none of them
/// holds, would find nothing too, and is skipped while the load index is as it was. Within a
/// Locate a walk that found nothing is mostly followed by more, for the next blocks, over the
/// same peers (in a busy crowd most of a region's open peers lack most blocks, and these walks
/// were over half of a 10,000-node simulation's time).
#[derive(Debug, Default)]
struct Unheld {
    /// The index's [`LoadIndex::changes`] at that walk (`None`: none yet).
    built: Option<u64>,
    word: usize,
    /// The union of those peers' bits in `word`.
    union: u64,
}

/// Block `b`'s bit in its 64-block word.
fn bit(b: u32) -> u64 {
    1 << (b % 64)
}

/// Whether a holder may be chosen (by the peer table and its id).
type Eligible<'a> = dyn Fn(&PeerId, &PeerState) -> bool + 'a;

/// Which holders a [`nearest_least_loaded`] walk looks at.
#[derive(Debug, Clone, Copy)]
struct Walk {
    /// Only those with a free serving slot.
    open: bool,
    /// Where, relative to the requester's region (when it has one).
    scope: Scope,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Only in the requester's region.
    Region,
    /// Anywhere, its region first.
    Anywhere,
    /// Anywhere, its region's load index left out (a walk just found none usable there).
    Beyond,
}

impl Walk {
    fn open(scope: Scope) -> Self {
        Walk { open: true, scope }
    }

    fn all(scope: Scope) -> Self {
        Walk { open: false, scope }
    }
}

/// Where a requester's walk over the blocks it needs begins: a block fixed by its id, so
/// that a crowd's requesters start all over the file and soon hold different blocks to trade
/// (walked from block 0, every node's first blocks were the same ones, and a node had little
/// its neighbours lacked: BitTorrent's reason for random and rarest first).
fn start_block(requester: &PeerId, blocks: u32) -> u32 {
    (id_tail(requester) % u64::from(blocks.max(1))) as u32
}

/// The last 8 bytes of a peer id's digest, little-endian (zero-padded when shorter): as random
/// as the whole id (see [`PeerIdHash`]), read without encoding the id.
fn id_tail(peer: &PeerId) -> u64 {
    let digest = AsRef::<libp2p::multihash::Multihash<64>>::as_ref(peer).digest();
    let tail = &digest[digest.len().saturating_sub(8)..];
    let mut v = [0u8; 8];
    v[..tail.len()].copy_from_slice(tail);
    u64::from_le_bytes(v)
}

/// Reorders `need` (sorted, disjoint) in place to be walked from block `start` on, then from
/// its beginning.
fn rotate(need: &mut Vec<BlockRange>, start: u32) {
    let i = need.partition_point(|r| r.end <= start);
    let Some(&r) = need.get(i) else {
        return;
    };
    if r.start < start {
        need[i] = BlockRange::new(start, r.end);
        need.rotate_left(i);
        need.push(BlockRange::new(r.start, start));
    } else {
        need.rotate_left(i);
    }
}

/// The usable holder of block `b` that the rule prefers: the nearest to the requester
/// ([`crate::location::Nearness`]: same region label, same prefix, estimated RTT), then least
/// load, then [`PeerState::tie`]. A rarely held block is
/// looked up in its holder list. A widely held one by walking the load index from the least loaded peer up: in the requester's region,
/// then on its prefix, the first usable holder is the answer; beyond them, the nearest by
/// estimated RTT of the first [`CROSS_REGION_CANDIDATES`] usable holders (an approximation
/// that keeps the walk bounded).
#[allow(clippy::too_many_arguments)]
fn nearest_least_loaded(
    f: &mut FileState,
    peers: &HashMap<PeerId, PeerState>,
    index: &LoadIndex,
    numbers: &Numbers,
    b: u32,
    vantage: &Vantage<'_>,
    walk: Walk,
    usable: impl Fn(&PeerId, &PeerState) -> bool,
    cache: Option<&mut Unheld>,
) -> Option<PeerId> {
    let numbered = &numbers.peer[..];
    let my_region = vantage.region();
    let i = b as usize;
    let count = f.holder_count[i] as usize;
    if count == 0 {
        return None;
    }
    if count <= RARE_HOLDERS {
        if f.rare_holders[i].is_none() {
            // Few hold it again: list them (once, until many hold it again).
            let list: Vec<u32> = (0..f.held.numbers())
                .filter(|n| f.held.holds(*n, b))
                .collect();
            f.rare_holders[i] = Some(list);
        }
        if let Some(list) = f.rare_holders[i].as_mut() {
            if list.len() > 2 * count + 8 {
                compact(list, b, &f.held);
            }
        }
    }
    // Holder number `n` of block `b`, with its state, if it may be chosen (one lookup).
    let eligible = |n: u32| {
        if !f.held.holds(n, b) {
            return None;
        }
        let p = numbered.get(n as usize)?;
        let s = peers.get(p)?;
        usable(p, s).then_some((p, s))
    };
    let key =
        |(p, s): (&PeerId, &PeerState)| (vantage.nearness(p, &s.region, s.prefix), s.load, s.tie);
    if count <= RARE_HOLDERS {
        return f.rare_holders[i]
            .as_ref()?
            .iter()
            .filter_map(|n| eligible(*n))
            .filter(|(_, s)| {
                walk.scope != Scope::Region || my_region.is_empty() || s.region == my_region
            })
            .min_by_key(|c| key(*c))
            .map(|(p, _)| *p);
    }
    // A walk for a holder with a free slot need not step over the full ones.
    let sets = if walk.open { &index.open } else { &index.all };
    let first = |set: &BTreeSet<(u32, u64)>| {
        set.iter()
            .take(MAX_WALK)
            .find_map(|&(_, tie)| eligible(tie as u32))
            .map(|(p, _)| *p)
    };
    if !my_region.is_empty() && walk.scope != Scope::Beyond {
        let here = sets.by_region.get(my_region);
        let found = match (cache, here) {
            (_, None) => None,
            (None, Some(set)) => first(set),
            (Some(c), Some(set)) => {
                let word = (b / 64) as usize;
                if c.built == Some(index.changes) && c.word == word && c.union & bit(b) == 0 {
                    // None of the peers this walk would step over holds it.
                    None
                } else {
                    let mut union = 0;
                    let found = set.iter().take(MAX_WALK).find_map(|&(_, tie)| {
                        union |= f.held.word(tie as u32, word);
                        eligible(tie as u32)
                    });
                    if found.is_none() {
                        *c = Unheld {
                            built: Some(index.changes),
                            word,
                            union,
                        };
                    }
                    found.map(|(p, _)| *p)
                }
            }
        };
        if found.is_some() {
            return found;
        }
        if walk.scope == Scope::Region {
            return None;
        }
    }
    // Then the requester's prefix (its own region's holders there were not usable).
    if let Some(p) = vantage
        .prefix()
        .and_then(|x| sets.by_prefix.get(&x))
        .and_then(first)
    {
        return Some(p);
    }
    // Every other region, merged in (load, tie) order: the nearest of the least loaded.
    let mut walks: Vec<_> = sets
        .by_region
        .iter()
        .filter(|(r, _)| my_region.is_empty() || r.as_str() != my_region)
        .map(|(_, set)| set.iter().peekable())
        .collect();
    let mut found: Vec<(&PeerId, &PeerState)> = Vec::new();
    let mut steps = 0;
    while found.len() < CROSS_REGION_CANDIDATES && steps < MAX_WALK {
        steps += 1;
        let mut best: Option<(usize, &(u32, u64))> = None;
        for (w, it) in walks.iter_mut().enumerate() {
            if let Some(&e) = it.peek() {
                if best.is_none_or(|(_, b)| e < b) {
                    best = Some((w, e));
                }
            }
        }
        let Some((w, _)) = best else { break };
        let Some(&(_, tie)) = walks[w].next() else {
            break;
        };
        found.extend(eligible(tie as u32));
    }
    found.into_iter().min_by_key(|c| key(*c)).map(|(p, _)| *p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::identity::Keypair;

    fn peer() -> PeerId {
        Keypair::generate_ed25519().public().to_peer_id()
    }

    fn addr() -> Multiaddr {
        "/ip4/127.0.0.1/tcp/4002".parse().unwrap()
    }

    fn file() -> FileId {
        FileId([1; 32])
    }

    /// The default policy with every requester's walk starting at block 0, for tests whose
    /// subject is not the start.
    pub(super) fn sequential() -> PolicyConfig {
        PolicyConfig {
            spread_start: false,
            ..PolicyConfig::default()
        }
    }

    fn setup(blocks: u32) -> Policy {
        let mut p = Policy::new(PolicyConfig {
            max_master_piece: 4,
            lone_master_piece: 4,
            min_master_piece: 1,
            max_master_pieces: 1,
            master_load_half: 1000,
            max_peer_piece: 8,
            max_blocks_per_answer: 16,
            ..sequential()
        });
        p.add_file(
            file(),
            "f".into(),
            u64::from(blocks) * 1024,
            Blocks::full(blocks),
        );
        p
    }

    fn all(blocks: u32) -> Vec<BlockRange> {
        vec![BlockRange::new(0, blocks)]
    }

    #[test]
    fn an_answer_has_at_most_max_runs_per_answer_runs() {
        let mut p = Policy::new(PolicyConfig {
            max_peer_piece: 2,
            max_runs_per_answer: 3,
            ..sequential()
        });
        p.add_file(file(), "f".into(), 64 * 1024, Blocks::full(32));
        let (holder, me) = (peer(), peer());
        p.peer_up(holder, vec![addr()]);
        p.peer_up(me, vec![addr()]);
        p.have(&file(), holder, &all(32));
        let ans = p.locate(Instant::now(), me, &file(), &all(32)).unwrap();
        // Three runs of two blocks; the rest of the file waits for the next answer rather
        // than sitting in the node's queue while holding the holder's slots.
        let ranges: Vec<BlockRange> = ans.assignments.iter().map(|a| a.range).collect();
        assert_eq!(
            ranges,
            vec![
                BlockRange::new(0, 2),
                BlockRange::new(2, 4),
                BlockRange::new(4, 6)
            ]
        );
    }

    #[test]
    fn first_copies_are_shared_out_over_the_crowd_not_taken_by_the_first_to_ask() {
        // 32 blocks, an idle master that would hand 4 pieces of 8 to one requester.
        let mut p = Policy::new(PolicyConfig {
            max_master_piece: 8,
            lone_master_piece: 8,
            min_master_piece: 1,
            max_master_pieces: 4,
            master_load_half: 1_000_000,
            ..sequential()
        });
        p.add_file(file(), "f".into(), 64 * 1024, Blocks::full(32));
        let now = Instant::now();
        let blocks_of = |a: &LocateAnswer| -> u32 {
            a.assignments
                .iter()
                .inspect(|x| assert_eq!(x.source, Source::Master))
                .map(|x| x.range.len())
                .sum()
        };
        // Alone, a node gets the whole answer's worth.
        let lone = peer();
        p.peer_up(lone, vec![addr()]);
        assert_eq!(
            blocks_of(&p.locate(now, lone, &file(), &all(32)).unwrap()),
            32
        );
        p.peer_down(&lone);
        // In a crowd of 16, each gets its share (two blocks), and 16 of them start at once
        // with a distinct first copy each to serve the others.
        let crowd: Vec<PeerId> = (0..16).map(|_| peer()).collect();
        for x in &crowd {
            p.peer_up(*x, vec![addr()]);
        }
        let mut seen = Blocks::new(32);
        for x in &crowd {
            let ans = p.locate(now, *x, &file(), &all(32)).unwrap();
            assert_eq!(blocks_of(&ans), 2, "{ans:?}");
            for a in &ans.assignments {
                assert_eq!(seen.insert_range(a.range), a.range.len(), "sent twice");
            }
        }
        assert!(seen.is_full());
        // A peer that holds everything (a seed) wants no share: 17 live, 16 wanting.
        p.have(&file(), crowd[0], &all(32));
        let late = peer();
        p.peer_up(late, vec![addr()]);
        assert_eq!(p.first_copy_share(&p.files[&file()]), 32u32.div_ceil(16));
    }

    #[test]
    fn each_requester_walks_the_file_from_its_own_block() {
        let r = BlockRange::new;
        let rotated = |mut need: Vec<BlockRange>, start| {
            rotate(&mut need, start);
            need
        };
        assert_eq!(rotated(vec![r(0, 10)], 4), vec![r(4, 10), r(0, 4)]);
        assert_eq!(
            rotated(vec![r(0, 2), r(5, 8)], 6),
            vec![r(6, 8), r(0, 2), r(5, 6)]
        );
        assert_eq!(rotated(vec![r(3, 5)], 0), vec![r(3, 5)]);
        assert_eq!(rotated(vec![r(3, 5)], 9), vec![r(3, 5)]);
        // The default policy: each requester's first copy starts at its own block, so a
        // crowd's first copies are spread over the file (with `sequential`, all at 0).
        let blocks = 1024;
        let mut p = Policy::new(PolicyConfig {
            max_master_piece: 4,
            lone_master_piece: 4,
            min_master_piece: 1,
            max_master_pieces: 1,
            ..PolicyConfig::default()
        });
        p.add_file(
            file(),
            "f".into(),
            u64::from(blocks) * 1024,
            Blocks::full(blocks),
        );
        let now = Instant::now();
        let mut starts = std::collections::BTreeSet::new();
        for _ in 0..8 {
            let a = peer();
            p.peer_up(a, vec![]);
            let ans = p.locate(now, a, &file(), &all(blocks)).unwrap();
            let first = ans.assignments.first().expect("a first copy").range;
            let want = start_block(&a, blocks);
            // At its block, or just past the first copies handed to the others already.
            let past = (first.start + blocks - want) % blocks;
            assert!(past < 4 * 8, "{a} starts at {first:?}, not near {want}");
            starts.insert(first.start);
        }
        assert!(starts.len() > 1, "every requester started at {starts:?}");
    }

    #[test]
    fn first_request_is_served_by_the_master() {
        let mut p = setup(16);
        let a = peer();
        p.peer_up(a, vec![]);
        let ans = p.locate(Instant::now(), a, &file(), &all(16)).unwrap();
        assert_eq!(
            ans.assignments,
            vec![Assignment {
                range: BlockRange::new(0, 4),
                source: Source::Master
            }]
        );
    }

    #[test]
    fn first_copies_are_handed_out_once() {
        let mut p = setup(16);
        let (a, b) = (peer(), peer());
        p.peer_up(a, vec![]);
        p.peer_up(b, vec![]);
        let now = Instant::now();
        p.locate(now, a, &file(), &all(16)).unwrap();
        let ans = p.locate(now, b, &file(), &all(16)).unwrap();
        // b gets the next master piece, not a's blocks again.
        assert_eq!(ans.assignments[0].range, BlockRange::new(4, 8));
        assert_eq!(ans.assignments[0].source, Source::Master);
    }

    #[test]
    fn a_full_holder_is_waited_for_not_refused_nor_replaced_by_the_master() {
        let mut p = Policy::new(PolicyConfig {
            peer_slots: 2,
            max_blocks_per_answer: 4,
            ..sequential()
        });
        p.add_file(file(), "f".into(), 4 * 1024, Blocks::full(4));
        let now = Instant::now();
        let holder = peer();
        p.peer_up(holder, vec![addr()]);
        p.have(&file(), holder, &all(4));
        let on = |ans: &LocateAnswer| -> Vec<Source> {
            ans.assignments.iter().map(|a| a.source.clone()).collect()
        };
        let sent_to_holder = Source::Peer {
            peer: holder,
            addrs: vec![addr()],
        };
        let (a, b, c) = (peer(), peer(), peer());
        for x in [a, b, c] {
            p.peer_up(x, vec![addr()]);
        }
        assert_eq!(
            on(&p.locate(now, a, &file(), &all(4)).unwrap()),
            vec![sent_to_holder.clone()]
        );
        assert_eq!(
            on(&p.locate(now, b, &file(), &all(4)).unwrap()),
            vec![sent_to_holder.clone()]
        );
        // Two requesters on their way to it fill its two slots: the third waits.
        let wait = p.locate(now, c, &file(), &all(4)).unwrap();
        assert!(wait.assignments.is_empty(), "{wait:?}");
        assert!(wait.retry_after > Duration::ZERO);
        // Once one of them has its blocks, the slot is free again.
        p.have(&file(), a, &all(4));
        let ans = p.locate(now, c, &file(), &all(4)).unwrap();
        assert!(!ans.assignments.is_empty());
        assert!(
            ans.assignments.iter().all(|x| x.source != Source::Master),
            "{ans:?}"
        );
    }

    /// 800 idle holders of `file()` in region "r", and a requester there (returned). In the
    /// load index's order (the tie's high bits, from the id) the first 600 hold `held(true)`,
    /// the last 200 `held(false)`.
    fn split_crowd(p: &mut Policy, held: impl Fn(bool) -> Vec<BlockRange>) -> PeerId {
        let high = |x: &PeerId| {
            let id = x.to_bytes();
            u32::from_le_bytes(id[id.len() - 4..].try_into().unwrap())
        };
        let mut holders: Vec<PeerId> = (0..800).map(|_| peer()).collect();
        holders.sort_by_key(high);
        for (i, h) in holders.iter().enumerate() {
            p.peer_up(*h, vec![addr()]);
            p.set_region(*h, "r".into());
            p.have(&file(), *h, &held(i < 600));
        }
        let r = peer();
        p.peer_up(r, vec![addr()]);
        p.set_region(r, "r".into());
        r
    }

    #[test]
    fn a_widely_held_block_past_the_walk_is_waited_for_not_sent_by_the_master_again() {
        let mut p = Policy::new(PolicyConfig {
            max_blocks_per_answer: 1,
            ..sequential()
        });
        p.add_file(file(), "f".into(), 2 * 1024, Blocks::full(2));
        // The first 600 in the walk's order hold only block 1, the last 200 only block 0.
        let r = split_crowd(&mut p, |first| {
            let b = if first { 1 } else { 0 };
            vec![BlockRange::new(b, b + 1)]
        });
        // A walk stops after MAX_WALK peers and meets no holder of block 0; 200 hold it, so
        // the master does not send it again.
        let ans = p
            .locate(Instant::now(), r, &file(), &[BlockRange::new(0, 1)])
            .unwrap();
        assert!(
            ans.assignments.iter().all(|a| a.source != Source::Master),
            "{ans:?}"
        );
        // Block 1's holders come first in the walk: it is redirected.
        let ans = p
            .locate(Instant::now(), r, &file(), &[BlockRange::new(1, 2)])
            .unwrap();
        assert!(
            matches!(
                ans.assignments[..],
                [Assignment {
                    source: Source::Peer { .. },
                    ..
                }]
            ),
            "{ans:?}"
        );
    }

    #[test]
    fn after_a_walk_in_vain_a_later_block_its_peers_hold_is_still_redirected() {
        let mut p = Policy::new(PolicyConfig {
            max_blocks_per_answer: 4,
            ..sequential()
        });
        p.add_file(file(), "f".into(), 4 * 1024, Blocks::full(4));
        // The first 600 in the walk's order hold blocks 1 and 3, the last 200 (past the walk)
        // blocks 0 and 2.
        let r = split_crowd(&mut p, |first| {
            let b = if first { 1 } else { 0 };
            vec![BlockRange::new(b, b + 1), BlockRange::new(b + 2, b + 3)]
        });
        // One Locate: block 0's walk finds nothing (and block 2's need not walk again), but
        // blocks 1 and 3, held by the peers it stepped over, are redirected.
        let ans = p
            .locate(Instant::now(), r, &file(), &[BlockRange::new(0, 4)])
            .unwrap();
        let mut got: Vec<u32> = Vec::new();
        for a in &ans.assignments {
            assert!(matches!(a.source, Source::Peer { .. }), "{ans:?}");
            got.extend(a.range.iter());
        }
        got.sort_unstable();
        assert_eq!(got, vec![1, 3], "{ans:?}");
    }

    #[test]
    fn a_node_reachable_only_through_the_relay_is_hinted_there_first() {
        let mut p = setup(4);
        let now = Instant::now();
        let holder = peer();
        // It declared no address anyone could dial (or only private ones it listens on).
        p.peer_up(holder, Vec::new());
        p.have(&file(), holder, &all(4));
        let requester = peer();
        p.peer_up(requester, vec![addr()]);
        let sources = |p: &mut Policy| -> Vec<Source> {
            p.locate(now, requester, &file(), &all(4))
                .unwrap()
                .assignments
                .into_iter()
                .map(|a| a.source)
                .collect()
        };
        // No address: not a source.
        assert!(sources(&mut p).iter().all(|s| *s == Source::Master));
        let relay: Multiaddr = format!("/ip4/10.0.0.1/tcp/4001/p2p/{}", peer())
            .parse()
            .unwrap();
        let circuit = shoal_protocol::relay::circuit_addr(&relay, holder).unwrap();
        let own: Multiaddr = "/ip4/192.168.1.2/tcp/7".parse().unwrap();
        p.peer_up(holder, vec![own.clone()]);
        p.observe_addr(holder, &"/ip4/203.0.113.7/tcp/1".parse().unwrap());
        // More than MAX_RELAYED_HINTS are cut.
        p.set_relayed(holder, vec![circuit.clone(); MAX_RELAYED_HINTS + 3]);
        assert!(p.is_relayed(&holder));
        let relayed_only = vec![circuit.clone(); MAX_RELAYED_HINTS];
        let mut both = relayed_only.clone();
        both.push(own.clone());
        assert_eq!(p.addrs(&holder), both);
        // A requester elsewhere is given the relayed addresses only; one behind the same
        // NAT (same observed prefix) its own addresses too.
        for (observed, want) in [
            ("/ip4/198.51.100.1/tcp/2", relayed_only.clone()),
            ("/ip4/203.0.113.9/tcp/2", both.clone()),
        ] {
            let r = peer();
            p.peer_up(r, vec![addr()]);
            p.observe_addr(r, &observed.parse().unwrap());
            let got = p.locate(now, r, &file(), &all(4)).unwrap();
            assert!(
                got.assignments.iter().any(|a| a.source
                    == Source::Peer {
                        peer: holder,
                        addrs: want.clone()
                    }),
                "{observed}: {got:?}"
            );
        }
        // The reservation ends: its own address only.
        p.set_relayed(holder, Vec::new());
        assert_eq!(p.addrs(&holder), vec![own]);
        // A peer the master does not know cannot be made relayed.
        let stranger = peer();
        p.set_relayed(stranger, vec![circuit]);
        assert!(p.addrs(&stranger).is_empty() && !p.is_live(&stranger));
    }

    #[test]
    fn a_waiting_crowd_is_paced_to_a_fixed_rate_of_empty_answers() {
        let mut p = Policy::new(PolicyConfig {
            retry_after: Duration::from_millis(100),
            waiting_polls_per_s: 10,
            ..sequential()
        });
        // The master holds nothing yet (a pull under way): nobody can be given anything.
        p.add_file(file(), "f".into(), 4 * 1024, Blocks::new(4));
        let now = Instant::now();
        let peers: Vec<PeerId> = (0..5).map(|_| peer()).collect();
        let mut waits = Vec::new();
        for x in &peers {
            p.peer_up(*x, vec![addr()]);
            let ans = p.locate(now, *x, &file(), &all(4)).unwrap();
            assert!(ans.assignments.is_empty());
            waits.push(ans.retry_after.as_millis());
        }
        // One waiter: 100 ms (the floor); five: 5 / 10 per second.
        assert_eq!(waits, vec![100, 200, 300, 400, 500]);
        // Asking again while waiting does not count twice; leaving stops counting.
        assert_eq!(
            p.locate(now, peers[0], &file(), &all(4))
                .unwrap()
                .retry_after,
            Duration::from_millis(500)
        );
        p.peer_down(&peers[0]);
        p.peer_down(&peers[1]);
        assert_eq!(
            p.locate(now, peers[2], &file(), &all(4))
                .unwrap()
                .retry_after,
            Duration::from_millis(300)
        );
        // A waiter that is given something is no longer waiting.
        p.master_stored(&file(), 0);
        let ans = p.locate(now, peers[3], &file(), &all(4)).unwrap();
        assert!(!ans.assignments.is_empty());
        assert_eq!(
            p.locate(now, peers[4], &file(), &all(4))
                .unwrap()
                .retry_after,
            Duration::from_millis(200)
        );
    }

    #[test]
    fn master_pieces_go_to_as_many_requesters_as_its_slots_take() {
        let mut p = Policy::new(PolicyConfig {
            master_slots: 8,
            max_master_piece: 2,
            lone_master_piece: 2,
            min_master_piece: 2,
            max_master_pieces: 2,
            master_load_half: 1_000_000,
            ..sequential()
        });
        p.add_file(file(), "f".into(), 64 * 1024, Blocks::full(64));
        let now = Instant::now();
        let peers: Vec<PeerId> = (0..4).map(|_| peer()).collect();
        for x in &peers {
            p.peer_up(*x, vec![addr()]);
        }
        // 8 slots, 2 pieces an answer, two answers each: 2 requesters at a time.
        let got: Vec<usize> = peers
            .iter()
            .map(|x| {
                p.locate(now, *x, &file(), &all(64))
                    .unwrap()
                    .assignments
                    .len()
            })
            .collect();
        assert_eq!(got, vec![2, 2, 0, 0]);
        // A requester may have two answers' worth on its way (it asks for the next before the
        // last arrive), no more until some arrive.
        let rest = |from: u32| -> Vec<BlockRange> {
            (from..64).map(|b| BlockRange::new(b, b + 1)).collect()
        };
        assert_eq!(
            p.locate(now, peers[0], &file(), &rest(8))
                .unwrap()
                .assignments
                .len(),
            2
        );
        assert!(p
            .locate(now, peers[0], &file(), &rest(16))
            .unwrap()
            .assignments
            .is_empty());
        // When the first one's blocks arrive, the next requester is served.
        p.have(
            &file(),
            peers[0],
            &[BlockRange::new(0, 4), BlockRange::new(8, 12)],
        );
        let ans = p
            .locate(now, peers[2], &file(), &[BlockRange::new(16, 64)])
            .unwrap();
        assert!(
            ans.assignments.iter().any(|a| a.source == Source::Master),
            "{ans:?}"
        );
    }

    #[test]
    fn later_requests_are_redirected_to_the_holder_with_its_addresses() {
        let mut p = setup(16);
        let (a, b) = (peer(), peer());
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/4002".parse().unwrap();
        p.peer_up(a, vec![addr.clone()]);
        p.peer_up(b, vec![]);
        let now = Instant::now();
        p.locate(now, a, &file(), &all(16)).unwrap();
        p.have(&file(), a, &[BlockRange::new(0, 4)]);
        let ans = p.locate(now, b, &file(), &[BlockRange::new(0, 4)]).unwrap();
        assert_eq!(
            ans.assignments,
            vec![Assignment {
                range: BlockRange::new(0, 4),
                source: Source::Peer {
                    peer: a,
                    addrs: vec![addr]
                }
            }]
        );
    }

    #[test]
    fn the_least_loaded_holder_is_chosen() {
        let mut p = setup(16);
        let (a, b, c, d) = (peer(), peer(), peer(), peer());
        for x in [a, b, c, d] {
            p.peer_up(x, vec![addr()]);
        }
        p.have(&file(), a, &all(16));
        p.have(&file(), b, &all(16));
        let now = Instant::now();
        let first = p.locate(now, c, &file(), &[BlockRange::new(0, 8)]).unwrap();
        let Source::Peer {
            peer: first_holder, ..
        } = first.assignments[0].source.clone()
        else {
            panic!("expected a redirect")
        };
        assert_eq!(p.load(&first_holder), 8);
        // d is sent to the other holder, which carries no load.
        let second = p.locate(now, d, &file(), &[BlockRange::new(0, 8)]).unwrap();
        let Source::Peer {
            peer: second_holder,
            ..
        } = second.assignments[0].source.clone()
        else {
            panic!("expected a redirect")
        };
        assert_ne!(first_holder, second_holder);
        // Once c confirms, the first holder's load is released.
        p.have(&file(), c, &[BlockRange::new(0, 8)]);
        assert_eq!(p.load(&first_holder), 0);
    }

    #[test]
    fn a_pending_first_copy_makes_others_wait_then_redirects() {
        let mut p = setup(4);
        let (a, b) = (peer(), peer());
        p.peer_up(a, vec![]);
        p.peer_up(b, vec![]);
        let now = Instant::now();
        // Two peers want the file: each may have half of the first copies.
        let first = p.locate(now, a, &file(), &all(4)).unwrap().assignments;
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].range, BlockRange::new(0, 2));
        let wait = p.locate(now, b, &file(), &[BlockRange::new(0, 2)]).unwrap();
        assert!(wait.assignments.is_empty());
        assert!(wait.retry_after > Duration::ZERO);
        // The handout expires in virtual time: the master serves b itself.
        let later = now + PolicyConfig::default().assignment_timeout + Duration::from_millis(1);
        let ans = p.locate(later, b, &file(), &all(4)).unwrap();
        assert_eq!(ans.assignments[0].source, Source::Master);
    }

    #[test]
    fn dead_peers_leave_the_mirror_list_and_are_not_assigned() {
        let mut p = setup(8);
        let (a, b) = (peer(), peer());
        p.peer_up(a, vec![addr()]);
        p.peer_up(b, vec![]);
        p.have(&file(), a, &all(8));
        assert!(p.peer_down(&a));
        assert!(p.mirrors(&file()).is_empty());
        let ans = p.locate(Instant::now(), b, &file(), &all(8)).unwrap();
        assert!(ans.assignments.iter().all(|x| x.source == Source::Master));
    }

    #[test]
    fn avoided_and_banned_peers_are_skipped() {
        let mut p = setup(8);
        let (a, b, c) = (peer(), peer(), peer());
        for x in [a, b, c] {
            p.peer_up(x, vec![addr()]);
        }
        p.have(&file(), a, &all(8));
        p.avoid(b, a, None);
        let ans = p.locate(Instant::now(), b, &file(), &all(8)).unwrap();
        assert!(ans.assignments.iter().all(|x| x.source == Source::Master));
        // c still goes to a.
        let ans = p.locate(Instant::now(), c, &file(), &all(8)).unwrap();
        assert!(matches!(ans.assignments[0].source, Source::Peer { peer, .. } if peer == a));
        p.ban(a);
        p.peer_up(a, vec![]);
        assert!(!p.is_live(&a));
    }

    #[test]
    fn holders_without_known_addresses_are_not_redirect_targets() {
        let mut p = setup(8);
        let (a, b) = (peer(), peer());
        p.peer_up(a, vec![]);
        p.peer_up(b, vec![addr()]);
        p.have(&file(), a, &all(8));
        let ans = p.locate(Instant::now(), b, &file(), &all(8)).unwrap();
        assert!(ans.assignments.iter().all(|x| x.source == Source::Master));
    }

    #[test]
    fn a_timed_avoidance_ends_in_virtual_time() {
        let mut p = setup(8);
        let (a, b) = (peer(), peer());
        p.peer_up(a, vec![addr()]);
        p.peer_up(b, vec![addr()]);
        p.have(&file(), a, &all(8));
        let now = Instant::now();
        p.avoid(b, a, Some(now + Duration::from_secs(30)));
        let ans = p.locate(now, b, &file(), &all(1)).unwrap();
        assert_eq!(ans.assignments[0].source, Source::Master);
        let later = now + Duration::from_secs(30);
        let ans = p.locate(later, b, &file(), &all(1)).unwrap();
        assert!(matches!(ans.assignments[0].source, Source::Peer { peer, .. } if peer == a));
        // A permanent avoidance is not shortened by a later timed one.
        p.avoid(b, a, None);
        p.avoid(b, a, Some(later));
        let ans = p
            .locate(later + Duration::from_secs(60), b, &file(), &all(1))
            .unwrap();
        assert_eq!(ans.assignments[0].source, Source::Master);
    }

    #[test]
    fn a_busy_holder_is_waited_for_not_replaced_by_the_master() {
        let mut p = setup(8);
        let (a, b) = (peer(), peer());
        p.peer_up(a, vec![addr()]);
        p.peer_up(b, vec![addr()]);
        p.have(&file(), a, &all(8));
        let now = Instant::now();
        // `a` was busy: b avoids it for 2 s. The master does not send its copy again.
        p.avoid(b, a, Some(now + Duration::from_secs(2)));
        let ans = p.locate(now, b, &file(), &all(8)).unwrap();
        assert!(ans.assignments.is_empty(), "{:?}", ans.assignments);
        assert!(ans.retry_after > Duration::ZERO);
        // Once the moment has passed, b is sent to a.
        let ans = p
            .locate(now + Duration::from_secs(2), b, &file(), &all(8))
            .unwrap();
        assert!(matches!(ans.assignments[0].source, Source::Peer { peer, .. } if peer == a));
        // A holder that left is no reason to wait: the master serves.
        let c = peer();
        p.peer_up(c, vec![addr()]);
        p.avoid(c, a, Some(now + Duration::from_secs(2)));
        p.peer_down(&a);
        let ans = p.locate(now, c, &file(), &all(8)).unwrap();
        assert!(ans.assignments.iter().all(|x| x.source == Source::Master));
    }

    #[test]
    fn nearby_holders_are_preferred() {
        let mut p = setup(8);
        let (far, near, me) = (peer(), peer(), peer());
        for x in [far, near, me] {
            p.peer_up(x, vec![addr()]);
        }
        p.set_region(near, "eu".into());
        p.set_region(me, "eu".into());
        p.set_region(far, "us".into());
        p.have(&file(), far, &all(8));
        p.have(&file(), near, &all(8));
        // Load the near one a little; it is still preferred.
        let ans = p.locate(Instant::now(), me, &file(), &all(8)).unwrap();
        assert!(matches!(ans.assignments[0].source, Source::Peer { peer, .. } if peer == near));
    }

    #[test]
    fn an_idle_master_hands_out_several_pieces_at_once() {
        let mut p = Policy::new(PolicyConfig {
            max_master_piece: 4,
            lone_master_piece: 4,
            max_master_pieces: 3,
            master_load_half: 1000,
            ..sequential()
        });
        p.add_file(file(), "f".into(), 64 * 1024, Blocks::full(64));
        let a = peer();
        p.peer_up(a, vec![addr()]);
        let ans = p.locate(Instant::now(), a, &file(), &all(64)).unwrap();
        let ranges: Vec<BlockRange> = ans.assignments.iter().map(|x| x.range).collect();
        assert_eq!(
            ranges,
            vec![
                BlockRange::new(0, 4),
                BlockRange::new(4, 8),
                BlockRange::new(8, 12)
            ]
        );
    }

    #[test]
    fn a_locate_for_an_unknown_file_is_refused_not_a_panic() {
        // Any peer may name any file id; the master must answer, not fall over.
        for rate in [None, Some(8 << 20)] {
            let mut p = Policy::new(PolicyConfig {
                master_upload_rate: rate,
                ..PolicyConfig::default()
            });
            let a = peer();
            p.peer_up(a, vec![addr()]);
            let other = FileId([7; 32]);
            assert_eq!(
                p.locate(Instant::now(), a, &other, &all(8)),
                Err(PolicyError::UnknownFile(other))
            );
        }
    }

    /// The lengths of the master pieces `x` is given when it asks for all `blocks`; every
    /// assignment must be the master's.
    fn master_piece_lens(p: &mut Policy, now: Instant, x: PeerId, blocks: u32) -> Vec<u32> {
        let ans = p.locate(now, x, &file(), &all(blocks)).unwrap();
        ans.assignments
            .iter()
            .inspect(|a| assert_eq!(a.source, Source::Master))
            .map(|a| a.range.len())
            .collect()
    }

    #[test]
    fn a_lone_requester_gets_longer_master_pieces_than_one_of_a_crowd() {
        // A master whose upload is known to be fast (without a cap, it sizes lone pieces by
        // what it sent lately: see the next tests).
        let cfg = PolicyConfig {
            master_upload_rate: Some(1 << 40),
            ..sequential()
        };
        let blocks = 16 * cfg.lone_master_piece;
        let now = Instant::now();

        let sizes = lone_answer(&cfg, blocks, &[], now);
        assert!(cfg.lone_master_piece > cfg.max_master_piece);
        assert_eq!(sizes[0], cfg.lone_master_piece, "{sizes:?}");

        // The same file wanted by a crowd: each share is 1/16 as large, and so are the
        // pieces it may come in; they stay at `max_master_piece`.
        let mut crowd = with_file(&cfg, blocks);
        let peers: Vec<PeerId> = (0..16).map(|_| peer()).collect();
        for x in &peers {
            crowd.peer_up(*x, vec![addr()]);
        }
        let sizes = master_piece_lens(&mut crowd, now, peers[0], blocks);
        assert!(!sizes.is_empty());
        assert!(
            sizes.iter().all(|&n| n <= cfg.max_master_piece),
            "{sizes:?}"
        );
    }

    /// A policy under `cfg` holding one file of `blocks` 64 KiB blocks.
    fn with_file(cfg: &PolicyConfig, blocks: u32) -> Policy {
        let mut p = Policy::new(cfg.clone());
        p.add_file(
            file(),
            "f".into(),
            u64::from(blocks) << 16,
            Blocks::full(blocks),
        );
        p
    }

    /// The master pieces a lone requester of a file of `blocks` 64 KiB blocks gets when it
    /// asks at `at`, the master having reported `sent` (when, total bytes) before that.
    fn lone_answer(
        cfg: &PolicyConfig,
        blocks: u32,
        sent: &[(Instant, u64)],
        at: Instant,
    ) -> Vec<u32> {
        let mut p = with_file(cfg, blocks);
        let a = peer();
        p.peer_up(a, vec![addr()]);
        for &(t, total) in sent {
            p.master_sent(t, total);
        }
        master_piece_lens(&mut p, at, a, blocks)
    }

    #[test]
    fn under_a_capped_master_upload_a_lone_answer_is_what_it_sends_in_the_horizon() {
        let cfg = sequential();
        let blocks = 16 * cfg.lone_master_piece;
        let block = 64 * 1024u64;
        let now = Instant::now();
        // The master pieces a lone requester gets in its first answer, under `rate`.
        let first_answer = |rate: Option<u64>| -> Vec<u32> {
            let cfg = PolicyConfig {
                master_upload_rate: rate,
                ..cfg.clone()
            };
            lone_answer(&cfg, blocks, &[], now)
        };
        let horizon_s = LONE_HORIZON.as_secs_f64();
        // Uncapped and idle (nothing sent yet): a crowd's pieces; see the next test.
        assert_eq!(first_answer(None)[0], cfg.max_master_piece);
        // A fast cap: as uncapped (the horizon holds more than the longest pieces).
        let fast = (f64::from(cfg.lone_master_piece * cfg.max_master_pieces) * block as f64
            / horizon_s) as u64;
        assert_eq!(first_answer(Some(fast))[0], cfg.lone_master_piece);
        // Half that: pieces half as long, so the answer still fits the horizon.
        let half = first_answer(Some(fast / 2));
        assert_eq!(half[0], cfg.lone_master_piece / 2, "{half:?}");
        // 8 MiB/s (the flash crowd's master): 2 MiB in the horizon, so no longer than a
        // crowd's pieces, and no more blocks in the answer than that.
        let slow = first_answer(Some(8 << 20));
        assert!(slow.iter().all(|&n| n == cfg.max_master_piece), "{slow:?}");
        assert!(
            u64::from(slow.iter().sum::<u32>()) * block <= ((8u64 << 20) as f64 * horizon_s) as u64,
            "{slow:?}"
        );
    }

    #[test]
    fn without_a_cap_a_lone_answer_is_what_the_master_sent_in_the_horizon() {
        let cfg = sequential();
        let blocks = 16 * cfg.lone_master_piece;
        let block = 64 * 1024u64;
        let t0 = Instant::now();
        // As `lone_answer`, with times counted from t0.
        let answer = |sent: &[(Duration, u64)], at: Duration| -> Vec<u32> {
            let sent: Vec<(Instant, u64)> = sent.iter().map(|&(t, n)| (t0 + t, n)).collect();
            lone_answer(&cfg, blocks, &sent, t0 + at)
        };
        let h = LONE_HORIZON;
        let ms = Duration::from_millis;
        // Bytes for one answer of the longest pieces.
        let fast = u64::from(cfg.lone_master_piece * cfg.max_master_pieces) * block;
        // Idle: nothing sent, so a crowd's pieces, as under a slow cap.
        let idle = answer(&[(ms(0), 0)], h);
        assert!(idle.iter().all(|&n| n == cfg.max_master_piece), "{idle:?}");
        // A fast answer's worth sent in the horizon: the long pieces of a lone fetch.
        assert_eq!(
            answer(&[(ms(0), 0), (h, fast)], h)[0],
            cfg.lone_master_piece
        );
        // Half that: pieces half as long.
        let half = answer(&[(ms(0), 0), (h, fast / 2)], h);
        assert_eq!(half[0], cfg.lone_master_piece / 2, "{half:?}");
        // Sent before the horizon: no longer counted.
        let old = answer(
            &[(ms(0), 0), (ms(10), fast), (ms(20) + h, fast)],
            ms(20) + h,
        );
        assert!(old.iter().all(|&n| n == cfg.max_master_piece), "{old:?}");
        // Counted at a Locate after a quiet spell: spread over the spell, not all recent
        // (samples come only with Locates; a fetch's last pieces end after its last one).
        let secs = Duration::from_secs;
        let quiet = answer(&[(ms(0), 0), (secs(10), fast)], secs(10));
        assert!(
            quiet.iter().all(|&n| n == cfg.max_master_piece),
            "{quiet:?}"
        );
        // The same bytes within the last quarter of a second: recent.
        let recent = answer(
            &[(ms(0), 0), (secs(10) - ms(200), 0), (secs(10), fast)],
            secs(10),
        );
        assert_eq!(recent[0], cfg.lone_master_piece, "{recent:?}");
        // A counter that went back counts as nothing sent, not as a wrap-around.
        let back = answer(&[(ms(0), fast), (h, 0)], h);
        assert!(back.iter().all(|&n| n == cfg.max_master_piece), "{back:?}");
    }

    #[test]
    fn the_masters_sent_samples_are_bounded() {
        let mut w = SentWindow::default();
        let t0 = Instant::now();
        // One call a millisecond for ten seconds: samples every 10 ms, within the horizon.
        for i in 0..10_000u64 {
            w.note(t0 + Duration::from_millis(i), i * 1000);
            assert!(w.samples.len() <= SENT_SAMPLES_MAX);
        }
        let now = t0 + Duration::from_millis(9_999);
        // About one per `SENT_SAMPLE` within the horizon, and the one before it.
        let per_horizon = (LONE_HORIZON.as_millis() / SENT_SAMPLE.as_millis()) as usize;
        assert!(w.samples.len() <= per_horizon + 4, "{}", w.samples.len());
        // 1000 bytes a millisecond: about the horizon's 250 ms of them.
        let got = w.in_horizon(now);
        assert!((249_000..=251_000).contains(&got), "{got}");
    }

    #[test]
    fn master_pieces_shrink_under_load() {
        let mut p = Policy::new(PolicyConfig {
            max_master_piece: 32,
            lone_master_piece: 32,
            min_master_piece: 2,
            max_master_pieces: 1,
            master_load_half: 32,
            ..sequential()
        });
        p.add_file(file(), "f".into(), 1 << 20, Blocks::full(1024));
        let now = Instant::now();
        let mut sizes = Vec::new();
        for _ in 0..6 {
            let x = peer();
            p.peer_up(x, vec![addr()]);
            let ans = p.locate(now, x, &file(), &all(1024)).unwrap();
            sizes.push(ans.assignments[0].range.len());
        }
        assert_eq!(sizes[0], 32);
        assert!(sizes.windows(2).all(|w| w[1] <= w[0]), "{sizes:?}");
        assert!(*sizes.last().unwrap() < 16, "{sizes:?}");
    }

    #[test]
    fn overlapping_full_ranges_cost_one_pass() {
        let blocks = 1 << 18;
        let mut p = setup(blocks);
        let (a, b) = (peer(), peer());
        p.peer_up(a, vec![addr()]);
        p.peer_up(b, vec![addr()]);
        let flood = vec![BlockRange::new(0, u32::MAX); MAX_RANGES_PER_MESSAGE];
        // Unmerged, each of these walks 4,096 x 2^18 blocks (about 10^9 steps); merged,
        // one pass. The bound is generous: it only tells one from the other.
        let start = std::time::Instant::now();
        p.have(&file(), a, &flood);
        let now = Instant::now();
        let ans = p.locate(now, a, &file(), &flood).unwrap();
        assert!(ans.assignments.is_empty(), "a holds everything");
        let flooded = p.locate(now, b, &file(), &flood).unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        // The same answer as for the one merged range.
        let mut q = setup(blocks);
        q.peer_up(a, vec![addr()]);
        q.peer_up(b, vec![addr()]);
        q.have(&file(), a, &all(blocks));
        let plain = q.locate(now, b, &file(), &all(blocks)).unwrap();
        assert_eq!(flooded.assignments, plain.assignments);
        assert_eq!(p.status(&file()).unwrap().mirrors[0].blocks, blocks);
    }

    #[test]
    fn a_peer_that_leaves_leaves_no_state() {
        let mut p = setup(8);
        let (a, b) = (peer(), peer());
        p.peer_up(a, vec![addr()]);
        p.peer_up(b, vec![addr()]);
        p.set_region(a, "eu".into());
        p.avoid(a, b, None);
        assert_eq!(p.peer_count(), 2);
        p.peer_down(&a);
        p.peer_down(&b);
        assert_eq!(p.peer_count(), 0);
        // Back: it starts afresh (its old avoidances do not follow it).
        p.peer_up(a, vec![addr()]);
        assert_eq!(p.avoid_count(&a), 0);
    }

    #[test]
    fn holders_that_come_and_go_reuse_their_numbers_and_leave_the_index() {
        let mut p = setup(8);
        for _ in 0..100 {
            let h = peer();
            p.peer_up(h, vec![addr()]);
            p.have(&file(), h, &[BlockRange::new(0, 4)]);
            p.peer_down(&h);
        }
        assert_eq!(p.numbers.of.len(), 0);
        assert!(
            p.numbers.peer.len() <= 2,
            "{} numbers",
            p.numbers.peer.len()
        );
        let sets = [&p.index.all, &p.index.open];
        assert!(sets
            .iter()
            .all(|s| s.by_region.values().all(|set| set.is_empty()) && s.by_prefix.is_empty()));
        // A holder that stays is still found through its reused number.
        let (h, r) = (peer(), peer());
        for x in [h, r] {
            p.peer_up(x, vec![addr()]);
        }
        p.have(&file(), h, &[BlockRange::new(0, 8)]);
        let a = p.locate(Instant::now(), r, &file(), &all(8)).unwrap();
        assert!(a
            .assignments
            .iter()
            .any(|x| matches!(x.source, Source::Peer { peer, .. } if peer == h)));
    }

    #[test]
    fn avoidances_are_capped_and_expire() {
        let mut p = setup(8);
        let a = peer();
        p.peer_up(a, vec![addr()]);
        let now = Instant::now();
        let forever = peer();
        p.avoid(a, forever, None);
        for i in 0..(MAX_AVOID_PER_PEER as u64 + 500) {
            p.avoid(a, peer(), Some(now + Duration::from_secs(1 + i)));
        }
        assert_eq!(p.avoid_count(&a), MAX_AVOID_PER_PEER);
        // The avoidance for good was kept; the earliest-ending timed ones went first.
        p.expire_avoidance(now + Duration::from_secs(100_000));
        assert_eq!(p.avoid_count(&a), 1);
        let b = peer();
        p.peer_up(b, vec![addr()]);
        p.have(&file(), forever, &all(8));
        assert!(p
            .locate(now, a, &file(), &all(8))
            .unwrap()
            .assignments
            .iter()
            .all(|x| x.source == Source::Master));
    }

    #[test]
    fn byte_counters_saturate() {
        let mut p = setup(8);
        p.count_bytes(&file(), u64::MAX, u64::MAX);
        p.count_bytes(&file(), 1, 1);
        let s = p.status(&file()).unwrap();
        assert_eq!(
            (s.bytes_from_master, s.bytes_from_peers),
            (u64::MAX, u64::MAX)
        );
    }

    #[test]
    fn master_only_blocks_count_what_no_live_mirror_holds() {
        let mut p = setup(200);
        let (a, b) = (peer(), peer());
        p.peer_up(a, vec![addr()]);
        p.peer_up(b, vec![addr()]);
        p.have(&file(), a, &[BlockRange::new(0, 70)]);
        p.have(
            &file(),
            b,
            &[BlockRange::new(60, 130), BlockRange::new(190, 200)],
        );
        assert_eq!(
            p.status(&file()).unwrap().master_only_blocks,
            200 - 130 - 10
        );
        p.peer_down(&b);
        assert_eq!(p.status(&file()).unwrap().master_only_blocks, 130);
    }

    #[test]
    fn a_locate_that_can_assign_little_stops_early() {
        let blocks = 1 << 18;
        let mut p = Policy::new(sequential());
        // The master holds nothing yet (a file being pulled); 2,000 mirrors hold block 0.
        p.add_file(
            file(),
            "f".into(),
            u64::from(blocks) * 1024,
            Blocks::new(blocks),
        );
        for _ in 0..2_000 {
            let h = peer();
            p.peer_up(h, vec![addr()]);
            p.have(&file(), h, &[BlockRange::new(0, 1)]);
        }
        let me = peer();
        p.peer_up(me, vec![addr()]);
        // Unbounded, this walks 2^18 blocks x 2,000 holders; bounded, at most
        // 16 x 512 blocks x 1,024 holders. The time bound only tells one from the other.
        let start = std::time::Instant::now();
        let ans = p.locate(Instant::now(), me, &file(), &all(blocks)).unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(ans.assignments.len(), 1);
        assert_eq!(ans.assignments[0].range, BlockRange::new(0, 1));
    }

    /// `a` holds everything and is the only holder; `b` is sent to `a` for blocks 0..8.
    fn redirected() -> (Policy, PeerId, PeerId, Instant) {
        let mut p = setup(16);
        let (a, b) = (peer(), peer());
        p.peer_up(a, vec![addr()]);
        p.peer_up(b, vec![addr()]);
        p.have(&file(), a, &all(16));
        let now = Instant::now();
        let ans = p.locate(now, b, &file(), &[BlockRange::new(0, 8)]).unwrap();
        assert!(matches!(ans.assignments[0].source, Source::Peer { peer, .. } if peer == a));
        assert_eq!(ans.assignments[0].range, BlockRange::new(0, 8));
        (p, a, b, now)
    }

    #[test]
    fn a_report_counts_only_for_an_assignment_the_master_made() {
        let (mut p, a, b, now) = redirected();
        let r = |x, y| vec![BlockRange::new(x, y)];
        assert!(p.assigned(&b, &file(), &a, &r(0, 8), now));
        assert!(p.assigned(&b, &file(), &a, &r(3, 4), now));
        assert!(p.assigned(&b, &file(), &a, &[], now));
        // Another reporter, another culprit, other blocks, another file: not assigned.
        let (c, d) = (peer(), peer());
        assert!(!p.assigned(&c, &file(), &a, &r(0, 8), now));
        assert!(!p.assigned(&b, &file(), &d, &r(0, 8), now));
        assert!(!p.assigned(&b, &file(), &d, &[], now));
        assert!(!p.assigned(&b, &file(), &a, &r(7, 9), now));
        assert!(!p.assigned(&b, &file(), &a, &r(16, 17), now));
        assert!(!p.assigned(&b, &FileId([9; 32]), &a, &r(0, 1), now));
        // The master's own handouts name no peer: a report against the master never matches.
        p.peer_up(c, vec![]);
        p.avoid(c, a, None);
        let ans = p.locate(now, c, &file(), &r(0, 16)).unwrap();
        assert!(ans.assignments.iter().any(|x| x.source == Source::Master));
        assert!(!p.assigned(&c, &file(), &a, &r(8, 9), now));
        assert!(!p.assigned(&c, &file(), &peer(), &[], now));
    }

    #[test]
    fn a_failed_transfer_can_be_reported_within_the_grace_after_its_window() {
        let (mut p, a, b, now) = redirected();
        let cfg = PolicyConfig::default();
        let window_end = now + cfg.assignment_timeout;
        let blocks = [BlockRange::new(2, 3)];
        // The node asks again at once and is sent elsewhere (it avoids `a` now): the old
        // assignment still counts for a report that arrives after that answer.
        p.avoid(b, a, None);
        let ans = p.locate(now, b, &file(), &all(16)).unwrap();
        assert!(ans.assignments.iter().all(|x| x.source == Source::Master));
        assert!(p.assigned(&b, &file(), &a, &blocks, now + Duration::from_secs(1)));
        // It expired (no Have ever came): still within the grace...
        let late = window_end + cfg.report_grace / 2;
        p.expire(late);
        assert!(p.assigned(&b, &file(), &a, &blocks, late));
        // ...and not after it.
        let too_late = window_end + cfg.report_grace + Duration::from_millis(1);
        p.expire(too_late);
        assert!(!p.assigned(&b, &file(), &a, &blocks, too_late));
        assert!(!p.assigned(&b, &file(), &a, &[], too_late));
    }

    #[test]
    fn blocks_confirmed_from_that_source_cannot_be_reported() {
        let (mut p, a, b, now) = redirected();
        p.have(&file(), b, &[BlockRange::new(0, 4)]);
        assert!(!p.assigned(&b, &file(), &a, &[BlockRange::new(0, 1)], now));
        assert!(!p.assigned(&b, &file(), &a, &[BlockRange::new(3, 5)], now));
        assert!(p.assigned(&b, &file(), &a, &[BlockRange::new(4, 8)], now));
    }

    #[test]
    fn a_source_that_disconnects_takes_its_assignments_with_it() {
        let (mut p, a, b, now) = redirected();
        assert_eq!(p.load(&a), 8);
        p.peer_down(&a);
        assert_eq!(p.load(&a), 0);
        // Back with its key: what its downloaders saw of its death is not about this session.
        p.peer_up(a, vec![addr()]);
        assert!(!p.assigned(&b, &file(), &a, &[BlockRange::new(0, 8)], now));
        assert!(!p.assigned(&b, &file(), &a, &[], now));
    }

    #[test]
    fn a_not_held_refusal_drops_the_claims_at_once() {
        let (mut p, a, b, now) = redirected();
        assert!(p.claims(&file(), &a, BlockRange::new(0, 8)));
        assert_eq!(p.forget_claims(&file(), &a, &[BlockRange::new(0, 8)]), 8);
        assert!(!p.claims(&file(), &a, BlockRange::new(0, 1)));
        assert!(p.claims(&file(), &a, BlockRange::new(8, 16)));
        // Nobody is sent there for those blocks again; still for the others.
        let c = peer();
        p.peer_up(c, vec![addr()]);
        let ans = p.locate(now, c, &file(), &all(16)).unwrap();
        for x in &ans.assignments {
            match &x.source {
                Source::Peer { peer, .. } => {
                    assert_eq!(*peer, a);
                    assert!(x.range.start >= 8, "{x:?}");
                }
                Source::Master => assert!(x.range.end <= 8, "{x:?}"),
            }
        }
        // The assignment it refused can still be reported (that is how the refusal counts).
        assert!(p.assigned(&b, &file(), &a, &[BlockRange::new(0, 8)], now));
        // A peer that claimed nothing else leaves the mirror list.
        assert_eq!(p.forget_claims(&file(), &a, &all(16)), 8);
        assert!(p.mirrors(&file()).is_empty());
    }

    #[test]
    fn closed_assignments_are_remembered_in_bounded_space() {
        let mut p = setup(1024);
        // The holder never fills: b confirms nothing, and its runs would count against it.
        p.cfg.peer_slots = u32::MAX;
        let (a, b) = (peer(), peer());
        p.peer_up(a, vec![addr()]);
        p.peer_up(b, vec![addr()]);
        p.have(&file(), a, &all(1024));
        let t0 = Instant::now();
        // Each block assigned twice (the second retracts the first), at distinct moments so
        // that no two closed assignments merge: 1,024 closed assignments.
        for blk in 0..1024u32 {
            let at = t0 + Duration::from_millis(u64::from(blk));
            for _ in 0..2 {
                p.locate(at, b, &file(), &[BlockRange::new(blk, blk + 1)])
                    .unwrap();
            }
        }
        let len = p.files[&file()].past.get(&b).map_or(0, |l| l.len());
        assert_eq!(len, MAX_PAST_PER_REQUESTER);
    }
}

/// Location tiers and the region budget (in a file of their own).
#[cfg(test)]
#[path = "policy_near_tests.rs"]
mod near_tests;
