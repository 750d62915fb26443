//! The node's piece store: the output file preallocated on disk, blocks written at their
//! offsets only after their digest checked out, and a journal of verified blocks.
//!
//! Crash safety: a block's index enters the journal only after the data file was synced
//! with the block in it. A kill at any moment therefore leaves every journaled block
//! verified on disk; a block that was being written is not in the journal and is fetched
//! again. The journal is a sequence of little-endian `u32` indices; a torn last entry and
//! indices out of range are ignored on reopening.
//!
//! Trust on resume: the journal says a block was verified when it was written, not that the
//! bytes on disk are still those bytes (a disk error, another program, a crash the file system
//! did not order as promised). So every journaled block is read back and checked against its
//! digest when a download is reopened; bad ones are dropped from the journal (and logged) and
//! fetched again. The work is one read of each journaled block, one block buffer at a time
//! (SHA-256 runs at about 1.8 GiB/s here); reopening is blocking work, for a blocking thread.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read, Write},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use futures::future::{ready, BoxFuture, Either, FutureExt, Ready};
use shoal_protocol::{
    block::{AlignedBuf, Blocks},
    VerifiedManifest,
};

/// Bytes written between syncs of the data file (and journal appends), at most (see also
/// [`SYNC_INTERVAL`]). A crash loses at most about this much verified work (plus a sync in
/// progress); each sync costs the writer nothing, as it runs on the blocking pool.
const SYNC_EVERY: u64 = 32 * 1024 * 1024;

/// A write also starts a sync when the last one started this long ago, so that a slow
/// download loses at most about this much time's work to a crash or an interruption.
const SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Direct writes of one store running at once: the 8 transfers of a fetch with 4 blocks each.
const DIRECT_WRITES: usize = 32;

/// With O_DIRECT, bytes of one transfer's block buffers ([`PieceStore::write_depth`]).
const OVERLAP_BYTES: usize = 1 << 20;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct StoreError {
    path: PathBuf,
    source: io::Error,
}

fn err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug)]
struct Progress {
    have: Blocks,
    unsynced_bytes: u64,
    /// When the last sync was started (or the store opened).
    last_sync: std::time::Instant,
}

/// Makes written blocks durable: syncs the data file, then journals the blocks written before
/// the sync. Shared with the background syncs started by the write path.
#[derive(Debug)]
struct Syncer {
    data: File,
    journal: Mutex<File>,
    /// Blocks written but not yet journaled.
    pending: Mutex<Vec<u32>>,
    /// A background sync is queued or running (at most one at a time).
    running: AtomicBool,
    /// Held for a whole sync, so that [`Syncer::sync`] returns only once every block written
    /// before it was called is journaled, including those a background sync had taken.
    one_at_a_time: Mutex<()>,
}

impl Syncer {
    fn sync(&self) -> io::Result<()> {
        let _one = self.one_at_a_time.lock().expect("sync lock");
        // Taken before the sync: every block in it was written before the sync starts.
        let pending = std::mem::take(&mut *self.pending.lock().expect("pending lock"));
        if pending.is_empty() {
            return Ok(());
        }
        self.data.sync_data()?;
        let bytes: Vec<u8> = pending.iter().flat_map(|b| b.to_le_bytes()).collect();
        self.journal.lock().expect("journal lock").write_all(&bytes)
    }
}

