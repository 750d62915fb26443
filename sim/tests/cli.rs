//! The `shoal-sim` command line as a researcher calls it.
#![allow(missing_docs)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn scenario(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/scenarios")
        .join(name)
}

fn shoal_sim(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_shoal-sim"))
        .args(args)
        .output()
        .expect("shoal-sim runs")
}

#[test]
fn one_run_puts_the_two_baselines_beside_the_result() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("small");
    let sc = scenario("small-30.toml");
    let run = shoal_sim(&[
        "run",
        sc.to_str().unwrap(),
        "--baselines",
        "--quiet",
        "--out",
        dir.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    // The result's own files, and each baseline's under its name.
    for d in [
        dir.clone(),
        dir.join("origin-only"),
        dir.join("random-holder"),
    ] {
        for f in [
            "summary.json",
            "nodes.csv",
            "completion_cdf.svg",
            "completion_cdf.png",
            "master_egress.svg",
            "upload_distribution.png",
        ] {
            assert!(d.join(f).is_file(), "{} missing", d.join(f).display());
        }
    }
    // One row per policy, shoal first; origin-only sends every node its copy.
    let csv = std::fs::read_to_string(dir.join("policies.csv")).unwrap();
    let rows: Vec<Vec<&str>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    let policies: Vec<&str> = rows.iter().map(|r| r[0]).collect();
    assert_eq!(policies, ["shoal", "origin-only", "random-holder"], "{csv}");
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let egress = |r: &Vec<&str>| r[col("origin_egress_ratio")].parse::<f64>().unwrap();
    let nodes = rows[1][col("nodes")].parse::<f64>().unwrap();
    assert_eq!(egress(&rows[1]), nodes, "{csv}");
    assert!(egress(&rows[0]) < egress(&rows[1]), "{csv}");
    // The same bound beside every row, and in the text summary.
    assert!(rows
        .iter()
        .all(|r| r[col("lower_bound_s")] == rows[0][col("lower_bound_s")]));
    assert!(
        stdout.contains("origin-only") && stdout.contains("random-holder"),
        "{stdout}"
    );
    // The plots carry all three.
    let cdf = std::fs::read_to_string(dir.join("completion_cdf.svg")).unwrap();
    for label in [
        "shoal (virtual)",
        "origin-only (virtual)",
        "random-holder (virtual)",
    ] {
        assert!(cdf.contains(label), "{label} not in the completion plot");
    }
}

#[test]
fn baselines_are_refused_in_the_live_engine_with_a_reason() {
    let out = tempfile::tempdir().unwrap();
    let sc = scenario("small-30.toml");
    let run = shoal_sim(&[
        "run",
        sc.to_str().unwrap(),
        "--engine",
        "live",
        "--baselines",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("virtual engine only"), "{stderr}");
}
