"""regvi's LSF launcher for Hydra: ``regvi train -m hydra/launcher=lsf ...`` submits the whole
sweep as one LSF job array. Hydra finds it because it lives in the ``hydra_plugins`` namespace
package (shipped in regvi's wheel); the submission logic is in :mod:`regvi.sweep`."""
