-- kaiwa's conversation store: every message the bot sees or sends, and what it decided.

-- Every message, incoming or sent by kaiwa. `text` is NULL once the message is deleted.
CREATE TABLE messages (
    id            INTEGER PRIMARY KEY,
    platform      TEXT    NOT NULL,
    chat_id       TEXT    NOT NULL,
    thread_id     TEXT    NOT NULL DEFAULT '',
    -- 'direct' (one person and the bot) or 'group'.
    chat_kind     TEXT    NOT NULL DEFAULT 'group' CHECK (chat_kind IN ('direct', 'group')),
    message_id    TEXT    NOT NULL,
    author_id     TEXT    NOT NULL,
    author_name   TEXT    NOT NULL,
    author_is_bot INTEGER NOT NULL DEFAULT 0,
    -- Sent by kaiwa itself (the assistant side of a conversation).
    from_self     INTEGER NOT NULL DEFAULT 0,
    -- kaiwa's answer to a command or a notice ("I'm busy"): stored, but not conversation, so
    -- it stays out of contexts and the corpus.
    is_notice     INTEGER NOT NULL DEFAULT 0,
    text          TEXT,
    reply_to      TEXT,
    sent_at_ms    INTEGER NOT NULL,
    stored_at_ms  INTEGER NOT NULL,
    edited_at_ms  INTEGER,
    deleted_at_ms INTEGER,
    -- Where the row came from: 'live' for the daemon; importers name their source.
    source        TEXT    NOT NULL DEFAULT 'live',
    UNIQUE (platform, chat_id, message_id)
);
CREATE INDEX messages_by_channel ON messages (platform, chat_id, thread_id, sent_at_ms);
CREATE INDEX messages_by_author ON messages (platform, author_id);

-- One row per incoming message the bot decided to answer. Claiming the row is what makes a
-- redelivered message yield one reply; the provenance of the reply is recorded here.
CREATE TABLE replies (
    platform          TEXT    NOT NULL,
    chat_id           TEXT    NOT NULL,
    message_id        TEXT    NOT NULL,
    state             TEXT    NOT NULL CHECK (state IN ('pending', 'sent', 'failed')),
    claimed_at_ms     INTEGER NOT NULL,
    finished_at_ms    INTEGER,
    model             TEXT,
    settings          TEXT,
    prompt_tokens     INTEGER,
    new_tokens        INTEGER,
    latency_ms        INTEGER,
    error             TEXT,
    PRIMARY KEY (platform, chat_id, message_id)
);

-- Per-channel state: where its memory starts (/reset) and whether the bot answers everything.
CREATE TABLE channels (
    platform    TEXT    NOT NULL,
    chat_id     TEXT    NOT NULL,
    thread_id   TEXT    NOT NULL DEFAULT '',
    reset_at_ms INTEGER NOT NULL DEFAULT 0,
    answer_all  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (platform, chat_id, thread_id)
);

-- Users who asked not to be stored (/optout).
CREATE TABLE opt_outs (
    platform         TEXT    NOT NULL,
    user_id          TEXT    NOT NULL,
    opted_out_at_ms  INTEGER NOT NULL,
    PRIMARY KEY (platform, user_id)
);
