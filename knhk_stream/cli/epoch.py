"""`knhk-stream epoch`: propose, sign, apply and list chain epochs (key rotation, peer changes).

An epoch statement is a JSON file that travels between operators: one
proposes it, every needed peer signs it in place, one applies it to Redis
(where running workers pick it up) and to the settings file.
"""

from __future__ import annotations

import json
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import click

from knhk_stream.cli.common import fail_cleanly, open_store, prefix_option, redis_option, settings_option
from knhk_stream.errors import EpochError
from knhk_stream.protocol.beats import TICKS_PER_BEAT
from knhk_stream.protocol.epochs import Epoch, transition_problems
from knhk_stream.protocol.jsontext import loads_json
from knhk_stream.protocol.settings import ChainSettings


def _load_statement(path: Path, settings: ChainSettings) -> Epoch:
    try:
        data = loads_json(path.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise click.ClickException(f"cannot read the epoch statement {path}: {e}") from None
    try:
        return Epoch.from_json(data, settings.chain_id, settings.tick_ms)
    except EpochError as e:
        raise click.ClickException(f"{path}: {e}") from None


def _with_redis_epochs(settings: ChainSettings, redis_url: str, prefix: str) -> tuple[ChainSettings, Any]:
    from knhk_stream.store.epochs import load_epochs

    store = open_store(settings, redis_url, prefix)
    found, findings = load_epochs(store)
    for f in findings:
        click.echo(f"warning: {f}", err=True)
    return settings.with_epochs(found), store


@click.group()
def epoch() -> None:
    """Chain epochs: rotate a key, add or remove a peer, change the threshold or the hook.

    Steps: `propose` writes a statement, each peer `sign`s it, one operator
    `apply`s it. See docs/key-rotation.md.
    """


@epoch.command("propose")
@settings_option
@click.option("--next", "next_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A settings file with the new epoch's [[peers]], threshold, hook and max_triples.")  # fmt: skip
@click.option("--from-cycle", type=click.IntRange(min=0), help="First cycle of the new epoch.")
@click.option("--in-seconds", type=click.IntRange(min=1), help="Start the new epoch this many seconds from now.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Statement file to write.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@fail_cleanly
def propose(settings_path: Path, next_path: Path, from_cycle: int | None, in_seconds: int | None, out: Path,
            force: bool) -> None:  # fmt: skip
    """Write an unsigned statement for the epoch after the newest one in the settings file."""
    if (from_cycle is None) == (in_seconds is None):
        raise click.UsageError("give either --from-cycle C or --in-seconds S")
    settings = ChainSettings.from_toml(settings_path)
    prev = settings.epoch_chain.newest
    try:
        raw = tomllib.loads(next_path.read_text("utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise click.ClickException(f"cannot read --next {next_path}: {e}") from None
    for fixed in ("chain_id", "tick_ms"):
        if fixed in raw and raw[fixed] != getattr(settings, fixed):
            raise click.ClickException(f"--next {next_path}: {fixed} never changes between epochs")
    if "epochs" in raw or "start_offset" in raw:
        raise click.ClickException(f"--next {next_path}: list only peers, threshold, hook and max_triples")
    raw = {**raw, "chain_id": settings.chain_id, "tick_ms": settings.tick_ms}
    nxt = ChainSettings.from_dict(raw, f"--next {next_path}")
    if from_cycle is None:
        now_cycle = int(time.time() * 1000) // settings.tick_ms // TICKS_PER_BEAT
        from_cycle = now_cycle + (int(in_seconds or 0) * 1000) // (settings.tick_ms * TICKS_PER_BEAT) + 1
    if from_cycle <= prev.from_cycle:
        raise click.ClickException(
            f"--from-cycle {from_cycle} must be greater than epoch {prev.number}'s from_cycle {prev.from_cycle}"
        )
    statement = Epoch(settings.chain_id, settings.tick_ms, prev.number + 1, from_cycle, nxt.threshold, nxt.hook,
                      nxt.max_triples, nxt.peers, prev.epoch_hash, (), nxt.hook_entrypoint)  # fmt: skip
    bad = statement.problems()
    if bad:
        raise click.ClickException(f"the new epoch is not well-formed: {'; '.join(bad)}")
    if out.exists() and not force:
        raise click.ClickException(f"{out} exists; pass --force to replace it")
    out.write_text(statement.dumps(), "utf-8")
    old, new = set(prev.public_keys.items()), set(statement.public_keys.items())
    click.echo(f"epoch {statement.number} from cycle {from_cycle}: {statement.epoch_hash.hex()}")
    fresh = sorted(p for p, _ in new - old)
    click.echo(
        f"wrote {out}; it needs signatures from {prev.threshold} peer(s) of epoch {prev.number}, "
        f"{statement.threshold} of epoch {statement.number}"
        + (f", and every new key ({', '.join(fresh)})" if fresh else "")
    )


@epoch.command("sign")
@click.argument("statement_path", metavar="EPOCH_JSON", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@settings_option
@click.option("--peer-id", required=True, envvar="KNHK_PEER_ID", help="The signing peer (env KNHK_PEER_ID).")
@click.option("--key", "key_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Its private key: the old one, or the new one of a rotation (sign once with each).")  # fmt: skip
@fail_cleanly
def sign(statement_path: Path, settings_path: Path, peer_id: str, key_path: Path) -> None:
    """Add this peer's signature to the statement file, in place.

    A peer signs at most one statement per epoch number: a ledger next to the
    key (KEY.epochs.json) remembers what it signed and refuses another."""
    from knhk_stream.protocol.keys import load_private_key, public_key_bytes

    settings = ChainSettings.from_toml(settings_path)
    statement = _load_statement(statement_path, settings)
    prev = settings.epoch_chain.by_number(statement.number - 1)
    if prev is None:
        raise click.ClickException(
            f"the settings file knows epochs up to {settings.epoch_chain.newest.number}; "
            f"this statement is for epoch {statement.number}: update the settings file first"
        )
    if statement.prev_epoch_hash != prev.epoch_hash:
        raise click.ClickException(f"the statement does not follow epoch {prev.number} of the settings file")
    try:
        key = load_private_key(key_path)
    except ValueError as e:
        raise click.ClickException(f"--key: {e}") from None
    pub = public_key_bytes(key)
    if pub not in (prev.public_keys.get(peer_id), statement.public_keys.get(peer_id)):
        raise click.ClickException(
            f"this key is not {peer_id!r}'s key in epoch {prev.number} nor in epoch {statement.number}"
        )
    ledger_path = key_path.with_name(key_path.name + ".epochs.json")
    ledger: dict[str, str] = json.loads(ledger_path.read_text("utf-8")) if ledger_path.exists() else {}
    slot = f"{settings.chain_id}/{statement.number}"
    if ledger.get(slot, statement.epoch_hash.hex()) != statement.epoch_hash.hex():
        raise click.ClickException(
            f"this key already signed another statement for epoch {statement.number} ({ledger[slot][:16]}…): "
            "a peer signs at most one statement per epoch number"
        )
    signed = statement.signed_by(peer_id, key)
    statement_path.write_text(signed.dumps(), "utf-8")
    ledger[slot] = statement.epoch_hash.hex()
    ledger_path.write_text(json.dumps(ledger, indent=2) + "\n", "utf-8")
    left = transition_problems(prev, signed)
    click.echo(f"signed epoch {statement.number} as {peer_id}; " + ("; ".join(left) if left else "it is complete"))


@epoch.command("apply")
@click.argument("statement_path", metavar="EPOCH_JSON", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@settings_option
@redis_option
@prefix_option
@click.option("--write-settings", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the settings with the new epoch appended here (default: the --settings file).")  # fmt: skip
@fail_cleanly
def apply(statement_path: Path, settings_path: Path, redis_url: str, prefix: str, write_settings: Path | None) -> None:
    """Verify the statement from epoch 0, check it is still ahead of every head, store it in Redis.

    Running workers pick it up within seconds."""
    from knhk_stream.store.epochs import store_epoch

    settings, store = _with_redis_epochs(ChainSettings.from_toml(settings_path), redis_url, prefix)
    statement = _load_statement(statement_path, settings)
    chain = settings.epoch_chain
    prev = chain.by_number(statement.number - 1)
    if prev is None:
        raise click.ClickException(f"epoch {statement.number - 1} is not known: apply the epochs before it first")
    have = chain.by_number(statement.number)
    if have is not None and have.epoch_hash != statement.epoch_hash:
        raise click.ClickException(
            f"epoch {statement.number} is already {have.epoch_hash.hex()[:16]}…; Redis never overwrites an epoch "
            "(a second statement for one number would fork the epochs)"
        )
    bad = transition_problems(prev, statement)
    if bad:
        raise click.ClickException(f"epoch {statement.number} is not valid: {'; '.join(bad)}")
    heads = {s: store.head(s) for s in store.shards()}
    late = sorted((s, h.cycle) for s, h in heads.items() if h is not None and h.cycle >= statement.from_cycle)
    if late:
        raise click.ClickException(
            f"from_cycle {statement.from_cycle} is not ahead of the committed heads "
            f"({', '.join(f'shard {s} at {c}' for s, c in late)}): propose again with a later --from-cycle"
        )
    if have is None and not store_epoch(store, statement):
        raise click.ClickException(f"epoch {statement.number} was stored in Redis meanwhile by someone else")
    target = write_settings or settings_path
    from_file = ChainSettings.from_toml(settings_path)
    updated = from_file.with_epochs([*chain.epochs[1:], statement])
    target.write_text(updated.to_toml(), "utf-8")
    click.echo(
        f"epoch {statement.number} applied: from cycle {statement.from_cycle}, "
        f"{len(statement.peers)} peers, threshold {statement.threshold}; settings written to {target}"
    )


@epoch.command("list")
@settings_option
@redis_option
@prefix_option
@click.option("--json", "as_json", is_flag=True, help="JSON Lines: one object per epoch.")
@fail_cleanly
def list_(settings_path: Path, redis_url: str, prefix: str, as_json: bool) -> None:
    """Each epoch: number, hash, from_cycle, peers, and whether it verifies from epoch 0."""
    settings, _ = _with_redis_epochs(ChainSettings.from_toml(settings_path), redis_url, prefix)
    chain = settings.epoch_chain
    rows: list[dict[str, Any]] = []
    for e in chain.epochs:
        rows.append({**e.to_json(), "verifies": True, "problems": []})
    for e, why in chain.refused:
        rows.append({**e.to_json(), "verifies": False, "problems": why})
    for f in chain.forks:
        rows.append({"epoch": f.number, "verifies": False, "problems": [f"fork: signed by both: {', '.join(f.peers)}"]})
    rows.sort(key=lambda r: r["epoch"])
    for r in rows:
        if as_json:
            click.echo(json.dumps(r, ensure_ascii=False))
        else:
            peers = ", ".join(p["id"] for p in r.get("peers", []))
            state = "OK" if r["verifies"] else "REFUSED: " + "; ".join(r["problems"])
            click.echo(f"epoch {r['epoch']}: {r.get('epoch_hash', '?')[:16]}…  from cycle {r.get('from_cycle')}  "
                       f"threshold {r.get('threshold')}  peers {peers}  {state}")  # fmt: skip
    if not all(r["verifies"] for r in rows):
        sys.exit(1)
