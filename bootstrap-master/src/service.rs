//! The master's event loop: owns the swarm, feeds the policy, serves and pulls pieces.
//!
//! The loop is the only owner of the [`Swarm`] and the [`Policy`]. Piece streams (serving and
//! pulling) run as tasks, bounded by a semaphore, and report back over a bounded channel.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{AsyncWriteExt, StreamExt};
use libp2p::{
    gossipsub, identify, multiaddr::Protocol, noise, request_response, swarm::SwarmEvent, tcp,
    yamux, Multiaddr, PeerId, Swarm,
};
use shoal_protocol::{
    behaviour::{Behaviour, BehaviourEvent, ConnectionCaps, Role},
    block::{BlockRange, Blocks},
    limits::{MAX_PIECE_FRAME, MAX_RANGES_PER_MESSAGE, PIECE_PROTOCOL},
    manifest::check_digest_list,
    piece::{read_frame, receive_blocks, refuse, send_blocks},
    rate::RateLimiter,
    wire::{
        encode_authority, AuthorityEvent, DigestRequest, DigestResponse, MasterRequest,
        MasterResponse, PieceRequest, Problem, RefuseReason, Source,
    },
    FileId, Manifest, VerifiedManifest,
};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::bans::{BanBook, BanConfig, ProbeOutcome, Verdict};
use crate::metrics::Metrics;
use crate::policy::{Policy, PolicyConfig};
use crate::registry::{Registry, RegistryError};

/// How the master runs. Defaults suit a public master; tests shrink them.
#[derive(Clone, Debug)]
pub struct MasterConfig {
    /// Data directory (key, manifests, files).
    pub data_dir: PathBuf,
    /// Addresses to listen on. Default `/ip4/0.0.0.0/tcp/4001` and
    /// `/ip4/0.0.0.0/udp/4001/quic-v1`.
    pub listen: Vec<Multiaddr>,
    /// Cap on the master's piece upload, bytes per second. Default: none.
    pub max_upload_rate: Option<u64>,
    /// Where to serve Prometheus metrics. Default: nowhere.
    pub metrics_addr: Option<SocketAddr>,
    /// Piece streams served at once. Default 64.
    pub upload_slots: usize,
    /// Redirect policy tunables.
    pub policy: PolicyConfig,
    /// How often to rescan the data dir for files added with `shoal-master add`. Default 2 s.
    pub rescan_interval: Duration,
    /// Caps on connections. Default [`ConnectionCaps::for_role`]`(Role::Master)`.
    pub connection_caps: ConnectionCaps,
}

impl MasterConfig {
    /// Defaults with the given data directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            listen: vec![
                "/ip4/0.0.0.0/tcp/4001".parse().expect("valid multiaddr"),
                "/ip4/0.0.0.0/udp/4001/quic-v1"
                    .parse()
                    .expect("valid multiaddr"),
            ],
            max_upload_rate: None,
            metrics_addr: None,
            upload_slots: 64,
            policy: PolicyConfig::default(),
            rescan_interval: Duration::from_secs(2),
            connection_caps: ConnectionCaps::for_role(Role::Master),
        }
    }

    /// Listen on these addresses instead.
    pub fn with_listen(mut self, listen: Vec<Multiaddr>) -> Self {
        self.listen = listen;
        self
    }

    /// Cap the piece upload rate.
    pub fn with_max_upload_rate(mut self, rate: Option<u64>) -> Self {
        self.max_upload_rate = rate;
        self
    }

    /// Serve metrics at `addr`.
    pub fn with_metrics_addr(mut self, addr: Option<SocketAddr>) -> Self {
        self.metrics_addr = addr;
        self
    }

    /// Cap connections so.
    pub fn with_connection_caps(mut self, caps: ConnectionCaps) -> Self {
        self.connection_caps = caps;
        self
    }

    /// Use these policy tunables.
    pub fn with_policy(mut self, policy: PolicyConfig) -> Self {
        self.policy = policy;
        self
    }
}

/// Why the master could not start.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    /// The data directory.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The swarm.
    #[error("network: {0}")]
    Network(String),
    /// The metrics endpoint.
    #[error("metrics endpoint: {0}")]
    Metrics(std::io::Error),
}

