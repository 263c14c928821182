"""regvi vs scvi-tools SCVI: batch integration, biology kept and held-out NLL, side by side.

Each (tool, configuration, data set, seed) trains in its own subprocess on the same cells and
covariates; 10% of the cells (stratified by batch) are held out of training and give the
held-out NLL (mean per-cell negative log-likelihood, summed over genes). The latent of every
cell is scored with :func:`regvi.metrics.integration_metrics`:

* bio: label silhouette, NMI and ARI of k-means (k = number of labels), cLISI;
* batch: kNN batch entropy, iLISI, batch silhouette, graph connectivity;
* total = 0.6 bio + 0.4 batch (scIB's weighting), where the data have labels;
* without labels: kNN batch entropy, iLISI and the neighbourhood marker correlation (median
  Pearson correlation of a cell's immune-marker expression with its latent neighbours': all
  neighbours, and those from another batch), which falls when integration merges
  different cell types.

Both tools run at their defaults (``defaults``: scVI 128/10, regvi its defaults) and at a
matched high-capacity size (``512/128``: n_hidden 512, n_latent 128), with each tool's own
default number of epochs (scvi-tools' heuristic, min(round(20000/N*400), 400), for both) unless
``--epochs`` is given. Results are printed as mean ± sd over seeds, with the ratios
regvi / scVI. Every run's figures are kept as one JSON file under ``--cache`` (by default
``benchmarks/results/integration/``, committed with the code: the runs behind
``docs/integration.md``), keyed by the run's specification and :data:`REVISION`, so an
interrupted study resumes and the tables print again without retraining; pass an empty
``--cache`` directory to measure from scratch.

Ablations: ``--variant name='{"model": {...}, "train": {...}, "setup": {...}}'`` adds a regvi
configuration (model, train and setup_anndata keyword arguments over the defaults); see
``docs/integration.md`` for the study and its commands.

Usage::

    python benchmarks/bench_integration.py                       # every data set, 3 seeds
    python benchmarks/bench_integration.py --data pbmc_3tech --seeds 0 --sizes defaults
    python benchmarks/bench_integration.py --data atlas --tools regvi --variant \\
        no_ambient='{"model": {"use_ambient": false}}'

Needs ``pip install "regvi[bench]"`` (scvi-tools).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

#: The real data files; ``REGVI_BENCH_DATA`` names another folder holding them (a GPU node).
SHARED = Path(
    os.environ.get("REGVI_BENCH_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)

#: name -> (file or "atlas", labels key or None)
DATASETS: dict[str, tuple[str, str | None]] = {
    "pbmc_3tech": ("pbmc_3tech_symphony_1500.h5ad", "cell_type"),
    "atlas": ("atlas", "cell_type"),
    "kang": ("pbmc_kang_ctrl_stim_2000_unlabeled.h5ad", None),
    "pbmc1k_v2v3": ("pbmc1k_10x_v2_v3_unlabeled.h5ad", None),
}

#: Run only when named in ``--data``: a set restricted to its most variable genes (scanpy's
#: ``seurat_v3`` on the counts, per batch, as scvi-tools' tutorials select them), for
#: separating the number of input genes from the kind of batch effect. The neighbourhood
#: marker correlation still reads every gene of the file.
HVG_SUBSETS: dict[str, tuple[str, int]] = {
    "kang_hvg2000": ("kang", 2000),
    "pbmc1k_v2v3_hvg2000": ("pbmc1k_v2v3", 2000),
}

#: Run only when named in ``--data``: atlas simulations of another shape (``simulate_atlas``
#: keyword arguments; labels ``cell_type``). ``atlas_small``: few cells and many genes, as a
#: small study read without gene selection (2,000 cells, 10,000 genes, 24 types, 6
#: libraries in 2 studies): the labelled counterpart of kang and pbmc1k.
ATLAS_SHAPES: dict[str, dict] = {
    "atlas_small": {
        "n_cells": 2000,
        "n_genes": 10000,
        "n_cell_types": 24,
        "n_studies": 2,
        "n_libraries": 6,
        "n_lineages": 4,
        "n_subtypes": 12,
    },
}

SIZES = {"defaults": {}, "512/128": {"n_hidden": 512, "n_latent": 128}}
HELD_OUT_FRACTION = 0.1
#: The recorded runs (one JSON file each; see the module docstring).
RESULTS = Path(__file__).resolve().parent / "results" / "integration"
#: Part of every cached result's key: bump it when regvi's code changes what a run gives.
#: 4: n_layers 2, n_latent 30 (stop 26); hidden_dropout_rate 0.1 (stop 28) is the same model.
#: 5: hidden dropout by width (stop 30): 0.3 at 512/128; the default size is revision 4's model.
#: 6: hidden dropout by input weights per cell (stop 30): 0.3 on kang and pbmc1k at both sizes
#: and pbmc_3tech at 512/128, 0.139 on pbmc_3tech and 0.115 on the atlas at 512/128.
#: 7: the same rule capped at 0.5 instead of 0.3 (stop 31): 0.5 on kang, pbmc1k and
#: atlas_small at 512/128; 0.33-0.39 on kang, pbmc1k and atlas_small at the default size and
#: pbmc_3tech at 512/128; the others are revision 6's model.
#: 8: the rule rises to 0.7 at r = 16 (stop 32): 0.7 on kang, pbmc1k and atlas_small at
#: 512/128 (revision 7's hidden_dropout_rate=0.7 runs); 0.36-0.48 on kang, pbmc1k and
#: atlas_small at the default size and pbmc_3tech at 512/128; the others (r <= 4) are
#: revision 7's model.
REVISION = 8


def load_data(name: str, all_genes: bool = False):
    """The AnnData of data set ``name`` (of :data:`DATASETS`, :data:`HVG_SUBSETS` or
    :data:`ATLAS_SHAPES`; with ``all_genes``, an HVG subset's full file) with a categorical
    ``obs['batch']``."""
    import anndata as ad

    if name in HVG_SUBSETS:
        import scanpy as sc

        base, n_top = HVG_SUBSETS[name]
        adata = load_data(base)
        if all_genes:
            return adata
        sc.pp.highly_variable_genes(
            adata, n_top_genes=n_top, flavor="seurat_v3", batch_key="batch", subset=True
        )
        return adata
    source = "atlas" if name in ATLAS_SHAPES else DATASETS[name][0]
    if source == "atlas":
        from regvi.atlas import simulate_atlas

        adata = simulate_atlas(seed=0, **ATLAS_SHAPES.get(name, {}))
    else:
        adata = ad.read_h5ad(SHARED / source)
    adata.obs["batch"] = adata.obs["batch"].astype(str).astype("category")
    # one group for every cell: e.g. ablations with a single dispersion group
    adata.obs["all_cells"] = pd.Categorical(["all"] * adata.n_obs)
    return adata


def held_out_mask(batch: np.ndarray, seed: int = 0) -> np.ndarray:
    """10% of each batch's cells, the same for every tool and seed."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(batch.size, dtype=bool)
    for value in np.unique(batch):
        idx = np.flatnonzero(batch == value)
        mask[rng.choice(idx, int(round(HELD_OUT_FRACTION * idx.size)), replace=False)] = True
    return mask


# ----------------------------------------------------------------------------- workers
def _train_regvi(adata, train, test, size: dict, variant: dict, seed: int, epochs):
    import torch

    from regvi import AmbientRegularizedSCVI

    torch.manual_seed(seed)
    setup = {"batch_key": "batch", **variant.get("setup", {})}
    for part in (adata, train, test):
        AmbientRegularizedSCVI.setup_anndata(part, **setup)
    model = AmbientRegularizedSCVI(train, **{**size, **variant.get("model", {})})
    train_kwargs = {"enable_progress_bar": False, "split_seed": seed, **variant.get("train", {})}
    if epochs:
        train_kwargs["max_epochs"] = epochs
    model.train(**train_kwargs)
    latent = model.get_latent_representation(adata)
    history = model.history
    curve = history["elbo_validation"] if "elbo_validation" in history else None
    extra = {"epochs_trained": len(history)}
    if curve is not None and curve.notna().any():
        extra["best_validation_epoch"] = int(curve.to_numpy().argmin()) + 1
        extra["elbo_validation"] = [round(float(v), 3) for v in curve]
    return latent, model.get_reconstruction_error(test), extra


def _train_scvi(adata, train, test, size: dict, variant: dict, seed: int, epochs):
    import scvi

    scvi.settings.seed = seed
    setup = {"batch_key": "batch", **variant.get("setup", {})}
    for part in (adata, train, test):
        scvi.model.SCVI.setup_anndata(part, **setup)
    model = scvi.model.SCVI(train, **{**size, **variant.get("model", {})})
    train_kwargs = {"enable_progress_bar": False, **variant.get("train", {})}
    if epochs:
        train_kwargs["max_epochs"] = epochs
    model.train(**train_kwargs)
    latent = model.get_latent_representation(adata)
    nll = float(model.get_reconstruction_error(test)["reconstruction_loss"])
    return latent, nll, {"epochs_trained": int(model.history["elbo_train"].shape[0])}


def _worker(spec: dict, out: str) -> None:
    import logging

    os.environ.update(spec["variant"].get("env", {}))  # e.g. a switch read at import
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    import torch

    threads = torch.get_num_threads()
    adata = load_data(spec["data"])
    # scanpy's seurat_v3 selection (the HVG sets) sets OpenMP's thread count to the number of
    # cores, which torch shares: restore the worker's (OMP_NUM_THREADS), or workers run side
    # by side oversubscribe the cores
    torch.set_num_threads(threads)
    test_mask = held_out_mask(adata.obs["batch"].to_numpy())
    train, test = adata[~test_mask].copy(), adata[test_mask].copy()
    fit = _train_regvi if spec["tool"] == "regvi" else _train_scvi
    start = time.perf_counter()
    latent, nll, extra = fit(
        adata, train, test, SIZES[spec["size"]], spec["variant"], spec["seed"], spec["epochs"]
    )
    seconds = time.perf_counter() - start
    np.save(out, np.asarray(latent, dtype=np.float32))
    device = (
        torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu, {threads} threads"
    )
    print(json.dumps({"heldout_nll": float(nll), "seconds": seconds, "device": device, **extra}))


# ----------------------------------------------------------------------------- metrics
def score(name: str, latent: np.ndarray) -> dict[str, float]:
    """Integration metrics of one latent (see the module docstring)."""
    from regvi.metrics import (
        integration_metrics,
        knn_graph,
        log_normalise,
        neighbourhood_correlation,
    )
    from regvi.run.evaluate import load_markers, select_markers

    adata = _cached_data(name)
    base = HVG_SUBSETS[name][0] if name in HVG_SUBSETS else name
    labels_key = "cell_type" if base in ATLAS_SHAPES else DATASETS[base][1]
    batch = adata.obs["batch"].to_numpy()
    labels = adata.obs[labels_key].to_numpy() if labels_key else None
    table = integration_metrics(latent, batch, labels)
    values = dict(zip(table.metric, table.value, strict=True))
    if labels_key is None:
        adata = _cached_data(name, all_genes=True)
        lognorm = log_normalise(adata.X)
        columns, _ = select_markers(adata.var_names, lognorm, load_markers())
        expression = lognorm[:, columns]
        graph = knn_graph(latent, 15)
        per_cell = neighbourhood_correlation(
            expression, graph.indices, adata.obs, library_key="batch"
        )
        values["nbr_corr_all"] = float(np.nanmedian(per_cell["corr_all"]))
        values["nbr_corr_other_batch"] = float(np.nanmedian(per_cell["corr_other_library"]))
    return values


_DATA_CACHE: dict = {}


def _cached_data(name: str, all_genes: bool = False):
    key = (name, all_genes and name in HVG_SUBSETS)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = load_data(name, all_genes)
    return _DATA_CACHE[key]


def _keyed(spec: dict) -> tuple[dict, str]:
    """The spec as recorded (regvi's carries :data:`REVISION`) and its cache key."""
    if spec["tool"] == "regvi":
        spec = {**spec, "revision": REVISION}
    return spec, hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _train(spec: dict, latent_path: Path) -> dict:
    """Train one run in a worker process; its figures (the latent is left at latent_path)."""
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec), str(latent_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "disabled"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _record(spec: dict, key: str, result: dict, latent_path: Path, cache: Path) -> dict:
    """Score a trained run's latent and keep its figures in the cache."""
    result = {**result, **score(spec["data"], np.load(latent_path)), "spec": spec}
    (cache / f"{key}.json").write_text(json.dumps(result))
    return result


def run_one(spec: dict, cache: Path) -> dict:
    """Train (or read from the cache) one configuration and score its latent."""
    spec, key = _keyed(spec)
    path = cache / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    latent_path = cache / f"{key}.latent.npy"  # scored below, then removed
    result = _record(spec, key, _train(spec, latent_path), latent_path, cache)
    latent_path.unlink()
    return result


# ------------------------------------------------- training elsewhere (e.g. a GPU node)
def export_plan(specs: list[dict], cache: Path, plan: Path) -> int:
    """Write the runs of ``specs`` not in the cache to ``plan`` (JSON); how many."""
    todo = {}
    for spec in specs:
        spec, key = _keyed(spec)
        if not (cache / f"{key}.json").exists():
            todo[key] = spec
    plan.write_text(json.dumps(todo, indent=1))
    return len(todo)


def run_plan(plan: Path, out: Path, parallel: int) -> None:
    """Train a plan's runs, ``parallel`` workers at a time, into ``out``: per run its
    figures (``KEY.json``, spec included) and latent (``KEY.latent.npy``), unscored, so that
    the node that trains them needs neither the metrics nor scanpy. A run whose
    ``KEY.json`` is in ``out`` when its turn comes is skipped, so the same command continues
    an interrupted plan (and a second process may work through the plan in reverse order)."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    out.mkdir(parents=True, exist_ok=True)
    todo = json.loads(plan.read_text())

    def one(key: str) -> str:
        if (out / f"{key}.json").exists():
            return f"{key} already in {out}"
        try:
            result = _train(todo[key], out / f"{key}.latent.npy")
        except RuntimeError as error:
            return f"{key} failed: {str(error)[-500:]}"
        (out / f"{key}.json").write_text(json.dumps({**result, "spec": todo[key]}))
        return f"{key} {todo[key]['tool']} {todo[key]['data']} seed {todo[key]['seed']}: {result['seconds']:.0f} s"

    with ThreadPoolExecutor(parallel) as pool:  # each run reported as it ends
        for done in as_completed([pool.submit(one, key) for key in todo]):
            print(done.result(), flush=True)


def ingest(folder: Path, cache: Path) -> None:
    """Score the runs that :func:`run_plan` trained and record them in the cache."""
    for path in sorted(folder.glob("*.json")):
        result = json.loads(path.read_text())
        spec = result.pop("spec")
        spec, key = _keyed(spec)
        latent_path = folder / f"{key}.latent.npy"
        if key != path.stem or not latent_path.exists():
            print(f"skipped {path.name}: no latent, or its spec is of another revision")
            continue
        _record(spec, key, result, latent_path, cache)
        print(f"recorded {key} ({spec['tool']} {spec['data']} {spec['size']} seed {spec['seed']})")


HEADLINE = [
    "total_score",
    "bio_score",
    "batch_score",
    "batch_entropy",
    "ilisi",
    "silhouette_batch",
    "graph_connectivity",
    "silhouette_label",
    "nmi_kmeans",
    "ari_kmeans",
    "clisi",
    "nbr_corr_all",
    "nbr_corr_other_batch",
    "heldout_nll",
    "seconds",
    "epochs_trained",
]


def summarise(results: list[dict]) -> dict[str, tuple[float, float]]:
    out = {}
    for metric in HEADLINE:
        values = [r[metric] for r in results if metric in r]
        if values:
            out[metric] = (
                float(np.mean(values)),
                float(np.std(values, ddof=1) if len(values) > 1 else 0.0),
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=",".join(DATASETS), help="comma-separated names")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--tools", default="scvi,regvi")
    parser.add_argument("--epochs", type=int, default=None, help="default: each tool's own")
    parser.add_argument("--variant", action="append", default=[], help="name=JSON (regvi)")
    parser.add_argument("--scvi-variant", action="append", default=[], help="name=JSON")
    parser.add_argument("--no-defaults", action="store_true", help="only the --variant runs")
    parser.add_argument("--cache", default=str(RESULTS), help="directory of per-run JSON")
    parser.add_argument("--export-plan", help="write the runs not in the cache to this JSON")
    parser.add_argument(
        "--run-plan", nargs=2, metavar=("PLAN", "DIR"), help="train a plan's runs into DIR"
    )
    parser.add_argument("--parallel", type=int, default=1, help="workers at a time (--run-plan)")
    parser.add_argument("--ingest", help="score and record the runs of a --run-plan DIR")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(json.loads(args.worker[0]), args.worker[1])
        return
    if args.run_plan:
        run_plan(Path(args.run_plan[0]), Path(args.run_plan[1]), args.parallel)
        return
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    if args.ingest:
        ingest(Path(args.ingest), cache)
        return
    configs: list[tuple[str, str, dict]] = []
    for tool in args.tools.split(","):
        if not args.no_defaults:
            configs.append((tool, "default", {}))
        extra = args.variant if tool == "regvi" else args.scvi_variant
        for item in extra:
            name, _, body = item.partition("=")
            configs.append((tool, name, json.loads(body)))
    seeds = [int(s) for s in args.seeds.split(",")]

    def spec(tool: str, data: str, size: str, variant: dict, seed: int) -> dict:
        return {
            "tool": tool,
            "data": data,
            "size": size,
            "variant": variant,
            "seed": seed,
            "epochs": args.epochs,
        }

    if args.export_plan:
        specs = [
            spec(tool, data, size, variant, seed)
            for data in args.data.split(",")
            for size in args.sizes.split(",")
            for tool, _, variant in configs
            for seed in seeds
        ]
        n = export_plan(specs, cache, Path(args.export_plan))
        print(f"{n} runs not in {cache} written to {args.export_plan}")
        return
    for data in args.data.split(","):
        for size in args.sizes.split(","):
            print(f"\n== {data}, size {size}, seeds {seeds} ==", flush=True)
            reference = None
            for tool, name, variant in configs:
                runs = [run_one(spec(tool, data, size, variant, seed), cache) for seed in seeds]
                summary = summarise(runs)
                if tool == "scvi" and name == "default":
                    reference = summary
                cells = [
                    f"{m} {mean:.3f}±{sd:.3f}"
                    if m not in ("heldout_nll", "seconds")
                    else f"{m} {mean:.1f}±{sd:.1f}"
                    for m, (mean, sd) in summary.items()
                ]
                print(f"  {tool}:{name:<18} " + ", ".join(cells), flush=True)
                if reference is not None and tool == "regvi":
                    ratios = [
                        f"{m} {summary[m][0] / reference[m][0]:.3f}"
                        for m in (
                            "total_score",
                            "batch_score",
                            "bio_score",
                            "batch_entropy",
                            "ilisi",
                            "heldout_nll",
                        )
                        if m in summary and m in reference and reference[m][0]
                    ]
                    print(f"  {'':<24} ratio regvi/scvi: " + ", ".join(ratios), flush=True)


if __name__ == "__main__":
    main()
