//! Provenance: who published a file and which master countersigned it, saved manifests, and
//! block-by-block checks of local copies.

use std::{fs, io, path::Path};

use shoal_protocol::{codec, limits::MAX_MANIFEST_FILE, FileId, Manifest, VerifiedManifest};

use crate::service::NodeError;

/// A human-readable account of a manifest.
pub fn describe(m: &VerifiedManifest) -> String {
    let b = m.body();
    format!(
        "file id:        {}\nname:           {}\nsize:           {} bytes ({} blocks of {} bytes)\nsha-256:        {}\npublished by:   {} (signature verified)\ncountersigned:  {} (master; signature verified)\ncreated:        {} (unix {}, publisher's clock)\n",
        m.id(),
        b.name,
        b.size,
        m.blocks(),
        b.block_size,
        hex_of(&b.file_sha256),
        m.publisher(),
        b.master,
        utc_date(b.created_unix_s),
        b.created_unix_s,
    )
}

/// `2026-11-25 14:03:07 UTC` for unix seconds (proleptic Gregorian calendar).
pub fn utc_date(unix_s: u64) -> String {
    let (days, secs) = ((unix_s / 86_400) as i64, unix_s % 86_400);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// When the local copy at `path` has the wrong size, says so ("N bytes, M expected"): every
/// block check would fail or be meaningless, and the size is the thing to report first.
pub fn wrong_size(m: &VerifiedManifest, path: &Path) -> Result<Option<String>, NodeError> {
    let have = fs::metadata(path)?.len();
    let want = m.body().size;
    Ok((have != want).then(|| {
        format!(
            "wrong size: {have} bytes, but the file is {want} bytes ({})",
            if have < want {
                "truncated or incomplete"
            } else {
                "too long"
            }
        )
    }))
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Saves a manifest (header and digest list) to `path`.
pub fn save_manifest(m: &VerifiedManifest, path: &Path) -> Result<(), NodeError> {
    let bytes = codec::encode(m.manifest()).map_err(|e| NodeError::DataDir(e.to_string()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path)?;
    Ok(())
}

/// Loads and checks a saved manifest (signatures, digest list; and the id when given).
pub fn load_manifest(
    path: &Path,
    expected: Option<&FileId>,
) -> Result<VerifiedManifest, NodeError> {
    let bytes = fs::read(path)?;
    let m: Manifest = codec::decode(&bytes, MAX_MANIFEST_FILE).map_err(|e| {
        NodeError::Io(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: not a shoal manifest: {e}", path.display()),
        ))
    })?;
    Ok(m.verify(expected)?)
}

/// Where a node keeps the manifest of `file`.
pub fn manifest_path(data_dir: &Path, file: &FileId) -> std::path::PathBuf {
    data_dir.join("manifests").join(format!("{file}.manifest"))
}

/// Checks the local copy at `path` block by block; returns the bad blocks (all of them when
/// the size is wrong).
pub fn verify_copy(m: &VerifiedManifest, path: &Path) -> Result<Vec<u32>, NodeError> {
    let f = fs::File::open(path)?;
    Ok(crate::store::verify_blocks(m, &f)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc_date(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc_date(1_764_079_387), "2025-11-25 14:03:07 UTC");
    }
    use libp2p::identity::Keypair;
    use shoal_protocol::manifest::ManifestBuilder;

    #[test]
    fn a_saved_manifest_verifies_a_copy_and_names_bad_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..50_000u32).map(|i| (i % 241) as u8).collect();
        let (p, m) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let mut b = ManifestBuilder::new(4096);
        b.update(&data);
        let (body, digests) = b.finish(
            "x".into(),
            p.public().encode_protobuf(),
            m.public().to_peer_id(),
            0,
        );
        let header = body.sign(&p).unwrap().countersign(&m).unwrap();
        let vm = Manifest { header, digests }.verify(None).unwrap();
        let mp = dir.path().join("x.manifest");
        save_manifest(&vm, &mp).unwrap();
        let back = load_manifest(&mp, Some(&vm.id())).unwrap();
        assert!(describe(&back).contains(&p.public().to_peer_id().to_string()));
        let copy = dir.path().join("copy");
        let mut bad = data.clone();
        bad[4096 * 3 + 7] ^= 1;
        bad[4096 * 9] ^= 1;
        fs::write(&copy, &bad).unwrap();
        assert_eq!(verify_copy(&back, &copy).unwrap(), vec![3, 9]);
        assert_eq!(wrong_size(&back, &copy).unwrap(), None);
        fs::write(&copy, &bad[..4096]).unwrap();
        assert_eq!(
            wrong_size(&back, &copy).unwrap().as_deref(),
            Some("wrong size: 4096 bytes, but the file is 50000 bytes (truncated or incomplete)")
        );
        fs::write(&mp, b"junk").unwrap();
        assert!(load_manifest(&mp, None).is_err());
    }
}
