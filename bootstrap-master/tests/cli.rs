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

#[test]
fn a_second_master_on_the_same_data_dir_fails_at_once_and_keeps_bootstrap_addr() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let master = |port: &str| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_shoal-master"));
        c.arg("--data-dir")
            .arg(&data)
            .args(["--listen", &format!("/ip4/127.0.0.1/tcp/{port}")]);
        c
    };
    let mut first = master("0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let addr_file = data.join("bootstrap.addr");
    let start = std::time::Instant::now();
    let before = loop {
        match std::fs::read_to_string(&addr_file) {
            Ok(s) if !s.is_empty() => break s,
            _ => {}
        }
        if start.elapsed() > std::time::Duration::from_secs(30) {
            let _ = first.kill();
            panic!("the first master never wrote bootstrap.addr");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let out = master("0").output().expect("run shoal-master");
    let after = std::fs::read_to_string(&addr_file).expect("bootstrap.addr");
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
    assert_eq!(before, after, "the second master rewrote bootstrap.addr");
}

#[test]
fn a_taken_port_is_named_with_its_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let out = Command::new(env!("CARGO_BIN_EXE_shoal-master"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--listen", &format!("/ip4/127.0.0.1/tcp/{port}")])
        .output()
        .expect("run shoal-master");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen on /ip4/127.0.0.1/tcp/{port}"))
            && err.contains("in use"),
        "{err}"
    );
}

#[test]
fn a_master_start_logs_no_warnings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = Command::new(env!("CARGO_BIN_EXE_shoal-master"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    // kad's automatic bootstrap warned "No known peers" right after the start.
    let start = std::time::Instant::now();
    while !dir.path().join("bootstrap.addr").exists() {
        assert!(start.elapsed() < std::time::Duration::from_secs(30));
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_secs(2));
    let _ = p.kill();
    let out = p.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("WARN") && !err.contains("ERROR"), "{err}");
    // Redirected stderr gets no colour codes.
    assert!(!err.contains('\u{1b}'), "{err}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .lines()
            .next()
            .is_some_and(|l| l.starts_with("/ip4/")),
        "{stdout}"
    );
}
