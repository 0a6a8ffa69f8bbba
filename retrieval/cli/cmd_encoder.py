"""Commands on models and images without a gallery: ``weights download|convert|info|path``, ``embed``, ``verify``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from .common import (BatchOpt, EMBED_WINDOW_BATCHES, InterpolationOpt, OfflineOpt, PoolingOpt, PrecisionOpt,
                     PreprocessOpt, WeightsOpt, _encoder, _pixels, app, weights_app)


# ---------------------------------------------------------------- weights


@weights_app.command("download")
def weights_download(
    variant: str = typer.Option("base", "--variant", help="small, base, large, giant, or one of them + '-reg'."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache directory. Default: $DINOV2_CACHE, else ~/.cache/dinov2-retrieval."),
    sha256: Optional[str] = typer.Option(None, "--sha256", help="Expected sha256 (default: the pinned hash of the variant, if any)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Download a variant's model.safetensors from the hub ($DINOV2_HUB_URL) into the cache; print its path."""
    from retrieval.hub import download

    typer.echo(str(download(variant, cache, sha256=sha256, progress=not quiet)))


@weights_app.command("convert")
def weights_convert(
    src: Path = typer.Argument(..., help="Weights file: .safetensors, .npz or .pth (official or transformers names)."),
    dst: Path = typer.Argument(..., help="Output: .safetensors or .npz, in hub names, float32."),
):
    """Convert a weights file to .safetensors or .npz (hub names, float32)."""
    from retrieval.weights import convert

    cfg = convert(src, dst)
    typer.echo(f"{dst}: {cfg.description}")


@weights_app.command("info")
def weights_info(
    path: Optional[str] = typer.Argument(None, help="Weights file or variant name. Default: resolved like every command."),
    offline: bool = typer.Option(False, "--offline", help="Never download weights (also: DINOV2_OFFLINE=1)."),
):
    """Show a weights file's format, model, parameter count and sha256."""
    from retrieval.hub import resolve_weights
    from retrieval.weights import describe

    info = describe(resolve_weights(path, allow_download=not offline))
    cfg = info.config
    official = f"  (the official {info.official} weights)" if info.official else ""
    for label, value in (
        ("path", str(info.path)),
        ("format", f"{info.format} ({', '.join(info.dtypes) or 'empty'}), {info.size / 1e6:.1f} MB"),
        ("model", cfg.description),
        ("positions", f"{cfg.grid}x{cfg.grid} grid ({cfg.grid * cfg.patch}x{cfg.grid * cfg.patch} input)"),
        ("params", f"{info.n_params:,}"),
        ("sha256", info.sha256 + official),
    ):
        typer.echo(f"{label:<10} {value}")


@weights_app.command("path")
def weights_path():
    """Print the weights file commands use without --weights ($DINOV2_WEIGHTS, ./vit-dinov2-base.npz, the cache); never downloads."""
    from retrieval.hub import resolve_weights

    typer.echo(str(resolve_weights(None, allow_download=False)))


