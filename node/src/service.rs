//! The node's network shell: an [`EventLoop`] task that owns the swarm, and a cloneable
//! [`Client`] that sends it commands over a bounded channel, each with a oneshot reply.
//!
//! It also runs the piece server: inbound `/shoal/piece/1` streams answered from the
//! [`PieceStore`]s this node shares, within upload slots and an optional rate limit.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use futures::{AsyncWriteExt, StreamExt};
use libp2p::{
    gossipsub, identify, noise, request_response, swarm::SwarmEvent, tcp, yamux, Multiaddr, PeerId,
    Swarm,
};
use shoal_protocol::{
    behaviour::{peer_of, Behaviour, BehaviourEvent, ConnectionCaps, Role},
    limits::MAX_PIECE_FRAME,
    piece::{read_frame, refuse, send_blocks, write_frame},
    rate::RateLimiter,
    wire::{
        decode_authority, AuthorityEvent, DigestRequest, DigestResponse, MasterRequest,
        MasterResponse, PieceRequest, PieceResponse, PublishRequest, RefuseReason,
    },
    BlockRange, FileId,
};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::chaos::ChaosMode;
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

    /// Set the region label.
    pub fn with_region(mut self, region: String) -> Self {
        self.region = region;
        self
    }
}

/// Why a node operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The bootstrap address has no `/p2p/` part.
    #[error("bootstrap address {0} does not end in /p2p/<master PeerId>")]
    NoMasterId(Multiaddr),
    /// Network setup or a request failed.
    #[error("network: {0}")]
    Network(String),
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
    FindPeer(PeerId),
    Shutdown(oneshot::Sender<()>),
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
    banned: Arc<Mutex<HashSet<PeerId>>>,
    data_dir: PathBuf,
    tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    chaos: Option<ChaosMode>,
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

    /// The data directory.
    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    /// Piece bytes this node has served.
    pub fn bytes_uploaded(&self) -> u64 {
        self.uploaded.load(Ordering::Relaxed)
    }

    /// Whether the master has banned `peer`.
    pub fn is_banned(&self, peer: &PeerId) -> bool {
        self.banned.lock().expect("ban lock").contains(peer)
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

    /// Starts a Kademlia lookup of `peer` (after its hinted addresses failed).
    pub async fn find_peer(&self, peer: PeerId) {
        let _ = self.commands.send(Command::FindPeer(peer)).await;
    }

    /// Serves `store` to other nodes from now on.
    pub fn share(&self, store: Arc<PieceStore>) {
        self.shelf
            .lock()
            .expect("shelf lock")
            .insert(store.manifest().id(), store);
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
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| net(&e))?
        .with_quic()
        .with_behaviour(|k| {
            Behaviour::new(k, Role::Node, &cfg.connection_caps)
                .map_err(Box::<dyn std::error::Error + Send + Sync>::from)
        })
        .map_err(|e| net(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
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
    let master_addr: Multiaddr = cfg
        .bootstrap
        .iter()
        .filter(|p| !matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
        .collect();
    swarm.add_peer_address(master, master_addr.clone());
    swarm.behaviour_mut().kad.add_address(&master, master_addr);
    swarm.dial(cfg.bootstrap.clone()).map_err(|e| net(&e))?;

    let control = swarm.behaviour().stream.new_control();
    let shelf: Shelf = Arc::default();
    let uploaded = Arc::new(AtomicU64::new(0));
    let banned: Arc<Mutex<HashSet<PeerId>>> = Arc::default();
    let incoming = swarm
        .behaviour_mut()
        .pieces
        .take_incoming()
        .ok_or_else(|| net(&"the piece stream queue was taken"))?;
    let server = tokio::spawn(serve_pieces(
        incoming,
        Arc::new(Server {
            shelf: shelf.clone(),
            slots: Arc::new(Semaphore::new(cfg.upload_slots.max(1))),
            limiter: cfg.max_upload_rate.map(|r| Mutex::new(RateLimiter::new(r))),
            uploaded: uploaded.clone(),
            banned: banned.clone(),
            master,
            chaos: cfg.chaos,
        }),
    ));

    let (tx, rx) = mpsc::channel(256);
    let lp = EventLoop {
        swarm,
        master,
        pending_master: HashMap::new(),
        pending_digest: HashMap::new(),
        pending_publish: HashMap::new(),
        shelf: shelf.clone(),
        banned: banned.clone(),
        region: cfg.region.clone(),
        master_connected_before: false,
    };
    let event_loop = tokio::spawn(lp.run(rx));
    let client = Client {
        commands: tx,
        control,
        shelf,
        peer_id,
        master,
        uploaded,
        banned,
        data_dir: cfg.data_dir.clone(),
        tasks: Arc::new(Mutex::new(vec![
            server.abort_handle(),
            event_loop.abort_handle(),
        ])),
        chaos: cfg.chaos,
    };
    // The first request doubles as the connection check.
    match tokio::time::timeout(
        Duration::from_secs(15),
        client.master_request(MasterRequest::Hello {
            region: cfg.region.clone(),
        }),
    )
    .await
    {
        Ok(Ok(_)) => Ok(client),
        Ok(Err(e)) => Err(NodeError::Network(format!(
            "cannot reach the master at {}: {e}",
            cfg.bootstrap
        ))),
        Err(_) => Err(NodeError::Network(format!(
            "no answer from the master at {} within 15 s",
            cfg.bootstrap
        ))),
    }
}

/// Loads the keypair at `path`, creating it on first use.
pub fn load_or_create_key(path: &std::path::Path) -> Result<libp2p::identity::Keypair, NodeError> {
    use libp2p::identity::Keypair;
    let dd = |e: &dyn std::fmt::Display| NodeError::DataDir(format!("{}: {e}", path.display()));
    match std::fs::read(path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes).map_err(|e| dd(&e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key.to_protobuf_encoding().map_err(|e| dd(&e))?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| dd(&e))?;
            }
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, bytes)
                .and_then(|_| std::fs::rename(&tmp, path))
                .map_err(|e| dd(&e))?;
            Ok(key)
        }
        Err(e) => Err(dd(&e)),
    }
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    master: PeerId,
    pending_master: Pending<MasterResponse>,
    pending_digest: Pending<DigestResponse>,
    pending_publish: Pending<MasterResponse>,
    shelf: Shelf,
    banned: Arc<Mutex<HashSet<PeerId>>>,
    region: String,
    master_connected_before: bool,
}

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

    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_event(event),
                cmd = commands.recv() => match cmd {
                    Some(Command::Shutdown(tx)) => { let _ = tx.send(()); return; }
                    Some(cmd) => self.on_command(cmd),
                    None => return,
                },
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Master(req, tx) => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .master
                    .send_request(&self.master, req);
                self.pending_master.insert(id, tx);
            }
            Command::Publish(req, tx) => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .publish
                    .send_request(&self.master, req);
                self.pending_publish.insert(id, tx);
            }
            Command::Digest(peer, req, tx) => {
                let id = self.swarm.behaviour_mut().digest.send_request(&peer, req);
                self.pending_digest.insert(id, tx);
            }
            Command::Hint(peer, addrs, ack) => {
                for a in addrs {
                    self.swarm.add_peer_address(peer, a.clone());
                    self.swarm.behaviour_mut().kad.add_address(&peer, a);
                }
                let _ = ack.send(());
            }
            Command::FindPeer(peer) => {
                self.swarm.behaviour_mut().kad.get_closest_peers(peer);
            }
            Command::Shutdown(_) => {}
        }
    }

    fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Master(ev)) => {
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
                message,
                ..
            })) => {
                // Strict validation checked the signature; only the master's word counts.
                if message.source != Some(self.master) {
                    return;
                }
                match decode_authority(&message.data) {
                    Ok(AuthorityEvent::PeerBanned { peer }) => {
                        tracing::info!(%peer, "peer banned by the master");
                        self.banned.lock().expect("ban lock").insert(peer);
                        let _ = self.swarm.disconnect_peer_id(peer);
                    }
                    Ok(event) => tracing::debug!(?event, "authority event"),
                    Err(e) => tracing::debug!(error = %e, "undecodable authority event"),
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                if peer_id != self.master {
                    return;
                }
                tracing::debug!(observed = %info.observed_addr, "master sees us");
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                num_established,
                ..
            } if peer_id == self.master => {
                if num_established.get() == 1 {
                    if self.master_connected_before {
                        self.reannounce();
                    }
                    self.master_connected_before = true;
                }
            }
            SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                if self.banned.lock().expect("ban lock").contains(&peer_id) {
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                }
            }
            SwarmEvent::NewListenAddr { address, .. } => tracing::debug!(%address, "listening"),
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
            }
            other => tracing::trace!(?other, "swarm event"),
        }
    }
}

