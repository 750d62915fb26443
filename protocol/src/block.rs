//! Blocks, block ranges, block digests and block sets.
//!
//! A block is the unit of verification: a fixed-size slice of the file (the last one may be
//! shorter) with its own SHA-256 digest. A [`BlockRange`] is a piece: a contiguous run of
//! blocks, the unit of transfer and redirection.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Multihash code of SHA2-256.
pub const SHA2_256: u64 = 0x12;

/// The SHA-256 digest of one block.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlockDigest(pub [u8; 32]);

impl BlockDigest {
    /// Digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(Sha256::digest(data).into())
    }

    /// This digest as a multihash (SHA2-256).
    pub fn to_multihash(&self) -> multihash::Multihash<64> {
        // A 32-byte digest always fits in 64 bytes, so wrap cannot fail.
        multihash::Multihash::wrap(SHA2_256, &self.0).unwrap_or_default()
    }
}

impl std::fmt::Debug for BlockDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", hex::encode(&self.0[..8]))
    }
}

/// Alignment of [`AlignedBuf`]: what `O_DIRECT` asks of a buffer, an offset and a length on
/// the disks and file systems we meet (their logical sectors are 512 or 4096 bytes).
pub const DIRECT_IO_ALIGN: usize = 4096;

/// A zeroed byte buffer whose first byte sits on a [`DIRECT_IO_ALIGN`] boundary, so that a
/// block received into it (or read into it for serving) can go to or come from the disk with
/// `O_DIRECT`, past the page cache and without a copy. Safe code: it over-allocates by less
/// than one alignment unit and starts at the first aligned byte.
pub struct AlignedBuf {
    bytes: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes, aligned.
    pub fn zeroed(len: usize) -> Self {
        let bytes = vec![0u8; len.saturating_add(DIRECT_IO_ALIGN - 1)];
        // `align_offset` of a u8 pointer is always below the alignment, so this stays within.
        let start = bytes.as_ptr().align_offset(DIRECT_IO_ALIGN);
        Self { bytes, start, len }
    }

    /// Its length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + self.len]
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

/// Whether `data` may be written or read with `O_DIRECT` at `offset`: its start, its length
/// and the offset all on [`DIRECT_IO_ALIGN`] boundaries.
pub fn direct_io_aligned(data: &[u8], offset: u64) -> bool {
    data.as_ptr().align_offset(DIRECT_IO_ALIGN) == 0
        && data.len().is_multiple_of(DIRECT_IO_ALIGN)
        && offset.is_multiple_of(DIRECT_IO_ALIGN as u64)
}

/// A half-open range of block indices `[start, end)`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub struct BlockRange {
    /// First block of the range.
    pub start: u32,
    /// One past the last block of the range.
    pub end: u32,
}

impl BlockRange {
    /// The range `[start, end)`. An inverted range is empty.
    pub fn new(start: u32, end: u32) -> Self {
        Self {
            start,
            end: end.max(start),
        }
    }

    /// Number of blocks in the range.
    pub fn len(&self) -> u32 {
        self.end.saturating_sub(self.start)
    }

    /// Whether the range has no blocks.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `block` lies in the range.
    pub fn contains(&self, block: u32) -> bool {
        self.start <= block && block < self.end
    }

    /// The blocks of the range.
    pub fn iter(&self) -> std::ops::Range<u32> {
        self.start..self.end
    }
}

impl std::fmt::Debug for BlockRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

/// Where blocks sit in a file of `size` bytes cut into `block_size` blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// File size in bytes.
    pub size: u64,
    /// Block size in bytes.
    pub block_size: u32,
}

impl Geometry {
    /// Number of blocks.
    pub fn blocks(&self) -> u32 {
        let bs = u64::from(self.block_size.max(1));
        u32::try_from(self.size.div_ceil(bs)).unwrap_or(u32::MAX)
    }

    /// Byte offset of `block`.
    pub fn offset(&self, block: u32) -> u64 {
        u64::from(block) * u64::from(self.block_size)
    }

    /// Length in bytes of `block` (the last block may be short; past the end it is 0).
    pub fn block_len(&self, block: u32) -> usize {
        let start = self.offset(block);
        let end = (start + u64::from(self.block_size)).min(self.size);
        usize::try_from(end.saturating_sub(start)).unwrap_or(0)
    }

