//! A node keeps at most `--max-peers` peers connected: past the budget it lets go of the
//! peers it used least recently, once they are idle and past the grace period, and keeps the
//! master (`shoal_node::peers`). The peers here are raw libp2p peers that dial the node and
//! then do nothing; without the budget the node would keep them for its 60 s idle timeout.

use std::time::{Duration, Instant};

use libp2p::{identity::Keypair, multiaddr::Protocol};
use shoal_node::NodeConfig;
use shoal_protocol::wire::{MasterRequest, MasterResponse};
use shoal_tests::raw::RawPeer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_over_its_peer_budget_lets_idle_peers_go_and_keeps_the_master() -> anyhow::Result<()>
{
    shoal_tests::init_tracing();
    let tmp = tempfile::tempdir()?;
    let master = shoal_tests::start_master(&tmp.path().join("master"), None).await?;
    let bootstrap = master.addrs()[0].clone();
    // The master and one more.
    let node = shoal_node::start(
        NodeConfig::new(tmp.path().join("node"), bootstrap)
            .with_listen(vec![shoal_tests::loopback()])
            .with_max_peers(2),
    )
    .await?;
    let addr = node
        .listen_addrs()
        .await
        .into_iter()
        .next()
        .expect("the node listens")
        .with(Protocol::P2p(node.peer_id()));

    let mut raws = Vec::new();
    for _ in 0..4 {
        raws.push(RawPeer::start(Keypair::generate_ed25519(), false, Some(&addr)).await?);
    }
    let connected = |raws: &[RawPeer]| raws.iter().map(RawPeer::connections).sum::<usize>();
    // Fresh connections are spared for the grace period: all four got in.
    assert_eq!(connected(&raws), 4, "a raw peer could not connect");

    let started = Instant::now();
    let limit = shoal_node::peers::GRACE * 3;
    while connected(&raws) > 1 {
        assert!(
            started.elapsed() < limit,
            "{} raw peers still connected after {} s; the budget leaves room for one",
            connected(&raws),
            limit.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The master was kept: the node still talks to it on the same connection.
    assert!(
        matches!(
            node.master_request(MasterRequest::Hello {
                region: String::new()
            })
            .await?,
            MasterResponse::Ack
        ),
        "the master did not acknowledge the node's hello"
    );
    println!(
        "over budget by 3: let go in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
