//! Clean-up applied to a corpus on its way out: redaction of personal data, normalisation for
//! near-duplicate detection, and stable pseudonyms.
//!
//! Everything here is deterministic: the same store and options give byte-identical files.

use std::collections::HashSet;

use regex::Regex;
use sha2::{Digest, Sha256};
use unicode_normalization::UnicodeNormalization;

use crate::text::hash::StableHasher;

/// Replaces personal data in text with placeholders: e-mail addresses (`<email>`), phone numbers
/// (`<phone>`), URLs that carry credentials or secret-looking query parameters (`<url>`), and
/// mentions (`<@user>`: Discord `<@123>`, `<@!123>`, `<@&123>`, `<#123>`; Telegram `@username`).
pub struct Redactor {
    email: Regex,
    secret_url: Regex,
    phone: Regex,
    discord_mention: Regex,
    at_mention: Regex,
}

impl Default for Redactor {
    fn default() -> Self {
        Self::new()
    }
}

impl Redactor {
    pub fn new() -> Self {
        let re = |p: &str| Regex::new(p).expect("redaction patterns are valid");
        Redactor {
            email: re(r"(?i)\b[a-z0-9._%+-]+@[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}\b"),
            // A URL with `user:password@`, or a query parameter whose name says it is a secret.
            secret_url: re(concat!(
                r"(?i)\b[a-z][a-z0-9+.-]*://(?:[^\s/@]+:[^\s/@]+@[^\s]*|[^\s?#]*\?[^\s]*",
                r"\b(?:token|access_token|api_?key|key|secret|password|passwd|pwd|sig|signature|",
                r"auth|code|session|sid)=[^\s]*)"
            )),
            // International (+81 90 1234 5678) and national (090-1234-5678, (555) 123-4567)
            // forms: 9 to 15 digits with the usual separators.
            phone: re(concat!(
                r"(?:\+\d{1,3}[\s.-]?)?",
                r"(?:\(\d{1,4}\)[\s.-]?\d{2,4}|\d{2,4}[\s.-]\d{2,4})[\s.-]\d{3,4}\b"
            )),
            discord_mention: re(r"<(?:@[!&]?|#)\d+>"),
            at_mention: re(r"(?:^|[^\w@.<])@([A-Za-z0-9_]{3,32})\b"),
        }
    }

    /// `text` with personal data replaced.
    pub fn redact(&self, text: &str) -> String {
        let t = self.secret_url.replace_all(text, "<url>");
        let t = self.email.replace_all(&t, "<email>");
        let t = self.phone.replace_all(&t, |c: &regex::Captures| {
            let digits = c[0].chars().filter(char::is_ascii_digit).count();
            if (9..=15).contains(&digits) {
                "<phone>".to_string()
            } else {
                c[0].to_string()
            }
        });
        let t = self.discord_mention.replace_all(&t, "<@user>");
        let t = self.at_mention.replace_all(&t, |c: &regex::Captures| {
            let whole = &c[0];
            let prefix_len = whole.len() - c[1].len() - 1;
            format!("{}<@user>", &whole[..prefix_len])
        });
        t.into_owned()
    }
}

/// Text reduced to what makes two messages "the same" for duplicate removal: Unicode NFKC
/// (full-width → half-width), lower case, punctuation and symbols dropped, whitespace collapsed.
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut space = false;
    for c in text.nfkc().flat_map(char::to_lowercase) {
        if c.is_alphanumeric() {
            if space && !out.is_empty() {
                out.push(' ');
            }
            space = false;
            out.push(c);
        } else if c.is_whitespace() {
            space = true;
        }
    }
    out
}

/// Why an example was dropped as a duplicate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Duplicate {
    /// Byte for byte the same as one written before.
    Exact,
    /// The same once normalised (case, width, punctuation, spacing).
    Normalized,
}

/// Remembers the examples seen so far by two 64-bit hashes each (16 bytes per example, so a
/// million examples cost 16 MB, not the corpus itself).
#[derive(Debug, Default)]
pub struct Dedup {
    exact: HashSet<u64>,
    normalized: HashSet<u64>,
}

