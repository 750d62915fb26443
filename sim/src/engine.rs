//! The virtual engine: a discrete-event simulation in virtual time that drives the master's
//! policy ([`shoal_master::Policy`]), each node's [`Scheduler`] and the ban rule
//! ([`BanBook`]) — the code the binaries run — over the bandwidth model of [`crate::net`].
//!
//! Time is nanoseconds from the start; the pure cores get `base + offset` as their `now`, so
//! they run unchanged. Events at the same time run in the order they were scheduled (a
//! sequence number breaks ties), randomness comes from one seeded ChaCha generator, and
//! nothing iterates a hash map into the output: same scenario and seed, same bytes out.
//!
//! What a message costs: one-way latency between the two regions (node to master and back for
//! Locate; a piece transfer starts after a round trip: request out, first byte back). The
//! master answers at once (its CPU time is not modelled).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use shoal_master::bans::{respond, BanBook, BanConfig, Charge, ProbeOutcome, Verdict};
use shoal_node::scheduler::{Action, Failure, Scheduler, SchedulerConfig, TransferId};
use shoal_protocol::block::{BlockRange, Blocks};
use shoal_protocol::wire::{Assignment, Problem, RefuseReason};

use crate::draw::Swarm;
use crate::net::{FlowId, LinkId, Net, Reschedule};
use crate::redirect::{self, PolicyKind, Redirector};
use crate::scenario::Scenario;
use crate::timers::Timers;

/// How a node behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Follows the protocol.
    Honest,
    /// Serves a flipped byte in every block.
    Corrupt,
    /// Claims every block, holds none.
    LieHave,
    /// Accepts piece requests, sends nothing.
    Stall,
    /// Reports every peer it downloaded from as corrupt.
    FalseAccuse,
}

impl Role {
    /// Its name in outputs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Honest => "honest",
            Self::Corrupt => "corrupt",
            Self::LieHave => "lie-have",
            Self::Stall => "stall",
            Self::FalseAccuse => "false-accuse",
        }
    }
}

/// One node's record, for `nodes.csv`.
#[derive(Clone, Debug)]
pub struct NodeRecord {
    /// Its region.
    pub region: String,
    /// How it behaved.
    pub role: Role,
    /// Upload capacity, bytes/s.
    pub upload: f64,
    /// Download capacity, bytes/s.
    pub download: f64,
    /// When it first arrived, seconds.
    pub start_s: f64,
    /// When it held every block, seconds (absent: never).
    pub finish_s: Option<f64>,
    /// Bytes received from the master.
    pub from_master: u64,
    /// Bytes received from peers.
    pub from_peers: u64,
    /// Bytes it sent to other nodes.
    pub uploaded: u64,
    /// Transfers that ended early.
    pub retries: u64,
    /// Whether it was banned.
    pub banned: bool,
    /// Blocks it accepted from a corrupting source (must be 0: every block is verified).
    pub bad_blocks: u64,
}

/// What a run produced.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Per node.
    pub nodes: Vec<NodeRecord>,
    /// Master upload per second of virtual time, bytes.
    pub master_egress: Vec<f64>,
    /// Bytes the master sent.
    pub origin_bytes: u64,
    /// Bytes sent between peers in the same region.
    pub peer_bytes_intra: u64,
    /// Bytes sent between peers.
    pub peer_bytes: u64,
    /// Virtual time at the end, seconds.
    pub virtual_s: f64,
    /// Events processed.
    pub events: u64,
    /// Whether the run stopped at the time limit with honest nodes unfinished.
    pub hit_limit: bool,
    /// Blocks the master delivered more than once (the second and later deliveries).
    pub origin_resent_blocks: u64,
}

/// Progress, for a progress bar.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// Honest nodes done.
    pub done: usize,
    /// Honest nodes in all.
    pub honest: usize,
    /// Virtual time, seconds.
    pub virtual_s: f64,
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A node key could not be made.
    #[error("cannot make a node key: {0}")]
    Key(String),
}

type XferId = u64;

#[derive(Debug)]
enum Msg {
    Hello,
    Locate(Vec<BlockRange>),
    Have(Vec<BlockRange>),
    Report(PeerId, Problem),
    Leave,
}

#[derive(Debug)]
enum Ev {
    Arrive(usize),
    Wake(usize, u32),
    ToMaster(usize, Msg),
    Answer(usize, u32, Vec<Assignment>, Duration),
    Open(XferId),
    Fail(XferId, u32, Failure),
    FlowEnd(FlowId, u64, XferId),
    /// A flow's next whole block is in (stale unless the version is current).
    Block(FlowId, u64, XferId),
    ProbeDone(usize),
    Leave(usize, u32),
    Rejoin(usize),
    SeedEnd(usize, u32),
    CrashNoticed(usize, u32),
}

