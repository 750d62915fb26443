//! The node's network shell: an [`EventLoop`] task that owns the swarm, and a cloneable
//! [`Client`] that sends it commands over a bounded channel, each with a oneshot reply.
//!
//! It also runs the piece server ([`shoal_net::serve`], the same as the master's) over a
//! [`PieceSource`] answering from the [`PieceStore`]s this node shares.
//!
//! Bounded state: the command channel holds 256 commands; every pending reply is keyed by an
//! outbound request id that libp2p ends with a response or a failure within the request
//! timeout (30 s), so the pending maps empty themselves, and each holds at most
//! [`MAX_PENDING_REQUESTS`]; the set of banned peers is capped at [`MAX_BANNED`] (oldest
//! forgotten first); a redirect hint adds at most `MAX_HINT_ADDRS` addresses (Kademlia's
//! routing table, provider store and the swarm's address cache are bounded by libp2p);
//! provider lookups in flight are capped at [`MAX_PROVIDER_QUERIES`], each ends within the
//! Kademlia query timeout and returns at most [`MAX_PROVIDERS`] peers; the piece server's
//! slots and refusals are capped; connections are capped by [`ConnectionCaps`].

use std::{
    collections::{HashMap, HashSet, VecDeque},
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use futures::StreamExt;
use libp2p::{
    core::transport::ListenerId, gossipsub, identify, kad, multiaddr::Protocol, ping,
    request_response, swarm::SwarmEvent, Multiaddr, PeerId, Swarm,
};
use shoal_net::{
    serve::{BlockReader, PieceServer, PieceSource, Serve, ServeConfig},
    swarm::{build_swarm, SwarmOptions},
    task::{spawn_critical, PanicWatch, TaskPanicked},
};
use shoal_protocol::{
    behaviour::{
        authority_acceptance, peer_of, provider_key, Advertise, Behaviour, BehaviourEvent,
        ConnectionCaps, Role,
    },
    limits::{KAD_PROTOCOL, MAX_HINT_ADDRS, MAX_RTT_SAMPLES},
    wire::{
        AuthorityEvent, DigestRequest, DigestResponse, MasterRequest, MasterResponse, PieceRequest,
        PublishRequest, RefuseReason, RttSample,
    },
    BlockRange, FileId,
};
use tokio::sync::{mpsc, oneshot};

use crate::chaos::ChaosMode;
use crate::nat::{relay_wanted, relay_wanted_now, RelayMode, RELAY_RETRY};
use crate::peers::{Guarded, PeerUse, DEFAULT_MAX_PEERS, GRACE};
use crate::store::PieceStore;

/// How a node runs.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Data directory: identity key and download journals.
    pub data_dir: PathBuf,
    /// The master's address, ending in `/p2p/<master PeerId>` (the trust anchor).
    pub bootstrap: Multiaddr,
    /// Where to listen for other nodes. Default `/ip4/0.0.0.0/tcp/0` and
    /// `/ip4/0.0.0.0/udp/0/quic-v1`.
    pub listen: Vec<Multiaddr>,
    /// Cap on piece upload, bytes per second. Default: none.
    pub max_upload_rate: Option<u64>,
    /// Piece streams served at once. Default 16.
    pub upload_slots: usize,
    /// Region label for nearby redirects. Default empty.
    pub region: String,
    /// Caps on connections. Default [`ConnectionCaps::for_role`]`(Role::Node)`.
    pub connection_caps: ConnectionCaps,
    /// Peers kept connected: over this, the least recently used idle ones are disconnected
    /// (see [`crate::peers`]). Default [`DEFAULT_MAX_PEERS`].
    pub max_peers: usize,
    /// Whether a panic in the node's event loop or piece server ends the process (exit code
    /// 101). Default false (a library must not exit its host); the `shoal` binary sets it.
    pub exit_on_panic: bool,
    /// Other peers to join the swarm through, besides the master, each ending in
    /// `/p2p/<PeerId>`: they are dialed at start and are Kademlia bootstrap peers, so a node
    /// whose master is unreachable can still find the holders of a file. Default none.
    pub peers: Vec<Multiaddr>,
    /// Whether [`start`] returns when the master does not answer (it is then greeted, and told
    /// what this node holds, when it comes back). Only useful with a manifest and a way into
    /// the swarm (`peers`). Default false: no master, no node.
    pub start_without_master: bool,
    /// The addresses other peers are told to dial this node at, instead of the ones it
    /// listens on (a port forward, a public address in front of it). Default none: the
    /// listen addresses.
    pub announce: Vec<Multiaddr>,
    /// When to listen through the master's relay. Default [`RelayMode::Auto`]: when
    /// AutoNAT finds this node unreachable.
    pub relay: RelayMode,
    /// Deliberate misbehaviour (settable only with the `chaos` feature).
    chaos: Option<ChaosMode>,
    /// Use a throw-away key instead of `data_dir/identity.key` (read-only commands).
    ephemeral_identity: bool,
}

impl NodeConfig {
    /// Defaults for joining the swarm at `bootstrap`.
    pub fn new(data_dir: impl Into<PathBuf>, bootstrap: Multiaddr) -> Self {
        Self {
            data_dir: data_dir.into(),
            bootstrap,
            listen: vec![
                "/ip4/0.0.0.0/tcp/0".parse().expect("valid multiaddr"),
                "/ip4/0.0.0.0/udp/0/quic-v1"
                    .parse()
                    .expect("valid multiaddr"),
            ],
            max_upload_rate: None,
            upload_slots: 16,
            region: String::new(),
            connection_caps: ConnectionCaps::for_role(Role::Node),
            max_peers: DEFAULT_MAX_PEERS,
            exit_on_panic: false,
            peers: Vec::new(),
            start_without_master: false,
            announce: Vec::new(),
            relay: RelayMode::default(),
            chaos: None,
            ephemeral_identity: false,
        }
    }

    /// With `true`, join under a throw-away key and write nothing to the data dir (for
    /// read-only commands such as `shoal status`).
    pub fn with_ephemeral_identity(mut self, yes: bool) -> Self {
        self.ephemeral_identity = yes;
        self
    }

    /// Listen on these addresses instead.
    pub fn with_listen(mut self, listen: Vec<Multiaddr>) -> Self {
        self.listen = listen;
        self
    }

    /// Cap piece upload.
    pub fn with_max_upload_rate(mut self, rate: Option<u64>) -> Self {
        self.max_upload_rate = rate;
        self
    }

    /// Serve this many piece streams at once (at least 1).
    pub fn with_upload_slots(mut self, slots: usize) -> Self {
        self.upload_slots = slots.max(1);
        self
    }

    /// End the process when the event loop panics (for binaries).
    pub fn with_exit_on_panic(mut self, exit: bool) -> Self {
        self.exit_on_panic = exit;
        self
    }

    /// Misbehave on purpose (tests only).
    #[cfg(feature = "chaos")]
    pub fn with_chaos(mut self, mode: Option<ChaosMode>) -> Self {
        self.chaos = mode;
        self
    }

