"""Auditor commands (being written): prove, verify-proof, audit, chain export/import."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
CHAIN_COMMANDS: list[click.Command] = []
