"""The transformers side of bench_encoder.py's whole-process comparison: ``cli.py embed`` done with transformers.

    python bench/hf_embed.py IMAGE... --model-dir DIR --batch-size 8 --threads 2 --out feats.npy

DIR holds ``config.json`` and ``model.safetensors`` (the hub layout). The model is loaded as users of
transformers load it: ``AutoModel.from_pretrained`` in float32 with transformers' default attention
implementation (SDPA on CPU; ``--attn eager`` for the benchmark's extra column), through
``tests/reference.py: load_hf``, and run under ``torch.inference_mode()`` (``reference.hf_run``). The
images go through the same decoding and preprocessing as ``cli.py embed`` (``retrieval.decode.open_path``
+ ``retrieval.preprocess.preprocess``, resize-short by default), equal shapes are batched together as
``retrieval.encoder.encode_pixels`` does, and the CLS token of ``last_hidden_state`` is written as a
float32 (N, D) .npy, one row per image; the last line printed names the attention implementation used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("images", nargs="+", type=Path)
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, required=True, help="torch.set_num_threads")
    ap.add_argument("--preprocess", default="resize-short")
    ap.add_argument("--attn", help="attn_implementation (default: none given, so transformers picks its default, SDPA)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from reference import hf_run, load_hf

    from retrieval.decode import open_path
    from retrieval.preprocess import preprocess

    torch.set_num_threads(args.threads)
    model = load_hf(args.model_dir, args.attn)

    arrays = [preprocess(open_path(p), args.preprocess) for p in args.images]
    out = np.empty((len(arrays), model.config.hidden_size), np.float32)
    by_shape: dict[tuple, list[int]] = {}
    for i, a in enumerate(arrays):
        by_shape.setdefault(a.shape, []).append(i)
    with torch.inference_mode():
        for idx in by_shape.values():
            for start in range(0, len(idx), args.batch_size):
                chunk = idx[start:start + args.batch_size]
                pixels = torch.from_numpy(np.stack([arrays[i] for i in chunk]))  # (b, 3, H, W)
                out[chunk] = hf_run(model, pixels)[:, 0].numpy()
    np.save(args.out, out)
    print(f"{args.out}: {out.shape[0]} x {out.shape[1]} float32 (transformers {model.config._attn_implementation})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
