"""`pico` command line: one subcommand per stage of the data flow.

Each subcommand lives in the module that owns the work and exposes two functions,
`add_arguments(parser)` and `run(args) -> int` (or one `main(argv) -> int` when it has
sub-verbs of its own). Modules are imported only when their command
runs, so `pico --help` answers without importing torch. A module that sets
`ACCEPTS_OVERRIDES = True` receives unparsed `--section.key=value` arguments in `args.overrides`.
Commands that produce numbers take `--json` and print exactly one JSON object on stdout; all
human-readable progress goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pico.configs.errors import ConfigError, UserError

COMMANDS: dict[str, tuple[str, str]] = {
    "prep": ("pico.data_prep.cli", "prepare raw corpora into zstd WebDataset shards with Ray (`pico prep verify DST` checks them)"),
    "train": ("pico.pipeline.train.trainer", "train a model with DeepSpeed from a YAML config and dotted overrides"),
    "eval": ("pico.pipeline.commands.eval", "bits per byte of a checkpoint or release on shards or plain text files"),
    "generate": ("pico.pipeline.commands.generate", "generate bytes from a checkpoint or release (self-speculative by default)"),
    "convert": ("pico.pipeline.release.convert", "convert a training checkpoint into a safetensors release"),
    "submit": ("pico.cluster.cli", "submit prep or train to a Slurm or Ray cluster"),
    "jobs": ("pico.cluster.jobs", "status, logs and cancel of submitted Slurm and Ray jobs"),
    "info": ("pico.pipeline.commands.info", "parameter count and FLOPs per byte of a config (for matching compute)"),
    "experiment": ("pico.pipeline.experiment.cli", "matched-FLOP comparisons from a design file: run, status, table"),
    "quickstart": ("pico.pipeline.commands.quickstart", "the whole chain on a built-in corpus in minutes on a CPU"),
}


def _top_help() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items())
    return (
        "usage: pico COMMAND [options]\n\n"
        "pico: pretraining for Pico, a byte-level language model with a learned router.\n\n"
        f"commands:\n{rows}\n\n"
        "Run `pico COMMAND --help` for the options of one command.\n"
        "Start with `pico quickstart`: it runs prep, train, eval, convert and generate on a CPU."
    )


def build_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    """The argparse parser of one subcommand, and the module that runs it."""
    module_name, desc = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(
        prog=f"pico {name}", description=(module.__doc__ or desc).strip().split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=getattr(module, "EPILOG", None),
    )
    module.add_arguments(parser)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_top_help())
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"pico: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    if hasattr(module, "main"):  # a command with its own sub-verbs (`pico prep verify DST`)
        try:
            return int(module.main(argv[1:]) or 0)
        except KeyboardInterrupt:
            print("pico: interrupted", file=sys.stderr)
            return 130
        except (UserError, ConfigError) as e:
            print(f"pico {name}: error: {e}", file=sys.stderr)
            return 2
    parser, module = build_parser(name)
    if getattr(module, "ACCEPTS_OVERRIDES", False):
        args, rest = parser.parse_known_args(argv[1:])
        bad = [a for a in rest if not (a.startswith("--") and "=" in a and "." in a.split("=", 1)[0])]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)} (config overrides look like --optim.lr=3e-4)")
        args.overrides = rest
    else:
        args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("pico: interrupted", file=sys.stderr)
        return 130
    except (UserError, ConfigError) as e:
        print(f"pico {name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
