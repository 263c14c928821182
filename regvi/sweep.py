"""Hyperparameter sweeps: LSF job arrays, element status and a summary table.

``regvi train -m hydra/launcher=lsf a=1,2 b=x,y`` makes Hydra hand every combination to the
LSF launcher plugin (``hydra_plugins/regvi_lsf_launcher``), which calls :func:`prepare_array`
and :func:`submit_array`: it writes ``<sweep_dir>/manifest.json`` (one element per job:
1-based array index, override list, run directory) and ``<sweep_dir>/job.sh``, then makes ONE
``bsub -J "name[1-N]%P"`` call. Each array element runs :func:`run_element`, which picks its
overrides from the manifest by ``$LSB_JOBINDEX`` and runs ``regvi train`` as a normal single
run in its own directory. Overrides travel as JSON and as an argument list, never through a
shell, so their quoting survives exactly.

Every element writes ``<run_dir>/.regvi_status`` (JSON: ``state`` = running | finished |
failed, ``exit_code``); :func:`collect` reads these (no file = pending) so ``regvi sweep
status`` works without LSF commands, and also for a local ``-m`` sweep (basic launcher), whose
jobs are enumerated from Hydra's ``multirun.yaml``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from regvi.errors import REQUEUE_EXIT_CODE, RegviError
from regvi.outputs import atomic_write
from regvi.run.layout import (
    HISTORY_CSV,
    JOB_SCRIPT,
    LOG_DIR,
    MANIFEST,
    PREEMPTED_MARKER,
    RUN_CONFIG,
    STATUS_FILE,
    SUMMARY_CSV,
    checkpoint_path,
    results_path,
)

TEMPLATE_NAME = "lsf_job.sh.template"

# Environment handed from run_element to the element's `regvi train` (read by regvi.tracking).
ENV_SWEEP_DIR = "REGVI_SWEEP_DIR"
ENV_SWEEP_NAME = "REGVI_SWEEP_NAME"
ENV_RUN_NAME = "REGVI_RUN_NAME"
ENV_ELEMENT_DIR = "REGVI_ELEMENT_DIR"

# Overrides that only concern the sweep/launcher: an element runs without them.
_LAUNCHER_ONLY = ("hydra/launcher", "hydra/sweeper", "hydra.launcher", "hydra.sweeper")
_LAUNCHER_ONLY += ("hydra.sweep", "hydra.mode", "hydra.run", "hydra.job.num", "hydra.job.id")

#: The signal LSF is asked to send before a kill (bsub -wa); regvi.train.preemption handles it.
WARNING_SIGNAL = "USR2"

_SUBMITTED = re.compile(r"Job <(\d+)> is submitted")


class SweepError(RegviError):
    """A sweep cannot be submitted, run or read (bsub missing or refusing, bad sweep dir...)."""


# --------------------------------------------------------------------------------- overrides


def override_key(override: str) -> str:
    """``+model.n_latent=3`` -> ``model.n_latent`` (a group override ``model=rna`` -> ``model``)."""
    return override.partition("=")[0].lstrip("+~")


def override_value(override: str) -> str:
    return override.partition("=")[2]


def element_overrides(overrides: Sequence[str]) -> list[str]:
    """A job's overrides minus those that only steer the sweep (launcher, sweep dir, mode)."""
    kept = []
    for o in overrides:
        key = override_key(o)
        if any(
            key == p or key.startswith(p + ".") or key.startswith(p + "/") for p in _LAUNCHER_ONLY
        ):
            continue
        kept.append(o)
    return kept


def swept_keys(task_overrides: Sequence[str]) -> list[str]:
    """Keys of the sweep overrides (``a=1,2``, ``b=range(3)``...) in a command line's overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(task_overrides))
    except Exception:
        return []
    return [o.key_or_group for o in parsed if o.is_sweep_override()]


def run_name(overrides: Sequence[str], keys: Sequence[str] = ()) -> str:
    """A compact, readable rendering of a job's overrides: only the swept ``keys`` when given
    (``model.n_latent=64 model.n_hidden=256``), else all non-hydra overrides."""
    shown = [o for o in overrides if not override_key(o).startswith("hydra")]
    if keys:
        shown = [o for o in shown if override_key(o) in keys] or shown
    return " ".join(o.lstrip("+~") for o in shown)


def sweep_name(sweep_dir: str | Path) -> str:
    """The sweep's name (W&B group, LSF job name): its directory's name, prefixed with the
    date directory above it when Hydra's default ``multirun/<date>/<time>`` layout is used."""
    path = Path(os.path.abspath(sweep_dir))
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", path.parent.name):
        return f"{path.parent.name}_{path.name}"
    return path.name


def lsf_job_name(name: str) -> str:
    """A job name that bsub's ``-J`` accepts without quoting trouble (no brackets or spaces)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "regvi"


# ------------------------------------------------------------------------------- status files


def write_json_atomic(data: Any, path: Path) -> Path:
    text = json.dumps(data, indent=2) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_status(run_dir: str | Path, state: str, exit_code: int | None = None, **extra) -> None:
    """Record an element's state in ``<run_dir>/.regvi_status`` (atomically)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = {"state": state, "exit_code": exit_code, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    data.update({k: v for k, v in extra.items() if v is not None})
    write_json_atomic(data, run_dir / STATUS_FILE)


