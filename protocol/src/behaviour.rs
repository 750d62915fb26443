//! The libp2p behaviour every shoal peer runs, master and node alike.
//!
//! Composing it here keeps the two sides speaking exactly the same protocols with the same
//! caps. It is transport-agnostic: the binaries add TCP (or the memory transport in tests).

// The NetworkBehaviour derive generates a `BehaviourEvent` enum whose variants carry no docs.
#![allow(missing_docs)]

use std::time::Duration;

use libp2p::{
    autonat, connection_limits, dcutr, gossipsub, identify,
    identity::Keypair,
    kad, memory_connection_limits, ping, relay, request_response,
    swarm::{behaviour::toggle::Toggle, NetworkBehaviour},
    Multiaddr, PeerId, StreamProtocol,
};

use crate::limits::{
    DIGEST_PROTOCOL, KAD_PROTOCOL, MASTER_PROTOCOL, MAX_HINT_ADDRS, PUBLISH_PROTOCOL,
};
use crate::wire::{DigestCodec, MasterCodec, PublishCodec};

/// Identify protocol version string of shoal.
pub const IDENTIFY_PROTOCOL: &str = "/shoal/id/1";

/// How often a peer pings each peer it is connected to (the first ping goes out when the
/// connection opens). The pings measure the RTTs a node reports to the master and the master
/// ranks by (they change slowly), and catch a peer that hangs while its kernel still answers.
/// A peer that vanished without closing its connections is found by the kernel's TCP
/// keepalive instead (`shoal_net::tcp`, 30-60 s), which wakes neither process: pinging
/// each of 1,000 idle nodes every 5 s cost the master about 30% of its idle CPU, and in a
/// crowd, where every node ends up connected to nearly every other one, 5 s pings cost a
/// 48-node swarm about 0.3 CPU-seconds per second while it sat idle. libp2p-ping reports a
/// failure only from the second in a row (the next ping goes out 30 s after a failure), so a
/// hung peer is dropped 80 s after its last answer, 50-80 s after it hung.
pub const PING_INTERVAL: Duration = Duration::from_secs(30);

/// How long a ping may go unanswered before it counts as failed.
pub const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// Gossipsub's heartbeat (libp2p's default). Authority events do not wait for it: the master
/// publishes each one to every subscribed peer at once (flood publishing), and peers forward
/// what they accept to their mesh at once. The heartbeat mends the mesh, reads peers' scores
/// and sends IHAVE gossip from the message cache (how a peer that missed a message gets it
/// later), and each one walks every peer: at 500 ms a 48-node crowd used about 7% more CPU
/// (see ARCHITECTURE, "Pings and heartbeats").
pub const GOSSIP_HEARTBEAT: Duration = Duration::from_secs(1);

/// Caps on connections, enforced by libp2p before any protocol runs. A connection over a cap
/// is refused (or closed) at once; the peer may try again later.
#[derive(Clone, Debug)]
pub struct ConnectionCaps {
    /// Established connections with any one peer. Default 2 (a simultaneous dial can make two).
    pub per_peer: u32,
    /// Incoming connections still in their handshake. Default 64.
    pub pending_incoming: u32,
    /// Established incoming connections in all. Default 4,096 (master) / 512 (node).
    pub established_incoming: u32,
    /// Established connections in all. Default 5,000 (master) / 1,024 (node).
    pub established_total: u32,
    /// New connections are refused while the process uses more than this fraction of the
    /// machine's memory. Default 0.9.
    pub max_memory_fraction: f64,
}

impl ConnectionCaps {
    /// The defaults for `role`.
    pub fn for_role(role: Role) -> Self {
        let (established_incoming, established_total) = match role {
            Role::Master => (4_096, 5_000),
            Role::Node => (512, 1_024),
        };
        Self {
            per_peer: 2,
            pending_incoming: 64,
            established_incoming,
            established_total,
            max_memory_fraction: 0.9,
        }
    }

    /// The defaults for `role` with `total` established connections in all, and the incoming
    /// cap that follows from it.
    ///
    /// The master's connections are nearly all incoming (nodes dial it; it dials for AutoNAT
    /// dial-backs, Kademlia, and pulls from publishers that left), so its incoming cap grows
    /// with `total`, keeping back
    /// a fifth of it, at most 904 (the default's 5,000 - 4,096), for its own dials: with
    /// `--max-connections 12000` it takes 11,096 nodes, where a fixed 4,096 would have
    /// refused every node past that whatever the operator asked for. A node dials at least as
    /// much as it is dialed, so its incoming cap stays at most its default.
    pub fn for_role_with_total(role: Role, total: u32) -> Self {
        let defaults = Self::for_role(role);
        let established_incoming = match role {
            Role::Master => {
                let reserve = defaults.established_total - defaults.established_incoming;
                total - (total / 5).min(reserve)
            }
            Role::Node => defaults.established_incoming.min(total),
        };
        Self {
            established_incoming,
            established_total: total,
            ..defaults
        }
    }
}

