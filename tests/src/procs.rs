//! Helpers for tests that run the built binaries (`shoal-master`, `shoal`) as real processes.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use std::io::{Read, Write};

use anyhow::{bail, Context};
use sha2::Digest;

/// The directory holding the workspace's binaries, building them if they are missing.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|p| p.parent())
        .context("test binary has no target dir")?
        .to_path_buf();
    if !dir.join("shoal").exists() || !dir.join("shoal-master").exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            // The whole workspace, so features resolve as under `cargo test --workspace`.
            .args(["build", "--workspace", "--bins"])
            .status()?;
        if !status.success() {
            bail!("building the binaries failed");
        }
    }
    Ok(dir)
}

/// Kills the child when dropped, so a failing test leaves no process behind.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Adds the file at `src` to the master's data dir `master_dir` with `shoal-master add` from
/// `bins`; returns the file id it printed.
pub fn add_file(bins: &Path, master_dir: &Path, src: &Path) -> anyhow::Result<String> {
    let out = Command::new(bins.join("shoal-master"))
        .arg("add")
        .arg(src)
        .arg("--data-dir")
        .arg(master_dir)
        .stderr(std::process::Stdio::null())
        .output()?;
    anyhow::ensure!(out.status.success(), "shoal-master add failed");
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// Waits until `log` contains `needle`, while `proc` runs; at most `limit`.
pub fn wait_for_log(
    log: &Path,
    needle: &str,
    proc: &mut Proc,
    limit: Duration,
    what: &str,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return Ok(());
        }
        if let Some(status) = proc.0.try_wait()? {
            bail!("{what} exited ({status}) before logging {needle:?}:\n{text}");
        }
        if start.elapsed() > limit {
            bail!("{what} did not log {needle:?} within {limit:?}:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the file at `path` exists and is not blank; returns its text.
pub fn wait_for_file(path: &Path, limit: Duration) -> anyhow::Result<String> {
    let start = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if !s.trim().is_empty() {
                return Ok(s);
            }
        }
        if start.elapsed() > limit {
            bail!("{} did not appear within {limit:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (at most 30 s) for a `shoal-master` process with data dir `master_dir` to write its
/// addresses; returns the first, the one to bootstrap from.
pub fn master_bootstrap(master_dir: &Path) -> anyhow::Result<String> {
    Ok(
        wait_for_file(&master_dir.join("bootstrap.addr"), Duration::from_secs(30))?
            .lines()
            .next()
            .context("empty bootstrap.addr")?
            .to_string(),
    )
}

/// Waits for `child` to exit, at most `limit`.
pub fn wait_with_limit(
    child: &mut Child,
    limit: Duration,
    what: &str,
) -> anyhow::Result<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if start.elapsed() > limit {
            bail!("{what} did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The SHA-256 of the file at `path`.
pub fn sha256_file(path: &Path) -> anyhow::Result<[u8; 32]> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finalize().into());
        }
        h.update(&buf[..n]);
    }
}

/// `GET /metrics` from `addr` (HOST:PORT); returns the value of the sample `name` (with
/// its labels, if any).
pub fn metric(addr: &str, name: &str) -> anyhow::Result<f64> {
    metrics(addr)?.get(name)
}

/// One scrape of a process's metrics page: read several samples for one request.
pub struct Metrics {
    addr: String,
    text: String,
}

/// `GET /metrics` from `addr` (HOST:PORT), once.
pub fn metrics(addr: &str) -> anyhow::Result<Metrics> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(Metrics {
        addr: addr.to_owned(),
        text,
    })
}

impl Metrics {
    /// The value of the sample `name` (with its labels, if any).
    pub fn get(&self, name: &str) -> anyhow::Result<f64> {
        self.text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().split(' ').next()?.parse().ok())
            .with_context(|| {
                format!(
                    "{name} missing from the metrics of {}:\n{}",
                    self.addr, self.text
                )
            })
    }
}
