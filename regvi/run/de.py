"""``regvi de <run_dir> --groupby <obs column>``: differential expression with a trained model
(either model) on the cells of its run, written into the run.

Writes ``<run_dir>/de/de_<groupby>.csv`` (one row per group x feature: the scvi-tools columns
of :meth:`~regvi.model.AmbientRegularizedSCVI.differential_expression`, with ``feature``,
``group`` and, for a multimodal run, ``modality``), ``figures/de_<groupby>_volcano.png`` and
``figures/de_<groupby>_dotplot.png`` (top markers per group), and a W&B table when the run
used W&B.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from regvi.errors import DataError
from regvi.outputs import write_csv_atomic
from regvi.run import layout
from regvi.run.adapter import adapter_for_class

log = logging.getLogger("regvi")

__all__ = ["differential_expression_run"]


def differential_expression_run(
    run_dir: str | Path,
    groupby: str,
    group1: str | list[str] | None = None,
    group2: str | None = None,
    modality: str | None = None,
    delta: float = 0.25,
    fdr_target: float = 0.05,
    n_samples: int = 5000,
    batch_size: int | None = None,
    seed: int = 0,
    figures: bool = True,
    log_wandb: bool = True,
) -> pd.DataFrame:
    """Differential expression between the groups of ``obs[groupby]`` of the cells in the
    run's results file, with the model in ``<run_dir>/model`` (see the model's
    ``differential_expression``: ``group1=None`` compares every group with the rest,
    ``group2=None`` with every other cell; ``modality`` restricts a multimodal run to one
    modality). Writes the table, the volcano and dot-plot figures and (``log_wandb``, when
    the run used W&B) a W&B table; returns the table.

    Raises :class:`~regvi.errors.DataError` for a directory without a trained model, an
    unknown ``groupby`` column, group or modality.
    """
    from regvi.run.predict import run_config

    run_dir = Path(run_dir)
    metadata = run_dir / layout.MODEL_DIR / layout.MODEL_METADATA
    results = layout.results_path(run_dir)
    if not metadata.exists() or results is None:
        raise DataError(
            f"{run_dir} has no trained model and results file; is it a finished regvi train run?"
        )
    adapter = adapter_for_class(json.loads(metadata.read_text()).get("class", ""), metadata)
    model = adapter.load_model(run_dir / layout.MODEL_DIR)
    cfg = run_config(run_dir, {"data.path": str(results)})
    data = adapter.new_data(model, cfg)
    kwargs: dict[str, Any] = {"modality": modality} if adapter.name == "multimodal" else {}
    if modality is not None and not kwargs:
        raise DataError("--modality applies to multimodal runs only")
    table = model.differential_expression(
        data,
        groupby=groupby,
        group1=group1,
        group2=group2,
        delta=delta,
        fdr_target=fdr_target,
        n_samples=n_samples,
        batch_size=batch_size,
        seed=seed,
        **kwargs,
    )
    out = layout.de_table_path(run_dir, groupby)
    out.parent.mkdir(exist_ok=True)
    write_csv_atomic(table.reset_index(), out)
    drawn: dict[str, Path] = {}
    if figures:
        from regvi import plots

        fdr_column = f"is_de_fdr_{fdr_target}"
        drawn["volcano"] = plots.plot_volcano(
            table, layout.de_figure_path(run_dir, groupby, "volcano"), fdr_column
        )
        drawn["dotplot"] = plots.plot_marker_dots(
            table, layout.de_figure_path(run_dir, groupby, "dotplot")
        )
    if log_wandb:
        _log_wandb(run_dir, groupby, table, drawn)
    log.info("differential expression written to %s", out)
    return table


def _log_wandb(run_dir: Path, groupby: str, table: pd.DataFrame, figures: dict[str, Path]) -> None:
    from regvi.tracking import log_after_run, run_uses_wandb

    if not run_uses_wandb(run_dir):
        return
    import wandb

    payload: dict[str, Any] = {f"de/{groupby}": wandb.Table(dataframe=table.reset_index())}
    for name, path in figures.items():
        payload[f"figures/de_{groupby}_{name}"] = wandb.Image(str(path))
    log_after_run(run_dir, payload, "de")
