"""`pico info` (placeholder until the model issue lands)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `pico info`."""


def run(args: argparse.Namespace) -> int:
    raise SystemExit("pico info: not built yet (see the model issue)")
