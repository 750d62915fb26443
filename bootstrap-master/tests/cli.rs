//! The `shoal-master` binary's user-facing errors. (Having an integration test here also makes
//! `cargo test` build the binary that the real-process tests run.)

use std::process::Command;

#[test]
fn adding_a_missing_file_names_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_shoal-master"))
        .args(["add", "/nonexistent/release.iso", "--data-dir"])
        .arg(dir.path())
        .output()
        .expect("run shoal-master");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/release.iso"), "{err}");
}

#[test]
fn add_prints_a_file_id_that_parses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("f.bin");
    std::fs::write(&src, vec![1u8; 100_000]).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_shoal-master"))
        .arg("add")
        .arg(&src)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .expect("run shoal-master");
    assert!(out.status.success());
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(id.parse::<shoal_protocol::FileId>().is_ok(), "{id}");
}

#[test]
fn a_bad_publisher_keys_file_names_the_line_and_the_master_does_not_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("publishers");
    std::fs::write(&keys, "# trusted\n12D3KooWnot-a-key\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_shoal-master"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--publisher-keys-file"])
        .arg(&keys)
        .output()
        .expect("run shoal-master");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2"), "{err}");
    assert!(err.contains("12D3KooWnot-a-key"), "{err}");
    assert!(!dir.path().join("data/bootstrap.addr").exists());
}

#[test]
fn open_publishing_excludes_trusted_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_shoal-master"))
        .arg("--data-dir")
        .arg(dir.path())
        .args([
            "--open-publishing",
            "--publisher-key",
            "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN",
        ])
        .output()
        .expect("run shoal-master");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--open-publishing"), "{err}");
}
