"""`pico prep`: prepare raw corpora into zstd-compressed WebDataset shards with Ray.

    pico prep --input corpus/ s3://bucket/raw/*.jsonl.zst --output s3://bucket/shards/
    pico prep verify s3://bucket/shards/

Rerunning the same command after an interruption resumes it; unreadable documents are listed
in manifest.json and on stderr, and the job goes on (unless --fail-fast).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys

from pico.data_prep.config import PrepConfig
from pico.configs.errors import UserError

EPILOG = """sub-verb:
  pico prep verify DST [--json]   read every shard back, check sha256, counts and every sample
                                  against manifest.json; exit 1 on any problem

output: DST/{train,val}-NNNNNN.tar (samples KEY.bin.zst + KEY.json) and DST/manifest.json
sizes take K, M, G suffixes (powers of 1024): --shard-bytes 512M
every option is also a dotted key of the prep section: --prep.shard_bytes=512M --prep.dedup=true"""

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'256M' -> 268435456; plain integers are bytes."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 1048576, 64K, 256M, 2G)")
    return int(m.group(1)) * 1024 ** "_KMGT".index(m.group(2).upper() or "_")


def parse_bool(text: str) -> bool:
    """true/false, yes/no, on/off, 1/0 (for `--prep.dedup=false`)."""
    value = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
    if text.lower() not in value:
        raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true or false)")
    return value[text.lower()]


def flags(name: str) -> list[str]:
    """The option strings of a PrepConfig field: the short flag, and the dotted key of the `prep` section.

    `--shard-bytes 512M` and `--prep.shard_bytes=512M` are the same option: the dotted form is
    the convention every other command uses for its config keys (`pico train --train.steps=N`)."""
    short = {"inputs": "--input"}.get(name, "--" + name.replace("_", "-"))
    return [short, f"--prep.{name}"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `pico prep`, with help from the PrepConfig field docstrings."""
    from pico.configs.tree import field_docs

    docs = field_docs(PrepConfig)
    parser.add_argument(*flags("inputs"), dest="inputs", nargs="+", action="extend", required=True, metavar="SRC",
                        help=docs["inputs"])
    parser.add_argument(*flags("output"), dest="output", required=True, metavar="DST", help=docs["output"])
    for f in dataclasses.fields(PrepConfig):
        if f.name in ("inputs", "output"):
            continue
        names = flags(f.name)
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.type in (bool, "bool"):
            parser.add_argument(*names, dest=f.name, type=parse_bool, nargs="?", const=True, default=False,
                                metavar="BOOL", help=docs[f.name])
        elif f.name.endswith("_bytes"):
            parser.add_argument(*names, dest=f.name, type=parse_size, default=default, metavar="N",
                                help=f"{docs[f.name]} (default {default >> 20}M)")
        elif f.name == "format":
            parser.add_argument(*names, dest=f.name, choices=["auto", "raw", "jsonl", "parquet"], default=default,
                                help=docs[f.name])
        else:
            kind = {"int": int, "float": float, "int | None": int}.get(str(f.type), str)
            shown = "" if default is None else f" (default {default})"
            parser.add_argument(*names, dest=f.name, type=kind, default=default, help=docs[f.name] + shown)
    parser.add_argument("--json", action="store_true", help="print one JSON object (the summary) on stdout")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def check_dotted_keys(argv: list[str]) -> None:
    """An unknown `--prep.KEY` is an error that lists the valid keys (as `pico train` does for its sections)."""
    valid = [f.name for f in dataclasses.fields(PrepConfig)]
    for arg in argv:
        if arg.startswith("--prep."):
            key = arg[len("--prep."):].split("=", 1)[0]
            if key not in valid:
                raise UserError(f"unknown key prep.{key}; valid keys of the prep section: {', '.join(valid)}")
        elif arg.startswith("--") and "." in arg.split("=", 1)[0]:
            raise UserError(f"{arg.split('=', 1)[0]}: `pico prep` takes only keys of its own section "
                            f"(--prep.KEY=VALUE, for example --prep.shard_bytes=512M)")


def run(args: argparse.Namespace) -> int:
    """Run one prep job from parsed arguments; print its summary."""
    from pico.data_prep.job import run_job

    names = {f.name for f in dataclasses.fields(PrepConfig)}
    cfg = PrepConfig(**{k: v for k, v in vars(args).items() if k in names})
    manifest, stats = run_job(cfg, progress=not args.no_progress)
    summary = {**stats, "shards": {s: t["shards"] for s, t in manifest["totals"].items()},
               "totals": manifest["totals"], "documents": manifest["documents"],
               "skipped": len(manifest["skipped"])}
    if args.json:
        print(json.dumps(summary))
    else:
        d = manifest["documents"]
        print(f"{summary['output']}: {summary['shards']['train']} train + {summary['shards']['val']} val shards; "
              f"documents read {d['read']}, written {d['written']}, deduplicated {d['deduplicated']}, "
              f"empty {d['empty']}, failed {d['failed']}")
        if stats.get("seconds"):
            print(f"{stats.get('raw_bytes', 0) / 1e6:.1f} MB raw in {stats['seconds']:.1f} s "
                  f"({stats.get('raw_mb_per_s', 0):.1f} MB/s); {stats['units_resumed']} of {stats['units']} "
                  "units were already done")
    if manifest["documents"]["failed"]:
        print(f"pico prep: {manifest['documents']['failed']} documents could not be read; "
              "manifest.json lists each under `skipped`", file=sys.stderr)
    if not any(t["shards"] for t in manifest["totals"].values()):
        d = manifest["documents"]
        print(f"pico prep: error: no shard was written: of {d['read']} documents read, {d['failed']} could not be "
              f"read and {d['empty']} were empty; fix the inputs (manifest.json lists each problem)", file=sys.stderr)
        return 1
    return 0


def verify_parser() -> argparse.ArgumentParser:
    """The options of `pico prep verify`."""
    parser = argparse.ArgumentParser(prog="pico prep verify", description=(
        "Read every shard in DST, check its sha256 and counts against manifest.json, decompress every "
        "sample; print each problem; exit 1 if there is any."))
    parser.add_argument("output", metavar="DST", help="directory or s3:// URL written by pico prep")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return parser


def run_verify(argv: list[str]) -> int:
    """`pico prep verify DST`: print every problem; exit 1 if there is any."""
    args = verify_parser().parse_args(argv)
    from pico.data_prep.verify import verify

    checked: list[str] = []
    try:
        problems = verify(args.output, on_shard=checked.append)
    except OSError as e:  # the output itself cannot be listed or read (a path, a bucket, credentials)
        raise UserError(f"cannot read {args.output} ({type(e).__name__}: {str(e)[:200]}); check the path, "
                        "and for s3:// your credentials") from None
    if args.json:
        print(json.dumps({"output": args.output, "shards_checked": len(checked), "problems": problems,
                          "ok": not problems}))
    else:
        for p in problems:
            print(p)
        print(f"pico prep verify: {len(checked)} shards checked, {len(problems)} problems",
              file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    """`pico prep ...` or `pico prep verify DST`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "verify":
            return run_verify(argv[1:])
        parser = argparse.ArgumentParser(prog="pico prep", description=__doc__.strip().split("\n\n")[0],
                                         epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(parser)
        check_dotted_keys(argv)
        return run(parser.parse_args(argv))
    except KeyboardInterrupt:
        print("pico prep: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"pico prep: error: {e}", file=sys.stderr)
        sys.exit(2)