    /// Cap connections so.
    pub fn with_connection_caps(mut self, caps: ConnectionCaps) -> Self {
        self.connection_caps = caps;
        self
    }

    /// Join the swarm through these peers too (each address ending in `/p2p/<PeerId>`).
    pub fn with_peers(mut self, peers: Vec<Multiaddr>) -> Self {
        self.peers = peers;
        self
    }

    /// Listen through the master's relay as `mode` says.
    pub fn with_relay(mut self, mode: RelayMode) -> Self {
        self.relay = mode;
        self
    }

    /// Tell other peers to dial this node at these addresses only.
    pub fn with_announce(mut self, announce: Vec<Multiaddr>) -> Self {
        self.announce = announce;
        self
    }

    /// With `true`, start even when the master does not answer.
    pub fn with_start_without_master(mut self, yes: bool) -> Self {
        self.start_without_master = yes;
        self
    }

    /// Set the region label.
    pub fn with_region(mut self, region: String) -> Self {
        self.region = region;
        self
    }

    /// Keep at most `n` peers connected (at least 1: the master).
    pub fn with_max_peers(mut self, n: usize) -> Self {
        self.max_peers = n.max(1);
        self
    }
}

/// Why a node operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The bootstrap address has no `/p2p/` part.
    #[error("bootstrap address {0} does not end in /p2p/<master PeerId>")]
    NoMasterId(Multiaddr),
    /// A `--peer` address has no `/p2p/` part.
    #[error("peer address {0} does not end in /p2p/<PeerId>")]
    NoPeerId(Multiaddr),
    /// A manifest given for a fetch is not the one it needs.
    #[error("manifest: {0}")]
    WrongManifest(String),
    /// Network setup or a request failed.
    #[error("network: {0}")]
    Network(String),
    /// A request found no way to its peer: the dial failed, or the connection closed before
    /// the answer. Said as [`NodeError::Network`] is; unlike its other causes (a peer that
    /// answers under another identity, or speaks none of the protocols), this may pass.
    #[error("network: {0}")]
    Unreachable(String),
    /// The master refused.
    #[error("master refused: {0}")]
    Refused(String),
    /// The master answered something unexpected.
    #[error("unexpected answer from the master")]
    Unexpected,
    /// The node has stopped.
    #[error("the node has stopped")]
    Stopped,
    /// Local storage failed.
    #[error("storage: {0}")]
    Store(#[from] crate::store::StoreError),
    /// Local I/O failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A manifest failed its checks.
    #[error("manifest: {0}")]
    Manifest(#[from] shoal_protocol::ManifestError),
    /// The data directory.
    #[error("data dir: {0}")]
    DataDir(String),
}

enum Command {
    Master(
        MasterRequest,
        oneshot::Sender<Result<MasterResponse, NodeError>>,
    ),
    Publish(
        PublishRequest,
        oneshot::Sender<Result<MasterResponse, NodeError>>,
    ),
    Digest(
        PeerId,
        DigestRequest,
        oneshot::Sender<Result<DigestResponse, NodeError>>,
    ),
    Hint(PeerId, Vec<Multiaddr>, oneshot::Sender<()>),
    FindPeer(PeerId, oneshot::Sender<bool>),
    MasterAway,
    FindProviders(FileId, oneshot::Sender<Vec<PeerId>>),
    GossipScore(PeerId, oneshot::Sender<Option<f64>>),
    KadServer(oneshot::Sender<bool>),
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Shutdown(oneshot::Sender<()>),
    /// Panics the event loop (tests of the panic path).
    #[cfg(test)]
    Panic,
}

/// Most banned peers a node remembers; past it the oldest ban is forgotten (the master still
/// refuses that peer, and re-broadcasts its bans when asked).
pub const MAX_BANNED: usize = 16_384;

/// The peers the master banned, as this node heard of them: capped at [`MAX_BANNED`].
#[derive(Debug, Default)]
pub struct BanList {
    set: HashSet<PeerId>,
    order: VecDeque<PeerId>,
}

impl BanList {
    /// Records a ban; forgets the oldest one when full.
    pub fn insert(&mut self, peer: PeerId) {
        if !self.set.insert(peer) {
            return;
        }
        self.order.push_back(peer);
        while self.order.len() > MAX_BANNED {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }

    /// Whether `peer` is banned.
    pub fn contains(&self, peer: &PeerId) -> bool {
        self.set.contains(peer)
    }

    /// Bans remembered.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// Whether no ban is remembered.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

type Bans = Arc<Mutex<BanList>>;

/// Authority-topic messages this node validated.
#[derive(Debug, Default)]
struct GossipCounts {
    accepted: AtomicU64,
    rejected: AtomicU64,
}

/// Peers looked up in Kademlia after they could not be reached at their known addresses.
#[derive(Debug, Default)]
struct LookupCounts {
    started: AtomicU64,
    reached: AtomicU64,
}

/// Files this node serves, shared with the piece server.
pub type Shelf = Arc<Mutex<HashMap<FileId, Arc<PieceStore>>>>;

/// A cloneable handle to a running node.
#[derive(Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    control: libp2p_stream::Control,
    shelf: Shelf,
    peer_id: PeerId,
    master: PeerId,
    uploaded: Arc<AtomicU64>,
    banned: Bans,
    gossip: Arc<GossipCounts>,
    lookups: Arc<LookupCounts>,
    data_dir: PathBuf,
    tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    panics: Vec<PanicWatch>,
    chaos: Option<ChaosMode>,
    peer_use: Arc<PeerUse>,
}

impl Client {
    /// This node's PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The master's PeerId.
    pub fn master(&self) -> PeerId {
        self.master
    }

    /// Marks a piece stream with `peer` open (for the peer budget) until the guard drops.
    pub(crate) fn in_use(&self, peer: PeerId) -> crate::peers::UseGuard {
        self.peer_use.guard(peer)
    }

    /// The data directory.
    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    /// Piece bytes this node has served.
    pub fn bytes_uploaded(&self) -> u64 {
        self.uploaded.load(Ordering::Relaxed)
    }

    /// Authority-topic messages this node accepted (the master's) and rejected (anyone
    /// else's, or not decodable), so far.
    pub fn authority_messages(&self) -> (u64, u64) {
        (
            self.gossip.accepted.load(Ordering::Relaxed),
            self.gossip.rejected.load(Ordering::Relaxed),
        )
    }

    /// Peers this node looked up in Kademlia because it could not reach them at their known
    /// (hinted) addresses, and how many of those it then reached.
    pub fn peer_lookups(&self) -> (u64, u64) {
        (
            self.lookups.started.load(Ordering::Relaxed),
            self.lookups.reached.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn count_lookup(&self, reached: bool) {
        let c = if reached {
            &self.lookups.reached
        } else {
            &self.lookups.started
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// This node's gossipsub score of `peer` (`None` if it is not connected).
    pub async fn gossip_score(&self, peer: PeerId) -> Option<f64> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::GossipScore(peer, tx))
            .await
            .ok()?;
        rx.await.ok().flatten()
    }

    /// Whether this node answers Kademlia queries now: only while the master is away (while
    /// it is connected, the master answers lookups and the node is a Kademlia client).
    pub async fn kad_server(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::KadServer(tx)).await.is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// The addresses this node listens on.
    pub async fn listen_addrs(&self) -> Vec<Multiaddr> {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::ListenAddrs(tx)).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Whether the master has banned `peer`.
    pub fn is_banned(&self, peer: &PeerId) -> bool {
        self.banned.lock().expect("ban lock").contains(peer)
    }

    /// Resolves if the node's event loop or piece server panicked (the node is then deaf;
    /// with [`NodeConfig::with_exit_on_panic`] the process has already ended). Never resolves
    /// otherwise.
    pub async fn panicked(&self) -> TaskPanicked {
        if self.panics.is_empty() {
            return std::future::pending().await;
        }
        let waits = self.panics.iter().map(|w| Box::pin(w.panicked()));
        futures::future::select_all(waits).await.0
    }

    /// Panics the event loop, to test what follows.
    #[cfg(test)]
    async fn panic_event_loop(&self) {
        let _ = self.commands.send(Command::Panic).await;
    }

    /// The misbehaviour this node was started with, if any.
    pub fn chaos(&self) -> Option<ChaosMode> {
        self.chaos
    }

    /// A stream control for opening piece streams.
    pub fn control(&self) -> libp2p_stream::Control {
        self.control.clone()
    }

    /// Sends `req` to the master and waits for its answer.
    pub async fn master_request(&self, req: MasterRequest) -> Result<MasterResponse, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Master(req, tx))
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)?
    }

    /// Announces a file to the master on the publish protocol and waits for its answer.
    pub async fn publish_request(&self, req: PublishRequest) -> Result<MasterResponse, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Publish(req, tx))
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)?
    }

    /// Asks `peer` for manifest parts.
    pub async fn digest_request(
        &self,
        peer: PeerId,
        req: DigestRequest,
    ) -> Result<DigestResponse, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Digest(peer, req, tx))
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)?
    }

    /// Makes the hinted addresses of `peer` known to the swarm before dialing it.
    pub async fn hint(&self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let (tx, rx) = oneshot::channel();
        // Wait for the ack: the stream dial that follows must find the addresses.
        if self
            .commands
            .send(Command::Hint(peer, addrs, tx))
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
    }

    /// Looks `peer` up in Kademlia (after its hinted addresses failed): the addresses the
    /// lookup finds are added to the swarm. True when it found the peer (or is connected to
    /// it: a peer that is a Kademlia client does not answer the lookup, but the lookup's dial
    /// to the addresses the master gave for it connects). Ends within the Kademlia query
    /// timeout.
    pub async fn find_peer(&self, peer: PeerId) -> bool {
        let (tx, rx) = oneshot::channel();
        if self
            .commands
            .send(Command::FindPeer(peer, tx))
            .await
            .is_err()
        {
            return false;
        }
        let wait = shoal_protocol::behaviour::KAD_QUERY_TIMEOUT + Duration::from_secs(2);
        matches!(tokio::time::timeout(wait, rx).await, Ok(Ok(true)))
    }

    /// Serves `store` to other nodes from now on. While the master does not answer, the node
    /// announces itself on Kademlia as a provider of the file within [`PROVIDE_INTERVAL`]
    /// (while it answers, the master tells others where the file is).
    pub fn share(&self, store: Arc<PieceStore>) {
        self.shelf
            .lock()
            .expect("shelf lock")
            .insert(store.manifest().id(), store);
    }

    /// The peers that announced themselves on Kademlia as holders of `file` (this node left
    /// out): at most [`MAX_PROVIDERS`], found within the Kademlia query timeout. Works
    /// without the master as long as other nodes are reachable.
    pub async fn find_providers(&self, file: FileId) -> Result<Vec<PeerId>, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::FindProviders(file, tx))
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// Stops the node at once, as a crash would: no Leave, connections simply drop.
    pub fn kill(&self) {
        for t in self.tasks.lock().expect("task lock").drain(..) {
            t.abort();
        }
    }

    /// Tells the master this node leaves, then stops the node. (Dropping every clone of the
    /// client stops the node too, without the goodbye.)
    pub async fn shutdown(&self) {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.master_request(MasterRequest::Leave),
        )
        .await;
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Starts a node: builds the swarm, listens, connects to the master, says hello. Returns a
/// client once the master answered.
pub async fn start(cfg: NodeConfig) -> Result<Client, NodeError> {
    let master =
        peer_of(&cfg.bootstrap).ok_or_else(|| NodeError::NoMasterId(cfg.bootstrap.clone()))?;
    let key = if cfg.ephemeral_identity {
        libp2p::identity::Keypair::generate_ed25519()
    } else {
        load_or_create_key(&cfg.data_dir.join("identity.key"))?
    };
    let peer_id = key.public().to_peer_id();
    let net = |e: &dyn std::fmt::Display| NodeError::Network(e.to_string());
    let mut swarm = build_swarm(
        key,
        &SwarmOptions::for_role(Role::Node)
            .with_caps(cfg.connection_caps.clone())
            .with_advertise(if cfg.announce.is_empty() {
                Advertise::Listening
            } else {
                Advertise::ExternalOnly
            }),
    )
    .map_err(|e| net(&e))?;
    for a in &cfg.announce {
        swarm.add_external_address(a.clone());
    }
    for a in &cfg.listen {
        swarm.listen_on(a.clone()).map_err(|e| {
            net(&format!(
                "cannot listen on {a}: {}",
                shoal_net::cli::error_chain(&e)
            ))
        })?;
    }
    let _ = swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(&Behaviour::authority_topic());
    let master_addr = without_p2p(&cfg.bootstrap);
    // A read-only command serves nothing: it needs no relay.
    let relay_mode = if cfg.ephemeral_identity {
        RelayMode::Never
    } else {
        cfg.relay
    };
    if relay_mode == RelayMode::Auto {
        // The master is this node's only AutoNAT server.
        swarm
            .behaviour_mut()
            .autonat
            .add_server(master, Some(master_addr.clone()));
    }
    swarm.add_peer_address(master, master_addr.clone());
    swarm.behaviour_mut().kad.add_address(&master, master_addr);
    swarm.dial(cfg.bootstrap.clone()).map_err(|e| net(&e))?;
    let mut bootstrap_peers = HashSet::from([master]);
    for p in &cfg.peers {
        let id = peer_of(p).ok_or_else(|| NodeError::NoPeerId(p.clone()))?;
        let addr = without_p2p(p);
        swarm.add_peer_address(id, addr.clone());
        swarm.behaviour_mut().kad.add_address(&id, addr);
        if let Err(e) = swarm.dial(p.clone()) {
            tracing::warn!(peer = %p, error = %e, "cannot dial peer");
        }
        bootstrap_peers.insert(id);
    }

    let control = swarm.behaviour().stream.new_control();
    let shelf: Shelf = Arc::default();
    let uploaded = Arc::new(AtomicU64::new(0));
    let banned: Bans = Arc::default();
    let gossip: Arc<GossipCounts> = Arc::default();
    let incoming = swarm
        .behaviour_mut()
        .pieces
        .take_incoming()
        .ok_or_else(|| net(&"the piece stream queue was taken"))?;
    let server = PieceServer::new(
        Arc::new(NodeSource {
            shelf: shelf.clone(),
            uploaded: uploaded.clone(),
            banned: banned.clone(),
            master,
            chaos: cfg.chaos,
        }),
        ServeConfig::default()
            .with_upload_slots(cfg.upload_slots)
            .with_max_upload_rate(cfg.max_upload_rate),
    );
    let peer_use: Arc<PeerUse> = Arc::default();
    let guarded = peer_use.clone();
    let incoming = incoming.map(move |(peer, s)| (peer, Guarded::new(s, guarded.guard(peer))));
    let server = spawn_critical("node piece server", server.run(incoming));

    let (tx, rx) = mpsc::channel(256);
    let lp = EventLoop {
        swarm,
        master,
        pending_master: HashMap::new(),
        pending_digest: HashMap::new(),
        pending_publish: HashMap::new(),
        shelf: shelf.clone(),
        banned: banned.clone(),
        gossip: gossip.clone(),
        region: cfg.region.clone(),
        greet_on_connect: false,
        bootstrap_peers,
        kad_server: false,
        provided: HashSet::new(),
        peer_queries: HashMap::new(),
        provider_queries: HashMap::new(),
        rtts: HashMap::new(),
        relay_mode,
        relay_addr: cfg.bootstrap.clone().with(Protocol::P2pCircuit),
        relay_listener: None,
        peer_use: peer_use.clone(),
        max_peers: cfg.max_peers.max(1),
    };
    let event_loop = spawn_critical("node event loop", lp.run(rx));
    let panics = vec![event_loop.watch(), server.watch()];
    if cfg.exit_on_panic {
        for w in &panics {
            drop(shoal_net::task::exit_on_panic(w.clone()));
        }
    }
    let client = Client {
        commands: tx,
        control,
        shelf,
        peer_id,
        master,
        uploaded,
        banned,
        gossip,
        lookups: Arc::default(),
        data_dir: cfg.data_dir.clone(),
        tasks: Arc::new(Mutex::new(vec![
            server.abort_handle(),
            event_loop.abort_handle(),
        ])),
        panics,
        chaos: cfg.chaos,
        peer_use,
    };
    // The first request doubles as the connection check.
    let why = match tokio::time::timeout(MASTER_HELLO_TIMEOUT, hello(&client, &cfg.region)).await {
        Ok(Ok(())) => return Ok(client),
        Ok(Err(e)) => format!("cannot reach the master at {}: {e}", cfg.bootstrap),
        Err(_) => format!(
            "no answer from the master at {} within {} s",
            cfg.bootstrap,
            MASTER_HELLO_TIMEOUT.as_secs()
        ),
    };
    if !cfg.start_without_master {
        return Err(NodeError::Network(why));
    }
    tracing::warn!(
        peers = cfg.peers.len(),
        "{why}; starting without it (it is greeted when it comes back)"
    );
    let _ = client.commands.send(Command::MasterAway).await;
    Ok(client)
}

