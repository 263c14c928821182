"""The run pipeline shared by every model: ``regvi train`` (:mod:`regvi.run.pipeline`),
``regvi evaluate`` (:mod:`regvi.run.evaluate`) and ``regvi predict``
(:mod:`regvi.run.predict`), each going through a per-model adapter
(:mod:`regvi.run.adapter`: :mod:`regvi.run.rna`, :mod:`regvi.run.multimodal`). The names of
a run directory's files are in :mod:`regvi.run.layout`.

``train`` and ``resume`` are importable from here (loaded on first use, so importing
:mod:`regvi.run.layout` stays light).
"""

from __future__ import annotations

from typing import Any

__all__ = ["resume", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from regvi.run import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'regvi.run' has no attribute {name!r}")
