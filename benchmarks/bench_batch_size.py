"""Does a larger minibatch hurt the fit? Held-out NLL and speed of regvi by batch size.

The same cells (10% held out of training entirely, the same split for every run) are trained
at each batch size with everything else at its default (learning rate, epochs from the
scvi-tools heuristic unless ``--epochs`` is given, KL warm-up over half the run). For each
batch size it prints the held-out reconstruction NLL per cell (posterior means, as
``get_reconstruction_error``), the training time and throughput, and the NLL difference to the
smallest batch size. Several seeds give the run-to-run spread to compare against.

    python benchmarks/bench_batch_size.py                   # the built-in dataset, 128..1024
    python benchmarks/bench_batch_size.py --data ../shared/data/pbmc_3tech_symphony_1500.h5ad
    python benchmarks/bench_batch_size.py --batch-sizes 256,1024 --seeds 0,1,2
    python benchmarks/bench_batch_size.py --sqrt-lr         # learning rate grown with the batch
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _data(args: argparse.Namespace):
    import anndata as ad

    from regvi.datasets import default_dataset

    if args.data:
        adata = ad.read_h5ad(args.data)
        label = args.data
    else:
        adata = default_dataset()
        label = "built-in simulated dataset"
    return adata, label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="an .h5ad with raw counts and obs[--batch-key]")
    parser.add_argument("--batch-key", default="batch")
    parser.add_argument("--batch-sizes", default="128,256,512,1024")
    parser.add_argument("--epochs", type=int, default=None, help="default: the heuristic")
    parser.add_argument("--seeds", default="0")
    parser.add_argument(
        "--sqrt-lr",
        action="store_true",
        help="scale the learning rate as 1e-3 * sqrt(batch / smallest batch)",
    )
    args = parser.parse_args()

    import torch

    from regvi import AmbientRegularizedSCVI

    adata, label = _data(args)
    adata.obs[args.batch_key] = adata.obs[args.batch_key].astype("category")
    held_out = np.random.default_rng(12345).random(adata.n_obs) < 0.1
    train, test = adata[~held_out].copy(), adata[held_out].copy()
    print(
        f"data: {label}: {train.n_obs} training cells, {test.n_obs} held out, {adata.n_vars} genes"
    )
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[int, list[tuple[float, float]]] = {b: [] for b in sizes}
    for seed in seeds:
        for batch_size in sizes:
            torch.manual_seed(seed)
            np.random.seed(seed)  # noqa: NPY002
            data = train.copy()
            AmbientRegularizedSCVI.setup_anndata(data, batch_key=args.batch_key)
            model = AmbientRegularizedSCVI(data)
            start = time.perf_counter()
            lr = 1e-3 * (batch_size / sizes[0]) ** 0.5 if args.sqrt_lr else 1e-3
            model.train(
                lr=lr,
                max_epochs=args.epochs,
                batch_size=batch_size,
                enable_progress_bar=False,
                accelerator="cpu",
            )
            seconds = time.perf_counter() - start
            nll = model.get_reconstruction_error(test)
            results[batch_size].append((nll, seconds))
            epochs = int(model.history_["epoch"].max()) + 1
            print(
                f"seed {seed} batch {batch_size:5d}: held-out NLL {nll:9.2f}  "
                f"{seconds:6.1f} s  ({epochs} epochs, "
                f"{epochs * model.n_obs_training_ / seconds:.0f} cells/s)",
                flush=True,
            )
    base = np.mean([r[0] for r in results[sizes[0]]])
    print("summary (mean over seeds):")
    for batch_size in sizes:
        nlls = np.array([r[0] for r in results[batch_size]])
        secs = np.mean([r[1] for r in results[batch_size]])
        spread = f" ± {nlls.std(ddof=1):.2f}" if nlls.size > 1 else ""
        print(
            f"  batch {batch_size:5d}: held-out NLL {nlls.mean():9.2f}{spread} "
            f"({(nlls.mean() - base) / abs(base):+.2%} vs batch {sizes[0]}), {secs:.1f} s"
        )


if __name__ == "__main__":
    main()