enum Command {
    Status(
        FileId,
        oneshot::Sender<Option<shoal_protocol::wire::FileStatus>>,
    ),
    Shutdown(oneshot::Sender<()>),
}

enum Internal {
    Served {
        file: FileId,
        bytes: u64,
    },
    Pulled {
        file: FileId,
        range: BlockRange,
    },
    PullFinished {
        file: FileId,
        result: Result<(), String>,
    },
    Probed {
        suspect: PeerId,
        outcome: ProbeOutcome,
    },
}

/// Files the master can serve, shared with the piece tasks.
#[derive(Default)]
struct Shelf {
    files: HashMap<FileId, ShelfEntry>,
}

struct ShelfEntry {
    manifest: Arc<VerifiedManifest>,
    path: PathBuf,
    have: Blocks,
}

/// A running master.
pub struct Master {
    peer_id: PeerId,
    addrs: Vec<Multiaddr>,
    metrics: Metrics,
    metrics_addr: Option<SocketAddr>,
    commands: mpsc::Sender<Command>,
    task: tokio::task::JoinHandle<()>,
}

impl Master {
    /// Starts a master: opens its data dir, listens, and returns once every listener is up.
    pub async fn start(cfg: MasterConfig) -> Result<Self, MasterError> {
        let registry = Registry::open(&cfg.data_dir)?;
        let key = registry.key()?;
        let peer_id = key.public().to_peer_id();
        let net = |e: &dyn std::fmt::Display| MasterError::Network(e.to_string());
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key.clone())
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| net(&e))?
            .with_quic()
            .with_behaviour(|k| {
                Behaviour::new(k, Role::Master, &cfg.connection_caps)
                    .map_err(Box::<dyn std::error::Error + Send + Sync>::from)
            })
            .map_err(|e| net(&e))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
            .build();
        let _ = swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&Behaviour::authority_topic());
        for addr in &cfg.listen {
            swarm.listen_on(addr.clone()).map_err(|e| net(&e))?;
        }
        // Wait until every listener reported its address.
        let mut addrs = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while addrs.len() < cfg.listen.len() {
            match tokio::time::timeout_at(deadline, swarm.select_next_some()).await {
                Ok(SwarmEvent::NewListenAddr { address, .. }) => {
                    addrs.push(address.with(Protocol::P2p(peer_id)))
                }
                Ok(SwarmEvent::ListenerError { error, .. }) => return Err(net(&error)),
                Ok(SwarmEvent::ListenerClosed { reason, .. }) => {
                    return Err(net(&format!("listener closed: {reason:?}")))
                }
                Ok(_) => {}
                Err(_) => return Err(net(&"timed out waiting for listeners")),
            }
        }
        let addr_file: String = addrs.iter().map(|a| format!("{a}\n")).collect();
        crate::registry::write_atomic(
            &registry.dir().join("bootstrap.addr"),
            addr_file.as_bytes(),
        )?;

        let metrics = Metrics::new();
        let metrics_addr = match cfg.metrics_addr {
            Some(a) => Some(
                metrics
                    .spawn_server(a)
                    .await
                    .map_err(MasterError::Metrics)?,
            ),
            None => None,
        };
        let (cmd_tx, cmd_rx) = mpsc::channel(64);
        let (int_tx, int_rx) = mpsc::channel(1024);
        let mut lp = EventLoop {
            policy: Policy::new(cfg.policy.clone()),
            shelf: Arc::new(Mutex::new(Shelf::default())),
            limiter: cfg
                .max_upload_rate
                .map(|r| Arc::new(Mutex::new(RateLimiter::new(r)))),
            slots: Arc::new(Semaphore::new(cfg.upload_slots.max(1))),
            registry,
            key,
            metrics: metrics.clone(),
            internal_tx: int_tx,
            pulling: HashMap::new(),
            bans: BanBook::new(BanConfig::default()),
            listen_addrs: addrs.clone(),
            cfg,
            swarm,
        };
        lp.load_bans();
        lp.load_registry();
        let task = tokio::spawn(lp.run(cmd_rx, int_rx));
        Ok(Self {
            peer_id,
            addrs,
            metrics,
            metrics_addr,
            commands: cmd_tx,
            task,
        })
    }

    /// The master's PeerId (the swarm's trust anchor).
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Dialable addresses, each ending in `/p2p/<PeerId>`.
    pub fn addrs(&self) -> &[Multiaddr] {
        &self.addrs
    }

    /// The master's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Where metrics are served, if anywhere.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// What the master knows of `file`.
    pub async fn status(&self, file: FileId) -> Option<shoal_protocol::wire::FileStatus> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Status(file, tx)).await.ok()?;
        rx.await.ok().flatten()
    }

    /// Stops the master and waits for its loop to end.
    pub async fn shutdown(self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
        let _ = self.task.await;
    }

    /// Waits until the loop ends (it runs until shut down).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