/// A queued event: its time, its order among events of that time, and where it waits in
/// [`Engine::events`] (the heap moves these 24 bytes, not the events themselves).
struct Entry {
    at: u64,
    seq: u64,
    slot: u32,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

struct Node {
    peer: PeerId,
    region: usize,
    role: Role,
    up_cap: f64,
    down_cap: f64,
    up: LinkId,
    down: LinkId,
    slots: usize,
    online: bool,
    crashed: bool,
    gone: bool,
    banned: bool,
    epoch: u32,
    sched: Option<Scheduler>,
    kept: Blocks,
    start: Option<u64>,
    finish: Option<u64>,
    from_master: u64,
    from_peers: u64,
    uploaded: u64,
    retries: u64,
    bad_blocks: u64,
    serving: usize,
    inbound: Vec<XferId>,
    outbound: Vec<XferId>,
    wake: Option<u64>,
}

struct Xfer {
    dst: usize,
    epoch: u32,
    src: Option<usize>,
    tid: TransferId,
    range: BlockRange,
    bytes: u64,
    flow: Option<FlowId>,
    corrupt: bool,
}

const NS: f64 = 1e9;

/// A flow's two timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlowTimer {
    End,
    Block,
}

/// A flow timer's key in [`Engine::flow_timers`].
fn flow_key(flow: FlowId, kind: FlowTimer) -> usize {
    flow * 2 + usize::from(kind == FlowTimer::Block)
}

fn ns(s: f64) -> u64 {
    (s * NS).round().max(0.0) as u64
}

/// Runs `sc` in virtual time with the given policy and seed; `progress` is called now and
/// then.
pub fn run(
    sc: &Scenario,
    kind: PolicyKind,
    seed: u64,
    progress: &mut dyn FnMut(Progress),
) -> Result<Outcome, EngineError> {
    let mut e = Engine::new(sc, kind, seed)?;
    e.run(progress);
    Ok(e.outcome())
}

struct Engine<'a> {
    sc: &'a Scenario,
    base: Instant,
    now: u64,
    seq: u64,
    heap: BinaryHeap<Reverse<Entry>>,
    /// Each flow's end and next-block events (keys [`flow_key`]): moved, not added again,
    /// when its rate changes.
    flow_timers: Timers<(FlowTimer, u64, XferId)>,
    /// The queued events, by slot, and the free slots.
    events_at: Vec<Option<Ev>>,
    free_slots: Vec<u32>,
    net: Net,
    resched: Vec<Reschedule>,
    nodes: Vec<Node>,
    by_peer: HashMap<PeerId, usize>,
    master: Box<dyn Redirector>,
    bans: BanBook,
    rng: ChaCha8Rng,
    xfers: HashMap<XferId, Xfer>,
    next_xfer: XferId,
    flow_xfer: Vec<Option<XferId>>,
    master_up: LinkId,
    master_region: usize,
    master_serving: usize,
    regions: Vec<String>,
    /// One-way latency between regions, ns.
    lat: Vec<Vec<u64>>,
    block: u64,
    size: u64,
    blocks: u32,
    sched_cfg: SchedulerConfig,
    honest_left: usize,
    honest: usize,
    origin_bytes: u64,
    peer_bytes: u64,
    peer_bytes_intra: u64,
    events: u64,
    limit: u64,
    hit_limit: bool,
    trace: bool,
    /// Per block, deliveries by the master.
    master_sent: Vec<u32>,
}

