"""Compatibility names: ``regvi.workflow.train(cfg, run_dir)`` and ``resume(run_dir)`` are
:func:`regvi.run.pipeline.train` and :func:`regvi.run.pipeline.resume`."""

from regvi.run.pipeline import resume, train

__all__ = ["resume", "train"]