/// Pending replies to outbound requests, by request id.
type Pending<T> =
    HashMap<request_response::OutboundRequestId, oneshot::Sender<Result<T, NodeError>>>;

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
                let _ = tx.send(Err(NodeError::Network(error.to_string())));
            }
            None
        }
        _ => None,
    }
}

fn answer_digest(shelf: &Shelf, req: DigestRequest) -> DigestResponse {
    let store = shelf.lock().expect("shelf lock").get(&req.file()).cloned();
    req.answer(store.as_ref().map(|s| &**s.manifest()))
}

/// The piece server's shared state.
struct Server {
    shelf: Shelf,
    slots: Arc<Semaphore>,
    limiter: Option<Mutex<RateLimiter>>,
    uploaded: Arc<AtomicU64>,
    banned: Arc<Mutex<HashSet<PeerId>>>,
    master: PeerId,
    chaos: Option<ChaosMode>,
}

async fn serve_pieces(mut incoming: shoal_protocol::inbound::IncomingPieces, server: Arc<Server>) {
    while let Some((peer, mut stream)) = incoming.next().await {
        let Ok(permit) = server.slots.clone().try_acquire_owned() else {
            // All slots busy: say so quickly (bounded by the refusal timeout) so the
            // requester asks the master for another source.
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                let _ = read_frame::<_, PieceRequest>(&mut stream, MAX_PIECE_FRAME).await;
                let _ = refuse(&mut stream, RefuseReason::Busy).await;
            })
            .await;
            continue;
        };
        let server = server.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = server.serve_one(&mut stream, peer).await {
                tracing::debug!(%peer, error = %e, "piece stream ended");
            }
        });
    }
}

