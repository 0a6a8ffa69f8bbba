-- 0004_lifecycle: living with a gallery (slice lifecycle).
--
-- * an index on images.duplicate_of: removing an ok row looks up its duplicates (retrieval/lifecycle.py);
-- * images.mtime in seconds since the epoch (REAL, as os.stat's st_mtime), no longer nanoseconds: values
--   above 1e11 (no file of the year 5138 is expected) were nanoseconds;
-- * empty CSV cells are no longer kept in images.meta: blank text values are dropped, an object left empty
--   becomes NULL.
--
-- Python step (store.PYTHON_STEPS, same transaction): local files and stored originals recorded by absolute
-- path inside the gallery's folder are recorded relative to it (lifecycle.relativise_paths).

CREATE INDEX IF NOT EXISTS images_duplicate_of ON images (duplicate_of);

UPDATE images SET mtime = mtime / 1e9 WHERE mtime > 100000000000;

UPDATE images SET meta = nullif((
        SELECT json_group_object(j.key, CASE WHEN j.type IN ('object', 'array') THEN json(j.value) ELSE j.value END)
        FROM json_each(images.meta) AS j
        WHERE NOT (j.type = 'text' AND trim(j.value) = '')), '{}')
WHERE meta IS NOT NULL AND json_valid(meta) AND json_type(meta) = 'object'
  AND EXISTS (SELECT 1 FROM json_each(images.meta) AS j WHERE j.type = 'text' AND trim(j.value) = '');
