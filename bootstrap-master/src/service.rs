//! The master's event loop: owns the swarm and routes each event to the module whose concern
//! it is (announce, pull, serve, report, enforce, registry).
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

use futures::StreamExt;
use libp2p::{
    gossipsub, identify, multiaddr::Protocol, noise, request_response, swarm::SwarmEvent, tcp,
    yamux, Multiaddr, PeerId, Swarm,
};
use shoal_protocol::{
    behaviour::{Behaviour, BehaviourEvent, Role},
    block::{BlockRange, Blocks},
    limits::{MAX_RANGES_PER_MESSAGE, PIECE_PROTOCOL},
    rate::RateLimiter,
    wire::{
        encode_authority, AuthorityEvent, DigestRequest, DigestResponse, MasterRequest,
        MasterResponse, Source,
    },
    FileId, VerifiedManifest,
};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::bans::{BanBook, BanConfig, ProbeOutcome, Verdict};
use crate::config::{MasterConfig, MasterError};
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::registry::Registry;
use crate::serve::{Shelf, ShelfEntry};

pub(crate) enum Command {
    Status(
        FileId,
        oneshot::Sender<Option<shoal_protocol::wire::FileStatus>>,
    ),
    Shutdown(oneshot::Sender<()>),
}

pub(crate) enum Internal {
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
        let mut listeners = std::collections::HashSet::new();
        for addr in &cfg.listen {
            let id = swarm.listen_on(addr.clone()).map_err(|e| {
                net(&format!(
                    "cannot listen on {addr}: {}",
                    shoal_net::cli::error_chain(&e)
                ))
            })?;
            listeners.insert(id);
        }
        // Wait until every listener reported an address; a wildcard listener (0.0.0.0)
        // reports one per interface in a burst, so keep taking them until a quiet moment:
        // the operator is shown every address, not just the first.
        let wildcard = cfg.listen.iter().any(|a| {
            a.iter().any(|p| match p {
                Protocol::Ip4(ip) => ip.is_unspecified(),
                Protocol::Ip6(ip) => ip.is_unspecified(),
                _ => false,
            })
        });
        let mut addrs = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let until = if listeners.is_empty() {
                if !wildcard {
                    break;
                }
                deadline.min(tokio::time::Instant::now() + Duration::from_millis(300))
            } else {
                deadline
            };
            match tokio::time::timeout_at(until, swarm.select_next_some()).await {
                Ok(SwarmEvent::NewListenAddr {
                    address,
                    listener_id,
                }) => {
                    listeners.remove(&listener_id);
                    addrs.push(address.with(Protocol::P2p(peer_id)))
                }
                Ok(SwarmEvent::ListenerError { error, .. }) => return Err(net(&error)),
                Ok(SwarmEvent::ListenerClosed { reason, .. }) => {
                    return Err(net(&format!("listener closed: {reason:?}")))
                }
                Ok(_) => {}
                Err(_) if listeners.is_empty() => break,
                Err(_) => return Err(net(&"timed out waiting for listeners")),
            }
        }
        // Addresses another machine can dial first.
        addrs.sort_by_key(|a| {
            a.iter().any(|p| match p {
                Protocol::Ip4(ip) => ip.is_loopback(),
                Protocol::Ip6(ip) => ip.is_loopback(),
                _ => false,
            })
        });
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

    /// Dialable addresses, each ending in `/p2p/<PeerId>`, non-loopback ones first.
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

pub(crate) struct EventLoop {
    pub(crate) cfg: MasterConfig,
    pub(crate) swarm: Swarm<Behaviour>,
    pub(crate) policy: Policy,
    pub(crate) shelf: Arc<Mutex<Shelf>>,
    pub(crate) limiter: Option<Arc<Mutex<RateLimiter>>>,
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) registry: Registry,
    pub(crate) key: libp2p::identity::Keypair,
    pub(crate) metrics: Metrics,
    pub(crate) internal_tx: mpsc::Sender<Internal>,
    pub(crate) pulling: HashMap<FileId, PeerId>,
    pub(crate) bans: BanBook,
    /// Every address the master listens on (a `0.0.0.0` listener reports one per interface,
    /// over time); `bootstrap.addr` is rewritten as they come and go.
    pub(crate) listen_addrs: Vec<Multiaddr>,
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

    pub(crate) fn register(
        &mut self,
        manifest: Arc<VerifiedManifest>,
        path: PathBuf,
        have: Blocks,
    ) {
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

    pub(crate) fn publish(&mut self, event: AuthorityEvent) {
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
                self.on_report(peer, file, culprit, problem);
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
}
