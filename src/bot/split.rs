//! Splitting a reply into messages the platform accepts: on paragraph, line or sentence
//! boundaries, never inside a character, and never leaving a code fence open across messages
//! (a fence cut by the limit is closed and reopened).

/// The length a platform counts: UTF-16 code units (Telegram counts so, and for Discord it is
/// never less than the number of characters, so it is a safe bound for both).
pub fn platform_len(s: &str) -> usize {
    s.encode_utf16().count()
}

/// Splits `text` into parts of at most `limit` (in [`platform_len`] units).
pub fn split_message(text: &str, limit: usize) -> Vec<String> {
    let limit = limit.max(16);
    let mut parts = Vec::new();
    let mut prefix = String::new(); // a fence reopened from the previous part
    let mut rest = text.trim();
    while platform_len(&prefix) + platform_len(rest) > limit {
        // Room for the text of this part, keeping 4 units to close a fence.
        let budget = limit - platform_len(&prefix) - 4;
        let cut = best_cut(rest, budget);
        let (head, tail) = rest.split_at(cut);
        let mut part = format!("{prefix}{}", head.trim_end());
        let fence = open_fence(&part);
        if let Some(f) = &fence {
            part.push_str("\n```");
            prefix = format!("{f}\n");
        } else {
            prefix.clear();
        }
        parts.push(part);
        rest = tail.trim_start_matches([' ', '\n']);
    }
    let last = format!("{prefix}{rest}");
    if !last.trim().is_empty() {
        parts.push(last);
    }
    parts
}

/// The byte index to cut `s` at so that `s[..i]` fits `budget`, preferring a paragraph, then a
/// line, then a sentence end, then a space, and at worst any character boundary.
fn best_cut(s: &str, budget: usize) -> usize {
    // The longest prefix that fits, on a character boundary.
    let mut fit = 0;
    let mut used = 0;
    for (i, c) in s.char_indices() {
        used += c.len_utf16();
        if used > budget {
            break;
        }
        fit = i + c.len_utf8();
    }
    let head = &s[..fit];
    let min = fit / 3; // do not make absurdly short parts to honour a boundary
    let after = |pat: &str| head.rfind(pat).map(|i| i + pat.len()).filter(|&i| i > min);
    after("\n\n")
        .or_else(|| after("\n"))
        .or_else(|| {
            ["。", "！", "？", ". ", "! ", "? "]
                .iter()
                .filter_map(|p| after(p))
                .max()
        })
        .or_else(|| after(" "))
        .unwrap_or(fit.max(s.chars().next().map_or(0, char::len_utf8)))
}

/// The opening line of a code fence left open at the end of `text`, if any.
fn open_fence(text: &str) -> Option<String> {
    let mut open: Option<String> = None;
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("```") {
            open = if open.is_some() {
                None
            } else {
                Some(t.to_string())
            };
        }
    }
    open
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_one_part() {
        assert_eq!(split_message("hello", 2000), vec!["hello"]);
    }

    #[test]
    fn parts_fit_and_keep_all_the_words() {
        let text =
            "今日はいい天気ですね。".repeat(300) + "\n\n" + &"The weather is nice. ".repeat(200);
        let parts = split_message(&text, 2000);
        assert!(parts.len() > 2);
        for p in &parts {
            assert!(platform_len(p) <= 2000, "{}", platform_len(p));
        }
        let joined: String = parts
            .concat()
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        let original: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        assert_eq!(joined, original);
        // Japanese is cut after a full stop, not inside a sentence.
        assert!(
            parts[0].ends_with('。'),
            "{}",
            &parts[0][parts[0].len() - 12..]
        );
    }

    #[test]
    fn a_code_fence_is_closed_and_reopened() {
        let code = (0..400)
            .map(|i| format!("let x{i} = {i};"))
            .collect::<Vec<_>>()
            .join("\n");
        let text = format!("Here:\n```rust\n{code}\n```\nDone.");
        let parts = split_message(&text, 1000);
        assert!(parts.len() > 3);
        for p in &parts {
            assert!(platform_len(p) <= 1000);
            assert_eq!(p.matches("```").count() % 2, 0, "unbalanced fence in {p:?}");
        }
        assert!(parts[1].starts_with("```rust\n"));
    }

    #[test]
    fn emoji_count_as_two_units_and_are_never_cut() {
        let text = "🌸".repeat(3000);
        let parts = split_message(&text, 4096);
        assert!(parts.iter().all(|p| platform_len(p) <= 4096));
        assert_eq!(parts.concat(), text);
    }
}