/// How long [`start`] waits for the master's answer to its hello, tries again included.
pub const MASTER_HELLO_TIMEOUT: Duration = Duration::from_secs(15);

/// How long [`start`] keeps saying hello while the connection to the master fails (a refused
/// or failed dial, a closed connection), before it reports that it cannot reach the master.
pub const HELLO_RETRY_WINDOW: Duration = Duration::from_secs(5);

/// The first wait before [`start`] says hello again after the connection failed; it doubles
/// up to [`HELLO_RETRY_MAX`], each wait lengthened by up to half of itself at random.
pub const HELLO_RETRY_FIRST: Duration = Duration::from_millis(250);

/// The longest wait between two hellos.
pub const HELLO_RETRY_MAX: Duration = Duration::from_secs(2);

/// Says hello to the master until it answers (or refuses). A failed connection
/// ([`NodeError::Unreachable`]) is tried again for [`HELLO_RETRY_WINDOW`], after growing,
/// jittered waits: a master that is restarting, or whose cap on connections in their handshake
/// (64 by default) is full because many nodes join at once, refuses a dial that a moment later
/// it takes. A master that stays down is reported after the window; any other failure (an
/// address that answers under another identity, say) at once. The caller bounds the whole by
/// [`MASTER_HELLO_TIMEOUT`].
async fn hello(client: &Client, region: &str) -> Result<(), NodeError> {
    let deadline = tokio::time::Instant::now() + HELLO_RETRY_WINDOW;
    let mut wait = HELLO_RETRY_FIRST;
    loop {
        let req = MasterRequest::Hello {
            region: region.to_string(),
        };
        match client.master_request(req).await {
            Ok(_) => return Ok(()),
            Err(NodeError::Unreachable(e)) if tokio::time::Instant::now() < deadline => {
                // Jittered, so that nodes refused together do not come back together; the
                // last wait ends at the window's end.
                let extra = wait.mul_f64(rand::random::<f64>() / 2.0);
                let until = (tokio::time::Instant::now() + wait + extra).min(deadline);
                tracing::debug!(error = %e, ?until, "hello failed");
                tokio::time::sleep_until(until).await;
                wait = (wait * 2).min(HELLO_RETRY_MAX);
            }
            Err(e) => return Err(e),
        }
    }
}

