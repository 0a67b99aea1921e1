"""``fastpo-train``: the training job from the command line.

    fastpo-train                                   # the embedded default job (SmolLM2 + LoRA)
    fastpo-train --config job.yaml --loss.beta 0.2 --optimization.max_steps 100
    fastpo-train --config job.yaml --resume        # continue from the latest valid checkpoint
    fastpo-train --print-config                    # the resolved config as YAML, then exit
    deepspeed --num_gpus 8 $(which fastpo-train) --config job.yaml --deepspeed.zero_stage 3
    deepspeed --num_gpus 8 --module fastpo.engine.train.cli --config job.yaml
    deepspeed --hostfile hostfile --num_nodes 2 --num_gpus 8 $(which fastpo-train) --config job.yaml

Any config key can be overridden with ``--section.key value`` (or ``--section.key=value``);
values are read as YAML scalars, and every float must be finite. ``--loss.method M`` brings M's
default loss type (the file's ``loss.loss_type`` / ``loss_weights`` are for the file's method,
and for ``kto`` its ``data.share_prompt``), unless those keys are given on the command line
too. The ``--local_rank`` argument the deepspeed launcher adds is accepted (the rank comes from
the environment). Exit status: 0 done, 1 stopped on a non-finite loss or gradient, 2 bad
configuration or input, with one line naming the key, file, row or path
(``FASTPO_TRACEBACK=1`` shows the traceback), 3 a fault of the environment: a disk too full
for the next checkpoint or a failed write (ENOSPC, EIO, a read-only or vanished folder), an
output folder another job holds, a lost rank; one line naming the folder, holder or rank, the
complete checkpoints kept for ``--resume``;
128 + N stopped by signal N (SIGTERM: 143, SIGINT: 130) after finishing the step and writing a
checkpoint that ``--resume`` continues from.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .loop import TrainResult

USAGE = __doc__.split("\n\n", 1)[1]


def _split_args(argv: Sequence[str]) -> tuple[dict[str, object], list[str]]:
    """(our own flags, config overrides)."""
    flags: dict[str, object] = {"config": None, "resume": None, "print_config": False}
    overrides: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if arg in ("-h", "--help"):
            flags["help"] = True
        elif name == "--config":
            if not eq:
                if i + 1 >= len(args):
                    raise SystemExit("fastpo-train: --config needs a file")
                i += 1
                value = args[i]
            flags["config"] = value
        elif name == "--resume":
            if eq:
                flags["resume"] = value
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                i += 1
                flags["resume"] = args[i]
            else:
                flags["resume"] = True
        elif name == "--print-config":
            flags["print_config"] = True
        elif name in ("--local_rank", "--local-rank"):  # added by the deepspeed launcher
            if not eq and i + 1 < len(args):
                i += 1
                value = args[i]
            os.environ.setdefault("LOCAL_RANK", value)
        else:
            overrides.append(arg)
        i += 1
    return flags, overrides


def _input_error(exc: BaseException) -> int:
    """A mistake in the user's paths, files or config: one line, exit status 2 (the traceback
    with ``FASTPO_TRACEBACK=1``)."""
    if os.environ.get("FASTPO_TRACEBACK") == "1":
        raise exc
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in text:
        text = f"{exc.filename}: {text}"
    print(f"fastpo-train: error: {text}", file=sys.stderr)
    return 2


def _job_fault(exc: BaseException) -> int:
    """The environment failed the job (see :class:`~fastpo.engine.errors.JobFault`): one line,
    exit status 3."""
    if os.environ.get("FASTPO_TRACEBACK") == "1":
        raise exc
    print(f"fastpo-train: error: {exc}", file=sys.stderr, flush=True)
    return 3


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fastpo-train``; returns the exit status."""
    from ..errors import InputError, JobFault
    from .config_loading import load_config, to_yaml

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        flags, overrides = _split_args(argv)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    if flags.get("help"):
        print(USAGE)
        return 0
    if flags["resume"] is not None:
        overrides += [f"--checkpoint.resume={flags['resume']}" if flags["resume"] is not True
                      else "--checkpoint.resume=true"]
    try:
        cfg = load_config(flags["config"], overrides=overrides)
    except InputError as exc:
        return _input_error(exc)
    if flags["print_config"]:
        print(to_yaml(cfg), end="")
        return 0

    from .loop import NonFiniteError, train
    from .storage import storage_failure

    try:
        result = train(cfg)
    except NonFiniteError as exc:
        print(f"fastpo-train: stopped: {exc}", file=sys.stderr)
        return 1
    except JobFault as exc:
        return _job_fault(exc)
    except OSError as exc:  # a write outside the guarded ones (metrics, config copy)
        folder = Path(exc.filename).parent if exc.filename else Path(cfg.logging.output_dir)
        fault = storage_failure(exc, folder=folder, what="a file of the run")
        if fault is not None and exc.errno in (errno.ENOSPC, errno.EIO, errno.EROFS,
                                               errno.EDQUOT):
            return _job_fault(fault)
        return _input_error(exc)
    except (InputError, ValueError) as exc:  # bad config, data or paths: it says which
        return _input_error(exc)
    if int(os.environ.get("RANK", "0")) == 0:  # the run's one summary line
        line = f"fastpo-train: {result.steps} steps ({result.stopped}) in {result.seconds:.0f} s"
        if result.closing:
            line += f"; {result.closing}"
        if result.export_dir:
            line += f"; model in {result.export_dir}"
        print(line, flush=True)
    return exit_status(result)


def exit_status(result: TrainResult) -> int:
    """0 for a finished run; 128 + the signal for a run stopped by SIGTERM/SIGINT (checkpointed,
    resumable), as a shell reports a process killed by that signal."""
    return 128 + result.stop_signal if result.stop_signal else 0


if __name__ == "__main__":
    sys.exit(main())
