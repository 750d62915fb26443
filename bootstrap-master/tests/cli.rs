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