/// How often a node that is not connected to the master dials it again. Requests dial it too;
/// this brings back an idle node (one that only serves), so that the master hears what it
/// holds soon after it returns.
pub const MASTER_REDIAL: Duration = Duration::from_secs(2);

/// Most peer lookups in flight at once (one more is answered "not found" at once).
pub const MAX_PEER_QUERIES: usize = 64;

/// Most waiters on one peer lookup (one more is answered "not found" at once).
pub const MAX_PEER_WAITERS: usize = 32;

/// `addr` without its `/p2p/` part.
fn without_p2p(addr: &Multiaddr) -> Multiaddr {
    addr.iter()
        .filter(|p| !matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
        .collect()
}

/// Loads the keypair at `path`, creating it on first use (mode 0600, written durably). A
/// file that holds no valid key is an error, never silently replaced.
pub fn load_or_create_key(path: &std::path::Path) -> Result<libp2p::identity::Keypair, NodeError> {
    shoal_net::load_or_create_key(path).map_err(|e| NodeError::DataDir(e.to_string()))
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    master: PeerId,
    pending_master: Pending<MasterResponse>,
    pending_digest: Pending<DigestResponse>,
    pending_publish: Pending<MasterResponse>,
    shelf: Shelf,
    banned: Bans,
    gossip: Arc<GossipCounts>,
    region: String,
    /// Whether the next connection to the master must say hello again and re-announce what
    /// this node holds: once a connection existed, or when the node started without it.
    greet_on_connect: bool,
    /// The master and the `--peer`s: a Kademlia server bootstraps again when one of them
    /// connects.
    bootstrap_peers: HashSet<PeerId>,
    /// Whether this node answers Kademlia queries: only while the master does not answer
    /// (see [`EventLoop::set_kad_server`]).
    kad_server: bool,
    /// Peer lookups in flight: the peer looked for, and who waits for the answer.
    /// Several waiters for one peer share one query (at most [`MAX_PEER_WAITERS`] each).
    peer_queries: HashMap<kad::QueryId, (PeerId, Vec<oneshot::Sender<bool>>)>,
    /// Files this node announced itself on Kademlia as a provider of.
    provided: HashSet<FileId>,
    /// Provider lookups in flight: who waits, and the providers found so far.
    provider_queries: HashMap<kad::QueryId, (oneshot::Sender<Vec<PeerId>>, HashSet<PeerId>)>,
    /// The latest ping RTT to each peer (not the master) since the last report to the master.
    rtts: HashMap<PeerId, Duration>,
    /// When to listen through the master's relay.
    relay_mode: RelayMode,
    /// `<bootstrap address>/p2p-circuit`: where to listen through the master's relay.
    relay_addr: Multiaddr,
    /// The listener through the master's relay, while there is one.
    relay_listener: Option<ListenerId>,
    /// Which peers are in use, for the peer budget.
    peer_use: Arc<PeerUse>,
    /// Peers kept connected (see [`crate::peers`]).
    max_peers: usize,
}

/// How often the node reports the RTTs libp2p ping measured to its peers to the master (for
/// its network coordinates; the master takes one report per peer every 2 s at most).
pub const RTT_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// Most peers whose RTT waits for the next report; pings from others are dropped until then.
pub const MAX_RTT_PEERS: usize = 256;

/// How often the node checks for files it shares but does not yet announce on Kademlia.
pub const PROVIDE_INTERVAL: Duration = Duration::from_secs(1);

/// Most providers one lookup returns.
pub const MAX_PROVIDERS: usize = 32;

/// Most provider lookups in flight at once (one more is answered with no providers).
pub const MAX_PROVIDER_QUERIES: usize = 64;

impl EventLoop {
    /// The master came back (it restarted, or the connection was lost): say hello again and
    /// re-announce every block this node holds, so its ownership table is whole again.
    fn reannounce(&mut self) {
        let b = self.swarm.behaviour_mut();
        b.master.send_request(
            &self.master,
            MasterRequest::Hello {
                region: self.region.clone(),
            },
        );
        let stores: Vec<_> = self
            .shelf
            .lock()
            .expect("shelf lock")
            .values()
            .cloned()
            .collect();
        for store in stores {
            let ranges = store.have().ranges();
            if ranges.is_empty() {
                continue;
            }
            for chunk in ranges.chunks(shoal_protocol::limits::MAX_RANGES_PER_MESSAGE) {
                self.swarm.behaviour_mut().master.send_request(
                    &self.master,
                    MasterRequest::Have {
                        file: store.manifest().id(),
                        ranges: chunk.to_vec(),
                        peer_bytes: 0,
                    },
                );
            }
        }
        tracing::info!("master reconnected; re-announced held blocks");
    }

    /// Starts (`true`) or stops listening through the master's relay; a no-op when already so.
    fn listen_through_relay(&mut self, on: bool) {
        match (on, self.relay_listener) {
            (true, None) => match self.swarm.listen_on(self.relay_addr.clone()) {
                Ok(id) => {
                    tracing::info!(relay = %self.relay_addr, "listening through the master's relay");
                    self.relay_listener = Some(id);
                }
                Err(e) => tracing::warn!(error = %e, "cannot listen through the master's relay"),
            },
            (false, Some(id)) => {
                tracing::info!("reachable directly; no longer listening through the relay");
                self.swarm.remove_listener(id);
                self.relay_listener = None;
            }
            _ => {}
        }
    }

    /// Listens through the relay again if it should and does not (a lost or refused
    /// reservation), while the master is connected.
    fn retry_relay(&mut self) {
        let status = self.swarm.behaviour().autonat.nat_status();
        if self.relay_listener.is_none()
            && relay_wanted_now(self.relay_mode, &status)
            && self.swarm.is_connected(&self.master)
        {
            self.listen_through_relay(true);
        }
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut provide = tokio::time::interval(PROVIDE_INTERVAL);
        let mut redial = tokio::time::interval(MASTER_REDIAL);
        redial.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rtt_report = tokio::time::interval(RTT_REPORT_INTERVAL);
        let mut relay_retry = tokio::time::interval(RELAY_RETRY);
        relay_retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Peers spared by the grace period are let go on a later tick.
        let mut budget = tokio::time::interval(GRACE / 2);
        budget.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_event(event),
                cmd = commands.recv() => match cmd {
                    Some(Command::Shutdown(tx)) => {
                        self.stop_providing();
                        let _ = tx.send(());
                        return;
                    }
                    Some(cmd) => self.on_command(cmd),
                    None => return,
                },
                _ = provide.tick() => self.provide_shelf(),
                _ = redial.tick() => self.redial_master(),
                _ = rtt_report.tick() => self.report_rtts(),
                _ = relay_retry.tick() => self.retry_relay(),
                _ = budget.tick() => self.enforce_peer_budget(),
            }
        }
    }

    /// Disconnects the least recently used idle peers while more than `max_peers` are
    /// connected (see [`crate::peers`]).
    fn enforce_peer_budget(&mut self) {
        for peer in self.peer_use.over_budget(self.max_peers, &self.master) {
            tracing::debug!(%peer, "over the peer budget: disconnecting an idle peer");
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    /// Sends the master up to [`MAX_RTT_SAMPLES`] of the RTTs measured since the last report
    /// (the rest wait for the next one). The answer is not waited for.
    fn report_rtts(&mut self) {
        let peers: Vec<PeerId> = self.rtts.keys().take(MAX_RTT_SAMPLES).copied().collect();
        if peers.is_empty() {
            return;
        }
        let samples = peers
            .into_iter()
            .filter_map(|peer| {
                let rtt = self.rtts.remove(&peer)?;
                Some(RttSample {
                    peer,
                    rtt_us: u32::try_from(rtt.as_micros()).unwrap_or(u32::MAX),
                })
            })
            .collect();
        self.swarm
            .behaviour_mut()
            .master
            .send_request(&self.master, MasterRequest::Rtt { samples });
    }

    /// Announces this node on Kademlia as a provider of every shared file not yet announced
    /// (one record per file; libp2p refreshes it every [`PROVIDER_REFRESH`]).
    ///
    /// [`PROVIDER_REFRESH`]: shoal_protocol::behaviour::PROVIDER_REFRESH
    fn provide_shelf(&mut self) {
        if !self.kad_server {
            // Announced when the master goes away (`set_kad_server`): until then nobody
            // looks providers up.
            return;
        }
        let files: Vec<FileId> = self
            .shelf
            .lock()
            .expect("shelf lock")
            .keys()
            .filter(|f| !self.provided.contains(f))
            .copied()
            .collect();
        for file in files {
            match self
                .swarm
                .behaviour_mut()
                .kad
                .start_providing(provider_key(&file))
            {
                Ok(_) => {
                    tracing::debug!(%file, "providing on Kademlia");
                    self.provided.insert(file);
                }
                // The store is full (1,024 keys): the file is still served and located
                // through the master, only not findable without it.
                Err(e) => tracing::debug!(%file, error = %e, "cannot provide"),
            }
        }
    }

    /// Kademlia: a client while the master answers, a server while it does not. While the
    /// master answers, it finds every holder and answers lookups by PeerId itself, and a crowd
    /// of nodes answering each other's bootstrap queries costs CPU the transfers need. Without
    /// the master the swarm needs the DHT: turning server, the node joins it and announces its
    /// files again (at once, and again at each provide tick until an announce reached a peer),
    /// so that providers are found wherever the others look. The node turns server when a
    /// request to the master fails (no connection, a timeout), when a dial to the master fails
    /// while it has no connection to it, and when it started without the master; it turns
    /// client when the master answers a request (the hello a reconnection sends included).
    fn set_kad_server(&mut self, server: bool) {
        if server == self.kad_server {
            return;
        }
        self.kad_server = server;
        let kad = &mut self.swarm.behaviour_mut().kad;
        if !server {
            tracing::debug!("the master answers: Kademlia client");
            kad.set_mode(Some(kad::Mode::Client));
            return;
        }
        tracing::info!(
            "the master does not answer: answering Kademlia queries and announcing held files"
        );
        kad.set_mode(Some(kad::Mode::Server));
        if let Err(e) = kad.bootstrap() {
            tracing::debug!(error = %e, "Kademlia bootstrap");
        }
        self.provided.clear();
        self.provide_shelf();
    }

    /// Dials the master when a connection existed (or the node started without it) and is
    /// gone. At most one dial at a time (`DisconnectedAndNotDialing`).
    fn redial_master(&mut self) {
        if self.greet_on_connect && !self.swarm.is_connected(&self.master) {
            let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(self.master).build();
            if let Err(e) = self.swarm.dial(opts) {
                tracing::trace!(error = %e, "master redial");
            }
        }
    }

    /// Withdraws this node's provider records (on leave). Copies that other peers hold expire
    /// within [`PROVIDER_TTL`](shoal_protocol::behaviour::PROVIDER_TTL).
    fn stop_providing(&mut self) {
        for file in self.provided.drain() {
            self.swarm
                .behaviour_mut()
                .kad
                .stop_providing(&provider_key(&file));
        }
    }

    fn on_kad(&mut self, event: kad::Event) {
        let kad::Event::OutboundQueryProgressed {
            id,
            result,
            step,
            stats,
        } = event
        else {
            return;
        };
        let done = match result {
            kad::QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders {
                providers,
                ..
            })) => {
                let me = *self.swarm.local_peer_id();
                if let Some((_, found)) = self.provider_queries.get_mut(&id) {
                    for p in providers {
                        if p != me && found.len() < MAX_PROVIDERS {
                            found.insert(p);
                        }
                    }
                    found.len() >= MAX_PROVIDERS
                } else {
                    false
                }
            }
            kad::QueryResult::GetProviders(_) => true,
            kad::QueryResult::GetClosestPeers(r) => {
                let peers = match r {
                    Ok(ok) => ok.peers,
                    Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                };
                self.on_peer_found(id, peers);
                false
            }
            kad::QueryResult::StartProviding(Ok(kad::AddProviderOk { key }))
                if stats.num_successes() == 0 =>
            {
                // libp2p calls an announce that reached nobody a success (a node that just
                // turned server may know no other server yet): try again at the next tick.
                tracing::debug!("provider announce reached no peer; will retry");
                self.provided.retain(|f| provider_key(f) != key);
                false
            }
            kad::QueryResult::StartProviding(Err(e)) => {
                // The local record stands, but the network may not have heard: announce again
                // at the next provide tick rather than at the next refresh (30 min).
                tracing::debug!(error = ?e, "provider announce incomplete; will retry");
                let key = e.key();
                self.provided.retain(|f| provider_key(f) != *key);
                false
            }
            _ => false,
        };
        if done || step.last {
            if let Some((tx, found)) = self.provider_queries.remove(&id) {
                if let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                    q.finish();
                }
                let _ = tx.send(found.into_iter().collect());
            }
        }
    }

    /// A peer lookup ended: the addresses found for the peer looked for are added to the
    /// swarm (capped, unspecified ones dropped), and whoever waits is told whether it was found.
    fn on_peer_found(&mut self, id: kad::QueryId, peers: Vec<kad::PeerInfo>) {
        let Some((target, waiters)) = self.peer_queries.remove(&id) else {
            return;
        };
        let mut found = self.swarm.is_connected(&target);
        for info in peers.into_iter().filter(|p| p.peer_id == target) {
            for a in info
                .addrs
                .into_iter()
                .filter(|a| !is_unspecified(a))
                .take(MAX_HINT_ADDRS)
            {
                self.swarm.add_peer_address(target, a);
                found = true;
            }
        }
        tracing::debug!(peer = %target, found, waiters = waiters.len(), "peer lookup ended");
        for tx in waiters {
            let _ = tx.send(found);
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Master(req, tx) => {
                if let Some(tx) = refuse_if_full(&self.pending_master, tx) {
                    let id = self
                        .swarm
                        .behaviour_mut()
                        .master
                        .send_request(&self.master, req);
                    self.pending_master.insert(id, tx);
                }
            }
            Command::Publish(req, tx) => {
                if let Some(tx) = refuse_if_full(&self.pending_publish, tx) {
                    let id = self
                        .swarm
                        .behaviour_mut()
                        .publish
                        .send_request(&self.master, req);
                    self.pending_publish.insert(id, tx);
                }
            }
            Command::Digest(peer, req, tx) => {
                if let Some(tx) = refuse_if_full(&self.pending_digest, tx) {
                    let id = self.swarm.behaviour_mut().digest.send_request(&peer, req);
                    self.pending_digest.insert(id, tx);
                }
            }
            Command::Hint(peer, addrs, ack) => {
                // For the swarm's dials only, not for Kademlia's routing table: a hint is
                // unverified, and Kademlia keeps a peer's last address even after it failed,
                // so a wrong hint there would be dialed again by the very lookup meant to
                // replace it (and be handed on to other peers).
                for a in addrs.into_iter().take(MAX_HINT_ADDRS) {
                    self.swarm.add_peer_address(peer, a);
                }
                let _ = ack.send(());
            }
            Command::FindPeer(peer, tx) => {
                // Transfers to one peer fail together when its hint is wrong: one lookup
                // answers them all.
                if let Some((_, waiters)) = self.peer_queries.values_mut().find(|(p, _)| *p == peer)
                {
                    if waiters.len() < MAX_PEER_WAITERS {
                        waiters.push(tx);
                    } else {
                        let _ = tx.send(self.swarm.is_connected(&peer));
                    }
                    return;
                }
                if self.peer_queries.len() >= MAX_PEER_QUERIES {
                    let _ = tx.send(self.swarm.is_connected(&peer));
                    return;
                }
                let id = self.swarm.behaviour_mut().kad.get_closest_peers(peer);
                self.peer_queries.insert(id, (peer, vec![tx]));
            }
            Command::MasterAway => {
                self.greet_on_connect = true;
                self.set_kad_server(true);
            }
            Command::FindProviders(file, tx) => {
                if self.provider_queries.len() >= MAX_PROVIDER_QUERIES {
                    let _ = tx.send(Vec::new());
                    return;
                }
                let id = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_providers(provider_key(&file));
                self.provider_queries.insert(id, (tx, HashSet::new()));
            }
            Command::KadServer(tx) => {
                let _ = tx.send(self.kad_server);
            }
            Command::GossipScore(peer, tx) => {
                let _ = tx.send(self.swarm.behaviour().gossipsub.peer_score(&peer));
            }
            Command::ListenAddrs(tx) => {
                let _ = tx.send(self.swarm.listeners().cloned().collect());
            }
            Command::Shutdown(_) => {}
            #[cfg(test)]
            Command::Panic => panic!("event loop panic requested by a test"),
        }
    }

    fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Master(ev)) => {
                // Whether the master answers decides the node's Kademlia mode.
                match &ev {
                    request_response::Event::Message {
                        message: request_response::Message::Response { .. },
                        ..
                    } => self.set_kad_server(false),
                    request_response::Event::OutboundFailure { .. } => self.set_kad_server(true),
                    _ => {}
                }
                // The node serves no master requests; only answers to its own matter.
                let _ = settle(&mut self.pending_master, ev);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Publish(ev)) => {
                let _ = settle(&mut self.pending_publish, ev);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Digest(ev)) => {
                if let Some((request, channel)) = settle(&mut self.pending_digest, ev) {
                    let resp = answer_digest(&self.shelf, request);
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .digest
                        .send_response(channel, resp);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            })) => {
                // Strict validation checked the signature; only the master's word counts, and
                // nothing else is relayed (gossipsub waits for this verdict before it
                // forwards, and a rejection costs the sender score).
                let (acceptance, event) = authority_acceptance(&self.master, &message);
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, acceptance);
                let Some(event) = event else {
                    self.gossip.rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(source = ?message.source, from = %propagation_source, "authority message rejected");
                    return;
                };
                self.gossip.accepted.fetch_add(1, Ordering::Relaxed);
                match event {
                    AuthorityEvent::PeerBanned { peer } => {
                        tracing::info!(%peer, "peer banned by the master");
                        self.banned.lock().expect("ban lock").insert(peer);
                        let _ = self.swarm.disconnect_peer_id(peer);
                    }
                    event => tracing::debug!(?event, "authority event"),
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                if peer_id == self.master {
                    tracing::debug!(observed = %info.observed_addr, "master sees us");
                }
                // Identify feeds Kademlia: the addresses a peer says it listens on (capped,
                // unspecified ones dropped) make it findable when the master is not there.
                if info.protocols.contains(&KAD_PROTOCOL) {
                    let addrs: Vec<Multiaddr> = info
                        .listen_addrs
                        .into_iter()
                        .filter(|a| !is_unspecified(a))
                        .take(MAX_HINT_ADDRS)
                        .collect();
                    self.swarm.behaviour_mut().feed_kad(&peer_id, &addrs);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(event)) => self.on_kad(event),
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            })) if peer != self.master => {
                // The master measures its own RTT to us; these are for the peers it cannot.
                if self.rtts.len() < MAX_RTT_PEERS || self.rtts.contains_key(&peer) {
                    self.rtts.insert(peer, rtt);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.rtts.remove(&peer_id);
                self.peer_use.disconnected(&peer_id);
                // Not a reason to turn Kademlia server by itself: an idle connection to the
                // master closes after the idle timeout and is dialed again at once.
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                num_established,
                ..
            } => {
                if self.banned.lock().expect("ban lock").contains(&peer_id) {
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                if num_established.get() > 1 {
                    return;
                }
                self.peer_use.connected(peer_id);
                self.enforce_peer_budget();
                if peer_id == self.master {
                    if self.greet_on_connect {
                        self.reannounce();
                    }
                    self.greet_on_connect = true;
                    // Reserve on its relay now if wanted (`--relay always`, or still found
                    // unreachable after a reconnect) rather than at the next retry tick.
                    self.retry_relay();
                }
                if self.kad_server
                    && peer_id != self.master
                    && self.bootstrap_peers.contains(&peer_id)
                {
                    // A server without the master joins the DHT through the --peers (it
                    // bootstrapped when it turned server, but they may not have answered yet).
                    // Not through the master coming back: its answer to the hello this
                    // connection sends turns the node client again.
                    if let Err(e) = self.swarm.behaviour_mut().kad.bootstrap() {
                        tracing::debug!(error = %e, "Kademlia bootstrap");
                    }
                }
            }
            SwarmEvent::NewListenAddr { address, .. } => tracing::debug!(%address, "listening"),
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } if Some(listener_id) == self.relay_listener => {
                // The reservation was lost or refused (the master restarted, runs no relay,
                // or is at its cap): tried again every RELAY_RETRY while still wanted.
                tracing::info!(?reason, "listener through the relay closed");
                self.relay_listener = None;
            }
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(
                libp2p::autonat::Event::StatusChanged { old, new },
            )) => {
                tracing::info!(?old, ?new, "reachability (AutoNAT)");
                if let Some(on) = relay_wanted(self.relay_mode, &new) {
                    self.listen_through_relay(on);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(libp2p::dcutr::Event {
                remote_peer_id,
                result,
            })) => match result {
                Ok(connection) => {
                    // The relayed connection stays until it is idle or the relay's caps end it:
                    // closing it at once cuts the pieces streaming over it (they fail as
                    // "unreachable" and the peer is avoided). New streams pick either.
                    tracing::info!(peer = %remote_peer_id, ?connection, "hole punched: direct connection")
                }
                Err(error) => {
                    tracing::info!(peer = %remote_peer_id, %error, "hole punching failed; staying relayed")
                }
            },
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(
                libp2p::relay::client::Event::ReservationReqAccepted { renewal, .. },
            )) => {
                if !renewal {
                    tracing::info!(
                        "reservation on the master's relay accepted: reachable through it"
                    );
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(event)) => {
                tracing::debug!(?event, "relay client")
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error: libp2p::swarm::DialError::WrongPeerId { obtained, address },
                ..
            } if peer == self.master => {
                // Say what happened instead of a bare "failed to dial": something answered,
                // under another identity (a stale address, or another master's).
                let why = format!(
                    "{} answered as {obtained}, not as the master {peer} named by the bootstrap \
                     address (a stale or wrong address? the master prints its addresses when it \
                     starts and writes them to bootstrap.addr in its data dir)",
                    address
                );
                tracing::warn!("{why}");
                for (_, tx) in self.pending_master.drain() {
                    let _ = tx.send(Err(NodeError::Network(why.clone())));
                }
                if !self.swarm.is_connected(&peer) {
                    self.set_kad_server(true);
                }
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                ..
            } if peer == self.master && !self.swarm.is_connected(&peer) => {
                self.set_kad_server(true);
            }
            other => tracing::trace!(?other, "swarm event"),
        }
    }
}

