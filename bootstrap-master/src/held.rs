//! What each holder of one file holds, by peer number.
//!
//! Each holder's [`Blocks`], and beside them the same bits in one flat array (row `n` at
//! `n * words`), so that a walk of the load index tests "does peer `n` hold block `b`" with one
//! load from one array. Through the `Blocks` alone that test was three dependent loads
//! (the row, its vector, its word) from all over the heap, and at 10,000 peers those cache
//! misses were half of the simulator's time. The price is the bits twice: one bit per block per
//! holder more.

use shoal_protocol::block::Blocks;

/// The holders of one file of `blocks` blocks and what they hold.
#[derive(Debug)]
pub(crate) struct Held {
    blocks: u32,
    /// Words per row of `bits`.
    words: usize,
    rows: Vec<Option<Blocks>>,
    /// Row `n` (`words` words) mirrors `rows[n]` (zero where it is `None`).
    bits: Vec<u64>,
}

impl Held {
    /// No holders of a file of `blocks` blocks.
    pub(crate) fn new(blocks: u32) -> Self {
        Held {
            blocks,
            words: (blocks as usize).div_ceil(64),
            rows: Vec::new(),
            bits: Vec::new(),
        }
    }

    /// What peer number `n` holds, if anything.
    pub(crate) fn get(&self, n: u32) -> Option<&Blocks> {
        self.rows.get(n as usize).and_then(Option::as_ref)
    }

    /// Whether peer number `n` holds block `b` (one load).
    pub(crate) fn holds(&self, n: u32, b: u32) -> bool {
        b < self.blocks
            && self
                .bits
                .get(n as usize * self.words + (b / 64) as usize)
                .is_some_and(|w| w & (1 << (b % 64)) != 0)
    }

    /// Peer number `n`'s bits for blocks `64 * word ..` (zero where none).
    pub(crate) fn word(&self, n: u32, word: usize) -> u64 {
        if word >= self.words {
            return 0;
        }
        self.bits
            .get(n as usize * self.words + word)
            .copied()
            .unwrap_or(0)
    }

    /// Peer numbers that hold something, with what they hold.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u32, &Blocks)> {
        self.rows
            .iter()
            .enumerate()
            .filter_map(|(n, h)| Some((n as u32, h.as_ref()?)))
    }

    /// How many peers hold something.
    pub(crate) fn holders(&self) -> usize {
        self.rows.iter().filter(|h| h.is_some()).count()
    }

    /// One past the highest peer number that ever held something here.
    pub(crate) fn numbers(&self) -> u32 {
        self.rows.len() as u32
    }

    /// Peer number `n` now holds block `b`; returns whether that is new.
    pub(crate) fn insert(&mut self, n: u32, b: u32) -> bool {
        if b >= self.blocks || !self.row(n).insert(b) {
            return false;
        }
        self.bits[n as usize * self.words + (b / 64) as usize] |= 1 << (b % 64);
        true
    }

    /// Peer number `n` holds every block now.
    pub(crate) fn set_full(&mut self, n: u32) {
        *self.row(n) = Blocks::full(self.blocks);
        let row = n as usize * self.words;
        for b in 0..self.blocks {
            self.bits[row + (b / 64) as usize] |= 1 << (b % 64);
        }
    }

    /// Peer number `n` no longer holds block `b`; returns whether it did. A row left empty
    /// is dropped.
    pub(crate) fn remove(&mut self, n: u32, b: u32) -> bool {
        let Some(row) = self.rows.get_mut(n as usize).and_then(Option::as_mut) else {
            return false;
        };
        if !row.remove(b) {
            return false;
        }
        let empty = row.count() == 0;
        self.bits[n as usize * self.words + (b / 64) as usize] &= !(1 << (b % 64));
        if empty {
            self.rows[n as usize] = None;
        }
        true
    }

    /// Peer number `n` holds nothing any more; returns what it held.
    pub(crate) fn take(&mut self, n: u32) -> Option<Blocks> {
        let held = self.rows.get_mut(n as usize)?.take()?;
        let row = n as usize * self.words;
        self.bits[row..row + self.words].fill(0);
        Some(held)
    }

    /// Row `n` to change, made (empty) if absent.
    fn row(&mut self, n: u32) -> &mut Blocks {
        let i = n as usize;
        if self.rows.len() <= i {
            self.rows.resize_with(i + 1, || None);
            self.bits.resize((i + 1) * self.words, 0);
        }
        let blocks = self.blocks;
        self.rows[i].get_or_insert_with(|| Blocks::new(blocks))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flat bits say what the rows say, after every kind of change.
    fn agrees(h: &Held) {
        for n in 0..h.numbers() + 2 {
            for b in 0..h.blocks + 2 {
                assert_eq!(
                    h.holds(n, b),
                    h.get(n).is_some_and(|r| r.contains(b)),
                    "peer {n} block {b}"
                );
            }
        }
    }

    #[test]
    fn the_flat_bits_follow_the_rows() {
        let mut h = Held::new(130);
        assert!(!h.holds(0, 0));
        assert!(h.insert(3, 0));
        assert!(h.insert(3, 129));
        assert!(!h.insert(3, 129), "already held");
        assert!(!h.insert(3, 130), "past the end");
        assert!(h.insert(1, 64));
        agrees(&h);
        assert_eq!(h.holders(), 2);
        h.set_full(0);
        agrees(&h);
        assert!(h.get(0).is_some_and(Blocks::is_full));
        assert!(h.remove(3, 0));
        assert!(!h.remove(3, 0), "no longer held");
        agrees(&h);
        assert!(h.remove(3, 129));
        assert!(h.get(3).is_none(), "an emptied row is dropped");
        agrees(&h);
        assert_eq!(h.take(0).map(|b| b.count()), Some(130));
        assert!(h.take(0).is_none());
        agrees(&h);
        assert_eq!(h.iter().map(|(n, _)| n).collect::<Vec<_>>(), vec![1]);
    }
}
