//! The master's event loop: owns the swarm and routes each event to the module whose concern
//! it is (announce, pull, serve, report, enforce, registry).
//!
//! The loop is the only owner of the [`Swarm`] and the [`Policy`]. It never awaits the disk
//! or a peer: piece serving is the shared server's ([`shoal_net::serve`]) task, pulls,
//! manifest writes and rescans run as tasks (their disk work on the blocking pool) and report
//! back over a bounded channel, and small state files go through the [`DiskWriter`]. The
//! loop and the piece server are critical tasks: a panic in either ends the master
//! ([`Master::wait`] returns it, the binary exits non-zero).

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use libp2p::{
    gossipsub, identify, multiaddr::Protocol, request_response, swarm::SwarmEvent, Multiaddr,
    PeerId, Swarm,
};
use shoal_net::{
    relay_meter::RelayMeter,
    serve::{PieceServer, ServeConfig},
    swarm::{build_swarm, SwarmOptions},
    task::{spawn_critical, CriticalTask},
};
use shoal_protocol::{
    behaviour::{Behaviour, BehaviourEvent, Role},
    block::{BlockRange, Blocks},
    limits::{MAX_HINT_ADDRS, MAX_REGION_LEN},
    relay::{circuit_addr, is_relayed},
    wire::{
        encode_authority, AuthorityEvent, DigestRequest, DigestResponse, MasterRequest,
        MasterResponse, Source,
    },
    FileId, VerifiedManifest,
};
use tokio::sync::{mpsc, oneshot};

use crate::announce::{PublishGate, Storing};
use crate::bans::{BanBook, BanConfig, ProbeOutcome};
use crate::config::{MasterConfig, MasterError};
use crate::metrics::Metrics;
use crate::policy::{Policy, PolicyConfig, MAX_RELAYED_HINTS};
use crate::probe::ProbeQueue;
use crate::pull::{PullError, PullTask};
use crate::registry::{DiskWriter, Registry, StoredFile};
use crate::report::ProbeJob;
use crate::serve::{MasterSource, Shelf, ShelfEntry};

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
        publisher: PeerId,
        result: Result<(), PullError>,
    },
    Stored(Box<Storing>, Result<Arc<VerifiedManifest>, String>),
    Rescanned(Vec<(StoredFile, Blocks)>),
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
    /// The event loop, until it was waited for.
    event_loop: Option<CriticalTask>,
    server: CriticalTask,
}

impl Drop for Master {
    fn drop(&mut self) {
        // The server holds no swarm: stop it with the master.
        self.server.abort_handle().abort();
    }
}