/// One file being fetched or served.
#[derive(Debug)]
pub struct PieceStore {
    manifest: Arc<VerifiedManifest>,
    path: PathBuf,
    data: File,
    /// The same file opened with `O_DIRECT`, where the file system takes it: whole blocks are
    /// written and read through it, past the page cache (see [`PieceStore::open_with`]).
    direct: Option<File>,
    /// Cleared when the file system refused an aligned `O_DIRECT` transfer after accepting the
    /// open: everything goes through `data` from then on.
    direct_works: AtomicBool,
    /// Held across a write through the page cache. The kernel takes the file's inode lock for
    /// every buffered write, so two worker threads writing blocks of one file at once never
    /// overlap anyway; without this the second spins in the kernel for the whole copy (4% of a
    /// fast fetch's samples, 19% on a busy VM whose vCPUs the host preempts), where a parked
    /// thread leaves the core to the other work.
    write_lock: Mutex<()>,
    /// Direct writes running on the blocking pool at once ([`DIRECT_WRITES`]): each holds a
    /// block buffer, and a transfer given up while its writes wait on a hung disk must not
    /// leave ever more of them behind.
    direct_writes: Arc<tokio::sync::Semaphore>,
    /// None for a complete copy (nothing to journal).
    syncer: Option<Arc<Syncer>>,
    /// Bytes written between background syncs ([`SYNC_EVERY`]).
    sync_every: u64,
    progress: Mutex<Progress>,
    written: tokio::sync::Notify,
}

impl PieceStore {
    /// Opens (or creates) the output file at `out` and the journal at `journal`, resuming
    /// from the blocks the journal lists. Blocks go through the page cache.
    pub fn open(
        manifest: Arc<VerifiedManifest>,
        out: &Path,
        journal: &Path,
    ) -> Result<Self, StoreError> {
        Self::open_with(manifest, out, journal, false)
    }

