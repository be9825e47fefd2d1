"""`pico train` (placeholder until the training issue lands)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `pico train`."""


def run(args: argparse.Namespace) -> int:
    raise SystemExit("pico train: not built yet (see the training issue)")
