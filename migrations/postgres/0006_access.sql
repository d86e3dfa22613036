-- Who may talk to the bot, as admins changed it at run time (/allow, /block and their undo); the
-- settings' lists (ALLOWED_USERS, BLOCKED_USERS, …) stay in the environment. Read on every
-- message, so a change holds in every process on the store at once and survives restarts.
CREATE TABLE access_rules (
    list        TEXT    COLLATE "C" NOT NULL,   -- 'allow' or 'block'
    platform    TEXT    COLLATE "C" NOT NULL,
    kind        TEXT    COLLATE "C" NOT NULL,   -- 'user' or 'chat'
    id          TEXT    COLLATE "C" NOT NULL,
    added_by    TEXT    NOT NULL,
    added_at_ms BIGINT  NOT NULL,
    PRIMARY KEY (list, platform, kind, id)
);

-- Per person and UTC day: replies taken against DAILY_QUOTA, refusals and quota hits (for
-- `kaiwa stats`), and whether today's one notice of each went out.
CREATE TABLE user_days (
    platform        TEXT    COLLATE "C" NOT NULL,
    user_id         TEXT    COLLATE "C" NOT NULL,
    day             BIGINT  NOT NULL,   -- days since 1970-01-01, UTC
    replies         BIGINT  NOT NULL DEFAULT 0,
    refusals        BIGINT  NOT NULL DEFAULT 0,
    quota_hits      BIGINT  NOT NULL DEFAULT 0,
    refusal_noticed BOOLEAN NOT NULL DEFAULT FALSE,
    quota_noticed   BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (platform, user_id, day)
);
