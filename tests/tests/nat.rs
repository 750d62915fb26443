//! Nodes behind NAT (issue 10, item 5), as real processes in network namespaces this test
//! makes: the master and a directly reachable node on a "public" bridge, and two nodes each
//! behind its own masquerading router (nftables). Both NATed nodes find out through AutoNAT
//! that they are unreachable and listen through the master's relay; both fetch with exact
//! bytes; and the second NATed node gets the file from the first (the master hints the first
//! at its relayed address; DCUtR may punch a direct connection through both NATs). The test
//! prints which way the bytes went: over the relay or over a hole-punched connection.
//!
//! Needs root, `ip` and `nft`; skips with the reason printed otherwise.
//!
//! ```text
//!  [master 10.77.0.1]  [direct 10.77.4.4]  [router-a 10.77.1.2]  [router-b 10.77.2.3]
//!          \___________ br0 (public, 10.77.0.0/16) ____/___________________/
//!                                        lan 10.78.1.1           lan 10.78.2.1
//!                                        [nat-a 10.78.1.2]       [nat-b 10.78.2.2]
//! ```
//!
//! The public side is one /16 so that each router's address is on a /24 of its own: the
//! master treats peers on the same /24 as one network (behind one NAT).

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{bail, Context};
use shoal_tests::{
    netns::{unavailable, Lab},
    procs::{add_file, bin_dir, sha256_file, wait_for_file, wait_for_log, Proc},
};

const MASTER_IP: &str = "10.77.0.1";

/// Builds the topology above. With `drop_unsolicited` the routers drop what comes in
/// unasked, as home routers do (hole punching can work); without, they answer it with a TCP
/// reset (an outside SYN that arrives before the inside one has left is refused, so hole
/// punching fails and the relay carries everything).
fn topology(drop_unsolicited: bool) -> anyhow::Result<Lab> {
    let mut lab = Lab::new();
    for ns in ["pub", "master", "direct", "ra", "rb", "na", "nb"] {
        lab.add_ns(ns)?;
    }
    lab.add_bridge("pub")?;
    lab.link(("pub", "vm", None), ("master", "eth0", "10.77.0.1/16"))?;
    lab.link(("pub", "vd", None), ("direct", "eth0", "10.77.4.4/16"))?;
    lab.link(("pub", "vra", None), ("ra", "wan", "10.77.1.2/16"))?;
    lab.link(("pub", "vrb", None), ("rb", "wan", "10.77.2.3/16"))?;
    lab.link(
        ("ra", "lan", Some("10.78.1.1/24")),
        ("na", "eth0", "10.78.1.2/24"),
    )?;
    lab.link(
        ("rb", "lan", Some("10.78.2.1/24")),
        ("nb", "eth0", "10.78.2.2/24"),
    )?;
    lab.masquerade("ra", "wan", drop_unsolicited)?;
    lab.masquerade("rb", "wan", drop_unsolicited)?;
    lab.default_route("na", "10.78.1.1")?;
    lab.default_route("nb", "10.78.2.1")?;
    // The NAT is in the way: the public side has no route to the NATed nodes' addresses.
    for ns in ["master", "direct", "rb"] {
        if lab.exec(ns, &["ip", "route", "get", "10.78.1.2"]).is_ok() {
            bail!("{ns} has a route to 10.78.1.2: the NAT is not in the way");
        }
    }
    Ok(lab)
}

struct Fetcher {
    proc: Proc,
    log: PathBuf,
    report: PathBuf,
    out: PathBuf,
}

