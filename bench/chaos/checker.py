"""The invariants, checked from what is in Kafka and Redis, never from the peers' own state.

The checker tails the three topics from offset 0 with consumers of its own and reads the chain from
Redis with a client of its own. The deltas go through the core (`BeatAssembler`, the chain's
processor, `entry_for_beat`): that replay is what an honest peer must make of each shard. Votes are
decoded with `decode_vote` and their signatures checked against the chain settings; roots with
`decode_root` and `check_quorum`; the chain with `verify_range`; and at the end every shard once more
with the public audit replay (`audit_shard`). What it checks, continuously and at the end:

- no_fork_no_hole: every new range of every shard verifies (`verify_range`: hashes, links, quorums,
  sorted set, head); a head once seen stays in the chain and heads never move back; a full
  verification every minute and at the end.
- chain_equals_replay: the i-th committed entry of a shard is the i-th entry of the replay (fields
  and entry hash); at the end also `audit_shard` for every shard.
- receipts_exactly_once (at the end, once the load stopped and the beats closed): every delta the
  producers had acknowledged is on the topic as it was sent, inside exactly one committed entry
  (the committed chain is the whole replay, whose beats split the records), and the committed
  receipts add up to the deltas produced.
- no_equivocation: no peer signs two different entries with one (shard, prev_entry_hash), among
  its votes whose beat is the replay's (the protocol's rule; it implies the one of issue 15,
  keyed by (shard, cycle, prev_entry_hash)).
- honest_votes_match_replay: every validly signed vote is for the beat the replay makes at its
  shard and cycle (root, receipt count, offsets), except the faulty replica's while its buggy
  hook runs.
- roots_published: every root on the roots topic is a valid, quorum-signed root and is the entry
  Redis holds at its shard and cycle; every committed entry reaches the roots topic (within
  ROOT_GRACE_S while running, all of them at the end).
- reader_exactly_once_in_order: the RootsReader group hands out, per shard, the committed chain in
  order, each root once; a root a SIGKILLed member handed out without an offset commit after it
  may come once more from the member that takes the shard over.
- no_unexpected_exit: no worker or reader exits unless the campaign stopped it, and a SIGTERM ends
  a worker with status 0 within 30 s (checked by the campaign, reported here).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from bench.chaos.load import SHARDS, Acked, value_hash
from knhk_stream.audit.core import DeltaLog, audit_shard
from knhk_stream.protocol.beats import BeatAssembler, beat_end_ms
from knhk_stream.protocol.committed import CommittedEntry
from knhk_stream.protocol.encoding import ZERO_HASH
from knhk_stream.protocol.engine import is_marker
from knhk_stream.protocol.entry import Entry, entry_for_beat, record_key
from knhk_stream.protocol.quorum import Vote, check_quorum, verify_vote
from knhk_stream.protocol.settings import ChainSettings
from knhk_stream.protocol.wire import WireError, decode_root, decode_vote
from knhk_stream.store.lockchain import LockchainStore, verify_range

INVARIANTS = {
    "no_fork_no_hole": "no fork and no hole in any shard (verify_range; heads never lost or moved back)",
    "receipts_exactly_once": "every delta produced gets exactly one receipt in a committed entry",
    "chain_equals_replay": "every committed entry equals a replay of the shard through the core",
    "no_equivocation": "no honest peer signed two different entries for one (shard, prev_entry_hash)",
    "honest_votes_match_replay": "every vote of an honest peer is for the beat the replay makes",
    "roots_published": "every committed root reaches the roots topic, and every root there is Redis's entry",
    "reader_exactly_once_in_order": "the RootsReader group hands out every root exactly once, in order",
    "no_unexpected_exit": "no worker or reader exits except the ones the campaign stopped",
}
ROOT_GRACE_S = 120  # a committed root not on the roots topic after this long is a violation
FULL_VERIFY_S = 60


@dataclass
class Violation:
    invariant: str
    at_ms: int
    detail: str
    key: str = ""
    repeats: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"invariant": self.invariant, "at_ms": self.at_ms, "detail": self.detail, "repeats": self.repeats}


def _ms() -> int:
    return int(time.time() * 1000)


class TopicTail:
    """A consumer of every partition of one topic from offset 0 (no group offsets): what is new each call."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"chaos-checker-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                "fetch.wait.max.ms": 50,
            }
        )
        self.consumer.assign([TopicPartition(topic, p, 0) for p in range(SHARDS)])
        self.next = dict.fromkeys(range(SHARDS), 0)
        self.at_eof = dict.fromkeys(range(SHARDS), False)

    def poll(self, n: int = 5000, timeout: float = 0.1) -> list[Message]:
        out = []
        for m in self.consumer.consume(n, timeout=timeout):
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self.at_eof[m.partition()] = m.offset() == self.next[m.partition()]
                continue
            self.next[m.partition()] = m.offset() + 1
            self.at_eof[m.partition()] = False
            out.append(m)
        return out

    def close(self) -> None:
        self.consumer.close()


