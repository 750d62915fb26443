//! The `shoal` binary's user-facing errors. (Having an integration test here also makes
//! `cargo test` build the binary that the real-process tests run.)

use std::process::Command;

fn shoal() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
}

#[test]
fn help_explains_the_subcommands() {
    let out = shoal().arg("--help").output().expect("run shoal");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["publish", "fetch", "seed", "status", "inspect", "verify"] {
        assert!(text.contains(cmd), "--help does not mention {cmd}:\n{text}");
    }
}

#[test]
fn connection_caps_are_flags_with_their_defaults_shown() {
    let out = shoal()
        .args(["fetch", "--help"])
        .output()
        .expect("run shoal");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for (flag, default) in [
        ("--max-connections <N>", "[default: 1024]"),
        ("--max-connections-per-peer <N>", "[default: 2]"),
        ("--max-pending-incoming <N>", "[default: 64]"),
    ] {
        let line = text.lines().position(|l| l.contains(flag));
        let line = line.unwrap_or_else(|| panic!("no {flag} in:\n{text}"));
        let block: String = text.lines().skip(line).take(3).collect();
        assert!(block.contains(default), "{flag} without {default}:\n{text}");
    }
}

#[test]
fn a_bootstrap_address_without_peer_id_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = shoal()
        .args(["status", "1220aa", "--bootstrap", "/ip4/127.0.0.1/tcp/1"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .expect("run shoal");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("file id"), "{err}");
    let id = "1220".to_string() + &"ab".repeat(32);
    let out = shoal()
        .args(["status", &id, "--bootstrap", "/ip4/127.0.0.1/tcp/1"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .expect("run shoal");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/p2p/"), "{err}");
}

#[test]
fn verify_with_a_missing_manifest_says_which_file() {
    let out = shoal()
        .args([
            "verify",
            "/nonexistent/copy",
            "--manifest",
            "/nonexistent/m.manifest",
        ])
        .output()
        .expect("run shoal");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/m.manifest"), "{err}");
}
