//! Long-running fuzz driver for every shoal decoder (outside CI; the property tests in
//! `protocol/tests/fuzz.rs` and `node/tests/journal.rs` run a few hundred cases of the same in
//! `cargo test`).
//!
//! ```text
//! cargo run --release -p shoal-examples --example fuzz -- --cases 1000000 --seed 1
//! ```
//!
//! Per decoder it runs `--cases` inputs (a quarter random bytes, the rest mutated valid
//! encodings: bit flips, truncations, splices, length prefixes rewritten to huge claims, frame
//! lengths rewritten), each under `catch_unwind`, and prints how many decoded, how many were
//! refused, any panic with its reproducing input in hex, any decoded value larger than its
//! input ("bad"), the slowest single case and the wall time. The node's journal is fuzzed through
//! `PieceStore::open` on a temp file. Exits non-zero on any panic or bad result.

#[path = "../protocol/tests/corpus/mod.rs"]
mod corpus;

use std::{
    panic::{catch_unwind, AssertUnwindSafe},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use corpus::{decoders, Decoder, Rng};
use shoal_node::store::PieceStore;
use shoal_protocol::{manifest::ManifestBuilder, Manifest, VerifiedManifest};

#[derive(Default)]
struct Tally {
    ok: u64,
    err: u64,
    panics: Vec<(u64, String, Vec<u8>)>,
    /// Decoded values larger than their input; for the journal, opens that held a block the
    /// journal did not list or whose bytes fail their digest.
    bad: Vec<(u64, usize, Vec<u8>)>,
    slowest: Duration,
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".into())
}

fn run_decoder(d: &Decoder, all: &[Decoder], cases: u64, seed: u64) -> Tally {
    let mut t = Tally::default();
    for i in 0..cases {
        // One generator per case: a case is reproduced from (seed, decoder, i) alone.
        let mut rng = Rng::new(seed ^ i.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ fxhash(d.name));
        let input = corpus::case(&mut rng, d, all);
        let started = Instant::now();
        let r = catch_unwind(AssertUnwindSafe(|| (d.decode)(&input)));
        t.slowest = t.slowest.max(started.elapsed());
        match r {
            Ok(Ok(n)) if n > input.len() => {
                t.ok += 1;
                if t.bad.len() < 5 {
                    t.bad.push((i, n, input));
                }
            }
            Ok(Ok(_)) => t.ok += 1,
            Ok(Err(_)) => t.err += 1,
            Err(p) => {
                if t.panics.len() < 5 {
                    t.panics.push((i, panic_message(p), input));
                }
            }
        }
    }
    t
}

fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn journal_manifest(data: &[u8]) -> anyhow::Result<Arc<VerifiedManifest>> {
    let k = libp2p::identity::Keypair::ed25519_from_bytes([3; 32])?;
    let mut b = ManifestBuilder::new(4096);
    b.update(data);
    let (body, digests) = b.finish(
        "journal.bin".into(),
        k.public().encode_protobuf(),
        k.public().to_peer_id(),
        0,
    );
    let header = body.sign(&k)?.countersign(&k)?;
    Ok(Arc::new(Manifest { header, digests }.verify(None)?))
}

/// The journal through `PieceStore::open`: `ok` counts opens, `err` failed opens (none are
/// expected: a journal's content never fails an open), `bad` opens that held a block the
/// journal did not list or that fails its digest on disk.
fn run_journal(cases: u64, seed: u64) -> anyhow::Result<Tally> {
    const BLOCKS: u32 = 9;
    // On tmpfs when there is one: the case is the parser, not the disk.
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)?
    } else {
        tempfile::tempdir()?
    };
    let data: Vec<u8> = (0..4096 * BLOCKS as usize - 100)
        .map(|i| (i * 7 % 253) as u8)
        .collect();
    let m = journal_manifest(&data)?;
    let mut on_disk = data.clone();
    on_disk[4096 * 4] ^= 0xff; // block 4 fails its digest on disk
    let (out, jpath) = (dir.path().join("out"), dir.path().join("journal"));
    std::fs::write(&out, &on_disk)?;
    let mut t = Tally::default();
    for i in 0..cases {
        let mut rng = Rng::new(seed ^ i.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ fxhash("journal"));
        let j = if rng.below(2) == 0 {
            corpus::random_input(&mut rng, 256)
        } else {
            let n = rng.below(64);
            let mut b: Vec<u8> = (0..n)
                .flat_map(|_| {
                    let e = match rng.below(4) {
                        0 => rng.next_u64() as u32,
                        _ => rng.below(BLOCKS as usize + 3) as u32,
                    };
                    e.to_le_bytes()
                })
                .collect();
            b.extend(std::iter::repeat_n(0xab, rng.below(4)));
            b
        };
        std::fs::write(&jpath, &j)?;
        let started = Instant::now();
        let r = catch_unwind(AssertUnwindSafe(|| {
            PieceStore::open(m.clone(), &out, &jpath)
        }));
        t.slowest = t.slowest.max(started.elapsed());
        match r {
            Ok(Ok(s)) => {
                t.ok += 1;
                let listed: Vec<u32> = j
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                let have = s.have();
                let wrong = (0..BLOCKS)
                    .filter(|b| have.contains(*b) && (!listed.contains(b) || *b == 4))
                    .count();
                if wrong > 0 && t.bad.len() < 5 {
                    t.bad.push((i, wrong, j));
                }
            }
            Ok(Err(_)) => t.err += 1,
            Err(p) => {
                if t.panics.len() < 5 {
                    t.panics.push((i, panic_message(p), j));
                }
            }
        }
    }
    Ok(t)
}

