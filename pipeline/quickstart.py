"""`pico quickstart` (placeholder until the foundation issue lands)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `pico quickstart`."""


def run(args: argparse.Namespace) -> int:
    raise SystemExit("pico quickstart: not built yet (see the foundation issue)")
