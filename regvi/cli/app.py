"""``regvi``: a typer app whose ``train`` command hands its arguments to Hydra.

The CLI only composes configuration, calls library functions and turns
:class:`~regvi.errors.RegviError` into a one-line message and a non-zero exit. Set
``REGVI_DEBUG=1`` or pass ``--debug`` for the full traceback.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from regvi.cli.evaluate_commands import register as register_evaluate
from regvi.errors import REQUEUE_EXIT_CODE, ConfigError, RegviError

app = typer.Typer(
    name="regvi",
    help="Train Bayesian scVI-style models of single-cell RNA (and RNA+ATAC) counts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Hydra flags that take a value, and those that do not (everything else is an override).
_VALUE_FLAGS = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
    "--info",
    "-i",
}
_BARE_FLAGS = {"--multirun", "-m", "--resolve", "--run", "-r"}
_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--version", "--shell-completion", "-sc"}


def config_dir() -> Path:
    """The shipped ``conf/`` directory (inside the wheel, or the source checkout's)."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").exists():
            return candidate
    raise RegviError(f"regvi's config directory was not found next to {here}")


def debug_enabled() -> bool:
    return os.environ.get("REGVI_DEBUG", "").lower() not in ("", "0", "false", "no")


def fail(message: str, code: int = 1) -> None:
    """Print ``error: message`` on one line to stderr and exit."""
    first = " ".join(str(message).split())
    typer.echo(f"error: {first}", err=True)
    raise SystemExit(code)


def exit_code_of(exc: BaseException) -> int:
    """The exit code for an error: :data:`~regvi.errors.REQUEUE_EXIT_CODE` for a run stopped
    by a pre-emption signal (its checkpoint written), else 1."""
    return int(getattr(exc, "exit_code", 1)) if isinstance(exc, RegviError) else 1


def split_arguments(args: list[str]) -> tuple[list[str], dict[str, str]]:
    """Separate Hydra overrides from Hydra flags (flag -> value, '' for bare flags)."""
    overrides: list[str] = []
    flags: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if arg in _BARE_FLAGS or arg in _INFO_FLAGS:
            flags[arg] = ""
        elif name in _VALUE_FLAGS and eq:
            flags[name] = value
        elif arg in _VALUE_FLAGS:
            flags[arg] = args[i + 1] if i + 1 < len(args) else ""
            i += 1
        else:
            overrides.append(arg)
        i += 1
    return overrides, flags


def _hydra_error_message(exc: Exception) -> str:
    text = str(exc)
    match = re.search(r"Could not override '([^']+)'", text)
    if match:
        from regvi.config import known_key, unknown_key_message

        cause = str(exc.__cause__ or "").strip().splitlines()
        if "not in struct" in text + " ".join(cause):
            key = match.group(1).lstrip("+~")
            if known_key(key):
                return (
                    f"config key '{key}' is not set by the selected config group; "
                    f"add it with +{key}=..., or pick the group that defines it"
                )
            return unknown_key_message(key)
        return f"{text.splitlines()[0]} {cause[0] if cause else ''}".strip()
    match = re.search(r"Could not (?:load|find) '([^']+)'", text) or re.search(
        r"In '[^']+': Could not find '([^']+)'", text
    )
    if match:
        group, _, option = match.group(1).rpartition("/")
        return f"unknown choice '{option}' for config group '{group}'" + (
            f" ({text.split('Available options:')[1].split(chr(10) + chr(10))[0].strip()})"
            if "Available options:" in text
            else ""
        )
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def prevalidate(overrides: list[str], flags: dict[str, str]) -> None:
    """Compose the config as Hydra will and validate it against the schema, so a typo or a
    wrong type fails in one line before Hydra creates a run directory or reads data.

    A sweep override (``a=1,2``) is checked with each of its values.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from regvi.config import validate_config

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:  # OverrideParseException: a malformed override
        raise ConfigError(f"cannot parse override: {str(exc).splitlines()[0]}") from None
    fixed, sweeps = [], []
    for o in parsed:
        if o.key_or_group.startswith("hydra"):
            continue
        if o.is_sweep_override():
            prefix = o.input_line.split(o.key_or_group)[0]
            sweeps.append([f"{prefix}{o.key_or_group}={v}" for v in o.sweep_string_iterator()])
        else:
            fixed.append(o.input_line)
    variants = [fixed] + [fixed + [v] for sweep in sweeps for v in sweep]
    search = []
    if flags.get("--config-dir") or flags.get("-cd"):
        user_dir = Path(flags.get("--config-dir") or flags["-cd"]).expanduser().resolve()
        search = [f"hydra.searchpath=[file://{user_dir}]"]
    name = flags.get("--config-name") or flags.get("-cn") or "train"
    for variant in variants if sweeps else [fixed]:
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(str(config_dir()), version_base="1.3", job_name="regvi"):
                cfg = compose(config_name=name, overrides=variant + search)
        except Exception as exc:
            raise ConfigError(_hydra_error_message(exc)) from None
        finally:
            GlobalHydra.instance().clear()
        validate_config(cfg)


def _run_hydra(args: list[str]) -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig

    @hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
    def _task(cfg: DictConfig) -> None:
        from regvi.run.pipeline import train

        hc = HydraConfig.get()
        run_dir = Path(hc.runtime.output_dir)
        in_sweep = hc.mode == RunMode.MULTIRUN
        if in_sweep:  # a local sweep's job records its state for `regvi sweep status`
            from regvi.sweep import write_status

            write_status(run_dir, "running", index=hc.job.num + 1)
        try:
            train(cfg, run_dir)
        except BaseException as exc:
            if in_sweep:
                code = exit_code_of(exc)
                state = "preempted" if code == REQUEUE_EXIT_CODE else "failed"
                write_status(run_dir, state, code, index=hc.job.num + 1)
            if not isinstance(exc, RegviError) or debug_enabled() or in_sweep:
                raise  # in a sweep Hydra records this job as failed and goes on
            fail(str(exc), exit_code_of(exc))
        if in_sweep:
            write_status(run_dir, "finished", 0, index=hc.job.num + 1)
        print(run_dir, flush=True)

    sys.argv = ["regvi train", *args]
    _task()


def _train_exit_code(args: list[str]) -> int:
    """``regvi train args`` in this process (a sweep element); its exit code."""
    try:
        train_from_arguments(args)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def train_from_arguments(args: list[str]) -> None:
    """What ``regvi train`` does with its arguments: validate, then hand them to Hydra."""
    debug = "--debug" in args
    if debug:
        os.environ["REGVI_DEBUG"] = "1"
        args = [a for a in args if a != "--debug"]
    overrides, flags = split_arguments(args)
    try:
        resume_dirs = [o.split("=", 1)[1] for o in overrides if o.startswith("resume=")]
        if resume_dirs and resume_dirs[0] not in ("", "null"):
            # A resumed run reuses its saved config and directory: no Hydra composition.
            if len(overrides) > 1 or flags:
                raise ConfigError(
                    "resume=<run_dir> continues a run with its saved config; "
                    "give no other overrides or flags"
                )
            from regvi.run.pipeline import resume

            print(resume(Path(resume_dirs[0]).expanduser()), flush=True)
            return
        if not set(flags) & _INFO_FLAGS:
            prevalidate(overrides, flags)
        _run_hydra(args)
    except RegviError as exc:
        if debug_enabled():
            raise
        fail(str(exc), exit_code_of(exc))


@app.command(
    context_settings={
        "allow_extra_args": True,
        "ignore_unknown_options": True,
        "help_option_names": [],
    },
    help="Train a model. Arguments are Hydra overrides and flags: key=value, -m (sweep), "
    "--cfg job, --config-dir DIR, --help (lists config groups and every key).",
)
def train(ctx: typer.Context) -> None:
    train_from_arguments(list(ctx.args))


sweep_app = typer.Typer(
    help="Inspect a sweep (`regvi train -m ...`, local or on LSF with hydra/launcher=lsf).",
    no_args_is_help=True,
)
app.add_typer(sweep_app, name="sweep")
register_evaluate(app)


@sweep_app.command("status")
def sweep_status(
    sweep_dir: Annotated[Path, typer.Argument(help="The sweep directory (hydra.sweep.dir).")],
) -> None:
    """Which elements finished, are running, pending or requeued, and which failed, were
    killed or timed out (read from the files the elements write and LSF's job reports in
    their logs, so no LSF command is needed). Exit code 1 when any failed, was killed or
    timed out."""
    from regvi import sweep

    try:
        report, counts = sweep.status_report(sweep_dir)
    except RegviError as exc:
        if debug_enabled():
            raise
        fail(str(exc))
    typer.echo(report)
    if any(counts.get(s) for s in ("failed", *sweep.KILLED_STATES)):
        raise SystemExit(1)


@sweep_app.command("resubmit")
def sweep_resubmit(
    sweep_dir: Annotated[Path, typer.Argument(help="The sweep directory (hydra.sweep.dir).")],
    failed: Annotated[bool, typer.Option("--failed", help="Elements that failed.")] = False,
    killed: Annotated[
        bool, typer.Option("--killed", help="Elements killed or timed out (LSF).")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the bsub command, submit nothing.")
    ] = False,
) -> None:
    """Submit the failed and/or killed elements of an LSF sweep again, as ONE job array
    (name[2,5,7]) with the sweep's bsub settings; each resumes from its checkpoint when it
    has one. Without --failed or --killed: both."""
    from regvi import sweep

    if not failed and not killed:
        failed = killed = True
    try:
        indices, job_id = sweep.resubmit(sweep_dir, failed, killed, dry_run, echo=typer.echo)
    except RegviError as exc:
        if debug_enabled():
            raise
        fail(str(exc))
    if not indices:
        typer.echo("nothing to resubmit")
    elif job_id is not None:
        listed = ",".join(str(i) for i in indices)
        typer.echo(f"Submitted LSF job array {job_id} (elements {listed})")


@sweep_app.command("summarize")
def sweep_summarize(
    sweep_dir: Annotated[Path, typer.Argument(help="The sweep directory (hydra.sweep.dir).")],
) -> None:
    """One table of each element's overrides, status and final metrics (last row of its
    history.csv), printed and written to <sweep_dir>/summary.csv."""
    from regvi import sweep

    try:
        table = sweep.summarize(sweep_dir)
    except RegviError as exc:
        if debug_enabled():
            raise
        fail(str(exc))
    typer.echo(sweep.format_table(table))
    typer.echo(Path(sweep_dir) / sweep.SUMMARY_CSV)


@sweep_app.command("run-element", hidden=True)
def sweep_run_element(
    sweep_dir: Annotated[Path, typer.Argument(help="The sweep directory.")],
    index: Annotated[int | None, typer.Option(help="Array index (default: $LSB_JOBINDEX).")] = None,
) -> None:
    """Run one array element (what each LSF job array element executes)."""
    from regvi import sweep

    try:
        code = sweep.run_element(sweep_dir, index, train=_train_exit_code)
    except RegviError as exc:
        if debug_enabled():
            raise
        fail(str(exc))
    raise SystemExit(code)


@app.callback()
def _main() -> None:
    """regvi: Bayesian scVI-style models of single-cell counts, trained from one command.

    Run `regvi train --help` for the configuration groups and keys.
    """


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