struct EventLoop {
    cfg: MasterConfig,
    swarm: Swarm<Behaviour>,
    policy: Policy,
    shelf: Arc<Mutex<Shelf>>,
    limiter: Option<Arc<Mutex<RateLimiter>>>,
    slots: Arc<Semaphore>,
    registry: Registry,
    key: libp2p::identity::Keypair,
    metrics: Metrics,
    internal_tx: mpsc::Sender<Internal>,
    pulling: HashMap<FileId, PeerId>,
    bans: BanBook,
    /// Every address the master listens on (a `0.0.0.0` listener reports one per interface,
    /// over time); `bootstrap.addr` is rewritten as they come and go.
    listen_addrs: Vec<Multiaddr>,
}

impl EventLoop {
    fn write_bootstrap_addrs(&self) {
        let text: String = self.listen_addrs.iter().map(|a| format!("{a}\n")).collect();
        if let Err(e) = crate::registry::write_atomic(
            &self.registry.dir().join("bootstrap.addr"),
            text.as_bytes(),
        ) {
            tracing::error!(error = %e, "cannot write bootstrap.addr");
        }
    }

    fn bans_path(&self) -> PathBuf {
        self.registry.dir().join("bans")
    }

    /// Loads the ban list kept in the data dir (one PeerId a line; bad lines are skipped).
    fn load_bans(&mut self) {
        let Ok(text) = std::fs::read_to_string(self.bans_path()) else {
            return;
        };
        for line in text.lines() {
            match line.trim().parse::<PeerId>() {
                Ok(p) => {
                    self.bans.ban(p);
                    self.policy.ban(p);
                }
                Err(_) if line.trim().is_empty() => {}
                Err(e) => tracing::warn!(line, error = %e, "skipping a bad line of the ban list"),
            }
        }
    }

    /// Bans `peer` swarm-wide: out of every list, disconnected, refused from now on (the ban
    /// list is persisted), and announced on the authority topic.
    fn ban(&mut self, peer: PeerId) {
        tracing::warn!(%peer, "banning peer swarm-wide");
        self.bans.ban(peer);
        self.policy.ban(peer);
        self.metrics.bans.inc();
        let mut list: Vec<String> = self.bans.banned().map(|p| p.to_string()).collect();
        list.sort();
        let text: String = list.iter().map(|p| format!("{p}\n")).collect();
        if let Err(e) = crate::registry::write_atomic(&self.bans_path(), text.as_bytes()) {
            tracing::error!(error = %e, "cannot persist the ban list");
        }
        let _ = self.swarm.disconnect_peer_id(peer);
        self.publish(AuthorityEvent::PeerBanned { peer });
    }

    fn act(&mut self, verdict: Verdict, file: FileId) {
        match verdict {
            Verdict::Nothing => {}
            Verdict::Ban(peer) => self.ban(peer),
            Verdict::Probe { suspect, blocks } => {
                let manifest = self
                    .shelf
                    .lock()
                    .expect("shelf lock")
                    .files
                    .get(&file)
                    .map(|e| e.manifest.clone());
                let addrs = self.policy.addrs(&suspect);
                let internal = self.internal_tx.clone();
                tokio::spawn(async move {
                    let outcome = match manifest {
                        Some(m) => crate::probe::probe(suspect, addrs, m, blocks).await,
                        None => ProbeOutcome::Inconclusive,
                    };
                    let _ = internal.send(Internal::Probed { suspect, outcome }).await;
                });
            }
        }
    }