impl<'a> Engine<'a> {
    fn new(sc: &'a Scenario, kind: PolicyKind, seed: u64) -> Result<Self, EngineError> {
        let (drawn, rng) = Swarm::draw(sc, seed);
        let regions = drawn.regions;
        let lat: Vec<Vec<u64>> = regions
            .iter()
            .map(|a| {
                regions
                    .iter()
                    .map(|b| ns(sc.latency.between(a, b)))
                    .collect()
            })
            .collect();
        let n = sc.nodes();
        let mut net = Net::new();
        let master_up = net.add_link(sc.master.upload.0);
        net.observe(master_up);
        let blocks = sc.blocks();
        let mut nodes = Vec::with_capacity(n);
        let mut peers = Vec::with_capacity(n);
        let mut addrs = Vec::with_capacity(n);
        for d in drawn.nodes {
            let mut key = d.key;
            let kp = Keypair::ed25519_from_bytes(&mut key)
                .map_err(|e| EngineError::Key(e.to_string()))?;
            let peer = kp.public().to_peer_id();
            let (up_cap, down_cap) = (d.upload, d.download);
            let up = net.add_link(up_cap);
            let down = net.add_link(down_cap);
            addrs.push(Multiaddr::empty().with(Protocol::Memory(nodes.len() as u64 + 1)));
            peers.push(peer);
            nodes.push(Node {
                peer,
                region: d.region,
                role: d.role,
                up_cap,
                down_cap,
                up,
                down,
                slots: sc.groups[d.group].upload_slots,
                online: false,
                crashed: false,
                gone: false,
                banned: false,
                epoch: 0,
                sched: None,
                kept: Blocks::new(blocks),
                start: None,
                finish: None,
                from_master: 0,
                from_peers: 0,
                uploaded: 0,
                retries: 0,
                bad_blocks: 0,
                serving: 0,
                inbound: Vec::new(),
                outbound: Vec::new(),
                wake: None,
            });
        }
        let honest = nodes.iter().filter(|x| x.role == Role::Honest).count();
        let by_peer = peers.iter().enumerate().map(|(i, p)| (*p, i)).collect();
        let mut cfg = sc.policy.config();
        // The policy knows the master's slots, as the real master tells it its own.
        cfg.master_slots = u32::try_from(sc.master.upload_slots).unwrap_or(u32::MAX);
        // ... and its upload cap, as the real master's `--max-upload-rate`, unless the
        // scenario's master has none (its link is the limit; the policy sees what it sent).
        if sc.master.rate_known {
            cfg.master_upload_rate = Some(sc.master.upload.0 as u64);
        }
        if let Some(slots) = sc.groups.iter().map(|g| g.upload_slots).min() {
            cfg.peer_slots = u32::try_from(slots).unwrap_or(u32::MAX);
        }
        let master = redirect::build(kind, cfg, peers, addrs, blocks, sc.file.size.0, seed);
        let bound = crate::bound::lower_bound(sc);
        let limit = ns(sc.limit_s.unwrap_or(bound * 20.0 + 600.0));
        let mut e = Self {
            sc,
            base: Instant::now(),
            now: 0,
            seq: 0,
            heap: BinaryHeap::new(),
            flow_timers: Timers::default(),
            events_at: Vec::new(),
            free_slots: Vec::new(),
            net,
            resched: Vec::new(),
            nodes,
            by_peer,
            master,
            bans: BanBook::new(BanConfig::default()),
            rng,
            xfers: HashMap::new(),
            next_xfer: 0,
            flow_xfer: Vec::new(),
            master_up,
            master_region: 0,
            master_serving: 0,
            regions,
            lat,
            block: sc.file.block.0,
            size: sc.file.size.0,
            blocks,
            sched_cfg: SchedulerConfig {
                max_transfers: sc.node.max_transfers,
                ..SchedulerConfig::default()
            },
            honest_left: honest,
            honest,
            origin_bytes: 0,
            peer_bytes: 0,
            peer_bytes_intra: 0,
            events: 0,
            limit,
            hit_limit: false,
            trace: std::env::var_os("SHOAL_SIM_TRACE").is_some(),
            master_sent: vec![0; blocks as usize],
        };
        for (i, t) in drawn.arrivals {
            e.push(ns(t), Ev::Arrive(i));
        }
        Ok(e)
    }

