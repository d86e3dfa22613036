-- Several daemons on one store (shards, replicas, a web server of its own): each running daemon
-- says it is alive here, and a pending reply names the daemon that claimed it. A daemon that
-- starts answers only the claims of daemons that are gone (no longer seen), never those that
-- a running one is still working on.
CREATE TABLE processes (
    id            TEXT    NOT NULL PRIMARY KEY,
    host          TEXT    NOT NULL,
    pid           INTEGER NOT NULL,
    started_at_ms INTEGER NOT NULL,
    seen_at_ms    INTEGER NOT NULL
);
ALTER TABLE replies ADD COLUMN owner TEXT;
