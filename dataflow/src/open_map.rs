//! Maps from a `u64` key to a small value: open addressing with linear
//! probing, keys and values side by side.
//!
//! The workers' large maps miss the caches on nearly every lookup: the
//! window operator's card id → slot (half a million cards or more a
//! worker), and duplicate detection's event id → first copy (every id of
//! the last hour, per partition). The standard map (a SwissTable) keeps
//! its control bytes apart from its entries, two misses per lookup, and
//! gives no way to ask for a key's place before the lookup. Here a key's
//! place is one entry of a few words, which [`OpenMap::prefetch`] asks for
//! while the worker is still busy with earlier records.

/// A value an [`OpenMap`] holds, with one value of its type reserved to
/// mark a place that holds no key.
pub trait Value: Copy {
    /// The reserved value; never inserted.
    const VACANT: Self;
    /// Whether this is [`Value::VACANT`].
    fn is_vacant(&self) -> bool;
}

/// A slot of the window operator's card states; `u32::MAX` is reserved.
impl Value for u32 {
    const VACANT: Self = u32::MAX;
    #[inline]
    fn is_vacant(&self) -> bool {
        *self == u32::MAX
    }
}

/// `u64` key → `V`; at most half full.
#[derive(Clone, Debug)]
pub struct OpenMap<V> {
    /// Power-of-two length (or empty).
    entries: Vec<Entry<V>>,
    len: usize,
    /// The table grows when more than `limit / 256` of it would be full
    /// ([`OpenMap::staggered`]).
    limit: usize,
}

/// Card id → slot: 16-byte entries (the heap aligns to 16 bytes), so one
/// never straddles two cache lines.
pub type SlotMap = OpenMap<u32>;

/// One place: `value` is vacant when the place holds no key.
#[derive(Clone, Copy, Debug)]
struct Entry<V> {
    key: u64,
    value: V,
}

/// The length of the first table.
const FIRST: usize = 1024;

/// A table grows when more than this many 256ths of it would be full: half.
const HALF: usize = 128;

/// The spread of [`OpenMap::staggered`]'s limits: from [`HALF`] down by up
/// to this many 256ths (an eighth), in steps of one.
const STAGGER: usize = 32;

impl<V> Default for OpenMap<V> {
    fn default() -> Self {
        OpenMap { entries: Vec::new(), len: 0, limit: HALF }
    }
}

impl<V: Value> OpenMap<V> {
    const VACANT: Entry<V> = Entry { key: 0, value: V::VACANT };

    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty map that grows at a load of its own, between three
    /// eighths and a half, chosen by `k` (distinct for 33 consecutive `k`).
    ///
    /// Growing stops the owner while every key moves to a table twice the
    /// size. Maps that fill at the same pace, such as the partitions of one
    /// worker, would all grow at once: at 50K events/s, twelve partitions'
    /// duplicate detection, each growing from 131K ids, stopped the worker
    /// for 100-250 ms (`bench/README.md`). Staggered, each growth stops it
    /// alone.
    pub fn staggered(k: u64) -> Self {
        // 7 is coprime with the 33 limits: consecutive `k` spread over all.
        let step = (k.wrapping_mul(7) % (STAGGER as u64 + 1)) as usize;
        OpenMap { limit: HALF - step, ..Self::default() }
    }

