//! The README's "Across machines" flow, run exactly as a new user would (issue 8): `shoal id`
//! for the publisher's PeerId, one `shoal-master` with no upload cap trusting it
//! (`--publisher-key`), `shoal publish` of a 200 MiB file, then three `shoal fetch`
//! started at once, each with its own `--data-dir` and `--out` and the DEFAULT `--seed-time`
//! (they keep seeding after they finish, so the test waits for their `--report` files, not for
//! them to exit).
//!
//! Bounds, from the issue: every copy exact; the slowest fetch done within 10 s of the three
//! starting (before the fix of libp2p-stream's one-slot acceptor it took 21 to 41 s: inbound
//! piece streams were reset in bursts, requesters avoided healthy peers for 30 s); the master
//! sending at most 1.1 copies of the file (its `shoal_master_piece_bytes_sent_total`; it sent
//! 1.3 to 1.9 copies before the fix).
//!
//! The 10 s bound assumes an otherwise idle machine (as in CI): the whole flow needs about 8
//! CPU-seconds (debug build; per fetch about 1.3 s, the master about 1.7 s, the peers' uploads
//! the rest). On a machine shared with other builds, set `SHOAL_TEST_TIME_FACTOR` (e.g. 3) to
//! scale the bound; measured with a load average of 15 on 2 cores: 26 s, 1.000 copies, no
//! retries, the three fetches finishing within 0.2 s of each other. What a stall looks like
//! instead, whatever the load: one fetch done early, the others tens of seconds later, and the
//! master sending extra copies; the spread and the copies are checked without scaling.

use std::{
    io::{Read, Write},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;
use sha2::Digest;
use shoal_tests::procs::{bin_dir, wait_for_file, Proc};

const SIZE: usize = 200 * 1024 * 1024;

fn sha256_file(path: &Path) -> anyhow::Result<[u8; 32]> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finalize().into());
        }
        h.update(&buf[..n]);
    }
}

/// `GET /metrics` from the master; returns the value of `name`.
fn metric(addr: &str, name: &str) -> anyhow::Result<f64> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().split(' ').next()?.parse().ok())
        .with_context(|| format!("{name} missing from the master's metrics:\n{text}"))
}

