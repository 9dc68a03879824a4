//! The refcounted table of non-zero fill words for same-filled pages.
//!
//! Owns: the words, their reference counts, and the mapping word -> index used by handles.
//! The zero word has no entry (its reference is 0); entry `i` is referenced as `i + 1`.
//! Must not touch: slabs, compression, uffd, processes, syscalls.

use std::collections::HashMap;

#[derive(Clone, Copy, Debug)]
struct Entry {
    word: u64,
    /// Pages referencing this entry; 0 means the entry is free (and on `free_idxs`).
    refs: u32,
}

/// Non-zero fill words in use, each with a count of the pages using it.
#[derive(Debug, Default)]
pub(crate) struct WordTable {
    entries: Vec<Entry>,
    idx_by_word: HashMap<u64, u32>,
    free_idxs: Vec<u32>,
}

impl WordTable {
    /// Takes a reference to `word`, adding it if new. Returns the handle's word reference:
    /// 0 for the zero word, else index + 1. `None` when the table cannot grow (2^32 - 1
    /// distinct words, or a word referenced by 2^32 - 1 pages).
    pub fn acquire(&mut self, word: u64) -> Option<u32> {
        if word == 0 {
            return Some(0);
        }
        if let Some(&idx) = self.idx_by_word.get(&word) {
            let entry = &mut self.entries[idx as usize];
            entry.refs = entry.refs.checked_add(1)?;
            return Some(idx + 1);
        }
        let idx = match self.free_idxs.pop() {
            Some(idx) => {
                self.entries[idx as usize] = Entry { word, refs: 1 };
                idx
            }
            None => {
                let idx = u32::try_from(self.entries.len())
                    .ok()
                    .filter(|&i| i < u32::MAX)?;
                self.entries.push(Entry { word, refs: 1 });
                idx
            }
        };
        self.idx_by_word.insert(word, idx);
        Some(idx + 1)
    }

    /// The word behind a reference; `None` when it names no live entry.
    pub fn word(&self, word_ref: u32) -> Option<u64> {
        if word_ref == 0 {
            return Some(0);
        }
        let entry = self.entries.get(word_ref as usize - 1)?;
        (entry.refs > 0).then_some(entry.word)
    }

    /// Drops one reference; the entry is freed with its last one. `false` when the reference
    /// names no live entry (nothing is changed then).
    pub fn release(&mut self, word_ref: u32) -> bool {
        if word_ref == 0 {
            return true;
        }
        let idx = word_ref - 1;
        let Some(entry) = self.entries.get_mut(idx as usize) else {
            return false;
        };
        if entry.refs == 0 {
            return false;
        }
        entry.refs -= 1;
        if entry.refs == 0 {
            self.idx_by_word.remove(&entry.word);
            self.free_idxs.push(idx);
        }
        true
    }

    /// Live distinct non-zero words.
    pub fn live_words(&self) -> usize {
        self.idx_by_word.len()
    }

    /// Bytes of memory this table holds (capacities, approximating the hash map's layout as
    /// key + value + one control byte per bucket).
    pub fn metadata_bytes(&self) -> u64 {
        let entries = self.entries.capacity() * std::mem::size_of::<Entry>();
        let map = self.idx_by_word.capacity()
            * (std::mem::size_of::<u64>() + std::mem::size_of::<u32>() + 1);
        let free = self.free_idxs.capacity() * std::mem::size_of::<u32>();
        (entries + map + free) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acquire_zero_word_needs_no_entry() {
        let mut t = WordTable::default();
        assert_eq!(t.acquire(0), Some(0));
        assert_eq!(t.live_words(), 0);
        assert_eq!(t.word(0), Some(0));
        assert!(t.release(0));
    }

    #[test]
    fn acquire_same_word_twice_shares_entry_until_last_release() {
        let mut t = WordTable::default();
        let a = t.acquire(7).unwrap();
        let b = t.acquire(7).unwrap();
        assert_eq!(a, b);
        assert_eq!(t.live_words(), 1);
        assert!(t.release(a));
        assert_eq!(t.word(a), Some(7));
        assert!(t.release(a));
        assert_eq!(t.word(a), None);
        assert_eq!(t.live_words(), 0);
        assert!(!t.release(a), "double release must be refused");
        // The freed index is reused.
        assert_eq!(t.acquire(9), Some(a));
    }

    #[test]
    fn word_unknown_ref_none() {
        let t = WordTable::default();
        assert_eq!(t.word(1), None);
        assert_eq!(t.word(u32::MAX), None);
    }
}
