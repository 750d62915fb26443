//! Piece serving: the master's files as a [`PieceSource`] for the shared piece server
//! ([`shoal_net::serve`], the same one nodes run: upload slots, `Busy` when full, request
//! deadline, `BadRange`, an overall deadline with a minimum rate, disk reads on the blocking
//! pool). This module only says what the master holds and whom it refuses.

use std::{
    collections::{HashMap, HashSet},
    fs,
    os::unix::fs::FileExt,
    path::PathBuf,
    sync::{Arc, Mutex, OnceLock},
};

use libp2p::PeerId;
use shoal_net::serve::{BlockReader, PieceSource, Serve};
use shoal_protocol::{
    block::Blocks,
    wire::{PieceRequest, RefuseReason},
    FileId, VerifiedManifest,
};
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::service::Internal;

/// Files the master can serve and the peers it refuses, shared by the event loop (which
/// writes) and the piece server (which reads).
#[derive(Default)]
pub(crate) struct Shelf {
    pub(crate) files: HashMap<FileId, ShelfEntry>,
    pub(crate) banned: HashSet<PeerId>,
}

pub(crate) struct ShelfEntry {
    pub(crate) manifest: Arc<VerifiedManifest>,
    pub(crate) path: PathBuf,
    pub(crate) have: Blocks,
    /// The data file, opened on the first read (on a blocking thread) and kept.
    pub(crate) file: Arc<OnceLock<fs::File>>,
}

impl ShelfEntry {
    pub(crate) fn new(manifest: Arc<VerifiedManifest>, path: PathBuf, have: Blocks) -> Self {
        Self {
            manifest,
            path,
            have,
            file: Arc::default(),
        }
    }
}

/// The master's side of the piece server.
pub(crate) struct MasterSource {
    pub(crate) shelf: Arc<Mutex<Shelf>>,
    pub(crate) metrics: Metrics,
    pub(crate) internal: mpsc::Sender<Internal>,
}

impl PieceSource for MasterSource {
    fn open(&self, peer: &PeerId, req: &PieceRequest) -> Result<Serve, RefuseReason> {
        let shelf = self.shelf.lock().map_err(|_| RefuseReason::Busy)?;
        if shelf.banned.contains(peer) {
            return Err(RefuseReason::Banned);
        }
        let e = shelf
            .files
            .get(&req.file)
            .ok_or(RefuseReason::UnknownFile)?;
        let geometry = e.manifest.geometry();
        if req.range.is_empty() || req.range.end > geometry.blocks() {
            return Err(RefuseReason::BadRange);
        }
        if !e.have.contains_range(req.range) {
            return Err(RefuseReason::NotHeld);
        }
        Ok(Serve {
            geometry,
            range: req.range,
            blocks: Arc::new(DataFile {
                path: e.path.clone(),
                file: e.file.clone(),
                geometry,
            }),
            stall: false,
        })
    }

    fn served(&self, _peer: &PeerId, file: &FileId, bytes: u64) {
        self.metrics.piece_bytes_sent.inc_by(bytes);
        // Statistics only: dropped when the loop is behind.
        let _ = self
            .internal
            .try_send(Internal::Served { file: *file, bytes });
    }
}

/// Reads blocks of one of the master's data files (on the server's blocking threads).
struct DataFile {
    path: PathBuf,
    file: Arc<OnceLock<fs::File>>,
    geometry: shoal_protocol::block::Geometry,
}

impl BlockReader for DataFile {
    fn read_block(&self, block: u32, buf: &mut [u8]) -> std::io::Result<()> {
        let f = match self.file.get() {
            Some(f) => f,
            None => {
                let opened = fs::File::open(&self.path)?;
                self.file.get_or_init(|| opened)
            }
        };
        f.read_exact_at(buf, self.geometry.offset(block))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_protocol::block::BlockRange;

    fn source_with(
        have: Blocks,
        banned: Option<PeerId>,
    ) -> (MasterSource, FileId, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("f");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(&src, &data).unwrap();
        let reg = crate::registry::Registry::open(&dir.path().join("data")).unwrap();
        let key = reg.key().unwrap();
        let m = Arc::new(reg.add_local(&src, &key).unwrap());
        let id = m.id();
        let mut shelf = Shelf::default();
        shelf
            .files
            .insert(id, ShelfEntry::new(m, reg.data_path(&id), have));
        shelf.banned.extend(banned);
        let (tx, _rx) = mpsc::channel(1);
        (
            MasterSource {
                shelf: Arc::new(Mutex::new(shelf)),
                metrics: Metrics::new(),
                internal: tx,
            },
            id,
            dir,
        )
    }

    fn req(file: FileId, start: u32, end: u32) -> PieceRequest {
        PieceRequest {
            file,
            range: BlockRange::new(start, end),
        }
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let p = PeerId::random();
        let banned = PeerId::random();
        let (s, id, _d) = source_with(Blocks::new(0), Some(banned));
        let blocks = s.shelf.lock().unwrap().files[&id].manifest.blocks();
        assert!(blocks > 2);
        let mut half = Blocks::new(blocks);
        half.insert(0);
        s.shelf.lock().unwrap().files.get_mut(&id).unwrap().have = half;
        assert!(matches!(
            s.open(&banned, &req(id, 0, 1)),
            Err(RefuseReason::Banned)
        ));
        assert!(matches!(
            s.open(&p, &req(FileId([9; 32]), 0, 1)),
            Err(RefuseReason::UnknownFile)
        ));
        assert!(matches!(
            s.open(&p, &req(id, 0, blocks + 1)),
            Err(RefuseReason::BadRange)
        ));
        assert!(matches!(
            s.open(&p, &req(id, 1, 1)),
            Err(RefuseReason::BadRange)
        ));
        assert!(matches!(
            s.open(&p, &req(id, 0, 2)),
            Err(RefuseReason::NotHeld)
        ));
        let ok = s
            .open(&p, &req(id, 0, 1))
            .map_err(|e| format!("{e:?}"))
            .unwrap();
        let mut buf = vec![0u8; ok.geometry.block_len(0)];
        ok.blocks.read_block(0, &mut buf).unwrap();
        assert_eq!(buf[..5], [0, 1, 2, 3, 4]);
    }
}