impl Server {
    async fn serve_one(&self, stream: &mut libp2p::Stream, peer: PeerId) -> std::io::Result<()> {
        let req: PieceRequest =
            tokio::time::timeout(Duration::from_secs(10), read_frame(stream, MAX_PIECE_FRAME))
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request"))??;
        if self.banned.lock().expect("ban lock").contains(&peer) {
            return refuse(stream, RefuseReason::Banned).await;
        }
        let store = self
            .shelf
            .lock()
            .expect("shelf lock")
            .get(&req.file)
            .cloned();
        let Some(store) = store else {
            return refuse(stream, RefuseReason::UnknownFile).await;
        };
        if req.range.is_empty() || !store.holds(req.range) {
            return refuse(stream, RefuseReason::NotHeld).await;
        }
        let geometry = store.manifest().geometry();
        let mut range = req.range;
        match self.chaos {
            Some(ChaosMode::Stall) => {
                write_frame(stream, &PieceResponse::Ok, MAX_PIECE_FRAME).await?;
                tokio::time::sleep(Duration::from_secs(120)).await;
                return Ok(());
            }
            Some(ChaosMode::Truncate) => {
                range = BlockRange::new(range.start, range.start + range.len() / 2);
            }
            _ => {}
        }
        let to_master = peer == self.master;
        send_blocks(
            stream,
            geometry,
            range,
            |b, buf| {
                match self.chaos {
                    // Another block's bytes (block 0 is full-sized unless the file is one
                    // block, in which case the block is damaged instead).
                    Some(ChaosMode::WrongBlock)
                        if b != 0 && buf.len() == geometry.block_size as usize =>
                    {
                        store.read_block(0, buf)?
                    }
                    Some(ChaosMode::WrongBlock) => {
                        store.read_block(b, buf)?;
                        buf[0] ^= 0xff;
                    }
                    _ => store.read_block(b, buf)?,
                }
                if self.chaos.is_some_and(|c| c.corrupts(b, to_master)) && !buf.is_empty() {
                    let mid = buf.len() / 2;
                    buf[mid] ^= 0x5a;
                }
                Ok(())
            },
            |n| {
                self.uploaded.fetch_add(n as u64, Ordering::Relaxed);
                let wait = self
                    .limiter
                    .as_ref()
                    .map(|l| l.lock().expect("limiter lock").reserve(Instant::now(), n));
                async move {
                    if let Some(w) = wait.filter(|w| !w.is_zero()) {
                        tokio::time::sleep(w).await;
                    }
                }
            },
        )
        .await?;
        stream.close().await
    }
}
