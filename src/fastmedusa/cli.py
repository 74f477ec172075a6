"""The `fastmedusa` command: train, generate, distill, bench. Argument parsing lives beside each feature; this file
only routes and turns bad input into one clear line (exit code 2) instead of a traceback."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from collections.abc import Sequence

from fastmedusa.errors import CommandParser, UserError

# subcommand -> (module, function adding arguments, function running; help)
COMMANDS = {
    "train": (
        "fastmedusa.train.cli",
        "add_train_arguments",
        "run_train",
        "train Medusa heads (stage 1 or 2)",
    ),
    "generate": (
        "fastmedusa.decode.cli",
        "add_generate_arguments",
        "run_generate",
        "generate text with Medusa tree decoding",
    ),
    "distill": (
        "fastmedusa.data.distill",
        "add_distill_arguments",
        "run_distill",
        "regenerate ShareGPT answers with the base model itself (self-distillation data for the heads)",
    ),
    "eval": (
        "fastmedusa.heads_eval",
        "add_eval_arguments",
        "run_eval",
        "held-out accuracy of trained heads (vs the data and vs the model's greedy tokens), tokens/step",
    ),
    "export": (
        "fastmedusa.model.cli",
        "add_export_arguments",
        "run_export",
        "write heads in the layout a serving engine loads (FasterDecoding/Medusa, vLLM) with a model card",
    ),
    "shrink-vocab": (
        "fastmedusa.model.cli",
        "add_shrink_arguments",
        "run_shrink",
        "cut full-vocabulary heads to the N most frequent tokens of their training data: a cheaper decode step",
    ),
}
BENCHMARKS = {
    "loss": (
        "fastmedusa.bench.loss",
        "fused linear cross-entropy (--loss kl: KL divergence to a teacher): torch, chunked, liger, cce, triton",
    ),
    "train": ("fastmedusa.bench.train", "a training step on Llama-3 shapes: memory, tokens/s, MFU"),
    "decode": ("fastmedusa.bench.decode", "generation speed: HF generate vs own greedy vs Medusa"),
    "heads": (
        "fastmedusa.bench.heads",
        "per-head top-k accuracy on held-out prompts, and a tree built from it",
    ),
    "wgrad": (
        "fastmedusa.bench.wgrad",
        "weight-gradient error of each dW scheme against float64 (CPU or GPU)",
    ),
    "draft-kl": (
        "fastmedusa.bench.draft_kl",
        "draft-vocabulary heads: KL to the renormalised teacher vs one extra class vs CE, a small run",
    ),
    "report": (
        "fastmedusa.bench.report",
        "markdown tables of speed-ups and memory from bench train JSON files",
    ),
}
COMMON_FLAGS = ("--debug", "--verbose")  # fastmedusa's own: accepted before or after the command
DEBUG_HELP = "show full tracebacks for errors"
VERBOSE_HELP = "show what transformers prints while loading models (GGUF conversion and loading bars, warnings)"
USER_ERRORS = (
    ValueError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError,
    UserError,
)  # fmt: skip


def build_parser(argv_command: str | None = None) -> argparse.ArgumentParser:
    from fastmedusa import __version__

    parser = CommandParser(
        prog="fastmedusa",
        description="Train Medusa decoding heads cheaply and decode faster with them.",
    )
    parser.add_argument("--version", action="version", version=f"fastmedusa {__version__}")
    common = CommandParser(add_help=False)  # accepted before or after the command
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, add, _run, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        if argv_command in (None, name):  # import only what runs: `fastmedusa train` never loads decode code
            getattr(importlib.import_module(module), add)(p)
    width = max(map(len, BENCHMARKS))
    listing = "\n".join(f"  {name:<{width}}  {text}" for name, (_module, text) in BENCHMARKS.items())
    bench = sub.add_parser(
        "bench",
        help="benchmarks (results as JSON + PNG under bench/results/)",
        description=f"Benchmarks; each writes JSON + PNG under bench/results/.\n\nbenchmarks:\n{listing}\n\n"
        "`fastmedusa bench NAME --help` shows a benchmark's own flags.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    bench.add_argument("benchmark", choices=list(BENCHMARKS), metavar="NAME", help="which benchmark to run")
    bench.add_argument(
        "bench_args", nargs=argparse.REMAINDER, help="arguments of that benchmark (see its --help)"
    )
    return parser


def take_common_flags(args: argparse.Namespace) -> None:
    """--debug/--verbose after `bench NAME` are fastmedusa's, as after any other command: argparse hands all
    that follows NAME to the benchmark, whose parser would refuse them as unrecognized."""
    for flag in COMMON_FLAGS:
        if flag in args.bench_args:
            setattr(args, flag.removeprefix("--"), True)
    args.bench_args = [a for a in args.bench_args if a not in COMMON_FLAGS]


def run(argv: Sequence[str]) -> int:
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named with the command whose --help lists what it takes
        CommandParser(prog=f"fastmedusa {args.command}").error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "bench":
        take_common_flags(args)
    from fastmedusa.model.loading import show_loading_output

    show_loading_output(bool(getattr(args, "verbose", False)))
    if args.command == "bench":
        module = importlib.import_module(BENCHMARKS[args.benchmark][0])
        return int(module.main(list(args.bench_args)) or 0)
    module, _add, run_name, _help = COMMANDS[args.command]
    return int(getattr(importlib.import_module(module), run_name)(args) or 0)


def error_line(err: BaseException) -> str | None:
    """The one line a user error prints, or None for an error that is not the user's (a bug: traceback). An
    OS error of a write the user can fix (read-only file system, permissions, a full disk) names the file
    being written, not a temporary beside it."""
    from fastmedusa.files import WRITE_ERRORS, written_name

    if isinstance(err, OSError) and err.errno in WRITE_ERRORS and err.filename:
        name = written_name(str(err.filename))
        if err.errno in (errno.EACCES, errno.EPERM):  # reading or writing: the permissions are what to fix
            return f"error: {name}: {err.strerror}; check its permissions or pass another path"
        return f"error: cannot write {name}: {err.strerror}; pass a location you can write to"
    if isinstance(err, USER_ERRORS) or (isinstance(err, OSError) and err.errno in WRITE_ERRORS):
        return "error: " + " ".join(str(err).split())  # one line, whatever the message
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("FASTMEDUSA_DEBUG") == "1"
    try:
        return run(argv)
    except (*USER_ERRORS, OSError) as err:
        line = error_line(err)
        if debug or line is None:
            raise
        print(line, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
