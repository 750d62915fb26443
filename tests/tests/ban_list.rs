//! The master's ban list on disk (one PeerId a line) is the one decoder of issue 7's list that
//! is text: a damaged list (junk lines, bytes that are not UTF-8, random bytes) never stops the
//! master, and every good line in it still counts (a ban is not lost because a neighbouring
//! line is damaged).

use std::time::Duration;

use anyhow::Context;
use libp2p::identity::Keypair;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_ban_list_keeps_its_good_lines_and_never_stops_the_master() -> anyhow::Result<()>
{
    shoal_tests::init_tracing();
    let tmp = tempfile::tempdir()?;
    let master_dir = tmp.path().join("master");
    std::fs::create_dir_all(&master_dir)?;
    let (a, b) = (
        Keypair::generate_ed25519().public().to_peer_id(),
        Keypair::generate_ed25519().public().to_peer_id(),
    );
    let mut list = format!("{a}\nnot a peer id\n").into_bytes();
    list.extend_from_slice(&[0xff, 0xfe, 0x00, b'\n']); // not UTF-8
    list.extend_from_slice(format!("  {b}  \n\n").as_bytes());
    list.extend((0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8));
    std::fs::write(master_dir.join("bans"), &list)?;

    let master = shoal_tests::start_master(&master_dir, None).await?;
    let bootstrap = master.addrs()[0].clone();
    let src = tmp.path().join("source.bin");
    shoal_tests::write_random_file(&src, 256 * 1024, 3)?;
    let (publisher, file) =
        shoal_tests::publish(&tmp.path().join("publisher"), &bootstrap, &src).await?;
    publisher.shutdown().await;
    let status = tokio::time::timeout(Duration::from_secs(10), master.status(file))
        .await
        .context("status took over 10 s")?
        .context("status")?;
    let missing: Vec<_> = [a, b]
        .into_iter()
        .filter(|p| !status.banned.contains(p))
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "good lines of a damaged ban list were dropped: {missing:?} not banned (banned: {:?})",
        status.banned
    );
    Ok(())
}
