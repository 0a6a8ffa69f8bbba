"""Encoder throughput: our NumPy forward pass against transformers' Dinov2Model on the same CPU.

    .venv/bin/python bench/bench_encoder.py            # every setting + the whole-process run, with the eager column
    .venv/bin/python bench/bench_encoder.py --no-eager # the same against the default (SDPA) only (~9 min, quiet machine)
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/bench_encoder.py   # where those are set
    .venv/bin/python bench/bench_encoder.py --quick    # base 224x224 b8 and b1 only, fewer runs (~1 min)
    .venv/bin/python bench/bench_encoder.py --settings base:224x224:8 --no-cli

What it measures, in ONE run (side by side on the same, possibly busy, machine):

1. Threads: ours = the BLAS threads threadpoolctl reports for NumPy (our element-wise threads use the
   same count, ``retrieval.model.THREADS``); torch gets ``torch.set_num_threads(ours)``. The BLAS
   kernel in use (threadpoolctl's ``architecture``) and OPENBLAS_CORETYPE are printed: a forced older
   kernel (e.g. OPENBLAS_CORETYPE=Haswell on an AVX-512 machine) halves NumPy's GEMM speed.
2. NumPy's float32 GEMM speed: (2048 x 768) @ (768 x 3072), median of 20 after warm-up, in its own process.
3. Per setting (variant : H x W : batch), each side in its own subprocess (so neither side's threads,
   caches or memory figures touch the other's), random weights of the real shapes
   (``random_params(official_config(variant), seed)``), the same random pixels:
     - NumPy: ``retrieval.model.embed(model, pixels)`` (CLS feature: the tool's work; the last layer
       only finishes the CLS rows), or with ``:all`` ``retrieval.model.forward`` (every token);
     - torch: transformers' ``Dinov2Model`` as its users run it: ``tests/reference.py: hf_model``
       (``from_pretrained`` with transformers' DEFAULT attention implementation, SDPA on CPU), float32,
       called through ``reference.hf_run`` under ``torch.inference_mode()``. The "ratio" column is
       NumPy against this;
     - torch eager (an extra column, unless --no-eager): the same with ``attn_implementation="eager"``,
       which is slower than the default on CPU; "ratio vs eager" is NumPy against it;
   warm-up runs, then timed runs (at least --repeats and about --min-seconds); images/s from the median.
   Rounds alternate the order (NumPy, torch, eager, eager, torch, NumPy, ...) and pool the times, so
   drift in the machine's load hits every side.
     - % of roofline: the roofline is the images/s the measured GEMM rate allows for the model's forward
       pass (GFLOP of every matrix product of the whole forward, every token: patch embedding, QKV,
       attention scores and values, proj, fc1, fc2), i.e. GEMM GFLOP/s / forward GFLOP; the column is
       NumPy's images/s as a share of it.
     - GEMM use: the stricter figure, the GFLOP the timed NumPy path itself performs (``embed`` skips the
       last layer's work for tokens other than CLS: 43.4 instead of 46.3 GFLOP for base at 224x224) per
       second, as a share of the GEMM rate: how much of the time is spent in GEMMs running at full speed.
     - peak RSS: each subprocess's peak resident memory while running the model (VmHWM, reset with
       /proc/self/clear_refs after the weights are loaded and glibc's free memory is trimmed, so loading
       transients of either side do not count; the process-lifetime ru_maxrss is in the JSON). It
       includes the weights, the libraries and the activations.
4. Whole process: ``cli.py embed --batch-size 8`` over --images generated JPEGs of three aspect ratios
   (resize-short gives three shapes, so batches are full) against ``bench/hf_embed.py`` (transformers
   loading the same safetensors with ``from_pretrained`` and its default attention, the same decoding,
   preprocessing and batching; with eager attention too unless --no-eager), wall time of the whole
   process (interpreter start, imports, loading, encoding, writing), median of --cli-rounds alternated
   runs; the outputs are compared as a check.

Prints a Markdown table (and writes the raw figures with --json PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_SETTINGS = [
    "base:224x224:8", "base:224x224:1", "base:224x308:8", "small:224x224:8", "large:224x224:8",
    "base:224x224:8:all",
]
QUICK_SETTINGS = ["base:224x224:8", "base:224x224:1"]
SEED = 0


# ---------------------------------------------------------------- shared


def parse_setting(s: str) -> dict:
    parts = s.split(":")
    variant, size, batch = parts[:3]
    H, W = (int(v) for v in size.lower().split("x"))
    return {"variant": variant, "H": H, "W": W, "batch": int(batch), "all": parts[3:] == ["all"], "name": s}


def gflop(cfg, H: int, W: int, cls_only: bool) -> float:
    """GFLOP of one image's forward pass, counting every matrix product (2 per multiply-add).

    cls_only: our ``embed`` path, whose last layer computes QKV for every token but attention, proj and
    the FFN only for the CLS token.
    """
    p, D, F, Hd = cfg.patch, cfg.dim, cfg.hidden, cfg.heads
    N = (H // p) * (W // p)
    T = 1 + cfg.registers + N
    f1 = 2 * F if cfg.ffn == "swiglu" else F

    def layer(q_rows):
        return (2 * T * D * 3 * D  # QKV (every token: keys and values are always needed)
                + 2 * q_rows * T * D * 2  # scores q k^T and values s v, all heads
                + 2 * q_rows * D * D  # proj
                + 2 * q_rows * D * f1 + 2 * q_rows * F * D)  # fc1, fc2

    total = 2 * N * 3 * p * p * D + (cfg.depth - 1) * layer(T) + layer(1 if cls_only else T)
    return total / 1e9


def blas_info() -> dict:
    from threadpoolctl import threadpool_info

    for lib in threadpool_info():
        if lib.get("user_api") == "blas" and "numpy" in lib.get("filepath", ""):
            return lib
    blas = [lib for lib in threadpool_info() if lib.get("user_api") == "blas"]
    return blas[0] if blas else {}


def peak_reset() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """glibc keeps freed memory for reuse; malloc_trim returns it, so RSS shows live memory only."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def vm_hwm_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- workers (subprocesses)


