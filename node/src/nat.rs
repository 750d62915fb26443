//! Whether a node listens through the master's relay: the rule, apart from the swarm.
//!
//! AutoNAT (the master dials the node back at the address its connection comes from) tells
//! the node whether other peers can reach it. An unreachable node listens through the
//! master's circuit relay, so that it can serve: the master hints it to others as
//! `<master addr>/p2p-circuit/p2p/<node>`, and DCUtR then tries to replace each relayed
//! connection with a direct one (hole punching). A node that turns out reachable again stops
//! listening through the relay.

use libp2p::autonat::NatStatus;

/// When a node listens through the master's relay (`shoal --relay`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RelayMode {
    /// When AutoNAT finds it unreachable (the default).
    #[default]
    Auto,
    /// From the start, whatever AutoNAT says (a node known to be behind a NAT).
    Always,
    /// Never (it can still fetch through a NAT; it cannot serve through one).
    Never,
}

/// Whether to listen through the relay after AutoNAT reported `status`, if that changes
/// anything: `Some(true)` to start, `Some(false)` to stop, `None` to leave it as it is.
pub fn relay_wanted(mode: RelayMode, status: &NatStatus) -> Option<bool> {
    match (mode, status) {
        (RelayMode::Auto, NatStatus::Private) => Some(true),
        (RelayMode::Auto, NatStatus::Public(_)) => Some(false),
        // Unknown (no answer yet, or a failed probe): keep what there is.
        (RelayMode::Auto, NatStatus::Unknown) => None,
        (RelayMode::Always | RelayMode::Never, _) => None,
    }
}

/// Whether a node in `mode` whose reachability is `status` should be listening through the
/// relay now (checked every [`RELAY_RETRY`], to recover a lost or refused reservation).
pub fn relay_wanted_now(mode: RelayMode, status: &NatStatus) -> bool {
    match mode {
        RelayMode::Always => true,
        RelayMode::Auto => *status == NatStatus::Private,
        RelayMode::Never => false,
    }
}

/// How often a node that should listen through the relay and does not (its reservation was
/// lost or refused) tries again: one reservation request per interval at most, so a master
/// without a relay (`--no-relay`) is not asked in a loop.
pub const RELAY_RETRY: std::time::Duration = std::time::Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_auto_follows_autonat_and_unknown_changes_nothing() {
        let public = NatStatus::Public("/ip4/10.0.0.2/tcp/1".parse().unwrap());
        assert_eq!(
            relay_wanted(RelayMode::Auto, &NatStatus::Private),
            Some(true)
        );
        assert_eq!(relay_wanted(RelayMode::Auto, &public), Some(false));
        assert_eq!(relay_wanted(RelayMode::Auto, &NatStatus::Unknown), None);
        for m in [RelayMode::Always, RelayMode::Never] {
            for s in [NatStatus::Private, public.clone(), NatStatus::Unknown] {
                assert_eq!(relay_wanted(m, &s), None);
                assert_eq!(relay_wanted_now(m, &s), m == RelayMode::Always);
            }
        }
        assert!(relay_wanted_now(RelayMode::Auto, &NatStatus::Private));
        assert!(!relay_wanted_now(RelayMode::Auto, &public));
        assert!(!relay_wanted_now(RelayMode::Auto, &NatStatus::Unknown));
    }
}
