-- 0003_search_index: the IVF search index's state (retrieval/index.py).
--
-- This migration also has a Python step (store.PYTHON_STEPS -> retrieval.index.upgrade), run in the
-- same transaction after this file: a gallery whose image_embeddings vec0 table was created by an
-- older version (no partition key, vec0's default chunk of 1,024 vectors) has it rewritten as
--
--   CREATE VIRTUAL TABLE image_embeddings USING vec0(
--       image_id INTEGER PRIMARY KEY,               -- = images.id (rows with status 'ok' only)
--       list INTEGER PARTITION KEY,                 -- the IVF list: nearest centroid (0 without an index)
--       embedding float[D] distance_metric=cosine,  -- D = model.dim; float32, L2-normalised
--       chunk_size=128                              -- 384 KB chunks at 768-d: fast row-wise reads
--   );
--
-- with every vector's bytes unchanged. `python cli.py index` trains the index: it creates
--
--   CREATE VIRTUAL TABLE index_centroids USING vec0(
--       list INTEGER PRIMARY KEY, centroid float[D] distance_metric=cosine, chunk_size=128);
--
-- and fills the single row below.

CREATE TABLE search_index (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    nlist       INTEGER NOT NULL CHECK (nlist > 0),   -- lists (= rows of index_centroids)
    nprobe      INTEGER NOT NULL CHECK (nprobe > 0),  -- lists a top-10 query probes (more for larger k)
    trained_on  INTEGER NOT NULL,                     -- vectors in the gallery when it was trained
    trained_at  TEXT NOT NULL,
    seconds     REAL,                                 -- how long the build took
    generation  INTEGER NOT NULL DEFAULT 1            -- bumped by every build (cached centroids follow it)
);