impl Master {
    /// Starts a master: opens its data dir, listens, and returns once every listener is up.
    pub async fn start(cfg: MasterConfig) -> Result<Self, MasterError> {
        let registry = Registry::open(&cfg.data_dir)?;
        let key = registry.key()?;
        let peer_id = key.public().to_peer_id();
        let net = |e: &dyn std::fmt::Display| MasterError::Network(e.to_string());
        let relay_meter = RelayMeter::default();
        let mut swarm = build_swarm(
            key.clone(),
            &SwarmOptions::for_role(Role::Master)
                .with_caps(cfg.connection_caps.clone())
                .with_relay(cfg.relay.clone())
                .with_relay_meter(relay_meter.clone()),
        )
        .map_err(|e| net(&e))?;
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
                    // Nodes dial the master where it listens: the relay hands these out in
                    // reservations (it refuses reservations while it has none).
                    swarm.add_external_address(address.clone());
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
        let path = registry.dir().join("bootstrap.addr");
        tokio::task::spawn_blocking(move || {
            crate::registry::write_atomic(&path, addr_file.as_bytes())
        })
        .await
        .map_err(|e| MasterError::Network(e.to_string()))??;

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
        let shelf = Arc::new(Mutex::new(Shelf::default()));
        let incoming = swarm
            .behaviour_mut()
            .pieces
            .take_incoming()
            .ok_or_else(|| net(&"the piece stream queue was taken"))?;
        let server = PieceServer::new(
            Arc::new(MasterSource {
                shelf: shelf.clone(),
                metrics: metrics.clone(),
                internal: int_tx.clone(),
            }),
            ServeConfig::default()
                .with_upload_slots(cfg.upload_slots)
                .with_max_upload_rate(cfg.max_upload_rate),
        );
        let mut lp = EventLoop {
            policy: Policy::new(PolicyConfig {
                // What the policy hands out, the piece server must be able to take.
                master_slots: u32::try_from(cfg.upload_slots).unwrap_or(u32::MAX),
                // ... and what its upload cap sends soon (lone pieces, `LONE_HORIZON`).
                master_upload_rate: cfg.max_upload_rate,
                ..cfg.policy.clone()
            }),
            shelf,
            registry,
            key,
            metrics: metrics.clone(),
            internal_tx: int_tx,
            gate: PublishGate::new(cfg.publishing.clone(), peer_id, cfg.max_pulls),
            storing: HashMap::new(),
            pulling: HashMap::new(),
            awaiting: HashMap::new(),
            rescanning: false,
            writer: DiskWriter::spawn(),
            bans: BanBook::new(BanConfig::default()),
            probes: ProbeQueue::default(),
            listen_addrs: addrs.clone(),
            relay_meter,
            relayed_counted: 0,
            relay_reservations: HashSet::new(),
            cfg,
            swarm,
        };
        lp.load_bans();
        // The first scan is awaited (off the loop, which is not running yet): a master that
        // is up serves what its data dir holds, partial pulls re-checked block by block.
        let reg = lp.registry.clone();
        let stored = tokio::task::spawn_blocking(move || scan(&reg, &HashSet::new(), usize::MAX))
            .await
            .map_err(|e| MasterError::Network(format!("registry scan failed: {e}")))?;
        lp.on_rescanned(stored);
        let server = spawn_critical("master piece server", server.run(incoming));
        let event_loop = spawn_critical("master event loop", lp.run(cmd_rx, int_rx));
        Ok(Self {
            peer_id,
            addrs,
            metrics,
            metrics_addr,
            commands: cmd_tx,
            event_loop: Some(event_loop),
            server,
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
    pub async fn shutdown(mut self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
        let _ = self.wait().await;
    }

    /// Waits until the loop ends (it runs until shut down). An error says the event loop or
    /// the piece server panicked: the master is not serving, and the binary exits non-zero.
    pub async fn wait(&mut self) -> Result<(), MasterError> {
        let Some(event_loop) = self.event_loop.take() else {
            return Ok(());
        };
        let server = self.server.watch();
        tokio::select! {
            r = event_loop.wait() => r.map_err(|p| MasterError::Crashed(p.to_string())),
            p = server.panicked() => Err(MasterError::Crashed(p.to_string())),
        }
    }
}

/// Most new files one rescan registers (the rest wait for the next one).
const RESCAN_BATCH: usize = 64;

/// Stored files not in `known` (up to `max`), with the blocks each holds (complete files all;
/// partial ones checked block by block). Blocking: runs on the blocking pool.
fn scan(registry: &Registry, known: &HashSet<FileId>, max: usize) -> Vec<(StoredFile, Blocks)> {
    registry
        .scan_new(known, max)
        .into_iter()
        .map(|f| {
            let have = Registry::held_blocks(&f);
            (f, have)
        })
        .collect()
}

pub(crate) struct EventLoop {
    pub(crate) cfg: MasterConfig,
    pub(crate) swarm: Swarm<Behaviour>,
    pub(crate) policy: Policy,
    pub(crate) shelf: Arc<Mutex<Shelf>>,
    pub(crate) registry: Registry,
    pub(crate) key: libp2p::identity::Keypair,
    pub(crate) metrics: Metrics,
    pub(crate) internal_tx: mpsc::Sender<Internal>,
    /// Who may publish; what each publisher holds and pulls.
    pub(crate) gate: PublishGate,
    /// Announces being checked and stored off the loop, with their sizes.
    pub(crate) storing: HashMap<FileId, u64>,
    /// Pulls running.
    pub(crate) pulling: HashMap<FileId, PullTask>,
    /// Incomplete files whose pull stopped, by publisher: resumed when it reconnects or
    /// announces again.
    pub(crate) awaiting: HashMap<FileId, PeerId>,
    /// Whether a rescan of the data dir is running (at most one at a time).
    pub(crate) rescanning: bool,
    /// Small state files, written off the loop.
    pub(crate) writer: DiskWriter,
    pub(crate) bans: BanBook,
    /// Probes running and waiting (bounded).
    pub(crate) probes: ProbeQueue<ProbeJob>,
    /// Every address the master listens on (a `0.0.0.0` listener reports one per interface,
    /// over time); `bootstrap.addr` is rewritten as they come and go.
    pub(crate) listen_addrs: Vec<Multiaddr>,
    /// Bytes the relay carried (counted under the muxers), and how many of them are in
    /// `metrics.relayed_bytes` yet.
    pub(crate) relay_meter: RelayMeter,
    pub(crate) relayed_counted: u64,
    /// Nodes holding a reservation on the relay (bounded by the relay's own cap).
    pub(crate) relay_reservations: HashSet<PeerId>,
}

impl EventLoop {
    fn write_bootstrap_addrs(&self) {
        let text: String = self.listen_addrs.iter().map(|a| format!("{a}\n")).collect();
        self.writer.write(
            self.registry.dir().join("bootstrap.addr"),
            text.into_bytes(),
        );
    }

    /// Looks for files added with `shoal-master add` (new names only), off the loop.
    fn rescan(&mut self) {
        if self.rescanning {
            return;
        }
        self.rescanning = true;
        let known = self.known_files();
        let reg = self.registry.clone();
        let internal = self.internal_tx.clone();
        tokio::spawn(async move {
            let found = tokio::task::spawn_blocking(move || scan(&reg, &known, RESCAN_BATCH))
                .await
                .unwrap_or_default();
            let _ = internal.send(Internal::Rescanned(found)).await;
        });
    }

    /// Registers what a scan found (skipping what became known meanwhile).
    fn on_rescanned(&mut self, found: Vec<(StoredFile, Blocks)>) {
        self.rescanning = false;
        for (f, have) in found {
            let id = f.manifest.id();
            if self.policy.has_file(&id) || self.storing.contains_key(&id) {
                continue;
            }
            let publisher = f.manifest.publisher();
            tracing::info!(file = %id, name = %f.manifest.body().name, complete = f.complete, held = have.count(), "registered file");
            self.gate.add_file(publisher, f.manifest.body().size);
            let announce = have.is_full().then(|| AuthorityEvent::FileAnnounced {
                file: id,
                name: f.manifest.body().name.clone(),
                size: f.manifest.body().size,
            });
            if !have.is_full() {
                self.awaiting.insert(id, publisher);
            }
            self.register(f.manifest, f.path, have);
            // Files added with `shoal-master add` are announced like published ones.
            if let Some(event) = announce {
                self.publish(event);
            }
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
        self.shelf
            .lock()
            .expect("shelf lock")
            .files
            .insert(id, ShelfEntry::new(manifest, path, have));
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
        let mut rescan = tokio::time::interval(self.cfg.rescan_interval);
        let mut expire = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                Some(msg) = internal.recv() => self.on_internal(msg),
                cmd = commands.recv() => match cmd {
                    Some(Command::Status(file, tx)) => { let _ = tx.send(self.file_status(&file)); }
                    Some(Command::Shutdown(tx)) => {
                        self.writer.flush().await;
                        let _ = tx.send(());
                        return;
                    }
                    None => return,
                },
                _ = rescan.tick() => self.rescan(),
                _ = expire.tick() => {
                    let now = Instant::now();
                    self.policy.expire(now);
                    self.policy.expire_avoidance(now);
                    self.bans.expire(now);
                    self.count_relayed();
                }
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
                peer_id,
                endpoint,
                connection_id,
                num_established,
                ..
            } => {
                if self.policy.is_banned(&peer_id) {
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                if endpoint.is_dialer() && num_established.get() > 1 {
                    // The master dials a peer it is already connected to only for an AutoNAT
                    // dial-back, whose answer was settled when this connection came up. Kept,
                    // it would hold the peer's second connection slot (and run every protocol
                    // twice) until idle: the peer's next probe would then be refused over the
                    // per-peer cap and tell a reachable node it is not.
                    tracing::trace!(%peer_id, "dial-back done: closing its connection");
                    self.swarm.close_connection(connection_id);
                    return;
                }
                tracing::debug!(%peer_id, addr = %endpoint.get_remote_address(), "peer connected");
                self.policy.peer_up(peer_id, Vec::new());
                // The address the connection comes from (dialed, or the listener's send-back
                // address): observed, unlike the region label, so it gives the prefix tier.
                self.policy
                    .observe_addr(peer_id, endpoint.get_remote_address());
                self.resume_pulls_from(peer_id);
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
                self.bans.peer_gone(&peer_id);
                // Out of the routing table too: a live node keeps a connection to the master
                // (it dials again within seconds of losing it, and identify then puts it
                // back), so a peer with none is most likely gone. libp2p-kad would otherwise
                // keep it for good (nobody fails a query through the master's own table), and
                // hand it to every node's bootstrap lookup, which dials it.
                self.swarm.behaviour_mut().kad.remove_peer(&peer_id);
                // Its reservation went with its connection.
                self.relay_reservations.remove(&peer_id);
                self.metrics
                    .relay_reservations
                    .set(self.relay_reservations.len() as i64);
                if self.policy.peer_down(&peer_id) {
                    tracing::info!(%peer_id, "mirror gone");
                    self.publish(AuthorityEvent::MirrorRemoved { peer: peer_id });
                }
            }
            SwarmEvent::NewListenAddr { address, .. } => {
                let address = address.with(Protocol::P2p(*self.swarm.local_peer_id()));
                tracing::info!(%address, "listening");
                self.swarm.add_external_address(
                    address
                        .iter()
                        .filter(|p| !matches!(p, Protocol::P2p(_)))
                        .collect(),
                );
                if !self.listen_addrs.contains(&address) {
                    self.listen_addrs.push(address);
                    self.write_bootstrap_addrs();
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.swarm.remove_external_address(&address);
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
                    // Relayed addresses are the master's to hint (through its own relay,
                    // while the peer holds a reservation there), never the peer's claim.
                    .filter(|a| !is_relayed(a))
                    // A peer names as many addresses as it likes; the master keeps a hint's worth.
                    .take(MAX_HINT_ADDRS)
                    .collect();
                // Kademlia hands these out to anyone looking the peer up: for a peer behind
                // a NAT, only its addresses through the relay (its own would hang dials).
                if !self.policy.is_relayed(&peer_id) {
                    self.swarm.behaviour_mut().feed_kad(&peer_id, &addrs);
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
            })) => self.on_announce(peer, request, channel),
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
                result: Ok(rtt),
                ..
            })) => self.policy.master_rtt(peer, rtt),
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
                propagation_source,
                message_id,
                message,
            })) => {
                // The master is the authority; it acts on nobody's gossip, and relays none:
                // it never receives its own messages, so every message it is sent is
                // rejected (and costs its sender score).
                let me = *self.swarm.local_peer_id();
                let (acceptance, _) =
                    shoal_protocol::behaviour::authority_acceptance(&me, &message);
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, acceptance);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Relay(event)) => self.on_relay(event),
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(
                libp2p::autonat::Event::InboundProbe(probe),
            )) => tracing::debug!(?probe, "reachability probe"),
            other => tracing::trace!(?other, "swarm event"),
        }
    }

    /// What the master knows of `file`, with the bytes its relay carried.
    fn file_status(&self, file: &FileId) -> Option<shoal_protocol::wire::FileStatus> {
        let mut s = self.policy.status(file)?;
        s.relayed_bytes = self.relay_meter.bytes();
        Some(s)
    }

    /// Brings `relayed_bytes` up to the meter.
    fn count_relayed(&mut self) {
        let now = self.relay_meter.bytes();
        self.metrics
            .relayed_bytes
            .inc_by(now.saturating_sub(self.relayed_counted));
        self.relayed_counted = now;
    }

    /// Where `peer` is reachable through the relay: `<master addr>/p2p-circuit/p2p/<peer>`
    /// for the master's first addresses (not loopback, TCP first).
    fn circuit_hints(&self, peer: PeerId) -> Vec<Multiaddr> {
        let mut mine: Vec<&Multiaddr> = self.listen_addrs.iter().collect();
        let loopback = |a: &Multiaddr| {
            a.iter().any(|p| match p {
                Protocol::Ip4(ip) => ip.is_loopback(),
                Protocol::Ip6(ip) => ip.is_loopback(),
                _ => false,
            })
        };
        let udp = |a: &Multiaddr| a.iter().any(|p| matches!(p, Protocol::Udp(_)));
        mine.sort_by_key(|a| (loopback(a), udp(a)));
        mine.into_iter()
            .filter_map(|a| circuit_addr(a, peer))
            .take(MAX_RELAYED_HINTS)
            .collect()
    }

    fn on_relay(&mut self, event: libp2p::relay::Event) {
        use libp2p::relay::Event;
        match event {
            Event::ReservationReqAccepted { src_peer_id, .. } => {
                tracing::info!(peer = %src_peer_id, "node listens through the relay");
                self.relay_reservations.insert(src_peer_id);
                let hints = self.circuit_hints(src_peer_id);
                // In Kademlia too: the addresses it declared give way to the relayed ones.
                let kad = &mut self.swarm.behaviour_mut().kad;
                kad.remove_peer(&src_peer_id);
                for a in &hints {
                    kad.add_address(&src_peer_id, a.clone());
                }
                self.policy.set_relayed(src_peer_id, hints);
            }
            Event::ReservationClosed { src_peer_id }
            | Event::ReservationTimedOut { src_peer_id } => {
                self.relay_reservations.remove(&src_peer_id);
                self.policy.set_relayed(src_peer_id, Vec::new());
            }
            Event::ReservationReqDenied {
                src_peer_id,
                status,
            } => {
                tracing::debug!(peer = %src_peer_id, ?status, "relay reservation refused");
                self.metrics.relay_refused.inc();
            }
            Event::CircuitReqAccepted {
                src_peer_id,
                dst_peer_id,
            } => {
                tracing::debug!(src = %src_peer_id, dst = %dst_peer_id, "circuit opened");
                self.metrics.relay_circuits.inc();
            }
            Event::CircuitReqDenied {
                src_peer_id,
                dst_peer_id,
                status,
            } => {
                tracing::debug!(src = %src_peer_id, dst = %dst_peer_id, ?status, "circuit refused");
                self.metrics.relay_refused.inc();
            }
            Event::CircuitClosed {
                src_peer_id,
                dst_peer_id,
                error,
            } => {
                tracing::debug!(src = %src_peer_id, dst = %dst_peer_id, ?error, "circuit closed");
                self.metrics.relay_circuits.dec();
                self.count_relayed();
            }
            other => tracing::debug!(?other, "relay event"),
        }
        self.metrics
            .relay_reservations
            .set(self.relay_reservations.len() as i64);
    }

    fn on_master_request(&mut self, peer: PeerId, request: MasterRequest) -> MasterResponse {
        if self.policy.is_banned(&peer) {
            return MasterResponse::Refused {
                reason: "banned".into(),
            };
        }
        match request {
            MasterRequest::Locate { file, need } => {
                let now = Instant::now();
                // What went out lately sizes a lone requester's pieces when no
                // `--max-upload-rate` does (`Policy::master_sent`).
                self.policy
                    .master_sent(now, self.metrics.piece_bytes_sent.get());
                // The policy merges and clamps the ranges before it walks them.
                match self.policy.locate(now, peer, &file, &need) {
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
                // The policy merges and clamps the ranges before it walks them.
                self.policy.have(&file, peer, &ranges);
                if self.awaiting.get(&file) == Some(&peer) {
                    // The publisher of a file whose pull stopped is back with it.
                    self.resume_pulls_from(peer);
                }
                MasterResponse::Ack
            }
            MasterRequest::Report {
                file,
                peer: culprit,
                problem,
            } => self.on_report(peer, file, culprit, problem),
            MasterRequest::Status { file } => match self.file_status(&file) {
                Some(s) => MasterResponse::Status(Box::new(s)),
                None => MasterResponse::Refused {
                    reason: format!("unknown file {file}"),
                },
            },
            MasterRequest::Hello { region } => {
                self.policy
                    .set_region(peer, region.chars().take(MAX_REGION_LEN).collect());
                MasterResponse::Ack
            }
            MasterRequest::List => crate::listing::list(&self.policy),
            MasterRequest::Rtt { samples } => {
                match self.policy.rtt_report(Instant::now(), peer, &samples) {
                    Ok(taken) => {
                        tracing::trace!(%peer, taken, "rtt report");
                        MasterResponse::Ack
                    }
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "rtt report refused");
                        MasterResponse::Refused {
                            reason: e.to_string(),
                        }
                    }
                }
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
        let entry = shelf.files.get(&request.file());
        request.answer(entry.map(|e| &*e.manifest), entry.map(|e| &e.have))
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
            Internal::Probed { suspect, outcome } => self.on_probed(suspect, outcome),
            Internal::PullFinished {
                file,
                publisher,
                result,
            } => self.on_pull_finished(file, publisher, result),
            Internal::Stored(storing, result) => self.on_stored(*storing, result),
            Internal::Rescanned(found) => self.on_rescanned(found),
        }
    }
}