    /// Total bytes of the blocks in `range`.
    pub fn range_bytes(&self, range: BlockRange) -> u64 {
        if range.is_empty() {
            return 0;
        }
        let start = self.offset(range.start).min(self.size);
        let end = self.offset(range.end).min(self.size);
        end - start
    }

    /// The whole file as one range.
    pub fn all(&self) -> BlockRange {
        BlockRange::new(0, self.blocks())
    }
}

/// A fixed-size set of block indices (a bitfield).
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Blocks {
    words: Vec<u64>,
    len: u32,
    count: u32,
}

impl Blocks {
    /// An empty set over `len` blocks.
    pub fn new(len: u32) -> Self {
        Self {
            words: vec![0; (len as usize).div_ceil(64)],
            len,
            count: 0,
        }
    }

    /// A full set over `len` blocks.
    pub fn full(len: u32) -> Self {
        let mut b = Self::new(len);
        b.insert_range(BlockRange::new(0, len));
        b
    }

    /// Number of blocks the set ranges over.
    pub fn capacity(&self) -> u32 {
        self.len
    }

    /// Number of blocks in the set.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Whether every block is in the set.
    pub fn is_full(&self) -> bool {
        self.count == self.len
    }

    /// Whether `block` is in the set (false past the end).
    pub fn contains(&self, block: u32) -> bool {
        block < self.len && self.words[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    /// Adds `block`; returns whether it was new. Blocks past the end are ignored.
    pub fn insert(&mut self, block: u32) -> bool {
        if block >= self.len || self.contains(block) {
            return false;
        }
        self.words[(block / 64) as usize] |= 1 << (block % 64);
        self.count += 1;
        true
    }

    /// Removes `block`; returns whether it was present.
    pub fn remove(&mut self, block: u32) -> bool {
        if !self.contains(block) {
            return false;
        }
        self.words[(block / 64) as usize] &= !(1 << (block % 64));
        self.count -= 1;
        true
    }

    /// Adds every block of `range` that lies within the set's capacity; returns how many
    /// were new.
    pub fn insert_range(&mut self, range: BlockRange) -> u32 {
        range.iter().filter(|&b| self.insert(b)).count() as u32
    }

    /// Whether every block of `range` is in the set.
    pub fn contains_range(&self, range: BlockRange) -> bool {
        range.end <= self.len && range.iter().all(|b| self.contains(b))
    }

    /// Adds every block of `other` (a word at a time; blocks past this set's capacity are
    /// ignored).
    pub fn union_with(&mut self, other: &Blocks) {
        let full_words = (self.len / 64) as usize;
        let mut count = 0u32;
        for (i, w) in self.words.iter_mut().enumerate() {
            if let Some(o) = other.words.get(i) {
                *w |= o;
            }
            if i >= full_words {
                // The last, partial word: keep only blocks below `len`.
                let bits = self.len % 64;
                if bits > 0 {
                    *w &= (1u64 << bits) - 1;
                } else {
                    *w = 0;
                }
            }
            count += w.count_ones();
        }
        self.count = count;
    }

    /// The blocks in the set, as maximal ranges.
    pub fn ranges(&self) -> Vec<BlockRange> {
        runs(0..self.len, |b| self.contains(b))
    }

    /// The blocks not in the set, as maximal ranges.
    pub fn missing(&self) -> Vec<BlockRange> {
        runs(0..self.len, |b| !self.contains(b))
    }
}

impl std::fmt::Debug for Blocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Blocks({}/{} {:?})", self.count, self.len, self.ranges())
    }
}

