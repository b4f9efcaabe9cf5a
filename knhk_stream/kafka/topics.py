"""Topic declarations (topics/*.toml): names, partition counts and settings."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

ROLES = ("deltas", "votes", "roots")


@dataclass(frozen=True)
class TopicSpec:
    name: str
    role: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Topics:
    deltas: TopicSpec
    votes: TopicSpec
    roots: TopicSpec

    def all(self) -> list[TopicSpec]:
        return [self.deltas, self.votes, self.roots]

    def with_partitions(self, n: int) -> Topics:
        return Topics(*(replace(t, partitions=n) for t in self.all()))

    def renamed(self, prefix: str) -> Topics:
        """The same topics under another name prefix (e.g. one per test or chain)."""
        return Topics(*(replace(t, name=f"{prefix}.{t.role}") for t in self.all()))


def load_topics(path: str | Path | None = None) -> Topics:
    """The declarations in `path`, or the packaged defaults."""
    if path is None:
        text = resources.files("knhk_stream").joinpath("topics", "knhk.toml").read_text("utf-8")
        source = "topics/knhk.toml"
    else:
        text, source = Path(path).read_text("utf-8"), str(path)
    data = tomllib.loads(text)
    found: dict[str, TopicSpec] = {}
    for i, t in enumerate(data.get("topic", [])):
        role = t.get("role")
        if role not in ROLES:
            raise ValueError(f"{source}: topic[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        parts = t.get("partitions")
        if type(parts) is not int or parts < 1:
            raise ValueError(f"{source}: topic[{i}].partitions must be a positive integer")
        found[role] = TopicSpec(str(t["name"]), role, parts, {k: str(v) for k, v in t.get("config", {}).items()})
    missing = [r for r in ROLES if r not in found]
    if missing:
        raise ValueError(f"{source}: no topic declared for role(s) {', '.join(missing)}")
    topics = Topics(found["deltas"], found["votes"], found["roots"])
    if not topics.deltas.partitions == topics.votes.partitions == topics.roots.partitions:
        raise ValueError(f"{source}: deltas, votes and roots need the same number of partitions")
    return topics
