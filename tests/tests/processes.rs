//! Real processes: the built `shoal-master`, `shoal publish` and six `shoal fetch` over
//! loopback TCP.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;
use shoal_tests::procs::{add_file, bin_dir, wait_for_file, wait_with_limit, Proc};

#[test]
fn master_and_six_fetch_processes_over_loopback() -> anyhow::Result<()> {
    let bins = bin_dir()?;
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("source.bin");
    shoal_tests::write_random_file(&src, 8 * 1024 * 1024 + 12345, 3)?;

    // The publisher's key exists before the master starts, so the master can trust it.
    let publisher_dir = tmp.path().join("publisher");
    let publisher = write_key(&publisher_dir)?;
    let stranger_dir = tmp.path().join("stranger");
    let stranger = write_key(&stranger_dir)?;

    let master_dir = tmp.path().join("master");
    let _master = Proc(
        Command::new(bins.join("shoal-master"))
            .args(["--data-dir"])
            .arg(&master_dir)
            .args([
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--max-upload-rate",
                "4000000",
                "--publisher-key",
                &publisher.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let addr = wait_for_file(&master_dir.join("bootstrap.addr"), Duration::from_secs(20))?;
    let bootstrap = addr
        .lines()
        .next()
        .context("empty bootstrap.addr")?
        .to_string();

    // A publisher the master was not told to trust is refused, with the flag that would
    // trust it, and the master stores nothing.
    let refused = Command::new(bins.join("shoal"))
        .args(["publish"])
        .arg(&src)
        .args([
            "--bootstrap",
            &bootstrap,
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--data-dir",
        ])
        .arg(&stranger_dir)
        .output()?;
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "an untrusted publisher was accepted"
    );
    assert!(
        err.contains(&format!("--publisher-key {stranger}")),
        "the refusal does not name the flag: {err}"
    );
    assert_eq!(
        std::fs::read_dir(master_dir.join("manifests"))?.count(),
        0,
        "a refused announce left a manifest"
    );
    assert_eq!(std::fs::read_dir(master_dir.join("files"))?.count(), 0);

    let publish = Command::new(bins.join("shoal"))
        .args(["publish"])
        .arg(&src)
        .args([
            "--bootstrap",
            &bootstrap,
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--data-dir",
        ])
        .arg(&publisher_dir)
        .stderr(Stdio::inherit())
        .output()?;
    assert!(publish.status.success(), "publish failed");
    let stdout = String::from_utf8(publish.stdout)?;
    let file_id = stdout
        .lines()
        .last()
        .context("publish printed nothing")?
        .trim()
        .to_string();

    let mut fetchers = Vec::new();
    for i in 0..6 {
        let dir = tmp.path().join(format!("node{i}"));
        // They keep serving for 3 s after finishing, so late finishers still find peers.
        // Half of them write and serve with O_DIRECT.
        let extra: &[&str] = if i % 2 == 1 { &["--direct-io"] } else { &[] };
        fetchers.push((
            spawn_fetch(&bins, &file_id, &bootstrap, &dir, "3", extra)?,
            dir,
        ));
    }
    let want = std::fs::read(&src)?;
    let mut from_peers = 0;
    for (mut p, dir) in fetchers {
        let status = wait_with_limit(&mut p.0, Duration::from_secs(120), "shoal fetch")?;
        assert!(
            status.success(),
            "fetch in {} failed: {status}",
            dir.display()
        );
        assert!(
            std::fs::read(dir.join("out.bin"))? == want,
            "{} differs from the source",
            dir.display()
        );
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("report.json"))?)?;
        for key in [
            "peer_id",
            "bytes_from_master",
            "bytes_from_peers",
            "bytes_uploaded",
            "blocks",
            "retries",
            "elapsed_s",
        ] {
            assert!(report.get(key).is_some(), "report lacks {key}");
        }
        from_peers += report["bytes_from_peers"].as_u64().unwrap_or(0);
    }
    assert!(from_peers > 0, "no fetch process got anything from a peer");

    // Provenance: inspect names the publisher, verify checks copies offline.
    let publisher_key = std::fs::read(tmp.path().join("publisher").join("identity.key"))?;
    let publisher = libp2p::identity::Keypair::from_protobuf_encoding(&publisher_key)?
        .public()
        .to_peer_id();
    let inspect = Command::new(bins.join("shoal"))
        .args([
            "inspect",
            &file_id,
            "--bootstrap",
            &bootstrap,
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ])
        .arg("--data-dir")
        .arg(tmp.path().join("inspector"))
        .stderr(Stdio::null())
        .output()?;
    assert!(inspect.status.success(), "shoal inspect failed");
    let text = String::from_utf8(inspect.stdout)?;
    assert!(
        text.contains(&format!("published by:   {publisher}")),
        "{text}"
    );
    let manifest = tmp
        .path()
        .join("node0")
        .join("manifests")
        .join(format!("{file_id}.manifest"));
    let verify = |path: &Path| {
        Command::new(bins.join("shoal"))
            .arg("verify")
            .arg(path)
            .arg("--manifest")
            .arg(&manifest)
            .stderr(Stdio::null())
            .output()
    };
    assert!(verify(&tmp.path().join("node0").join("out.bin"))?
        .status
        .success());
    let mut bad = want.clone();
    bad[65536 * 5 + 100] ^= 1;
    let bad_path = tmp.path().join("bad.bin");
    std::fs::write(&bad_path, bad)?;
    let out = verify(&bad_path)?;
    assert!(!out.status.success(), "verify accepted a damaged copy");
    let text = String::from_utf8(out.stdout)?;
    assert!(
        text.contains("1 of 129 blocks fail their digest: 5"),
        "{text}"
    );
    Ok(())
}

