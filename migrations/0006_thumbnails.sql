-- 0006_thumbnails: small JPEG previews of the gallery's images, for the web app (`serve`) and the
-- HTML contact sheet (`query --html`). Made at ingest from the decoded image, or later from the stored
-- original (lazily on first request, or all at once with `python cli.py thumbs`); see retrieval/thumbs.py.
--
-- One row per ok image (a duplicate row shows the thumbnail of the row it points at). Anything that
-- deletes image rows deletes their thumbnails too (ON DELETE CASCADE with foreign_keys=ON, which
-- store.connect sets; other code deletes them explicitly when this table exists).

CREATE TABLE IF NOT EXISTS thumbnails (
    image_id INTEGER PRIMARY KEY REFERENCES images (id) ON DELETE CASCADE,
    width    INTEGER,                                -- of the thumbnail, at most 256 px on the long side
    height   INTEGER,
    mime     TEXT,                                   -- image/jpeg
    data     BLOB
);
