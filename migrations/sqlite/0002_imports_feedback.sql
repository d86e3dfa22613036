-- Imported dialogue, feedback on replies, and the store's own settings.

-- A system prompt of an imported conversation (OpenAI / ShareGPT `system` turns). Live messages
-- never are; the export puts such a turn first in its example.
ALTER TABLE messages ADD COLUMN is_system INTEGER NOT NULL DEFAULT 0;

-- Reactions people put on messages (👍 / 👎 on a reply is feedback on it). One row per user,
-- message and emoji; removing the reaction removes the row.
CREATE TABLE reactions (
    platform   TEXT    NOT NULL,
    chat_id    TEXT    NOT NULL,
    message_id TEXT    NOT NULL,
    user_id    TEXT    NOT NULL,
    emoji      TEXT    NOT NULL,
    at_ms      INTEGER NOT NULL,
    PRIMARY KEY (platform, chat_id, message_id, user_id, emoji)
);

-- One row per `kaiwa import` that committed: what came in and from where.
CREATE TABLE imports (
    id               INTEGER PRIMARY KEY,
    source           TEXT    NOT NULL,
    format           TEXT    NOT NULL,
    path             TEXT    NOT NULL,
    at_ms            INTEGER NOT NULL,
    conversations    INTEGER NOT NULL,
    messages         INTEGER NOT NULL,
    duplicates       INTEGER NOT NULL,
    skipped          INTEGER NOT NULL
);

-- Settings the store keeps for itself, e.g. the secret salt of `export-corpus --anonymize`
-- pseudonyms (stable across exports, not reversible from a user id alone).
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
