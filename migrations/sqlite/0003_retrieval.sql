-- The reply engine's retrieval index, what channels share with it, and how each reply was made.

-- What the engine may answer with, found by its retrieval terms (`text::retrieval_terms`):
-- - 'pair': a message (`context_id`) and the reply a person wrote after it (`reply_id`); the
--   terms are the context's, and the candidate is the reply's current text.
-- - 'sentence': a sentence of a shipped or imported corpus that answers nothing in particular
--   (XiaoIce's unpaired sentences); the terms and the candidate are its own `text`.
-- Whether a pair may be used is decided when retrieving (deleted text, opted-out authors, what
-- channels share), so consent takes effect at once.
CREATE TABLE retrieval_docs (
    id         INTEGER PRIMARY KEY,
    kind       TEXT    NOT NULL CHECK (kind IN ('pair', 'sentence')),
    context_id INTEGER,
    reply_id   INTEGER UNIQUE,
    text       TEXT,
    source     TEXT    NOT NULL,
    language   TEXT    NOT NULL,
    CHECK ((kind = 'pair') = (reply_id IS NOT NULL AND context_id IS NOT NULL AND text IS NULL))
);
CREATE INDEX retrieval_docs_by_context ON retrieval_docs (context_id);
CREATE INDEX retrieval_docs_by_source ON retrieval_docs (source);

-- The full-text indexes over the docs' terms, one per kind so that the best matches of a kind
-- are found inside FTS5 (ORDER BY rank LIMIT n) before anything is joined: space-separated terms
-- (the ASCII tokenizer keeps every non-ASCII character as part of a term), one row per doc with
-- the doc's id as rowid.
CREATE VIRTUAL TABLE retrieval_pair_index USING fts5(terms, content='', contentless_delete=1, tokenize='ascii');
CREATE VIRTUAL TABLE retrieval_sentence_index USING fts5(terms, content='', contentless_delete=1, tokenize='ascii');
-- Document frequencies, to weigh and drop query terms.
CREATE VIRTUAL TABLE retrieval_pair_vocab USING fts5vocab(retrieval_pair_index, 'row');
CREATE VIRTUAL TABLE retrieval_sentence_vocab USING fts5vocab(retrieval_sentence_index, 'row');

CREATE TRIGGER retrieval_doc_removed AFTER DELETE ON retrieval_docs BEGIN
    DELETE FROM retrieval_pair_index WHERE rowid = old.id AND old.kind = 'pair';
    DELETE FROM retrieval_sentence_index WHERE rowid = old.id AND old.kind = 'sentence';
END;
-- A deleted or forgotten message takes its pairs with it.
CREATE TRIGGER retrieval_message_deleted AFTER DELETE ON messages BEGIN
    DELETE FROM retrieval_docs WHERE context_id = old.id OR reply_id = old.id;
END;
CREATE TRIGGER retrieval_message_text_removed AFTER UPDATE OF text ON messages
    WHEN new.text IS NULL BEGIN
    DELETE FROM retrieval_docs WHERE context_id = new.id OR reply_id = new.id;
END;

-- `/share on|off`: whether a channel's messages may be retrieved as replies elsewhere. NULL
-- follows the daemon's setting (SHARE_GROUPS for groups; direct messages never, unless
-- RETRIEVE_DIRECT is set).
ALTER TABLE channels ADD COLUMN shared INTEGER;

-- How a reply was made: 'generated', 'retrieved' (from `source_doc`, the row `source_message` of
-- `messages` for a pair) or 'fallback', and the
-- ranker's scores of the winner (JSON).
ALTER TABLE replies ADD COLUMN engine_source TEXT;
ALTER TABLE replies ADD COLUMN source_doc INTEGER;
ALTER TABLE replies ADD COLUMN source_message INTEGER;
ALTER TABLE replies ADD COLUMN scores TEXT;
CREATE INDEX replies_by_source_doc ON replies (source_doc) WHERE source_doc IS NOT NULL;
