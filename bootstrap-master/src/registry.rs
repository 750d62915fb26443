//! The master's data directory: its key, the manifests it countersigned and the files it holds.
//!
//! Layout:
//! - `identity.key`: the master's keypair (protobuf), so its PeerId survives restarts;
//! - `manifests/<id>.manifest`: each countersigned manifest (codec-encoded);
//! - `files/<id>.data`: the file's bytes at their offsets, complete or being pulled;
//! - `files/<id>.complete`: present once every block of `.data` was verified;
//! - `bootstrap.addr`: the dialable addresses, one a line, rewritten as listeners come up.
//!
//! Every write is to a temporary file then renamed, so a crash leaves the old or the new
//! version, never half of one.

use std::{
    fs, io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::Arc,
};

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

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RegistryError> {
    let tmp = path.with_extension("tmp");
    let write = || -> io::Result<()> {
        let f = fs::File::create(&tmp)?;
        f.write_all_at(bytes, 0)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(io_err(path))
}

/// Loads the keypair at `path`, creating one if there is none.
pub fn load_or_create_key(path: &Path) -> Result<Keypair, RegistryError> {
    match fs::read(path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes).map_err(|e| RegistryError::Damaged {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .map_err(|e| RegistryError::Damaged {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })?;
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir).map_err(io_err(dir))?;
            }
            write_atomic(path, &bytes)?;
            Ok(key)
        }
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Hashes the file at `path` into a manifest body and digest list, streaming it.
pub fn hash_file(path: &Path) -> Result<ManifestBuilder, RegistryError> {
    let f = fs::File::open(path).map_err(io_err(path))?;
    let size = f.metadata().map_err(io_err(path))?.len();
    ManifestBuilder::hash_reader(io::BufReader::new(f), choose_block_size(size))
        .map_err(io_err(path))
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
        let builder = hash_file(src)?;
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
        self.save_manifest(&m)?;
        self.mark_complete(&m.id())?;
        Ok(m)
    }

    /// The blocks of a stored file present on disk: all of them when complete, none
    /// otherwise (an incomplete pull restarts).
    pub fn held_blocks(f: &StoredFile) -> Blocks {
        if f.complete {
            Blocks::full(f.manifest.blocks())
        } else {
            Blocks::new(f.manifest.blocks())
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
    fn a_damaged_manifest_is_skipped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path()).unwrap();
        fs::write(dir.path().join("manifests/x.manifest"), b"garbage").unwrap();
        assert!(reg.load_all().unwrap().is_empty());
    }
}