    /// As [`PieceStore::open`]; with `direct_io`, whole blocks (every block but a short last
    /// one) are written and read with `O_DIRECT`, past the page cache, and a new file's whole
    /// size is reserved on disk first (`fallocate`: ext4 serialises direct writes that fill
    /// holes; a disk too small then fails here, not halfway). A lone fetch writes each byte
    /// once and does not read it back, so the page cache only costs it a copy of every byte
    /// into freshly allocated cache pages, a third of its CPU on our VMs; a node in a crowd
    /// serves what it fetched, and reading that back from the disk cost more than the copy.
    /// Where the file system refuses `O_DIRECT` (tmpfs before Linux 6.6, some network and
    /// FUSE file systems), everything goes through the page cache.
    pub fn open_with(
        manifest: Arc<VerifiedManifest>,
        out: &Path,
        journal: &Path,
        direct_io: bool,
    ) -> Result<Self, StoreError> {
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(err(dir))?;
        }
        if let Some(dir) = journal.parent() {
            fs::create_dir_all(dir).map_err(err(dir))?;
        }
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(out)
            .map_err(err(out))?;
        let mut have = Blocks::new(manifest.blocks());
        let size = manifest.body().size;
        let existing = data.metadata().map_err(err(out))?.len();
        if existing != size {
            // A different length means nothing of it can be trusted as this file.
            data.set_len(size).map_err(err(out))?;
            if let Err(e) = if direct_io {
                reserve(&data, size)
            } else {
                Ok(())
            } {
                // Not left at full length: the next attempt must reserve again, not resume.
                let _ = data.set_len(0);
                return Err(err(out)(e));
            }
            let _ = fs::remove_file(journal);
        }
        match File::open(journal) {
            Ok(j) => {
                // Each block is journaled once; twice the file's entries is more than a sane
                // journal holds, and reading stops there.
                let cap = u64::from(manifest.blocks()).saturating_mul(8);
                let mut bytes = Vec::new();
                j.take(cap).read_to_end(&mut bytes).map_err(err(journal))?;
                let mut listed = Blocks::new(manifest.blocks());
                for chunk in bytes.chunks_exact(4) {
                    listed.insert(u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]));
                }
                let bad = recheck(&manifest, &data, &mut listed).map_err(err(out))?;
                if !bad.is_empty() {
                    tracing::warn!(
                        file = %out.display(),
                        bad = bad.len(),
                        first = ?&bad[..bad.len().min(8)],
                        "journaled blocks fail their digest on disk; fetching them again"
                    );
                }
                let entries = listed.count() as usize * 4;
                if !bad.is_empty() || bytes.len() != entries {
                    // Rewrite the journal as exactly the blocks that checked out (this also
                    // drops a torn last entry, duplicates and indices out of range).
                    let good: Vec<u8> = listed
                        .ranges()
                        .iter()
                        .flat_map(|r| r.iter())
                        .flat_map(u32::to_le_bytes)
                        .collect();
                    shoal_net::write_atomic(journal, &good).map_err(err(journal))?;
                }
                have = listed;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(journal)(e)),
        }
        let j = OpenOptions::new()
            .create(true)
            .append(true)
            .open(journal)
            .map_err(err(journal))?;
        let syncer = Syncer {
            data: data.try_clone().map_err(err(out))?,
            journal: Mutex::new(j),
            pending: Mutex::new(Vec::new()),
            running: AtomicBool::new(false),
            one_at_a_time: Mutex::new(()),
        };
        let direct = direct_io.then(|| open_direct(out)).flatten();
        Ok(Self {
            manifest,
            path: out.to_path_buf(),
            data,
            direct_works: AtomicBool::new(direct.is_some()),
            write_lock: Mutex::new(()),
            direct,
            direct_writes: Arc::new(tokio::sync::Semaphore::new(DIRECT_WRITES)),
            syncer: Some(Arc::new(syncer)),
            sync_every: SYNC_EVERY,
            written: tokio::sync::Notify::new(),
            progress: Mutex::new(Progress {
                have,
                unsynced_bytes: 0,
                last_sync: std::time::Instant::now(),
            }),
        })
    }

    /// Opens a complete local copy for serving, checking every block against the manifest
    /// first. Returns the indices of bad blocks as an error message if any fail.
    pub fn open_complete(manifest: Arc<VerifiedManifest>, path: &Path) -> Result<Self, StoreError> {
        let data = File::open(path).map_err(err(path))?;
        let bad = verify_blocks(&manifest, &data).map_err(err(path))?;
        if !bad.is_empty() {
            return Err(err(path)(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} blocks fail their digest, first {:?}",
                    bad.len(),
                    &bad[..bad.len().min(8)]
                ),
            )));
        }
        let blocks = manifest.blocks();
        Ok(Self {
            manifest,
            path: path.to_path_buf(),
            data,
            // A complete copy someone else wrote: its blocks are likely in the page cache.
            direct: None,
            direct_works: AtomicBool::new(false),
            write_lock: Mutex::new(()),
            direct_writes: Arc::new(tokio::sync::Semaphore::new(DIRECT_WRITES)),
            syncer: None,
            sync_every: SYNC_EVERY,
            written: tokio::sync::Notify::new(),
            progress: Mutex::new(Progress {
                have: Blocks::full(blocks),
                unsynced_bytes: 0,
                last_sync: std::time::Instant::now(),
            }),
        })
    }

    /// The manifest.
    pub fn manifest(&self) -> &Arc<VerifiedManifest> {
        &self.manifest
    }

    /// The data file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A snapshot of the blocks held.
    pub fn have(&self) -> Blocks {
        self.progress.lock().expect("store lock").have.clone()
    }

    /// Whether every block of `range` is held.
    pub fn holds(&self, range: shoal_protocol::BlockRange) -> bool {
        self.progress
            .lock()
            .expect("store lock")
            .have
            .contains_range(range)
    }

    /// Writes a block whose digest the caller checked. It is served at once and journaled
    /// after the next sync.
    pub fn write_block(&self, block: u32, data: &[u8]) -> io::Result<()> {
        if !self.manifest.check_block(block, data) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "block does not match its digest",
            ));
        }
        self.write_checked_block(block, data)
    }

    /// As [`PieceStore::write_block`], for a block whose digest
    /// [`shoal_protocol::piece::receive_blocks`] has just checked (hashing it twice would cost
    /// about a tenth of a fetch's CPU).
    pub(crate) fn write_checked_block(&self, block: u32, data: &[u8]) -> io::Result<()> {
        let offset = self.manifest.geometry().offset(block);
        if let Some(direct) = self.direct_for(data, offset) {
            match direct.write_all_at(data, offset) {
                Ok(()) => return self.wrote(block, data.len()),
                Err(e) => self.direct_failed(e)?,
            }
        }
        {
            // Nothing the lock guards can be left half done: a poisoned one is as good.
            let _one_at_a_time = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
            self.data.write_all_at(data, offset)?;
        }
        self.wrote(block, data.len())
    }

    /// Whether whole blocks go to and from the disk with `O_DIRECT` (the store was opened so
    /// and the file system takes it).
    pub fn direct_io(&self) -> bool {
        self.direct.is_some() && self.direct_works.load(Ordering::Relaxed)
    }

    /// Block buffers a transfer should keep ([`shoal_protocol::piece::receive_blocks_overlapped`]):
    /// one through the page cache, where a write is a memory copy; with O_DIRECT, 1 MiB of
    /// them (2 to 4 blocks), so that the next block arrives while the others are written.
    pub(crate) fn write_depth(&self) -> usize {
        if self.direct_io() {
            (OVERLAP_BYTES / self.manifest.geometry().block_size.max(1) as usize).clamp(2, 4)
        } else {
            1
        }
    }

    /// Stores verified block `block`, the first `len` bytes of `buf`, and gives the buffer
    /// back. Through the page cache the write is done before this returns. With O_DIRECT it
    /// waits for the disk, so it starts on the blocking pool at once (the next block is read
    /// meanwhile), at most [`DIRECT_WRITES`] at a time: past that the future waits for a slot
    /// holding only its own buffer, which is freed if the transfer is given up.
    pub(crate) fn write_owned(
        self: &Arc<Self>,
        block: u32,
        buf: AlignedBuf,
        len: usize,
    ) -> Either<Ready<io::Result<AlignedBuf>>, BoxFuture<'static, io::Result<AlignedBuf>>> {
        if !self.direct_io() {
            return Either::Left(ready(
                self.write_checked_block(block, &buf[..len]).map(|()| buf),
            ));
        }
        let store = self.clone();
        let slots = self.direct_writes.clone();
        let spawn = move |permit: tokio::sync::OwnedSemaphorePermit| {
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                store.write_checked_block(block, &buf[..len]).map(|()| buf)
            })
        };
        let joined = |r: Result<io::Result<AlignedBuf>, tokio::task::JoinError>| {
            r.unwrap_or_else(|e| Err(io::Error::other(e.to_string())))
        };
        Either::Right(match slots.clone().try_acquire_owned() {
            Ok(permit) => spawn(permit).map(joined).boxed(),
            Err(_) => async move {
                let permit = slots.acquire_owned().await.map_err(io::Error::other)?;
                joined(spawn(permit).await)
            }
            .boxed(),
        })
    }

    /// The `O_DIRECT` file, when `data` at `offset` may go through it.
    fn direct_for(&self, data: &[u8], offset: u64) -> Option<&File> {
        self.direct.as_ref().filter(|_| {
            self.direct_works.load(Ordering::Relaxed)
                && shoal_protocol::block::direct_io_aligned(data, offset)
        })
    }

    /// An aligned `O_DIRECT` transfer failed with `e`: `Ok` when the caller should do it again
    /// through the page cache (the file system does not take `O_DIRECT` after all; it is not
    /// tried again), the error itself otherwise (a disk error is not a reason to retry).
    fn direct_failed(&self, e: io::Error) -> io::Result<()> {
        if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) {
            if self.direct_works.swap(false, Ordering::Relaxed) {
                tracing::debug!(file = %self.path.display(), error = %e, "O_DIRECT refused; using the page cache");
            }
            Ok(())
        } else {
            Err(e)
        }
    }

    /// Block `block` (`len` bytes) is on disk: it is held from now on.
    fn wrote(&self, block: u32, len: usize) -> io::Result<()> {
        let must_sync = {
            let mut p = self.progress.lock().expect("store lock");
            let new = p.have.insert(block);
            if new {
                p.unsynced_bytes += len as u64;
            }
            let now = std::time::Instant::now();
            let full = p.unsynced_bytes >= self.sync_every
                || (p.unsynced_bytes > 0 && now.duration_since(p.last_sync) >= SYNC_INTERVAL);
            if full {
                p.unsynced_bytes = 0;
                p.last_sync = now;
            }
            if let (true, Some(s)) = (new, &self.syncer) {
                s.pending.lock().expect("pending lock").push(block);
            }
            full
        };
        // After the block counts as held: a woken hasher must find it.
        self.written.notify_waiters();
        if must_sync {
            self.sync_in_background()?;
        }
        Ok(())
    }

    /// Reads block `block` into `buf` (exactly its length).
    ///
    /// Whole blocks into an aligned buffer ([`shoal_protocol::block::AlignedBuf`]) are read
    /// with `O_DIRECT` when the store writes that way: the page cache does not hold them.
    pub fn read_block(&self, block: u32, buf: &mut [u8]) -> io::Result<()> {
        let offset = self.manifest.geometry().offset(block);
        if let Some(direct) = self.direct_for(buf, offset) {
            match direct.read_exact_at(buf, offset) {
                Ok(()) => return Ok(()),
                Err(e) => self.direct_failed(e)?,
            }
        }
        self.data.read_exact_at(buf, offset)
    }

    /// Syncs the data file and journals every block written before the call (waiting for a
    /// background sync in progress).
    pub fn flush(&self) -> io::Result<()> {
        match &self.syncer {
            Some(s) => s.sync(),
            None => Ok(()),
        }
    }

    /// Starts a sync on the blocking pool, unless one is already queued or running (the next
    /// full batch starts another). Outside a multi-threaded tokio runtime it syncs here.
    fn sync_in_background(&self) -> io::Result<()> {
        let Some(s) = &self.syncer else {
            return Ok(());
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                if s.running.swap(true, Ordering::AcqRel) {
                    return Ok(());
                }
                let s = s.clone();
                h.spawn_blocking(move || {
                    if let Err(e) = s.sync() {
                        // The blocks stay verified and served; only a resume after a crash
                        // would fetch them again.
                        tracing::warn!(error = %e, "syncing the download failed");
                    }
                    s.running.store(false, Ordering::Release);
                });
                Ok(())
            }
            _ => s.sync(),
        }
    }

    /// SHA-256 of the whole file, hashed front to back as blocks arrive (so that the final
    /// check costs no wall time after the last block). Returns once every block was hashed.
    pub async fn hash_as_written(&self) -> io::Result<[u8; 32]> {
        use sha2::{Digest, Sha256};
        let g = self.manifest.geometry();
        let blocks = self.manifest.blocks();
        let mut h = Sha256::new();
        // Aligned: with direct I/O the blocks are read back past the page cache too.
        let mut buf = shoal_protocol::block::AlignedBuf::zeroed(g.block_size as usize);
        let mut next = 0;
        loop {
            // Register for the next write before looking, so no write is missed.
            let notified = self.written.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            while next < blocks && self.holds(shoal_protocol::BlockRange::new(next, next + 1)) {
                let data = &mut buf[..g.block_len(next)];
                self.read_block(next, data)?;
                h.update(&*data);
                next += 1;
            }
            if next == blocks {
                return Ok(h.finalize().into());
            }
            notified.await;
        }
    }
}

