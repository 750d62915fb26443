//! The live engine (the real master and nodes on loopback) on a small crowd, against the
//! virtual engine on the same scenario.
#![allow(missing_docs)]

use shoal_sim::report::{relative_difference, Summary};
use shoal_sim::{PolicyKind, Scenario};

/// 30 nodes, 16 MiB, one region, uploads of 512 KiB/s: a crowd whose time is set by its
/// bandwidth (the lower bound is 25.3 s), which is what the virtual engine models. The live
/// engine adds no latency, so a scenario with regions would compare unlike things (see
/// ARCHITECTURE.md, "Simulator").
const CROWD_30: &str = r#"
name = "crowd-30"
seed = 5

[file]
size = "16MiB"
block = "64KiB"

[master]
upload = "4MiB/s"
region = "local"

[[group]]
count = 30
region = "local"
upload = "512KiB/s"
download = "1Gbit/s"

[latency]
intra_ms = 0.5
"#;

fn both(sc: &Scenario) -> (Summary, Summary) {
    let seed = sc.seed;
    let v = shoal_sim::run(sc, PolicyKind::Shoal, seed, &mut |_| {}).expect("virtual run");
    let v = Summary::new(sc, &v, "virtual", "shoal", seed, 0.0);
    let started = std::time::Instant::now();
    let l = shoal_sim::live::run(sc, seed, None, &mut |_| {}).expect("live run");
    let l = Summary::new(
        sc,
        &l,
        "live",
        "shoal",
        seed,
        started.elapsed().as_secs_f64(),
    );
    eprint!("{}", shoal_sim::report::agreement(&v, &l));
    (v, l)
}

fn crowd_30() -> Scenario {
    Scenario::parse(CROWD_30, "crowd-30.toml").expect("valid scenario")
}

fn completed_verified(v: &Summary, l: &Summary) {
    for s in [v, l] {
        assert_eq!(s.completed, 30, "{} engine: {}", s.engine, s.text());
        assert!(s.all_verified, "{} engine: {}", s.engine, s.text());
        assert!(!s.hit_limit, "{} engine: {}", s.engine, s.text());
        // Every block left the master at least once.
        assert!(s.origin_egress_ratio >= 1.0, "{}", s.text());
    }
    // The live run measured real transfers: the peers carried the other 29 copies.
    assert!(l.peer_bytes >= 29 * l.file_bytes, "{}", l.text());
}

/// Issue 9 asks for agreement within 25% on p50 completion and origin egress. Measured
/// 2026-11-26 (debug test build, same scenario): p50 virtual 32.93 s, live 33.14-33.60 s
/// (0.6-2.0%) on a quiet machine, 34.76 s (5.6%) with a busy loop on one of the two cores;
/// origin egress 1.000 F in both. The live engine's extra time is a start-up cost of 1-4.6 s
/// more than a rate: with 8 MiB the same crowd was 4-6% apart on a quiet machine and 27% in
/// one fresh-clone CI run (live 21.7 s against 17.06 s), so the crowd moves 16 MiB, where
/// that cost is a smaller share.
///
/// A crowd that finishes in about a second does not agree, and is not used here: with 2 MiB
/// and 4 MiB/s uploads the virtual engine gives a p50 of 1.08 s and the live one 3.5-5.5 s.
/// There, what the virtual engine does not model dominates: 30 nodes and the master start
/// in one process on two cores (swarm, handshakes, manifest, store), so the last of them
/// begins to fetch about 0.9 s after the first, and every new peer costs a dial and a
/// handshake on busy cores (see ARCHITECTURE.md, "Simulator", known errors).
#[test]
fn a_small_crowd_completes_verified_and_the_engines_agree() {
    let (v, l) = both(&crowd_30());
    completed_verified(&v, &l);
    let p50 = relative_difference(v.completion_p50_s, l.completion_p50_s);
    let egress = relative_difference(v.origin_egress_ratio, l.origin_egress_ratio);
    assert!(
        p50 <= 0.25 && egress <= 0.25,
        "the engines differ by {:.0}% on p50 completion and {:.0}% on origin egress:\n{}",
        p50 * 100.0,
        egress * 100.0,
        shoal_sim::report::agreement(&v, &l)
    );
}

#[test]
fn the_live_engine_refuses_misbehaving_nodes_without_the_chaos_feature() {
    if cfg!(feature = "chaos") {
        return;
    }
    let text = format!("{CROWD_30}\n[chaos]\ncorrupt = 0.1\n");
    let sc = Scenario::parse(&text, "crowd-30.toml").expect("valid scenario");
    let err = shoal_sim::live::run(&sc, 1, None, &mut |_| {}).expect_err("chaos without feature");
    assert!(err.to_string().contains("--features chaos"), "{err}");
}
