//! Master-only authority: a `PeerBanned` on the authority topic signed by anyone but the
//! master is rejected, acted on by no node and not forwarded to a third node, and its sender's
//! gossipsub score falls to the graylist; a genuine master ban still reaches every node, and
//! so does the announcement of a file added with `shoal-master add`.

use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use libp2p::{multiaddr::Protocol, Multiaddr, PeerId};
use shoal_node::{chaos::ChaosMode, Client, FetchOptions};
use shoal_protocol::{
    behaviour::{Behaviour, Role},
    wire::{encode_authority, AuthorityEvent, DigestRequest},
};
use shoal_tests::{start_chaos_node, start_node};

/// Connects `from` to `to` (a digest request; its answer does not matter).
async fn connect(from: &Client, to: &Client) -> anyhow::Result<()> {
    from.hint(to.peer_id(), to.listen_addrs().await).await;
    let file = shoal_protocol::FileId([0; 32]);
    from.digest_request(to.peer_id(), DigestRequest::Header { file })
        .await
        .with_context(|| format!("{} cannot reach {}", from.peer_id(), to.peer_id()))?;
    Ok(())
}

/// Waits up to `limit` for `cond`, failing with `what`.
async fn wait_for<F, Fut>(limit: Duration, what: &str, mut cond: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !cond().await {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{what} (waited {limit:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A peer with its own swarm (the shoal behaviour, its own key) that dials only `relay` and
/// publishes `count` forged `PeerBanned { victim }` messages on the authority topic, signed
/// with its own key. Returns its PeerId; the task runs until aborted.
fn spawn_forger(
    relay: Multiaddr,
    victim: PeerId,
    count: usize,
) -> anyhow::Result<(PeerId, tokio::task::JoinHandle<()>)> {
    let relay_peer =
        shoal_protocol::behaviour::peer_of(&relay).context("relay address without /p2p")?;
    let key = libp2p::identity::Keypair::generate_ed25519();
    let me = key.public().to_peer_id();
    let mut swarm = shoal_net::build_swarm(key, &shoal_net::SwarmOptions::for_role(Role::Node))?;
    swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(&Behaviour::authority_topic())?;
    swarm.dial(relay)?;
    let forged = encode_authority(&AuthorityEvent::PeerBanned { peer: victim });
    let task = tokio::spawn(async move {
        let mut sent = 0;
        let mut tick = tokio::time::interval(Duration::from_millis(300));
        loop {
            tokio::select! {
                ev = swarm.select_next_some() => {
                    // Only the relay: Kademlia would find the other nodes, and a message the
                    // forger sends them itself says nothing about forwarding.
                    if let libp2p::swarm::SwarmEvent::ConnectionEstablished { peer_id, .. } = ev {
                        if peer_id != relay_peer {
                            let _ = swarm.disconnect_peer_id(peer_id);
                        }
                    }
                }
                _ = tick.tick(), if sent < count => {
                    // Fails with InsufficientPeers until the relay's subscription arrived.
                    if swarm
                        .behaviour_mut()
                        .gossipsub
                        .publish(Behaviour::authority_topic(), forged.clone())
                        .is_ok()
                    {
                        sent += 1;
                    }
                }
            }
        }
    });
    Ok((me, task))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_master_speaks_with_authority() -> anyhow::Result<()> {
    shoal_tests::init_tracing();
    let tmp = tempfile::tempdir()?;
    let size = 512 * 1024;
    let shoal_tests::Published {
        master,
        bootstrap,
        file,
        src,
    } = shoal_tests::published(tmp.path(), size, 21, None).await?;
    let relay = start_node(&tmp.path().join("relay"), &bootstrap, None).await?;
    let third = start_node(&tmp.path().join("third"), &bootstrap, None).await?;
    let honest = start_node(&tmp.path().join("honest"), &bootstrap, None).await?;
    // The relay is connected to both other nodes, so it could forward to them.
    connect(&third, &relay).await?;
    connect(&honest, &relay).await?;
    // Subscriptions are exchanged on connection, and a peer joins the mesh of a topic when
    // its subscription arrives (the heartbeat, every second, only mends the mesh).
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A file added with `shoal-master add` (the registry, as the CLI does) is announced on
    // the authority topic when the running master's rescan registers it (every 2 s).
    let added = tmp.path().join("added.bin");
    shoal_tests::write_random_file(&added, 64 * 1024, 22)?;
    let reg = shoal_master::registry::Registry::open(&tmp.path().join("master"))?;
    reg.add_local(&added, &reg.key()?)?;
    for n in [&relay, &third, &honest] {
        let n = n.clone();
        wait_for(
            Duration::from_secs(30),
            &format!("{} never heard of the added file", n.peer_id()),
            || {
                let n = n.clone();
                async move { n.authority_messages().0 >= 1 }
            },
        )
        .await?;
    }

    // The forger is connected to the relay only.
    let relay_addr = relay
        .listen_addrs()
        .await
        .into_iter()
        .next()
        .context("relay listens nowhere")?
        .with(Protocol::P2p(relay.peer_id()));
    let (forger, forger_task) = spawn_forger(relay_addr, honest.peer_id(), 5)?;
    wait_for(
        Duration::from_secs(30),
        "the relay never received the forged messages",
        || async { relay.authority_messages().1 >= 3 },
    )
    .await?;
    // Forwarding is immediate; give it ample time to happen if it were going to.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let score = relay.gossip_score(forger).await;
    forger_task.abort();
    println!(
        "relay rejected {} forged messages; forger's score at the relay {score:?}",
        relay.authority_messages().1
    );
    for (name, n) in [("third", &third), ("honest", &honest)] {
        assert_eq!(
            n.authority_messages().1,
            0,
            "the forged message reached the {name} node"
        );
    }
    for n in [&relay, &third, &honest] {
        assert!(
            !n.is_banned(&honest.peer_id()),
            "{} acted on a forged ban",
            n.peer_id()
        );
    }
    let status = master.status(file).await.context("status")?;
    assert!(!status.banned.contains(&honest.peer_id()));
    // Graylisted: three invalid messages cost 10 x 3^2 (minus a little decay).
    let score = score.context("the forger is no longer connected to the relay")?;
    assert!(
        score <= -80.0,
        "the forger's score {score} is above the graylist threshold"
    );

    // A genuine ban: a corrupting node holds the whole file, the honest node is redirected
    // to it, reports it, the master probes and bans it and says so on the authority topic.
    let bad = start_chaos_node(&tmp.path().join("bad"), &bootstrap, ChaosMode::Corrupt).await?;
    tokio::time::timeout(
        Duration::from_secs(60),
        shoal_node::fetch(
            &bad,
            FetchOptions::new(file, tmp.path().join("bad/out.bin")),
        ),
    )
    .await
    .context("the corrupter's fetch timed out")??;
    let out = tmp.path().join("honest/out.bin");
    tokio::time::timeout(
        Duration::from_secs(60),
        shoal_node::fetch(&honest, FetchOptions::new(file, &out)),
    )
    .await
    .context("the honest fetch timed out")??;
    assert!(std::fs::read(&out)? == std::fs::read(&src)?, "wrong bytes");
    for n in [&relay, &third, &honest] {
        let (n, bad) = (n.clone(), bad.peer_id());
        wait_for(
            Duration::from_secs(30),
            &format!("{} never heard of the master's ban", n.peer_id()),
            || {
                let n = n.clone();
                async move { n.is_banned(&bad) }
            },
        )
        .await?;
        // The file announcement and the ban.
        assert!(n.authority_messages().0 >= 2);
    }
    master.shutdown().await;
    Ok(())
}