/// All protocols of a shoal peer.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Connection caps (first, so that refused connections reach no protocol).
    pub limits: connection_limits::Behaviour,
    /// Refuses connections while memory is short.
    pub memory: memory_connection_limits::Behaviour,
    /// `/shoal/master/1`.
    pub master: request_response::Behaviour<MasterCodec>,
    /// `/shoal/publish/1`: announces, the one large request.
    pub publish: request_response::Behaviour<PublishCodec>,
    /// `/shoal/digest/1`.
    pub digest: request_response::Behaviour<DigestCodec>,
    /// Outbound `/shoal/piece/1` streams (through its `Control`).
    pub stream: libp2p_stream::Behaviour,
    /// Inbound `/shoal/piece/1` streams, queued for the piece server.
    pub pieces: crate::inbound::Behaviour,
    /// The authority topic.
    pub gossipsub: gossipsub::Behaviour,
    /// `/shoal/kad/1`.
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    /// Addresses.
    pub identify: identify::Behaviour,
    /// Liveness.
    pub ping: ping::Behaviour,
    /// Circuit relay v2 server: the master only (see [`crate::relay`]).
    pub relay: Toggle<relay::Behaviour>,
    /// Circuit relay v2 client: nodes listen through the master's relay when unreachable.
    pub relay_client: Toggle<relay::client::Behaviour>,
    /// Hole punching over a relayed connection: nodes only.
    pub dcutr: Toggle<dcutr::Behaviour>,
    /// Reachability: the master answers, nodes ask the master.
    pub autonat: autonat::Behaviour,
}

/// Whether this peer answers master requests (the master) or makes them (a node).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The master: serves `/shoal/master/1`, is a Kademlia server.
    Master,
    /// A node: asks the master, serves digests.
    Node,
}

/// Which addresses identify tells other peers to dial this peer at (and so which addresses
/// the master hints for it and peers feed into Kademlia).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Advertise {
    /// The addresses it listens on and its external addresses. The default.
    #[default]
    Listening,
    /// Only its external addresses (`Swarm::add_external_address`): for a peer reachable
    /// elsewhere than where it listens (a port forward, a public address in front of it).
    ExternalOnly,
}

/// Why the behaviour could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the shoal behaviour: {0}")]
pub struct BehaviourError(String);

