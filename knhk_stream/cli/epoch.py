"""`knhk-stream epoch`: propose, sign, apply and list chain epochs (key rotation, peer changes)."""

from __future__ import annotations

import click


@click.group()
def epoch() -> None:
    """Chain epochs: rotate a key, add or remove a peer, change the threshold or the hook."""
