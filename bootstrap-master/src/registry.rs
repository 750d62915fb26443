//! The master's data directory: its key, the manifests it countersigned and the files it holds.
//!
//! Layout:
//! - `identity.key`: the master's keypair (protobuf), so its PeerId survives restarts;
//! - `manifests/<id>.manifest`: each countersigned manifest (codec-encoded);
//! - `files/<id>.data`: the file's bytes at their offsets, complete or being pulled;
//! - `files/<id>.complete`: present once every block of `.data` was verified;
//! - `bootstrap.addr`: the dialable addresses, one a line, rewritten as listeners come up.
//!
//! Every write is to a temporary file then renamed (and the directory synced), so a crash
//! leaves the old or the new version, never half of one. The manifest is written last: a
//! manifest on disk is the commit point of a file, so a rescan that sees it also sees the
//! `.complete` marker of a file added with `shoal-master add`.
//!
//! Nothing here runs on the master's event loop: the shell calls it from the blocking pool
//! (rescans, resume checks) or through the [`DiskWriter`] task.

use std::{
    collections::{BTreeMap, HashSet},
    fs, io,
    io::Read,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use sha2::{Digest, Sha256};

use libp2p::identity::Keypair;
use shoal_protocol::{
    block::Blocks,
    codec,
    manifest::{choose_block_size, ManifestBuilder},
    FileId, Manifest, VerifiedManifest,
};

/// Why the registry could not do something.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A file system error, with the path involved.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A stored manifest or key is damaged.
    #[error("{path}: damaged: {reason}")]
    Damaged {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A manifest could not be made.
    #[error("manifest: {0}")]
    Manifest(#[from] shoal_protocol::ManifestError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RegistryError + '_ {
    move |source| RegistryError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` atomically and durably (temporary file, fsync, rename, fsync of
/// the directory), as [`shoal_net::keyfile::write_atomic`].
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RegistryError> {
    shoal_net::keyfile::write_atomic(path, bytes).map_err(io_err(path))
}

/// Bytes available to this process on the file system holding `path`.
pub fn available_space(path: &Path) -> Result<u64, RegistryError> {
    let st = rustix::fs::statvfs(path).map_err(|e| io_err(path)(e.into()))?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Which blocks of the data file at `path` hold what `manifest` says, each checked against
/// its digest (a partial pull is resumed from these). A missing file holds none.
pub fn verified_blocks(manifest: &VerifiedManifest, path: &Path) -> Blocks {
    let mut have = Blocks::new(manifest.blocks());
    let Ok(f) = fs::File::open(path) else {
        return have;
    };
    let geometry = manifest.geometry();
    let mut buf = vec![0u8; manifest.body().block_size as usize];
    for block in 0..manifest.blocks() {
        let data = &mut buf[..geometry.block_len(block)];
        if f.read_exact_at(data, geometry.offset(block)).is_ok()
            && manifest.check_block(block, data)
        {
            have.insert(block);
        }
    }
    have
}

/// Whether the file at `path` hashes to the manifest's whole-file SHA-256.
pub fn whole_file_matches(manifest: &VerifiedManifest, path: &Path) -> Result<bool, RegistryError> {
    let mut f = fs::File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok(total == manifest.body().size
        && <[u8; 32]>::from(hasher.finalize()) == manifest.body().file_sha256)
}

/// Whole-file writes of small state files (ban list, `bootstrap.addr`) off the event loop:
/// [`DiskWriter::write`] never blocks; a background task writes the latest bytes of each
/// path, atomically, on the blocking pool. Writes to one path are coalesced, so the queue is
/// bounded by the number of distinct paths. The task ends (after a last flush) when every
/// handle is dropped.
#[derive(Clone)]
pub struct DiskWriter {
    pending: Arc<Mutex<BTreeMap<PathBuf, Vec<u8>>>>,
    /// Wakes the task; one wake-up pending at most. Its closing ends the task.
    wake: tokio::sync::mpsc::Sender<()>,
    /// Held while a batch is written: batches reach the disk one after the other, in order.
    flushing: Arc<tokio::sync::Mutex<()>>,
}

impl DiskWriter {
    /// Starts the writer task (on the current tokio runtime).
    pub fn spawn() -> Self {
        Self::spawn_task().0
    }

    fn spawn_task() -> (Self, tokio::task::JoinHandle<()>) {
        let (wake, mut woken) = tokio::sync::mpsc::channel(1);
        let pending: Arc<Mutex<BTreeMap<PathBuf, Vec<u8>>>> = Arc::default();
        let flushing: Arc<tokio::sync::Mutex<()>> = Arc::default();
        let (p, f) = (pending.clone(), flushing.clone());
        let task = tokio::spawn(async move {
            while woken.recv().await.is_some() {
                flush(&p, &f).await;
            }
            flush(&p, &f).await;
        });
        (
            Self {
                pending,
                wake,
                flushing,
            },
            task,
        )
    }

    /// Writes `bytes` to `path` soon (replacing any write to it not yet done).
    pub fn write(&self, path: PathBuf, bytes: Vec<u8>) {
        if let Ok(mut p) = self.pending.lock() {
            p.insert(path, bytes);
        }
        // Full: a wake-up is already pending, and it will see this write.
        let _ = self.wake.try_send(());
    }

    /// Writes everything pending now; returns once it is on disk.
    pub async fn flush(&self) {
        flush(&self.pending, &self.flushing).await;
    }
}

async fn flush(pending: &Mutex<BTreeMap<PathBuf, Vec<u8>>>, flushing: &tokio::sync::Mutex<()>) {
    let _turn = flushing.lock().await;
    let batch = match pending.lock() {
        Ok(mut p) => std::mem::take(&mut *p),
        Err(_) => return,
    };
    if batch.is_empty() {
        return;
    }
    let done = tokio::task::spawn_blocking(move || {
        for (path, bytes) in batch {
            if let Err(e) = write_atomic(&path, &bytes) {
                tracing::error!(error = %e, "cannot write a state file");
            }
        }
    })
    .await;
    if let Err(e) = done {
        tracing::error!(error = %e, "state file writer failed");
    }
}

/// Loads the keypair at `path`, creating one (mode 0600, written durably) if there is none;
/// a key readable by others is made 0600 ([`shoal_net::keyfile::load_or_create_key`]).
pub fn load_or_create_key(path: &Path) -> Result<Keypair, RegistryError> {
    shoal_net::keyfile::load_or_create_key(path).map_err(|e| RegistryError::Damaged {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Hashes the file at `path` into a manifest body and digest list, streaming it, in blocks of
/// `block_size` bytes (`None`: [`choose_block_size`] for its size).
pub fn hash_file(path: &Path, block_size: Option<u32>) -> Result<ManifestBuilder, RegistryError> {
    let f = fs::File::open(path).map_err(io_err(path))?;
    let size = f.metadata().map_err(io_err(path))?.len();
    let block_size = block_size.unwrap_or_else(|| choose_block_size(size));
    ManifestBuilder::hash_reader(io::BufReader::new(f), block_size).map_err(io_err(path))
}

/// A file the master knows: its manifest and where its bytes are.
#[derive(Debug)]
pub struct StoredFile {
    /// The verified manifest.
    pub manifest: Arc<VerifiedManifest>,
    /// The data file.
    pub path: PathBuf,
    /// Whether every block was verified.
    pub complete: bool,
}

/// The data directory.
#[derive(Debug, Clone)]
pub struct Registry {
    dir: PathBuf,
}

impl Registry {
    /// Opens (creating) the data directory.
    pub fn open(dir: &Path) -> Result<Self, RegistryError> {
        for sub in ["manifests", "files"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The master's key (created on first use).
    pub fn key(&self) -> Result<Keypair, RegistryError> {
        load_or_create_key(&self.dir.join("identity.key"))
    }

    /// Where the bytes of `file` live.
    pub fn data_path(&self, file: &FileId) -> PathBuf {
        self.dir.join("files").join(format!("{file}.data"))
    }

    fn complete_path(&self, file: &FileId) -> PathBuf {
        self.dir.join("files").join(format!("{file}.complete"))
    }

    fn manifest_path(&self, file: &FileId) -> PathBuf {
        self.dir.join("manifests").join(format!("{file}.manifest"))
    }

    /// Stores a verified manifest.
    pub fn save_manifest(&self, m: &VerifiedManifest) -> Result<(), RegistryError> {
        let path = self.manifest_path(&m.id());
        let bytes = codec::encode(m.manifest()).map_err(|e| RegistryError::Damaged {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(&path, &bytes)
    }

    /// Marks `file`'s data complete (after an fsync of the data).
    pub fn mark_complete(&self, file: &FileId) -> Result<(), RegistryError> {
        let data = self.data_path(file);
        fs::File::open(&data)
            .and_then(|f| f.sync_all())
            .map_err(io_err(&data))?;
        write_atomic(&self.complete_path(file), b"")
    }

    /// Every stored file. Damaged manifests are skipped with a warning, not fatal.
    pub fn load_all(&self) -> Result<Vec<StoredFile>, RegistryError> {
        let dir = self.dir.join("manifests");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let path = entry.map_err(io_err(&dir))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("manifest") {
                continue;
            }
            match self.load_one(&path) {
                Ok(f) => out.push(f),
                Err(e) => tracing::warn!(error = %e, "skipping stored manifest"),
            }
        }
        Ok(out)
    }

    /// Stored files whose names are not in `known`, at most `max` of them (the rest are
    /// found by the next scan). Only the names of known files are looked at: nothing is
    /// re-read or re-verified. Run it off the event loop: it reads and verifies manifests.
    pub fn scan_new(&self, known: &HashSet<FileId>, max: usize) -> Vec<StoredFile> {
        let dir = self.dir.join("manifests");
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = %e, "cannot list manifests");
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            if out.len() >= max {
                break;
            }
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("manifest") {
                continue;
            }
            let named: Option<FileId> = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse().ok());
            if named.is_some_and(|id| known.contains(&id)) {
                continue;
            }
            match self.load_one(&path) {
                Ok(f) if named == Some(f.manifest.id()) => out.push(f),
                Ok(_) => {
                    tracing::warn!(path = %path.display(), "manifest under a wrong name; skipped")
                }
                Err(e) => tracing::warn!(error = %e, "skipping stored manifest"),
            }
        }
        out
    }

    fn load_one(&self, path: &Path) -> Result<StoredFile, RegistryError> {
        let bytes = fs::read(path).map_err(io_err(path))?;
        let damaged = |reason: String| RegistryError::Damaged {
            path: path.to_path_buf(),
            reason,
        };
        let m: Manifest = codec::decode(&bytes, shoal_protocol::limits::MAX_MANIFEST_FILE)
            .map_err(|e| damaged(e.to_string()))?;
        let m = m.verify(None).map_err(|e| damaged(e.to_string()))?;
        let id = m.id();
        Ok(StoredFile {
            complete: self.complete_path(&id).exists(),
            path: self.data_path(&id),
            manifest: Arc::new(m),
        })
    }

    /// Registers the local file at `src` as published by the master itself: hashes it,
    /// signs and countersigns the manifest with `key`, copies the bytes into the data
    /// directory. Returns the manifest.
    pub fn add_local(&self, src: &Path, key: &Keypair) -> Result<VerifiedManifest, RegistryError> {
        self.add_local_in_blocks(src, key, None)
    }

    /// [`Registry::add_local`] with blocks of `block_size` bytes (`None`: chosen for the
    /// file's size). The simulator uses it to give a file the block size of its scenario.
    pub fn add_local_in_blocks(
        &self,
        src: &Path,
        key: &Keypair,
        block_size: Option<u32>,
    ) -> Result<VerifiedManifest, RegistryError> {
        let builder = hash_file(src, block_size)?;
        let name = shoal_protocol::manifest::name_for(src);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let (body, digests) = builder.finish(
            name,
            key.public().encode_protobuf(),
            key.public().to_peer_id(),
            now,
        );
        let header = body.sign(key)?.countersign(key)?;
        let m = Manifest { header, digests }.verify(None)?;
        let dst = self.data_path(&m.id());
        let tmp = dst.with_extension("copying");
        fs::copy(src, &tmp).map_err(io_err(src))?;
        fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .and_then(|_| fs::rename(&tmp, &dst))
            .map_err(io_err(&dst))?;
        // Marker first, manifest last: a running master's rescan that finds the manifest
        // finds the file complete.
        self.mark_complete(&m.id())?;
        self.save_manifest(&m)?;
        Ok(m)
    }

    /// The blocks of a stored file present on disk: all of them when complete; otherwise
    /// those that pass their digest (a pull resumes with the rest). Reads the file: run it
    /// off the event loop.
    pub fn held_blocks(f: &StoredFile) -> Blocks {
        if f.complete {
            Blocks::full(f.manifest.blocks())
        } else {
            verified_blocks(&f.manifest, &f.path)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_local_survives_reopen_and_keeps_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.bin");
        fs::write(&src, vec![5u8; 200_000]).unwrap();
        let reg = Registry::open(&dir.path().join("data")).unwrap();
        let key = reg.key().unwrap();
        let m = reg.add_local(&src, &key).unwrap();
        let reg2 = Registry::open(&dir.path().join("data")).unwrap();
        assert_eq!(reg2.key().unwrap().public(), key.public());
        let all = reg2.load_all().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].manifest.id(), m.id());
        assert!(all[0].complete);
        assert_eq!(fs::read(&all[0].path).unwrap(), vec![5u8; 200_000]);
    }

    #[test]
    fn add_local_in_blocks_uses_the_block_size_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.bin");
        fs::write(&src, vec![5u8; 200_000]).unwrap();
        let reg = Registry::open(&dir.path().join("data")).unwrap();
        let key = reg.key().unwrap();
        let chosen = reg.add_local(&src, &key).unwrap();
        let small = reg
            .add_local_in_blocks(&src, &key, Some(16 * 1024))
            .unwrap();
        assert_ne!(chosen.geometry().block_size, 16 * 1024);
        assert_eq!(small.geometry().block_size, 16 * 1024);
        assert_eq!(small.blocks(), 13);
        // A size the manifest does not allow is an error, not a silent change.
        assert!(reg.add_local_in_blocks(&src, &key, Some(1000)).is_err());
    }

    #[test]
    fn the_key_is_private_and_a_rescan_sees_only_new_complete_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(&dir.path().join("data")).unwrap();
        let key = reg.key().unwrap();
        let mode = fs::metadata(dir.path().join("data/identity.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let src = dir.path().join("src.bin");
        fs::write(&src, vec![7u8; 100_000]).unwrap();
        let m = reg.add_local(&src, &key).unwrap();
        // The manifest is the commit point: whoever sees it sees the file complete.
        let found = reg.scan_new(&HashSet::new(), 10);
        assert_eq!(found.len(), 1);
        assert!(found[0].complete);
        // Known names are skipped without being read (even if damaged since).
        fs::write(reg.manifest_path(&m.id()), b"garbage").unwrap();
        assert!(reg.scan_new(&HashSet::from([m.id()]), 10).is_empty());
    }

    #[test]
    fn a_partial_data_file_keeps_its_good_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(&dir.path().join("data")).unwrap();
        let key = reg.key().unwrap();
        let src = dir.path().join("src.bin");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        fs::write(&src, &data).unwrap();
        let m = reg.add_local(&src, &key).unwrap();
        let path = reg.data_path(&m.id());
        assert!(whole_file_matches(&m, &path).unwrap());
        // Damage block 1 and cut the file inside the last block.
        let bs = m.body().block_size as u64;
        let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff], bs + 3).unwrap();
        f.set_len(m.body().size - 1).unwrap();
        let have = verified_blocks(&m, &path);
        assert!(have.contains(0) && !have.contains(1));
        assert!(!have.contains(m.blocks() - 1));
        assert_eq!(have.count(), m.blocks() - 2);
        assert!(!whole_file_matches(&m, &path).unwrap());
    }

    #[tokio::test]
    async fn the_writer_keeps_the_last_write_of_each_path_and_ends_with_its_handles() {
        let dir = tempfile::tempdir().unwrap();
        let (w, task) = DiskWriter::spawn_task();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        for i in 0..100u32 {
            w.write(a.clone(), i.to_string().into_bytes());
        }
        w.write(b.clone(), b"b".to_vec());
        w.flush().await;
        assert_eq!(fs::read(&a).unwrap(), b"99");
        assert_eq!(fs::read(&b).unwrap(), b"b");
        // Dropping the last handle flushes what is pending and ends the task.
        let other = w.clone();
        w.write(a.clone(), b"last".to_vec());
        drop(w);
        drop(other);
        tokio::time::timeout(std::time::Duration::from_secs(10), task)
            .await
            .expect("the writer task ends once its handles are gone")
            .unwrap();
        assert_eq!(fs::read(&a).unwrap(), b"last");
    }

    #[test]
    fn a_damaged_manifest_is_skipped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path()).unwrap();
        fs::write(dir.path().join("manifests/x.manifest"), b"garbage").unwrap();
        assert!(reg.load_all().unwrap().is_empty());
    }
}