impl Behaviour {
    /// Builds the behaviour for `key` in `role`, with `caps` on connections, advertising the
    /// addresses `advertise` says. `relay_client` is the relay client the swarm builder made
    /// (a node's; `None` for the master, or where the transport has no relay client);
    /// `relay` caps the master's relay server (a node runs none).
    pub fn new(
        key: &Keypair,
        role: Role,
        caps: &ConnectionCaps,
        advertise: Advertise,
        relay_client: Option<relay::client::Behaviour>,
        relay: &crate::relay::RelayLimits,
    ) -> Result<Self, BehaviourError> {
        let peer = key.public().to_peer_id();
        let limits = connection_limits::Behaviour::new(
            connection_limits::ConnectionLimits::default()
                .with_max_established_per_peer(Some(caps.per_peer))
                .with_max_pending_incoming(Some(caps.pending_incoming))
                .with_max_established_incoming(Some(caps.established_incoming))
                .with_max_established(Some(caps.established_total)),
        );
        let memory = memory_connection_limits::Behaviour::with_max_percentage(
            caps.max_memory_fraction.clamp(0.05, 1.0),
        );
        // Inbound request streams per connection: a peer cannot queue more work than this.
        let rr_cfg = request_response::Config::default()
            .with_request_timeout(Duration::from_secs(30))
            .with_max_concurrent_streams(64);
        let (master_support, digest_support) = match role {
            Role::Master => (
                request_response::ProtocolSupport::Inbound,
                request_response::ProtocolSupport::Full,
            ),
            Role::Node => (
                request_response::ProtocolSupport::Outbound,
                request_response::ProtocolSupport::Full,
            ),
        };
        let master = request_response::Behaviour::with_codec(
            MasterCodec::default(),
            [(MASTER_PROTOCOL, master_support.clone())],
            rr_cfg.clone(),
        );
        let publish = request_response::Behaviour::with_codec(
            PublishCodec::default(),
            [(PUBLISH_PROTOCOL, master_support)],
            rr_cfg.clone(),
        );
        let digest = request_response::Behaviour::with_codec(
            DigestCodec::default(),
            [(DIGEST_PROTOCOL, digest_support)],
            rr_cfg,
        );
        let gossip_cfg = gossipsub::ConfigBuilder::default()
            .heartbeat_interval(GOSSIP_HEARTBEAT)
            .validation_mode(gossipsub::ValidationMode::Strict)
            // Nothing is forwarded before the shell said Accept: only the master's messages
            // on the authority topic are (see `authority_acceptance`).
            .validate_messages()
            .max_transmit_size(crate::limits::MAX_AUTHORITY_EVENT * 2)
            .build()
            .map_err(|e| BehaviourError(e.to_string()))?;
        let mut gossipsub = gossipsub::Behaviour::new(
            gossipsub::MessageAuthenticity::Signed(key.clone()),
            gossip_cfg,
        )
        .map_err(|e| BehaviourError(e.to_string()))?;
        let (params, thresholds) = authority_scoring();
        gossipsub
            .with_peer_score(params, thresholds)
            .map_err(BehaviourError)?;
        let mut kad_cfg = kad::Config::new(KAD_PROTOCOL);
        kad_cfg
            // Lookups run while the master may be gone: they must end soon.
            .set_query_timeout(KAD_QUERY_TIMEOUT)
            // Provider records are refreshed every 30 min and forgotten 2 h after the last
            // refresh (a node that crashed is no provider for long).
            .set_provider_publication_interval(Some(PROVIDER_REFRESH))
            .set_provider_record_ttl(Some(PROVIDER_TTL));
        if role == Role::Master {
            // Nodes are Kademlia clients while the master answers, so a lookup by PeerId finds
            // a node only in the master's own table: room for 256 per bucket instead of 20
            // (a few buckets hold nearly all of a swarm, so this keeps most nodes of a
            // thousand; at most about 256 x 8 entries, each bounded by `feed_kad`).
            kad_cfg.set_kbucket_size(std::num::NonZeroUsize::new(256).expect("256 > 0"));
            // The master is where everyone starts: it has nobody to bootstrap from (a periodic
            // bootstrap would warn "No known peers" every 5 minutes while no node is
            // connected) and learns its routing table from the nodes that connect.
            kad_cfg.set_periodic_bootstrap_interval(None);
        }
        // The store is bounded by libp2p's defaults: 1,024 records, 1,024 keys this peer
        // provides, 20 providers per key.
        let mut kad =
            kad::Behaviour::with_config(peer, kad::store::MemoryStore::new(peer), kad_cfg);
        // The master always answers DHT queries. A node starts as a client: while the master
        // answers, the DHT is not needed to find anything (the master knows every node's
        // addresses and answers lookups by PeerId itself), and a crowd of nodes answering
        // each other's bootstrap queries cost 2-3 CPU-seconds in a 24-node crowd. The node
        // turns server when the master does not answer (`shoal_node`'s event loop), so that
        // the swarm can go on without it.
        kad.set_mode(Some(match role {
            Role::Master => kad::Mode::Server,
            Role::Node => kad::Mode::Client,
        }));
        let identify = identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
                .with_agent_version(format!("shoal/{}", env!("CARGO_PKG_VERSION")))
                .with_hide_listen_addrs(advertise == Advertise::ExternalOnly),
        );
        let ping = ping::Behaviour::new(
            ping::Config::new()
                .with_interval(PING_INTERVAL)
                .with_timeout(PING_TIMEOUT),
        );
        let relay_server = (role == Role::Master && relay.enabled).then(|| {
            let mut server = relay::Behaviour::new(peer, relay.server_config());
            // The master is reachable by definition (nodes dial it): advertise the hop
            // protocol without waiting for a confirmed external address.
            server.set_status(Some(relay::Status::Enable));
            server
        });
        let (dcutr, autonat) = match role {
            Role::Master => (
                None,
                autonat::Behaviour::new(peer, crate::relay::master_autonat()),
            ),
            Role::Node => (
                Some(dcutr::Behaviour::new(peer)),
                autonat::Behaviour::new(peer, crate::relay::node_autonat()),
            ),
        };
        Ok(Self {
            limits,
            memory,
            master,
            publish,
            digest,
            stream: libp2p_stream::Behaviour::new(),
            pieces: crate::inbound::Behaviour::new(
                crate::limits::PIECE_PROTOCOL,
                crate::inbound::DEFAULT_QUEUE,
            ),
            gossipsub,
            kad,
            identify,
            ping,
            relay: Toggle::from(relay_server),
            relay_client: Toggle::from(relay_client),
            dcutr: Toggle::from(dcutr),
            autonat,
        })
    }

    /// Puts `addrs` (filtered and capped by the caller) into Kademlia's routing table as
    /// `peer`'s. libp2p-kad keeps every address it is given, so an entry that would grow past
    /// twice [`MAX_HINT_ADDRS`] is replaced instead: a peer that keeps announcing new
    /// addresses cannot grow its entry, and the scans over it, without bound.
    pub fn feed_kad(&mut self, peer: &PeerId, addrs: &[Multiaddr]) {
        let held = self
            .kad
            .kbucket(*peer)
            .and_then(|b| {
                b.iter()
                    .find(|e| e.node.key.preimage() == peer)
                    .map(|e| e.node.value.len())
            })
            .unwrap_or(0);
        if held + addrs.len() > 2 * MAX_HINT_ADDRS {
            self.kad.remove_peer(peer);
        }
        for a in addrs.iter().take(MAX_HINT_ADDRS) {
            self.kad.add_address(peer, a.clone());
        }
    }

    /// The gossipsub topic of authority events.
    pub fn authority_topic() -> gossipsub::IdentTopic {
        gossipsub::IdentTopic::new(crate::limits::AUTHORITY_TOPIC)
    }
}

