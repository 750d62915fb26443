//! Nodes behind NAT: the caps of the master's circuit relay, the AutoNAT settings of both
//! sides, and the shape of a relayed address.
//!
//! The master is the one peer every node can dial, so it is the relay (circuit relay v2) and
//! the AutoNAT server. A node that AutoNAT finds unreachable reserves a slot on the master's
//! relay and is hinted as `<master addr>/p2p-circuit/p2p/<node>`; peers that reach it that way
//! try to upgrade to a direct connection by hole punching (DCUtR).
//!
//! What this module does not do: listen, dial or count bytes (the node and the master do).

use std::time::Duration;

use libp2p::{autonat, multiaddr::Protocol, relay, Multiaddr, PeerId};

/// Caps on the master's relay: it must not become a second master. Relayed bytes cost the
/// master twice (in from one node, out to the other), so every circuit is capped in bytes and
/// time, and circuits and reservations in number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayLimits {
    /// Whether the master runs the relay at all. Default on.
    pub enabled: bool,
    /// Nodes holding a reservation (listening through the relay) at once. Default 1,024: a
    /// reservation is a few hundred bytes of state and no traffic.
    pub max_reservations: usize,
    /// Reservations of one node. Default 2 (a renewal can overlap the old one).
    pub max_reservations_per_peer: usize,
    /// How long a reservation lasts before the node renews it. Default 1 h.
    pub reservation_duration: Duration,
    /// Circuits open at once, all nodes together. Default 64.
    pub max_circuits: usize,
    /// Circuits one node is an end of at once. Default 4.
    pub max_circuits_per_peer: usize,
    /// Bytes one circuit may carry (both directions together) before the relay closes it.
    /// Default 32 MiB: two of the largest pieces at the default block size (256 blocks of
    /// 64 KiB), so a relayed peer can serve whole pieces while DCUtR tries a direct
    /// connection, and a redirect to it is worth making. (libp2p's default is 128 KiB,
    /// less than two blocks: every relayed piece would be cut off.)
    pub max_circuit_bytes: u64,
    /// How long one circuit may last. Default 10 min.
    pub max_circuit_duration: Duration,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            enabled: true,
            max_reservations: 1_024,
            max_reservations_per_peer: 2,
            reservation_duration: Duration::from_secs(60 * 60),
            max_circuits: 64,
            max_circuits_per_peer: 4,
            max_circuit_bytes: 32 << 20,
            max_circuit_duration: Duration::from_secs(10 * 60),
        }
    }
}

impl RelayLimits {
    /// The relay server's configuration (libp2p's rate limiters on new reservations and
    /// circuits per peer and per IP are kept).
    pub fn server_config(&self) -> relay::Config {
        relay::Config {
            max_reservations: self.max_reservations,
            max_reservations_per_peer: self.max_reservations_per_peer,
            reservation_duration: self.reservation_duration,
            max_circuits: self.max_circuits,
            max_circuits_per_peer: self.max_circuits_per_peer,
            // libp2p reads 0 as "unlimited": a cap of 0 is a cap of 1 byte here.
            max_circuit_bytes: self.max_circuit_bytes.max(1),
            // libp2p requires it to fit in u32 seconds.
            max_circuit_duration: self
                .max_circuit_duration
                .min(Duration::from_secs(u64::from(u32::MAX))),
            ..relay::Config::default()
        }
    }
}

/// AutoNAT (v1) of the master: a server only. It dials a node back only at the IP address
/// the node's connection comes from (libp2p replaces any other IP the node names), so it
/// cannot be aimed at third parties; that is why private addresses are allowed (a master on a
/// private network serves nodes behind NATs inside it). It asks nobody about itself: it is
/// public by definition, nodes dial it.
pub fn master_autonat() -> autonat::Config {
    autonat::Config {
        use_connected: false,
        only_global_ips: false,
        // Its own probes find no server and change nothing: keep them rare.
        boot_delay: Duration::from_secs(24 * 60 * 60),
        retry_interval: Duration::from_secs(24 * 60 * 60),
        refresh_interval: Duration::from_secs(24 * 60 * 60),
        // Dial-backs at once, all nodes together, per second; and per node.
        throttle_clients_global_max: 64,
        throttle_clients_peer_max: 2,
        throttle_clients_period: Duration::from_secs(1),
        max_peer_addresses: 8,
        timeout: Duration::from_secs(15),
        ..autonat::Config::default()
    }
}

