"""`pico prep` (placeholder until the data_prep issue lands)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `pico prep`."""


def run(args: argparse.Namespace) -> int:
    raise SystemExit("pico prep: not built yet (see the data_prep issue)")
