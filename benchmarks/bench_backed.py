"""Out-of-core training: peak RSS of `data.backed=true` vs in-memory as the file grows.

For each size, a simulated .h5ad is written to a temporary folder, then one epoch is trained
in a fresh process twice (in memory, and backed = minibatches read from disk), printing each
run's peak resident memory (VmHWM) and throughput. With backed training the peak should stay
flat while the in-memory peak grows with the file. A third run reads the file in shuffled
blocks of consecutive cells (``--block-cells``, default 64; ``shuffle_block_cells``).

    python benchmarks/bench_backed.py                      # 100k and 300k cells x 500 genes
    python benchmarks/bench_backed.py --cells 100000,1000000 --genes 2000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _worker(path: str, backed: bool, batch_size: int, block_cells: int | None) -> dict:
    from regvi import AmbientRegularizedSCVI
    from regvi.data.io import read_h5ad

    adata = read_h5ad(path, backed=backed)
    AmbientRegularizedSCVI.setup_anndata(adata, batch_key="batch")
    model = AmbientRegularizedSCVI(adata)
    start = time.perf_counter()
    model.train(
        max_epochs=1,
        batch_size=batch_size,
        train_size=1.0,
        enable_progress_bar=False,
        accelerator="cpu",
        shuffle_block_cells=block_cells,
    )
    seconds = time.perf_counter() - start
    return {"peak_rss_mb": _peak_rss_mb(), "cells_per_s": adata.n_obs / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", default="100000,300000")
    parser.add_argument("--genes", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument(
        "--block-cells",
        type=int,
        default=64,
        help="also train backed with shuffle_block_cells=N (0: skip)",
    )
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        path, backed, batch_size, block_cells = args.worker
        blocks = int(block_cells) or None
        print(json.dumps(_worker(path, backed == "1", int(batch_size), blocks)))
        return
    from regvi.datasets import simulate

    with tempfile.TemporaryDirectory() as tmp:
        for n_cells in map(int, args.cells.split(",")):
            path = Path(tmp) / f"sim_{n_cells}.h5ad"
            adata, _ = simulate(n_cells=n_cells, n_genes=args.genes, n_batches=4, return_rho=False)
            adata.write_h5ad(path)
            size_mb = path.stat().st_size / 2**20
            del adata
            row = []
            runs = [("in-memory", "0", "0"), ("backed", "1", "0")]
            if args.block_cells:
                runs.append((f"backed, blocks of {args.block_cells}", "1", str(args.block_cells)))
            for label, backed, blocks in runs:
                command = [sys.executable, __file__, "--worker", str(path), backed]
                proc = subprocess.run(
                    [*command, str(args.batch_size), blocks],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                row.append(
                    f"{label}: peak RSS {r['peak_rss_mb']:.0f} MB, {r['cells_per_s']:.0f} cells/s"
                )
            print(
                f"{n_cells} cells x {args.genes} genes (file {size_mb:.0f} MB): " + "; ".join(row),
                flush=True,
            )


if __name__ == "__main__":
    main()
