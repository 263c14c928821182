"""Training throughput and peak memory: regvi's RegularizedMultimodalVI vs scvi-tools MultiVI.

Both models train on the same MuData (RNA + ATAC), for the same number of epochs and the same
minibatch size, each in its own fresh Python process (so peak memory is per model). Reported:
cells/s (training cells x epochs / wall time of ``train``) and peak memory (CUDA: peak
allocated; CPU: peak RSS growth during training), then the regvi / MultiVI ratios.

    python benchmarks/bench_multivi.py                       # muon 1000-cell multiome
    python benchmarks/bench_multivi.py --data x.h5mu --epochs 20 --accelerator gpu
    python benchmarks/bench_multivi.py --simulate 20000 2000 # cells, features per modality

Needs scvi-tools: ``pip install "regvi[bench]"``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

DEFAULT_DATA = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "multiome_pbmc_muon_1000cells.h5mu"
)


def _rss_mb(field: str = "VmRSS") -> float:
    """Current (VmRSS) or peak (VmHWM) resident memory of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1]) / 1024
    return 0.0


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak covers training only.
    (ru_maxrss cannot be used: after fork+exec it can report the parent's peak.)"""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _worker(which: str, path: str, epochs: int, batch_size: int, accelerator: str) -> dict:
    import mudata
    import torch

    warnings.simplefilter("ignore")
    mdata = mudata.read_h5mu(path)
    cuda = accelerator == "gpu" and torch.cuda.is_available()
    if which == "regvi":
        from regvi import RegularizedMultimodalVI

        RegularizedMultimodalVI.setup_mudata(mdata, modalities=["rna", "atac"])
        model = RegularizedMultimodalVI(
            mdata, n_latent={"rna": 10, "atac": 10}, n_hidden=128, use_ambient=False
        )
    else:
        import scvi

        scvi.model.MULTIVI.setup_mudata(
            mdata, modalities={"rna_layer": "rna", "atac_layer": "atac"}
        )
        model = scvi.model.MULTIVI(mdata, n_latent=20, n_hidden=128)
    baseline = _rss_mb()
    _reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model.train(
        max_epochs=epochs,
        batch_size=batch_size,
        train_size=0.9,
        accelerator=accelerator,
        devices=1,
        early_stopping=False,
        enable_progress_bar=False,
    )
    seconds = time.perf_counter() - start
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mb("VmHWM") - baseline
    n_train = int(round(0.9 * mdata.n_obs))
    return {"seconds": seconds, "cells_per_s": n_train * epochs / seconds, "peak_mb": peak_mb}


def _simulate(n_cells: int, n_features: int, out: Path) -> Path:
    import mudata

    from regvi.datasets import simulate_multiome

    rna, atac, _ = simulate_multiome(n_cells=n_cells, n_genes=n_features, n_peaks=n_features)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mdata = mudata.MuData({"rna": rna, "atac": atac})
        mdata.write_h5mu(out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--simulate", type=int, nargs=2, metavar=("CELLS", "FEATURES"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--worker", choices=["regvi", "multivi"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(
            json.dumps(
                _worker(args.worker, str(args.data), args.epochs, args.batch_size, args.accelerator)
            )
        )
        return 0
    try:
        import scvi  # noqa: F401
    except ImportError:
        print('scvi-tools is not installed: pip install "regvi[bench]" to run this benchmark')
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        data = _simulate(*args.simulate, Path(tmp) / "sim.h5mu") if args.simulate else args.data
        if not data.exists():
            print(f"data file not found: {data}")
            return 1
        results = {}
        for which in ("regvi", "multivi"):
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                which,
                "--data",
                str(data),
                "--epochs",
                str(args.epochs),
                "--batch-size",
                str(args.batch_size),
                "--accelerator",
                args.accelerator,
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{which} failed:\n{proc.stderr[-2000:]}")
                return 1
            results[which] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"data: {data.name if not args.simulate else args.simulate}; epochs {args.epochs}, "
        f"batch {args.batch_size}, {args.accelerator}"
    )
    for which, r in results.items():
        print(
            f"{which:8s} {r['cells_per_s']:10.0f} cells/s  {r['seconds']:7.1f} s  "
            f"peak {r['peak_mb']:8.1f} MB"
        )
    speed = results["regvi"]["cells_per_s"] / results["multivi"]["cells_per_s"]
    memory = results["regvi"]["peak_mb"] / max(results["multivi"]["peak_mb"], 1e-9)
    print(f"ratio regvi/MultiVI: throughput {speed:.2f}x, peak memory {memory:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
