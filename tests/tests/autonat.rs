//! The master's AutoNAT dial-backs must not make a reachable node look unreachable.
//!
//! A dial-back is a second connection from the master to a node it is already connected to.
//! Left open, it took the node's second connection slot (two per peer), so the node's next
//! probe was refused over that cap and answered "dial error": the node then believed itself
//! unreachable and, by default, listened through the master's relay. The master now closes
//! its dial-back connections once they are up; this test probes the master as a node does,
//! only faster, and needs every probe to succeed.

use std::time::Duration;

use anyhow::{bail, Context};
use futures::StreamExt;
use libp2p::{
    autonat, identity::Keypair, noise, ping, swarm::NetworkBehaviour, swarm::SwarmEvent, tcp, yamux,
};
use shoal_tests::{loopback, start_master};

#[derive(NetworkBehaviour)]
struct Prober {
    autonat: autonat::Behaviour,
    // The master disconnects a peer that does not answer its pings.
    ping: ping::Behaviour,
}

#[tokio::test]
async fn repeated_reachability_probes_all_succeed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let master = start_master(dir.path(), None).await?;
    let master_addr = master.addrs()[0].clone();
    let key = Keypair::generate_ed25519();
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_behaviour(|k| Prober {
            autonat: autonat::Behaviour::new(
                k.public().to_peer_id(),
                // A node's settings (shoal_protocol::relay::node_autonat), 20 times faster.
                autonat::Config {
                    use_connected: false,
                    only_global_ips: false,
                    boot_delay: Duration::from_millis(100),
                    retry_interval: Duration::from_secs(1),
                    refresh_interval: Duration::from_secs(1),
                    throttle_server_period: Duration::ZERO,
                    confidence_max: 3,
                    throttle_clients_global_max: 0,
                    throttle_clients_peer_max: 0,
                    timeout: Duration::from_secs(10),
                    ..autonat::Config::default()
                },
            ),
            ping: ping::Behaviour::new(ping::Config::new()),
        })?
        // A node keeps an idle connection for 60 s (shoal_net::swarm::SwarmOptions).
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    swarm.listen_on(loopback())?;
    swarm
        .behaviour_mut()
        .autonat
        .add_server(master.peer_id(), Some(master_addr.clone()));
    swarm.dial(master_addr)?;

    // Five answers, every one "reachable": past the first, each probe comes while the last
    // dial-back's connection would still be open had the master left it so.
    let mut answers = 0;
    let mut dialed_back = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while answers < 5 {
        let ev = tokio::time::timeout_at(deadline, swarm.select_next_some())
            .await
            .with_context(|| format!("{answers} of 5 probes answered within 30 s"))?;
        match ev {
            SwarmEvent::Behaviour(ProberEvent::Autonat(autonat::Event::OutboundProbe(p))) => {
                match p {
                    autonat::OutboundProbeEvent::Response { .. } => answers += 1,
                    autonat::OutboundProbeEvent::Error { error, .. } => {
                        bail!("probe {} failed: {error:?}", answers + 1)
                    }
                    autonat::OutboundProbeEvent::Request { .. } => {}
                }
            }
            // The master may close a dial-back before this side has finished its upgrade.
            SwarmEvent::IncomingConnection { .. } => dialed_back += 1,
            _ => {}
        }
    }
    assert!(
        dialed_back >= 5,
        "5 probes answered with only {dialed_back} dial-backs"
    );
    assert!(
        swarm.behaviour().autonat.nat_status().is_public(),
        "status {:?}",
        swarm.behaviour().autonat.nat_status()
    );
    // And the master lets its dial-backs go: one connection remains, the prober's own.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let established =
        |s: &libp2p::Swarm<Prober>| s.network_info().connection_counters().num_established();
    while established(&swarm) > 1 {
        let left = established(&swarm);
        tokio::time::timeout_at(deadline, swarm.select_next_some())
            .await
            .with_context(|| format!("{left} connections with the master after 10 s"))?;
    }
    master.shutdown().await;
    Ok(())
}
