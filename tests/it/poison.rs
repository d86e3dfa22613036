//! No poison input: thousands of generated inputs per run — valid samples cut, spliced and
//! overwritten at random, and plain random bytes — through every parser of outside files and
//! settings. Each must answer with records or an error, never panic or hang. (The Telegram
//! update salvager and the web API's request checks have the same property tests in their
//! modules.)

use std::io::Write;

use kaiwa::corpus::import::{read, Format};
use proptest::prelude::*;

/// A small valid file of each import format.
const SAMPLES: &[(Format, &str)] = &[
    (
        Format::Chatterbot,
        "categories:\n- greetings\nconversations:\n- - Hello\n  - Hi there!\n- - 今日の天気は？\n  - 晴れです。\n",
    ),
    (
        Format::Openai,
        "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},{\"role\":\"assistant\",\"content\":\"hello\"}]}\n{\"messages\":[{\"role\":\"system\",\"content\":\"be kind\"},{\"role\":\"user\",\"content\":\"今日は\"},{\"role\":\"assistant\",\"content\":\"こんにちは\"}]}\n",
    ),
    (
        Format::Sharegpt,
        "[{\"conversations\":[{\"from\":\"human\",\"value\":\"hi\"},{\"from\":\"gpt\",\"value\":\"hello\"}]}]",
    ),
    (
        Format::Telegram,
        "{\"name\":\"Chat\",\"type\":\"personal_chat\",\"id\":1,\"messages\":[{\"id\":1,\"type\":\"message\",\"date\":\"2024-01-01T00:00:00\",\"date_unixtime\":\"1704067200\",\"from\":\"Ann\",\"from_id\":\"user1\",\"text\":\"hi\"},{\"id\":2,\"type\":\"message\",\"date\":\"2024-01-01T00:00:01\",\"date_unixtime\":\"1704067201\",\"from\":\"Bob\",\"from_id\":\"user2\",\"text\":[{\"type\":\"plain\",\"text\":\"hello \"},{\"type\":\"bold\",\"text\":\"there\"}],\"reply_to_message_id\":1}]}",
    ),
    (
        Format::Discord,
        "{\"guild\":{\"id\":\"1\",\"name\":\"G\"},\"channel\":{\"id\":\"2\",\"name\":\"c\",\"type\":\"GuildTextChat\"},\"messages\":[{\"id\":\"3\",\"type\":\"Default\",\"timestamp\":\"2024-01-01T00:00:00+00:00\",\"content\":\"hi\",\"author\":{\"id\":\"4\",\"name\":\"ann\",\"isBot\":false}},{\"id\":\"5\",\"type\":\"Reply\",\"timestamp\":\"2024-01-01T00:00:01+00:00\",\"content\":\"hello\",\"author\":{\"id\":\"6\",\"name\":\"bob\",\"isBot\":true},\"reference\":{\"messageId\":\"3\"}}]}",
    ),
    (Format::Csv, "question,answer\nhi,hello\n\"a, b\",\"c \"\"d\"\"\"\n今日は,こんにちは\n"),
    (Format::Text, "Ann: hi\nBob: hello\n\nAnn: again\nBob: ok\n"),
];

/// How a sample is spoiled: cut at a point, and bytes overwritten, inserted or removed.
fn spoiled() -> impl Strategy<Value = (usize, Vec<u8>)> {
    let edits = prop::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 0..8);
    (0..SAMPLES.len(), any::<Option<usize>>(), edits).prop_map(|(i, cut, edits)| {
        let mut bytes = SAMPLES[i].1.as_bytes().to_vec();
        if let Some(c) = cut {
            bytes.truncate(c % (bytes.len() + 1));
        }
        for (at, byte, op) in edits {
            let at = at % (bytes.len() + 1);
            match op {
                0 if at < bytes.len() => bytes[at] = byte,
                1 => bytes.insert(at, byte),
                _ if at < bytes.len() => {
                    bytes.remove(at);
                }
                _ => {}
            }
        }
        (i, bytes)
    })
}

