-- 0005_views: read-only views for the tools SQLite users already have (Datasette, sqlite-utils, pandas,
-- DuckDB, the sqlite3 shell). They read the plain tables only, never the vec0 table, so a client
-- without sqlite-vec loaded can query every one of them.
--
--   ok_images        one row per image with a vector: where it came from, its file, size and metadata
--   failed_images    one row per failure, with the reason tag ("http-404", "not-an-image", ...) split out
--   duplicate_images one row per duplicate, beside the ok image holding the same bytes
--   failure_reasons  how many failures of each reason
--
-- The metadata (the CSV row's other columns) stays JSON text: json_extract(meta, '$.title').

CREATE VIEW IF NOT EXISTS ok_images AS
SELECT id, url, path, width, height, format, bytes, content_sha256, meta, created_at, updated_at
FROM images
WHERE status = 'ok';

CREATE VIEW IF NOT EXISTS failed_images AS
SELECT id, url,
       CASE WHEN instr(error, ':') > 0 THEN substr(error, 1, instr(error, ':') - 1) ELSE error END AS reason,
       error, http_status, attempts, meta, updated_at
FROM images
WHERE status = 'failed';

CREATE VIEW IF NOT EXISTS duplicate_images AS
SELECT d.id, d.url, d.duplicate_of, o.url AS original_url, o.path AS original_path, d.content_sha256, d.meta,
       d.updated_at
FROM images AS d LEFT JOIN images AS o ON o.id = d.duplicate_of
WHERE d.status = 'duplicate';

CREATE VIEW IF NOT EXISTS failure_reasons AS
SELECT CASE WHEN instr(error, ':') > 0 THEN substr(error, 1, instr(error, ':') - 1) ELSE error END AS reason,
       count(*) AS images
FROM images
WHERE status = 'failed'
GROUP BY reason
ORDER BY images DESC, reason;