def worker_sgemm(args) -> dict:
    a = np.random.default_rng(0).standard_normal((2048, 768), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((768, 3072), dtype=np.float32)
    c = np.empty((2048, 3072), np.float32)
    for _ in range(3):
        np.matmul(a, b, out=c)
    times = []
    for _ in range(args.sgemm_repeats):
        t = time.perf_counter()
        np.matmul(a, b, out=c)
        times.append(time.perf_counter() - t)
    flop = 2 * 2048 * 768 * 3072
    return {"gflops_median": flop / statistics.median(times) / 1e9, "gflops_best": flop / min(times) / 1e9,
            "blas": {k: blas_info().get(k) for k in ("internal_api", "version", "architecture", "num_threads")}}


class OtherLoad:
    """Cores used by other processes while the block runs: machine-wide busy time (/proc/stat) minus ours."""

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return None
        t = os.times()
        return sum(v[:3]) + sum(v[5:8]), sum(v), (t.user + t.system) * os.sysconf("SC_CLK_TCK")

    def __enter__(self):
        self.start, self.cores = self._sample(), None
        return self

    def __exit__(self, *exc):
        end = self._sample()
        if self.start and end and end[1] > self.start[1]:
            busy, total, mine = (e - s for e, s in zip(end, self.start))
            self.cores = max(0.0, (busy - mine) / total * (os.cpu_count() or 1))


def _time_runs(fn, warmup: int, repeats: int, min_seconds: float) -> list:
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_seconds and len(times) < 4 * repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def worker_run(args) -> dict:
    from retrieval.variants import official_config, random_params

    s = parse_setting(args.setting)
    cfg = official_config(s["variant"])
    pixels = np.random.default_rng(1).standard_normal((s["batch"], 3, s["H"], s["W"]), dtype=np.float32)
    threads = blas_info().get("num_threads") or 1
    if args.worker == "numpy":
        from retrieval import model as M

        model = M.prepare(random_params(cfg, SEED), cfg)
        if s["all"]:
            def fn():
                return M.forward(model, pixels, "size")
        else:
            def fn():
                return M.embed(model, pixels)
        extra = {"threads": threads, "element_threads": M.THREADS}
    else:  # "torch": transformers' default attention (SDPA), as users run it; "eager": the extra column
        import torch

        sys.path.insert(0, str(ROOT / "tests"))
        from reference import hf_model, hf_run

        torch.set_num_threads(threads)
        model = hf_model(random_params(cfg, SEED), cfg, attn_implementation="eager" if args.worker == "eager" else None)
        x = torch.from_numpy(pixels)

        def fn():
            return hf_run(model, x)

        extra = {"threads": torch.get_num_threads(), "attn": model.config._attn_implementation,
                 "torch": torch.__version__}
    import gc

    gc.collect()
    trim_heap()  # hand the freed loading buffers back, for both sides alike
    load_peak = maxrss_mb()
    reset = peak_reset()
    with OtherLoad() as load:
        times = _time_runs(fn, args.warmup, args.repeats, args.min_seconds)
    return {"times": times, "other_load_cores": load.cores, "peak_rss_mb": vm_hwm_mb() if reset else maxrss_mb(), "peak_is_run_only": reset,
            "process_maxrss_mb": maxrss_mb(), "load_maxrss_mb": load_peak, **extra}


def run_worker(kind: str, args, setting: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--warmup", str(args.warmup), "--repeats", str(args.repeats),
           "--min-seconds", str(args.min_seconds), "--sgemm-repeats", str(args.sgemm_repeats)]
    if setting:
        cmd += ["--setting", setting]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} {setting}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- whole process