@app.command()
def embed(
    images: List[Path] = typer.Argument(..., help="Image files, encoded in this order."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .npy: float32 (N, D) raw features, one row per image."),
    weights: Optional[str] = WeightsOpt,
    preprocess: str = PreprocessOpt,
    interpolation: str = InterpolationOpt,
    pooling: str = PoolingOpt,
    batch_size: int = BatchOpt,
    precision: str = PrecisionOpt,
    offline: bool = OfflineOpt,
):
    """Encode image files into a .npy of raw (not normalised) features."""
    import numpy as np

    from retrieval.encoder import encode_pixels
    from retrieval.errors import InputError

    # checked before any encoding work: a typo in the output folder must not cost the whole run
    folder = out.parent
    if out.is_dir():
        raise InputError(f"--out {out}: is a folder, not a file name")
    if not folder.is_dir():
        raise InputError(f"--out {out}: no such folder {folder}")
    if not os.access(folder, os.W_OK):
        raise InputError(f"--out {out}: cannot write in {folder}")
    encoder = _encoder(weights, preprocess, interpolation, pooling, batch_size, precision, offline)
    feats = np.empty((len(images), encoder.dim), np.float32)  # (N, D)
    window = EMBED_WINDOW_BATCHES * encoder.settings.batch_size  # images decoded and held at a time
    for start in range(0, len(images), window):
        part = images[start:start + window]
        feats[start:start + len(part)] = encode_pixels(encoder, _pixels(part, preprocess))
    tmp = out.with_name(out.name + ".tmp.npy")
    np.save(tmp, feats)
    tmp.replace(out)
    typer.echo(f"{out}: {feats.shape[0]} x {feats.shape[1]} float32 ({encoder.model.cfg.variant}, {preprocess}, {interpolation}, {pooling})")


BEHAVIOURS = {
    "size": "size (transformers Dinov2Model)",
    "offset": "offset 0.1 (official dinov2)",
    "antialias": "antialias (register variants)",
}


@app.command()
def verify(
    images: List[Path] = typer.Argument(..., help="The images the reference features were computed from, in row order."),
    reference: Path = typer.Option(..., "--reference", "-r", help=".npy of reference features, (N, D), one row per image."),
    weights: Optional[str] = WeightsOpt,
    preprocess: str = PreprocessOpt,
    pooling: str = PoolingOpt,
    tolerance: float = typer.Option(1e-5, "--tolerance", help="Largest mean absolute error that counts as a match."),
    precision: str = PrecisionOpt,
    offline: bool = OfflineOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
):
    """Compare our features with reference features under each position-interpolation behaviour.

    Exit 0 when some behaviour is within the tolerance for every image, 1 when none is.
    """
    import json

    import numpy as np

    from retrieval import model as M
    from retrieval.errors import InputError

    try:
        ref = np.load(reference, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{reference}: not a readable .npy file ({exc})") from exc
    ref = np.atleast_2d(ref)
    encoder = _encoder(weights, preprocess, "hf", pooling, 8, precision, offline)
    if ref.shape != (len(images), encoder.dim):
        raise InputError(f"{reference}: holds features of shape {ref.shape}, expected ({len(images)}, {encoder.dim}) for {len(images)} images with {encoder.model.cfg.variant} {pooling}")
    pixels = _pixels(images, preprocess)
    rows = []
    for mode in M.POS_MODES:
        feats = np.concatenate([
            M.pool(M.forward(encoder.model, p[None], mode), encoder.model.cfg, pooling) for p in pixels
        ]).astype(np.float64)  # (N, D)
        for img, f, r in zip(images, feats, ref.astype(np.float64)):
            diff = np.abs(f - r)
            rows.append({
                "image": str(img), "behaviour": mode, "mae": float(diff.mean()), "max_error": float(diff.max()),
                "cosine": float(f @ r / (np.linalg.norm(f) * np.linalg.norm(r))),
            })
    matches = [m for m in M.POS_MODES if all(r["mae"] <= tolerance for r in rows if r["behaviour"] == m)]
    if as_json:
        typer.echo(json.dumps({"rows": rows, "matches": matches, "tolerance": tolerance}, indent=2))
    else:
        cfg = encoder.model.cfg
        typer.echo(f"weights    {encoder.weights_path} ({cfg.variant})")
        typer.echo(f"reference  {reference} {ref.shape}")
        typer.echo(f"preprocess {preprocess}, pooling {pooling}, {precision}")
        typer.echo("")
        width = max(len("image"), *(len(str(i)) for i in images))
        typer.echo(f"{'image':<{width}}  {'behaviour':<31}  {'MAE':>9}  {'max error':>9}  {'cosine':>10}")
        for r in rows:
            typer.echo(f"{r['image']:<{width}}  {BEHAVIOURS[r['behaviour']]:<31}  {r['mae']:9.3e}  {r['max_error']:9.3e}  {r['cosine']:10.8f}")
        typer.echo("")
        if matches:
            typer.echo(f"match: {', '.join(BEHAVIOURS[m] for m in matches)} (every image within MAE {tolerance:g})")
        else:
            typer.echo(f"no match: no behaviour within MAE {tolerance:g} for every image")
    if not matches:
        raise typer.Exit(1)
