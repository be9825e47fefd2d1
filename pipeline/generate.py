"""`pico generate` (placeholder until the inference issue lands)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `pico generate`."""


def run(args: argparse.Namespace) -> int:
    raise SystemExit("pico generate: not built yet (see the inference issue)")
