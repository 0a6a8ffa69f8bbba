-- 0001_gallery: the images table and the single-row model record.
--
-- Applied by retrieval/store.py (migrate), in one transaction together with its row in `migrations`.
-- Timestamps are ISO-8601 UTC text, e.g. 2025-01-31T12:00:00.000Z.
--
-- NOT created here: the vectors. They live in a sqlite-vec virtual table whose width depends on the
-- model, so store.ensure_model() creates it when the model is first recorded:
--
--   CREATE VIRTUAL TABLE image_embeddings USING vec0(
--       image_id INTEGER PRIMARY KEY,            -- = images.id (rows with status 'ok' only)
--       embedding float[D] distance_metric=cosine -- D = model.dim; float32, L2-normalised
--   );
--
-- To look at it from the plain shell:  sqlite3 gallery.db
--   .load /path/to/site-packages/sqlite_vec/vec0      (python -c "import sqlite_vec; print(sqlite_vec.loadable_path())")
--   SELECT id, url FROM images WHERE status = 'ok' LIMIT 5;
--   WITH knn AS (SELECT image_id, distance FROM image_embeddings
--                WHERE embedding MATCH (SELECT embedding FROM image_embeddings WHERE image_id = 1) AND k = 5)
--   SELECT knn.image_id, 1 - knn.distance AS score, images.url FROM knn JOIN images ON images.id = knn.image_id
--   ORDER BY knn.distance;

CREATE TABLE images (
    id             INTEGER PRIMARY KEY,
    url            TEXT NOT NULL,                  -- the URL as given, or the absolute path of a local file
    url_hash       TEXT NOT NULL UNIQUE,           -- sha256 hex of the normalised URL (store.url_hash)
    status         TEXT NOT NULL CHECK (status IN ('ok', 'failed', 'duplicate')),
    error          TEXT,                           -- why it failed: "reason-tag: message", e.g. "http-404: Not Found"
    attempts       INTEGER NOT NULL DEFAULT 0,     -- how many times this URL was processed
    http_status    INTEGER,
    content_sha256 TEXT,                           -- sha256 hex of the downloaded/read bytes
    duplicate_of   INTEGER REFERENCES images (id), -- for status 'duplicate': the ok row with the same content
    width          INTEGER,
    height         INTEGER,
    format         TEXT,                           -- e.g. JPEG, PNG (as decoded)
    bytes          INTEGER,                        -- size of the original
    path           TEXT,                           -- where the original is stored on disk
    mtime          INTEGER,                        -- local files: the file's st_mtime_ns when read
    meta           TEXT,                           -- JSON object: the CSV row's other columns
    created_at     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE INDEX images_status ON images (status);
CREATE INDEX images_content_sha256 ON images (content_sha256);
-- one ok row per content: a second URL serving the same bytes is recorded as a duplicate of the first
CREATE UNIQUE INDEX images_ok_content ON images (content_sha256) WHERE status = 'ok';

-- The model that made the vectors: exactly one row (id = 1), written once by store.ensure_model().
CREATE TABLE model (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    variant        TEXT NOT NULL,                  -- e.g. small, base, large, giant, base-reg
    weights_sha256 TEXT NOT NULL,
    preprocess     TEXT NOT NULL,
    interpolation  TEXT NOT NULL,
    pooling        TEXT NOT NULL,
    dim            INTEGER NOT NULL CHECK (dim > 0),  -- the width D of image_embeddings.embedding
    extra          TEXT,                           -- JSON object: any other settings of the record
    created_at     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