/// Writes a fresh identity key into `dir` (as `shoal` would create it) and returns its PeerId.
fn write_key(dir: &Path) -> anyhow::Result<libp2p::PeerId> {
    std::fs::create_dir_all(dir)?;
    let key = libp2p::identity::Keypair::generate_ed25519();
    std::fs::write(dir.join("identity.key"), key.to_protobuf_encoding()?)?;
    Ok(key.public().to_peer_id())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn spawn_master(bins: &Path, dir: &Path, port: u16, rate: u64) -> anyhow::Result<(Proc, String)> {
    let _ = std::fs::remove_file(dir.join("bootstrap.addr"));
    let p = Proc(
        Command::new(bins.join("shoal-master"))
            .arg("--data-dir")
            .arg(dir)
            .args([
                "--listen",
                &format!("/ip4/127.0.0.1/tcp/{port}"),
                "--max-upload-rate",
                &rate.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let addr = wait_for_file(&dir.join("bootstrap.addr"), Duration::from_secs(20))?;
    Ok((
        p,
        addr.lines()
            .next()
            .context("empty bootstrap.addr")?
            .to_string(),
    ))
}

fn spawn_fetch(
    bins: &Path,
    file_id: &str,
    bootstrap: &str,
    dir: &Path,
    seed_time: &str,
    extra: &[&str],
) -> anyhow::Result<Proc> {
    Ok(Proc(
        Command::new(bins.join("shoal"))
            .args([
                "fetch",
                file_id,
                "--bootstrap",
                bootstrap,
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--seed-time",
                seed_time,
            ])
            .arg("--data-dir")
            .arg(dir)
            .arg("--out")
            .arg(dir.join("out.bin"))
            .arg("--report")
            .arg(dir.join("report.json"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    ))
}

#[test]
fn a_killed_fetch_resumes_without_refetching_verified_blocks() -> anyhow::Result<()> {
    let bins = bin_dir()?;
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("source.bin");
    shoal_tests::write_random_file(&src, 24 * 1024 * 1024, 21)?;
    let master_dir = tmp.path().join("master");
    let file_id = add_file(&bins, &master_dir, &src)?;
    // 4 MB/s: the fetch takes about 6 s, long enough to kill it half way.
    let (_master, bootstrap) = spawn_master(&bins, &master_dir, free_port()?, 4_000_000)?;
    let node = tmp.path().join("node");
    // Killed while writing with O_DIRECT, resumed through the page cache: the journal means
    // the same either way.
    let mut first = spawn_fetch(&bins, &file_id, &bootstrap, &node, "0", &["--direct-io"])?;
    let journal = node.join("journals").join(format!("{file_id}.journal"));
    // Wait until the journal holds at least a third of the 384 blocks, then SIGKILL.
    let start = Instant::now();
    while std::fs::metadata(&journal).map_or(0, |m| m.len()) < 4 * 128 {
        anyhow::ensure!(
            first.0.try_wait()?.is_none(),
            "the first fetch ended before it could be killed"
        );
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(60),
            "the journal never grew"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    first.0.kill()?; // SIGKILL
    first.0.wait()?;
    let journaled = std::fs::metadata(&journal)?.len() / 4;
    assert!(journaled < 384, "the first fetch finished before the kill");

    let mut second = spawn_fetch(&bins, &file_id, &bootstrap, &node, "0", &[])?;
    let status = wait_with_limit(&mut second.0, Duration::from_secs(120), "the resumed fetch")?;
    assert!(status.success(), "the resumed fetch failed: {status}");
    assert!(
        std::fs::read(node.join("out.bin"))? == std::fs::read(&src)?,
        "resumed output differs"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(node.join("report.json"))?)?;
    let resumed = report["blocks_resumed"]
        .as_u64()
        .context("blocks_resumed")?;
    let fetched = report["bytes_from_master"].as_u64().unwrap_or(0)
        + report["bytes_from_peers"].as_u64().unwrap_or(0);
    assert!(
        resumed >= journaled,
        "resumed {resumed} blocks but {journaled} were journaled"
    );
    assert!(
        fetched <= (384 - resumed) * 65536,
        "fetched {fetched} bytes, more than the {} missing blocks",
        384 - resumed
    );
    Ok(())
}

#[test]
fn fetches_survive_a_master_crash_and_restart() -> anyhow::Result<()> {
    let bins = bin_dir()?;
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("source.bin");
    shoal_tests::write_random_file(&src, 16 * 1024 * 1024, 22)?;
    let master_dir = tmp.path().join("master");
    let file_id = add_file(&bins, &master_dir, &src)?;
    let port = free_port()?;
    let (mut master, bootstrap) = spawn_master(&bins, &master_dir, port, 4_000_000)?;
    let before = std::fs::read_to_string(master_dir.join("bootstrap.addr"))?;
    let mut fetchers = Vec::new();
    for i in 0..3 {
        let dir = tmp.path().join(format!("node{i}"));
        fetchers.push((
            spawn_fetch(&bins, &file_id, &bootstrap, &dir, "0", &[])?,
            dir,
        ));
    }
    std::thread::sleep(Duration::from_millis(1500));
    master.0.kill()?; // SIGKILL, mid-transfer
    master.0.wait()?;
    std::thread::sleep(Duration::from_millis(1000));
    let (_master, again) = spawn_master(&bins, &master_dir, port, 8_000_000)?;
    assert_eq!(
        again, bootstrap,
        "the restarted master has another address or PeerId"
    );
    assert_eq!(
        std::fs::read_to_string(master_dir.join("bootstrap.addr"))?,
        before
    );
    let want = std::fs::read(&src)?;
    for (mut p, dir) in fetchers {
        let status = wait_with_limit(
            &mut p.0,
            Duration::from_secs(120),
            "a fetch across the master restart",
        )?;
        assert!(
            status.success(),
            "fetch in {} failed: {status}",
            dir.display()
        );
        assert!(
            std::fs::read(dir.join("out.bin"))? == want,
            "{} differs",
            dir.display()
        );
    }
    // Every fetcher has left: status shows no mirrors, and the master alone holds the file.
    let out = Command::new(bins.join("shoal"))
        .args([
            "status",
            &file_id,
            "--json",
            "--bootstrap",
            &bootstrap,
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ])
        .arg("--data-dir")
        .arg(tmp.path().join("status"))
        .stderr(Stdio::null())
        .output()?;
    assert!(out.status.success(), "shoal status failed");
    let s: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(s["mirrors"].as_array().map(Vec::len), Some(0), "{s}");
    assert_eq!(s["master_only_blocks"], 256, "{s}");
    assert!(s["bytes_from_master"].as_u64().is_some() && s["bytes_from_peers"].as_u64().is_some());
    Ok(())
}
