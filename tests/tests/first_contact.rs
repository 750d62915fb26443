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
//! scale the bound. Measured on 2 cores shared with other builds: 9.3 s at a load average of
//! about 6, 14 s at 8, 16 to 35 s at 13 to 17; always 1.000 copies, no retries, the three
//! fetches finishing within 0.5 s of each other. What a stall looks like
//! instead, whatever the load: one fetch done early, the others tens of seconds later, and the
//! master sending extra copies; the spread and the copies are checked without scaling.
//!
//! This file holds this one test only, so that no other test of the same binary competes
//! with it for the CPU; the other first-contact items are in `first_contact_cli.rs`.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;
use shoal_tests::procs::{bin_dir, metric, sha256_file, wait_for_file, Proc};

const SIZE: usize = 200 * 1024 * 1024;

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
                // The default keeps 1 GiB free beyond the file; CI disks can be tighter than
                // that, and this test is about the flow, not the reserve (publishing.rs tests it).
                "--min-free-disk",
                "0",
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
