//! How the master runs ([`MasterConfig`]) and why it cannot start ([`MasterError`]).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use libp2p::Multiaddr;
use shoal_protocol::behaviour::{ConnectionCaps, Role};

use crate::policy::PolicyConfig;
use crate::registry::RegistryError;

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
