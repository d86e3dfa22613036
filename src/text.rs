//! Words that say what a text is about, in English and Japanese: the features that
//! `derive-dialogue` pairs sentences by and that the reply engine retrieves by.
//!
//! Japanese has no spaces, so its features are character bigrams: of kanji/katakana runs (the
//! characters that carry a sentence's topic: 天気, 料理) and, for retrieval, of hiragana runs
//! too (おはよう, ありがとう are written in hiragana). English features are words without stop
//! words, lightly stemmed for retrieval so "raining" finds "rain". Also: how repetitive a text
//! is, which the suite checks replies by and the reply engine screens candidates with.

pub mod hash;
pub mod lang;

use std::collections::{BTreeSet, HashMap};

/// English words that say nothing about a topic.
/// Words are split at apostrophes, so `won't` is `won` and `t`.
const STOP_WORDS: &[&str] = &[
    "about", "again", "all", "also", "and", "any", "are", "aren", "been", "being", "but", "can",
    "could", "couldn", "did", "didn", "does", "doesn", "don", "down", "for", "from", "get", "got",
    "had", "hasn", "has", "have", "haven", "her", "here", "him", "his", "how", "into", "isn",
    "its", "just", "let", "like", "many", "may", "might", "more", "most", "much", "must", "not",
    "off", "only", "other", "our", "out", "over", "own", "same", "shall", "she", "should",
    "shouldn", "some", "such", "than", "that", "the", "their", "them", "then", "there", "these",
    "they", "this", "those", "too", "very", "was", "wasn", "were", "weren", "what", "when",
    "where", "which", "who", "whom", "whose", "why", "will", "with", "won", "would", "wouldn",
    "yes", "you", "your",
];

/// Words of one or two letters that say nothing about a topic; longer ones are in
/// [`STOP_WORDS`].
const SHORT_STOP_WORDS: &[&str] = &[
    "a", "am", "an", "as", "at", "be", "by", "do", "he", "i", "if", "in", "is", "it", "me", "my",
    "no", "of", "oh", "on", "or", "so", "to", "up", "us", "we",
];

/// Kanji (with the iteration mark) and katakana: the characters that carry a Japanese
/// sentence's topic; kana runs between them are mostly grammar.
pub fn is_content_char(c: char) -> bool {
    matches!(c, '\u{4E00}'..='\u{9FFF}' | '\u{3400}'..='\u{4DBF}' | '々' | '\u{30A1}'..='\u{30FA}' | 'ー')
}

fn is_hiragana(c: char) -> bool {
    matches!(c, '\u{3041}'..='\u{309F}')
}

/// The English content words of `text`: lower case, at least `min_len` letters, no stop words.
pub fn english_words(text: &str, min_len: usize) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_ascii_alphabetic())
        .filter(move |w| w.len() >= min_len)
        .map(str::to_ascii_lowercase)
        .filter(|w| !STOP_WORDS.contains(&w.as_str()) && !SHORT_STOP_WORDS.contains(&w.as_str()))
}

/// The bigrams of the runs of `text` whose characters satisfy `keep` (a run of one character
/// as itself when `singles`).
fn run_bigrams(text: &str, keep: fn(char) -> bool, singles: bool, out: &mut Vec<String>) {
    let chars: Vec<char> = text.chars().collect();
    for run in chars.split(|&c| !keep(c)) {
        match run.len() {
            0 => {}
            1 if singles => out.push(run[0].to_string()),
            1 => {}
            _ => out.extend(run.windows(2).map(|w| w.iter().collect::<String>())),
        }
    }
}

/// The bigrams of the kanji/katakana runs of `text` (a lone character as itself).
pub fn japanese_content_bigrams(text: &str, out: &mut Vec<String>) {
    run_bigrams(text, is_content_char, true, out);
}

/// A light English stemmer (plural, `-ing`, `-ed`, `-ly`), enough for two forms of a word to
/// meet in an index; the result need not be a word.
pub fn stem(word: &str) -> &str {
    for (suffix, keep) in [
        ("ies", 3),
        ("ing", 3),
        ("ed", 3),
        ("ly", 3),
        ("es", 3),
        ("s", 3),
    ] {
        if let Some(base) = word.strip_suffix(suffix) {
            if base.len() >= keep && !(suffix == "s" && base.ends_with('s')) {
                return base;
            }
        }
    }
    word
}

/// The retrieval terms of `text`, sorted and without repeats: stemmed English content words of
/// two letters or more, and the bigrams of Japanese kanji/katakana runs (a lone character as
/// itself) and of hiragana runs. Terms are made of letters only, so they can be joined with
/// spaces for a full-text index.
pub fn retrieval_terms(text: &str) -> Vec<String> {
    let normalized: String = unicode_normalization::UnicodeNormalization::nfkc(text).collect();
    let mut out: Vec<String> = english_words(&normalized, 2)
        .map(|w| stem(&w).to_string())
        .collect();
    japanese_content_bigrams(&normalized, &mut out);
    run_bigrams(&normalized, is_hiragana, false, &mut out);
    out.sort();
    out.dedup();
    out
}

