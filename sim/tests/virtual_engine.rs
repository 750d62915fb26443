//! The virtual engine on small scenarios: determinism, the lower bound, the baselines, bans.
#![allow(missing_docs)]

use std::path::Path;

use shoal_sim::engine::Role;
use shoal_sim::report::{self, Summary};
use shoal_sim::{run, Outcome, PolicyKind, Scenario};

fn scenario(name: &str) -> (String, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/scenarios")
        .join(name);
    let text = std::fs::read_to_string(&path).expect("shipped scenario");
    (text, path.display().to_string())
}

fn load(name: &str) -> Scenario {
    let (text, path) = scenario(name);
    Scenario::parse(&text, &path).expect("valid scenario")
}

fn go(sc: &Scenario, policy: PolicyKind, seed: u64) -> (Summary, Outcome) {
    let o = run(sc, policy, seed, &mut |_| {}).expect("run");
    let s = Summary::new(sc, &o, "virtual", policy.name(), seed, 0.0);
    (s, o)
}

/// The one small crowd most tests use, with some churn and a few misbehaving nodes so that
/// every part of the engine takes part.
fn busy_small() -> Scenario {
    let (text, path) = scenario("small-30.toml");
    let text = format!(
        "{text}\n[churn]\nleave_rate = 0.02\nrejoin_rate = 0.5\n\n[chaos]\ncorrupt = 0.1\nfalse_accuse = 0.07\n"
    );
    Scenario::parse(&text, &path).expect("valid scenario")
}

