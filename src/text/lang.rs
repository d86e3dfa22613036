//! The language of a piece of text, as an ISO 639-1 code where there is one (`ja`, `en`, …):
//! for the corpus's `--language` filter and figures, the suites' checks, the retrieval index and
//! the ranker's screening, and the language the bot answers "busy" in.
//!
//! Japanese is decided by script, which is exact and works on the shortest message: any kana
//! makes text Japanese when Japanese script (kana and kanji) is a fair share of its letters.
//! Han without kana is Chinese, Hangul Korean. Other text goes to `whatlang`'s trigram model,
//! and short Latin text that the model cannot call reliably falls back on a list of common
//! English words, because everyday small talk ("ok see you!") is short.

/// The code used when the language cannot be told.
pub const UNKNOWN: &str = "und";

/// The language of `text`.
pub fn detect(text: &str) -> &'static str {
    let (mut kana, mut han, mut hangul, mut latin, mut letters) = (0usize, 0, 0, 0, 0);
    for c in text.chars() {
        match c {
            '\u{3040}'..='\u{30ff}' | '\u{31f0}'..='\u{31ff}' | '\u{ff66}'..='\u{ff9f}' => {
                kana += 1
            }
            '\u{4e00}'..='\u{9fff}' | '\u{3400}'..='\u{4dbf}' | '\u{f900}'..='\u{faff}' => han += 1,
            '\u{ac00}'..='\u{d7af}' | '\u{1100}'..='\u{11ff}' | '\u{3130}'..='\u{318f}' => {
                hangul += 1
            }
            c if c.is_ascii_alphabetic() => latin += 1,
            _ => {}
        }
        if c.is_alphabetic() {
            letters += 1;
        }
    }
    if letters == 0 {
        return UNKNOWN;
    }
    // Share of letters, in percent.
    let share = |n: usize| n * 100 / letters;
    if kana > 0 && share(kana + han) >= 20 {
        return "ja";
    }
    if share(hangul) >= 30 {
        return "ko";
    }
    if share(han) >= 30 {
        return "zh";
    }
    if let Some(info) = whatlang::detect(text) {
        if info.is_reliable() {
            return iso639_1(info.lang());
        }
    }
    if share(latin) >= 60 && looks_english(text) {
        return "en";
    }
    UNKNOWN
}

fn looks_english(text: &str) -> bool {
    const COMMON: &[&str] = &[
        "i", "you", "the", "a", "is", "are", "it", "to", "and", "of", "in", "that", "what", "do",
        "how", "hi", "hello", "hey", "yes", "no", "ok", "okay", "thanks", "thank", "my", "me",
        "we", "good", "see", "bye", "nice", "sure", "so", "not", "have", "was", "for", "this",
        "can", "like", "too", "morning", "night", "lol", "cool", "great", "well", "be", "been",
        "any", "with", "your", "just", "but", "at", "on", "or", "an", "if", "from", "all", "there",
        "ve", "ll", "re", "don", "t", "m",
    ];
    // Contractions split at the apostrophe: "I've" is "i" and "ve".
    text.split(|c: char| !c.is_ascii_alphabetic())
        .filter(|w| !w.is_empty())
        .any(|w| COMMON.contains(&w.to_ascii_lowercase().as_str()))
}

fn iso639_1(lang: whatlang::Lang) -> &'static str {
    use whatlang::Lang::*;
    match lang {
        Eng => "en",
        Jpn => "ja",
        Cmn => "zh",
        Kor => "ko",
        Fra => "fr",
        Deu => "de",
        Spa => "es",
        Por => "pt",
        Ita => "it",
        Rus => "ru",
        Ukr => "uk",
        Nld => "nl",
        Pol => "pl",
        Tur => "tr",
        Vie => "vi",
        Ind => "id",
        Tha => "th",
        Ara => "ar",
        Hin => "hi",
        Swe => "sv",
        other => other.code(),
    }
}

#[cfg(test)]
mod tests {
    use super::detect;

    #[test]
    fn everyday_japanese_and_english_including_short_messages() {
        assert_eq!(detect("今日の天気はどうですか？"), "ja");
        assert_eq!(detect("はい"), "ja");
        assert_eq!(detect("ラーメン食べたい！ Let's go"), "ja");
        assert_eq!(detect("What did you have for dinner last night?"), "en");
        assert_eq!(detect("ok see you!"), "en");
        // No common word but in a contraction.
        assert_eq!(
            detect("I've been having trouble falling asleep lately. Any advice?"),
            "en"
        );
        assert_eq!(detect("我们明天去北京旅游"), "zh");
        assert_eq!(detect("안녕하세요 반갑습니다"), "ko");
        assert_eq!(
            detect("Je voudrais réserver une table pour deux personnes ce soir."),
            "fr"
        );
        assert_eq!(detect("👍 123 !!"), "und");
    }
}