fn main() -> anyhow::Result<()> {
    let mut cases = 100_000u64;
    let mut seed = 1u64;
    let mut only: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--cases" => cases = value()?.parse()?,
            "--seed" => seed = value()?.parse()?,
            "--only" => only = Some(value()?),
            other => anyhow::bail!("unknown argument {other} (--cases N --seed S [--only NAME])"),
        }
    }
    // Panics are counted and shown below, not printed as they happen.
    std::panic::set_hook(Box::new(|_| {}));
    let all = decoders();
    let started = Instant::now();
    println!("fuzz: {cases} cases per decoder, seed {seed}");
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>7} {:>9} {:>10} {:>8}",
        "decoder", "cases", "ok", "err", "panics", "bad", "slowest", "wall s"
    );
    let mut failed = false;
    let mut report = |name: &str, t: &Tally, wall: Duration| {
        println!(
            "{:<22} {:>10} {:>10} {:>10} {:>7} {:>9} {:>8.2}ms {:>8.1}",
            name,
            t.ok + t.err + t.panics.len() as u64,
            t.ok,
            t.err,
            t.panics.len(),
            t.bad.len(),
            t.slowest.as_secs_f64() * 1e3,
            wall.as_secs_f64()
        );
        for (i, msg, input) in &t.panics {
            failed = true;
            println!("  PANIC case {i}: {msg}\n    input {}", hex(input));
        }
        for (i, n, input) in &t.bad {
            failed = true;
            println!(
                "  BAD case {i}: {n} (value bytes, or wrongly held blocks)\n    input {}",
                hex(input)
            );
        }
    };
    for d in &all {
        if only.as_deref().is_some_and(|o| o != d.name) {
            continue;
        }
        let t0 = Instant::now();
        let t = run_decoder(d, &all, cases, seed);
        report(d.name, &t, t0.elapsed());
    }
    if only.as_deref().is_none_or(|o| o == "journal") {
        let t0 = Instant::now();
        let t = run_journal(cases, seed)?;
        report("journal", &t, t0.elapsed());
    }
    println!("total wall time {:.1} s", started.elapsed().as_secs_f64());
    anyhow::ensure!(!failed, "fuzzing found failures (above)");
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