/// Whether `addr` has an unspecified IP (0.0.0.0 or ::): not dialable.
fn is_unspecified(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        libp2p::multiaddr::Protocol::Ip4(ip) => ip.is_unspecified(),
        libp2p::multiaddr::Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}

/// Pending replies to outbound requests, by request id.
type Pending<T> =
    HashMap<request_response::OutboundRequestId, oneshot::Sender<Result<T, NodeError>>>;

/// Most outbound requests of one kind awaiting their answer. Each entry also leaves within
/// the request timeout (libp2p answers every request id with a response or a failure).
pub const MAX_PENDING_REQUESTS: usize = 4_096;

/// Fails the request at once if too many of its kind are in flight; else hands `tx` back.
fn refuse_if_full<T>(
    pending: &Pending<T>,
    tx: oneshot::Sender<Result<T, NodeError>>,
) -> Option<oneshot::Sender<Result<T, NodeError>>> {
    if pending.len() >= MAX_PENDING_REQUESTS {
        let _ = tx.send(Err(NodeError::Network(format!(
            "{MAX_PENDING_REQUESTS} requests already in flight"
        ))));
        None
    } else {
        Some(tx)
    }
}

/// Hands a request-response outcome to whoever waits for it; returns an inbound request, if
/// that is what the event is, for the caller to answer.
fn settle<Req, Resp>(
    pending: &mut Pending<Resp>,
    event: request_response::Event<Req, Resp>,
) -> Option<(Req, request_response::ResponseChannel<Resp>)> {
    match event {
        request_response::Event::Message {
            message:
                request_response::Message::Response {
                    request_id,
                    response,
                },
            ..
        } => {
            if let Some(tx) = pending.remove(&request_id) {
                let _ = tx.send(Ok(response));
            }
            None
        }
        request_response::Event::Message {
            message:
                request_response::Message::Request {
                    request, channel, ..
                },
            ..
        } => Some((request, channel)),
        request_response::Event::OutboundFailure {
            request_id, error, ..
        } => {
            if let Some(tx) = pending.remove(&request_id) {
                let e = match error {
                    request_response::OutboundFailure::DialFailure
                    | request_response::OutboundFailure::ConnectionClosed => {
                        NodeError::Unreachable(error.to_string())
                    }
                    _ => NodeError::Network(error.to_string()),
                };
                let _ = tx.send(Err(e));
            }
            None
        }
        _ => None,
    }
}