impl Dedup {
    /// `None` for an example not seen before (and remembers it), else what kind of duplicate it
    /// is. An example is its sequence of (role, content).
    pub fn check<'a>(
        &mut self,
        turns: impl Iterator<Item = (&'a str, &'a str)>,
    ) -> Option<Duplicate> {
        let (mut exact, mut norm) = (StableHasher::default(), StableHasher::default());
        for (role, content) in turns {
            exact.part(role.bytes());
            exact.part(content.bytes());
            norm.part(role.bytes());
            norm.part(normalize(content).into_bytes());
        }
        if !self.exact.insert(exact.finish()) {
            return Some(Duplicate::Exact);
        }
        if !self.normalized.insert(norm.finish()) {
            return Some(Duplicate::Normalized);
        }
        None
    }
}

/// Stable pseudonyms for speakers: `user-` and ten hex digits of a keyed SHA-256 of the
/// platform and user id. The key (salt) is a secret kept in the store, so the same person gets
/// the same pseudonym in every export of that store, and nobody can recompute it from an id.
pub struct Pseudonyms {
    salt: String,
}

impl Pseudonyms {
    pub fn new(salt: impl Into<String>) -> Self {
        Pseudonyms { salt: salt.into() }
    }

    pub fn of(&self, platform: &str, user_id: &str) -> String {
        let mut h = Sha256::new();
        h.update(self.salt.as_bytes());
        h.update([0]);
        h.update(platform.as_bytes());
        h.update([0]);
        h.update(user_id.as_bytes());
        let d = h.finalize();
        // 40 bits: two of 100,000 speakers share a pseudonym with odds of about 1 in 200.
        let hex: String = d[..5].iter().map(|b| format!("{b:02x}")).collect();
        format!("user-{hex}")
    }
}

/// A fresh random salt for [`Pseudonyms`] (hex of 16 bytes from the OS's entropy, through
/// rand's ChaCha seeded from it).
pub fn new_salt() -> String {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand_chacha::ChaCha20Rng::from_os_rng();
    let mut bytes = [0u8; 16];
    rng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_covers_emails_phones_secret_urls_and_mentions() {
        let r = Redactor::new();
        let t = r.redact(
            "mail me at aki.tanaka+x@example.co.jp or call 090-1234-5678 / +1 (555) 123-4567; \
             see https://api.example.com/v1?user=3&token=abcd and https://bob:hunter2@host/x \
             but keep https://example.com/page?id=7, <@!1234> @someone_here, 2024-01-15.",
        );
        assert_eq!(
            t,
            "mail me at <email> or call <phone> / <phone>; \
             see <url> and <url> \
             but keep https://example.com/page?id=7, <@user> <@user>, 2024-01-15."
        );
    }

    #[test]
    fn normalisation_ignores_width_case_punctuation_and_spacing() {
        assert_eq!(normalize("Ｈｅｌｌｏ,  WORLD!!"), normalize("hello world"));
        assert_eq!(
            normalize("今日は　いい天気ですね。"),
            "今日は いい天気ですね"
        );
        let mut d = Dedup::default();
        assert_eq!(d.check([("user", "Hi!")].into_iter()), None);
        assert_eq!(
            d.check([("user", "Hi!")].into_iter()),
            Some(Duplicate::Exact)
        );
        assert_eq!(
            d.check([("user", "ｈｉ")].into_iter()),
            Some(Duplicate::Normalized)
        );
        assert_eq!(d.check([("assistant", "hi")].into_iter()), None);
    }

    #[test]
    fn pseudonyms_are_stable_per_salt_and_differ_across_salts() {
        let a = Pseudonyms::new("s1");
        assert_eq!(a.of("discord", "42"), a.of("discord", "42"));
        assert_ne!(a.of("discord", "42"), a.of("telegram", "42"));
        assert_ne!(
            a.of("discord", "42"),
            Pseudonyms::new("s2").of("discord", "42")
        );
        assert!(a.of("discord", "42").starts_with("user-"));
        assert_ne!(new_salt(), new_salt());
    }
}