/// Allocates the disk space of the whole file now, where the file system can: a disk too small
/// for it fails the fetch at the start rather than in its middle, the file is laid out in
/// few extents, and aligned `O_DIRECT` writes into allocated space run side by side (ext4
/// serialises those that fill holes).
fn reserve(data: &File, size: u64) -> io::Result<()> {
    use rustix::{fs::FallocateFlags, io::Errno};
    if size == 0 {
        return Ok(());
    }
    match rustix::fs::fallocate(data, FallocateFlags::empty(), 0, size) {
        Ok(()) => Ok(()),
        Err(Errno::NOSPC) => Err(io::Error::new(
            io::ErrorKind::StorageFull,
            format!("no room for the file's {size} bytes on this disk"),
        )),
        Err(e @ (Errno::DQUOT | Errno::FBIG)) => Err(io::Error::new(
            io::ErrorKind::StorageFull,
            format!("cannot reserve the file's {size} bytes: {e}"),
        )),
        // Not supported by this file system: the space is taken as blocks arrive.
        Err(e) => {
            tracing::debug!(error = %e, "cannot reserve the file's space; going on without");
            Ok(())
        }
    }
}

/// `path` opened again for reading and writing with `O_DIRECT`; `None` (logged) where the
/// file system refuses it.
fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(path)
    {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::debug!(file = %path.display(), error = %e, "no O_DIRECT here; using the page cache");
            None
        }
    }
}

