"""`pico submit` (placeholder until the cluster issue lands)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `pico submit`."""


def run(args: argparse.Namespace) -> int:
    raise SystemExit("pico submit: not built yet (see the cluster issue)")
