//! Building the libp2p swarm of a shoal peer, once for the master and the node: TCP (TLS 1.3
//! or noise, then yamux) and QUIC transports around the shoal [`Behaviour`] with its
//! connection caps.
//!
//! On TCP and relayed connections TLS ([`crate::tls`], AES-GCM where the CPU has AES
//! instructions) is offered first and noise second: multistream-select settles on TLS
//! between two current peers and on noise with a peer that offers only noise (shoal before
//! TLS). A node's transport also dials and listens through a circuit relay (the master's);
//! the master's muxers are wrapped to count the bytes its relay carries ([`RelayMeter`]).

use std::time::Duration;

use libp2p::{
    core::{transport::upgrade::Version, Negotiated},
    identity::Keypair,
    noise, quic, PeerId, Swarm, Transport,
};
use shoal_protocol::{
    behaviour::{Advertise, Behaviour, BehaviourError, ConnectionCaps, Role},
    relay::RelayLimits,
};

use crate::{
    mux::{Muxer, Yamux},
    relay_meter::{MeteredMuxer, RelayMeter},
    tcp, tls,
};

/// Largest UDP payload QUIC's MTU discovery probes for: a 9,000-byte jumbo frame less the
/// IPv6 and UDP headers.
pub const QUIC_MTU_UPPER_BOUND: u16 = 9_000 - 40 - 8;

/// How to build a swarm.
#[derive(Clone, Debug)]
pub struct SwarmOptions {
    /// Master or node.
    pub role: Role,
    /// Caps on connections. Default [`ConnectionCaps::for_role`].
    pub caps: ConnectionCaps,
    /// A connection with no open stream is closed after this long. Default 120 s for the
    /// master, 60 s for a node.
    pub idle_timeout: Duration,
    /// Which addresses identify advertises. Default [`Advertise::Listening`].
    pub advertise: Advertise,
    /// Caps of the relay server (the master's; a node runs none). Default
    /// [`RelayLimits::default`].
    pub relay: RelayLimits,
    /// Where the master counts the bytes its relay carries. Default: a fresh meter.
    pub relay_meter: RelayMeter,
}

impl SwarmOptions {
    /// The defaults for `role`.
    pub fn for_role(role: Role) -> Self {
        Self {
            role,
            caps: ConnectionCaps::for_role(role),
            idle_timeout: match role {
                Role::Master => Duration::from_secs(120),
                Role::Node => Duration::from_secs(60),
            },
            advertise: Advertise::default(),
            relay: RelayLimits::default(),
            relay_meter: RelayMeter::default(),
        }
    }

    /// Run the relay server (master) within these caps.
    pub fn with_relay(mut self, relay: RelayLimits) -> Self {
        self.relay = relay;
        self
    }

    /// Count relayed bytes into `meter`.
    pub fn with_relay_meter(mut self, meter: RelayMeter) -> Self {
        self.relay_meter = meter;
        self
    }

    /// Use these connection caps.
    pub fn with_caps(mut self, caps: ConnectionCaps) -> Self {
        self.caps = caps;
        self
    }

    /// Advertise these addresses.
    pub fn with_advertise(mut self, advertise: Advertise) -> Self {
        self.advertise = advertise;
        self
    }

    /// Close idle connections after `idle`.
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = idle;
        self
    }
}

/// Why the swarm could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the swarm: {0}")]
pub struct SwarmError(String);

/// Builds the swarm of `key` (it does not listen or dial yet).
pub fn build_swarm(key: Keypair, opts: &SwarmOptions) -> Result<Swarm<Behaviour>, SwarmError> {
    match opts.role {
        Role::Master => build_master(key, opts),
        Role::Node => build_node(key, opts),
    }
}

fn boxed(e: BehaviourError) -> Box<dyn std::error::Error + Send + Sync> {
    Box::from(e)
}

