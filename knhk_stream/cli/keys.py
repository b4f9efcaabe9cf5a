"""`knhk-stream keys`: peer signing keys."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group()
def keys() -> None:
    """Peer signing keys (Ed25519)."""


@keys.command("generate")
@click.option("--peer-id", required=True, help="The peer id this key signs for (1..64 bytes).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Private key file to create (PKCS#8 PEM, mode 0600).")  # fmt: skip
@click.option("--force", is_flag=True, help="Overwrite an existing key file.")
def keys_generate(peer_id: str, out: Path, force: bool) -> None:
    """Create a private key file and print the public key and its [[peers]] entry."""
    from knhk_stream.protocol.quorum import generate_key, public_key_bytes, save_private_key

    if not 1 <= len(peer_id.encode("utf-8")) <= 64:
        raise click.BadParameter("must be 1 to 64 UTF-8 bytes", param_hint="--peer-id")
    key = generate_key()
    try:
        save_private_key(key, out, overwrite=force)
    except FileExistsError:
        raise click.ClickException(f"{out} exists; pass --force to replace it (the old key is lost)") from None
    pub = public_key_bytes(key).hex()
    click.echo(pub)
    click.echo(f"# add to the chain settings of every peer:\n[[peers]]\nid = {json.dumps(peer_id)}\n"
               f'public_key = "{pub}"', err=True)  # fmt: skip