/// AutoNAT (v1) of a node: a client of the master only (added as its server; other nodes
/// are not asked, and the node answers nobody's probes). The first answer decides (within
/// [`NODE_AUTONAT_BOOT`] of joining); three answers in a row make the status firm, re-checked
/// every [`NODE_AUTONAT_REFRESH`].
pub fn node_autonat() -> autonat::Config {
    autonat::Config {
        use_connected: false,
        only_global_ips: false,
        boot_delay: NODE_AUTONAT_BOOT,
        retry_interval: Duration::from_secs(20),
        refresh_interval: NODE_AUTONAT_REFRESH,
        // The master is the only server: it must be askable again before the next retry,
        // or the probe would fail for want of a server (and the status fall to Unknown).
        throttle_server_period: Duration::from_secs(5),
        confidence_max: 3,
        // No dial-backs for others.
        throttle_clients_global_max: 0,
        throttle_clients_peer_max: 0,
        timeout: Duration::from_secs(15),
        ..autonat::Config::default()
    }
}

/// How soon after starting a node first asks the master whether it is reachable.
pub const NODE_AUTONAT_BOOT: Duration = Duration::from_secs(2);

/// How often a node whose reachability is firm asks again.
pub const NODE_AUTONAT_REFRESH: Duration = Duration::from_secs(5 * 60);

/// Whether `addr` goes through a relay (has `/p2p-circuit`).
pub fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

/// The address at which `node` is reachable through the relay at `relay_addr` (which ends in
/// `/p2p/<relay>`): `<relay_addr>/p2p-circuit/p2p/<node>`. `None` if `relay_addr` is itself
/// relayed or names no relay.
pub fn circuit_addr(relay_addr: &Multiaddr, node: PeerId) -> Option<Multiaddr> {
    if is_relayed(relay_addr) || !matches!(relay_addr.iter().last(), Some(Protocol::P2p(_))) {
        return None;
    }
    Some(
        relay_addr
            .clone()
            .with(Protocol::P2pCircuit)
            .with(Protocol::P2p(node)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn circuit_addresses_name_relay_and_node() {
        let relay = PeerId::random();
        let node = PeerId::random();
        let base: Multiaddr = format!("/ip4/10.0.0.1/tcp/4001/p2p/{relay}")
            .parse()
            .unwrap();
        let c = circuit_addr(&base, node).unwrap();
        assert_eq!(
            c.to_string(),
            format!("/ip4/10.0.0.1/tcp/4001/p2p/{relay}/p2p-circuit/p2p/{node}")
        );
        assert!(is_relayed(&c));
        assert!(!is_relayed(&base));
        // Not through a relayed address, and not without the relay's id.
        assert_eq!(circuit_addr(&c, node), None);
        let bare: Multiaddr = "/ip4/10.0.0.1/tcp/4001".parse().unwrap();
        assert_eq!(circuit_addr(&bare, node), None);
    }

    #[test]
    fn the_relay_caps_reach_the_server_config() {
        let l = RelayLimits::default();
        let c = l.server_config();
        assert_eq!(c.max_circuit_bytes, 32 << 20);
        assert_eq!(c.max_circuits, 64);
        assert_eq!(c.max_reservations, 1_024);
        let zero = RelayLimits {
            max_circuit_bytes: 0,
            ..l.clone()
        };
        assert_eq!(zero.server_config().max_circuit_bytes, 1);
        let long = RelayLimits {
            max_circuit_duration: Duration::from_secs(u64::MAX),
            ..l
        };
        assert_eq!(
            long.server_config().max_circuit_duration,
            Duration::from_secs(u64::from(u32::MAX))
        );
    }
}