/// Gossipsub peer scoring for the authority topic.
///
/// Only the master speaks on it, and every peer validates before it forwards, so an honest
/// peer never relays an invalid message: each rejected message costs its sender
/// [`INVALID_MESSAGE_WEIGHT`] times the square of its count of invalid messages (decaying by
/// 1% a second). One forged message puts a peer below 0 (pruned from the mesh, no gossip to
/// or from it); three put it under the graylist threshold (-80), after which everything it
/// sends is ignored. Time in the mesh and mesh delivery rates are not scored: the master
/// publishes rarely, so silence is normal. IP colocation is not scored either: many nodes
/// behind one NAT (or on one test host) are legitimate, and a Sybil gains nothing on a topic
/// where only the master's signature counts.
pub fn authority_scoring() -> (gossipsub::PeerScoreParams, gossipsub::PeerScoreThresholds) {
    let topic = gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.0,
        first_message_deliveries_weight: 1.0,
        first_message_deliveries_decay: 0.9,
        first_message_deliveries_cap: 10.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: INVALID_MESSAGE_WEIGHT,
        invalid_message_deliveries_decay: 0.99,
        ..Default::default()
    };
    let mut params = gossipsub::PeerScoreParams {
        ip_colocation_factor_weight: 0.0,
        ..Default::default()
    };
    params
        .topics
        .insert(Behaviour::authority_topic().hash(), topic);
    (params, gossipsub::PeerScoreThresholds::default())
}

/// Score weight of each invalid message on the authority topic (times the count squared).
pub const INVALID_MESSAGE_WEIGHT: f64 = -10.0;

/// What to report to gossipsub for `message`, received by a peer whose master is `master`:
/// `Accept` only for a message on the authority topic signed by the master that decodes as an
/// [`AuthorityEvent`](crate::wire::AuthorityEvent); `Reject` for everything else (other
/// topics, other signers, unsigned, undecodable). The master passes its own PeerId: it never
/// receives its own messages, so it rejects every message it is sent.
pub fn authority_acceptance(
    master: &PeerId,
    message: &gossipsub::Message,
) -> (
    gossipsub::MessageAcceptance,
    Option<crate::wire::AuthorityEvent>,
) {
    if message.topic != Behaviour::authority_topic().hash() || message.source != Some(*master) {
        return (gossipsub::MessageAcceptance::Reject, None);
    }
    match crate::wire::decode_authority(&message.data) {
        Ok(event) => (gossipsub::MessageAcceptance::Accept, Some(event)),
        Err(_) => (gossipsub::MessageAcceptance::Reject, None),
    }
}

/// Longest a Kademlia query (a provider lookup, a peer lookup, a provide) runs.
pub const KAD_QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a node re-announces itself as a provider of the files it holds.
pub const PROVIDER_REFRESH: Duration = Duration::from_secs(30 * 60);

/// How long a provider record lives without a refresh.
pub const PROVIDER_TTL: Duration = Duration::from_secs(2 * 60 * 60);

