//! A hash that never changes between Rust versions or runs (unlike `std::hash`), for content
//! ids and the train/validation splits.

/// FNV-1a, 64 bits: a hash that never changes between Rust versions or runs (unlike
/// `std::hash`), for content ids and the train/validation split.
pub fn stable_hash(parts: &[&str]) -> u64 {
    let mut h = StableHasher::default();
    for part in parts {
        h.part(part.bytes());
    }
    h.finish()
}

/// [`stable_hash`] fed part by part, so callers need not collect their parts first.
#[derive(Debug, Clone, Copy)]
pub struct StableHasher {
    h: u64,
    started: bool,
}

impl Default for StableHasher {
    fn default() -> Self {
        StableHasher {
            h: 0xcbf2_9ce4_8422_2325,
            started: false,
        }
    }
}

impl StableHasher {
    /// Adds one part; parts are separated so that ("ab", "c") and ("a", "bc") differ.
    pub fn part(&mut self, bytes: impl IntoIterator<Item = u8>) {
        if self.started {
            // A separator that cannot occur in UTF-8 text.
            self.byte(0xff);
        }
        self.started = true;
        for b in bytes {
            self.byte(b);
        }
    }

    fn byte(&mut self, b: u8) {
        self.h ^= u64::from(b);
        self.h = self.h.wrapping_mul(0x0100_0000_01b3);
    }

    pub fn finish(self) -> u64 {
        self.h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_hash_is_fixed_and_separates_parts() {
        assert_eq!(stable_hash(&[""]), 0xcbf2_9ce4_8422_2325);
        assert_ne!(stable_hash(&["ab", "c"]), stable_hash(&["a", "bc"]));
    }
}