    /// How many keys.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where `key`'s probe starts: Fibonacci hashing, the top bits of a
    /// multiplication (the workers' routing mixes ids another way, so the
    /// cards of one worker still spread over every place).
    #[inline]
    fn home(&self, key: u64) -> usize {
        let bits = self.entries.len().trailing_zeros();
        (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - bits)) as usize
    }

    /// Ask for the cache lines where a lookup of `key` starts (two where
    /// its first entry straddles a line's end).
    #[inline]
    pub fn prefetch(&self, key: u64) {
        if !self.entries.is_empty() {
            crate::prefetch::prefetch_span(&self.entries[self.home(key)]);
        }
    }

    /// Where `key` is (`Ok`), or the empty place that ends its probe
    /// (`Err`); the table must not be empty.
    #[inline]
    fn find(&self, key: u64) -> Result<usize, usize> {
        let mask = self.entries.len() - 1;
        let mut i = self.home(key);
        loop {
            let e = &self.entries[i];
            if e.value.is_vacant() {
                return Err(i);
            }
            if e.key == key {
                return Ok(i);
            }
            i = (i + 1) & mask;
        }
    }

    /// The value of `key`.
    #[inline]
    pub fn get(&self, key: u64) -> Option<V> {
        if self.entries.is_empty() {
            return None;
        }
        self.find(key).ok().map(|i| self.entries[i].value)
    }

    /// Map `key` to `value` (not [`Value::VACANT`]); the value it had, if any.
    pub fn insert(&mut self, key: u64, value: V) -> Option<V> {
        assert!(!value.is_vacant(), "the vacant value is reserved");
        if (self.len + 1) * 256 > self.entries.len() * self.limit {
            self.grow();
        }
        match self.find(key) {
            Ok(i) => Some(std::mem::replace(&mut self.entries[i].value, value)),
            Err(i) => {
                self.entries[i] = Entry { key, value };
                self.len += 1;
                None
            }
        }
    }

    /// Remove `key`; the value it had, if any.
    pub fn remove(&mut self, key: u64) -> Option<V> {
        self.remove_if(key, |_| true)
    }

    /// Remove `key` if `remove` says so of its value; the value removed, if any.
    pub fn remove_if(&mut self, key: u64, remove: impl FnOnce(&V) -> bool) -> Option<V> {
        if self.entries.is_empty() {
            return None;
        }
        let i = self.find(key).ok()?;
        let value = self.entries[i].value;
        if !remove(&value) {
            return None;
        }
        // Backward shift: each later key of the run whose probe starts at or
        // before the hole moves into it, so no lookup meets a hole before its key.
        let mask = self.entries.len() - 1;
        let mut hole = i;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let e = self.entries[j];
            if e.value.is_vacant() {
                break;
            }
            let home = self.home(e.key);
            // `e` may fill the hole unless its home lies cyclically in (hole, j].
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.entries[hole] = e;
                hole = j;
            }
        }
        self.entries[hole] = Self::VACANT;
        self.len -= 1;
        Some(value)
    }

    fn grow(&mut self) {
        let len = (self.entries.len() * 2).max(FIRST);
        let old = std::mem::replace(&mut self.entries, vec![Self::VACANT; len]);
        self.len = 0;
        for e in old.into_iter().filter(|e| !e.value.is_vacant()) {
            self.insert(e.key, e.value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Seeded random inserts, overwrites, removals and lookups over 50 to
    /// 5,050 keys (sequential ids, and ids spread over the high bits), up
    /// to half full and through several growths, so that removals shift
    /// probe runs back: always what the standard map given the same holds.
    #[test]
    fn holds_what_a_hash_map_holds() {
        let mut next = crate::seeded(0xD1B5_4A32_D192_ED03);
        for round in 0..20 {
            // Half the rounds with a staggered limit (it grows earlier).
            let map = if round % 4 < 2 { SlotMap::new() } else { SlotMap::staggered(round) };
            let (mut map, mut model) = (map, HashMap::new());
            let keys = 50 + next(5_000);
            let key = |n: u64| if round % 2 == 0 { n } else { n << 40 | n.wrapping_mul(31) };
            for _ in 0..20_000 {
                let k = key(next(keys));
                match next(4) {
                    0 | 1 => {
                        let slot = next(1 << 31) as u32;
                        assert_eq!(map.insert(k, slot), model.insert(k, slot));
                    }
                    2 => assert_eq!(map.remove(k), model.remove(&k)),
                    _ => assert_eq!(map.get(k), model.get(&k).copied()),
                }
                assert_eq!(map.len(), model.len());
            }
            for (k, slot) in &model {
                assert_eq!(map.get(*k), Some(*slot));
            }
            for n in 0..keys {
                assert_eq!(map.get(key(n)), model.get(&key(n)).copied());
            }
        }
    }

    /// Staggered maps filled alike grow at 33 different sizes, between
    /// three eighths and a half of their table, and never fuller than half.
    #[test]
    fn staggered_maps_grow_at_sizes_of_their_own() {
        let mut grown_at = Vec::new();
        for k in 0..33 {
            let mut map = SlotMap::staggered(k);
            let mut table = 0;
            for key in 0..4_096u64 {
                map.insert(key, key as u32);
                assert!(map.len() * 2 <= map.entries.len(), "at most half full");
                if map.entries.len() != table {
                    table = map.entries.len();
                    if table == 4 * FIRST {
                        // Grown from 2 x FIRST on this key, the first past its limit.
                        grown_at.push(map.len());
                    }
                }
            }
            for key in 0..4_096u64 {
                assert_eq!(map.get(key), Some(key as u32));
            }
        }
        let (lowest, highest) = (2 * FIRST * 3 / 8, 2 * FIRST / 2);
        assert!(grown_at.iter().all(|n| (lowest + 1..=highest + 1).contains(n)), "{grown_at:?}");
        grown_at.sort_unstable();
        grown_at.dedup();
        assert_eq!(grown_at.len(), 33, "every k its own size");
    }

    /// Keys whose probes start at the same place, and at the table's last
    /// place (their run wraps around to the first): removing any one of
    /// them, in every order, leaves every other one found.
    #[test]
    fn removals_keep_colliding_and_wrapping_runs_whole() {
        let table = SlotMap { entries: vec![SlotMap::VACANT; FIRST], ..SlotMap::new() };
        let with_home = |home: usize, n: usize| -> Vec<u64> {
            (0u64..).filter(|k| table.home(*k) == home).take(n).collect()
        };
        for homes in [[5, 6], [FIRST - 1, 0]] {
            let mut keys = with_home(homes[0], 4);
            keys.extend(with_home(homes[1], 2));
            // Every order of removal of the six, as a permutation index.
            for order in 0..720usize {
                let mut map = SlotMap::new();
                for (i, k) in keys.iter().enumerate() {
                    map.insert(*k, i as u32);
                }
                assert_eq!(map.entries.len(), FIRST, "no growth: the runs stay as built");
                let (mut left, mut code) = (keys.clone(), order);
                while !left.is_empty() {
                    let k = left.remove(code % left.len());
                    code /= left.len() + 1;
                    let i = keys.iter().position(|x| *x == k).unwrap();
                    assert_eq!(map.remove(k), Some(i as u32));
                    assert_eq!(map.get(k), None);
                    for other in &left {
                        let j = keys.iter().position(|x| x == other).unwrap();
                        assert_eq!(map.get(*other), Some(j as u32), "{other} after removing {k}");
                    }
                }
                assert!(map.is_empty());
            }
        }
    }

    /// A conditional removal removes only what its condition accepts.
    #[test]
    fn remove_if_removes_only_what_it_is_told_to() {
        let mut map = SlotMap::new();
        map.insert(9, 4);
        assert_eq!(map.remove_if(9, |v| *v == 5), None);
        assert_eq!(map.get(9), Some(4));
        assert_eq!(map.remove_if(9, |v| *v == 4), Some(4));
        assert_eq!(map.get(9), None);
        assert_eq!(map.remove_if(9, |_| true), None);
    }

    /// The extremes of the key range are keys like any other.
    #[test]
    fn every_u64_is_a_key() {
        let mut map = SlotMap::new();
        assert_eq!(map.get(0), None);
        assert_eq!(map.remove(0), None);
        for (i, k) in [0, u64::MAX, 1, u64::MAX - 1].into_iter().enumerate() {
            assert_eq!(map.insert(k, i as u32), None);
        }
        assert_eq!(map.get(u64::MAX), Some(1));
        assert_eq!(map.remove(0), Some(0));
        assert_eq!(map.get(0), None);
        assert_eq!(map.get(u64::MAX - 1), Some(3));
    }
}
