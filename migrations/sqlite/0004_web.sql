-- The web server (kaiwa serve): a streamed reply whose client went away before it was complete
-- is stored as far as it was sent and marked cut, so trainers can leave it out.
ALTER TABLE replies ADD COLUMN cut INTEGER NOT NULL DEFAULT 0;
