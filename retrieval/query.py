"""The query stage: an image, a URL or a stored image's id -> the gallery's nearest images.

A query image is encoded with exactly the model the gallery was built with (the weights' sha256 and
every preprocessing choice come from the gallery's model record); the search itself is one SQL
statement on the vec0 table joined to ``images`` (``store.search``).
"""

from __future__ import annotations

import os
from pathlib import Path

from . import store
from .errors import DatabaseError, InputError, ModelMismatchError

# the encoder (model, weights, preprocessing) is imported by the functions that encode: a query by id
# does not pay for it


def gallery_model(conn) -> dict:
    model = store.get_model(conn)
    if model is None:
        raise DatabaseError(f"{store.db_name(conn)}: the gallery is empty (no model recorded yet): run ingest first")
    return model


def gallery_encoder(conn, weights_path):
    """Load the weights at ``weights_path`` with the gallery's settings; refuse other weights."""
    from .encoder import EncoderSettings
    from .prepared import load_encoder  # the folded weights and their sha256, cached on disk

    model = gallery_model(conn)
    settings = EncoderSettings(preprocess=model["preprocess"], interpolation=model["interpolation"],
                               pooling=model["pooling"], batch_size=1)
    encoder = load_encoder(weights_path, settings)
    if encoder.weights_sha256 != model["weights_sha256"]:
        raise ModelMismatchError(
            f"{store.db_name(conn)} was built with weights sha256 {model['weights_sha256'][:12]}… ({model['variant']}),"
            f" not {encoder.weights_sha256[:12]}… ({encoder.model.cfg.variant}) from {weights_path}")
    return encoder


def vector_of_image(encoder, image):
    """A decoded image's L2-normalised vector (D,)."""
    from .encoder import encode_images, l2_normalise

    return l2_normalise(encode_images(encoder, [image]))[0]


def by_image(conn, encoder, image, k: int, exact: bool | None = None, nprobe: int | None = None) -> list[dict]:
    """Nearest gallery images to a decoded image."""
    return store.search(conn, vector_of_image(encoder, image), k, exact=exact, nprobe=nprobe)


def vector_of(conn, image_id: int):
    """A stored image's vector (a duplicate row uses the vector it points at); InputError when none."""
    row = store.get_image(conn, image_id)
    if row is None:
        raise InputError(f"--id {image_id}: no such image in {store.db_name(conn)}")
    target = row["duplicate_of"] if row["status"] == "duplicate" else image_id
    vector = store.get_vector(conn, target)
    if vector is None:
        raise InputError(f"--id {image_id}: image {row['url']} has no vector (status {row['status']}: {row['error']})")
    return vector


def by_id(conn, image_id: int, k: int, exact: bool | None = None, nprobe: int | None = None) -> list[dict]:
    """Nearest gallery images to a stored image (a duplicate row uses the vector it points at)."""
    return store.search(conn, vector_of(conn, image_id), k, exact=exact, nprobe=nprobe)


def display_path(path: str | None, db_path) -> str | None:
    """A stored path as the user can open it: relative to the database's folder when stored so,
    shown relative to the working directory when below it, else absolute."""
    if not path:
        return path
    p = Path(path)
    if not p.is_absolute():
        p = Path(db_path).resolve().parent / p
    try:
        return os.path.relpath(p) if p.resolve().is_relative_to(Path.cwd()) else str(p)
    except ValueError:
        return str(p)
