"""`pico convert` (placeholder until the release issue lands)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `pico convert`."""


def run(args: argparse.Namespace) -> int:
    raise SystemExit("pico convert: not built yet (see the release issue)")
