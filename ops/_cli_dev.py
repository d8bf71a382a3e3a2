"""Placeholder sub-command module (filled in by its owner)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add this module's sub-commands to *sub* (an argparse sub-parsers action)."""
    _ = (sub, argparse)