/// Reads `bytes` as `format` from a file, to the end; panics are the failure.
fn read_all(format: Format, bytes: &[u8]) -> usize {
    let mut file = tempfile::Builder::new()
        .suffix(match format {
            Format::Csv => ".csv",
            Format::Text => ".txt",
            Format::Openai => ".jsonl",
            Format::Chatterbot => ".yml",
            _ => ".json",
        })
        .tempfile()
        .unwrap();
    file.write_all(bytes).unwrap();
    file.flush().unwrap();
    match read(file.path(), format) {
        Ok(records) => records.take(10_000).count(),
        Err(_) => 0,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

    #[test]
    fn spoiled_import_files_are_read_or_refused(case in spoiled()) {
        let (i, bytes) = case;
        let format = SAMPLES[i].0;
        read_all(format, &bytes);
        // The same bytes as every other format too.
        for (other, _) in SAMPLES {
            read_all(*other, &bytes);
        }
    }

    #[test]
    fn random_bytes_are_read_or_refused_by_every_import_format(
        bytes in prop::collection::vec(any::<u8>(), 0..400)
    ) {
        for (format, _) in SAMPLES {
            read_all(*format, &bytes);
        }
    }

    #[test]
    fn any_settings_are_accepted_or_refused_with_a_reason(
        values in prop::collection::vec(
            prop_oneof![
                Just(String::new()),
                "-?[0-9]{0,25}(\\.[0-9]{0,5})?",
                "(true|false|yes|on|hybrid|generate|all|mentioned|auto|ignore|leave|0\\.0\\.0\\.0:[0-9]{1,6})",
                "((telegram|discord|web|irc):-?[0-9]{0,6}, ?){0,3}",
                "[0-9]{1,11}(-[0-9]{1,11})?/[0-9]{1,11}",
                "(https?|ftp)://[a-z.]{0,10}(:[0-9]{1,6})?/[a-z_-]{0,8}",
                ".{0,20}",
            ],
            SETTINGS.len(),
        )
    ) {
        let pairs: Vec<(&str, String)> = SETTINGS.iter().copied().zip(values).collect();
        let result = kaiwa::config::Settings::from_lookup(|k| {
            pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
        });
        if let Err(e) = result {
            prop_assert!(!e.reason.is_empty());
        }
    }
}

/// Every setting `.env.example` documents.
const SETTINGS: &[&str] = &[
    "DISCORD_TOKEN",
    "TELEGRAM_TOKEN",
    "DISCORD_API_URL",
    "TELEGRAM_API_URL",
    "DISCORD_SHARDS",
    "TELEGRAM_WEBHOOK_URL",
    "TELEGRAM_WEBHOOK_SECRET",
    "TELEGRAM_WEBHOOK_LISTEN",
    "HTTP_ADDR",
    "API_KEYS",
    "HTTP_ALLOW_NO_KEYS",
    "CORS_ORIGINS",
    "API_KEY_CONCURRENCY",
    "API_KEY_RATE_PER_MINUTE",
    "DATABASE_URL",
    "MODEL_DIR",
    "ADMIN_IDS",
    "ALLOWED_USERS",
    "ALLOWED_CHATS",
    "ALLOWED_GUILDS",
    "ALLOWED_ROLES",
    "BLOCKED_USERS",
    "REFUSAL_NOTICE",
    "DAILY_QUOTA",
    "DISCORD_UNLISTED_GUILDS",
    "REPLY_POLICY",
    "SYSTEM_PROMPT",
    "CONTEXT_MESSAGES",
    "CONTEXT_MAX_AGE_MINUTES",
    "TEMPERATURE",
    "TOP_K",
    "TOP_P",
    "REPETITION_PENALTY",
    "MAX_NEW_TOKENS",
    "GUIDANCE_SCALE",
    "SEED",
    "WORKERS",
    "THREADS",
    "QUEUE_CAPACITY",
    "MAX_REPLY_WAIT_SECS",
    "USER_COOLDOWN_MS",
    "RECOVER_MAX_AGE_MINUTES",
    "REPLY_ENGINE",
    "SHARE_GROUPS",
    "RETRIEVE_DIRECT",
    "RETRIEVE_PAIRS",
    "RETRIEVE_SENTENCES",
    "GENERATED_CANDIDATES",
    "GENERATED_MAX_TOKENS",
    "SCORED_CANDIDATES",
    "RETRIEVE_MAX_DF",
    "RANK_SIMILARITY",
    "RANK_TOPIC",
    "RANK_COVERAGE",
    "RANK_MMI",
    "RANK_MMI_LAMBDA",
    "RANK_LIKELIHOOD",
    "RANK_FEEDBACK",
    "RANK_LENGTH",
    "RANK_MIN_SCORE",
];
