"""`pico eval` (placeholder until the training issue lands)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `pico eval`."""


def run(args: argparse.Namespace) -> int:
    raise SystemExit("pico eval: not built yet (see the training issue)")
