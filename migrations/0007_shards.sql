-- 0007_shards: the Parquet shards merged into this gallery (retrieval/shards.py).
--
-- A shard is merged in the same transaction as its row here, so merging the same shard again (a re-run
-- after a killed driver, `cli.py merge` twice) finds its id and changes nothing.

CREATE TABLE merged_shards (
    shard_id   TEXT PRIMARY KEY,                  -- the id written in the shard's metadata (a uuid)
    name       TEXT NOT NULL,                     -- its file name when merged
    rows       INTEGER NOT NULL,                  -- rows in the shard
    merged_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
