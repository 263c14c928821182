"""A Hydra launcher that submits every job of a sweep as one element of ONE LSF job array."""

# No `from __future__ import annotations`: Hydra imports plugins without registering them in
# sys.modules, and dataclasses then cannot resolve string annotations.

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


@dataclass
class LSFLauncherConf:
    """Schema of ``hydra.launcher`` for ``hydra/launcher=lsf`` (values: conf/hydra/launcher/lsf.yaml)."""

    _target_: str = "hydra_plugins.regvi_lsf_launcher.lsf_launcher.LSFLauncher"
    queue: str | None = None  # bsub -q
    cores: int | None = None  # bsub -n
    memory: int | None = None  # bsub -M, MB (LSF_UNIT_FOR_LIMITS=MB)
    resources: str | None = None  # bsub -R
    gpu: str | None = None  # bsub -gpu; null for CPU-only queues
    walltime: str | None = None  # bsub -W ([hours:]minutes)
    project: str | None = None  # bsub -P
    job_name: str | None = None  # bsub -J name (default regvi_<sweep name>)
    max_parallel: int | None = None  # %N: elements running at once (null: no limit)
    extra_args: list[str] = field(default_factory=list)  # appended to bsub verbatim
    setup: list[str] = field(default_factory=list)  # shell lines run before each element
    python: str | None = None  # interpreter of the elements (default: the submitting one)
    dry_run: bool = False  # print the bsub command and job script, submit nothing
    requeue: bool = False  # -wa USR2 -wt warning_minutes -Q 99: checkpoint, requeue, resume
    warning_minutes: int = 10  # bsub -wt: the warning signal comes this long before a kill
    nodes: int = 1  # hosts per element: >1 with trainer=ddp is multi-node DDP (torchrun)


ConfigStore.instance().store(group="hydra/launcher", name="lsf_schema", node=LSFLauncherConf)


def _train_args(config: DictConfig) -> list[str]:
    """Flags the elements need to compose the same config: --config-dir, --config-name."""
    args: list[str] = []
    for source in OmegaConf.select(config, "hydra.runtime.config_sources", default=[]) or []:
        if source.get("provider") == "command-line" and source.get("schema") == "file":
            args += ["--config-dir", os.path.abspath(str(source.get("path")))]
    name = OmegaConf.select(config, "hydra.job.config_name", default=None)
    if name and name != "train":
        args += ["--config-name", str(name)]
    return args


class LSFLauncher(Launcher):
    def __init__(self, **params) -> None:
        self.params = params
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from regvi.errors import RegviError

        try:
            return self._launch(job_overrides, initial_job_idx)
        except RegviError as exc:
            from regvi.cli.app import debug_enabled, fail

            if debug_enabled():
                raise
            fail(str(exc))  # one line `error: ...` and exit 1, like every regvi error
            raise  # unreachable

    def _launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from regvi import sweep

        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        sweep_dir = Path(os.path.abspath(str(self.config.hydra.sweep.dir)))
        spec = sweep.ArraySpec.from_config(self.config.hydra.launcher)
        keys = sweep.swept_keys(list(self.config.hydra.overrides.task))
        elements, configs = [], []
        for i, overrides in enumerate(job_overrides):
            num = initial_job_idx + i
            job_cfg = self.hydra_context.config_loader.load_sweep_config(
                self.config, list(overrides)
            )
            with open_dict(job_cfg):
                job_cfg.hydra.job.id = f"lsf_{num}"
                job_cfg.hydra.job.num = num
            run_dir = sweep_dir / str(job_cfg.hydra.sweep.subdir)
            elements.append((num, list(overrides), run_dir))
            configs.append(job_cfg)
            log.info("\t#%d : %s", num + 1, " ".join(filter_overrides(overrides)))
        devices = {}
        for (num, _, _), job_cfg in zip(elements, configs, strict=True):
            value = OmegaConf.select(job_cfg, "trainer.devices", default=1)
            devices[num] = int(value) if str(value).isdigit() else 1
        manifest = sweep.prepare_array(
            sweep_dir,
            elements,
            spec,
            keys=keys,
            train_args=_train_args(self.config),
            devices=devices,
        )
        indices = [num + 1 for num, _, _ in elements]
        job_id = sweep.submit_array(manifest, spec, indices)
        if job_id is not None:
            print(
                f"Submitted LSF job array {job_id} ({manifest['job_name']}"
                f"[{min(indices)}-{max(indices)}], {len(indices)} elements)",
                flush=True,
            )
            print(f"  logs: {sweep_dir / sweep.LOG_DIR}/{job_id}_<index>.out|.err", flush=True)
            print(f"  status: regvi sweep status {sweep_dir}", flush=True)
        print(sweep_dir, flush=True)
        returns = []
        for (num, overrides, run_dir), job_cfg in zip(elements, configs, strict=True):
            ret = JobReturn(
                overrides=list(overrides),
                cfg=job_cfg,
                hydra_cfg=job_cfg,
                working_dir=str(run_dir),
                task_name=str(job_cfg.hydra.job.name),
                status=JobStatus.COMPLETED,  # submitted: the element records its own outcome
            )
            ret.return_value = {"lsf_job_id": job_id, "index": num + 1}
            returns.append(ret)
        return returns