def make_photos(folder: Path, n: int) -> list:
    """n photo-like JPEGs in three aspect ratios (640x480, 480x640, 500x500), all different."""
    from PIL import Image, ImageDraw

    sizes = [(640, 480), (480, 640), (500, 500)]
    paths = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        rng = np.random.default_rng(100 + i)
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], -1)
        img = Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
            d.ellipse([x0, y0, x0 + int(rng.integers(5, w // 2)), y0 + int(rng.integers(5, h // 2))],
                      fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        path = folder / f"img{i:03d}.jpg"
        img.save(path, quality=90)
        paths.append(path)
    return paths


def write_model_dir(folder: Path, variant: str) -> Path:
    """model.safetensors (our writer, hub names) + config.json (what transformers' from_pretrained reads)."""
    from retrieval.variants import official_config, random_params
    from retrieval.weights import save_params

    cfg = official_config(variant)
    save_params(random_params(cfg, SEED), folder / "model.safetensors")
    config = {
        "architectures": ["Dinov2Model"], "model_type": "dinov2", "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.heads, "mlp_ratio": 4,
        "image_size": cfg.grid * cfg.patch, "patch_size": cfg.patch, "num_channels": 3,
        "layer_norm_eps": cfg.eps, "use_swiglu_ffn": cfg.ffn == "swiglu", "hidden_act": "gelu",
        "layerscale_value": 1.0, "qkv_bias": True, "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def timed_process(cmd: list) -> tuple[float, float, str]:
    """Wall seconds, the child's own peak RSS (MB) and its stdout, of one command."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]}...: exit {proc.returncode}\n{err.decode()[-3000:]}")
    return wall, usage.ru_maxrss / 1024, out.decode()


def whole_process(args, threads: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_encoder_") as tmp:
        tmp = Path(tmp)
        photos = make_photos(tmp, args.images)
        mdir = write_model_dir(tmp, "base")
        ours_out, hf_out = tmp / "ours.npy", tmp / "hf.npy"
        ours = [sys.executable, "cli.py", "embed", *map(str, photos), "--weights", str(mdir / "model.safetensors"),
                "--batch-size", "8", "--offline", "--out", str(ours_out)]
        hf = [sys.executable, str(ROOT / "bench" / "hf_embed.py"), *map(str, photos), "--model-dir", str(mdir),
              "--batch-size", "8", "--threads", str(threads), "--out", str(hf_out)]
        eager_out = tmp / "hf_eager.npy"
        cmds = {"ours": ours, "hf": hf}
        if not args.no_eager:
            cmds["hf_eager"] = hf[:-2] + ["--attn", "eager", "--out", str(eager_out)]
        res = {k: [] for side in cmds for k in (side, side + "_rss")}
        for r in range(args.cli_rounds):
            for side in (list(cmds) if r % 2 == 0 else list(cmds)[::-1]):
                wall, rss, out = timed_process(cmds[side])
                res[side].append(wall)
                res[side + "_rss"].append(rss)
                if side != "ours":  # hf_embed.py's last line names the attention implementation it ran
                    res[side + "_attn"] = out.strip().rsplit("(transformers ", 1)[-1].rstrip(")")
        a = np.load(ours_out).astype(np.float64)
        for ref in [hf_out] + ([eager_out] if "hf_eager" in cmds else []):
            b = np.load(ref).astype(np.float64)
            res["rel_max"] = max(res.get("rel_max", 0.0), float(np.abs(a - b).max() / np.abs(b).max()))
            res["cos_min"] = min(res.get("cos_min", 1.0), float(np.min(
                np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))))
        res["images"] = len(photos)
        return res


# ---------------------------------------------------------------- per-operation profile


def profile(setting: str, runs: int = 3) -> None:
    """Where thread 0's time goes in our forward pass (the other threads do the same kind of work alongside):
    the model's internal steps wrapped with timers that count each step's own time (nested steps excluded)."""
    import threading
    from collections import defaultdict

    from retrieval import model as M
    from retrieval.variants import official_config, random_params

    s = parse_setting(setting)
    cfg = official_config(s["variant"])
    model = M.prepare(random_params(cfg, SEED), cfg)
    pixels = np.random.default_rng(1).standard_normal((s["batch"], 3, s["H"], s["W"]), dtype=np.float32)
    own = defaultdict(float)
    stack = []  # [name, start, time of nested timed calls]
    main = threading.main_thread()

    def timed(name, fn):
        def wrapper(*a, **k):
            if threading.current_thread() is not main:
                return fn(*a, **k)
            stack.append([name, time.perf_counter(), 0.0])
            try:
                return fn(*a, **k)
            finally:
                _, t0, nested = stack.pop()
                spent = time.perf_counter() - t0
                own[name] += spent - nested
                if stack:
                    stack[-1][2] += spent
        return wrapper

    names = {
        "_embed_part": "patch embedding GEMM + CLS/positions",
        "_qkv_part": "QKV GEMM",
        "attention_heads": "attention: scores GEMM, softmax, values GEMM",
        "_attention_part": "proj GEMM",
        "_ffn_part": "fc1 + fc2 GEMMs",
        "gelu": "GELU",
        "_residual_norm": "residual adds",
        "normalize_into": "LayerNorm (normalise rows; affine folded)",
        "block_cls": "last layer, CLS rows only",
        "_layers": "per-thread set-up",
        "_spread": "thread start, set-up",
    }
    originals = {n: getattr(M, n) for n in names}
    for n, fn in originals.items():
        setattr(M, n, timed(n, fn))
    layers = M._layers

    def layers_with_waits(w, model_, sh, sync, cls_only):
        return layers(w, model_, sh, timed("sync", sync), cls_only)

    M._layers = layers_with_waits
    run = (lambda: M.forward(model, pixels, "size")) if s["all"] else (lambda: M.embed(model, pixels))
    try:
        run()
        own.clear()
        t = time.perf_counter()
        for _ in range(runs):
            run()
        total = (time.perf_counter() - t) / runs * 1e3
    finally:
        for n, fn in originals.items():
            setattr(M, n, fn)
        M._layers = layers
    names["sync"] = "waiting for the other thread(s)"
    rows = [(label, own.get(n, 0.0) / runs * 1e3) for n, label in names.items() if n in own]
    rows.append(("rest (outside the steps above)", total - sum(v for _, v in rows)))
    print(f"Per-operation time, {setting}, thread 0 of {M.THREADS}, mean of {runs} runs:\n")
    print("| operation | ms per batch | share |")
    print("|---|---:|---:|")
    for label, v in sorted(rows, key=lambda r: -r[1]):
        print(f"| {label} | {v:.1f} | {100 * v / total:.1f}% |")
    print(f"| **total** | **{total:.1f}** | {s['batch'] / total * 1e3:.2f} img/s |")


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="base 224x224 b8 and b1, 1 round, 3 runs, no whole-process run")
    ap.add_argument("--settings", nargs="+", help="variant:HxW:batch[:all], e.g. base:224x308:8")
    ap.add_argument("--rounds", type=int, default=2, help="subprocess rounds per side and setting (order alternates)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per round, at least")
    ap.add_argument("--min-seconds", type=float, default=4.0, help="keep timing up to this long (max 4x repeats)")
    ap.add_argument("--sgemm-repeats", type=int, default=20)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-eager", action="store_true",
                    help="skip the extra transformers-with-eager-attention column (the reference is transformers' default, SDPA)")
    ap.add_argument("--no-cli", action="store_true", help="skip the whole-process comparison")
    ap.add_argument("--images", type=int, default=48, help="images for the whole-process comparison")
    ap.add_argument("--cli-rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write the raw figures here")
    ap.add_argument("--profile", metavar="SETTING", help="only print where our forward spends its time, e.g. base:224x224:8")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--setting", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        out = worker_sgemm(args) if args.worker == "sgemm" else worker_run(args)
        print(json.dumps(out))
        return 0

    if args.profile:
        profile(args.profile)
        return 0
    if args.quick:
        args.settings = args.settings or QUICK_SETTINGS
        args.rounds, args.repeats, args.min_seconds, args.no_cli, args.no_eager = 1, 3, 0.0, True, True
    settings = [parse_setting(s) for s in (args.settings or DEFAULT_SETTINGS)]

    from retrieval.variants import official_config

    info = blas_info()
    threads = info.get("num_threads") or 1
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), platform.processor()) \
        if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"# machine: {cpu}, {os.cpu_count()} cores; numpy {np.__version__}; BLAS {info.get('internal_api')} "
          f"{info.get('version')} kernel {info.get('architecture')} ({threads} threads); "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}", flush=True)
    if os.environ.get("OPENBLAS_CORETYPE"):
        print("# note: OPENBLAS_CORETYPE chooses OpenBLAS's kernel instead of OpenBLAS itself; where it names an older "
              "CPU than this one, NumPy's GEMM runs slower than it can (run with `env -u OPENBLAS_CORETYPE "
              "-u OPENBLAS_L2_SIZE` to compare)", flush=True)
    sg = run_worker("sgemm", args)
    print(f"# float32 GEMM (2048x768 @ 768x3072): {sg['gflops_median']:.0f} GFLOP/s median, "
          f"{sg['gflops_best']:.0f} best", flush=True)

    rows = []
    for s in settings:
        cfg = official_config(s["variant"])
        g = gflop(cfg, s["H"], s["W"], cls_only=not s["all"])
        g_forward = gflop(cfg, s["H"], s["W"], cls_only=False)
        sides = ["numpy"] if args.no_torch else ["numpy", "torch"] if args.no_eager else ["numpy", "torch", "eager"]
        times = {side: [] for side in sides}
        rss = {side: [] for side in sides}
        loads = []
        meta = {}
        for r in range(args.rounds):
            for side in (sides if r % 2 == 0 else sides[::-1]):
                out = run_worker(side, args, s["name"])
                times[side] += out["times"]
                rss[side].append(out["peak_rss_mb"])
                loads.append(out["other_load_cores"] or 0.0)
                meta[side] = out
        row = {"setting": s["name"], "gflop_per_image": g, "forward_gflop_per_image": g_forward,
               "roofline_images_per_s": sg["gflops_median"] / g_forward, "sgemm_gflops": sg["gflops_median"],
               "other_load_cores": max(loads)}
        for side in sides:
            med = statistics.median(times[side])
            row[side] = {"images_per_s": s["batch"] / med, "best_images_per_s": s["batch"] / min(times[side]),
                         "runs": len(times[side]), "peak_rss_mb": max(rss[side]),
                         **{k: v for k, v in meta[side].items() if k not in ("times", "peak_rss_mb")}}
        row["roofline_pct"] = 100 * row["numpy"]["images_per_s"] / row["roofline_images_per_s"]
        row["gemm_use_pct"] = 100 * g * row["numpy"]["images_per_s"] / sg["gflops_median"]
        if "torch" in row:
            row["ratio"] = row["numpy"]["images_per_s"] / row["torch"]["images_per_s"]
        if "eager" in row:
            row["ratio_eager"] = row["numpy"]["images_per_s"] / row["eager"]["images_per_s"]
        rows.append(row)
        print(f"# {s['name']}: numpy {row['numpy']['images_per_s']:.2f} img/s"
              + (f", torch ({row['torch']['attn']}) {row['torch']['images_per_s']:.2f} img/s, ratio {row['ratio']:.2f}"
                 if "ratio" in row else "")
              + (f", torch (eager) {row['eager']['images_per_s']:.2f} img/s, ratio {row['ratio_eager']:.2f}"
                 if "ratio_eager" in row else "")
              + f", {row['roofline_pct']:.1f}% of roofline ({row['roofline_images_per_s']:.2f} img/s), GEMM use "
              f"{row['gemm_use_pct']:.1f}%; other processes used up to {row['other_load_cores']:.2f} cores",
              flush=True)

    cli = None
    if not args.no_cli and not args.no_torch:
        cli = whole_process(args, threads)

    print()
    print(f"BLAS kernel {info.get('architecture')}, {threads} threads (torch.set_num_threads({threads})), "
          f"float32 GEMM {sg['gflops_median']:.0f} GFLOP/s")
    print()
    attn = next((r["torch"]["attn"] for r in rows if "torch" in r), "default")
    eager = any("eager" in r for r in rows)
    print(f"| setting | forward GFLOP | roofline img/s | NumPy img/s | torch ({attn}) img/s | ratio vs {attn} "
          f"| % of roofline | GEMM use | peak RSS NumPy | peak RSS torch ({attn}) |"
          + (" extra: torch (eager) img/s | extra: ratio vs eager |" if eager else ""))
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if eager else ""))
    for row in rows:
        name = row["setting"].replace(":all", " (all tokens)")
        v, hw, b = name.split(":")[0], name.split(":")[1], name.split(":")[2]
        t, e = row.get("torch"), row.get("eager")
        print(f"| {v} {hw} b{b} | {row['forward_gflop_per_image']:.1f} | {row['roofline_images_per_s']:.2f} | "
              f"{row['numpy']['images_per_s']:.2f} | "
              + (f"{t['images_per_s']:.2f} | **{row['ratio']:.2f}x** | " if t else "- | - | ")
              + f"{row['roofline_pct']:.0f}% | {row['gemm_use_pct']:.0f}% | {row['numpy']['peak_rss_mb']:.0f} MB | "
              + (f"{t['peak_rss_mb']:.0f} MB |" if t else "- |")
              + (f" {e['images_per_s']:.2f} | {row['ratio_eager']:.2f}x |" if e else (" - | - |" if eager else "")))
    busy = [r["setting"] for r in rows if r["other_load_cores"] > 0.2]
    if busy:
        print(f"\nNOISY: other processes used more than 0.2 cores during {', '.join(busy)}: re-run on a quiet machine.")
    if cli:
        o, h = statistics.median(cli["ours"]), statistics.median(cli["hf"])
        print()
        print(f"Whole process, {cli['images']} JPEGs, batch size 8 (median of {len(cli['ours'])}): "
              f"`cli.py embed` {o:.1f} s (peak RSS {max(cli['ours_rss']):.0f} MB), transformers with its default "
              f"attention ({cli['hf_attn']}) {h:.1f} s (peak RSS {max(cli['hf_rss']):.0f} MB): **{h / o:.2f}x**"
              + (f"; extra: transformers with eager attention {statistics.median(cli['hf_eager']):.1f} s (peak RSS "
                 f"{max(cli['hf_eager_rss']):.0f} MB): {statistics.median(cli['hf_eager']) / o:.2f}x"
                 if cli.get("hf_eager") else "")
              + f"; features agree to {cli['rel_max']:.1e} (relative max error), cosine >= {cli['cos_min']:.7f}")
        print(f"(all runs, s: cli.py embed {', '.join(f'{t:.1f}' for t in cli['ours'])}; transformers default "
              f"{', '.join(f'{t:.1f}' for t in cli['hf'])}"
              + (f"; transformers eager {', '.join(f'{t:.1f}' for t in cli['hf_eager'])}" if cli.get("hf_eager") else "")
              + ")")
    if args.json:
        args.json.write_text(json.dumps({"blas": info, "sgemm": sg, "rows": rows, "cli": cli}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