fn spawn_fetch(
    lab: &Lab,
    bins: &Path,
    tmp: &Path,
    ns: &str,
    file_id: &str,
    bootstrap: &str,
    seed_time: u64,
) -> anyhow::Result<Fetcher> {
    let dir = tmp.join(ns);
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("log");
    let report = dir.join("report.json");
    let out = dir.join("got.bin");
    let proc = Proc(
        lab.command(ns, &bins.join("shoal"))
            .args(["fetch", file_id, "--bootstrap", bootstrap])
            .args(["--listen", "/ip4/0.0.0.0/tcp/0", "--progress", "none"])
            .args(["--seed-time", &seed_time.to_string()])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--out")
            .arg(&out)
            .arg("--report")
            .arg(&report)
            .env("RUST_LOG", "warn,shoal_node=info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?,
    );
    Ok(Fetcher {
        proc,
        log,
        report,
        out,
    })
}

fn report(path: &Path) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

/// A lab with the master running in it and one file added.
struct Swarm {
    // Field order is drop order: the master is killed before the namespaces go.
    _master: Proc,
    master_log: PathBuf,
    lab: Lab,
    bins: PathBuf,
    tmp: tempfile::TempDir,
    file_id: String,
    bootstrap: String,
    size: usize,
    want: [u8; 32],
}

/// Builds the lab, adds a 6 MiB file, starts the master with `master_args`.
fn swarm(drop_unsolicited: bool, master_args: &[&str]) -> anyhow::Result<Swarm> {
    let bins = bin_dir()?;
    let tmp = tempfile::tempdir()?;
    let lab = topology(drop_unsolicited)?;

    let src = tmp.path().join("src.bin");
    let size = 6 * 1024 * 1024;
    shoal_tests::write_random_file(&src, size, 1010)?;
    let want = sha256_file(&src)?;
    let master_dir = tmp.path().join("master");
    let file_id = add_file(&bins, &master_dir, &src)?;

    let master_log = tmp.path().join("master.log");
    let master = Proc(
        lab.command("master", &bins.join("shoal-master"))
            .arg("--data-dir")
            .arg(&master_dir)
            .args(["--listen", &format!("/ip4/{MASTER_IP}/tcp/4001")])
            .args(master_args)
            .env("RUST_LOG", "info,libp2p=warn,shoal_master::service=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&master_log)?)
            .spawn()?,
    );
    let addrs = wait_for_file(&master_dir.join("bootstrap.addr"), Duration::from_secs(30))?;
    let bootstrap = addrs
        .lines()
        .find(|l| l.contains(MASTER_IP))
        .with_context(|| format!("no {MASTER_IP} address in bootstrap.addr:\n{addrs}"))?
        .to_string();
    Ok(Swarm {
        _master: master,
        master_log,
        lab,
        bins,
        tmp,
        file_id,
        bootstrap,
        size,
        want,
    })
}

/// NATed node A fetches the file from the master and stays; returns it and its PeerId once
/// it listens through the relay and holds the whole file.
fn first_nated_node(sw: &Swarm) -> anyhow::Result<(Fetcher, String)> {
    // AutoNAT says it is unreachable, so it listens through the relay; it fetches from the
    // master (nobody else holds the file) and stays to serve.
    let mut a = spawn_fetch(
        &sw.lab,
        &sw.bins,
        sw.tmp.path(),
        "na",
        &sw.file_id,
        &sw.bootstrap,
        600,
    )?;
    wait_for_log(
        &a.log,
        "reservation on the master's relay accepted",
        &mut a.proc,
        Duration::from_secs(60),
        "NATed node A",
    )?;
    wait_for_file(&a.report, Duration::from_secs(120))?;
    anyhow::ensure!(
        sha256_file(&a.out)? == sw.want,
        "NATed node A got different bytes"
    );
    let a_id = report(&a.report)?["peer_id"]
        .as_str()
        .context("no peer_id in A's report")?
        .to_string();
    let a_log = std::fs::read_to_string(&a.log)?;
    anyhow::ensure!(
        a_log.contains("new=Private"),
        "A listens through the relay without AutoNAT having found it unreachable:\n{a_log}"
    );
    Ok((a, a_id))
}

/// NATed node B fetches the file (the master sends it to A); returns it once done with
/// exact bytes, and the bytes it got from A and from the master.
fn second_nated_node(sw: &Swarm, a_id: &str) -> anyhow::Result<(Fetcher, u64, u64)> {
    let b = spawn_fetch(
        &sw.lab,
        &sw.bins,
        sw.tmp.path(),
        "nb",
        &sw.file_id,
        &sw.bootstrap,
        600,
    )?;
    let done = wait_for_file(&b.report, Duration::from_secs(180));
    let b_log = std::fs::read_to_string(&b.log).unwrap_or_default();
    done.with_context(|| format!("NATed node B did not finish; its log:\n{b_log}"))?;
    anyhow::ensure!(
        sha256_file(&b.out)? == sw.want,
        "NATed node B got different bytes"
    );
    let b_report = report(&b.report)?;
    let from_a = b_report["bytes_by_peer"][a_id].as_u64().unwrap_or(0);
    let from_master = b_report["bytes_from_master"].as_u64().unwrap_or(0);
    anyhow::ensure!(
        from_a > 0,
        "NATed node A served NATed node B nothing (B: {from_master} bytes from the master, \
         report {b_report}); B's log:\n{b_log}"
    );
    Ok((b, from_a, from_master))
}

#[test]
fn nated_nodes_fetch_and_serve_each_other_through_the_masters_relay() -> anyhow::Result<()> {
    if let Some(why) = unavailable() {
        println!("skipping the NAT test: {why}");
        return Ok(());
    }
    let sw = swarm(true, &[])?;
    let (a, a_id) = first_nated_node(&sw)?;
    let (mut b, from_a, from_master) = second_nated_node(&sw, &a_id)?;
    // What the master relayed so far: A's bytes to B, if they went through the relay.
    let relayed_to_b = relayed_bytes(&sw)?;
    wait_for_log(
        &b.log,
        "reservation on the master's relay accepted",
        &mut b.proc,
        Duration::from_secs(60),
        "NATed node B",
    )?;

    // The directly reachable node: AutoNAT finds it public, so it never listens through the
    // relay.
    let mut d = spawn_fetch(
        &sw.lab,
        &sw.bins,
        sw.tmp.path(),
        "direct",
        &sw.file_id,
        &sw.bootstrap,
        60,
    )?;
    let done = wait_for_file(&d.report, Duration::from_secs(120));
    let d_log = std::fs::read_to_string(&d.log).unwrap_or_default();
    done.with_context(|| format!("the direct node did not finish; its log:\n{d_log}"))?;
    anyhow::ensure!(
        sha256_file(&d.out)? == sw.want,
        "the direct node got different bytes"
    );
    wait_for_log(
        &d.log,
        "new=Public",
        &mut d.proc,
        Duration::from_secs(60),
        "the direct node",
    )?;
    let d_log = std::fs::read_to_string(&d.log)?;
    anyhow::ensure!(
        !d_log.contains("listening through the master's relay"),
        "the directly reachable node listened through the relay:\n{d_log}"
    );

    let relayed_total = relayed_bytes(&sw)?;
    let d_report = report(&d.report)?;

    // Which way A's bytes went to B: DCUtR logs a punched connection on both ends; the
    // relay's count says how much of A's bytes it carried (both directions, so a relayed
    // transfer counts at least its size).
    let b_log = std::fs::read_to_string(&b.log)?;
    let a_log = std::fs::read_to_string(&a.log)?;
    let punched = a_log.contains("hole punched") && b_log.contains("hole punched");
    // At most this much of A's bytes went through the relay (its count includes B's
    // requests and protocol overhead); the rest over the punched connection.
    let via_relay = relayed_to_b.min(from_a);
    let direct = from_a - via_relay;
    let way = match (via_relay, direct) {
        (_, 0) => "all over the master's relay".to_string(),
        (0, _) => "all over a hole-punched direct connection".to_string(),
        _ => format!(
            "about {via_relay} over the master's relay, then {direct} over a hole-punched \
             direct connection"
        ),
    };
    println!(
        "NAT: node B got {from_a} of {} bytes from NATed node A ({way}) and {from_master} \
         from the master; the relay had carried {relayed_to_b} bytes by then; hole punch \
         A<->B logged: {punched}. The direct node got {} bytes from the master and {} from \
         peers; the master relayed {relayed_total} bytes in all.",
        sw.size, d_report["bytes_from_master"], d_report["bytes_from_peers"],
    );
    anyhow::ensure!(
        relayed_to_b >= from_a || punched,
        "A's {from_a} bytes to B went neither through the relay ({relayed_to_b} bytes) nor \
         over a hole-punched connection"
    );
    Ok(())
}

/// The bytes the master's relay carried, as `shoal status` shows them (asked from the
/// public side).
fn relayed_bytes(sw: &Swarm) -> anyhow::Result<u64> {
    let st = sw
        .lab
        .command("direct", &sw.bins.join("shoal"))
        .args([
            "status",
            &sw.file_id,
            "--json",
            "--bootstrap",
            &sw.bootstrap,
        ])
        .stderr(Stdio::null())
        .output()?;
    anyhow::ensure!(st.status.success(), "shoal status failed");
    let st: serde_json::Value = serde_json::from_slice(&st.stdout)?;
    st["relayed_bytes"]
        .as_u64()
        .with_context(|| format!("no relayed_bytes in the status: {st}"))
}

/// Routers that refuse (reset) what comes in unasked: hole punching fails, so the relay
/// carries everything, and its per-circuit cap (here 1 MiB, against a 6 MiB file) cuts each
/// circuit. B still gets exact bytes (from A over new circuits, or from the master), A
/// serves some of them, and no circuit carried more than the cap.
#[test]
fn a_relayed_transfer_is_capped_per_circuit_and_still_completes() -> anyhow::Result<()> {
    if let Some(why) = unavailable() {
        println!("skipping the NAT test: {why}");
        return Ok(());
    }
    // A run in which a hole was punched anyway is run again, three times at most.
    for _ in 0..3 {
        if relayed_transfer_is_capped()? {
            return Ok(());
        }
    }
    anyhow::bail!(
        "a hole was punched in three runs through routers that reset unsolicited connections"
    )
}

const CAP: u64 = 1 << 20;

/// One run of the test above: `false` if a hole was punched (the relay did not carry it all).
fn relayed_transfer_is_capped() -> anyhow::Result<bool> {
    let sw = swarm(false, &["--relay-circuit-bytes", &CAP.to_string()])?;
    let (a, a_id) = first_nated_node(&sw)?;
    let (b, from_a, from_master) = second_nated_node(&sw, &a_id)?;
    let relayed = relayed_bytes(&sw)?;
    let b_log = std::fs::read_to_string(&b.log)?;
    let a_log = std::fs::read_to_string(&a.log)?;
    if b_log.contains("hole punched") || a_log.contains("hole punched") {
        // Both routers track their own outgoing SYN, so a simultaneous open can pass them
        // now and then: this run says nothing about the relay's cap.
        println!("a hole was punched through routers that reset unsolicited connections:\n{b_log}");
        return Ok(false);
    }
    let master_log = std::fs::read_to_string(&sw.master_log)?;
    let circuits = master_log.matches("circuit opened").count() as u64;
    anyhow::ensure!(
        circuits >= 1,
        "no circuit in the master's log:\n{master_log}"
    );
    // libp2p checks the cap after each copy (up to 8 KiB in each direction) and the meter
    // also counts the circuit's stop handshake.
    let slack = 64 * 1024;
    anyhow::ensure!(
        relayed <= circuits * (CAP + slack),
        "{relayed} bytes relayed over {circuits} circuits of at most {CAP} bytes"
    );
    anyhow::ensure!(
        from_a <= relayed,
        "A served B {from_a} bytes, more than the relay carried ({relayed}), without a hole punch"
    );
    println!(
        "NAT, hole punching impossible, {CAP}-byte circuits: node B got {from_a} of {} bytes \
         from NATed node A, all over the relay ({circuits} circuits, {relayed} bytes relayed), \
         and {from_master} from the master",
        sw.size
    );
    Ok(true)
}
