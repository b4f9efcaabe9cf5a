"""Chain settings: what every peer and auditor of one chain must load identically."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from knhk_stream.errors import EpochError, SettingsError
from knhk_stream.protocol.epochs import Epoch, EpochChain, Peer, build_chain, genesis_epoch, parse_epochs
from knhk_stream.protocol.hooks import CANONICAL, Hook, load_hook
from knhk_stream.protocol.keys import parse_public_key
from knhk_stream.protocol.quorum import check_threshold, default_threshold
from knhk_stream.protocol.receipts import DeltaProcessor

__all__ = ["ChainSettings", "Epoch", "Peer", "SettingsError"]


class EpochProcessor:
    """Receipts by the hook and max_triples of the epoch of each receipt's cycle."""

    def __init__(self, settings: ChainSettings) -> None:
        self._settings = settings

    def receipt(self, shard: int, cycle: int, tick: int, offset: int, value: bytes | None) -> bytes:
        s = self._settings
        return s.processor_for(s.epoch_for(cycle)).receipt(shard, cycle, tick, offset, value)


@dataclass(frozen=True)
class ChainSettings:
    """The chain settings: the fixed chain_id and tick_ms, epoch 0's fields, and the epochs after it.

    `peers`, `threshold`, `max_triples` and `hook` are epoch 0's. Use
    `epoch_for(cycle)` for what applies to a given beat."""

    peers: tuple[Peer, ...]
    threshold: int
    chain_id: str = "knhk"
    tick_ms: int = 125
    max_triples: int = 1024
    hook: str = CANONICAL
    hook_entrypoint: str | None = None
    start_offsets: Mapping[int, int] = field(default_factory=dict)
    epochs: tuple[Epoch, ...] = ()  # statements after epoch 0, as listed; accepted only through epoch_chain

    @property
    def public_keys(self) -> dict[str, bytes]:
        """Epoch 0's keys (see epoch_for for later epochs)."""
        return {p.id: p.public_key for p in self.peers}

    @cached_property
    def genesis(self) -> Epoch:
        """Epoch 0: its hash identifies the chain."""
        return genesis_epoch(self.chain_id, self.tick_ms, self.threshold, self.hook, self.max_triples, self.peers)

    @cached_property
    def epoch_chain(self) -> EpochChain:
        """The epochs accepted from epoch 0 (the refused ones and any fork are reported in it)."""
        return build_chain(self.genesis, self.epochs)

    def epoch_for(self, cycle: int) -> Epoch:
        return self.epoch_chain.for_cycle(cycle)

    def with_epochs(self, more: Iterable[Epoch]) -> ChainSettings:
        """These settings with more epoch statements (e.g. read from Redis); duplicates are dropped."""
        have = {e.epoch_hash for e in self.epochs}
        extra: list[Epoch] = []
        for e in more:
            if e.epoch_hash not in have and e.number > 0:
                have.add(e.epoch_hash)
                extra.append(e)
        return replace(self, epochs=self.epochs + tuple(extra)) if extra else self

    def processor(self) -> DeltaProcessor | EpochProcessor:
        """What turns a delta into its receipt: one processor, or one per epoch when there are several."""
        if len(self.epoch_chain.epochs) == 1:
            return self.processor_for(self.genesis)
        return EpochProcessor(self)

    @cached_property
    def _processors(self) -> dict[bytes, DeltaProcessor]:
        return {}

    def processor_for(self, epoch: Epoch) -> DeltaProcessor:
        """The receipts of `epoch`: its hook and max_triples (the one place a DeltaProcessor is built)."""
        p = self._processors.get(epoch.epoch_hash)
        if p is None:
            p = self._processors[epoch.epoch_hash] = DeltaProcessor(self.load_hook(epoch), epoch.max_triples)
        return p

    def start_offset(self, shard: int) -> int:
        return self.start_offsets.get(shard, 0)

    def load_hook(self, epoch: Epoch | None = None) -> Hook:
        """The hook of `epoch` (default epoch 0); an epoch without its own entrypoint uses epoch 0's
        when it names the same hook."""
        if epoch is None or epoch.number == 0:
            return load_hook(self.hook, self.hook_entrypoint)
        entrypoint = epoch.hook_entrypoint or (self.hook_entrypoint if epoch.hook == self.hook else None)
        return load_hook(epoch.hook, entrypoint)

    @classmethod
    def from_toml(cls, path: str | Path) -> ChainSettings:
        try:
            text = Path(path).read_text("utf-8")
        except OSError as e:
            raise SettingsError("file", f"cannot read {path}: {e.strerror}", str(path)) from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise SettingsError("file", f"not valid TOML: {e}", str(path)) from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "chain settings") -> ChainSettings:
        def fail(name: str, message: str) -> SettingsError:
            return SettingsError(name, message, source)

        known = {
            "chain_id",
            "tick_ms",
            "max_triples",
            "hook",
            "hook_entrypoint",
            "threshold",
            "peers",
            "start_offset",
            "epochs",
        }
        for k in data:
            if k not in known:
                raise fail(k, f"unknown setting; known ones are {', '.join(sorted(known))}")

        chain_id = data.get("chain_id", "knhk")
        if not isinstance(chain_id, str) or not 1 <= len(chain_id.encode("utf-8")) <= 64:
            raise fail("chain_id", "must be a string of 1 to 64 UTF-8 bytes")
        if any(c in chain_id for c in "{}/"):
            raise fail("chain_id", f"{chain_id!r} must not contain {{, }} or / (they are part of the Redis keys)")

        def positive(name: str, default: int, top: int) -> int:
            v = data.get(name, default)
            if type(v) is not int or not 1 <= v <= top:
                raise fail(name, f"must be an integer from 1 to {top}, got {v!r}")
            return v

        tick_ms = positive("tick_ms", 125, 65535)
        max_triples = positive("max_triples", 1024, 2**32 - 1)

        raw_peers = data.get("peers")
        if not isinstance(raw_peers, list) or not raw_peers:
            raise fail("peers", "at least one [[peers]] table with id and public_key is needed")
        peers: list[Peer] = []
        for i, p in enumerate(raw_peers):
            where = f"peers[{i}]"
            if not isinstance(p, dict):
                raise fail(where, "must be a table with id and public_key")
            for k in p:
                if k not in ("id", "public_key"):
                    raise fail(f"{where}.{k}", "unknown key; a [[peers]] table has id and public_key")
            pid = p.get("id")
            if not isinstance(pid, str) or not 1 <= len(pid.encode("utf-8")) <= 64:
                raise fail(f"{where}.id", "must be a string of 1 to 64 UTF-8 bytes")
            if any(q.id == pid for q in peers):
                raise fail(f"{where}.id", f"duplicate peer id {pid!r}; every peer id must be unique")
            try:
                pub = parse_public_key(p.get("public_key"))
            except ValueError as e:
                raise fail(f"{where}.public_key", f"{e} (peer {pid!r})") from None
            if any(q.public_key == pub for q in peers):
                raise fail(f"{where}.public_key", f"peer {pid!r} reuses another peer's key")
            peers.append(Peer(pid, pub))

        threshold = data.get("threshold", default_threshold(len(peers)))
        if type(threshold) is not int:
            raise fail("threshold", f"must be an integer, got {threshold!r}")
        try:
            check_threshold(threshold, len(peers))
        except ValueError as e:
            raise fail("threshold", str(e)) from None

        hook = data.get("hook", CANONICAL)
        entrypoint = data.get("hook_entrypoint")
        if not isinstance(hook, str):
            raise fail("hook", "must be a string such as canonical@1")
        if entrypoint is not None and not isinstance(entrypoint, str):
            raise fail("hook_entrypoint", "must be a string 'module:function'")
        try:
            load_hook(hook, entrypoint)
        except ValueError as e:
            raise fail("hook_entrypoint" if entrypoint else "hook", str(e)) from None

        starts: dict[int, int] = {}
        raw_starts = data.get("start_offset", {})
        if not isinstance(raw_starts, dict):
            raise fail("start_offset", "must be a table of shard = offset, e.g. [start_offset] 0 = 100")
        for k, v in raw_starts.items():
            if not (str(k).isascii() and str(k).isdigit()) or type(v) is not int or v < 0:
                raise fail(f"start_offset.{k}", "shard must be a number and offset a non-negative integer")
            starts[int(k)] = v

        raw_epochs = data.get("epochs", [])
        if not isinstance(raw_epochs, list):
            raise fail("epochs", "must be [[epochs]] tables, one per epoch after 0")
        try:
            epochs = parse_epochs(raw_epochs, chain_id, tick_ms)
        except EpochError as err:
            raise fail(err.where or "epochs", str(err)) from None
        for i, e in enumerate(epochs):
            if e.hook_entrypoint is not None:
                try:
                    load_hook(e.hook, e.hook_entrypoint)
                except ValueError as err:
                    raise fail(f"epochs[{i}].hook_entrypoint", str(err)) from None
        settings = cls(tuple(peers), threshold, chain_id, tick_ms, max_triples, hook, entrypoint, starts, tuple(epochs))
        for f in settings.epoch_chain.forks:
            raise fail("epochs", f"two different valid statements for epoch {f.number}: the epochs are forked")
        for e, why in settings.epoch_chain.refused:
            raise fail(f"epochs (epoch {e.number})", f"not accepted from epoch 0: {'; '.join(why)}")
        return settings

    def to_toml(self) -> str:
        """The settings as TOML (what `knhk-stream` writes for demos)."""

        def q(text: str) -> str:  # JSON strings are TOML basic strings when non-ASCII stays literal
            return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")  # TOML forbids a raw DEL

        lines = [
            f"chain_id = {q(self.chain_id)}",
            f"tick_ms = {self.tick_ms}",
            f"max_triples = {self.max_triples}",
            f"hook = {q(self.hook)}",
        ]
        if self.hook_entrypoint:
            lines.append(f"hook_entrypoint = {q(self.hook_entrypoint)}")
        lines.append(f"threshold = {self.threshold}")
        if self.start_offsets:
            lines.append("\n[start_offset]")
            lines += [f"{s} = {o}" for s, o in sorted(self.start_offsets.items())]
        for p in self.peers:
            lines += ["", "[[peers]]", f"id = {q(p.id)}", f'public_key = "{p.public_key.hex()}"']
        for e in self.epochs:
            j = e.to_json()
            lines += ["", "[[epochs]]"]
            lines += [f"{k} = {q(v) if isinstance(v, str) else v}" for k, v in j.items() if not isinstance(v, list)]
            if e.hook_entrypoint:
                lines.append(f"hook_entrypoint = {q(e.hook_entrypoint)}")
            lines.append(
                "peers = ["
                + ", ".join(f"{{id = {q(p['id'])}, public_key = {q(p['public_key'])}}}" for p in j["peers"])
                + "]"
            )
            sigs = ", ".join(
                f"{{peer_id = {q(x['peer_id'])}, signature = {q(x['signature'])}}}" for x in j["signatures"]
            )
            lines.append(f"signatures = [{sigs}]")
        return "\n".join(lines) + "\n"
