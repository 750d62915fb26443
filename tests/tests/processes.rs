//! Real processes: the built `shoal-master`, `shoal publish` and six `shoal fetch` over
//! loopback TCP.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

/// The directory holding the workspace's binaries, building them if they are missing.
fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|p| p.parent())
        .context("test binary has no target dir")?
        .to_path_buf();
    if !dir.join("shoal").exists() || !dir.join("shoal-master").exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--bins", "-p", "shoal-node", "-p", "shoal-master"])
            .status()?;
        if !status.success() {
            bail!("building the binaries failed");
        }
    }
    Ok(dir)
}

/// Kills the child when dropped, so a failing test leaves no process behind.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_file(path: &Path, limit: Duration) -> anyhow::Result<String> {
    let start = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if !s.trim().is_empty() {
                return Ok(s);
            }
        }
        if start.elapsed() > limit {
            bail!("{} did not appear within {limit:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_with_limit(
    child: &mut Child,
    limit: Duration,
    what: &str,
) -> anyhow::Result<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if start.elapsed() > limit {
            bail!("{what} did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn master_and_six_fetch_processes_over_loopback() -> anyhow::Result<()> {
    let bins = bin_dir()?;
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("source.bin");
    shoal_tests::write_random_file(&src, 8 * 1024 * 1024 + 12345, 3)?;

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
        .arg(tmp.path().join("publisher"))
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
        let child = Command::new(bins.join("shoal"))
            .args([
                "fetch",
                &file_id,
                "--bootstrap",
                &bootstrap,
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--seed-time",
                "3",
            ])
            .arg("--data-dir")
            .arg(&dir)
            .arg("--out")
            .arg(dir.join("out.bin"))
            .arg("--report")
            .arg(dir.join("report.json"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        fetchers.push((Proc(child), dir));
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
    Ok(())
}