fn without_wall(json: &str) -> String {
    json.lines()
        .filter(|l| !l.trim_start().starts_with("\"wall_s\""))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn same_seed_same_bytes() {
    let sc = busy_small();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    for d in &dirs {
        let started = std::time::Instant::now();
        let o = run(&sc, PolicyKind::Shoal, 11, &mut |_| {}).unwrap();
        let s = Summary::new(
            &sc,
            &o,
            "virtual",
            "shoal",
            11,
            started.elapsed().as_secs_f64(),
        );
        report::write(d.path(), &s, &o).unwrap();
    }
    let read = |d: &tempfile::TempDir, f: &str| std::fs::read_to_string(d.path().join(f)).unwrap();
    assert_eq!(read(&dirs[0], "nodes.csv"), read(&dirs[1], "nodes.csv"));
    // Every byte of summary.json but the wall-clock time.
    let (a, b) = (
        read(&dirs[0], "summary.json"),
        read(&dirs[1], "summary.json"),
    );
    assert_eq!(without_wall(&a), without_wall(&b));
    assert!(a.contains("\"wall_s\""), "{a}");
    // A different seed gives a different run (the test would pass vacuously otherwise).
    let (other, _) = go(&sc, PolicyKind::Shoal, 12);
    let (first, _) = go(&sc, PolicyKind::Shoal, 11);
    assert_ne!(
        (other.completion_p50_s, other.retries, other.events),
        (first.completion_p50_s, first.retries, first.events)
    );
}

/// No completion beats physics: the swarm's last node is no faster than the Kumar-Ross bound,
/// and no node is faster than its own terms of it (F/u_s and F/d_i).
fn assert_bound_holds(sc: &Scenario, s: &Summary, o: &Outcome) {
    assert!(s.completed > 0, "{s:?}");
    if s.completed == s.honest_nodes && s.misbehaving == 0 {
        assert!(
            s.completion_max_s >= s.lower_bound_s * (1.0 - 1e-9),
            "max {} below the bound {}",
            s.completion_max_s,
            s.lower_bound_s
        );
    }
    let f = sc.file.size.0 as f64;
    for (i, n) in o.nodes.iter().enumerate() {
        if let Some(fin) = n.finish_s {
            let own = (f / sc.master.upload.0).max(f / n.download);
            assert!(
                fin - n.start_s >= own * (1.0 - 1e-9),
                "node {i} done in {} s, below its bound {own}",
                fin - n.start_s
            );
        }
    }
}

#[test]
fn the_bound_is_never_beaten() {
    for name in ["small-30.toml", "flash-12.toml"] {
        let sc = load(name);
        for policy in [
            PolicyKind::Shoal,
            PolicyKind::OriginOnly,
            PolicyKind::RandomHolder,
        ] {
            let (s, o) = go(&sc, policy, 3);
            assert_eq!(s.completed, s.honest_nodes, "{name} {policy}: {s:?}");
            assert!(s.all_verified);
            assert_bound_holds(&sc, &s, &o);
        }
    }
    let sc = busy_small();
    let (s, o) = go(&sc, PolicyKind::Shoal, 5);
    assert_bound_holds(&sc, &s, &o);
}

#[test]
fn one_node_alone_finishes_at_the_bound() {
    // One node, the master its only source: the bound is F / min(u_s, d) and the model
    // should meet it up to latency and the last piece's round trips.
    let text = r#"
[file]
size = "16MiB"
block = "64KiB"
[master]
upload = "4MiB/s"
[[group]]
count = 1
upload = "1MiB/s"
download = "100MiB/s"
[latency]
intra_ms = 0.5
"#;
    let sc = Scenario::parse(text, "one.toml").unwrap();
    let (s, _) = go(&sc, PolicyKind::Shoal, 1);
    assert_eq!(s.lower_bound_s, 4.0);
    assert!(s.completion_max_s >= 4.0, "{s:?}");
    assert!(s.completion_max_s < 4.0 * 1.05, "{s:?}");
    assert_eq!(s.origin_egress_ratio, 1.0);
    // A slower download binds instead.
    let sc = Scenario::parse_varied(text, "one.toml", "group.0.download", "\"2MiB/s\"").unwrap();
    let (s, _) = go(&sc, PolicyKind::Shoal, 1);
    assert_eq!(s.lower_bound_s, 8.0);
    assert!(
        s.completion_max_s >= 8.0 && s.completion_max_s < 8.0 * 1.05,
        "{s:?}"
    );
}

#[test]
fn a_node_a_moment_ahead_of_the_crowd_does_not_hold_it_up() {
    // Before the master sized a lone requester's pieces to its upload, the early node took
    // 256 first copies, and these seeds ended at p50 1.218 and 1.212 (1.10 with no node
    // ahead). The master's upload is known to the policy (`--max-upload-rate`), or not (a
    // master whose link is the limit: the policy goes by what it sent lately); before the
    // second was built, a master without the flag still gave 1.218 and 1.212.
    for rate_known in [true, false] {
        let mut sc = load("flash-24-early.toml");
        sc.master.rate_known = rate_known;
        for seed in [1, 5] {
            let (s, o) = go(&sc, PolicyKind::Shoal, seed);
            assert_bound_holds(&sc, &s, &o);
            let what = format!("rate known: {rate_known}, seed {seed}: {s:?}");
            assert!(s.p50_over_bound <= 1.15, "{what}");
            assert!(s.origin_egress_ratio <= 1.01, "{what}");
        }
    }
}

#[test]
fn origin_only_sends_n_copies_and_shoal_about_one() {
    let sc = load("flash-12.toml");
    let (origin, _) = go(&sc, PolicyKind::OriginOnly, 1);
    assert_eq!(origin.completed, 12);
    assert!(
        (origin.origin_egress_ratio - 12.0).abs() < 1e-3,
        "{}",
        origin.origin_egress_ratio
    );
    let (shoal, _) = go(&sc, PolicyKind::Shoal, 1);
    assert_eq!(shoal.completed, 12);
    assert!(shoal.origin_egress_ratio >= 1.0, "{shoal:?}");
    // Issue 9 asks for < 1.1 F here. Measured 2026-11-26 (seeds 1-3): 1.000 F, no block sent
    // twice, since a full holder is waited for rather than replaced by the master.
    assert!(shoal.origin_egress_ratio < 1.1, "{shoal:?}");
    // Sharing beats the origin alone by far on this crowd.
    assert!(shoal.completion_max_s < origin.completion_max_s / 2.0);
}

/// As in the cluster's bad-peers test, the corrupters come first and hold blocks (the master
/// hands each its first copies) when the honest nodes arrive, so every one of them is sure to
/// be asked for data; a few false accusers come along with the honest nodes.
const BAD_PEERS: &str = r#"
name = "bad-peers"
[file]
size = "32MiB"
block = "64KiB"
[master]
upload = "8MiB/s"
[[group]]
count = 3
upload = "2MiB/s"
download = "20MiB/s"
chaos = "corrupt"
[[group]]
count = 3
upload = "2MiB/s"
download = "20MiB/s"
chaos = "false-accuse"
start_s = 3
[[group]]
count = 20
upload = "2MiB/s"
download = "20MiB/s"
start_s = 3
"#;

#[test]
fn corrupters_are_banned_and_no_honest_node() {
    let sc = Scenario::parse(BAD_PEERS, "bad-peers.toml").unwrap();
    for seed in [1, 2] {
        let (s, o) = go(&sc, PolicyKind::Shoal, seed);
        let banned = |role: Role| {
            o.nodes
                .iter()
                .filter(|n| n.role == role && n.banned)
                .count()
        };
        assert_eq!(banned(Role::Corrupt), 3, "seed {seed}: {s:?}");
        assert_eq!(s.honest_banned, 0, "seed {seed}: {s:?}");
        assert_eq!(banned(Role::FalseAccuse), 0, "seed {seed}: {s:?}");
        assert_eq!(s.banned, 3);
        assert_eq!(s.completed, s.honest_nodes, "seed {seed}: {s:?}");
        assert!(s.all_verified);
        // The corrupters did serve (and were caught doing it).
        assert!(o
            .nodes
            .iter()
            .filter(|n| n.role == Role::Corrupt)
            .all(|n| n.uploaded > 0));
    }
}

#[test]
fn a_live_run_short_of_cpu_says_so_and_a_virtual_run_does_not() {
    let (s, _) = go(&load("flash-12.toml"), PolicyKind::Shoal, 1);
    assert_eq!(s.cpu_busy, None, "a virtual run measures no CPU share");
    assert!(!s.cpu_bound() && !s.text().contains("short of CPU"));
    let calm = s.clone().with_cpu_busy(Some(0.4));
    assert!(!calm.cpu_bound() && !calm.text().contains("short of CPU"));
    let busy = s.with_cpu_busy(Some(0.97));
    assert!(busy.cpu_bound());
    assert!(busy.text().contains("short of CPU"), "{}", busy.text());
    assert!(shoal_sim::report::agreement(&calm, &busy).contains("short of CPU"));
}
