"""`onepass` command line: train | prepare | inspect | score | chat | check | demo.

Each command lives in its own module here and imports the library only when it runs, so `--help`
is instant. User errors end with one line on stderr and exit status 2; tracebacks only with --debug.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from onepass import allocator
from onepass.cli import chat, check, data, demo, score, train
from onepass.errors import OnepassError

COMMANDS = (train, data, score, chat, check, demo)  # each has add_parsers(subparsers)
RUN_MODELS = ("train", "score", "chat", "check", "demo")  # these start again on mimalloc (see onepass.allocator)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onepass", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parsers(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    show_logs()
    try:
        status, finished = _run(args, argv)
    except Exception:  # a bug (or --debug): its traceback, then leave the process group
        if argv is None and _in_process_group():
            import traceback

            traceback.print_exc()
            _leave_process_group(argv, 1, finished=False)
        raise
    _leave_process_group(argv, status, finished)
    return status


def _run(args: argparse.Namespace, argv: list[str] | None) -> tuple[int, bool]:
    """The command's exit status, and whether it returned by itself (every rank of a torchrun job then
    ends together: a signal stop is agreed on by all ranks) rather than by an error on this rank."""
    try:
        if argv is None and args.command in RUN_MODELS:  # a command line, not a call from Python
            tune_cpu_process()
            quiet_transformers()
        return args.handler(args), True
    except OnepassError as error:
        if args.debug:
            raise
        _report(error)
        return 2, False
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130, False
    except BrokenPipeError:  # `onepass inspect --json | head`: the reader left, nothing is wrong
        sys.stderr.close()
        return 0, True


def _in_process_group() -> bool:
    return "torch.distributed" in sys.modules and sys.modules["torch.distributed"].is_initialized()


def _leave_process_group(argv: list[str] | None, status: int, finished: bool) -> None:
    """Under torchrun: leave the process group (after a barrier when every rank `finished`); a worker
    started from the command line then ends at once (`distributed.end_process`)."""
    if "torch.distributed" not in sys.modules:
        return
    from onepass.train.distributed import end_process, launched_by_torchrun, shutdown

    if argv is None and launched_by_torchrun():
        end_process(status, finished)
    shutdown(finished)


def tune_cpu_process() -> None:
    """Process-wide settings for a CPU run of a model, made here, in the entry point, and never by the
    library: start again on mimalloc (`onepass.allocator`; the run's start says which allocator runs),
    keep freed memory with glibc's malloc (each step re-allocates the same large tensors), and bound
    oneDNN's kernel caches before the first matmul (packed rows' changing lengths would fill them).
    Nothing on a machine with an NVIDIA GPU, where none of it was measured to help."""
    if Path("/dev/nvidiactl").exists():
        return
    allocator.restart_on_mimalloc()
    allocator.cpu_memory_settings()


class _Stderr(logging.Handler):
    """Writes each record's message to the `sys.stderr` of the moment (a test's capture included)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging's own way of reporting a broken stream
            self.handleError(record)


def show_logs(level: int = logging.INFO) -> None:
    """The library's log lines (logger `onepass`) on stderr as plain lines, as the commands print them:
    the library only logs; the command line decides that they reach the terminal (once per process)."""
    logger = logging.getLogger("onepass")
    if not any(isinstance(handler, _Stderr) for handler in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def quiet_transformers() -> None:
    """transformers' own progress bars ("Loading weights", "Writing model shards") off: the command's
    output is onepass's lines and its one progress bar. The Hub's download bars stay."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def _report(error: OnepassError) -> None:
    if "torch.distributed" in sys.modules:  # under torchrun: the first failing rank prints, once
        from onepass.train.distributed import current, report_error

        report_error(str(error), current())
    else:
        print(f"error: {error}", file=sys.stderr)
