"""Experiments 2-4's driver, retired into `pico experiment` (pipeline/experiment/): this file only maps
its old command line onto the design files in configs/experiments/.

    python benchmarks/experiment.py --design experiment2 [--jobs N]   ==  pico experiment run configs/experiments/experiment2.yaml
    python benchmarks/experiment.py --table --design experiment3 [--out DIR]  ==  pico experiment table ...
    python benchmarks/experiment.py --status --design experiment4     ==  pico experiment status ...

The recorded runs under benchmarks/results/experiment{2,3,4}/ were made by the old driver at the
revisions their READMEs name (`git show REV:benchmarks/experiment.py` has it); `pico experiment
table` reads them as they are. The options of the old driver that pinned a revision (--rev) and
stopped at a time (--stop-at) have no counterpart: a design's results record their revision and a
rerun reuses finished runs, so stopping is a kill and resuming is the same command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESIGNS = Path(__file__).resolve().parents[1] / "configs" / "experiments"


def translate(argv: list[str]) -> list[str]:
    """The `pico experiment` arguments of an old command line."""
    p = argparse.ArgumentParser(prog="benchmarks/experiment.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--design", default="experiment2", help="experiment2, experiment3, experiment4 or a design path")
    p.add_argument("--table", action="store_true", help="rewrite the table from the recorded runs")
    p.add_argument("--status", action="store_true", help="which runs are finished, failed or ready")
    p.add_argument("--out", help="--table: folder for table.md, table.json and the plot")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2: the two cores)")
    args = p.parse_args(argv)
    design = str(DESIGNS / f"{args.design}.yaml") if "/" not in args.design else args.design
    if args.table:
        return ["table", design, *(["--out", args.out] if args.out else [])]
    if args.status:
        return ["status", design]
    return ["run", design, "--jobs", str(args.jobs)]


def main(argv: list[str] | None = None) -> int:
    from pico.pipeline.cli import main as pico

    return pico(["experiment", *translate(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
