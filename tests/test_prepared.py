"""The prepared-weights cache (retrieval/prepared.py): what `query IMAGE` loads instead of re-folding."""

from __future__ import annotations

import os

import numpy as np
import pytest

from retrieval import encoder as E
from retrieval import prepared
from retrieval.variants import official_config, random_params
from retrieval.weights import save_params


@pytest.fixture
def weights(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOV2_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "w.safetensors"
    save_params(random_params(official_config("small", depth=2), seed=0), path)
    return path


def flat(model):
    return prepared._flatten(model.arrays)


def test_cached_arrays_sha_and_features_equal_a_fresh_load(weights, tmp_path):
    settings = E.EncoderSettings(batch_size=1)
    fresh = E.load_encoder(weights, settings)
    first = prepared.load_encoder(weights, settings)  # prepares and writes the cache
    entries = list((tmp_path / "cache" / "prepared").iterdir())
    assert len(entries) == 1 and (entries[0] / "meta.json").is_file()
    cached = prepared.load_encoder(weights, settings)  # reads it
    arrays = flat(cached.model)
    assert all(isinstance(a, np.memmap) for a in arrays.values())
    assert arrays.keys() == flat(fresh.model).keys()
    for name, a in flat(fresh.model).items():
        assert arrays[name].dtype == a.dtype and np.array_equal(arrays[name], a), name
    assert cached._sha256 == fresh.weights_sha256 == first.weights_sha256
    assert cached.model.cfg == fresh.model.cfg and cached.dim == fresh.dim
    pixels = [np.random.default_rng(0).standard_normal((3, 224, 280)).astype(np.float32)]
    assert np.array_equal(E.encode_pixels(cached, pixels), E.encode_pixels(fresh, pixels))


def test_a_rewritten_weights_file_gets_a_new_entry(weights, tmp_path):
    settings = E.EncoderSettings(batch_size=1)
    prepared.load_encoder(weights, settings)
    save_params(random_params(official_config("small", depth=2), seed=1), weights)
    os.utime(weights, ns=(1, 1))  # even with an old mtime: size/inode/mtime differ from the first key
    enc = prepared.load_encoder(weights, settings)
    assert enc.weights_sha256 == E.load_encoder(weights, settings).weights_sha256
    assert len(list((tmp_path / "cache" / "prepared").iterdir())) == 2


def test_cache_can_be_turned_off_and_a_broken_entry_is_ignored(weights, tmp_path, monkeypatch):
    settings = E.EncoderSettings(batch_size=1)
    monkeypatch.setenv("DINOV2_PREPARED_CACHE", "0")
    prepared.load_encoder(weights, settings)
    assert not (tmp_path / "cache" / "prepared").exists()
    monkeypatch.delenv("DINOV2_PREPARED_CACHE")
    prepared.load_encoder(weights, settings)
    entry = next((tmp_path / "cache" / "prepared").iterdir())
    (entry / "layers.0.qkv_w.npy").write_bytes(b"garbage")
    enc = prepared.load_encoder(weights, settings)  # unreadable: loaded from the weights file again
    assert not isinstance(flat(enc.model)["layers.0.qkv_w"], np.memmap)
