//! How fast the master decides redirects: `cargo bench -p shoal-master --bench policy`.
//!
//! A 1 GiB file (16,384 blocks of 64 KiB); a newcomer asks for every block. One Locate
//! answers up to 512 blocks, so blocks decided per second = 512 / (time per Locate).
//! - `locate_512_blocks_100_mirrors`: 100 mirrors, each holding a random half of the blocks.
//! - `locate_512_blocks_10000_peers_1000_holders`: 10,000 connected peers in 4 regions, of
//!   which 1,000 hold a random half of the blocks each (issue 11 item 4: >= 100,000 redirect
//!   decisions per second); it also prints the master's memory per connected peer.
#![allow(missing_docs)]

use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use libp2p::{identity::Keypair, Multiaddr, PeerId};
use shoal_master::{Policy, PolicyConfig};
use shoal_protocol::{block::Blocks, BlockRange, FileId};

const BLOCKS: u32 = 16_384;

fn setup(peers: usize, holders: usize, regions: usize) -> (Policy, FileId) {
    let file = FileId([7; 32]);
    let mut p = Policy::new(PolicyConfig::default());
    p.add_file(
        file,
        "bench".into(),
        u64::from(BLOCKS) * 65_536,
        Blocks::full(BLOCKS),
    );
    let addr: Multiaddr = "/ip4/127.0.0.1/tcp/4002".parse().expect("addr");
    let mut seed = 1u64;
    for i in 0..peers {
        let peer = Keypair::generate_ed25519().public().to_peer_id();
        p.peer_up(peer, vec![addr.clone()]);
        if regions > 0 {
            p.set_region(peer, format!("r{}", i % regions));
        }
        if i >= holders {
            continue;
        }
        let mut held = Vec::new();
        for b in 0..BLOCKS {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if seed >> 63 == 1 {
                held.push(BlockRange::new(b, b + 1));
            }
        }
        p.have(&file, peer, &held);
    }
    (p, file)
}

fn bench_locate(c: &mut Criterion, name: &str, policy: &mut Policy, file: FileId, region: bool) {
    let need = vec![BlockRange::new(0, BLOCKS)];
    let addr: Multiaddr = "/ip4/127.0.0.1/tcp/4003".parse().expect("addr");
    let one = |policy: &mut Policy| {
        let requester: PeerId = PeerId::random();
        policy.peer_up(requester, vec![addr.clone()]);
        if region {
            policy.set_region(requester, "r0".into());
        }
        let ans = policy
            .locate(Instant::now(), requester, &file, &need)
            .expect("known file");
        // Confirm, so loads do not grow without bound across iterations.
        let got: Vec<BlockRange> = ans.assignments.iter().map(|a| a.range).collect();
        policy.have(&file, requester, &got);
        policy.peer_down(&requester);
        got.iter().map(|r| u64::from(r.len())).sum::<u64>()
    };
    // Throughput counts the blocks a Locate actually assigns (the answer's caps may stop it
    // short of 512).
    let decided = one(policy);
    println!("{name}: {decided} blocks assigned per Locate");
    let mut group = c.benchmark_group("policy");
    group.throughput(Throughput::Elements(decided));
    group.bench_function(name, |b| b.iter(|| one(policy)));
    group.finish();
}

/// Resident memory of this process, bytes (Linux).
fn rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn locate(c: &mut Criterion) {
    let (mut policy, file) = setup(100, 100, 0);
    bench_locate(c, "locate_512_blocks_100_mirrors", &mut policy, file, false);
    drop(policy);

    let before = rss();
    let (mut policy, file) = setup(10_000, 1_000, 4);
    if let (Some(a), Some(b)) = (before, rss()) {
        println!(
            "10,000 peers (1,000 holding half of 16,384 blocks): policy memory {:.1} MiB, \
             {:.0} bytes per connected peer",
            b.saturating_sub(a) as f64 / 1048576.0,
            b.saturating_sub(a) as f64 / 10_000.0
        );
    }
    bench_locate(
        c,
        "locate_512_blocks_10000_peers_1000_holders",
        &mut policy,
        file,
        true,
    );
}

criterion_group!(benches, locate);
criterion_main!(benches);