def read_status(run_dir: str | Path) -> dict[str, Any]:
    """``{"state": ..., "exit_code": ...}``; ``pending`` when the element has not started.

    ``finished`` also needs a results file (``results.h5ad`` or ``results.h5mu``, whichever
    the run's model writes); without a status file (a sweep from before status files) an
    existing results file counts as finished.
    """
    run_dir = Path(run_dir)
    try:
        status = json.loads((run_dir / STATUS_FILE).read_text())
    except FileNotFoundError:
        if results_path(run_dir) is not None:
            return {"state": "finished", "exit_code": 0}
        return {"state": "pending", "exit_code": None}
    except (OSError, ValueError):
        return {"state": "unknown", "exit_code": None}
    if status.get("state") == "finished" and results_path(run_dir) is None:
        status = {**status, "state": "failed", "note": "no results file"}
    return status


# --------------------------------------------------------------------------------- manifest


def read_manifest(sweep_dir: str | Path) -> dict[str, Any]:
    path = Path(sweep_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SweepError(f"{path} not found: not an LSF sweep directory") from None
    except ValueError as exc:
        raise SweepError(f"{path} is not valid JSON ({exc})") from None


@dataclass
class ArraySpec:
    """What the launcher needs to submit one sweep: the launcher config as plain values."""

    queue: str | None = None
    cores: int | None = None
    memory: int | None = None
    resources: str | None = None
    gpu: str | None = None
    walltime: str | None = None
    project: str | None = None
    job_name: str | None = None
    max_parallel: int | None = None
    extra_args: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    python: str | None = None
    dry_run: bool = False
    requeue: bool = False
    warning_minutes: int = 10
    nodes: int = 1

    @classmethod
    def from_config(cls, conf: Any) -> ArraySpec:
        from omegaconf import OmegaConf

        values = OmegaConf.to_container(conf, resolve=True) if not isinstance(conf, dict) else conf
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        spec = cls(**known)
        spec.extra_args = [str(a) for a in spec.extra_args or []]
        spec.setup = [str(s) for s in spec.setup or []]
        return spec


def prepare_array(
    sweep_dir: str | Path,
    elements: Sequence[tuple[int, Sequence[str], str | Path]],
    spec: ArraySpec,
    *,
    keys: Sequence[str] = (),
    train_args: Sequence[str] = (),
    cwd: str | Path | None = None,
    devices: dict[int, int] | None = None,
) -> dict[str, Any]:
    """Write (or extend) ``manifest.json`` and render ``job.sh``; return the manifest.

    ``elements``: (job number, overrides, run dir) per job; the array index is number + 1, so
    later batches of the same sweep extend the manifest with new indices.
    ``train_args``: flags every element passes to ``regvi train`` (``--config-dir DIR``...).
    ``devices``: job number -> the element's ``trainer.devices`` (processes per host of a
    multi-node element, ``spec.nodes > 1``).
    """
    sweep_dir = Path(os.path.abspath(sweep_dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / LOG_DIR).mkdir(exist_ok=True)
    name = sweep_name(sweep_dir)
    manifest: dict[str, Any] = {
        "version": 1,
        "name": name,
        "job_name": lsf_job_name(spec.job_name or f"regvi_{name}"),
        "sweep_dir": str(sweep_dir),
        "cwd": str(Path(cwd or os.getcwd()).resolve()),
        "train_args": list(train_args),
        "swept_keys": list(keys),
        # the bsub settings, so `regvi sweep resubmit` can submit elements again
        "spec": {k: v for k, v in asdict(spec).items() if k != "dry_run"},
        "elements": [],
    }
    if (sweep_dir / MANIFEST).exists():
        old = read_manifest(sweep_dir)
        manifest["elements"] = list(old.get("elements", []))
    taken = {e["index"] for e in manifest["elements"]}
    for num, overrides, run_dir in elements:
        index = int(num) + 1
        if index in taken:
            raise SweepError(f"array index {index} is already in {sweep_dir / MANIFEST}")
        manifest["elements"].append(
            {
                "index": index,
                "num": int(num),
                "overrides": list(element_overrides(overrides)),
                "run_name": run_name(element_overrides(overrides), keys),
                "dir": str(Path(os.path.abspath(run_dir))),
                "devices": int((devices or {}).get(int(num), 1)),
            }
        )
    manifest["elements"].sort(key=lambda e: e["index"])
    write_json_atomic(manifest, sweep_dir / MANIFEST)
    script = render_job_script(manifest, spec)
    atomic_write(sweep_dir / JOB_SCRIPT, lambda tmp: tmp.write_text(script))
    os.chmod(sweep_dir / JOB_SCRIPT, 0o755)
    return manifest


def template_path() -> Path:
    """The job-script template shipped with the launcher plugin (a copy of jobs/'s)."""
    import hydra_plugins.regvi_lsf_launcher as plugin

    return Path(plugin.__file__).resolve().parent / TEMPLATE_NAME


def render_job_script(
    manifest: dict[str, Any], spec: ArraySpec, template: str | None = None
) -> str:
    """Fill the template's ``{{...}}`` fields. Only paths (shell-quoted) and the user's setup
    lines go into the script; overrides stay in manifest.json."""
    text = template if template is not None else template_path().read_text()
    python = spec.python or sys.executable
    fields = {
        "setup": "\n".join(spec.setup) if spec.setup else "# (no setup lines)",
        "cwd": shlex.quote(manifest["cwd"]),
        "sweep_dir": shlex.quote(manifest["sweep_dir"]),
        "python": shlex.quote(python),
        "job_name": manifest["job_name"],
    }
    for key, value in fields.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def lsf_index_list(indices: Sequence[int]) -> str:
    """LSF's index list of a job array: ``1-4`` for 1..4, ``2,5,7``, ``1-3,6``."""
    ordered = sorted({int(i) for i in indices})
    if not ordered:
        raise SweepError("no array elements to submit")
    runs: list[list[int]] = []
    for i in ordered:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def bsub_command(manifest: dict[str, Any], spec: ArraySpec, indices: Sequence[int]) -> list[str]:
    """The bsub argument list for one job array over ``indices`` (script given on stdin)."""
    array = f"{manifest['job_name']}[{lsf_index_list(indices)}]"
    if spec.max_parallel:
        array += f"%{int(spec.max_parallel)}"
    logs = Path(manifest["sweep_dir"]) / LOG_DIR
    cmd = ["bsub", "-J", array]
    if spec.queue:
        cmd += ["-q", str(spec.queue)]
    resources = str(spec.resources) if spec.resources else ""
    if spec.nodes > 1:
        # one slot on each of `nodes` hosts; each host gets the -gpu request
        cmd += ["-n", str(int(spec.nodes))]
        resources = re.sub(r"span\[[^\]]*\]", "span[ptile=1]", resources)
        if "span[" not in resources:
            resources = f"{resources} span[ptile=1]".strip()
    elif spec.cores:
        cmd += ["-n", str(int(spec.cores))]
    if spec.memory:
        cmd += ["-M", str(int(spec.memory))]
    if resources:
        cmd += ["-R", resources]
    if spec.gpu:
        cmd += ["-gpu", str(spec.gpu)]
    if spec.walltime:
        cmd += ["-W", str(spec.walltime)]
    if spec.project:
        cmd += ["-P", str(spec.project)]
    if spec.requeue:
        # the warning signal makes the run checkpoint and exit with REQUEUE_EXIT_CODE, on
        # which LSF requeues the element; rerun, it resumes from its checkpoint
        cmd += ["-wa", WARNING_SIGNAL, "-wt", str(int(spec.warning_minutes))]
        cmd += ["-Q", str(REQUEUE_EXIT_CODE)]
    cmd += ["-o", str(logs / "%J_%I.out"), "-e", str(logs / "%J_%I.err")]
    cmd += list(spec.extra_args)
    return cmd


def submit_array(
    manifest: dict[str, Any], spec: ArraySpec, indices: Sequence[int], echo=print
) -> str | None:
    """Submit ``job.sh`` as one LSF job array (or only print it when ``spec.dry_run``).

    Returns the LSF job id (None for a dry run). Raises :class:`SweepError` with bsub's own
    message when bsub is missing or refuses the job.
    """
    cmd = bsub_command(manifest, spec, indices)
    script_path = Path(manifest["sweep_dir"]) / JOB_SCRIPT
    if spec.dry_run:
        echo(f"dry run: would submit {len(indices)} elements with:")
        echo(f"{shlex.join(cmd)} < {shlex.quote(str(script_path))}")
        echo(f"--- {script_path} ---")
        echo(script_path.read_text().rstrip("\n"))
        echo("--- end ---")
        if spec.nodes > 1:
            hosts = [f"<host{i + 1}>" for i in range(spec.nodes)]
            launch = launch_command(manifest, manifest["elements"][0], hosts, "<jobid>", spec)
            echo(f"each element's run-element then starts one torchrun per host ({spec.nodes}):")
            echo(shlex.join(launch))
        return None
    exe = shutil.which(cmd[0])
    if exe is None:
        raise SweepError(
            "bsub not found on PATH: run the sweep on an LSF login node, or use "
            "hydra.launcher.dry_run=true to only print the job"
        )
    with script_path.open("rb") as stdin:
        try:
            proc = subprocess.run(
                [exe, *cmd[1:]], stdin=stdin, capture_output=True, text=True, check=False
            )
        except OSError as exc:
            raise SweepError(f"cannot run bsub: {exc}") from None
    said = " ".join((proc.stdout + " " + proc.stderr).split())
    match = _SUBMITTED.search(proc.stdout + proc.stderr)
    if proc.returncode != 0 or match is None:
        raise SweepError(
            f"bsub refused the job array (exit {proc.returncode}): {said or 'no message'}"
        )
    return match.group(1)


# ------------------------------------------------------------------------------ an element


def run_element(
    sweep_dir: str | Path,
    index: int | None = None,
    train: Callable[[list[str]], int] | None = None,
) -> int:
    """Run array element ``index`` (default ``$LSB_JOBINDEX``) as ``regvi train <overrides>``
    in its run directory and record its status there; return its exit code.

    ``train(args) -> exit code`` runs ``regvi train args`` in this process (the CLI passes one,
    saving a second interpreter start per element); by default it runs in a subprocess.
    Either way the overrides are passed as an argument list, never through a shell.
    """
    sweep_dir = Path(os.path.abspath(sweep_dir))
    if index is None:
        raw = os.environ.get("LSB_JOBINDEX", "")
        if not raw.isdigit() or int(raw) < 1:
            raise SweepError(f"LSB_JOBINDEX is {raw!r}; pass the element index explicitly")
        index = int(raw)
    manifest = read_manifest(sweep_dir)
    element = next((e for e in manifest["elements"] if e["index"] == index), None)
    if element is None:
        raise SweepError(f"element {index} is not in {sweep_dir / MANIFEST}")
    run_dir = Path(element["dir"])
    job_id = os.environ.get("LSB_JOBID")
    nodes = int(manifest.get("spec", {}).get("nodes") or 1)
    if nodes > 1 and in_torchrun():
        return _run_rank(manifest, element, nodes, train)
    if results_path(run_dir) is not None:
        print(f"element {index} already finished: {run_dir}", flush=True)
        write_status(run_dir, "finished", 0, index=index, job_id=job_id)
        return 0
    # a requeued or resubmitted element continues from its checkpoint
    resuming = checkpoint_path(run_dir).exists() and (run_dir / RUN_CONFIG).exists()
    write_status(run_dir, "running", None, index=index, job_id=job_id, resumed=resuming or None)
    if resuming:
        args = [f"resume={run_dir}"]
    else:
        args = [
            *manifest.get("train_args", []),
            *element["overrides"],
            # the directory comes from the environment, so no path ever needs Hydra quoting
            f"hydra.run.dir=${{oc.env:{ENV_ELEMENT_DIR}}}",
        ]
    env = {
        **os.environ,
        ENV_ELEMENT_DIR: str(run_dir),
        ENV_SWEEP_DIR: str(sweep_dir),
        ENV_SWEEP_NAME: manifest["name"],
        ENV_RUN_NAME: element.get("run_name") or run_dir.name,
    }
    how = "resuming from its checkpoint" if resuming else run_name(element["overrides"])
    print(f"element {index}: {how}", flush=True)
    try:
        if nodes > 1:  # this process only starts the per-host torchrun agents and waits
            spec = ArraySpec.from_config(manifest["spec"])
            cmd = launch_command(manifest, element, lsf_hosts()[:nodes], job_id or "0", spec)
            if len(cmd[2].split()) < nodes:
                raise SweepError(f"element {index} needs {nodes} hosts; LSF gave {cmd[2]!r}")
            print(f"starting torchrun on {nodes} hosts: {shlex.join(cmd)}", flush=True)
            code = _launch_ranks(cmd, env, run_dir, manifest.get("cwd") or None)
        elif train is None:
            cmd = [sys.executable, "-m", "regvi.cli.app", "train", *args]
            code = subprocess.call(cmd, env=env, cwd=manifest.get("cwd") or None)
        else:
            os.environ.update(env)
            if manifest.get("cwd"):
                os.chdir(manifest["cwd"])
            code = train(args)
    except BaseException:
        write_status(run_dir, "failed", 1, index=index, job_id=job_id)
        raise
    ok = code == 0 and results_path(run_dir) is not None
    if code == REQUEUE_EXIT_CODE:
        state = "preempted"  # its checkpoint is written; LSF requeues it with -Q
    else:
        state = "finished" if ok else "failed"
    write_status(run_dir, state, code, index=index, job_id=job_id)
    return code if code else (0 if ok else 1)


def _launch_ranks(cmd: list[str], env: dict[str, str], run_dir: Path, cwd: str | None) -> int:
    """Run the blaunch command of a multi-node element and wait; its exit code, or
    :data:`REQUEUE_EXIT_CODE` when the ranks stopped on a pre-emption signal.

    The ranks stop together and exit with the requeue code, but torchrun reports failed
    workers with its own exit code: global rank 0 leaves :data:`PREEMPTED_MARKER` in the
    run directory once the checkpoint is written (:func:`_run_rank`), and that is what
    counts. While waiting, this process outlives the job's signals: SIGUSR2 is ignored (and
    blaunch and the agents start ignoring it, until they install their own handlers) and
    SIGTERM is noted and left to torchrun, which passes it on to the workers.
    """
    marker = run_dir / PREEMPTED_MARKER
    marker.unlink(missing_ok=True)  # a previous attempt's
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous[signal.SIGUSR2] = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _note_signal)
    try:
        code = subprocess.call(cmd, env=env, cwd=cwd)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    if code != 0 and marker.exists():
        return REQUEUE_EXIT_CODE
    return code


def _note_signal(signum: int, frame: Any) -> None:
    print(f"got {signal.Signals(signum).name}: waiting for the ranks to stop", flush=True)


def in_torchrun() -> bool:
    """Whether this process is a worker started by torchrun (it sets TORCHELASTIC_RUN_ID)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def lsf_hosts() -> list[str]:
    """The job's hosts, first (where LSF runs the job script) first, each once: from
    ``LSB_MCPU_HOSTS`` (``"hostA 1 hostB 1"``), else ``LSB_HOSTS``."""
    mcpu = os.environ.get("LSB_MCPU_HOSTS", "").split()
    names = mcpu[0::2] if mcpu else os.environ.get("LSB_HOSTS", "").split()
    return list(dict.fromkeys(names))


def rendezvous_port(job_id: str | int, index: int) -> int:
    """The torchrun rendezvous port of an element: 20000-59999, from ``LSB_JOBID`` and
    ``LSB_JOBINDEX``; elements of one array (one job id) get different ports."""
    return 20000 + (int(job_id) * 4099 + int(index)) % 40000


def launch_command(
    manifest: dict[str, Any],
    element: dict[str, Any],
    hosts: Sequence[str],
    job_id: str,
    spec: ArraySpec,
) -> list[str]:
    """``blaunch -z "<hosts>" python -m regvi.run.torchrun ... -m regvi.cli.app sweep
    run-element <sweep> --index <i>``: one torchrun agent per host (one blaunch call for all),
    rendezvous (c10d) on the first host; each starts ``trainer.devices`` processes, each of
    which runs the element as one rank of the multi-node run. :mod:`regvi.run.torchrun` is
    torchrun (``torch.distributed.run``) with SIGUSR2 passed on to the workers instead of
    killing the agent."""
    python = spec.python or sys.executable
    index = int(element["index"])
    port = rendezvous_port(job_id, index) if str(job_id).isdigit() else "<port>"
    return [
        "blaunch",
        "-z",
        " ".join(hosts),
        python,
        "-m",
        "regvi.run.torchrun",  # torchrun, passing LSF's warning signal on to its workers
        "--nnodes",
        str(len(hosts)),
        "--nproc_per_node",
        str(int(element.get("devices") or 1)),
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        f"{hosts[0] if hosts else 'localhost'}:{port}",
        "--rdzv_id",
        f"{manifest['job_name']}_{job_id}_{index}",
        "-m",
        "regvi.cli.app",
        "sweep",
        "run-element",
        str(manifest["sweep_dir"]),
        "--index",
        str(index),
    ]


def _run_rank(
    manifest: dict[str, Any],
    element: dict[str, Any],
    nodes: int,
    train: Callable[[list[str]], int] | None,
) -> int:
    """One process of a multi-node element (started by torchrun): train as one rank of
    Lightning DDP (it reads the TorchElastic environment); the starting process records the
    element's status, and global rank 0 writes the outputs (Hydra's ``.hydra/`` included) and,
    when the ranks stopped on a pre-emption signal, :data:`PREEMPTED_MARKER`."""
    run_dir = Path(element["dir"])
    rank = int(os.environ.get("RANK") or 0)  # global rank, set by torchrun
    if checkpoint_path(run_dir).exists() and (run_dir / RUN_CONFIG).exists():
        args = [f"resume={run_dir}"]
    else:
        fixed = ("trainer.strategy", "trainer.num_nodes")
        if rank != 0:
            fixed += ("hydra.output_subdir",)
        kept = [o for o in element["overrides"] if override_key(o) not in fixed]
        args = [
            *manifest.get("train_args", []),
            *kept,
            "trainer.strategy=ddp",
            f"trainer.num_nodes={nodes}",
            f"hydra.run.dir=${{oc.env:{ENV_ELEMENT_DIR}}}",
        ]
        if rank != 0:  # every rank shares the run dir: only rank 0 writes Hydra's .hydra/
            args.append("hydra.output_subdir=null")
    os.environ.update(
        {
            ENV_ELEMENT_DIR: str(run_dir),
            ENV_SWEEP_DIR: str(manifest["sweep_dir"]),
            ENV_SWEEP_NAME: manifest["name"],
            ENV_RUN_NAME: element.get("run_name") or run_dir.name,
        }
    )
    if train is None:
        cmd = [sys.executable, "-m", "regvi.cli.app", "train", *args]
        code = subprocess.call(cmd, cwd=manifest.get("cwd") or None)
    else:
        if manifest.get("cwd"):
            os.chdir(manifest["cwd"])
        code = train(args)
    if code == REQUEUE_EXIT_CODE and rank == 0:
        # stopped by a pre-emption signal, the checkpoint written: tell run_element
        write_json_atomic({"exit_code": code, "time": time.time()}, run_dir / PREEMPTED_MARKER)
    return code


# ------------------------------------------------------------------------- reading a sweep


@dataclass
class Element:
    index: int
    num: int
    dir: Path
    overrides: list[str]
    state: str = "pending"
    exit_code: int | None = None
    note: str = ""
    has_checkpoint: bool = False


#: Element states, in the order ``regvi sweep status`` counts them. ``requeued``: stopped by
#: the warning signal with its checkpoint written, and LSF requeues it (``requeue=true``);
#: ``killed``: killed by its owner, an administrator, a pre-emption or a limit other than
#: the run time (or stopped by a signal without requeueing); ``timed-out``: killed at its
#: run limit. ``resubmit --killed`` covers killed and timed-out, ``--failed`` failed.
STATES = ("finished", "running", "pending", "requeued", "timed-out", "killed", "failed")
STATES += ("unknown",)
#: States that ``regvi sweep resubmit`` selects with ``--failed`` and with ``--killed``.
FAILED_STATES = ("failed", "unknown")
KILLED_STATES = ("killed", "timed-out")

#: LSF's reasons for ending a job (in the job report it appends to the element's log).
_LSF_REASONS = {
    "TERM_RUNLIMIT": ("timed-out", "run limit reached"),
    "TERM_CPULIMIT": ("timed-out", "CPU time limit reached"),
    "TERM_DEADLINE": ("timed-out", "deadline reached"),
    "TERM_OWNER": ("killed", "killed by its owner"),
    "TERM_FORCE_OWNER": ("killed", "killed by its owner"),
    "TERM_ADMIN": ("killed", "killed by an administrator"),
    "TERM_FORCE_ADMIN": ("killed", "killed by an administrator"),
    "TERM_PREEMPT": ("killed", "pre-empted"),
    "TERM_MEMLIMIT": ("killed", "memory limit reached"),
    "TERM_SWAP": ("killed", "swap limit reached"),
    "TERM_HOST": ("killed", "host failure"),
    "TERM_LOAD": ("killed", "host overloaded"),
    "TERM_WINDOW": ("killed", "queue window closed"),
    "TERM_REQUEUE_OWNER": ("requeued", "requeued by its owner"),
    "TERM_REQUEUE_ADMIN": ("requeued", "requeued by an administrator"),
}
#: What the job script prints (to stdout and stderr) when an element starts.
START_MARKER = "regvi sweep element "
_TERM = re.compile(r"\b(TERM_[A-Z_]+)\b")
_EXITED = re.compile(r"Exited with exit code (\d+)")


@dataclass
class LsfOutcome:
    """What LSF's job report in an element's logs says: its TERM_ reason and exit code."""

    reason: str | None = None
    exit_code: int | None = None
    completed: bool = False
    log: Path | None = None


def lsf_outcome(
    sweep_dir: str | Path, index: int, job_id: str | None = None, since: float = 0.0
) -> LsfOutcome | None:
    """Read the logs ``logs/<job_id>_<index>.out|.err`` of an element (without ``job_id``,
    the newest of any job written after ``since``): None when there are none."""
    logs = Path(sweep_dir) / LOG_DIR
    if not logs.is_dir():
        return None
    if job_id:
        paths = [logs / f"{job_id}_{index}.{ext}" for ext in ("out", "err")]
        paths = [p for p in paths if p.exists()]
    else:
        paths = [p for p in logs.glob(f"*_{index}.*") if p.stat().st_mtime >= since]
        if paths:
            newest = max(paths, key=lambda p: p.stat().st_mtime).name.rsplit(".", 1)[0]
            paths = [p for p in paths if p.name.rsplit(".", 1)[0] == newest]
    if not paths:
        return None
    outcome = LsfOutcome(log=paths[0])
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        # a requeued job appends to its logs: only its latest start counts
        text = text.rsplit(START_MARKER, 1)[-1]
        reasons = [r for r in _TERM.findall(text) if r in _LSF_REASONS]
        if reasons:
            outcome.reason, outcome.log = reasons[-1], path
        codes = _EXITED.findall(text)
        if codes:
            outcome.exit_code = int(codes[-1])
        outcome.completed |= "Successfully completed." in text
    return outcome


def classify(
    status: dict[str, Any], outcome: LsfOutcome | None, requeue: bool = False
) -> tuple[str, int | None, str]:
    """An element's (state, exit code, note) from its status file and LSF's job report.

    The status file says what the run saw; LSF's report says why a job ended that could not
    record it (a kill leaves ``running``), and a run limit or a kill that came as a signal
    the run handled (``preempted``: checkpoint written, exit code 99) is named as such.
    """
    state = status.get("state", "unknown")
    code = status.get("exit_code")
    note = status.get("note", "")
    if state == "finished":
        return state, code, note
    if outcome is not None and outcome.reason and state != "pending":
        reported, why = _LSF_REASONS[outcome.reason]
        if reported != "requeued" and state == "preempted" and requeue:
            reported = "requeued"  # the warning came first: LSF requeues it on exit 99
        return reported, outcome.exit_code if code is None else code, f"{outcome.reason}: {why}"
    if state == "preempted":
        if requeue:
            return "requeued", code, "stopped by the warning signal; LSF requeues it"
        return "killed", code, "stopped by a signal; its checkpoint is written"
    if state == "running" and outcome is not None and outcome.exit_code is not None:
        # the job ended without the element recording it: killed by a signal
        code = outcome.exit_code
        return ("killed" if code > 128 else "failed"), code, f"job exited with code {code}"
    if state == "failed" and code is not None and (code < 0 or code > 128):
        signum = -code if code < 0 else code - 128
        return "killed", code, f"killed by signal {signum}"
    return state, code, note


def _basic_sweep_elements(sweep_dir: Path) -> tuple[list[Element], list[str]]:
    """Jobs of a local (basic launcher) sweep, enumerated from Hydra's multirun.yaml."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    master = OmegaConf.load(sweep_dir / "multirun.yaml")
    task = list(OmegaConf.select(master, "hydra.overrides.task", default=[]) or [])
    try:
        parsed = OverridesParser.create().parse_overrides(task)
        batches = BasicSweeper.split_arguments(parsed, None)
        jobs = [list(job) for batch in batches for job in batch]
    except Exception as exc:
        raise SweepError(f"cannot read the sweep in {sweep_dir / 'multirun.yaml'}: {exc}") from None
    dirs: dict[int, Path] = {}
    for hydra_yaml in sweep_dir.glob("*/.hydra/hydra.yaml"):
        try:
            num = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.job.num")
            dirs[int(num)] = hydra_yaml.parent.parent
        except Exception:
            continue
    elements = [
        Element(index=i + 1, num=i, dir=dirs.get(i, sweep_dir / str(i)), overrides=o)
        for i, o in enumerate(jobs)
    ]
    return elements, swept_keys(task)


