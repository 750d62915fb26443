//! Fuzzing the node's journal reader through [`PieceStore::open`] (the only way in): random
//! journal bytes never panic, never make the store hold a block outside the file, and leave the
//! journal aligned for later appends; journaled blocks whose bytes on disk fail their digest are
//! not trusted on resume.

use std::{collections::BTreeSet, sync::Arc};

use libp2p::identity::Keypair;
use proptest::prelude::*;
use shoal_node::store::PieceStore;
use shoal_protocol::{manifest::ManifestBuilder, Manifest, VerifiedManifest};

const BLOCK: usize = 4096;
const BLOCKS: u32 = 9;

fn file_bytes() -> Vec<u8> {
    (0..BLOCK * BLOCKS as usize - 100)
        .map(|i| (i * 7 % 253) as u8)
        .collect()
}

fn manifest(data: &[u8]) -> Arc<VerifiedManifest> {
    let k = Keypair::ed25519_from_bytes([3; 32]).expect("key");
    let mut b = ManifestBuilder::new(BLOCK as u32);
    b.update(data);
    let (body, digests) = b.finish(
        "journal.bin".into(),
        k.public().encode_protobuf(),
        k.public().to_peer_id(),
        0,
    );
    let header = body
        .sign(&k)
        .expect("sign")
        .countersign(&k)
        .expect("countersign");
    Arc::new(Manifest { header, digests }.verify(None).expect("valid"))
}

/// A journal: arbitrary bytes, or entries that are mostly plausible block indices.
fn journal() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..256),
        (
            proptest::collection::vec(
                prop_oneof![0..BLOCKS + 3, any::<u32>(), Just(u32::MAX)],
                0..64
            ),
            0..4usize
        )
            .prop_map(|(entries, torn)| {
                let mut b: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
                b.extend(std::iter::repeat_n(0xab, torn));
                b
            }),
    ]
}

fn held(s: &PieceStore) -> BTreeSet<u32> {
    (0..BLOCKS).filter(|b| s.have().contains(*b)).collect()
}

proptest! {
    #[test]
    fn any_journal_opens_without_panic_and_holds_only_blocks_of_the_file(j in journal()) {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = file_bytes();
        let m = manifest(&data);
        let (out, jpath) = (dir.path().join("out"), dir.path().join("journal"));
        std::fs::write(&out, &data).expect("data");
        std::fs::write(&jpath, &j).expect("journal");
        let s = PieceStore::open(m.clone(), &out, &jpath).expect("a journal never fails the open");
        let have = s.have();
        prop_assert!(have.count() <= BLOCKS);
        prop_assert_eq!(have.capacity(), BLOCKS);
        let listed: BTreeSet<u32> = j
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        for b in held(&s) {
            prop_assert!(listed.contains(&b), "block {b} held but not journaled");
        }
        let first = held(&s);
        drop(s);
        let len = std::fs::metadata(&jpath).expect("journal kept").len();
        prop_assert_eq!(len % 4, 0, "a torn entry is cut so that appends stay aligned");
        // Reopening reads the same journal to the same set.
        let s = PieceStore::open(m, &out, &jpath).expect("reopen");
        prop_assert_eq!(held(&s), first);
    }

    #[test]
    fn journaled_blocks_that_fail_their_digest_are_not_trusted(
        corrupt in proptest::collection::btree_set(0..BLOCKS, 1..4),
        // A journal as the store writes it: each verified block once, in the order verified.
        j in proptest::collection::btree_set(0..BLOCKS, 1..=BLOCKS as usize)
            .prop_map(|s| s.into_iter().collect::<Vec<u32>>())
            .prop_shuffle(),
    ) {
        // The journal says these blocks were verified, but the bytes on disk changed since
        // (a torn write, a disk error, someone editing the file): issue 7 item 8 asks that
        // they be re-checked on resume.
        let dir = tempfile::tempdir().expect("tempdir");
        let data = file_bytes();
        let m = manifest(&data);
        let mut on_disk = data.clone();
        for b in &corrupt {
            on_disk[*b as usize * BLOCK] ^= 0xff;
        }
        let (out, jpath) = (dir.path().join("out"), dir.path().join("journal"));
        std::fs::write(&out, &on_disk).expect("data");
        let entries: Vec<u8> = j.iter().flat_map(|e| e.to_le_bytes()).collect();
        std::fs::write(&jpath, &entries).expect("journal");
        let s = PieceStore::open(m, &out, &jpath).expect("open");
        let bad: Vec<u32> = held(&s).intersection(&corrupt).copied().collect();
        prop_assert!(bad.is_empty(), "blocks {bad:?} fail their digest on disk but are held after resume");
        for b in j.iter().filter(|b| !corrupt.contains(b)) {
            prop_assert!(s.have().contains(*b), "good journaled block {b} was dropped");
        }
    }
}