    fn load_registry(&mut self) {
        let stored = match self.registry.load_all() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the registry");
                return;
            }
        };
        for f in stored {
            let id = f.manifest.id();
            if self.policy.has_file(&id) {
                continue;
            }
            let have = Registry::held_blocks(&f);
            tracing::info!(file = %id, name = %f.manifest.body().name, complete = f.complete, "registered file");
            self.register(f.manifest, f.path, have);
        }
    }

    fn register(&mut self, manifest: Arc<VerifiedManifest>, path: PathBuf, have: Blocks) {
        let id = manifest.id();
        let body = manifest.body();
        self.policy
            .add_file(id, body.name.clone(), body.size, have.clone());
        self.shelf.lock().expect("shelf lock").files.insert(
            id,
            ShelfEntry {
                manifest,
                path,
                have,
            },
        );
        self.metrics.files.set(self.policy_file_count());
    }

    fn policy_file_count(&self) -> i64 {
        self.shelf.lock().expect("shelf lock").files.len() as i64
    }

    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut internal: mpsc::Receiver<Internal>,
    ) {
        let Some(mut incoming) = self.swarm.behaviour_mut().pieces.take_incoming() else {
            tracing::error!("cannot accept piece streams: the queue was taken");
            return;
        };
        let mut rescan = tokio::time::interval(self.cfg.rescan_interval);
        let mut expire = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                Some((peer, stream)) = incoming.next() => self.on_piece_stream(peer, stream).await,
                Some(msg) = internal.recv() => self.on_internal(msg),
                cmd = commands.recv() => match cmd {
                    Some(Command::Status(file, tx)) => { let _ = tx.send(self.policy.status(&file)); }
                    Some(Command::Shutdown(tx)) => { let _ = tx.send(()); return; }
                    None => return,
                },
                _ = rescan.tick() => self.load_registry(),
                _ = expire.tick() => self.policy.expire(Instant::now()),
            }
        }
    }

    fn publish(&mut self, event: AuthorityEvent) {
        if let Err(e) = self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(Behaviour::authority_topic(), encode_authority(&event))
        {
            tracing::debug!(error = %e, ?event, "authority event not published");
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                if self.policy.is_banned(&peer_id) {
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                tracing::debug!(%peer_id, addr = %endpoint.get_remote_address(), "peer connected");
                self.policy.peer_up(peer_id, Vec::new());
                self.metrics
                    .peers
                    .set(self.swarm.connected_peers().count() as i64);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.metrics
                    .peers
                    .set(self.swarm.connected_peers().count() as i64);
                if self.policy.peer_down(&peer_id) {
                    tracing::info!(%peer_id, "mirror gone");
                    self.publish(AuthorityEvent::MirrorRemoved { peer: peer_id });
                }
            }
            SwarmEvent::NewListenAddr { address, .. } => {
                let address = address.with(Protocol::P2p(*self.swarm.local_peer_id()));
                tracing::info!(%address, "listening");
                if !self.listen_addrs.contains(&address) {
                    self.listen_addrs.push(address);
                    self.write_bootstrap_addrs();
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                let address = address.with(Protocol::P2p(*self.swarm.local_peer_id()));
                self.listen_addrs.retain(|a| *a != address);
                self.write_bootstrap_addrs();
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                let addrs: Vec<Multiaddr> = info
                    .listen_addrs
                    .into_iter()
                    .filter(|a| {
                        !a.iter()
                            .any(|p| matches!(p, Protocol::Ip4(ip) if ip.is_unspecified()))
                    })
                    .collect();
                for a in &addrs {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer_id, a.clone());
                }
                self.policy.peer_up(peer_id, addrs);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Master(request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            })) => {
                let response = self.on_master_request(peer, request);
                if self
                    .swarm
                    .behaviour_mut()
                    .master
                    .send_response(channel, response)
                    .is_err()
                {
                    tracing::debug!(%peer, "master response dropped: peer gone");
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Publish(request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            })) => {
                let response = if self.policy.is_banned(&peer) {
                    MasterResponse::Refused {
                        reason: "banned".into(),
                    }
                } else {
                    self.on_announce(peer, request.header, request.digests)
                };
                if self
                    .swarm
                    .behaviour_mut()
                    .publish
                    .send_response(channel, response)
                    .is_err()
                {
                    tracing::debug!(%peer, "publish response dropped: peer gone");
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Digest(request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            })) => {
                let response = self.on_digest_request(request);
                if self
                    .swarm
                    .behaviour_mut()
                    .digest
                    .send_response(channel, response)
                    .is_err()
                {
                    tracing::debug!(%peer, "digest response dropped: peer gone");
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(libp2p::ping::Event {
                peer,
                result: Err(error),
                ..
            })) => {
                // A peer whose pings fail is not live: drop the connection; its mirrors go
                // with it (ConnectionClosed).
                tracing::info!(%peer, %error, "ping failed; disconnecting");
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                ..
            })) => {
                // The master is the authority; it acts on nobody's gossip.
            }
            other => tracing::trace!(?other, "swarm event"),
        }
    }

    fn on_master_request(&mut self, peer: PeerId, request: MasterRequest) -> MasterResponse {
        if self.policy.is_banned(&peer) {
            return MasterResponse::Refused {
                reason: "banned".into(),
            };
        }
        match request {
            MasterRequest::Locate { file, need } => {
                let need: Vec<BlockRange> = need.into_iter().take(MAX_RANGES_PER_MESSAGE).collect();
                match self.policy.locate(Instant::now(), peer, &file, &need) {
                    Ok(answer) => {
                        for a in &answer.assignments {
                            self.metrics.assignments.inc();
                            if matches!(a.source, Source::Peer { .. }) {
                                self.metrics.redirects.inc();
                            }
                        }
                        MasterResponse::Assignments {
                            assignments: answer.assignments,
                            retry_after_ms: answer.retry_after.as_millis() as u32,
                        }
                    }
                    Err(e) => MasterResponse::Refused {
                        reason: e.to_string(),
                    },
                }
            }
            MasterRequest::Have {
                file,
                ranges,
                peer_bytes,
            } => {
                self.policy.count_bytes(&file, 0, peer_bytes);
                let ranges: Vec<BlockRange> =
                    ranges.into_iter().take(MAX_RANGES_PER_MESSAGE).collect();
                self.policy.have(&file, peer, &ranges);
                MasterResponse::Ack
            }
            MasterRequest::Report {
                file,
                peer: culprit,
                problem,
            } => {
                tracing::info!(reporter = %peer, %culprit, file = %file, ?problem, "report");
                // Bad data: never again for this reporter. A dead or stalling peer: for a
                // while. A busy one: for a moment.
                let until = match problem {
                    Problem::Corrupt { .. } => None,
                    Problem::Unreachable | Problem::Truncated { .. } | Problem::NotHeld { .. } => {
                        Some(Instant::now() + Duration::from_secs(30))
                    }
                    Problem::Busy => Some(Instant::now() + Duration::from_secs(2)),
                };
                self.policy.avoid(peer, culprit, until);
                if let Problem::Corrupt { blocks } = &problem {
                    let first = blocks.first().map_or(BlockRange::new(0, 1), |r| {
                        BlockRange::new(r.start, r.end.min(r.start.saturating_add(16)))
                    });
                    let verdict = self.bans.report(peer, culprit, first);
                    self.act(verdict, file);
                }
                if matches!(problem, Problem::Unreachable) && !self.swarm.is_connected(&culprit) {
                    // The master cannot see it either: it is gone from every mirror list.
                    if self.policy.peer_down(&culprit) {
                        tracing::info!(%culprit, "mirror unreachable for the master too; removed");
                        self.publish(AuthorityEvent::MirrorRemoved { peer: culprit });
                    }
                }
                MasterResponse::Ack
            }
            MasterRequest::Status { file } => match self.policy.status(&file) {
                Some(s) => MasterResponse::Status(Box::new(s)),
                None => MasterResponse::Refused {
                    reason: format!("unknown file {file}"),
                },
            },
            MasterRequest::Hello { region } => {
                self.policy
                    .set_region(peer, region.chars().take(64).collect());
                MasterResponse::Ack
            }
            MasterRequest::Leave => {
                if self.policy.peer_down(&peer) {
                    tracing::info!(%peer, "mirror left");
                    self.publish(AuthorityEvent::MirrorRemoved { peer });
                }
                MasterResponse::Ack
            }
        }
    }

    fn on_announce(
        &mut self,
        publisher: PeerId,
        header: shoal_protocol::manifest::PublisherHeader,
        digests: Vec<shoal_protocol::BlockDigest>,
    ) -> MasterResponse {
        let refused = |reason: String| MasterResponse::Refused { reason };
        if let Err(e) = header.verify() {
            return refused(e.to_string());
        }
        match header.body.publisher() {
            Ok(p) if p == publisher => {}
            _ => {
                return refused("the announcing peer is not the publisher the header names".into())
            }
        }
        if let Err(e) = check_digest_list(&header.body, &digests) {
            return refused(e.to_string());
        }
        let signed = match header.countersign(&self.key) {
            Ok(s) => s,
            Err(e) => return refused(e.to_string()),
        };
        let manifest = match (Manifest {
            header: signed.clone(),
            digests,
        })
        .verify(None)
        {
            Ok(m) => Arc::new(m),
            Err(e) => return refused(e.to_string()),
        };
        let id = manifest.id();
        if !self.policy.has_file(&id) {
            if let Err(e) = self.registry.save_manifest(&manifest) {
                tracing::error!(error = %e, "cannot store manifest");
                return refused("master cannot store the manifest".into());
            }
            let path = self.registry.data_path(&id);
            tracing::info!(file = %id, name = %manifest.body().name, %publisher, "file announced");
            self.register(
                manifest.clone(),
                path.clone(),
                Blocks::new(manifest.blocks()),
            );
            self.publish(AuthorityEvent::FileAnnounced {
                file: id,
                name: manifest.body().name.clone(),
                size: manifest.body().size,
            });
        }
        if !self.policy.master_complete(&id) && !self.pulling.contains_key(&id) {
            // The publisher is the first mirror; nodes may be redirected to it while the
            // master pulls its own copy.
            self.policy.holds_all(&id, publisher);
            self.pulling.insert(id, publisher);
            let control = self.swarm.behaviour().stream.new_control();
            let path = self.registry.data_path(&id);
            tokio::spawn(pull(
                control,
                publisher,
                manifest,
                path,
                self.internal_tx.clone(),
            ));
        }
        MasterResponse::Announced {
            file: id,
            header: Box::new(signed),
        }
    }

    fn on_digest_request(&self, request: DigestRequest) -> DigestResponse {
        let shelf = self.shelf.lock().expect("shelf lock");
        request.answer(shelf.files.get(&request.file()).map(|e| &*e.manifest))
    }

    fn on_internal(&mut self, msg: Internal) {
        match msg {
            Internal::Served { file, bytes } => self.policy.count_bytes(&file, bytes, 0),
            Internal::Pulled { file, range } => {
                for b in range.iter() {
                    self.policy.master_stored(&file, b);
                }
                if let Some(e) = self.shelf.lock().expect("shelf lock").files.get_mut(&file) {
                    e.have.insert_range(range);
                }
            }
            Internal::Probed { suspect, outcome } => {
                tracing::info!(%suspect, ?outcome, "probe finished");
                if let Verdict::Ban(p) = self.bans.probe_result(suspect, outcome) {
                    self.ban(p);
                }
            }
            Internal::PullFinished { file, result } => {
                self.pulling.remove(&file);
                match result {
                    Ok(()) => match self.registry.mark_complete(&file) {
                        Ok(()) => tracing::info!(file = %file, "master holds the whole file"),
                        Err(e) => tracing::error!(file = %file, error = %e, "cannot mark complete"),
                    },
                    Err(e) => {
                        tracing::warn!(file = %file, error = %e, "pull from publisher failed; waiting for a new announce")
                    }
                }
            }
        }
    }

    async fn on_piece_stream(&mut self, peer: PeerId, stream: libp2p::Stream) {
        if self.policy.is_banned(&peer) {
            return;
        }
        // All upload slots busy: drop the stream (the node asks again and is sent elsewhere)
        // rather than wait here, which would stall the whole event loop.
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "upload slots full; piece stream dropped");
            return;
        };
        let shelf = self.shelf.clone();
        let limiter = self.limiter.clone();
        let metrics = self.metrics.clone();
        let internal = self.internal_tx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match serve_piece(stream, &shelf, limiter, &metrics).await {
                Ok(Some((file, bytes))) => {
                    let _ = internal.try_send(Internal::Served { file, bytes });
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(%peer, error = %e, "piece stream ended"),
            }
        });
    }
}