#[test]
fn readme_flow_three_fetches_of_200_mib_from_an_uncapped_master() -> anyhow::Result<()> {
    let bins = bin_dir()?;
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("release.iso");
    shoal_tests::write_random_file(&src, SIZE, 8)?;
    let want = sha256_file(&src)?;

    // As the README says: the publisher's PeerId first, for the master's --publisher-key.
    let id = Command::new(bins.join("shoal"))
        .arg("id")
        .arg("--data-dir")
        .arg(tmp.path().join("publisher"))
        .output()?;
    anyhow::ensure!(id.status.success(), "shoal id failed");
    let publisher = String::from_utf8(id.stdout)?.trim().to_string();

    let master_dir = tmp.path().join("master");
    let master_log = tmp.path().join("master.log");
    let _master = Proc(
        Command::new(bins.join("shoal-master"))
            .arg("--data-dir")
            .arg(&master_dir)
            .args([
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--metrics-addr",
                "127.0.0.1:0",
                "--publisher-key",
                &publisher,
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&master_log)?)
            .spawn()?,
    );
    let bootstrap = wait_for_file(&master_dir.join("bootstrap.addr"), Duration::from_secs(30))?
        .lines()
        .next()
        .context("empty bootstrap.addr")?
        .to_string();
    let metrics_addr = {
        let start = Instant::now();
        loop {
            let log = std::fs::read_to_string(&master_log)?;
            if let Some(a) = log
                .lines()
                .find_map(|l| l.split("metrics at http://").nth(1))
                .and_then(|rest| rest.split('/').next())
            {
                break a.to_string();
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(30),
                "the master never said where its metrics are:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    let publish = Command::new(bins.join("shoal"))
        .arg("publish")
        .arg(&src)
        .args([
            "--bootstrap",
            &bootstrap,
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ])
        .arg("--data-dir")
        .arg(tmp.path().join("publisher"))
        .stderr(Stdio::inherit())
        .output()?;
    anyhow::ensure!(publish.status.success(), "shoal publish failed");
    let file_id = String::from_utf8(publish.stdout)?
        .lines()
        .last()
        .context("publish printed nothing")?
        .trim()
        .to_string();
    let sent_before = metric(&metrics_addr, "shoal_master_piece_bytes_sent_total")?;

    let start = Instant::now();
    let mut fetchers = Vec::new();
    for i in 0..3 {
        let dir = tmp.path().join(format!("node{i}"));
        std::fs::create_dir_all(&dir)?;
        let p = Proc(
            Command::new(bins.join("shoal"))
                .args([
                    "fetch",
                    &file_id,
                    "--bootstrap",
                    &bootstrap,
                    "--listen",
                    "/ip4/127.0.0.1/tcp/0",
                ])
                .arg("--data-dir")
                .arg(dir.join("data"))
                .arg("--out")
                .arg(dir.join("release.iso"))
                .arg("--report")
                .arg(dir.join("report.json"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("stderr.log"))?)
                .spawn()?,
        );
        fetchers.push((p, dir));
    }
    let mut slowest = Duration::ZERO;
    let mut elapsed = Vec::new();
    let mut from_master = 0;
    for (p, dir) in &fetchers {
        // Generous, so that a regression shows as a measured time, not as a timeout.
        let report = wait_for_file(&dir.join("report.json"), Duration::from_secs(180))
            .with_context(|| {
                format!(
                    "fetch in {} never finished; its stderr:\n{}",
                    dir.display(),
                    std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
                )
            })?;
        slowest = slowest.max(start.elapsed());
        let report: serde_json::Value = serde_json::from_str(&report)?;
        eprintln!(
            "{}: done after {:.2} s; report: elapsed {} s, from master {}, from peers {}, retries {}",
            dir.display(),
            start.elapsed().as_secs_f64(),
            report["elapsed_s"],
            report["bytes_from_master"],
            report["bytes_from_peers"],
            report["retries"]
        );
        elapsed.push(report["elapsed_s"].as_f64().context("elapsed_s")?);
        from_master += report["bytes_from_master"]
            .as_u64()
            .context("bytes_from_master")?;
        let _ = p;
    }
    let sent = metric(&metrics_addr, "shoal_master_piece_bytes_sent_total")? - sent_before;
    let copies = sent / SIZE as f64;
    eprintln!(
        "slowest fetch {:.2} s; master sent {copies:.3} copies ({:.3} by the fetch reports)",
        slowest.as_secs_f64(),
        from_master as f64 / SIZE as f64
    );
    for (_, dir) in &fetchers {
        anyhow::ensure!(
            sha256_file(&dir.join("release.iso"))? == want,
            "{} differs from the source",
            dir.join("release.iso").display()
        );
    }
    anyhow::ensure!(
        copies <= 1.1,
        "the master sent {copies:.3} copies of the file (bound 1.1)"
    );
    // Each report's own elapsed time (the three started together): a spread of more than
    // 5 s is a stall.
    let (_, last) = shoal_tests::median_max(elapsed.clone());
    let first = elapsed.iter().copied().fold(f64::MAX, f64::min);
    anyhow::ensure!(
        last - first <= 5.0,
        "the fetches finished {:.1} s apart (a stall: some waited while others were done)",
        last - first
    );
    let factor: f64 = std::env::var("SHOAL_TEST_TIME_FACTOR")
        .ok()
        .and_then(|f| f.parse().ok())
        .unwrap_or(1.0);
    let bound = Duration::from_secs_f64(10.0 * factor.max(1.0));
    anyhow::ensure!(
        slowest <= bound,
        "the slowest fetch took {slowest:?} (bound {bound:?}; SHOAL_TEST_TIME_FACTOR={factor})"
    );
    Ok(())
}

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

fn add_file(bins: &Path, master_dir: &Path, src: &Path) -> anyhow::Result<String> {
    let out = Command::new(bins.join("shoal-master"))
        .arg("add")
        .arg(src)
        .arg("--data-dir")
        .arg(master_dir)
        .stderr(Stdio::null())
        .output()?;
    anyhow::ensure!(out.status.success(), "shoal-master add failed");
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
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
#[test]
fn a_ticket_is_all_a_fetch_needs() -> anyhow::Result<()> {
    let bins = bin_dir()?;
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src.bin");
    shoal_tests::write_random_file(&src, 3 * 1024 * 1024 + 17, 83)?;
    let master_dir = tmp.path().join("master");
    let (_master, _) = spawn_master(&bins, &master_dir, None)?;
    let out = Command::new(bins.join("shoal-master"))
        .arg("add")
        .arg(&src)
        .arg("--data-dir")
        .arg(&master_dir)
        .output()?;
    anyhow::ensure!(out.status.success(), "shoal-master add failed");
    let err = String::from_utf8(out.stderr)?;
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
    Ok(())
}
