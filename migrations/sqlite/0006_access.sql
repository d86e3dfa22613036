-- Who may talk to the bot, as admins changed it at run time (/allow, /block and their undo); the
-- settings' lists (ALLOWED_USERS, BLOCKED_USERS, …) stay in the environment. Read on every
-- message, so a change holds in every process on the store at once and survives restarts.
CREATE TABLE access_rules (
    list        TEXT    NOT NULL,   -- 'allow' or 'block'
    platform    TEXT    NOT NULL,
    kind        TEXT    NOT NULL,   -- 'user' or 'chat'
    id          TEXT    NOT NULL,
    added_by    TEXT    NOT NULL,
    added_at_ms INTEGER NOT NULL,
    PRIMARY KEY (list, platform, kind, id)
);

-- Per person and UTC day: replies taken against DAILY_QUOTA, refusals and quota hits (for
-- `kaiwa stats`), and whether today's one notice of each went out.
CREATE TABLE user_days (
    platform        TEXT    NOT NULL,
    user_id         TEXT    NOT NULL,
    day             INTEGER NOT NULL,   -- days since 1970-01-01, UTC
    replies         INTEGER NOT NULL DEFAULT 0,
    refusals        INTEGER NOT NULL DEFAULT 0,
    quota_hits      INTEGER NOT NULL DEFAULT 0,
    refusal_noticed INTEGER NOT NULL DEFAULT 0,
    quota_noticed   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (platform, user_id, day)
);
