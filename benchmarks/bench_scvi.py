"""regvi vs scvi-tools SCVI: training throughput, peak RSS and held-out NLL, side by side.

Each tool trains in its own subprocess (so peak RSS is its own) on the same data, with the
same architecture (n_hidden, n_latent, n_layers), batch size and epochs, NB likelihood for
both. 10% of the cells are held out of training entirely; held-out NLL is each tool's mean
per-cell reconstruction NLL on them (regvi: posterior means; scvi: its
``get_reconstruction_error``, one posterior sample).

Usage::

    python benchmarks/bench_scvi.py                       # simulated 10k x 2k, batch 128 and 1024
    python benchmarks/bench_scvi.py --cells 100000 --genes 20000 --epochs 1
    python benchmarks/bench_scvi.py --data ../shared/data/pbmc_3tech_symphony_1500.h5ad
    python benchmarks/bench_scvi.py --accelerator gpu
    python benchmarks/bench_scvi.py --repeats 3           # median of 3 interleaved runs each

KL warm-up: by default both tools anneal the KL(z) weight linearly over the first half of the
run's steps (regvi's default; scvi-tools gets the same step count), so the held-out NLLs
compare one objective. ``--kl-warmup defaults`` keeps each tool's own default instead
(scvi-tools: 400 epochs, so in a short run it is trained almost without the KL term, which
lowers its reconstruction NLL). Throughput does not depend on it.

With ``--repeats N`` the two tools run alternately N times and each figure is the median of
its N runs (peak RSS: the largest), which keeps a slow spell of a shared machine from landing
on one tool only.

Needs ``pip install "regvi[bench]"`` (scvi-tools) for the comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _prepare(args: argparse.Namespace, out: Path) -> tuple[Path, Path]:
    import anndata as ad

    if args.data:
        adata = ad.read_h5ad(args.data)
        label = Path(args.data).name
    else:
        from regvi.datasets import simulate

        adata, _ = simulate(
            n_cells=args.cells, n_genes=args.genes, n_batches=4, seed=0, return_rho=False
        )
        label = f"simulated {args.cells} x {args.genes}"
    adata.obs["batch"] = adata.obs["batch"].astype("category")
    rng = np.random.default_rng(0)
    test = rng.random(adata.n_obs) < 0.1
    train_path, test_path = out / "train.h5ad", out / "test.h5ad"
    adata[~test].copy().write_h5ad(train_path)
    adata[test].copy().write_h5ad(test_path)
    print(f"data: {label}, {int((~test).sum())} training cells, {int(test.sum())} held out")
    return train_path, test_path


#: KL warm-up over this fraction of the run's steps for both tools (``--kl-warmup matched``).
WARMUP_FRACTION = 0.5


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: after fork+exec Linux keeps
    the parent's high-water mark there."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(tool: str, train_path: str, test_path: str, cfg: dict) -> dict:
    import anndata as ad
    import torch

    torch.manual_seed(0)
    adata = ad.read_h5ad(train_path)
    test = ad.read_h5ad(test_path)
    arch = {k: cfg[k] for k in ("n_hidden", "n_latent", "n_layers")}
    train_kwargs = {
        "max_epochs": cfg["epochs"],
        "batch_size": cfg["batch_size"],
        "train_size": 1.0,
        "accelerator": cfg["accelerator"],
        "devices": 1,
        "enable_progress_bar": False,
    }
    if tool == "regvi":
        from regvi import AmbientRegularizedSCVI
        from regvi.train.host_memory import reuse_host_memory

        AmbientRegularizedSCVI.setup_anndata(adata, batch_key="batch")
        model = AmbientRegularizedSCVI(adata, **arch)
        start = time.perf_counter()
        with reuse_host_memory(cfg["reuse_host_memory"]):  # as the CLI run does
            model.train(**train_kwargs, kl_warmup_fraction=WARMUP_FRACTION)
        seconds = time.perf_counter() - start
        nll = model.get_reconstruction_error(test)
    else:
        import scvi

        scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
        model = scvi.model.SCVI(adata, gene_likelihood="nb", **arch)
        plan_kwargs = {}
        if cfg["kl_warmup"] == "matched":  # regvi's schedule, in optimiser steps
            steps = cfg["epochs"] * -(-adata.n_obs // cfg["batch_size"])
            plan_kwargs = {
                "n_epochs_kl_warmup": None,
                "n_steps_kl_warmup": round(WARMUP_FRACTION * steps),
            }
        start = time.perf_counter()
        model.train(**train_kwargs, plan_kwargs=plan_kwargs)
        seconds = time.perf_counter() - start
        scvi.model.SCVI.setup_anndata(test, batch_key="batch")
        nll = float(model.get_reconstruction_error(test)["reconstruction_loss"])
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    return {
        "cells_per_s": cfg["epochs"] * adata.n_obs / seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "peak_gpu_mb": peak_gpu,
        "heldout_nll": nll,
    }


def _summarise(runs: list[dict]) -> dict:
    """Median throughput and held-out NLL over repeated runs; the largest peak memory."""
    return {
        "cells_per_s": float(np.median([r["cells_per_s"] for r in runs])),
        "heldout_nll": float(np.median([r["heldout_nll"] for r in runs])),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "peak_gpu_mb": max(r["peak_gpu_mb"] for r in runs),
    }


def _run_worker(tool: str, train_path: Path, test_path: Path, cfg: dict) -> dict:
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--worker",
            tool,
            str(train_path),
            str(test_path),
            json.dumps(cfg),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="an .h5ad with raw counts and obs['batch']")
    parser.add_argument("--cells", type=int, default=10_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-sizes", default="128,1024")
    parser.add_argument("--n-hidden", type=int, default=128)
    parser.add_argument("--n-latent", type=int, default=10)
    parser.add_argument("--n-layers", type=int, default=1)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument(
        "--reuse-host-memory",
        choices=["on", "off"],
        default="on",
        help="regvi's trainer.reuse_host_memory (default on)",
    )
    parser.add_argument(
        "--kl-warmup",
        choices=["matched", "defaults"],
        default="matched",
        help="KL warm-up: the same schedule for both (default), or each tool's default",
    )
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs per tool")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        tool, train_path, test_path, cfg = args.worker
        print(json.dumps(_worker(tool, train_path, test_path, json.loads(cfg))))
        return
    try:
        import scvi  # noqa: F401
    except ImportError:
        sys.exit('scvi-tools is not installed: pip install "regvi[bench]"')
    with tempfile.TemporaryDirectory() as tmp:
        train_path, test_path = _prepare(args, Path(tmp))
        for batch_size in map(int, args.batch_sizes.split(",")):
            cfg = {
                "epochs": args.epochs,
                "batch_size": batch_size,
                "n_hidden": args.n_hidden,
                "n_latent": args.n_latent,
                "n_layers": args.n_layers,
                "accelerator": args.accelerator,
                "reuse_host_memory": {"on": True, "off": False}[args.reuse_host_memory],
                "kl_warmup": args.kl_warmup,
            }
            runs: dict[str, list[dict]] = {"regvi": [], "scvi": []}
            for _ in range(max(args.repeats, 1)):
                for tool in runs:
                    runs[tool].append(_run_worker(tool, train_path, test_path, cfg))
            r, s = _summarise(runs["regvi"]), _summarise(runs["scvi"])
            print(
                f"batch {batch_size} ({args.accelerator}, {args.epochs} epochs, "
                f"{args.n_hidden}/{args.n_latent}/{args.n_layers}, KL warm-up {args.kl_warmup}, "
                f"median of {max(args.repeats, 1)}):\n"
                f"  regvi {r['cells_per_s']:.0f} cells/s, peak RSS {r['peak_rss_mb']:.0f} MB, "
                f"peak GPU {r['peak_gpu_mb']:.0f} MB, held-out NLL {r['heldout_nll']:.1f}\n"
                f"  scvi  {s['cells_per_s']:.0f} cells/s, peak RSS {s['peak_rss_mb']:.0f} MB, "
                f"peak GPU {s['peak_gpu_mb']:.0f} MB, held-out NLL {s['heldout_nll']:.1f}\n"
                f"  ratio regvi/scvi: throughput {r['cells_per_s'] / s['cells_per_s']:.2f}x, "
                f"peak RSS {r['peak_rss_mb'] / s['peak_rss_mb']:.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
