//! First contact (issue 8), the smaller items, as real processes: Ctrl-C exits 130 and the
//! rerun says what it resumes; progress lines without a terminal, `--progress json`; the
//! download sits at OUT.part until verified; node metrics; a wrong master PeerId says who
//! answered; tickets and `shoal ls`. (The README's across-machines flow is in
//! `first_contact.rs`.)

use std::{
    io::Read,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;
use shoal_tests::procs::{add_file, bin_dir, metric, sha256_file, wait_for_file, Proc};

fn spawn_master(bins: &Path, dir: &Path, rate: Option<u64>) -> anyhow::Result<(Proc, String)> {
    let mut c = Command::new(bins.join("shoal-master"));
    c.arg("--data-dir")
        .arg(dir)
        .args(["--listen", "/ip4/127.0.0.1/tcp/0"]);
    if let Some(r) = rate {
        c.args(["--max-upload-rate", &r.to_string()]);
    }
    let p = Proc(c.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?);
    let addr = wait_for_file(&dir.join("bootstrap.addr"), Duration::from_secs(30))?;
    Ok((
        p,
        addr.lines()
            .next()
            .context("empty bootstrap.addr")?
            .to_string(),
    ))
}

/// Without a terminal a fetch prints progress lines; the download goes to OUT.part; Ctrl-C
/// exits 130; the rerun says what it resumes and reports JSON progress on request.
#[test]
fn an_interrupted_fetch_exits_130_and_its_rerun_says_it_resumes() -> anyhow::Result<()> {
    let bins = bin_dir()?;
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src.bin");
    shoal_tests::write_random_file(&src, 24 * 1024 * 1024, 81)?;
    let master_dir = tmp.path().join("master");
    let file_id = add_file(&bins, &master_dir, &src)?;
    // 2 MB/s: the download takes about 12 s, long enough for a 5 s progress line.
    let (_master, bootstrap) = spawn_master(&bins, &master_dir, Some(2_000_000))?;
    let out = tmp.path().join("got.bin");
    let part = tmp.path().join("got.bin.part");
    let fetch = |log: &str| -> anyhow::Result<std::process::Child> {
        Ok(Command::new(bins.join("shoal"))
            .args(["fetch", &file_id, "--bootstrap", &bootstrap])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--seed-time", "0"])
            .arg("--data-dir")
            .arg(tmp.path().join("data"))
            .arg("--out")
            .arg(&out)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(tmp.path().join(log))?)
            .spawn()?)
    };
    let mut first = Proc(fetch("first.log")?);
    let start = Instant::now();
    let log = loop {
        let log = std::fs::read_to_string(tmp.path().join("first.log"))?;
        if log.contains("from the master") {
            break log;
        }
        anyhow::ensure!(
            first.0.try_wait()?.is_none(),
            "the fetch ended early:\n{log}"
        );
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(60),
            "no progress line within 60 s:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(log.contains("of 24.0 MiB ("), "{log}");
    // The node's own metrics, while it fetches.
    let metrics_addr = log
        .lines()
        .find_map(|l| l.split("metrics at http://").nth(1))
        .and_then(|rest| rest.split('/').next())
        .with_context(|| format!("no metrics address in:\n{log}"))?;
    let received = metric(
        metrics_addr,
        "shoal_node_piece_bytes_received_total{source=\"master\"}",
    )?;
    assert!(received >= 65536.0, "received {received}");
    assert!(metric(metrics_addr, "shoal_node_blocks_verified_total")? >= 1.0);
    assert_eq!(
        metric(metrics_addr, "shoal_node_download_bytes")?,
        24.0 * 1024.0 * 1024.0
    );
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a redirected log:\n{log}"
    );
    assert!(
        part.exists() && !out.exists(),
        "a partial download must not sit at --out"
    );
    let status = Command::new("kill")
        .args(["-INT", &first.0.id().to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill -INT failed");
    let code = shoal_tests::procs::wait_with_limit(&mut first.0, Duration::from_secs(30), "fetch")?;
    let log = std::fs::read_to_string(tmp.path().join("first.log"))?;
    assert_eq!(code.code(), Some(130), "{log}");
    assert!(
        log.contains("interrupted; run the same command again to resume"),
        "{log}"
    );
    assert!(
        !out.exists(),
        "an interrupted download must not sit at --out"
    );

    let second = fetch("second.log")?;
    let mut second = Proc(second);
    let mut stdout = second.0.stdout.take().context("stdout")?;
    let code =
        shoal_tests::procs::wait_with_limit(&mut second.0, Duration::from_secs(120), "rerun")?;
    let log = std::fs::read_to_string(tmp.path().join("second.log"))?;
    assert!(code.success(), "{log}");
    let resumed: u64 = log
        .lines()
        .find_map(|l| {
            l.strip_prefix("resuming: ")?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .with_context(|| format!("no resume line:\n{log}"))?;
    assert!(
        log.contains(&format!(
            "resuming: {resumed} of 384 blocks already verified"
        )),
        "{log}"
    );
    assert!(resumed > 0, "{log}");
    let mut json = String::new();
    stdout.read_to_string(&mut json)?;
    assert!(json.is_empty(), "--progress auto wrote to stdout: {json}");
    anyhow::ensure!(
        sha256_file(&out)? == sha256_file(&src)?,
        "the resumed copy differs"
    );
    assert!(!part.exists(), "the .part file was left behind");
    Ok(())
}

/// `--progress json` writes JSON lines on stdout, the last one the end.
#[test]
fn progress_json_lines_end_with_the_whole_file() -> anyhow::Result<()> {
    let bins = bin_dir()?;
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src.bin");
    shoal_tests::write_random_file(&src, 8 * 1024 * 1024, 82)?;
    let master_dir = tmp.path().join("master");
    let file_id = add_file(&bins, &master_dir, &src)?;
    let (_master, bootstrap) = spawn_master(&bins, &master_dir, Some(2_000_000))?;
    let out = Command::new(bins.join("shoal"))
        .args([
            "fetch",
            &file_id,
            "--bootstrap",
            &bootstrap,
            "--progress",
            "json",
        ])
        .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--seed-time", "0"])
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .arg("--out")
        .arg(tmp.path().join("got.bin"))
        .stderr(Stdio::null())
        .output()?;
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert!(lines.len() >= 2, "{lines:?}");
    let end = lines.last().context("no lines")?;
    assert_eq!(end["event"], "end", "{end}");
    assert_eq!(end["held_bytes"], 8 * 1024 * 1024, "{end}");
    assert_eq!(end["bytes_from_master"], 8 * 1024 * 1024, "{end}");
    assert!(lines[..lines.len() - 1]
        .iter()
        .all(|l| l["event"] == "progress"));
    Ok(())
}

/// A bootstrap address with another PeerId: the error says who answered.
#[test]
fn a_wrong_master_peer_id_says_what_answered() -> anyhow::Result<()> {
    let bins = bin_dir()?;
    let tmp = tempfile::tempdir()?;
    let (_master, bootstrap) = spawn_master(&bins, &tmp.path().join("master"), None)?;
    let real = bootstrap
        .rsplit('/')
        .next()
        .context("no peer id")?
        .to_string();
    let other = libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id()
        .to_string();
    let wrong = bootstrap.replace(&real, &other);
    let started = Instant::now();
    let out = Command::new(bins.join("shoal"))
        .args([
            "status",
            &format!("1220{}", "ab".repeat(32)),
            "--bootstrap",
            &wrong,
        ])
        .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr)?;
    assert!(
        err.contains(&format!("answered as {real}, not as the master {other}")),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    Ok(())
}

/// `shoal-master add` prints a ticket; `shoal status` and `shoal fetch` need nothing else.
/// `--block-size` is checked before anything is added, and a fetch works in the size asked for.
#[test]
fn a_ticket_is_all_a_fetch_needs() -> anyhow::Result<()> {
    let bins = bin_dir()?;
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src.bin");
    shoal_tests::write_random_file(&src, 3 * 1024 * 1024 + 17, 83)?;
    let master_dir = tmp.path().join("master");
    let (_master, bootstrap) = spawn_master(&bins, &master_dir, None)?;
    let add = |block_size: &str| -> anyhow::Result<std::process::Output> {
        Ok(Command::new(bins.join("shoal-master"))
            .arg("add")
            .arg(&src)
            .args(["--block-size", block_size])
            .arg("--data-dir")
            .arg(&master_dir)
            .output()?)
    };
    // A block size that is not a power of two is refused before anything is added.
    let bad = add("100000")?;
    let said = String::from_utf8_lossy(&bad.stderr);
    anyhow::ensure!(
        !bad.status.success() && said.contains("100000 is not a power of two from 4096"),
        "add --block-size 100000 should be refused: {said}"
    );
    anyhow::ensure!(
        !master_dir.join("manifests").exists()
            || std::fs::read_dir(master_dir.join("manifests"))?
                .next()
                .is_none(),
        "a refused add left a manifest"
    );
    // The file in 128 KiB blocks (not the default 64 KiB): 25 of them, the last short.
    let out = add("131072")?;
    let err = String::from_utf8(out.stderr)?;
    anyhow::ensure!(out.status.success(), "shoal-master add failed: {err}");
    anyhow::ensure!(err.contains(", 25 blocks;"), "not in 128 KiB blocks: {err}");
    let ticket = err
        .lines()
        .find_map(|l| l.split(": ").nth(1).filter(|t| t.starts_with("shoal:")))
        .with_context(|| format!("add printed no ticket:\n{err}"))?
        .to_string();
    let shoal = |args: &[&str]| -> anyhow::Result<std::process::Output> {
        Ok(Command::new(bins.join("shoal"))
            .args(args)
            .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
            .arg("--data-dir")
            .arg(tmp.path().join("data"))
            .env_remove("SHOAL_BOOTSTRAP")
            .output()?)
    };
    // The running master picks the file up within seconds.
    let start = Instant::now();
    loop {
        let st = shoal(&["status", &ticket, "--json"])?;
        if st.status.success() {
            break;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(30),
            "status never succeeded: {}",
            String::from_utf8_lossy(&st.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let got = tmp.path().join("got.bin");
    let out = shoal(&[
        "fetch",
        &ticket,
        "--out",
        got.to_str().context("path")?,
        "--seed-time",
        "0",
    ])?;
    anyhow::ensure!(
        out.status.success(),
        "fetch by ticket failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(sha256_file(&got)? == sha256_file(&src)?, "the copy differs");
    // `shoal ls` lists it.
    let ls = shoal(&["ls", "--json", "--bootstrap", &bootstrap])?;
    anyhow::ensure!(
        ls.status.success(),
        "ls failed: {}",
        String::from_utf8_lossy(&ls.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&ls.stdout)?;
    assert_eq!(v["total"], 1, "{v}");
    assert_eq!(v["files"][0]["name"], "src.bin", "{v}");
    assert_eq!(v["files"][0]["size"], 3 * 1024 * 1024 + 17, "{v}");
    assert_eq!(v["files"][0]["file"], ticket[6..74], "{v}");
    let ls = shoal(&["ls", "--bootstrap", &bootstrap])?;
    let text = String::from_utf8(ls.stdout)?;
    assert!(
        text.contains("src.bin") && text.contains("3.0 MiB"),
        "{text}"
    );
    Ok(())
}
