//! A fast, deterministic hasher for the operator's per-card maps (keys are integers, not attacker-chosen strings).

use std::hash::{BuildHasherDefault, Hasher};

/// The Fx hash of rustc: one multiply-rotate per word. SipHash's DoS
/// resistance buys nothing for integer card ids and cost a quarter of the
/// window operator's time.
#[derive(Default, Clone, Copy)]
pub struct FxHasher(u64);

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl Hasher for FxHasher {
    /// Little-endian words of 8 bytes, the last one zero-padded. The short
    /// tail is gathered byte by byte: copying it into a padded word called
    /// `memcpy` for every short field (a transaction's country and
    /// currency, and, through the default `write_u16` and `write_u32`, its
    /// category code and coordinates), a twentieth of the workers' time.
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            self.write_u64(u64::from_le_bytes(word.try_into().expect("8 bytes")));
        }
        let tail = words.remainder();
        if !tail.is_empty() {
            let word = tail.iter().rev().fold(0u64, |w, &b| (w << 8) | u64::from(b));
            self.write_u64(word);
        }
    }

    // The narrow integers as one word each, the same word `write` makes of
    // their little-endian bytes (the defaults go through `write`).
    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }

    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(SEED);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A `HashMap` with [`FxHasher`].
pub type FxHashMap<K, V> = std::collections::HashMap<K, V, BuildHasherDefault<FxHasher>>;

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash of `bytes` as zero-padded little-endian words, written out plainly.
    fn padded(bytes: &[u8]) -> u64 {
        let mut h = FxHasher::default();
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            h.write_u64(u64::from_le_bytes(word));
        }
        h.finish()
    }

    #[test]
    fn bytes_and_narrow_integers_hash_as_padded_little_endian_words() {
        let mut next = crate::seeded(7);
        for len in 0..=40 {
            let bytes: Vec<u8> = (0..len).map(|_| next(256) as u8).collect();
            let mut h = FxHasher::default();
            h.write(&bytes);
            assert_eq!(h.finish(), padded(&bytes), "{len} bytes");
        }
        for _ in 0..1000 {
            let n = next(u64::MAX);
            let written = |f: &dyn Fn(&mut FxHasher)| {
                let mut h = FxHasher::default();
                f(&mut h);
                h.finish()
            };
            assert_eq!(written(&|h| h.write_u8(n as u8)), padded(&(n as u8).to_le_bytes()));
            assert_eq!(written(&|h| h.write_u16(n as u16)), padded(&(n as u16).to_le_bytes()));
            assert_eq!(written(&|h| h.write_u32(n as u32)), padded(&(n as u32).to_le_bytes()));
        }
    }
}