/// Maximal runs of consecutive indices in `over` for which `pred` holds.
pub fn runs(over: std::ops::Range<u32>, mut pred: impl FnMut(u32) -> bool) -> Vec<BlockRange> {
    let mut out = Vec::new();
    let mut start = None;
    for b in over.clone() {
        match (pred(b), start) {
            (true, None) => start = Some(b),
            (false, Some(s)) => {
                out.push(BlockRange::new(s, b));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push(BlockRange::new(s, over.end));
    }
    out
}

/// Ranges from a peer made safe to walk: each clamped to `[0, blocks)`, empty ones dropped,
/// at most `max_ranges` of them considered, sorted and merged so that no block appears twice.
/// Costs O(n log n) in the number of ranges, never in the number of blocks they name, so
/// 4,096 copies of the full range cost no more than 4,096 small ones.
pub fn normalize(ranges: &[BlockRange], blocks: u32, max_ranges: usize) -> Vec<BlockRange> {
    let mut v: Vec<BlockRange> = ranges
        .iter()
        .take(max_ranges)
        .map(|r| BlockRange {
            start: r.start.min(blocks),
            end: r.end.min(blocks),
        })
        .filter(|r| r.start < r.end)
        .collect();
    v.sort_unstable_by_key(|r| (r.start, r.end));
    let mut out: Vec<BlockRange> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_aligned_buffer_starts_on_the_boundary_whatever_its_length() {
        for len in [0, 1, 4095, 4096, 65536, 65536 + 7] {
            let mut b = AlignedBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % DIRECT_IO_ALIGN, 0, "len {len}");
            assert!(b.iter().all(|&x| x == 0));
            b.iter_mut().for_each(|x| *x = 7);
            assert!(b.iter().all(|&x| x == 7));
        }
        let b = AlignedBuf::zeroed(3 * 4096);
        assert!(direct_io_aligned(&b, 8192));
        assert!(direct_io_aligned(&b[4096..], 0));
        assert!(!direct_io_aligned(&b, 100), "offset off the boundary");
        assert!(!direct_io_aligned(&b[..4000], 0), "length off the boundary");
        assert!(!direct_io_aligned(&b[1..4097], 0), "start off the boundary");
    }

    #[test]
    fn union_is_a_set_union_within_capacity() {
        let mut a = Blocks::new(130);
        a.insert_range(BlockRange::new(0, 3));
        let mut b = Blocks::new(200);
        b.insert_range(BlockRange::new(2, 5));
        b.insert_range(BlockRange::new(120, 200));
        a.union_with(&b);
        assert_eq!(a.count(), 5 + 10);
        assert_eq!(
            a.ranges(),
            vec![BlockRange::new(0, 5), BlockRange::new(120, 130)]
        );
        let mut c = Blocks::new(64);
        c.union_with(&Blocks::full(64));
        assert!(c.is_full());
    }

    #[test]
    fn normalize_merges_clamps_and_caps() {
        let r = |a, b| BlockRange { start: a, end: b };
        let full = vec![r(0, u32::MAX); 4096];
        assert_eq!(normalize(&full, 100, 4096), vec![r(0, 100)]);
        assert_eq!(
            normalize(
                &[r(5, 9), r(0, 3), r(8, 12), r(50, 40), r(200, 300)],
                100,
                10
            ),
            vec![r(0, 3), r(5, 12)]
        );
        assert_eq!(normalize(&[r(0, 1), r(2, 3)], 100, 1), vec![r(0, 1)]);
    }

    #[test]
    fn geometry_of_a_short_last_block() {
        let g = Geometry {
            size: 10 * 1024 + 5,
            block_size: 1024,
        };
        assert_eq!(g.blocks(), 11);
        assert_eq!(g.block_len(10), 5);
        assert_eq!(g.block_len(11), 0);
        assert_eq!(g.range_bytes(BlockRange::new(9, 11)), 1029);
        assert_eq!(g.range_bytes(g.all()), g.size);
    }

    proptest! {
        #[test]
        fn ranges_and_missing_partition_the_set(len in 0u32..300, picks in proptest::collection::vec(0u32..300, 0..100)) {
            let mut b = Blocks::new(len);
            for p in &picks { b.insert(*p); }
            let have: u32 = b.ranges().iter().map(|r| r.len()).sum();
            let miss: u32 = b.missing().iter().map(|r| r.len()).sum();
            prop_assert_eq!(have, b.count());
            prop_assert_eq!(have + miss, len);
            for r in b.ranges() { prop_assert!(b.contains_range(r)); }
        }

        #[test]
        fn normalize_names_the_same_blocks_once(blocks in 0u32..500, raw in proptest::collection::vec((any::<u32>(), any::<u32>()), 0..40)) {
            let ranges: Vec<BlockRange> = raw.iter().map(|(a, b)| BlockRange { start: *a % 600, end: *b % 600 }).collect();
            let mut expect = Blocks::new(blocks);
            for r in &ranges { for b in r.start..r.end.min(blocks) { expect.insert(b); } }
            let n = normalize(&ranges, blocks, usize::MAX);
            let mut got = Blocks::new(blocks);
            for w in n.windows(2) { prop_assert!(w[0].end < w[1].start); }
            for r in &n { prop_assert!(r.end <= blocks && !r.is_empty()); got.insert_range(*r); }
            prop_assert_eq!(got.ranges(), expect.ranges());
        }
    }
}
