//! Live progress of a fetch, shared between the fetch driver (which counts) and whoever shows
//! it (the `shoal` binary's bar, its periodic lines without a terminal, or `--progress json`).
//!
//! Counts only, no clock: rates are the reader's business, measured over bytes fetched in this
//! run ([`Snapshot::fetched`]), so blocks that a resumed fetch already held never count as
//! speed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::Serialize;

/// Counters of one fetch; all zero until the manifest is known.
#[derive(Debug, Default)]
pub struct FetchProgress {
    started: AtomicBool,
    total_bytes: AtomicU64,
    blocks: AtomicU64,
    blocks_resumed: AtomicU64,
    bytes_resumed: AtomicU64,
    from_master: AtomicU64,
    from_peers: AtomicU64,
    blocks_verified: AtomicU64,
}

/// One reading of a [`FetchProgress`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    /// The manifest is known and the counts below are meaningful.
    pub started: bool,
    /// The file's size.
    pub total_bytes: u64,
    /// Blocks in the file.
    pub blocks: u64,
    /// Blocks already verified on disk when the fetch started (a resume).
    pub blocks_resumed: u64,
    /// Their bytes.
    pub bytes_resumed: u64,
    /// Verified bytes received from the master in this run.
    pub bytes_from_master: u64,
    /// Verified bytes received from peers in this run.
    pub bytes_from_peers: u64,
    /// Blocks received and verified in this run.
    pub blocks_verified: u64,
}

impl Snapshot {
    /// Bytes fetched in this run.
    pub fn fetched(&self) -> u64 {
        self.bytes_from_master + self.bytes_from_peers
    }

    /// Bytes verified on disk (resumed and fetched).
    pub fn held(&self) -> u64 {
        self.bytes_resumed + self.fetched()
    }
}

impl FetchProgress {
    /// Reads the counters.
    pub fn snapshot(&self) -> Snapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Snapshot {
            started: self.started.load(Ordering::Acquire),
            total_bytes: r(&self.total_bytes),
            blocks: r(&self.blocks),
            blocks_resumed: r(&self.blocks_resumed),
            bytes_resumed: r(&self.bytes_resumed),
            bytes_from_master: r(&self.from_master),
            bytes_from_peers: r(&self.from_peers),
            blocks_verified: r(&self.blocks_verified),
        }
    }

    /// The fetch knows its file and what it already holds.
    pub fn start(&self, total_bytes: u64, blocks: u32, blocks_resumed: u32, bytes_resumed: u64) {
        self.total_bytes.store(total_bytes, Ordering::Relaxed);
        self.blocks.store(blocks.into(), Ordering::Relaxed);
        self.blocks_resumed
            .store(blocks_resumed.into(), Ordering::Relaxed);
        self.bytes_resumed.store(bytes_resumed, Ordering::Relaxed);
        self.started.store(true, Ordering::Release);
    }

    /// One more block of `bytes` verified, from the master or from a peer.
    pub fn add(&self, from_master: bool, bytes: u64) {
        let c = if from_master {
            &self.from_master
        } else {
            &self.from_peers
        };
        c.fetch_add(bytes, Ordering::Relaxed);
        self.blocks_verified.fetch_add(1, Ordering::Relaxed);
    }
}

/// `12.5 MiB` style sizes.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// "resuming: N of M blocks already verified", when there is something to resume.
pub fn resume_line(s: &Snapshot) -> Option<String> {
    (s.started && s.blocks_resumed > 0).then(|| {
        format!(
            "resuming: {} of {} blocks already verified ({} of {})",
            s.blocks_resumed,
            s.blocks,
            human_bytes(s.bytes_resumed),
            human_bytes(s.total_bytes)
        )
    })
}

/// One progress line for logs without a terminal: held, percentage, rate, and where the
/// bytes came from.
pub fn progress_line(s: &Snapshot, rate_bytes_per_s: f64) -> String {
    let pct = if s.total_bytes == 0 {
        100.0
    } else {
        s.held() as f64 * 100.0 / s.total_bytes as f64
    };
    format!(
        "{} of {} ({pct:.0}%), {}/s; from the master {}, from peers {}",
        human_bytes(s.held()),
        human_bytes(s.total_bytes),
        human_bytes(rate_bytes_per_s.max(0.0) as u64),
        human_bytes(s.bytes_from_master),
        human_bytes(s.bytes_from_peers),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_split_by_source_and_resumed_bytes_are_not_fetched() {
        let p = FetchProgress::default();
        assert!(!p.snapshot().started);
        assert_eq!(resume_line(&p.snapshot()), None);
        p.start(4 << 20, 64, 16, 1 << 20);
        p.add(true, 65536);
        p.add(false, 2 * 65536);
        let s = p.snapshot();
        assert_eq!(s.fetched(), 3 * 65536);
        assert_eq!(s.blocks_verified, 2);
        assert_eq!(s.held(), (1 << 20) + 3 * 65536);
        assert_eq!(
            resume_line(&s).as_deref(),
            Some("resuming: 16 of 64 blocks already verified (1.0 MiB of 4.0 MiB)")
        );
        assert_eq!(
            progress_line(&s, 2.5 * 1048576.0),
            "1.2 MiB of 4.0 MiB (30%), 2.5 MiB/s; from the master 64.0 KiB, from peers 128.0 KiB"
        );
    }

    #[test]
    fn a_fresh_fetch_has_no_resume_line() {
        let p = FetchProgress::default();
        p.start(100, 1, 0, 0);
        assert_eq!(resume_line(&p.snapshot()), None);
        assert_eq!(human_bytes(100), "100 B");
    }
}
