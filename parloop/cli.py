"""`parloop`: one command line with a subcommand per job (litgpt style).

Each subcommand lives in its own module, which provides `add_arguments(parser)` and `run(args) -> int | None`.
Only the module of the command being run is imported.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("parloop.train.corpus", "build a tokenized code corpus (default: the Python standard library)"),
    "train": ("parloop.train.command", "train a PLT model from a recipe, on one process or many (torchrun)"),
    "quickstart": ("parloop.train.quickstart", "build the stdlib corpus, train R=1 and R=2, compare, sample, bench"),
    "bench": ("parloop.bench.command", "decode latency, prefill time and KV-cache bytes per loop mode and loop count"),
    "serve": ("parloop.inference.server", "OpenAI-compatible HTTP server with continuous batching"),
    "generate": ("parloop.inference.generate", "generate from a prompt, streaming tokens to the terminal"),
    "quantize": ("parloop.quant_checkpoint", "write an int8 or int4 weight-quantized copy of a checkpoint, for CPUs"),
    "eval": ("parloop.eval.command", "evaluate a checkpoint: bpb, code reasoning, line completion, HumanEval"),
    "study": ("parloop.study.command", "the loop-count study: matched models per loop count and mode, with a report"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help with its default, but for None or []: an option that is unset unless given says in its help
    what happens then."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default in (None, []) else super()._get_help_string(action)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `parloop` parser. Only `command`'s module is imported (all of them when None), so one command's
    optional dependency (e.g. the server's web stack) never stops the others from running."""
    from parloop import __version__

    parser = argparse.ArgumentParser(prog="parloop", description="Parallel Loop Transformers: train, decode, "
                                     "serve, benchmark and study how many loops a model should have.")
    parser.add_argument("--version", action="version", version=f"parloop {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text,
                             formatter_class=HelpFormatter)
        cmd.set_defaults(_module=module_name)
        if command in (None, name):
            importlib.import_module(module_name).add_arguments(cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else "")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    code = importlib.import_module(args._module).run(args)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