fn answer_digest(shelf: &Shelf, req: DigestRequest) -> DigestResponse {
    let store = shelf.lock().expect("shelf lock").get(&req.file()).cloned();
    let have = store.as_ref().map(|s| s.have());
    req.answer(store.as_ref().map(|s| &**s.manifest()), have.as_ref())
}

/// What this node serves: the files on its shelf, to peers the master has not banned.
struct NodeSource {
    shelf: Shelf,
    uploaded: Arc<AtomicU64>,
    banned: Bans,
    master: PeerId,
    chaos: Option<ChaosMode>,
}

impl PieceSource for NodeSource {
    fn open(&self, peer: &PeerId, req: &PieceRequest) -> Result<Serve, RefuseReason> {
        if self.banned.lock().expect("ban lock").contains(peer) {
            return Err(RefuseReason::Banned);
        }
        let store = self
            .shelf
            .lock()
            .expect("shelf lock")
            .get(&req.file)
            .cloned()
            .ok_or(RefuseReason::UnknownFile)?;
        let geometry = store.manifest().geometry();
        if req.range.end > geometry.blocks() {
            return Err(RefuseReason::BadRange);
        }
        if !store.holds(req.range) {
            return Err(RefuseReason::NotHeld);
        }
        let mut range = req.range;
        if self.chaos == Some(ChaosMode::Truncate) {
            range = BlockRange::new(range.start, range.start + range.len() / 2);
        }
        Ok(Serve {
            geometry,
            range,
            blocks: Arc::new(StoreReader {
                store,
                chaos: self.chaos,
                to_master: *peer == self.master,
            }),
            stall: self.chaos == Some(ChaosMode::Stall),
        })
    }

