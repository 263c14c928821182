"""Where a training step's time goes: forward, backward, and everything else.

Trains regvi through its normal Lightning path on simulated data and times, per epoch, the
module's loss (forward) and the backward pass against the epoch's wall time; the rest
(optimizer step, data loading, Lightning's loop and hooks, metric bookkeeping) is printed as
the share of the step spent outside forward/backward.

    python benchmarks/profile_step.py                          # batch 128, 256 and 1024
    python benchmarks/profile_step.py --genes 20000 --batch-sizes 1024 --cells 4000
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl


class _StepTimer(pl.Callback):
    def __init__(self, timings: dict[str, float]):
        self.timings = timings
        self.start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.timings.update(forward=0.0, backward=0.0, steps=0)
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = time.perf_counter() - self.start
        steps = max(self.timings["steps"], 1)
        inside = self.timings["forward"] + self.timings["backward"]
        print(
            f"  epoch {trainer.current_epoch}: {1000 * total / steps:.2f} ms a step = forward "
            f"{1000 * self.timings['forward'] / steps:.2f} + backward "
            f"{1000 * self.timings['backward'] / steps:.2f} + outside "
            f"{1000 * (total - inside) / steps:.2f} ({100 * (total - inside) / total:.1f}%)",
            flush=True,
        )


def profile(batch_size: int, n_cells: int, n_genes: int, epochs: int) -> None:
    from regvi import AmbientRegularizedSCVI
    from regvi.datasets import simulate
    from regvi.train.plan import TrainingPlan

    adata, _ = simulate(n_cells=n_cells, n_genes=n_genes, n_batches=4, seed=0, return_rho=False)
    adata.obs["batch"] = adata.obs["batch"].astype("category")
    AmbientRegularizedSCVI.setup_anndata(adata, batch_key="batch")
    model = AmbientRegularizedSCVI(adata)
    timings: dict[str, float] = {"forward": 0.0, "backward": 0.0, "steps": 0}

    loss = model.module.loss

    def timed_loss(*args, **kwargs):
        start = time.perf_counter()
        out = loss(*args, **kwargs)
        if model.module.training:
            timings["forward"] += time.perf_counter() - start
            timings["steps"] += 1
        return out

    model.module.loss = timed_loss
    backward = TrainingPlan.manual_backward

    def timed_backward(self, *args, **kwargs):
        start = time.perf_counter()
        backward(self, *args, **kwargs)
        timings["backward"] += time.perf_counter() - start

    TrainingPlan.manual_backward = timed_backward
    print(f"batch {batch_size}, {n_cells} simulated cells x {n_genes} genes:", flush=True)
    try:
        model.train(
            max_epochs=epochs,
            batch_size=batch_size,
            train_size=1.0,
            enable_progress_bar=False,
            accelerator="cpu",
            callbacks=[_StepTimer(timings)],
        )
    finally:
        TrainingPlan.manual_backward = backward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=8000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--batch-sizes", default="128,256,1024")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    for batch_size in map(int, args.batch_sizes.split(",")):
        profile(batch_size, args.cells, args.genes, args.epochs)


if __name__ == "__main__":
    main()