/// Retrieval terms that place a message in time, stress it or ask ("tomorrow", "lately",
/// "really", 毎晩, 最近, 何) but seldom say what it is about: a reply that shares only these with
/// a message is rarely on its topic. English ones are stems, as [`retrieval_terms`] makes them;
/// English question words are stop words already.
const WEAK_TERMS: &[&str] = &[
    "today",
    "tonight",
    "tomorrow",
    "yesterday",
    "weekend",
    "week",
    "month",
    "year",
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
    "late",
    "recent",
    "still",
    "always",
    "never",
    "ever",
    "already",
    "soon",
    "often",
    "now",
    "ago",
    "real",
    "anything",
    "something",
    "everything",
    "nothing",
    "lot",
    "thing",
    "今日",
    "明日",
    "昨日",
    "毎日",
    "毎朝",
    "毎晩",
    "毎月",
    "毎年",
    "今朝",
    "今夜",
    "今晩",
    "今週",
    "来週",
    "先週",
    "週末",
    "今月",
    "来月",
    "先月",
    "今年",
    "来年",
    "去年",
    "最近",
    "日前",
    "何",
    "誰",
];

/// Whether a retrieval term says little about a message's topic: a hiragana bigram (mostly
/// particles and endings: "です", "ます", "ので") or one of the words of time and emphasis in
/// [`WEAK_TERMS`]. Retrieval searches for them only when the message has nothing else, and
/// weighs them less when comparing texts.
pub fn is_weak_term(term: &str) -> bool {
    term.chars().all(is_hiragana) || WEAK_TERMS.contains(&term)
}

/// What a reaction says about the message it is on: `1` for a thumbs up (or another sign of
/// approval), `-1` for a thumbs down (or disapproval), `0` otherwise. Skin tones and variation
/// selectors are ignored, and the names Discord and Telegram use for the thumbs count too.
pub fn reaction_sign(emoji: &str) -> i8 {
    let base = emoji
        .trim_end_matches(|c: char| ('\u{1f3fb}'..='\u{1f3ff}').contains(&c) || c == '\u{fe0f}');
    match base {
        "👍" | "❤" | "🥰" | "😍" | "🔥" | "👏" | "🙏" | "💯" | "+1" | "thumbsup" => {
            1
        }
        "👎" | "😡" | "💩" | "🤮" | "🤬" | "-1" | "thumbsdown" => -1,
        _ => 0,
    }
}

/// The character n-gram [`repetition`] counts.
pub const REPETITION_NGRAM: usize = 4;

/// How repetitive a reply is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Repetition {
    /// `1 − distinct / total` over character 4-grams; 0 for replies shorter than one.
    pub repeated_ngram_ratio: f64,
    /// How often the most frequent non-empty line appears.
    pub max_line_repeats: usize,
}

/// Measures the repetition of `text` (see `eval::suite`).
pub fn repetition(text: &str) -> Repetition {
    let mut chars: Vec<char> = Vec::new();
    let mut last_space = true;
    for c in text.chars() {
        if c.is_whitespace() {
            if !last_space {
                chars.push(' ');
            }
            last_space = true;
        } else {
            chars.push(c);
            last_space = false;
        }
    }
    if chars.last() == Some(&' ') {
        chars.pop();
    }
    let repeated_ngram_ratio = if chars.len() < REPETITION_NGRAM {
        0.0
    } else {
        let grams: Vec<&[char]> = chars.windows(REPETITION_NGRAM).collect();
        let distinct: BTreeSet<&[char]> = grams.iter().copied().collect();
        1.0 - distinct.len() as f64 / grams.len() as f64
    };
    let mut lines: HashMap<&str, usize> = HashMap::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        *lines.entry(line).or_default() += 1;
    }
    Repetition {
        repeated_ngram_ratio,
        max_line_repeats: lines.values().copied().max().unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn japanese_terms_are_bigrams_of_content_and_hiragana_runs() {
        let t = retrieval_terms("今日の天気はどうですか？");
        for want in ["今日", "天気", "どう", "うで", "です", "すか"] {
            assert!(t.contains(&want.to_string()), "{want} in {t:?}");
        }
        // A two-character word is one term, which a trigram index would miss.
        assert!(retrieval_terms("天気").contains(&"天気".to_string()));
        assert!(retrieval_terms("おはよう！").contains(&"はよ".to_string()));
    }

    #[test]
    fn english_terms_are_stemmed_content_words() {
        assert_eq!(
            retrieval_terms("Is it raining in the mountains? I love rain."),
            ["love", "mountain", "rain"]
        );
        assert_eq!(stem("cities"), "cit");
        assert_eq!(stem("class"), "class");
        assert_eq!(stem("dogs"), "dog");
        // Full-width letters are normalised first.
        assert_eq!(retrieval_terms("ＰＩＺＺＡ"), ["pizza"]);
    }

    #[test]
    fn words_of_time_and_particles_are_weak_and_topics_are_not() {
        // The terms as retrieval makes them: "lately" and "months" are stemmed first.
        let terms = retrieval_terms("My laptop has been slow lately, for months. 毎晩ゲームです");
        let weak: Vec<&str> = terms
            .iter()
            .filter(|t| is_weak_term(t))
            .map(String::as_str)
            .collect();
        assert_eq!(weak, ["late", "month", "です", "毎晩"]);
        for strong in ["laptop", "slow", "ゲー"] {
            assert!(terms.iter().any(|t| t == strong) && !is_weak_term(strong));
        }
    }
}
