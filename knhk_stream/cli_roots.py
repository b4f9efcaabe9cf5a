"""`knhk-stream roots tail` (being written)."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