/// The Kademlia key under which the holders of `file` announce themselves: one provider
/// record per file and holder.
pub fn provider_key(file: &crate::FileId) -> kad::RecordKey {
    let mut k = b"/shoal/file/".to_vec();
    k.extend_from_slice(&file.0);
    kad::RecordKey::new(&k)
}

/// The PeerId named by the `/p2p/...` suffix of an address, if any.
pub fn peer_of(addr: &libp2p::Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::P2p(peer) => Some(peer),
        _ => None,
    })
}

/// The piece protocol name, for `libp2p_stream::Control`.
pub fn piece_protocol() -> StreamProtocol {
    crate::limits::PIECE_PROTOCOL
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{encode_authority, AuthorityEvent};
    use libp2p::gossipsub::{Message, MessageAcceptance};

    fn msg(source: Option<PeerId>, topic: &str, data: Vec<u8>) -> Message {
        Message {
            source,
            data,
            sequence_number: Some(1),
            topic: gossipsub::IdentTopic::new(topic).hash(),
        }
    }

    #[test]
    fn the_masters_incoming_cap_follows_its_total() {
        for role in [Role::Master, Role::Node] {
            let d = ConnectionCaps::for_role(role);
            let same = ConnectionCaps::for_role_with_total(role, d.established_total);
            assert_eq!(
                same.established_incoming, d.established_incoming,
                "{role:?}"
            );
        }
        let big = ConnectionCaps::for_role_with_total(Role::Master, 12_000);
        assert_eq!(
            (big.established_incoming, big.established_total),
            (11_096, 12_000)
        );
        let small = ConnectionCaps::for_role_with_total(Role::Master, 100);
        assert_eq!(small.established_incoming, 80);
        assert_eq!(
            ConnectionCaps::for_role_with_total(Role::Master, 0).established_incoming,
            0
        );
        let node = ConnectionCaps::for_role_with_total(Role::Node, 4_000);
        assert_eq!(node.established_incoming, 512);
        let node = ConnectionCaps::for_role_with_total(Role::Node, 100);
        assert_eq!(node.established_incoming, 100);
    }

    #[test]
    fn only_the_masters_decodable_authority_messages_are_accepted() {
        let master = PeerId::random();
        let other = PeerId::random();
        let ban = encode_authority(&AuthorityEvent::PeerBanned { peer: other });
        let topic = crate::limits::AUTHORITY_TOPIC;
        let (a, e) = authority_acceptance(&master, &msg(Some(master), topic, ban.clone()));
        assert_eq!(a, MessageAcceptance::Accept);
        assert_eq!(e, Some(AuthorityEvent::PeerBanned { peer: other }));
        for m in [
            msg(Some(other), topic, ban.clone()),
            msg(None, topic, ban.clone()),
            msg(Some(master), "/other/topic", ban.clone()),
            msg(Some(master), topic, vec![0xff; 64]),
        ] {
            let (a, e) = authority_acceptance(&master, &m);
            assert_eq!(a, MessageAcceptance::Reject, "{m:?}");
            assert_eq!(e, None);
        }
    }

    #[test]
    fn the_scoring_parameters_are_valid() {
        let (p, t) = authority_scoring();
        p.validate().unwrap();
        t.validate().unwrap();
        behaviour(Role::Node);
    }

    /// A behaviour with the defaults of `role` and a fresh key.
    fn behaviour(role: Role) -> Behaviour {
        Behaviour::new(
            &Keypair::generate_ed25519(),
            role,
            &ConnectionCaps::for_role(role),
            Advertise::default(),
            None,
            &crate::relay::RelayLimits::default(),
        )
        .expect("behaviour")
    }

    /// A peer that keeps announcing new addresses does not grow its routing entry.
    #[test]
    fn a_routing_entry_stays_bounded_whatever_a_peer_announces() {
        let mut b = behaviour(Role::Master);
        let peer = PeerId::random();
        for round in 0..20u16 {
            let addrs: Vec<Multiaddr> = (0..8u16)
                .map(|i| {
                    format!("/ip4/10.0.0.1/tcp/{}", 1000 + round * 8 + i)
                        .parse()
                        .expect("multiaddr")
                })
                .collect();
            b.feed_kad(&peer, &addrs);
            let held = b
                .kad
                .kbucket(peer)
                .and_then(|k| {
                    k.iter()
                        .find(|e| *e.node.key.preimage() == peer)
                        .map(|e| e.node.value.len())
                })
                .expect("the peer is in the table");
            assert!(
                (1..=2 * MAX_HINT_ADDRS).contains(&held),
                "round {round}: {held} addresses held"
            );
        }
    }
}
