//! Two regions of 8 nodes each on loopback, the master in neither: the bytes peers serve stay
//! inside their region, and with the region budget the master sends each block at most once
//! per region (issue 10, "Tests that must exist and pass").
//!
//! On loopback every node has the same /24 and about the same RTT, so the region label is the
//! tier that decides here; the prefix and RTT tiers are covered by the policy's unit tests.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::Context;
use shoal_master::PolicyConfig;
use shoal_node::{FetchOptions, NodeConfig};
use shoal_tests::{loopback, Published};

/// Nodes per region.
const PER_REGION: usize = 8;
const REGIONS: [&str; 2] = ["eu", "us"];

/// What one run measured.
struct Outcome {
    /// Piece bytes served by peers to peers of their own region, and in all.
    inside: u64,
    served: u64,
    /// Per region, per block: how many of its nodes got that block from the master.
    master_copies: BTreeMap<(&'static str, u32), u32>,
    master_bytes: u64,
}

async fn run(region_budget: bool, one_entry: bool, seed: u64) -> anyhow::Result<Outcome> {
    let tmp = tempfile::tempdir()?;
    let size = 4 * 1024 * 1024;
    // Small master pieces and capped uploads: first copies spread over many nodes of both
    // regions and transfers overlap, as in a real crowd (one master piece of the whole file
    // to the first node would make the test trivial).
    let Published {
        master,
        bootstrap,
        file,
        src,
    } = shoal_tests::published_with(tmp.path(), size, seed, Some(2 << 20), |cfg| {
        cfg.with_policy(PolicyConfig {
            max_master_piece: 4,
            lone_master_piece: 4,
            max_master_pieces: 1,
            max_peer_piece: 8,
            one_entry_per_region: one_entry,
            ..PolicyConfig::default()
        })
        .with_region_budget(region_budget)
    })
    .await?;
    let mut nodes = Vec::new();
    for (r, region) in REGIONS.iter().enumerate() {
        for i in 0..PER_REGION {
            let dir = tmp.path().join(format!("{region}{i}"));
            let cfg = NodeConfig::new(&dir, bootstrap.clone())
                .with_listen(vec![loopback()])
                .with_region(region.to_string())
                .with_max_upload_rate(Some(1 << 20));
            let client = shoal_node::start(cfg)
                .await
                .with_context(|| format!("starting node {i} of {region}"))?;
            nodes.push((region, client, dir, r));
        }
    }
    let region_of: HashMap<String, &'static str> = nodes
        .iter()
        .map(|(region, c, _, _)| (c.peer_id().to_string(), **region))
        .collect();
    let sent_before = master.metrics().piece_bytes_sent.get();
    let limit = Duration::from_secs(120);
    let mut tasks = Vec::new();
    for (region, client, dir, _) in nodes {
        tasks.push(tokio::spawn(async move {
            let out = dir.join("out.bin");
            let report = tokio::time::timeout(
                limit,
                shoal_node::fetch(&client, FetchOptions::new(file, &out)),
            )
            .await
            .with_context(|| format!("a node of {region} did not finish within {limit:?}"))??;
            anyhow::Ok((*region, out, report, client))
        }));
    }
    let want = std::fs::read(&src)?;
    let mut outcome = Outcome {
        inside: 0,
        served: 0,
        master_copies: BTreeMap::new(),
        master_bytes: 0,
    };
    let mut clients = Vec::new();
    for t in tasks {
        let (region, out, report, client) = t.await??;
        anyhow::ensure!(
            std::fs::read(&out)? == want,
            "{} ({region}) has different bytes",
            report.peer_id
        );
        for (peer, bytes) in &report.bytes_by_peer {
            let from = region_of.get(peer).with_context(|| {
                format!("{} got bytes from {peer}, which is no node", report.peer_id)
            })?;
            outcome.served += bytes;
            if *from == region {
                outcome.inside += bytes;
            }
        }
        for r in &report.blocks_from_master {
            for b in r.iter() {
                *outcome.master_copies.entry((region, b)).or_default() += 1;
            }
        }
        clients.push(client);
    }
    outcome.master_bytes = master.metrics().piece_bytes_sent.get() - sent_before;
    drop(clients);
    master.shutdown().await;
    Ok(outcome)
}

fn print_outcome(label: &str, o: &Outcome, size: u64) {
    println!(
        "{label}: {:.1}% of {} peer-served bytes inside their region; master sent {:.2}x the file",
        100.0 * share(o),
        o.served,
        o.master_bytes as f64 / size as f64
    );
}

fn share(o: &Outcome) -> f64 {
    o.inside as f64 / o.served.max(1) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_stay_in_their_region_and_the_budget_sends_each_block_once_per_region(
) -> anyhow::Result<()> {
    shoal_tests::init_tracing();
    let size = 4 * 1024 * 1024u64;

    let budget = run(true, true, 31).await?;
    let over: Vec<_> = budget
        .master_copies
        .iter()
        .filter(|(_, n)| **n > 1)
        .collect();
    print_outcome("region budget", &budget, size);
    assert!(
        over.is_empty(),
        "with --region-budget the master sent these (region, block)s more than once: {over:?}"
    );
    assert!(
        budget.served > 0,
        "no peer served anything: the test measured nothing"
    );
    assert!(
        share(&budget) >= 0.90,
        "with --region-budget only {:.1}% of peer-served bytes stayed in their region",
        100.0 * share(&budget)
    );

    // The default: no budget, one copy of a block enters a region at a time (from the
    // master or across), and the rest of the region gets it inside.
    let plain = run(false, true, 32).await?;
    print_outcome("default (one entry per region)", &plain, size);
    assert!(plain.served > 0, "no peer served anything");
    assert!(
        share(&plain) >= 0.90,
        "by default only {:.1}% of peer-served bytes stayed in their region",
        100.0 * share(&plain)
    );
    assert!(
        plain.master_bytes <= size * 11 / 10,
        "by default the master sent {:.2}x the file",
        plain.master_bytes as f64 / size as f64
    );
    // For comparison: ranking alone (nearest holder first), without the entry rule.
    let free = run(false, false, 33).await?;
    print_outcome("ranking only", &free, size);
    Ok(())
}
