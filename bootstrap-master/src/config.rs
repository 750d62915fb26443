//! How the master runs ([`MasterConfig`]) and why it cannot start ([`MasterError`]).

use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf, time::Duration};

use libp2p::{Multiaddr, PeerId};
use shoal_protocol::{
    behaviour::{ConnectionCaps, Role},
    relay::RelayLimits,
};

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
    /// Who may publish over the network. Default [`PublishPolicy::OwnOnly`].
    pub publishing: PublishPolicy,
    /// Deadlines of pulls from publishers.
    pub pull: PullLimits,
    /// Pulls from publishers at once, all publishers together (each buffers up to 4 MiB).
    /// Default 16.
    pub max_pulls: u32,
    /// Free space an announce must leave on the data dir's file system, beyond the file
    /// and the files still being pulled. Default 1 GiB.
    pub min_free_disk: u64,
    /// The relay for nodes behind NAT: on, within [`RelayLimits::default`]'s caps.
    pub relay: RelayLimits,
}

/// Who may publish files to the master over the network (`/shoal/publish/1`). The
/// operator's own `shoal-master add` always works.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PublishPolicy {
    /// Nobody but the master's own key (the default: a fresh master stores nothing it was
    /// not told to).
    #[default]
    OwnOnly,
    /// These publisher keys (`--publisher-key`, `--publisher-keys-file`), without quotas.
    Trusted(BTreeSet<PeerId>),
    /// Anyone (`--open-publishing`), within per-publisher quotas.
    Open(PublishQuotas),
}

/// Per-publisher caps under [`PublishPolicy::Open`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublishQuotas {
    /// Files one publisher may have on the master. Default 16.
    pub files: u32,
    /// Bytes one publisher may have on the master, all files together. Default 64 GiB.
    pub bytes: u64,
    /// Pulls from one publisher at once. Default 2.
    pub concurrent_pulls: u32,
    /// Files all open publishers together may have (bounds manifests from many keys).
    /// Default 4,096.
    pub total_files: u32,
}

impl Default for PublishQuotas {
    fn default() -> Self {
        Self {
            files: 16,
            bytes: 64 << 30,
            concurrent_pulls: 2,
            total_files: 4_096,
        }
    }
}

/// Deadlines of a pull from a publisher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PullLimits {
    /// Opening a piece stream and receiving its response frame. Default 10 s.
    pub open_timeout: Duration,
    /// Longest time without a single verified block. Default 30 s.
    pub stall_timeout: Duration,
    /// Slowest acceptable rate over a piece, bytes per second: a piece must arrive within
    /// `open_timeout + size / min_rate`. Default 64 KiB/s.
    pub min_rate: u64,
    /// Attempts per piece before the pull gives up (a new announce resumes it). Default 5.
    pub attempts: u32,
}

impl Default for PullLimits {
    fn default() -> Self {
        Self {
            open_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(30),
            min_rate: 64 * 1024,
            attempts: 5,
        }
    }
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
            publishing: PublishPolicy::default(),
            pull: PullLimits::default(),
            max_pulls: 16,
            min_free_disk: 1 << 30,
            relay: RelayLimits::default(),
        }
    }

    /// Run the relay for nodes behind NAT within these caps (or not, `enabled: false`).
    pub fn with_relay(mut self, relay: RelayLimits) -> Self {
        self.relay = relay;
        self
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

    /// Let these publish (see [`PublishPolicy`]).
    pub fn with_publishing(mut self, publishing: PublishPolicy) -> Self {
        self.publishing = publishing;
        self
    }

    /// Pull from publishers within these deadlines.
    pub fn with_pull_limits(mut self, pull: PullLimits) -> Self {
        self.pull = pull;
        self
    }

    /// Run at most this many pulls at once (see [`MasterConfig::max_pulls`]).
    pub fn with_max_pulls(mut self, n: u32) -> Self {
        self.max_pulls = n;
        self
    }

    /// Keep this much disk free (see [`MasterConfig::min_free_disk`]).
    pub fn with_min_free_disk(mut self, bytes: u64) -> Self {
        self.min_free_disk = bytes;
        self
    }

    /// Use these policy tunables.
    pub fn with_policy(mut self, policy: PolicyConfig) -> Self {
        self.policy = policy;
        self
    }

    /// Send one copy of each block into each region (see [`PolicyConfig::region_budget`]).
    pub fn with_region_budget(mut self, on: bool) -> Self {
        self.policy.region_budget = on;
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
    /// The event loop panicked (or was cancelled): the master is not serving.
    #[error("the master's event loop crashed: {0}")]
    Crashed(String),
}

/// Why a publisher keys file could not be read.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct PublisherKeysError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub reason: String,
}

/// Parses a publisher keys file: one PeerId a line; blank lines and `#` comments (whole
/// lines or after a key) are ignored.
pub fn parse_publisher_keys(text: &str) -> Result<BTreeSet<PeerId>, PublisherKeysError> {
    let mut keys = BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        let key = line.split('#').next().unwrap_or("").trim();
        if key.is_empty() {
            continue;
        }
        let peer = key.parse::<PeerId>().map_err(|e| PublisherKeysError {
            line: i + 1,
            reason: format!("{key:?} is not a PeerId: {e}"),
        })?;
        keys.insert(peer);
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publisher_keys_file_takes_comments_and_blank_lines() {
        let a = PeerId::random();
        let b = PeerId::random();
        let text = format!("# trusted publishers\n\n{a}\n  {b}  # the build box\n{a}\n");
        assert_eq!(parse_publisher_keys(&text).unwrap(), BTreeSet::from([a, b]));
    }

    #[test]
    fn a_bad_line_is_named() {
        let a = PeerId::random();
        let e = parse_publisher_keys(&format!("{a}\nnot-a-key\n")).unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.to_string().contains("not-a-key"), "{e}");
    }
}
