"""regvi vs scvi-tools SCVI differential expression on data with planted DE genes and ambient
soup (``regvi.datasets.simulate_de``).

Three cell types: ``type_A`` and ``type_B`` rare (15% of the cells each), ``type_C`` abundant
(70%), whose marker genes (the "ambient-only" genes: A and B barely express them) dominate
the soup. ``type_A`` cells hold less RNA, so the soup is a larger share of their counts. Both
tools train on the same counts with the same architecture and epochs (batch key = the
libraries) and compare ``type_A`` with ``type_B`` (``mode="change"``, delta 0.25, FDR 5%).

Printed per tool: AUROC of the planted DE genes by ``proba_de``; the false-positive rate
among the ambient-only genes (the fraction called DE at FDR 5%) and their mean ``proba_de``;
the false-positive rate among the other null genes; and the true-positive rate.

Usage::

    python benchmarks/bench_de.py                    # 2000 cells x 200 genes, 100 epochs
    python benchmarks/bench_de.py --cells 4000 --epochs 200 --seeds 0,1,2
    # planted DE against regvi's hidden-unit dropout and encoder width (docs/integration.md)
    python benchmarks/bench_de.py --tools regvi --epochs 200 --seeds 0,1,2,3,4,5 --layers 2 \
        --samples 2000 --hidden 64 --hidden-dropout 0.3
    # the decoder's normalisation (docs/integration.md, stop 32)
    python benchmarks/bench_de.py --tools regvi --epochs 200 --seeds 0,1,2 --layers 2 \
        --cells 500 --genes 4000 --hidden 128 --latent 10 --samples 2000 --decoder-norm batch

Needs ``pip install "regvi[bench]"`` (scvi-tools) for the comparison.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from scipy.stats import rankdata


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the ``positive`` mask (rank statistic)."""
    ranks = rankdata(scores)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def summarise(table, truth, fdr_column: str) -> dict[str, float]:
    table = table.reindex([f"gene_{g}" for g in range(truth.de_genes.size)])
    proba = table["proba_de"].to_numpy(dtype=float)
    called = table[fdr_column].to_numpy(dtype=bool)
    null = ~truth.de_genes & ~truth.ambient_only
    return {
        "auroc_de": auroc(proba, truth.de_genes),
        "fpr_ambient": float(called[truth.ambient_only].mean()),
        "proba_ambient": float(proba[truth.ambient_only].mean()),
        "fpr_other_null": float(called[null].mean()),
        "tpr": float(called[truth.de_genes].mean()),
    }


def run_regvi(adata, args) -> object:
    from regvi.model import AmbientRegularizedSCVI

    AmbientRegularizedSCVI.setup_anndata(adata, batch_key="batch")
    options = {} if args.hidden_dropout is None else {"hidden_dropout_rate": args.hidden_dropout}
    if args.decoder_norm is not None:
        options["decoder_norm"] = args.decoder_norm
    model = AmbientRegularizedSCVI(
        adata, n_latent=args.latent, n_hidden=args.hidden, n_layers=args.layers, **options
    )
    model.train(max_epochs=args.epochs, batch_size=128, enable_progress_bar=False)
    return model.differential_expression(
        groupby="cell_type", group1="type_A", group2="type_B", n_samples=args.samples
    )


def run_scvi(adata, args) -> object:
    import scvi

    scvi.settings.seed = 0
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    model = scvi.model.SCVI(adata, n_latent=args.latent, n_hidden=args.hidden, n_layers=args.layers)
    model.train(max_epochs=args.epochs, batch_size=128, enable_progress_bar=False)
    return model.differential_expression(
        groupby="cell_type",
        group1="type_A",
        group2="type_B",
        mode="change",
        delta=0.25,
        fdr_target=0.05,
        n_samples_overall=args.samples,
        silent=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=2000)
    parser.add_argument("--genes", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--latent", type=int, default=6)
    parser.add_argument("--layers", type=int, default=1, help="hidden layers (both tools)")
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--seeds", default="0", help="comma-separated simulation seeds")
    parser.add_argument("--tools", default="regvi,scvi")
    parser.add_argument(
        "--hidden-dropout", type=float, default=None, help="regvi's hidden_dropout_rate"
    )
    parser.add_argument(
        "--decoder-norm", default=None, help="regvi's decoder_norm (layer or batch)"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    import torch

    from regvi.datasets import simulate_de

    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for tool in args.tools.split(","):
            adata, truth = simulate_de(n_cells=args.cells, n_genes=args.genes, seed=seed)
            torch.manual_seed(seed)  # regvi's initialisation and minibatches; scVI seeds itself
            start = time.perf_counter()
            table = (run_regvi if tool == "regvi" else run_scvi)(adata, args)
            row = summarise(table, truth, "is_de_fdr_0.05")
            row.update(tool=tool, seed=seed, seconds=time.perf_counter() - start)
            rows.append(row)
            print(
                f"seed {seed} {tool:>5}: AUROC(DE) {row['auroc_de']:.3f}  "
                f"FPR ambient-only {row['fpr_ambient']:.2f} (mean proba_de "
                f"{row['proba_ambient']:.2f})  FPR other nulls {row['fpr_other_null']:.3f}  "
                f"TPR {row['tpr']:.2f}  ({row['seconds']:.0f} s)",
                flush=True,
            )
    print(
        f"\n{args.cells} cells x {args.genes} genes ({truth.de_genes.sum()} planted DE, "
        f"{truth.ambient_only.sum()} ambient-only), {args.epochs} epochs, type_A vs type_B"
    )
    for tool in args.tools.split(","):
        mine = [r for r in rows if r["tool"] == tool]
        means = {k: np.mean([r[k] for r in mine]) for k in ("auroc_de", "fpr_ambient", "tpr")}
        print(
            f"{tool:>5}: mean AUROC {means['auroc_de']:.3f}, mean FPR ambient-only "
            f"{means['fpr_ambient']:.2f}, mean TPR {means['tpr']:.2f} over {len(mine)} seed(s)"
        )


if __name__ == "__main__":
    main()
