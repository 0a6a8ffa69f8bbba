-- 0002_runs: one row per ingest run (store.start_run / store.finish_run).
--
-- A run left 'running' by a process that no longer exists (same host, pid not alive) is marked
-- 'interrupted' by the next store.start_run().

CREATE TABLE runs (
    id           INTEGER PRIMARY KEY,
    started_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    finished_at  TEXT,
    source       TEXT,                             -- the CSV file or folder ingested
    pid          INTEGER,                          -- the ingesting process
    host         TEXT,                             -- ... and its host name
    new          INTEGER NOT NULL DEFAULT 0,       -- images embedded
    skipped      INTEGER NOT NULL DEFAULT 0,       -- already in the gallery
    failed       INTEGER NOT NULL DEFAULT 0,
    duplicate    INTEGER NOT NULL DEFAULT 0,       -- same content as an image already in the gallery
    images_per_s REAL,
    status       TEXT NOT NULL DEFAULT 'running'
                 CHECK (status IN ('running', 'completed', 'interrupted', 'crashed'))
);

CREATE INDEX runs_status ON runs (status);
