-- The web server (kaiwa serve): a streamed reply whose client went away before it was complete
-- is stored as far as it was sent and marked cut (as migrations/sqlite/0004_web.sql).
ALTER TABLE replies ADD COLUMN cut BOOLEAN NOT NULL DEFAULT FALSE;
