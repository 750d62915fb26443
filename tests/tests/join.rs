//! A node that cannot connect to its master at first keeps saying hello for up to
//! `HELLO_RETRY_WINDOW` (5 s) instead of failing at once: a master that is restarting, or
//! whose cap on connections in their handshake is full while a crowd joins, refuses a dial
//! that a moment later it takes. (A master that stays down is reported after the window:
//! `kademlia.rs`.)

use std::time::Duration;

use anyhow::Context;
use shoal_master::Master;
use shoal_tests::{master_config, start_node};

#[tokio::test]
async fn a_node_started_before_its_master_joins_when_the_master_comes_up() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mdir = dir.path().join("master");
    // Once, to learn the master's id and a port: the node needs both in its bootstrap address.
    let master = Master::start(master_config(&mdir, None)).await?;
    let addr = master.addrs()[0].clone();
    master.shutdown().await;
    let bootstrap = addr.clone();
    let listen: libp2p::Multiaddr = addr
        .iter()
        .filter(|p| !matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
        .collect();

    let ndir = dir.path().join("node");
    let node = tokio::spawn(async move { start_node(&ndir, &bootstrap, None).await });
    // Nothing listens there now: the node's first hellos fail (connection refused).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !node.is_finished(),
        "the node gave up while the master was down"
    );
    let master = Master::start(master_config(&mdir, None).with_listen(vec![listen])).await?;
    let client = tokio::time::timeout(Duration::from_secs(20), node)
        .await
        .context("the node did not finish starting within 20 s")??
        .context("the node did not join the master once it was up")?;
    assert_eq!(client.master(), master.peer_id());
    master.shutdown().await;
    Ok(())
}