/// A node: TCP and QUIC, and the relay client's transport beside them.
fn build_node(key: Keypair, opts: &SwarmOptions) -> Result<Swarm<Behaviour>, SwarmError> {
    let err = |e: &dyn std::fmt::Display| SwarmError(e.to_string());
    let swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(tcp_transport)
        .map_err(|e| err(&e))?
        .with_other_transport(quic_transport)
        .map_err(|e| err(&e))?
        .with_relay_client((tls::Config::new, noise::Config::new), Yamux::new)
        .map_err(|e| err(&e))?
        .with_behaviour(|k, relay_client| {
            Behaviour::new(
                k,
                opts.role,
                &opts.caps,
                opts.advertise,
                Some(relay_client),
                &opts.relay,
            )
            .map_err(boxed)
        })
        .map_err(|e| err(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(opts.idle_timeout))
        .build();
    Ok(swarm)
}

/// The master: the node's TCP and QUIC transports, each connection's muxer wrapped in the
/// relay meter.
fn build_master(key: Keypair, opts: &SwarmOptions) -> Result<Swarm<Behaviour>, SwarmError> {
    let err = |e: &dyn std::fmt::Display| SwarmError(e.to_string());
    let tcp_meter = opts.relay_meter.clone();
    let quic_meter = opts.relay_meter.clone();
    let swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(|k| {
            tcp_transport(k)
                .map(|t| t.map(move |(peer, conn), _| (peer, MeteredMuxer::new(conn, tcp_meter))))
        })
        .map_err(|e| err(&e))?
        .with_other_transport(|k| {
            quic_transport(k)
                .map(move |(peer, conn), _| (peer, MeteredMuxer::new(conn, quic_meter)))
        })
        .map_err(|e| err(&e))?
        .with_behaviour(|k| {
            Behaviour::new(k, opts.role, &opts.caps, opts.advertise, None, &opts.relay)
                .map_err(boxed)
        })
        .map_err(|e| err(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(opts.idle_timeout))
        .build();
    Ok(swarm)
}

/// What a TCP connection's muxer runs on.
type TcpMuxer = Muxer<Negotiated<tcp::Secured<Negotiated<tcp::Socket>>>>;

/// TCP with the kernel's keepalive ([`crate::tcp`]), TLS offered before noise, then yamux
/// ([`Yamux`]).
fn tcp_transport(
    key: &Keypair,
) -> Result<
    impl Transport<
            Output = (PeerId, TcpMuxer),
            Dial: Send,
            ListenerUpgrade: Send,
            Error: Send + Sync + 'static,
        > + Send
        + Unpin
        + 'static,
    Box<dyn std::error::Error + Send + Sync>,
> {
    Ok(tcp::keepalive_tcp()
        .upgrade(Version::V1Lazy)
        .authenticate(tcp::Security::new(key)?)
        .multiplex(Yamux::new()))
}

/// QUIC, with MTU discovery up to a jumbo frame's UDP payload (the default stops at 1,452
/// bytes): on paths that carry them (datacenters, loopback) a packet then carries about six
/// times the data, and the per-packet work (crypto, ACKs, syscalls) falls with it. Paths with
/// smaller MTUs keep what discovery finds.
fn quic_transport(key: &Keypair) -> quic::tokio::Transport {
    quic::tokio::Transport::new(quic::Config::new(key).mtu_upper_bound(QUIC_MTU_UPPER_BOUND))
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use libp2p::{
        swarm::{dummy, NetworkBehaviour, SwarmEvent},
        yamux, Multiaddr,
    };

    use super::*;

    /// An older shoal peer's TCP stack: noise only.
    fn noise_only() -> Swarm<dummy::Behaviour> {
        libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(
                libp2p::tcp::Config::default(),
                noise::Config::new,
                yamux::Config::default,
            )
            .unwrap()
            .with_behaviour(|_| dummy::Behaviour)
            .unwrap()
            .build()
    }

    /// A peer with libp2p's own TLS configuration only.
    fn stock_tls_only() -> Swarm<dummy::Behaviour> {
        libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(
                libp2p::tcp::Config::default(),
                libp2p::tls::Config::new,
                yamux::Config::default,
            )
            .unwrap()
            .with_behaviour(|_| dummy::Behaviour)
            .unwrap()
            .build()
    }

    async fn listen(swarm: &mut Swarm<Behaviour>) -> Multiaddr {
        swarm
            .listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
            .unwrap();
        loop {
            if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
                return address;
            }
        }
    }

    /// Whether `dialer` gets a connection to `listener` at `addr` within 10 s.
    async fn connects<B: NetworkBehaviour>(
        listener: &mut Swarm<Behaviour>,
        addr: &Multiaddr,
        mut dialer: Swarm<B>,
    ) -> bool {
        dialer.dial(addr.clone()).unwrap();
        let deadline = tokio::time::sleep(Duration::from_secs(10));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                ev = dialer.select_next_some() => match ev {
                    SwarmEvent::ConnectionEstablished { .. } => return true,
                    SwarmEvent::OutgoingConnectionError { error, .. } => {
                        println!("dial failed: {error}");
                        return false;
                    }
                    _ => {}
                },
                _ = listener.select_next_some() => {}
                _ = &mut deadline => return false,
            }
        }
    }

    fn shoal(role: Role) -> Swarm<Behaviour> {
        build_swarm(Keypair::generate_ed25519(), &SwarmOptions::for_role(role)).unwrap()
    }

    #[tokio::test]
    async fn tcp_takes_tls_and_noise_from_any_peer() {
        for role in [Role::Master, Role::Node] {
            let mut listener = shoal(role);
            let addr = listen(&mut listener).await;
            assert!(
                connects(&mut listener, &addr, shoal(Role::Node)).await,
                "{role:?}: a shoal node"
            );
            assert!(
                connects(&mut listener, &addr, noise_only()).await,
                "{role:?}: noise only"
            );
            assert!(
                connects(&mut listener, &addr, stock_tls_only()).await,
                "{role:?}: TLS only"
            );
        }
    }
}
