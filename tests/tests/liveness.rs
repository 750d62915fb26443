//! A node that vanishes without closing its connection (its network cable pulled: no FIN, no
//! RST, nothing more from it) is dropped from the master's mirrors within a minute. Real
//! processes in network namespaces this test makes:
//!
//! ```text
//!  [master 10.79.0.1]   [node 10.79.0.2]
//!          \____ br0 (pub) ____/
//! ```
//!
//! The node fetches a file and stays as a mirror; then its interface goes down. The master
//! hears nothing more: it finds out through the kernel's TCP keepalive and user timeout
//! (`shoal_net::tcp`: 30 s after the last thing heard from the node, or 30 s after the first
//! thing it sent that went unanswered, whichever comes first; so 30-60 s after the cut). Its
//! libp2p pings, every 30 s and failing only from the second in a row, would take up to 80
//! s; the test checks that they were not what dropped the node.
//!
//! Needs root, `ip` and `nft`; skips with the reason printed otherwise.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::Context;
use shoal_tests::{
    netns::{unavailable, Lab},
    procs::{add_file, bin_dir, master_bootstrap, wait_for_file, wait_for_log, Proc},
};

/// How long the master may take to notice: 60 s at most by the user timeout, and a margin.
const LIMIT: Duration = Duration::from_secs(75);

#[test]
fn a_node_that_vanishes_silently_is_dropped_by_the_kernels_keepalive() -> anyhow::Result<()> {
    if let Some(why) = unavailable() {
        println!("skipping the liveness test: {why}");
        return Ok(());
    }
    let bins = bin_dir()?;
    let tmp = tempfile::tempdir()?;
    let mut lab = Lab::new();
    for ns in ["pub", "master", "node"] {
        lab.add_ns(ns)?;
    }
    lab.add_bridge("pub")?;
    lab.link(("pub", "vm", None), ("master", "eth0", "10.79.0.1/24"))?;
    lab.link(("pub", "vn", None), ("node", "eth0", "10.79.0.2/24"))?;

    let src = tmp.path().join("src.bin");
    shoal_tests::write_random_file(&src, 1024 * 1024, 79)?;
    let master_dir = tmp.path().join("master");
    let file_id = add_file(&bins, &master_dir, &src)?;

    let master_log = tmp.path().join("master.log");
    let mut master = Proc(
        lab.command("master", &bins.join("shoal-master"))
            .arg("--data-dir")
            .arg(&master_dir)
            .args(["--listen", "/ip4/10.79.0.1/tcp/4001"])
            .env("RUST_LOG", "info,libp2p=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&master_log)?)
            .spawn()?,
    );
    // It listens on 10.79.0.1 only.
    let bootstrap = master_bootstrap(&master_dir)?;

    let node_dir = tmp.path().join("node");
    let report = node_dir.join("report.json");
    let mut node = Proc(
        lab.command("node", &bins.join("shoal"))
            .args(["fetch", &file_id, "--bootstrap", &bootstrap])
            .args(["--listen", "/ip4/0.0.0.0/tcp/0", "--progress", "none"])
            .args(["--seed-time", "600"])
            .arg("--data-dir")
            .arg(node_dir.join("data"))
            .arg("--out")
            .arg(node_dir.join("got.bin"))
            .arg("--report")
            .arg(&report)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let report: serde_json::Value =
        serde_json::from_str(&wait_for_file(&report, Duration::from_secs(60))?)?;
    let node_id = report["peer_id"]
        .as_str()
        .context("no peer_id in the node's report")?
        .to_string();
    let gone = format!("mirror gone peer_id={node_id}");
    let log = std::fs::read_to_string(&master_log)?;
    anyhow::ensure!(
        !log.contains(&gone),
        "the master dropped the node before it vanished:\n{log}"
    );

    // The cable is pulled: the node's process runs on, but nothing it sends arrives and
    // nothing reaches it. (Had it exited, its kernel would have closed the connection.)
    anyhow::ensure!(
        node.0.try_wait()?.is_none(),
        "the node exited before its cable was pulled"
    );
    lab.exec("node", &["ip", "link", "set", "eth0", "down"])?;
    let cut = Instant::now();
    wait_for_log(&master_log, &gone, &mut master, LIMIT, "the master")?;
    let took = cut.elapsed();
    anyhow::ensure!(
        node.0.try_wait()?.is_none(),
        "the node exited while its cable was out"
    );
    let log = std::fs::read_to_string(&master_log)?;
    anyhow::ensure!(
        !log.contains("ping failed; disconnecting"),
        "the master's pings dropped the node, not the kernel's keepalive:\n{log}"
    );
    println!(
        "the master dropped the vanished node after {:.1} s",
        took.as_secs_f64()
    );
    Ok(())
}
