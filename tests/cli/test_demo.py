"""Issue 16, point 11 (and the demo's part of point 6): the demo cleans up, keeps when asked, counts rejections."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import redis

from tests.cli.conftest import knhk

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def demo(redis_url: str, *extra: str):
    ran = knhk("demo", "--deltas", "300", "--rate", "0", "--malformed-every", "7", "--timeout", "90",
               "--redis", redis_url, *extra, timeout=150)  # fmt: skip
    first = ran.out.splitlines()[0]
    prefix = re.search(r"\(keys under (\S+):\*\)", first)[1]
    workdir = Path(re.search(r"work dir (\S+)$", first)[1])
    return ran, prefix, workdir


def test_demo_counts_rejections_and_cleans_up_after_itself(redis_url: str):
    ran, prefix, workdir = demo(redis_url)
    assert ran.rc == 0, ran.out[-3000:]
    assert "demo OK" in ran.out
    assert re.search(r"^shard\s+beats\s+receipts\s+rejected", ran.out, re.M)
    assert "300 receipts for 300 deltas (all; rejected: 42 malformed)" in ran.out  # every 7th of 300
    cleaned = re.search(r"cleaned up: (\d+) Redis keys and the work directory \(pass --keep to keep them\)", ran.out)
    assert cleaned and int(cleaned[1]) > 0, ran.out[-1000:]
    assert list(redis.Redis.from_url(redis_url).scan_iter(match=f"{prefix}:*")) == []
    assert not workdir.exists()


def test_demo_keep_keeps_the_logs_and_keys_and_says_where(redis_url: str):
    ran, prefix, workdir = demo(redis_url, "--keep")
    client = redis.Redis.from_url(redis_url)
    try:
        assert ran.rc == 0, ran.out[-3000:]
        assert f"kept: the work directory {workdir} (keys, chain.toml, the workers' logs)" in ran.out
        assert f"Redis keys under {prefix}:*" in ran.out
        assert sorted(p.name for p in workdir.glob("peer-*.log")) == [f"peer-{c}.log" for c in "abcd"]
        assert list(client.scan_iter(match=f"{prefix}:*", count=1000))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)


def test_make_demo_installs_only_what_the_demo_needs():
    text = (ROOT / "Makefile").read_text()
    prerequisite = re.search(r"^demo: (\S+)$", text, re.M)[1]
    stamp = re.search(rf"^{re.escape(prerequisite)}:.*?\n((?:\t.*\n)+)", text, re.M)[1]
    assert "-e '.[kafka,embedded]'" in stamp and "[test]" not in stamp and "[dev]" not in stamp
