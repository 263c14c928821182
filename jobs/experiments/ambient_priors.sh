#!/bin/bash
# Example experiment: ambient RNA prior strength x feature scaling, on the small GPU preset,
# two runs at a time, with a W&B group named after the sweep (logger=wandb is the default).
set -euo pipefail
regvi train -m --config-dir "$(dirname "$0")/.." hydra/launcher=gpu_small trainer=gpu \
    data.path=my_data.h5ad covariates.batch_key=batch \
    model.regularise_ambient=true model.ambient_prior_beta=10,100,1000 \
    model.use_feature_scaling=true,false \
    hydra.launcher.max_parallel=2 hydra.launcher.walltime=6:00 \
    hydra.sweep.dir=sweeps/ambient_priors