    fn exp(&mut self, rate: f64) -> f64 {
        crate::draw::exp(&mut self.rng, rate)
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                self.events_at[slot as usize] = Some(ev);
                slot
            }
            None => {
                self.events_at.push(Some(ev));
                (self.events_at.len() - 1) as u32
            }
        };
        self.heap.push(Reverse(Entry {
            at,
            seq: self.seq,
            slot,
        }));
    }

    /// Sets (or moves) a flow's end or next-block event to `at`; it takes its place in the
    /// one sequence of [`Engine::push`].
    fn set_flow_timer(&mut self, at: u64, flow: FlowId, kind: FlowTimer, version: u64, x: XferId) {
        self.seq += 1;
        self.flow_timers
            .set(flow_key(flow, kind), at, self.seq, (kind, version, x));
    }

    /// Takes the next event of either queue, with its time. Both order by `(at, seq)` with
    /// one sequence, so events come in the order they would from one queue.
    fn pop_next(&mut self) -> Option<(u64, Ev)> {
        let heap = self.heap.peek().map(|Reverse(e)| (e.at, e.seq));
        let timer = self.flow_timers.peek();
        if timer.is_some_and(|t| heap.is_none_or(|h| t < h)) {
            let (key, at, (kind, version, x)) = self.flow_timers.pop()?;
            let flow = key / 2;
            let ev = match kind {
                FlowTimer::End => Ev::FlowEnd(flow, version, x),
                FlowTimer::Block => Ev::Block(flow, version, x),
            };
            return Some((at, ev));
        }
        let Reverse(entry) = self.heap.pop()?;
        self.free_slots.push(entry.slot);
        let ev = self.events_at[entry.slot as usize]
            .take()
            .expect("a queued event's slot holds it");
        Some((entry.at, ev))
    }

    fn instant(&self) -> Instant {
        self.base + Duration::from_nanos(self.now)
    }

    fn lat_master(&self, n: usize) -> u64 {
        self.lat[self.nodes[n].region][self.master_region]
    }

    fn lat_between(&self, a: Option<usize>, b: usize) -> u64 {
        let ra = a.map_or(self.master_region, |a| self.nodes[a].region);
        self.lat[ra][self.nodes[b].region]
    }

    fn range_bytes(&self, r: BlockRange) -> u64 {
        let start = u64::from(r.start) * self.block;
        let end = (u64::from(r.end) * self.block).min(self.size);
        end.saturating_sub(start)
    }

    fn run(&mut self, progress: &mut dyn FnMut(Progress)) {
        let mut last_report = 0u64;
        while let Some((at, ev)) = self.pop_next() {
            if at > self.limit {
                self.hit_limit = true;
                self.now = self.limit;
                break;
            }
            self.now = at;
            self.events += 1;
            self.handle(ev);
            if self.honest_left == 0 {
                break;
            }
            if self.events - last_report >= 20_000 {
                last_report = self.events;
                progress(Progress {
                    done: self.honest - self.honest_left,
                    honest: self.honest,
                    virtual_s: self.now as f64 / NS,
                });
            }
        }
        progress(Progress {
            done: self.honest - self.honest_left,
            honest: self.honest,
            virtual_s: self.now as f64 / NS,
        });
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Arrive(n) => {
                self.nodes[n].start = Some(self.now);
                self.come_online(n);
            }
            Ev::Rejoin(n) => {
                if !self.nodes[n].online && !self.nodes[n].gone && !self.nodes[n].banned {
                    self.come_online(n);
                }
            }
            Ev::Wake(n, epoch) => {
                let node = &mut self.nodes[n];
                if node.online && node.epoch == epoch && node.wake.is_some_and(|w| w <= self.now) {
                    node.wake = None;
                    self.drive(n);
                }
            }
            Ev::ToMaster(n, msg) => self.at_master(n, msg),
            Ev::Answer(n, epoch, assignments, retry) => {
                let now = self.instant();
                let node = &mut self.nodes[n];
                if node.online && node.epoch == epoch {
                    if let Some(s) = node.sched.as_mut() {
                        s.on_assignments(now, assignments, retry);
                    }
                    self.drive(n);
                }
            }
            Ev::Open(x) => self.open(x),
            Ev::Fail(x, delivered, failure) => self.end_xfer(x, delivered, Some(failure)),
            Ev::FlowEnd(flow, version, x) => {
                if self.net.is_current(flow, version) {
                    self.flow_done(x);
                }
            }
            Ev::Block(flow, version, x) => {
                if self.net.is_current(flow, version) {
                    self.block_done(flow, version, x);
                }
            }
            Ev::ProbeDone(s) => {
                let node = &self.nodes[s];
                let outcome = if !node.online || node.banned {
                    ProbeOutcome::Inconclusive
                } else {
                    match node.role {
                        Role::Corrupt => ProbeOutcome::Corrupt,
                        Role::Stall | Role::LieHave => ProbeOutcome::Inconclusive,
                        Role::Honest | Role::FalseAccuse => ProbeOutcome::Honest,
                    }
                };
                // A probe's cut-off or refusal counts only against a suspect still connected.
                let (peer, online) = (node.peer, node.online);
                let verdict = self
                    .bans
                    .probe_result(self.instant(), peer, outcome, online);
                self.act(verdict);
            }
            Ev::Leave(n, epoch) => {
                let node = &self.nodes[n];
                if node.online && node.epoch == epoch {
                    let crash = self.rng.gen_bool(self.sc.churn.crash_fraction);
                    self.go_offline(n, crash);
                    if self.sc.churn.rejoin_rate > 0.0 {
                        let t = self.exp(self.sc.churn.rejoin_rate);
                        self.push(self.now + ns(t), Ev::Rejoin(n));
                    } else {
                        self.nodes[n].gone = true;
                        self.count_gone(n);
                    }
                }
            }
            Ev::SeedEnd(n, epoch) => {
                let node = &self.nodes[n];
                if node.online && node.epoch == epoch {
                    self.go_offline(n, false);
                    self.nodes[n].gone = true;
                }
            }
            Ev::CrashNoticed(n, epoch) => {
                // The master's pings to a crashed node fail: it drops it.
                if self.nodes[n].epoch == epoch && !self.nodes[n].online {
                    self.master.peer_down(n);
                }
            }
        }
    }

    /// An honest node that will never finish no longer holds the run open.
    fn count_gone(&mut self, n: usize) {
        let node = &self.nodes[n];
        if node.role == Role::Honest && node.finish.is_none() {
            self.honest_left -= 1;
        }
    }

    fn come_online(&mut self, n: usize) {
        let cfg = self.sched_cfg.clone();
        let node = &mut self.nodes[n];
        node.online = true;
        node.crashed = false;
        node.epoch += 1;
        node.sched = Some(Scheduler::new(node.kept.clone(), cfg));
        let at = self.now + self.lat_master(n);
        self.push(at, Ev::ToMaster(n, Msg::Hello));
        if self.nodes[n].role == Role::LieHave {
            let all = vec![BlockRange::new(0, self.blocks)];
            self.push(at, Ev::ToMaster(n, Msg::Have(all)));
        }
        if self.sc.churn.leave_rate > 0.0 {
            let t = self.exp(self.sc.churn.leave_rate);
            let epoch = self.nodes[n].epoch;
            self.push(self.now + ns(t), Ev::Leave(n, epoch));
        }
        // As a real node does, it asks the master for the manifest first (one round trip after
        // its Hello) and only then starts its scheduler: in a crowd that arrives at once, the
        // master knows the whole crowd before the first Locate.
        let at = self.now + 2 * self.lat_master(n);
        let node = &mut self.nodes[n];
        node.wake = Some(at);
        let epoch = node.epoch;
        self.push(at, Ev::Wake(n, epoch));
    }

    fn go_offline(&mut self, n: usize, crash: bool) {
        if !crash && !self.nodes[n].banned {
            let at = self.now + self.lat_master(n);
            self.push(at, Ev::ToMaster(n, Msg::Leave));
        }
        let epoch = {
            let node = &mut self.nodes[n];
            node.online = false;
            node.crashed = crash;
            if let Some(s) = node.sched.take() {
                node.kept = s.have().clone();
                node.retries += s.retries();
            }
            node.wake = None;
            node.epoch
        };
        if crash {
            let at = self.now + ns(self.sc.churn.crash_detect_s);
            self.push(at, Ev::CrashNoticed(n, epoch));
        }
        // Its downloads stop; its uploads fail at the receivers (at once on a clean leave, after
        // the receiver's watchdog on a crash).
        for x in std::mem::take(&mut self.nodes[n].inbound) {
            self.abort_flow(x);
            self.free_xfer(x);
        }
        let watchdog = ns(self.sc.node.watchdog_s);
        for x in std::mem::take(&mut self.nodes[n].outbound) {
            let moved = self.abort_flow(x);
            let Some(xf) = self.xfers.get(&x) else {
                continue;
            };
            let delivered = self.delivered(xf, moved);
            let at = if crash { self.now + watchdog } else { self.now };
            let failure = if delivered > 0 && !crash {
                Failure::Truncated {
                    block: xf.range.start + delivered,
                }
            } else {
                Failure::Unreachable
            };
            self.push(at, Ev::Fail(x, delivered, failure));
        }
        self.nodes[n].serving = 0;
    }

    fn delivered(&self, xf: &Xfer, moved: f64) -> u32 {
        if xf.corrupt {
            return 0;
        }
        if moved + 0.5 >= xf.bytes as f64 {
            return xf.range.len();
        }
        ((moved / self.block as f64).floor() as u32).min(xf.range.len())
    }

    /// Stops a transfer's flow, if running; returns the bytes it had moved.
    fn abort_flow(&mut self, x: XferId) -> f64 {
        let Some(flow) = self.xfers.get_mut(&x).and_then(|xf| xf.flow.take()) else {
            return 0.0;
        };
        if let Some(slot) = self.flow_xfer.get_mut(flow) {
            *slot = None;
        }
        let src = self.xfers.get(&x).and_then(|xf| xf.src);
        let moved = self.net.stop(self.now, flow, &mut self.resched);
        // Its timers would only be stale now.
        self.flow_timers.remove(flow_key(flow, FlowTimer::End));
        self.flow_timers.remove(flow_key(flow, FlowTimer::Block));
        self.flush_resched();
        self.count_sent(x, moved);
        match src {
            Some(s) => self.nodes[s].serving = self.nodes[s].serving.saturating_sub(1),
            None => self.master_serving = self.master_serving.saturating_sub(1),
        }
        moved
    }

    fn count_sent(&mut self, x: XferId, moved: f64) {
        let Some(xf) = self.xfers.get(&x) else {
            return;
        };
        let bytes = moved.round() as u64;
        match xf.src {
            None => self.origin_bytes += bytes,
            Some(s) => {
                self.nodes[s].uploaded += bytes;
                self.peer_bytes += bytes;
                if self.nodes[s].region == self.nodes[xf.dst].region {
                    self.peer_bytes_intra += bytes;
                }
            }
        }
    }

    fn free_xfer(&mut self, x: XferId) {
        if let Some(xf) = self.xfers.remove(&x) {
            if let Some(s) = xf.src {
                self.nodes[s].outbound.retain(|y| *y != x);
            }
            self.nodes[xf.dst].inbound.retain(|y| *y != x);
        }
    }

    fn flush_resched(&mut self) {
        let list = std::mem::take(&mut self.resched);
        for &(flow, version, at) in &list {
            if let Some(x) = self.flow_owner(flow) {
                self.set_flow_timer(at, flow, FlowTimer::End, version, x);
                self.next_block(flow, version, x, at);
            }
        }
        self.resched = list;
        self.resched.clear();
    }

    /// Schedules the event of the flow's next whole block, if it comes before the flow's end
    /// at `end`.
    fn next_block(&mut self, flow: FlowId, version: u64, x: XferId, end: u64) {
        let Some((rate, total)) = self.net.rate_and_total(flow) else {
            return;
        };
        if rate <= 0.0 || self.xfers.get(&x).is_none_or(|xf| xf.corrupt) {
            return;
        }
        let moved = self.net.moved(self.now, flow);
        let block = self.block as f64;
        let next = ((moved + 1.0) / block).floor() * block + block;
        if next >= total {
            return;
        }
        let at = self.now + ns((next - moved) / rate);
        if at < end {
            self.set_flow_timer(at, flow, FlowTimer::Block, version, x);
        }
    }

    /// A flow's next block is in: the receiver's scheduler holds it (and tells the master in
    /// its own time, as a real node does).
    fn block_done(&mut self, flow: FlowId, version: u64, x: XferId) {
        let moved = self.net.moved(self.now, flow);
        let Some(xf) = self.xfers.get(&x) else {
            return;
        };
        let (dst, tid) = (xf.dst, xf.tid);
        let delivered = (((moved + 1.0) / self.block as f64).floor() as u32).min(xf.range.len());
        let now = self.instant();
        if let Some(s) = self.nodes[dst].sched.as_mut() {
            s.on_progress(now, tid, delivered);
        }
        self.drive(dst);
        if let Some((_, end)) = self.net.end_of(flow) {
            self.next_block(flow, version, x, end);
        }
    }

    fn flow_owner(&self, flow: FlowId) -> Option<XferId> {
        self.flow_xfer.get(flow).copied().flatten()
    }

    /// Runs a node's scheduler until it has nothing more to do now.
    fn drive(&mut self, n: usize) {
        let now = self.instant();
        loop {
            let node = &mut self.nodes[n];
            if !node.online {
                return;
            }
            let Some(sched) = node.sched.as_mut() else {
                return;
            };
            let Some(action) = sched.poll(now) else {
                break;
            };
            match action {
                Action::Locate { need } => {
                    let at = self.now + self.lat_master(n);
                    self.push(at, Ev::ToMaster(n, Msg::Locate(need)));
                }
                Action::Have(ranges) => {
                    let at = self.now + self.lat_master(n);
                    self.push(at, Ev::ToMaster(n, Msg::Have(ranges)));
                }
                Action::Report { peer, problem } => {
                    let at = self.now + self.lat_master(n);
                    self.push(at, Ev::ToMaster(n, Msg::Report(peer, problem)));
                }
                Action::Start(t) => {
                    let src = t.peer().and_then(|p| self.by_peer.get(&p).copied());
                    if t.peer().is_some() && src.is_none() {
                        // A peer the simulation does not know: cannot happen; fail it.
                        if let Some(s) = self.nodes[n].sched.as_mut() {
                            s.on_transfer_end(now, t.id, 0, Some(Failure::Unreachable));
                        }
                        continue;
                    }
                    let bytes = self.range_bytes(t.range);
                    let xf = Xfer {
                        dst: n,
                        epoch: self.nodes[n].epoch,
                        src,
                        tid: t.id,
                        range: t.range,
                        bytes,
                        flow: None,
                        corrupt: false,
                    };
                    let x = self.next_xfer;
                    self.next_xfer += 1;
                    self.xfers.insert(x, xf);
                    self.nodes[n].inbound.push(x);
                    if let Some(s) = src {
                        self.nodes[s].outbound.push(x);
                    }
                    let rtt = 2 * self.lat_between(src, n);
                    self.push(self.now + rtt, Ev::Open(x));
                }
            }
        }
        let node = &mut self.nodes[n];
        let Some(sched) = node.sched.as_ref() else {
            return;
        };
        if node.finish.is_none() && sched.is_complete() {
            node.finish = Some(self.now);
            if node.role == Role::Honest {
                self.honest_left -= 1;
            }
            if let Some(s) = self.sc.node.seed_s {
                let epoch = node.epoch;
                self.push(self.now + ns(s), Ev::SeedEnd(n, epoch));
            }
        }
        let node = &mut self.nodes[n];
        if let Some(t) = node.sched.as_ref().and_then(|s| s.poll_timeout()) {
            let at = t.saturating_duration_since(self.base).as_nanos() as u64;
            if at > self.now && node.wake.is_none_or(|w| w > at) {
                node.wake = Some(at);
                let epoch = node.epoch;
                self.push(at, Ev::Wake(n, epoch));
            }
        }
    }

    fn at_master(&mut self, n: usize, msg: Msg) {
        let now = self.instant();
        match msg {
            Msg::Hello => {
                if !self.nodes[n].banned {
                    let region = self.regions[self.nodes[n].region].clone();
                    self.master.peer_up(n, &region);
                }
            }
            Msg::Locate(need) => {
                if self.nodes[n].banned {
                    return;
                }
                self.master.master_sent(now, self.origin_bytes);
                let (assignments, retry) = self.master.locate(now, n, &need);
                let at = self.now + self.lat_master(n);
                let epoch = self.nodes[n].epoch;
                self.push(at, Ev::Answer(n, epoch, assignments, retry));
            }
            Msg::Have(ranges) => {
                if !self.nodes[n].banned && self.nodes[n].online {
                    self.master.have(n, &ranges);
                }
            }
            Msg::Leave => self.master.peer_down(n),
            Msg::Report(peer, problem) => {
                let Some(&culprit) = self.by_peer.get(&peer) else {
                    return;
                };
                if self.nodes[n].banned {
                    return;
                }
                // The master's own rule for a report (shoal_master::bans::respond): how long
                // the reporter avoids the culprit, whether the culprit is gone, and what is
                // charged. (The simulated master does not check reports against its
                // assignments, nor drop claims on NotHeld: simulated reporters are honest
                // about what they were assigned, and no simulated holder lies about holdings
                // except `lie-have`, which the probe catches.)
                let response = respond(&problem, self.nodes[culprit].online);
                self.master
                    .avoid(n, culprit, response.avoid.map(|d| now + d));
                if response.drop_mirror {
                    self.master.peer_down(culprit);
                }
                let blocks = match &problem {
                    Problem::Corrupt { blocks }
                    | Problem::Truncated { blocks }
                    | Problem::NotHeld { blocks } => blocks.clone(),
                    Problem::Unreachable | Problem::Busy => Vec::new(),
                };
                let first = blocks.first().map_or(BlockRange::new(0, 1), |r| {
                    BlockRange::new(r.start, r.end.min(r.start.saturating_add(16)))
                });
                let reporter = self.nodes[n].peer;
                let verdict = match response.charge {
                    Charge::None => Verdict::Nothing,
                    Charge::Accusation => self.bans.accuse(now, reporter, peer, first),
                    Charge::Lie => self.bans.lied(now, reporter, peer, first),
                };
                self.act(verdict);
            }
        }
    }

    fn act(&mut self, verdict: Verdict) {
        match verdict {
            Verdict::Nothing => {}
            Verdict::Probe { suspect, blocks } => {
                let Some(&s) = self.by_peer.get(&suspect) else {
                    return;
                };
                let rtt = 2 * self.lat_between(None, s);
                let bytes = self.range_bytes(blocks) as f64;
                let mut t = rtt + ns(bytes / self.nodes[s].up_cap);
                if self.nodes[s].role == Role::Stall {
                    t += ns(self.sc.node.watchdog_s);
                }
                self.push(self.now + t, Ev::ProbeDone(s));
            }
            Verdict::Ban(peer) => {
                let Some(&s) = self.by_peer.get(&peer) else {
                    return;
                };
                self.master.ban(s);
                if !self.nodes[s].banned {
                    self.nodes[s].banned = true;
                    if self.nodes[s].online {
                        self.go_offline(s, false);
                    }
                    self.nodes[s].gone = true;
                    self.count_gone(s);
                }
            }
        }
    }

    /// A piece request reached its source and the first byte is back (or a refusal).
    fn open(&mut self, x: XferId) {
        let Some(xf) = self.xfers.get(&x) else {
            return;
        };
        let (dst, epoch, src, range) = (xf.dst, xf.epoch, xf.src, xf.range);
        if !self.nodes[dst].online || self.nodes[dst].epoch != epoch {
            self.free_xfer(x);
            return;
        }
        let watchdog = ns(self.sc.node.watchdog_s);
        let mut corrupt = false;
        match src {
            None => {
                if self.master_serving >= self.sc.master.upload_slots {
                    // The master drops the stream when its slots are full.
                    self.end_xfer(x, 0, Some(Failure::Unreachable));
                    return;
                }
            }
            Some(s) => {
                let node = &self.nodes[s];
                if !node.online || node.banned {
                    if node.crashed {
                        let at = self.now + watchdog;
                        self.push(at, Ev::Fail(x, 0, Failure::Unreachable));
                    } else {
                        self.end_xfer(x, 0, Some(Failure::Unreachable));
                    }
                    return;
                }
                match node.role {
                    Role::Stall => {
                        let at = self.now + watchdog;
                        self.push(at, Ev::Fail(x, 0, Failure::Unreachable));
                        return;
                    }
                    Role::LieHave => {
                        self.end_xfer(x, 0, Some(Failure::Refused(RefuseReason::NotHeld)));
                        return;
                    }
                    Role::Corrupt => corrupt = true,
                    Role::Honest | Role::FalseAccuse => {}
                }
                if node.serving >= node.slots {
                    self.end_xfer(x, 0, Some(Failure::Refused(RefuseReason::Busy)));
                    return;
                }
                let holds = node
                    .sched
                    .as_ref()
                    .is_some_and(|sc| sc.have().contains_range(range));
                if !holds {
                    self.end_xfer(x, 0, Some(Failure::Refused(RefuseReason::NotHeld)));
                    return;
                }
            }
        }
        // A corrupting source's first block fails verification: the transfer ends there.
        let bytes = if corrupt {
            self.range_bytes(BlockRange::new(range.start, range.start + 1))
        } else {
            self.range_bytes(range)
        };
        let up = src.map_or(self.master_up, |s| self.nodes[s].up);
        let down = self.nodes[dst].down;
        let flow = self
            .net
            .start(self.now, up, down, bytes as f64, &mut self.resched);
        if self.flow_xfer.len() <= flow {
            self.flow_xfer.resize(flow + 1, None);
        }
        self.flow_xfer[flow] = Some(x);
        match src {
            Some(s) => self.nodes[s].serving += 1,
            None => self.master_serving += 1,
        }
        if let Some(xf) = self.xfers.get_mut(&x) {
            xf.flow = Some(flow);
            xf.corrupt = corrupt;
        }
        self.flush_resched();
    }

    fn flow_done(&mut self, x: XferId) {
        let Some(xf) = self.xfers.get(&x) else {
            return;
        };
        let corrupt = xf.corrupt;
        let start = xf.range.start;
        let moved = self.abort_flow(x);
        let Some(xf) = self.xfers.get(&x) else {
            return;
        };
        let delivered = self.delivered(xf, moved);
        if corrupt {
            self.end_xfer(x, 0, Some(Failure::Corrupt { block: start }));
        } else {
            self.end_xfer(x, delivered, None);
        }
    }

    /// A transfer ended at its receiver: `delivered` blocks verified.
    fn end_xfer(&mut self, x: XferId, delivered: u32, failure: Option<Failure>) {
        let Some(xf) = self.xfers.get(&x) else {
            return;
        };
        let (dst, epoch, src, tid, range) = (xf.dst, xf.epoch, xf.src, xf.tid, xf.range);
        if xf.flow.is_some() {
            self.abort_flow(x);
        }
        self.free_xfer(x);
        if !self.nodes[dst].online || self.nodes[dst].epoch != epoch {
            return;
        }
        let got = BlockRange::new(range.start, range.start + delivered.min(range.len()));
        let bytes = self.range_bytes(got);
        let node = &mut self.nodes[dst];
        match src {
            None => {
                node.from_master += bytes;
                for b in got.iter() {
                    self.master_sent[b as usize] += 1;
                    if self.trace && self.master_sent[b as usize] > 1 {
                        eprintln!(
                            "t={:.3} RESENT block {b} to node {dst}",
                            self.now as f64 / NS
                        );
                    }
                }
            }
            Some(_) => node.from_peers += bytes,
        }
        if let Some(s) = src {
            if self.nodes[s].role == Role::Corrupt {
                // Every block is checked against its digest: none from a corrupter gets in.
                self.nodes[dst].bad_blocks += u64::from(got.len());
            }
        }
        let now = self.instant();
        let node = &mut self.nodes[dst];
        let ok = failure.is_none();
        if self.trace {
            eprintln!(
                "t={:.6} node {dst} xfer {range:?} from {src:?}: delivered {delivered} {failure:?}",
                self.now as f64 / NS
            );
        }
        if let Some(s) = node.sched.as_mut() {
            s.on_transfer_end(now, tid, delivered, failure);
        }
        if ok && node.role == Role::FalseAccuse {
            if let Some(s) = src {
                let peer = self.nodes[s].peer;
                let at = self.now + self.lat_master(dst);
                self.push(
                    at,
                    Ev::ToMaster(
                        dst,
                        Msg::Report(
                            peer,
                            Problem::Corrupt {
                                blocks: vec![range],
                            },
                        ),
                    ),
                );
            }
        }
        self.drive(dst);
    }

    fn outcome(&self) -> Outcome {
        let nodes = self
            .nodes
            .iter()
            .map(|n| NodeRecord {
                region: self.regions[n.region].clone(),
                role: n.role,
                upload: n.up_cap,
                download: n.down_cap,
                start_s: n.start.map_or(f64::NAN, |s| s as f64 / NS),
                finish_s: match (n.start, n.finish) {
                    (Some(_), Some(f)) => Some(f as f64 / NS),
                    _ => None,
                },
                from_master: n.from_master,
                from_peers: n.from_peers,
                uploaded: n.uploaded,
                retries: n.retries + n.sched.as_ref().map_or(0, |s| s.retries()),
                banned: n.banned,
                bad_blocks: n.bad_blocks,
            })
            .collect();
        Outcome {
            nodes,
            master_egress: self.net.series().to_vec(),
            origin_bytes: self.origin_bytes,
            peer_bytes_intra: self.peer_bytes_intra,
            peer_bytes: self.peer_bytes,
            virtual_s: self.now as f64 / NS,
            events: self.events,
            hit_limit: self.hit_limit,
            origin_resent_blocks: self
                .master_sent
                .iter()
                .map(|c| u64::from(c.saturating_sub(1)))
                .sum(),
        }
    }
}
