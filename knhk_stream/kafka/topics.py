"""Topic declarations (topics/*.toml): names, partition counts and settings."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

ROLES = ("deltas", "votes", "roots", "evidence")
REQUIRED_ROLES = ("deltas", "votes", "roots")  # a declarations file without an evidence topic gets a default one
EVIDENCE_CONFIG = {"cleanup.policy": "delete", "retention.ms": "-1"}  # append-only, kept forever


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
    # Equivocation evidence, append-only (not in the protocol: what peers report, checked by whoever reads it).
    # Default: named after the votes topic (`P.votes` -> `P.evidence`).
    evidence: TopicSpec | None = None

    def __post_init__(self) -> None:
        if self.evidence is None:
            base = self.votes.name.removesuffix(".votes") if self.votes.name.endswith(".votes") else self.votes.name
            spec = TopicSpec(f"{base}.evidence", "evidence", self.votes.partitions, dict(EVIDENCE_CONFIG))
            object.__setattr__(self, "evidence", spec)

    def all(self) -> list[TopicSpec]:
        assert self.evidence is not None
        return [self.deltas, self.votes, self.roots, self.evidence]

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
    missing = [r for r in REQUIRED_ROLES if r not in found]
    if missing:
        raise ValueError(f"{source}: no topic declared for role(s) {', '.join(missing)}")
    topics = Topics(found["deltas"], found["votes"], found["roots"], found.get("evidence"))
    if len({t.partitions for t in topics.all()}) != 1:
        raise ValueError(f"{source}: deltas, votes, roots and evidence need the same number of partitions")
    return topics
