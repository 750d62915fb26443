//! How fast the master decides redirects: `cargo bench -p shoal-master --bench policy`.
//!
//! A 1 GiB file (16,384 blocks of 64 KiB) with 100 mirrors, each holding a random half of the
//! blocks; a newcomer asks for every block. One Locate answers up to 512 blocks, so blocks
//! decided per second = 512 / (time per Locate).
#![allow(missing_docs)]

use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use libp2p::{identity::Keypair, Multiaddr, PeerId};
use shoal_master::{Policy, PolicyConfig};
use shoal_protocol::{block::Blocks, BlockRange, FileId};

fn setup(mirrors: usize) -> (Policy, FileId) {
    let blocks = 16_384;
    let file = FileId([7; 32]);
    let mut p = Policy::new(PolicyConfig::default());
    p.add_file(
        file,
        "bench".into(),
        u64::from(blocks) * 65_536,
        Blocks::full(blocks),
    );
    let addr: Multiaddr = "/ip4/127.0.0.1/tcp/4002".parse().expect("addr");
    let mut seed = 1u64;
    for _ in 0..mirrors {
        let peer = Keypair::generate_ed25519().public().to_peer_id();
        p.peer_up(peer, vec![addr.clone()]);
        let mut held = Vec::new();
        for b in 0..blocks {
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

fn locate(c: &mut Criterion) {
    let (mut policy, file) = setup(100);
    let need = vec![BlockRange::new(0, 16_384)];
    let mut group = c.benchmark_group("policy");
    group.throughput(Throughput::Elements(512));
    group.bench_function("locate_512_blocks_100_mirrors", |b| {
        b.iter(|| {
            let requester: PeerId = PeerId::random();
            let ans = policy
                .locate(Instant::now(), requester, &file, &need)
                .expect("known file");
            // Confirm, so loads do not grow without bound across iterations.
            let got: Vec<BlockRange> = ans.assignments.iter().map(|a| a.range).collect();
            policy.have(&file, requester, &got);
            policy.peer_down(&requester);
            ans.assignments.len()
        })
    });
    group.finish();
}

criterion_group!(benches, locate);
criterion_main!(benches);