/// Reads back every block in `listed` from `data` and checks it against its digest, one block
/// buffer at a time; removes the bad ones from `listed` and returns them.
fn recheck(manifest: &VerifiedManifest, data: &File, listed: &mut Blocks) -> io::Result<Vec<u32>> {
    let g = manifest.geometry();
    let mut buf = vec![0u8; g.block_size as usize];
    let mut bad = Vec::new();
    for range in listed.ranges() {
        for b in range.iter() {
            let slice = &mut buf[..g.block_len(b)];
            data.read_exact_at(slice, g.offset(b))?;
            if !manifest.check_block(b, slice) {
                bad.push(b);
            }
        }
    }
    for b in &bad {
        listed.remove(*b);
    }
    Ok(bad)
}

/// Checks every block of `data` against `manifest`; returns the bad blocks.
pub fn verify_blocks(manifest: &VerifiedManifest, data: &File) -> io::Result<Vec<u32>> {
    let g = manifest.geometry();
    if data.metadata()?.len() != g.size {
        return Ok((0..manifest.blocks()).collect());
    }
    let mut buf = vec![0u8; g.block_size as usize];
    let mut bad = Vec::new();
    for b in 0..manifest.blocks() {
        let slice = &mut buf[..g.block_len(b)];
        data.read_exact_at(slice, g.offset(b))?;
        if !manifest.check_block(b, slice) {
            bad.push(b);
        }
    }
    Ok(bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::identity::Keypair;
    use shoal_protocol::manifest::ManifestBuilder;
    use shoal_protocol::Manifest;

    fn manifest(data: &[u8]) -> Arc<VerifiedManifest> {
        let k = Keypair::generate_ed25519();
        let mut b = ManifestBuilder::new(4096);
        b.update(data);
        let (body, digests) = b.finish(
            "t".into(),
            k.public().encode_protobuf(),
            k.public().to_peer_id(),
            0,
        );
        let header = body.sign(&k).unwrap().countersign(&k).unwrap();
        Arc::new(Manifest { header, digests }.verify(None).unwrap())
    }

    #[test]
    fn whole_blocks_go_past_the_page_cache_and_read_back_intact() {
        let dir = tempfile::tempdir().unwrap();
        // Three whole blocks and a short last one (which goes through the page cache).
        let data: Vec<u8> = (0..3 * 4096 + 100u32).map(|i| (i % 251) as u8).collect();
        let m = manifest(&data);
        let (out, journal) = (dir.path().join("out"), dir.path().join("j"));
        let s = PieceStore::open_with(m.clone(), &out, &journal, true).unwrap();
        // Where this directory's file system takes O_DIRECT, the store must use it.
        let probe = dir.path().join("probe");
        File::create(&probe).unwrap();
        assert_eq!(s.direct_io(), open_direct(&probe).is_some());
        // The whole file's space is taken at once.
        use std::os::unix::fs::MetadataExt;
        let meta = fs::metadata(&out).unwrap();
        assert_eq!(meta.len(), data.len() as u64);
        assert!(
            meta.blocks() * 512 >= data.len() as u64,
            "{} blocks",
            meta.blocks()
        );
        let mut aligned = AlignedBuf::zeroed(4096);
        for (b, chunk) in data.chunks(4096).enumerate() {
            let b = b as u32;
            if chunk.len() == 4096 {
                aligned.copy_from_slice(chunk);
                s.write_checked_block(b, &aligned).unwrap();
            } else {
                s.write_checked_block(b, chunk).unwrap();
            }
        }
        assert_eq!(s.direct_io(), open_direct(&probe).is_some(), "no fall-back");
        for (b, chunk) in data.chunks(4096).enumerate() {
            let b = b as u32;
            // Through O_DIRECT (aligned) and through the page cache (not aligned).
            let mut a = AlignedBuf::zeroed(chunk.len());
            s.read_block(b, &mut a).unwrap();
            assert_eq!(&a[..], chunk, "block {b}, aligned");
            let mut v = vec![0u8; chunk.len() + 1];
            s.read_block(b, &mut v[1..]).unwrap();
            assert_eq!(&v[1..], chunk, "block {b}, unaligned");
        }
        s.flush().unwrap();
        drop(s);
        assert_eq!(fs::read(&out).unwrap(), data);
        // Reopening re-checks every journaled block through the page cache: all good.
        let s = PieceStore::open(m, &out, &journal).unwrap();
        assert!(s.have().is_full());
    }

    /// With direct I/O, a disk too small for the file fails the download when it opens, with a
    /// clear error.
    /// Needs root (to mount a 256 KiB tmpfs); otherwise it says so and passes.
    #[test]
    fn a_disk_too_small_for_the_file_fails_at_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("skipped: cannot mount a tmpfs here (not root?)");
            return;
        }
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(self.0).status();
            }
        }
        let _unmount = Unmount(dir.path());
        let data = vec![7u8; 1 << 20];
        let m = manifest(&data);
        let open = |m: &Arc<VerifiedManifest>, name: &str| {
            PieceStore::open_with(
                m.clone(),
                &dir.path().join(name),
                &dir.path().join("j"),
                true,
            )
        };
        let e = open(&m, "out").expect_err("1 MiB cannot fit in 256 KiB");
        assert_eq!(e.source.kind(), io::ErrorKind::StorageFull, "{e}");
        assert!(
            e.to_string()
                .contains("no room for the file's 1048576 bytes"),
            "{e}"
        );
        // Trying again fails the same way (the first try left no full-length file behind).
        let e = open(&m, "out").expect_err("still no room");
        assert_eq!(e.source.kind(), io::ErrorKind::StorageFull, "{e}");
        // A file that fits opens.
        open(&manifest(&data[..64 * 1024]), "small").unwrap();
    }

    #[test]
    fn journaled_blocks_survive_reopen_and_unsynced_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 253) as u8).collect();
        let m = manifest(&data);
        let (out, journal) = (dir.path().join("out"), dir.path().join("j"));
        let s = PieceStore::open(m.clone(), &out, &journal).unwrap();
        s.write_block(0, &data[..4096]).unwrap();
        s.write_block(1, &data[4096..8192]).unwrap();
        s.flush().unwrap();
        s.write_block(2, &data[8192..12288]).unwrap();
        assert!(s.holds(shoal_protocol::BlockRange::new(0, 3)));
        // Refuses a block that is not what the manifest says.
        assert!(s.write_block(3, &data[..4096]).is_err());
        drop(s); // a crash: block 2 was never synced nor journaled
        let s = PieceStore::open(m.clone(), &out, &journal).unwrap();
        assert_eq!(
            s.have().ranges(),
            vec![shoal_protocol::BlockRange::new(0, 2)]
        );
        for (b, chunk) in data.chunks(4096).enumerate().skip(2) {
            s.write_block(b as u32, chunk).unwrap();
        }
        s.flush().unwrap();
        assert!(s.have().is_full());
        let digest = futures::executor::block_on(s.hash_as_written()).unwrap();
        assert_eq!(digest, m.body().file_sha256);
        assert_eq!(fs::read(&out).unwrap(), data);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_batches_are_synced_in_the_background_and_flush_waits_for_them() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..40_960u32).map(|i| (i % 233) as u8).collect();
        let m = manifest(&data);
        let (out, journal) = (dir.path().join("out"), dir.path().join("j"));
        let mut s = PieceStore::open(m.clone(), &out, &journal).unwrap();
        s.sync_every = 2 * 4096;
        for (b, chunk) in data.chunks(4096).enumerate() {
            s.write_block(b as u32, chunk).unwrap();
        }
        // Background syncs journal full batches on their own...
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while fs::metadata(&journal).unwrap().len() == 0 {
            assert!(std::time::Instant::now() < deadline, "no background sync");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // ... and a flush journals the rest, after any sync still running.
        s.flush().unwrap();
        assert_eq!(fs::metadata(&journal).unwrap().len(), 10 * 4);
        drop(s);
        let s = PieceStore::open(m, &out, &journal).unwrap();
        assert!(s.have().is_full());
    }

    #[tokio::test]
    async fn the_whole_file_is_hashed_as_blocks_arrive_in_any_order() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..30_000u32).map(|i| (i % 239) as u8).collect();
        let m = manifest(&data);
        let s = Arc::new(
            PieceStore::open(m.clone(), &dir.path().join("o"), &dir.path().join("j")).unwrap(),
        );
        let hasher = tokio::spawn({
            let s = s.clone();
            async move { s.hash_as_written().await }
        });
        let chunks: Vec<&[u8]> = data.chunks(4096).collect();
        for b in [3usize, 0, 7, 1, 2, 6, 5, 4] {
            tokio::task::yield_now().await;
            s.write_block(b as u32, chunks[b]).unwrap();
        }
        let digest = tokio::time::timeout(std::time::Duration::from_secs(5), hasher)
            .await
            .expect("the hasher finishes once every block is written")
            .unwrap()
            .unwrap();
        assert_eq!(digest, m.body().file_sha256);
    }

    #[test]
    fn a_torn_journal_entry_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![9u8; 10_000];
        let m = manifest(&data);
        let (out, journal) = (dir.path().join("out"), dir.path().join("j"));
        let s = PieceStore::open(m.clone(), &out, &journal).unwrap();
        s.write_block(0, &data[..4096]).unwrap();
        s.flush().unwrap();
        drop(s);
        let mut j = OpenOptions::new().append(true).open(&journal).unwrap();
        j.write_all(&[1, 0]).unwrap(); // half an entry
        j.write_all(&999u32.to_le_bytes()).unwrap(); // out of range
        drop(j);
        let s = PieceStore::open(m, &out, &journal).unwrap();
        assert_eq!(s.have().count(), 1);
    }

    #[test]
    fn a_journaled_block_damaged_on_disk_is_not_trusted_on_resume() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..40_000u32).map(|i| (i % 241) as u8).collect();
        let m = manifest(&data);
        let (out, journal) = (dir.path().join("out"), dir.path().join("j"));
        let s = PieceStore::open(m.clone(), &out, &journal).unwrap();
        for (b, chunk) in data.chunks(4096).enumerate().take(6) {
            s.write_block(b as u32, chunk).unwrap();
        }
        s.flush().unwrap();
        drop(s);
        // Block 2 rots on disk after it was journaled.
        let f = OpenOptions::new().write(true).open(&out).unwrap();
        f.write_all_at(&[0xee; 16], 2 * 4096 + 100).unwrap();
        drop(f);
        let s = PieceStore::open(m.clone(), &out, &journal).unwrap();
        assert_eq!(
            s.have().ranges(),
            vec![
                shoal_protocol::BlockRange::new(0, 2),
                shoal_protocol::BlockRange::new(3, 6)
            ]
        );
        // The journal itself no longer lists it, so a second reopen agrees at no cost.
        assert_eq!(fs::read(&journal).unwrap().len(), 5 * 4);
        // It is fetched again and then trusted.
        s.write_block(2, &data[2 * 4096..3 * 4096]).unwrap();
        s.flush().unwrap();
        drop(s);
        let s = PieceStore::open(m, &out, &journal).unwrap();
        assert_eq!(s.have().count(), 6);
    }

    #[test]
    fn a_complete_copy_is_checked_block_by_block() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = vec![3u8; 10_000];
        let m = manifest(&data);
        let p = dir.path().join("copy");
        fs::write(&p, &data).unwrap();
        assert!(PieceStore::open_complete(m.clone(), &p)
            .unwrap()
            .have()
            .is_full());
        data[5000] ^= 1;
        fs::write(&p, &data).unwrap();
        let e = PieceStore::open_complete(m, &p).unwrap_err();
        assert!(e.to_string().contains("[1]"), "{e}");
    }
}
