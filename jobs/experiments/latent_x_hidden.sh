#!/bin/bash
# Example experiment: latent size x hidden width on your data, as ONE LSF job array (2x2 = 4
# elements). Run from the directory that holds the data; `--config-dir jobs` makes the size
# presets in jobs/hydra/launcher/ available. Add hydra.launcher.dry_run=true to check first.
set -euo pipefail
regvi train -m --config-dir "$(dirname "$0")/.." hydra/launcher=gpu_medium trainer=gpu \
    data.path=my_data.h5ad covariates.batch_key=batch data.labels_key=cell_type \
    model.n_latent=10,30 model.n_hidden=128,256 \
    hydra.launcher.setup='["source ~/venvs/regvi/bin/activate"]' \
    hydra.launcher.max_parallel=4 \
    hydra.sweep.dir=sweeps/latent_x_hidden
# then: regvi sweep status sweeps/latent_x_hidden ; regvi sweep summarize sweeps/latent_x_hidden
