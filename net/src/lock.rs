//! Data-directory locks: one process per data directory.
//!
//! Two processes sharing a data dir would write the same journals, output files and
//! `bootstrap.addr`, and hang or fail in ways that name no cause. [`lock_data_dir`] takes an
//! exclusive advisory lock (`flock`) on `DIR/lock` and writes the holder's process id into it;
//! a second process fails at once with "data dir DIR is in use by process N". The kernel drops
//! the lock when the holder exits, however it exits (SIGKILL included), so a stale lock file
//! never blocks anyone.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read, Seek, Write},
    path::{Path, PathBuf},
};

/// The lock file's name inside a data dir.
pub const LOCK_FILE: &str = "lock";

/// Why a data dir could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock.
    #[error("data dir {} is in use by {}", dir.display(), holder.map_or("another process".to_string(), |p| format!("process {p}")))]
    InUse {
        /// The data dir.
        dir: PathBuf,
        /// The holder's process id, if it could be read.
        holder: Option<u32>,
    },
    /// Creating or locking the file failed.
    #[error("locking data dir {}: {source}", dir.display())]
    Io {
        /// The data dir.
        dir: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// An exclusive lock on a data dir, held until dropped (or the process exits).
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
    dir: PathBuf,
}

impl DataDirLock {
    /// The locked directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Creates `dir` if needed and locks it for this process.
pub fn lock_data_dir(dir: &Path) -> Result<DataDirLock, LockError> {
    let io_err = |source| LockError::Io {
        dir: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io_err)?;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(LOCK_FILE))
        .map_err(io_err)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = (&file).take(32).read_to_string(&mut text);
            return Err(LockError::InUse {
                dir: dir.to_path_buf(),
                holder: text.trim().parse().ok(),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io_err(e)),
    }
    file.set_len(0).map_err(io_err)?;
    file.rewind().map_err(io_err)?;
    writeln!(file, "{}", std::process::id()).map_err(io_err)?;
    Ok(DataDirLock {
        _file: file,
        dir: dir.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_names_the_holder_and_a_dropped_lock_frees_the_dir() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("data");
        let first = lock_data_dir(&dir).expect("first lock");
        assert_eq!(first.dir(), dir);
        let text = std::fs::read_to_string(dir.join(LOCK_FILE)).expect("lock file");
        assert_eq!(text.trim(), std::process::id().to_string());
        let err = lock_data_dir(&dir).expect_err("second lock");
        assert!(
            matches!(err, LockError::InUse { holder: Some(p), .. } if p == std::process::id()),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "data dir {} is in use by process {}",
                dir.display(),
                std::process::id()
            )
        );
        drop(first);
        lock_data_dir(&dir).expect("lock after the holder let go");
    }
}
