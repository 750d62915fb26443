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
        let block: String = text.lines().skip(line).take(4).collect();
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

/// A TCP listener that accepts and never says a word: a "master" that does not answer, so a
/// `shoal` that tries to join it stays in its 15 s handshake and hello timeouts.
fn silent_master() -> (std::net::TcpListener, String) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let id = libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id();
    (l, format!("/ip4/127.0.0.1/tcp/{port}/p2p/{id}"))
}

fn a_file_id() -> String {
    "1220".to_string() + &"ab".repeat(32)
}

fn wait_for_lock(dir: &std::path::Path, pid: u32) {
    let start = std::time::Instant::now();
    while std::fs::read_to_string(dir.join("lock")).map_or(true, |s| s.trim() != pid.to_string()) {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "the first shoal never locked {}",
            dir.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn a_second_shoal_on_the_same_data_dir_fails_at_once_naming_the_first() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let (_listener, bootstrap) = silent_master();
    let fetch = |out: &str| {
        let mut c = shoal();
        c.args(["fetch", &a_file_id(), "--bootstrap", &bootstrap])
            .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir"])
            .arg(&data)
            .arg("--out")
            .arg(tmp.path().join(out));
        c
    };
    let mut first = fetch("a.bin")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    wait_for_lock(&data, first.id());
    let started = std::time::Instant::now();
    let out = fetch("b.bin").output().expect("run shoal");
    let waited = started.elapsed();
    let _ = first.kill();
    let _ = first.wait();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "data dir {} is in use by process {}",
            data.display(),
            first.id()
        )),
        "{err}"
    );
    assert!(
        waited < std::time::Duration::from_secs(5),
        "took {waited:?}"
    );
    // The holder is gone (killed): the dir is free again, no stale lock.
    let (_l2, other) = silent_master();
    let mut again = shoal()
        .args(["seed", "/nonexistent", "--file-id", &a_file_id()])
        .args(["--bootstrap", &other, "--listen", "/ip4/127.0.0.1/tcp/0"])
        .arg("--data-dir")
        .arg(&data)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    wait_for_lock(&data, again.id());
    let _ = again.kill();
    let _ = again.wait();
}

#[test]
fn publishing_a_missing_file_fails_before_joining_and_names_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_listener, bootstrap) = silent_master();
    let started = std::time::Instant::now();
    let out = shoal()
        .args([
            "publish",
            "/nonexistent/nothere.iso",
            "--bootstrap",
            &bootstrap,
        ])
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .output()
        .expect("run shoal");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/nothere.iso") && err.contains("No such file"),
        "{err}"
    );
    // Said once, not once per layer of the error.
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
    // Joining the silent master would take 15 s; and nothing was written.
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert!(!tmp.path().join("data").exists());
}

#[test]
fn a_garbled_file_id_says_what_a_file_id_looks_like() {
    for bad in ["release.iso", "1220abc", &a_file_id()[..67]] {
        let out = shoal()
            .args([
                "fetch",
                bad,
                "--out",
                "x",
                "--bootstrap",
                "/ip4/127.0.0.1/tcp/1",
            ])
            .output()
            .expect("run shoal");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("a file id is 68 hex digits starting with 1220"),
            "{bad}: {err}"
        );
    }
}

#[test]
fn read_only_commands_leave_no_identity_on_disk() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for cmd in ["status", "inspect"] {
        // Nobody listens on port 1: the command fails, but must not have created a key first.
        let out = shoal()
            .current_dir(tmp.path())
            .args([cmd, &a_file_id(), "--bootstrap"])
            .arg(format!(
                "/ip4/127.0.0.1/tcp/1/p2p/{}",
                libp2p::identity::Keypair::generate_ed25519()
                    .public()
                    .to_peer_id()
            ))
            .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
            .output()
            .expect("run shoal");
        assert!(!out.status.success());
        let left: Vec<_> = std::fs::read_dir(tmp.path())
            .expect("read dir")
            .map(|e| e.map(|e| e.file_name()))
            .collect();
        assert!(left.is_empty(), "{cmd} left {left:?} behind");
    }
}

#[test]
fn fetch_help_says_it_keeps_seeding_and_a_user_build_has_no_chaos() {
    let out = shoal()
        .args(["fetch", "--help"])
        .output()
        .expect("run shoal");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or_default();
    assert!(first.contains("for 60 s after"), "{text}");
    assert!(text.contains("--seed-time"), "{text}");
    // `cargo test -p shoal-node` builds shoal as a user's build does (no `chaos` feature);
    // under `--workspace` the test crate turns the feature on, and this half says nothing.
    if !cfg!(feature = "chaos") {
        assert!(!text.contains("--chaos"), "{text}");
    }
}

#[test]
fn verify_says_a_wrong_size_first() {
    use shoal_protocol::{manifest::ManifestBuilder, Manifest};
    let tmp = tempfile::tempdir().expect("tempdir");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let key = libp2p::identity::Keypair::generate_ed25519();
    let mut b = ManifestBuilder::new(65536);
    b.update(&data);
    let (body, digests) = b.finish(
        "x.bin".into(),
        key.public().encode_protobuf(),
        key.public().to_peer_id(),
        0,
    );
    let header = body
        .sign(&key)
        .and_then(|h| h.countersign(&key))
        .expect("sign");
    let m = Manifest { header, digests }.verify(None).expect("verify");
    let mpath = tmp.path().join("x.manifest");
    shoal_node::provenance::save_manifest(&m, &mpath).expect("save");
    let copy = tmp.path().join("x.bin");
    std::fs::write(&copy, &data[..100_000]).expect("write");
    let out = shoal()
        .arg("verify")
        .arg(&copy)
        .arg("--manifest")
        .arg(&mpath)
        .output()
        .expect("run shoal");
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("wrong size: 100000 bytes, but the file is 300000 bytes (truncated"),
        "{text}"
    );
    assert!(!text.contains("fail their digest"), "{text}");
    // It also prints the date in UTC.
    assert!(text.contains("1970-01-01 00:00:00 UTC"), "{text}");
}