/// Serves one piece stream from the master's files.
async fn serve_piece(
    mut stream: libp2p::Stream,
    shelf: &Mutex<Shelf>,
    limiter: Option<Arc<Mutex<RateLimiter>>>,
    metrics: &Metrics,
) -> std::io::Result<Option<(FileId, u64)>> {
    let req: PieceRequest = tokio::time::timeout(
        Duration::from_secs(10),
        read_frame(&mut stream, MAX_PIECE_FRAME),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request"))??;
    let found = {
        let shelf = shelf.lock().expect("shelf lock");
        match shelf.files.get(&req.file) {
            None => Err(RefuseReason::UnknownFile),
            Some(e) if !e.have.contains_range(req.range) || req.range.is_empty() => {
                Err(RefuseReason::NotHeld)
            }
            Some(e) => Ok((e.manifest.geometry(), e.path.clone())),
        }
    };
    let (geometry, path) = match found {
        Ok(x) => x,
        Err(reason) => {
            refuse(&mut stream, reason).await?;
            return Ok(None);
        }
    };
    let file = std::fs::File::open(&path)?;
    let sent = send_blocks(
        &mut stream,
        geometry,
        req.range,
        |block, buf| std::os::unix::fs::FileExt::read_exact_at(&file, buf, geometry.offset(block)),
        |n| {
            metrics.piece_bytes_sent.inc_by(n as u64);
            let wait = limiter
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
    stream.close().await?;
    Ok(Some((req.file, sent)))
}

/// Pulls every block of a just-announced file from its publisher, writing each verified
/// block at its offset in `path`.
async fn pull(
    mut control: libp2p_stream::Control,
    publisher: PeerId,
    manifest: Arc<VerifiedManifest>,
    path: PathBuf,
    internal: mpsc::Sender<Internal>,
) {
    let file = manifest.id();
    let result = async {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| e.to_string())?;
        out.set_len(manifest.body().size)
            .map_err(|e| e.to_string())?;
        let geometry = manifest.geometry();
        let total = manifest.blocks();
        let mut start = 0;
        while start < total {
            let range = BlockRange::new(start, (start + 256).min(total));
            let mut attempts = 0;
            loop {
                let r = async {
                    let mut s = control
                        .open_stream(publisher, PIECE_PROTOCOL)
                        .await
                        .map_err(|e| e.to_string())?;
                    receive_blocks(&mut s, &manifest, range, |b, data| {
                        std::os::unix::fs::FileExt::write_all_at(&out, data, geometry.offset(b))
                    })
                    .await
                    .map_err(|e| e.to_string())
                }
                .await;
                match r {
                    Ok(()) => break,
                    Err(e) if attempts < 5 => {
                        attempts += 1;
                        tracing::debug!(file = %file, error = %e, attempts, "pull retry");
                        tokio::time::sleep(Duration::from_millis(200 * attempts)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
            out.sync_data().map_err(|e| e.to_string())?;
            let _ = internal.send(Internal::Pulled { file, range }).await;
            start = range.end;
        }
        Ok(())
    }
    .await;
    let _ = internal.send(Internal::PullFinished { file, result }).await;
}
