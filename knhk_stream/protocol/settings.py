"""Chain settings: what every peer and auditor of one chain must load identically."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from knhk_stream.errors import SettingsError
from knhk_stream.protocol.hooks import CANONICAL, Hook, load_hook
from knhk_stream.protocol.quorum import check_threshold, default_threshold, parse_public_key


@dataclass(frozen=True)
class Peer:
    id: str
    public_key: bytes


@dataclass(frozen=True)
class ChainSettings:
    peers: tuple[Peer, ...]
    threshold: int
    chain_id: str = "knhk"
    tick_ms: int = 125
    max_triples: int = 1024
    hook: str = CANONICAL
    hook_entrypoint: str | None = None
    start_offsets: Mapping[int, int] = field(default_factory=dict)

    @property
    def public_keys(self) -> dict[str, bytes]:
        return {p.id: p.public_key for p in self.peers}

    def start_offset(self, shard: int) -> int:
        return self.start_offsets.get(shard, 0)

    def load_hook(self) -> Hook:
        return load_hook(self.hook, self.hook_entrypoint)

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
        }
        for k in data:
            if k not in known:
                raise fail(k, f"unknown setting; known ones are {', '.join(sorted(known))}")

        chain_id = data.get("chain_id", "knhk")
        if not isinstance(chain_id, str) or not 1 <= len(chain_id.encode("utf-8")) <= 64:
            raise fail("chain_id", "must be a string of 1 to 64 UTF-8 bytes")

        def positive(name: str, default: int) -> int:
            v = data.get(name, default)
            if type(v) is not int or v < 1:
                raise fail(name, f"must be a positive integer, got {v!r}")
            return v

        tick_ms = positive("tick_ms", 125)
        max_triples = positive("max_triples", 1024)

        raw_peers = data.get("peers")
        if not isinstance(raw_peers, list) or not raw_peers:
            raise fail("peers", "at least one [[peers]] table with id and public_key is needed")
        peers: list[Peer] = []
        for i, p in enumerate(raw_peers):
            where = f"peers[{i}]"
            if not isinstance(p, dict):
                raise fail(where, "must be a table with id and public_key")
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

        return cls(tuple(peers), threshold, chain_id, tick_ms, max_triples, hook, entrypoint, starts)

    def to_toml(self) -> str:
        """The settings as TOML (what `knhk-stream` writes for demos)."""

        def q(text: str) -> str:  # JSON strings are TOML basic strings when non-ASCII stays literal
            return json.dumps(text, ensure_ascii=False)

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
        return "\n".join(lines) + "\n"