@dataclass
class Handout:
    t: int
    member: str
    shard: int
    cycle: int
    entry_hash: str
    pos: int  # line number in the member's file


@dataclass
class _Member:
    path: Path
    offset: int = 0
    lines: int = 0
    acks: list[int] = field(default_factory=list)  # line numbers of the ack lines
    stats: dict[str, Any] | None = None


class Checker:
    """Reads the topics and Redis, keeps the replay, and records every violation it finds."""

    def __init__(
        self,
        settings: ChainSettings,
        bootstrap: str,
        topics: Any,
        redis_url: str,
        prefix: str,
        acked: Acked,
        faulty_at: Callable[[str, int], bool],
        tails: tuple[Any, Any, Any] | None = None,
    ) -> None:
        """`tails`: the (deltas, votes, roots) readers; by default a TopicTail of each topic."""
        self.settings = settings
        self.bootstrap = bootstrap
        self.topics = topics
        self.acked = acked
        self.faulty_at = faulty_at
        self.store = LockchainStore.from_url(
            redis_url, settings.chain_id, prefix, socket_timeout=3, socket_connect_timeout=2
        )
        self.deltas, self.votes, self.roots = tails or (
            TopicTail(bootstrap, topics.deltas.name),
            TopicTail(bootstrap, topics.votes.name),
            TopicTail(bootstrap, topics.roots.name),
        )
        processor = settings.processor()
        self.asm = {s: BeatAssembler(s, settings.tick_ms, processor) for s in range(SHARDS)}
        self.replay: dict[int, list[Entry]] = {s: [] for s in range(SHARDS)}
        self.replay_at: dict[int, dict[int, Entry]] = {s: {} for s in range(SHARDS)}
        self.records: dict[int, dict[int, int]] = {s: {} for s in range(SHARDS)}  # non-marker offset -> hash
        self.markers = dict.fromkeys(range(SHARDS), 0)
        self.committed: dict[int, list[CommittedEntry]] = {s: [] for s in range(SHARDS)}
        self.committed_at: dict[int, dict[int, bytes]] = {s: {} for s in range(SHARDS)}  # cycle -> entry hash
        self.compared = dict.fromkeys(range(SHARDS), 0)
        self.pinned: dict[int, tuple[int, bytes] | None] = dict.fromkeys(range(SHARDS))
        self.latencies: list[tuple[int, int, int]] = []  # (beat end ms, latency ms, shard)
        self.timeline: list[tuple[int, list[int | None]]] = []
        self.violations: list[Violation] = []
        self._vkeys: dict[str, Violation] = {}
        self.counts: dict[str, int] = {}
        # votes
        self._keys = {p.id: p.public_key for p in settings.peers}
        self._pending_votes: list[tuple[Vote, int]] = []  # (vote, votes-topic offset) awaiting the replay
        self._successor: dict[tuple[str, int, bytes], tuple[bytes, int]] = {}
        self._votes_wait: dict[tuple[int, int], dict[str, set[bytes]]] = {}  # (shard, cycle) -> peer -> hashes
        self.agree: dict[tuple[str, int], int] = {}  # (peer, shard) -> newest cycle it voted the committed entry
        # roots topic
        self.on_topic: dict[int, set[bytes]] = {s: set() for s in range(SHARDS)}
        self._roots_pending: list[CommittedEntry] = []
        self._published_checked = dict.fromkeys(range(SHARDS), 0)
        # the RootsReader group
        self.members: dict[str, _Member] = {}
        self.killed_readers: set[str] = set()
        self._handouts: dict[int, list[Handout]] = {s: [] for s in range(SHARDS)}
        self._handed: dict[int, dict[int, Handout]] = {s: {} for s in range(SHARDS)}
        self.reader_idx = dict.fromkeys(range(SHARDS), 0)
        self.reader_last: dict[int, int | None] = dict.fromkeys(range(SHARDS))
        self.redeliveries = 0
        self.redis_errors = 0
        self._last_full = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lock = threading.RLock()
        self.rounds = 0
        self.round_s: list[float] = []

    # -- bookkeeping ------------------------------------------------------------------------

    def violation(self, invariant: str, detail: str, key: str | None = None) -> None:
        k = f"{invariant}:{key if key is not None else detail}"
        with self.lock:
            if k in self._vkeys:
                self._vkeys[k].repeats += 1
                return
            v = Violation(invariant, _ms(), detail, k)
            self._vkeys[k] = v
            self.violations.append(v)
        print(f"[{time.strftime('%H:%M:%S')}] VIOLATION {invariant}: {detail}", flush=True)

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def heads(self) -> dict[int, int | None]:
        return {s: (c[-1].entry.cycle if (c := self.committed[s]) else None) for s in range(SHARDS)}

    def committed_last_offset(self, shard: int) -> int:
        c = self.committed[shard]
        return c[-1].entry.last_offset if c else -1

    # -- the loop ---------------------------------------------------------------------------

    def start(self, interval: float = 0.5) -> Checker:
        def loop() -> None:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    self.round()
                except Exception as e:  # a checker bug must not pass as "no violations"
                    self.violation("checker_error", f"{type(e).__name__}: {e}", key=type(e).__name__)
                    import traceback

                    traceback.print_exc()
                self._stop.wait(max(0.05, interval - (time.monotonic() - t0)))

        self._thread = threading.Thread(target=loop, name="chaos-checker", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def round(self) -> None:
        with self.lock:
            self.rounds += 1
            t0 = time.monotonic()
            times = []
            for step in (self._read_deltas, self._read_redis, self._compare_replay, self._read_votes,
                         self._classify_votes, self._read_roots, self._check_roots, self._read_reader_files,
                         self._check_handouts):  # fmt: skip
                t = time.monotonic()
                step()
                times.append((step.__name__, time.monotonic() - t))
            self.timeline.append((_ms(), [h for h in self.heads().values()]))
            took = time.monotonic() - t0
            self.round_s.append(took)
            if took > 3:
                slow = ", ".join(f"{n} {t:.1f}s" for n, t in times if t > 0.2)
                print(f"[{time.strftime('%H:%M:%S')}] checker: a round took {took:.1f} s ({slow})", flush=True)

    # -- deltas and the replay --------------------------------------------------------------

    def _read_deltas(self, budget_s: float = 1.0) -> None:
        """What is new on the deltas topic, for at most about `budget_s` (records keep coming)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < budget_s:
            msgs = self.deltas.poll(5000, timeout=0.05)
            if not msgs:
                return
            for m in msgs:
                s, off, value = m.partition(), m.offset(), m.value()
                marker = is_marker(m.headers(), value)
                if marker:
                    self.markers[s] += 1
                else:
                    self.records[s][off] = value_hash(value)
                beat = self.asm[s].feed(off, m.timestamp()[1], marker, value)
                if beat is not None:
                    prev = self.replay[s][-1].entry_hash if self.replay[s] else ZERO_HASH
                    e = entry_for_beat(self.settings.chain_id, beat, prev)
                    self.replay[s].append(e)
                    self.replay_at[s][e.cycle] = e

    def _replay_passed(self, shard: int, cycle: int) -> bool:
        """Whether the replay has read past beat `cycle` of the shard (so a beat of that cycle is known)."""
        last = self.asm[shard].last_tick
        return last is not None and last // 8 > cycle

    # -- Redis ------------------------------------------------------------------------------

    def _read_redis(self, full: bool = False) -> None:
        try:
            if full or time.monotonic() - self._last_full > FULL_VERIFY_S:
                self._last_full = time.monotonic()
                self._full_verify()
            for s in range(SHARDS):
                self._read_shard(s)
        except redis.RedisError:
            self.redis_errors += 1

    def _read_shard(self, s: int) -> None:
        head = self.store.head(s)
        pinned = self.pinned[s]
        if head is None:
            if pinned is not None:
                self.violation("no_fork_no_hole", f"shard {s}: the head is gone (it was cycle {pinned[0]})", f"gone{s}")
            return
        if pinned is not None:
            if head.cycle < pinned[0]:
                self.violation(
                    "no_fork_no_hole", f"shard {s}: head moved back from cycle {pinned[0]} to {head.cycle}", f"back{s}"
                )
            got = self.store.entry_hashes(s, [pinned[0]]).get(pinned[0])
            if got != pinned[1]:
                self.violation(
                    "no_fork_no_hole",
                    f"shard {s}: the pinned head (cycle {pinned[0]}, "
                    f"{pinned[1].hex()[:16]}) is no longer in the chain (now {got!r})",
                    f"pin{s}",
                )
        mine = self.committed[s]
        last = mine[-1].entry.cycle if mine else None
        if last is not None and head.cycle <= last:
            return
        start = None if last is None else last + 1
        report = verify_range(self.store, self.settings, s, start, head.cycle)
        self.count("entries_verified", report.entries)
        for p in report.problems:
            self.violation("no_fork_no_hole", f"shard {s}: {p}", f"{s}:{p.cycle}:{p}")
        new = self.store.range(s, start, head.cycle)
        if new and mine and new[0].entry.prev_entry_hash != mine[-1].entry_hash:
            self.violation(
                "no_fork_no_hole",
                f"shard {s}: cycle {new[0].entry.cycle} does not link to cycle {last}",
                f"link{s}:{last}",
            )
        for ce in new:
            mine.append(ce)
            self.committed_at[s][ce.entry.cycle] = ce.entry_hash
            self.latencies.append(
                (
                    beat_end_ms(ce.entry.cycle, self.settings.tick_ms),
                    ce.committed_at_ms - beat_end_ms(ce.entry.cycle, self.settings.tick_ms),
                    s,
                )
            )
            for peer, hashes in self._votes_wait.pop((s, ce.entry.cycle), {}).items():
                if ce.entry_hash in hashes:
                    self._agrees(peer, s, ce.entry.cycle)
        if mine:
            self.pinned[s] = (mine[-1].entry.cycle, mine[-1].entry_hash)

    def _full_verify(self) -> None:
        for s in range(SHARDS):
            mine = self.committed[s]
            if not mine:
                continue
            to = mine[-1].entry.cycle
            report = verify_range(self.store, self.settings, s, None, to)
            self.count("full_verifications")
            for p in report.problems:
                self.violation("no_fork_no_hole", f"shard {s} (full verification): {p}", f"{s}:{p.cycle}:{p}")
            n = self.store.count(s, None, to)
            if n != len(mine):
                self.violation(
                    "no_fork_no_hole",
                    f"shard {s}: Redis lists {n} entries up to cycle {to}, the checker had read {len(mine)}",
                    f"count{s}",
                )

    def _compare_replay(self) -> None:
        for s in range(SHARDS):
            i, mine, rep = self.compared[s], self.committed[s], self.replay[s]
            while i < len(mine) and i < len(rep):
                ce, r = mine[i], rep[i]
                if ce.entry != r or ce.entry_hash != r.entry_hash:
                    diff = [
                        f"{k}: committed {getattr(ce.entry, k)!r} replay {getattr(r, k)!r}"
                        for k in ("cycle", "receipt_count", "first_offset", "last_offset")
                        if getattr(ce.entry, k) != getattr(r, k)
                    ]
                    if ce.entry.root != r.root:
                        diff.append("root differs")
                    if ce.entry.prev_entry_hash != r.prev_entry_hash:
                        diff.append("prev_entry_hash differs")
                    self.violation(
                        "chain_equals_replay",
                        f"shard {s} entry #{i} (cycle {ce.entry.cycle}) is not the "
                        f"replay's: {'; '.join(diff) or 'entry hash differs'}",
                        f"{s}",
                    )
                i += 1
            self.count("entries_compared", i - self.compared[s])
            self.compared[s] = i

    # -- votes ------------------------------------------------------------------------------

    def _read_votes(self) -> None:
        for m in self.votes.poll(5000, timeout=0.02):
            try:
                vote = decode_vote(m.value())
            except WireError:
                self.count("votes_undecodable")
                continue
            e = vote.entry
            if e.chain_id != self.settings.chain_id or e.shard != m.partition():
                self.count("votes_foreign")
                continue
            key = self._keys.get(vote.peer_id)
            if key is None:
                self.count("votes_unknown_peer")
                continue
            epoch = self.settings.epoch_for(e.cycle)
            if vote.epoch != epoch.number or not verify_vote(key, epoch.epoch_hash, e.entry_hash, vote.signature):
                self.count("votes_bad_signature")
                continue
            self.count("votes_valid")
            self._pending_votes.append((vote, m.offset()))

    def _classify_votes(self) -> None:
        waiting = []
        for vote, off in self._pending_votes:
            e = vote.entry
            if not self._replay_passed(e.shard, e.cycle):
                waiting.append((vote, off))
                continue
            beat = self.replay_at[e.shard].get(e.cycle)
            honest = beat is not None and (beat.root, beat.receipt_count, beat.first_offset, beat.last_offset) == (
                e.root,
                e.receipt_count,
                e.first_offset,
                e.last_offset,
            )
            if not honest:
                if self.faulty_at(vote.peer_id, vote.voted_at_ms):
                    self.count("votes_dissent_faulty")
                else:
                    what = (
                        "no beat"
                        if beat is None
                        else (
                            f"the replay's beat has {beat.receipt_count} receipts at offsets {beat.first_offset}.."
                            f"{beat.last_offset}"
                        )
                    )
                    self.violation(
                        "honest_votes_match_replay",
                        f"{vote.peer_id} voted shard {e.shard} cycle {e.cycle} "
                        f"({e.receipt_count} receipts at offsets {e.first_offset}..{e.last_offset}, votes "
                        f"offset {off}) but {what}",
                        f"{vote.peer_id}:{e.shard}:{e.cycle}",
                    )
                continue
            self.count("votes_honest_checked")
            k = (vote.peer_id, e.shard, e.prev_entry_hash)
            seen = self._successor.setdefault(k, (vote.entry_hash, e.cycle))
            if seen[0] != vote.entry_hash:
                self.violation(
                    "no_equivocation",
                    f"{vote.peer_id} signed two successors of {e.prev_entry_hash.hex()[:16]}"
                    f" on shard {e.shard}: cycle {seen[1]} {seen[0].hex()[:16]} and cycle {e.cycle} "
                    f"{vote.entry_hash.hex()[:16]} (votes offset {off})",
                    f"{vote.peer_id}:{e.shard}:{e.prev_entry_hash.hex()}",
                )
            committed = self.committed_at[e.shard].get(e.cycle)
            if committed is not None:
                if committed == vote.entry_hash:
                    self._agrees(vote.peer_id, e.shard, e.cycle)
            else:
                self._votes_wait.setdefault((e.shard, e.cycle), {}).setdefault(vote.peer_id, set()).add(vote.entry_hash)
        self._pending_votes = waiting

    def _agrees(self, peer: str, shard: int, cycle: int) -> None:
        k = (peer, shard)
        if cycle > self.agree.get(k, -1):
            self.agree[k] = cycle

    # -- the roots topic --------------------------------------------------------------------

    def _read_roots(self) -> None:
        for m in self.roots.poll(5000, timeout=0.02):
            try:
                ce = decode_root(m.value())
                e = ce.entry
                problem = None
                if e.entry_hash != ce.entry_hash:
                    problem = "its entry_hash does not recompute"
                elif e.chain_id != self.settings.chain_id or e.shard != m.partition():
                    problem = f"chain {e.chain_id!r} shard {e.shard} in partition {m.partition()}"
                elif m.key() != record_key(e.chain_id, e.shard, e.cycle).encode():
                    problem = f"key {m.key()!r}"
                else:
                    epoch = self.settings.epoch_for(e.cycle)
                    q = check_quorum(ce.entry_hash, ce.votes, epoch)
                    if ce.epoch != epoch.number or not q.valid:
                        problem = f"no valid quorum: {'; '.join(q.problems)}"
            except WireError as err:
                problem = str(err)
            if problem is not None:
                self.violation(
                    "roots_published",
                    f"roots topic partition {m.partition()} offset {m.offset()}: an invalid root: {problem}",
                    f"bad{m.partition()}:{m.offset()}",
                )
                continue
            self.count("roots_on_topic")
            self.on_topic[e.shard].add(ce.entry_hash)
            self._roots_pending.append(ce)

    def _check_roots(self, final: bool = False) -> None:
        waiting = []
        for ce in self._roots_pending:
            s, c = ce.entry.shard, ce.entry.cycle
            have = self.committed_at[s].get(c)
            if have is not None:
                if have != ce.entry_hash:
                    self.violation(
                        "roots_published",
                        f"shard {s} cycle {c}: the roots topic holds "
                        f"{ce.entry_hash.hex()[:16]}, Redis {have.hex()[:16]} (a fork)",
                        f"fork{s}:{c}",
                    )
                continue
            mine = self.committed[s]
            if final or (mine and mine[-1].entry.cycle > c):
                self.violation(
                    "roots_published",
                    f"shard {s} cycle {c}: a valid root on the roots topic that Redis "
                    "does not hold (truncation or deletion)",
                    f"missing{s}:{c}",
                )
                continue
            waiting.append(ce)
        self._roots_pending = waiting
        cutoff = _ms() - ROOT_GRACE_S * 1000
        for s in range(SHARDS):
            mine, i = self.committed[s], self._published_checked[s]
            while i < len(mine) and (final or mine[i].committed_at_ms < cutoff):
                if mine[i].entry_hash not in self.on_topic[s]:
                    self.violation(
                        "roots_published",
                        f"shard {s} cycle {mine[i].entry.cycle}: committed at "
                        f"{mine[i].committed_at_ms} but not on the roots topic"
                        f"{' at the end' if final else f' after {ROOT_GRACE_S} s'}",
                        f"unpublished{s}:{mine[i].entry.cycle}",
                    )
                i += 1
            self._published_checked[s] = i

    # -- the RootsReader group --------------------------------------------------------------

    def add_member(self, name: str, path: Path) -> None:
        with self.lock:
            self.members[name] = _Member(path)

    def _read_reader_files(self) -> None:
        new: list[Handout] = []
        for name, mem in self.members.items():
            try:
                with open(mem.path, "rb") as f:
                    f.seek(mem.offset)
                    data = f.read()
            except OSError:
                continue
            end = data.rfind(b"\n") + 1
            mem.offset += end
            for raw in data[:end].splitlines():
                mem.lines += 1
                d = json.loads(raw)
                if d["k"] == "root":
                    new.append(Handout(d["t"], name, d["s"], d["c"], d["h"], mem.lines))
                elif d["k"] == "ack":
                    mem.acks.append(mem.lines)
                elif d["k"] == "stop":
                    mem.stats = d.get("stats")
        for h in sorted(new, key=lambda h: h.t):
            self._handouts[h.shard].append(h)

    def _acked(self, h: Handout) -> bool:
        mem = self.members.get(h.member)
        return mem is not None and any(a > h.pos for a in mem.acks)

    def _check_handouts(self) -> None:
        for s in range(SHARDS):
            queue, mine = self._handouts[s], self.committed[s]
            done = 0
            for h in queue:
                i = self.reader_idx[s]
                if i < len(mine) and mine[i].entry.cycle == h.cycle:
                    if mine[i].entry_hash.hex() != h.entry_hash:
                        self.violation(
                            "reader_exactly_once_in_order",
                            f"{h.member} handed out shard {s} cycle "
                            f"{h.cycle} as {h.entry_hash[:16]}, the chain has "
                            f"{mine[i].entry_hash.hex()[:16]}",
                            f"hash{s}:{h.cycle}",
                        )
                    self._handed[s][h.cycle] = h
                    self.reader_idx[s] = i + 1
                    self.reader_last[s] = h.cycle
                    self.count("roots_handed_out")
                elif h.cycle in self._handed[s]:
                    first = self._handed[s][h.cycle]
                    if first.member in self.killed_readers and first.member != h.member and not self._acked(first):
                        self.redeliveries += 1
                    else:
                        self.violation(
                            "reader_exactly_once_in_order",
                            f"shard {s} cycle {h.cycle} handed out twice: "
                            f"by {first.member} (line {first.pos}{', acknowledged' if self._acked(first) else ''}"
                            f") and by {h.member} (line {h.pos})",
                            f"dup{s}:{h.cycle}",
                        )
                elif mine and mine[-1].entry.cycle >= h.cycle:
                    want = mine[i].entry.cycle if i < len(mine) else None
                    self.violation(
                        "reader_exactly_once_in_order",
                        f"{h.member} handed out shard {s} cycle {h.cycle} when cycle {want} was next",
                        f"order{s}:{h.cycle}",
                    )
                    self._handed[s][h.cycle] = h
                else:
                    break  # the chain as read from Redis has not got there yet
                done += 1
            del queue[:done]

    # -- the end ----------------------------------------------------------------------------

    def drain(self, timeout: float = 60) -> bool:
        """Read every topic to its end (nothing writes any more) and Redis once more."""
        deadline = time.monotonic() + timeout
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            with self.lock:
                before = sum(t.next[p] for t in (self.deltas, self.votes, self.roots) for p in range(SHARDS))
                self.round()
                after = sum(t.next[p] for t in (self.deltas, self.votes, self.roots) for p in range(SHARDS))
            at_end = all(t.at_eof[p] for t in (self.deltas, self.votes, self.roots) for p in range(SHARDS))
            if after != before:
                quiet_since = time.monotonic()
            elif at_end and time.monotonic() - quiet_since > 2:
                return True
            time.sleep(0.2)
        return False

    def final(self, audit: bool = True) -> dict[str, Any]:
        """The checks at the end; returns figures for the report."""
        with self.lock:
            drained = self.drain()
            if not drained:
                self.violation("checker_error", "could not read the topics to their end within 60 s", "drain")
            self._read_redis(full=True)
            self._compare_replay()
            self._classify_votes()
            self._check_roots(final=True)
            self._check_handouts()
            produced = self.acked.count
            receipts = sum(ce.entry.receipt_count for s in range(SHARDS) for ce in self.committed[s])
            unacked = 0
            for s in range(SHARDS):
                mine, rep, asm = self.committed[s], self.replay[s], self.asm[s]
                if asm.open_deltas:
                    self.violation(
                        "receipts_exactly_once",
                        f"shard {s}: the last beat (cycle {asm.open_cycle}, {asm.open_deltas} deltas) never closed",
                        f"open{s}",
                    )
                if len(mine) != len(rep):
                    self.violation(
                        "receipts_exactly_once",
                        f"shard {s}: {len(mine)} entries committed, the replay has {len(rep)} beats",
                        f"len{s}",
                    )
                last = mine[-1].entry.last_offset if mine else -1
                records = self.records[s]
                missing = wrong = beyond = 0
                for off, h in self.acked.by_shard[s].items():
                    got = records.get(off)
                    if got is None:
                        missing += 1
                    elif got != h:
                        wrong += 1
                    elif off > last:
                        beyond += 1
                if missing or wrong or beyond:
                    self.violation(
                        "receipts_exactly_once",
                        f"shard {s}: of the acknowledged deltas {missing} are not on "
                        f"the topic, {wrong} differ from what was sent, {beyond} are after the last "
                        f"committed entry (offset {last})",
                        f"acked{s}",
                    )
                unacked += len(records.keys() - self.acked.by_shard[s].keys())
                if self.reader_idx[s] != len(mine):
                    left = [ce.entry.cycle for ce in mine[self.reader_idx[s] :]]
                    self.violation(
                        "reader_exactly_once_in_order",
                        f"shard {s}: {len(left)} committed roots never handed out by the group (cycles {left[:5]}...)",
                        f"left{s}",
                    )
                if self._handouts[s]:
                    self.violation(
                        "reader_exactly_once_in_order",
                        f"shard {s}: {len(self._handouts[s])} handouts of cycles the chain does not reach",
                        f"beyond{s}",
                    )
            if receipts != produced:
                self.violation(
                    "receipts_exactly_once", f"{produced} deltas produced, {receipts} receipts committed", "total"
                )
            if self._pending_votes:
                self.count("votes_never_classified", len(self._pending_votes))
            audits = []
            if audit:
                log = DeltaLog(self.bootstrap, self.topics.deltas.name)
                for s in range(SHARDS):
                    rep = audit_shard(self.store, self.settings, log, s)
                    audits.append(rep.to_json())
                    if not rep.ok:
                        self.violation(
                            "chain_equals_replay",
                            f"shard {s}: audit_shard says {rep.status}: {'; '.join(rep.problems())}",
                            f"audit{s}",
                        )
            return {
                "produced": produced,
                "committed": receipts,
                "records_not_acknowledged": unacked,
                "markers": sum(self.markers.values()),
                "entries": {s: len(self.committed[s]) for s in range(SHARDS)},
                "audits": audits,
                "drained": drained,
            }

    def close(self) -> None:
        self.stop()
        for t in (self.deltas, self.votes, self.roots):
            t.close()
