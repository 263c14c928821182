"""The ``regvi evaluate``, ``regvi predict``, ``regvi map`` and ``regvi de`` commands (added
to the app by :func:`register`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from regvi.errors import RegviError


def _fail(exc: RegviError) -> None:
    from regvi.cli.app import debug_enabled, fail

    if debug_enabled():
        raise exc
    fail(str(exc))


def _setup_logging() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")


def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A `regvi train` run directory.")],
    labels_key: Annotated[
        str | None,
        typer.Option("--labels-key", help="obs column of cell labels (default: the run's)."),
    ] = None,
    baseline: Annotated[
        list[str] | None,
        typer.Option(
            "--baseline",
            help="Also embed with: pca (log-normalised counts) and/or scvi (scvi-tools SCVI on "
            "the same data and covariates; needs the bench extra). Repeat or comma-separate.",
        ),
    ] = None,
    markers: Annotated[
        Path | None,
        typer.Option(
            "--markers",
            help="Marker CSV (gene,cell_type,lineage,category) for the neighbourhood "
            "correlation; default: the shipped human immune/bone-marrow list.",
        ),
    ] = None,
    n_neighbors: Annotated[int, typer.Option("--n-neighbors", help="k of the kNN graph.")] = 15,
    subsample: Annotated[
        int, typer.Option("--subsample", help="Max cells for the quadratic silhouette metrics.")
    ] = 20_000,
    scib: Annotated[
        bool, typer.Option("--scib", help="Also run scib-metrics' Benchmarker (bench extra).")
    ] = False,
    baseline_epochs: Annotated[
        int | None,
        typer.Option("--baseline-epochs", help="Epochs of the scvi baseline (default: scvi's)."),
    ] = None,
    wandb: Annotated[
        bool, typer.Option("--wandb/--no-wandb", help="Log to W&B if the run used W&B.")
    ] = True,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    debug: Annotated[bool, typer.Option("--debug", help="Full traceback on errors.")] = False,
) -> None:
    """Integration metrics of a trained run (batch mixing, label conservation, graph
    connectivity, neighbourhood marker correlation), optionally beside baselines. For a
    multimodal run: on the joint latent and on each modality's, with the modality attribution
    summarised in metrics.json.

    Writes metrics.json, metrics.csv and figures/metrics.png, figures/umap_comparison.png into
    the run directory; prints the table.
    """
    import os

    if debug:
        os.environ["REGVI_DEBUG"] = "1"
    _setup_logging()
    from regvi.run.evaluate import METRICS_CSV, evaluate_run, wide_table

    try:
        long = evaluate_run(
            run_dir,
            labels_key=labels_key,
            baseline=baseline,
            markers=markers,
            n_neighbors=n_neighbors,
            silhouette_max_cells=subsample,
            scib=scib,
            log_wandb=wandb,
            baseline_max_epochs=baseline_epochs,
            seed=seed,
        )
    except RegviError as exc:
        _fail(exc)
        return
    typer.echo(wide_table(long).to_string(float_format=lambda v: f"{v:.3f}"))
    typer.echo(Path(run_dir) / METRICS_CSV)


def predict(
    ctx: typer.Context,
    run_dir: Annotated[Path, typer.Argument(help="A `regvi train` run directory.")],
    out_dir: Annotated[
        Path | None,
        typer.Option("--out-dir", help="Output directory (default: <run_dir>/predict/<time>)."),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Full traceback on errors.")] = False,
) -> None:
    """Encode new cells with a trained model: regvi predict RUN_DIR data.path=new.h5ad (an
    RNA run) or data.path=new.h5mu (a multimodal run); optionally data.layer=counts (RNA),
    outputs.figures=false, seed=0. Writes the run's results file (obsm X_regvi, X_umap,
    layer regvi_normalized), figures and a copy of the model; prints the output directory."""
    import os

    if debug:
        os.environ["REGVI_DEBUG"] = "1"
    _setup_logging()
    from regvi.run.predict import parse_overrides
    from regvi.run.predict import predict as run_predict

    try:
        overrides = parse_overrides(list(ctx.args))
        out = run_predict(run_dir, out_dir=out_dir, overrides=overrides)
    except RegviError as exc:
        _fail(exc)
        return
    typer.echo(str(out))


def map_query(
    ctx: typer.Context,
    run_dir: Annotated[Path, typer.Argument(help="A finished `regvi train` run directory.")],
    out_dir: Annotated[
        Path | None,
        typer.Option("--out-dir", help="Output directory (default: <run_dir>/map/<time>)."),
    ] = None,
    n_neighbors: Annotated[
        int, typer.Option("--n-neighbors", help="k of the kNN label transfer.")
    ] = 15,
    debug: Annotated[bool, typer.Option("--debug", help="Full traceback on errors.")] = False,
) -> None:
    """Map cells from new libraries (or studies) onto a trained reference: regvi map RUN_DIR
    data.path=query.h5ad (an RNA run) or data.path=query.h5mu (a multimodal run);
    optionally trainer.max_epochs=N, trainer.accelerator=gpu, data.batch_size=N,
    data.layer=counts (RNA), outputs.figures=false, seed=0. The reference network stays
    frozen; each new library gets its own ambient, dispersion and library-size prior, each
    new study (dataset key) or kit its own feature scaling, learned on the query cells. Writes the query's results file (obsm
    X_regvi in the reference's latent space; with the run's labels column, the transferred
    label and its uncertainty in obs), the mapped model and figures/map_umap.png; prints the
    output directory."""
    import os

    if debug:
        os.environ["REGVI_DEBUG"] = "1"
    _setup_logging()
    from regvi.run.map import MAP_KEYS, map_query_run
    from regvi.run.predict import parse_overrides

    try:
        overrides = parse_overrides(list(ctx.args), MAP_KEYS, "map")
        out = map_query_run(run_dir, out_dir=out_dir, overrides=overrides, n_neighbors=n_neighbors)
    except RegviError as exc:
        _fail(exc)
        return
    typer.echo(str(out))


def de(
    run_dir: Annotated[Path, typer.Argument(help="A `regvi train` run directory.")],
    groupby: Annotated[str, typer.Option("--groupby", help="obs column of the groups.")],
    group1: Annotated[
        list[str] | None,
        typer.Option("--group1", help="Group(s) to test (repeat; default: every group)."),
    ] = None,
    group2: Annotated[
        str | None,
        typer.Option("--group2", help="Reference group (default: all other cells)."),
    ] = None,
    modality: Annotated[
        str | None, typer.Option("--modality", help="Multimodal runs: one modality only.")
    ] = None,
    delta: Annotated[float, typer.Option("--delta", help="log2 fold-change threshold.")] = 0.25,
    fdr: Annotated[float, typer.Option("--fdr", help="Target posterior expected FDR.")] = 0.05,
    n_samples: Annotated[
        int, typer.Option("--n-samples", help="Posterior samples per group.")
    ] = 5000,
    batch_size: Annotated[int | None, typer.Option("--batch-size")] = None,
    wandb: Annotated[
        bool, typer.Option("--wandb/--no-wandb", help="Log to W&B if the run used W&B.")
    ] = True,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    debug: Annotated[bool, typer.Option("--debug", help="Full traceback on errors.")] = False,
) -> None:
    """Differential expression between the groups of an obs column, with the trained model
    on the run's cells (scvi-tools' "change" mode on the expression with ambient RNA and
    feature scaling removed; one group against the rest, or --group1 A --group2 B).

    Writes de/de_<groupby>.csv (one row per group x feature), figures/de_<groupby>_volcano.png
    and figures/de_<groupby>_dotplot.png into the run; prints the number of features called
    DE per group and the table's path.
    """
    import os

    if debug:
        os.environ["REGVI_DEBUG"] = "1"
    _setup_logging()
    from regvi.run import layout
    from regvi.run.de import differential_expression_run

    try:
        table = differential_expression_run(
            run_dir,
            groupby,
            group1=group1 or None,
            group2=group2,
            modality=modality,
            delta=delta,
            fdr_target=fdr,
            n_samples=n_samples,
            batch_size=batch_size,
            seed=seed,
            log_wandb=wandb,
        )
    except RegviError as exc:
        _fail(exc)
        return
    keys = ["modality", "group"] if "modality" in table.columns else ["group"]
    called = table.groupby(keys, sort=False, observed=True)[f"is_de_fdr_{fdr}"].sum()
    typer.echo(called.rename(f"DE at FDR {fdr}").to_string())
    typer.echo(layout.de_table_path(run_dir, groupby))


def register(app: typer.Typer) -> None:
    """Add ``evaluate``, ``predict``, ``map`` and ``de`` to ``app``."""
    app.command("evaluate")(evaluate)
    app.command("de")(de)
    extra_arguments = {"allow_extra_args": True, "ignore_unknown_options": True}
    app.command("predict", context_settings=extra_arguments)(predict)
    app.command("map", context_settings=extra_arguments)(map_query)
