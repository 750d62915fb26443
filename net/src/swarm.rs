//! Building the libp2p swarm of a shoal peer, once for the master and the node: TCP (noise,
//! yamux) and QUIC transports around the shoal [`Behaviour`] with its connection caps.

use std::time::Duration;

use libp2p::{identity::Keypair, noise, tcp, yamux, Swarm};
use shoal_protocol::behaviour::{Advertise, Behaviour, ConnectionCaps, Role};

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
        }
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
    let err = |e: &dyn std::fmt::Display| SwarmError(e.to_string());
    let swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| err(&e))?
        .with_quic_config(|c| {
            // MTU discovery may probe up to a jumbo frame's UDP payload (the default stops
            // at 1,452 bytes): on paths that carry them (datacenters, loopback) a packet then
            // carries about six times the data, and the per-packet work (crypto, ACKs,
            // syscalls) falls with it. Paths with smaller MTUs keep what discovery finds.
            c.mtu_upper_bound(QUIC_MTU_UPPER_BOUND)
        })
        .with_behaviour(|k| {
            Behaviour::new(k, opts.role, &opts.caps, opts.advertise)
                .map_err(Box::<dyn std::error::Error + Send + Sync>::from)
        })
        .map_err(|e| err(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(opts.idle_timeout))
        .build();
    Ok(swarm)
}