    fn served(&self, _peer: &PeerId, _file: &FileId, bytes: u64) {
        let _ = self
            .uploaded
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_add(bytes))
            });
    }
}

/// Reads served blocks from a store, damaging them as the chaos mode says.
struct StoreReader {
    store: Arc<PieceStore>,
    chaos: Option<ChaosMode>,
    to_master: bool,
}

impl BlockReader for StoreReader {
    fn read_block(&self, b: u32, buf: &mut [u8]) -> std::io::Result<()> {
        let block_size = self.store.manifest().geometry().block_size as usize;
        match self.chaos {
            // Another block's bytes (block 0 is full-sized unless the file is one block, in
            // which case the block is damaged instead).
            Some(ChaosMode::WrongBlock) if b != 0 && buf.len() == block_size => {
                self.store.read_block(0, buf)?
            }
            Some(ChaosMode::WrongBlock) => {
                self.store.read_block(b, buf)?;
                if let Some(x) = buf.first_mut() {
                    *x ^= 0xff;
                }
            }
            _ => self.store.read_block(b, buf)?,
        }
        if self.chaos.is_some_and(|c| c.corrupts(b, self.to_master)) && !buf.is_empty() {
            let mid = buf.len() / 2;
            buf[mid] ^= 0x5a;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ban_list_is_capped_oldest_first() {
        let mut b = BanList::default();
        let first = PeerId::random();
        b.insert(first);
        b.insert(first);
        assert_eq!(b.len(), 1);
        for _ in 0..MAX_BANNED {
            b.insert(PeerId::random());
        }
        assert_eq!(b.len(), MAX_BANNED);
        assert!(!b.contains(&first));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_event_loop_is_reported_and_the_node_stops_answering() {
        let dir = tempfile::tempdir().unwrap();
        let loopback: Multiaddr = "/ip4/127.0.0.1/tcp/0".parse().unwrap();
        let master = shoal_master::Master::start(
            shoal_master::MasterConfig::new(dir.path().join("master"))
                .with_listen(vec![loopback.clone()]),
        )
        .await
        .unwrap();
        let node = start(
            NodeConfig::new(dir.path().join("node"), master.addrs()[0].clone())
                .with_listen(vec![loopback]),
        )
        .await
        .unwrap();
        node.panic_event_loop().await;
        let p = tokio::time::timeout(Duration::from_secs(10), node.panicked())
            .await
            .expect("the panic is reported");
        assert_eq!(p.task, "node event loop");
        assert!(p.message.contains("requested by a test"), "{p}");
        assert!(matches!(
            node.master_request(MasterRequest::Hello {
                region: String::new()
            })
            .await,
            Err(NodeError::Stopped)
        ));
        // With `exit_on_panic` (what `shoal` sets) the same report ends the process with exit
        // code 101: shoal_net::task's tests run that path in a child process.
        master.shutdown().await;
    }
}