def collect(sweep_dir: str | Path) -> tuple[list[Element], list[str]]:
    """Every element of a sweep with its state, and the swept keys.

    An LSF sweep is read from ``manifest.json``, a local one from ``multirun.yaml``.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise SweepError(f"sweep directory {sweep_dir} not found")
    if (sweep_dir / MANIFEST).exists():
        manifest = read_manifest(sweep_dir)
        elements = [
            Element(e["index"], e["num"], Path(e["dir"]), list(e["overrides"]))
            for e in manifest["elements"]
        ]
        keys = list(manifest.get("swept_keys", []))
    elif (sweep_dir / "multirun.yaml").exists():
        elements, keys = _basic_sweep_elements(sweep_dir)
    else:
        raise SweepError(f"{sweep_dir} holds neither {MANIFEST} nor multirun.yaml: not a sweep")
    requeue = False
    if (sweep_dir / MANIFEST).exists():
        requeue = bool(read_manifest(sweep_dir).get("spec", {}).get("requeue"))
    for e in elements:
        status = read_status(e.dir)
        outcome = None
        if status.get("state") != "finished":
            outcome = lsf_outcome(sweep_dir, e.index, status.get("job_id"))
        e.state, e.exit_code, e.note = classify(status, outcome, requeue)
        e.has_checkpoint = checkpoint_path(e.dir).exists()
        if e.state == "pending" and "job_id" not in status and outcome is not None:
            e.state, e.note = "unknown", "started but wrote no status; see its log"
    return elements, keys


def status_report(sweep_dir: str | Path) -> tuple[str, dict[str, int]]:
    """A readable status report and the count per state."""
    elements, keys = collect(sweep_dir)
    counts: dict[str, int] = {}
    for e in elements:
        counts[e.state] = counts.get(e.state, 0) + 1
    head = ", ".join(f"{counts[s]} {s}" for s in STATES if s in counts)
    lines = [f"{sweep_dir}: {len(elements)} elements: {head or 'none'}"]
    for e in elements:
        code = "" if e.exit_code is None else f" (exit {e.exit_code})"
        notes = [e.note] if e.note else []
        if e.has_checkpoint and e.state != "finished":
            notes.append("has a checkpoint")
        note = f" [{'; '.join(notes)}]" if notes else ""
        lines.append(f"  [{e.index}] {e.state:<8}{code} {run_name(e.overrides, keys)}{note}")
    stopped = [e for e in elements if e.state in FAILED_STATES + KILLED_STATES]
    if stopped and (Path(sweep_dir) / LOG_DIR).is_dir():
        lines.append(f"  logs: {Path(sweep_dir) / LOG_DIR}/<jobid>_<index>.out|.err")
    if stopped and (Path(sweep_dir) / MANIFEST).exists():
        lines.append(f"  submit them again: regvi sweep resubmit {sweep_dir} --failed --killed")
    return "\n".join(lines), counts


def _raw_status(run_dir: Path) -> str | None:
    try:
        return (run_dir / STATUS_FILE).read_text()
    except OSError:
        return None


def _restore_status(run_dir: Path, text: str | None) -> None:
    if text is None:
        (run_dir / STATUS_FILE).unlink(missing_ok=True)
    else:
        atomic_write(run_dir / STATUS_FILE, lambda tmp: tmp.write_text(text))


def resubmit(
    sweep_dir: str | Path,
    failed: bool = True,
    killed: bool = True,
    dry_run: bool = False,
    echo: Callable[[str], Any] = print,
) -> tuple[list[int], str | None]:
    """Submit the failed and/or killed (and timed-out) elements of an LSF sweep again as ONE
    job array with an index list (``name[2,5,7]``); each resumes from its checkpoint when it
    has one (:func:`run_element`). Returns (the indices, the LSF job id; None for a dry run
    or when there is nothing to submit)."""
    sweep_dir = Path(os.path.abspath(sweep_dir))
    manifest = read_manifest(sweep_dir)
    if "spec" not in manifest:
        raise SweepError(
            f"{sweep_dir / MANIFEST} holds no bsub settings (written by an older regvi): "
            "submit the sweep again"
        )
    wanted = (FAILED_STATES if failed else ()) + (KILLED_STATES if killed else ())
    elements, _ = collect(sweep_dir)
    chosen = [e for e in elements if e.state in wanted]
    if not chosen:
        return [], None
    spec = ArraySpec.from_config({**manifest["spec"], "dry_run": dry_run})
    script = render_job_script(manifest, spec)  # the interpreter/setup of the first submission
    atomic_write(sweep_dir / JOB_SCRIPT, lambda tmp: tmp.write_text(script))
    os.chmod(sweep_dir / JOB_SCRIPT, 0o755)
    indices = [e.index for e in chosen]
    if dry_run:
        return indices, submit_array(manifest, spec, indices, echo=echo)
    # marked pending before bsub: an element may start (and record so) before bsub returns
    before = {e.index: _raw_status(e.dir) for e in chosen}
    for e in chosen:
        note = f"resubmitted ({e.state})" + (", resumes" if e.has_checkpoint else "")
        write_status(e.dir, "pending", None, index=e.index, note=note)
    try:
        job_id = submit_array(manifest, spec, indices, echo=echo)
    except BaseException:
        for e in chosen:  # nothing was submitted: put the states back
            _restore_status(e.dir, before[e.index])
        raise
    for e in chosen:
        status = read_status(e.dir)
        if status.get("state") == "pending" and "job_id" not in status:
            write_status(e.dir, "pending", None, index=e.index, job_id=job_id, note=status["note"])
    return indices, job_id


def override_values(overrides: Sequence[str]) -> dict[str, Any]:
    """Key -> value of each override, unquoted as Hydra reads it (``'x, y'`` -> ``x, y``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    values: dict[str, Any] = {}
    parser = OverridesParser.create()
    for o in overrides:
        try:
            value = parser.parse_override(o).value()
        except Exception:
            value = override_value(o)
        if isinstance(value, list | dict):
            value = json.dumps(value)
        values[override_key(o)] = value
    return values


def _override_columns(elements: Sequence[Element], keys: Sequence[str]) -> list[str]:
    """Override keys shown as columns: those swept, else those whose value differs, else all."""
    all_keys: list[str] = []
    for e in elements:
        for o in e.overrides:
            k = override_key(o)
            if not k.startswith("hydra") and k not in all_keys:
                all_keys.append(k)
    if keys:
        return [k for k in all_keys if k in keys] or list(keys)
    values = [{override_key(o): override_value(o) for o in e.overrides} for e in elements]
    varying = [k for k in all_keys if len({v.get(k) for v in values}) > 1]
    return varying or all_keys


def summarize(sweep_dir: str | Path):
    """One row per element: index, state, its overrides (a column per key), the final row of
    its ``history.csv`` and its run dir. Written to ``<sweep_dir>/summary.csv`` (atomically)."""
    import pandas as pd

    from regvi.outputs import write_csv_atomic

    elements, keys = collect(sweep_dir)
    columns = _override_columns(elements, keys)
    rows = []
    for e in elements:
        row: dict[str, Any] = {"index": e.index, "status": e.state, "exit_code": e.exit_code}
        given = override_values(e.overrides)
        for k in columns:
            row[k] = given.get(k)
        history = e.dir / HISTORY_CSV
        if history.exists():
            try:
                frame = pd.read_csv(history)
                if len(frame):
                    row.update(frame.iloc[-1].to_dict())
            except Exception:
                pass
        row["run_dir"] = str(e.dir)
        rows.append(row)
    table = pd.DataFrame(rows)
    if "run_dir" in table:
        table = table[[c for c in table.columns if c != "run_dir"] + ["run_dir"]]
    write_csv_atomic(table, Path(sweep_dir) / SUMMARY_CSV)
    return table


def format_table(table) -> str:
    """The summary for a terminal: overrides, state and the validation metrics."""
    if table.empty:
        return "(no elements)"
    metrics = ("epoch", "loss_validation", "elbo_validation", "reconstruction_loss_validation")
    metrics += ("kl_z_validation",)
    history = [c for c in table.columns if c.endswith(("_train", "_validation")) or c in metrics]
    shown = [
        c
        for c in table.columns
        if c not in ("run_dir", "exit_code", "kl_weight") and (c not in history or c in metrics)
    ]
    return table[shown].to_string(index=False, float_format=lambda v: f"{v:.4g}")
