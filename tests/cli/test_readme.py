"""Issue 16, point 7: the README's worked path, run command by command as a user types it.

The commands are parsed out of README.md ("From produce to proof, on one
machine"), so this test breaks when the README changes in a way that does not
work. `knhk-stream dev` runs as the README's first terminal; the rest runs in
one bash session (the second terminal), each command checked for exit 0. Only
the environment differs from a user's: the `export` line is the one dev
printed (the same as the README's when 9092 is free and Redis is local), and
KNHK_PREFIX gives this run Redis keys of its own.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

from knhk_stream.kafka.producer import delta_from_json
from tests.cli.conftest import clean_env, spawn, stop, wait_for

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## From produce to proof, on one machine"
MARK = "__knhk_readme_rc="


def section() -> str:
    text = README.read_text("utf-8")
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    return text.split(SECTION, 1)[1].split("\n## ", 1)[0]


def commands(block: str) -> list[str]:
    """One command per line; a here-document (`<<'EOF'` ... `EOF`) is one command with its lines."""
    out: list[str] = []
    lines = iter(block.strip("\n").splitlines())
    for line in lines:
        heredoc = re.search(r"<<-?\s*'?(\w+)'?\s*$", line)
        if heredoc:
            body = [line]
            for more in lines:
                body.append(more)
                if more.strip() == heredoc.group(1):
                    break
            out.append("\n".join(body))
        elif line.strip():
            out.append(line)
    return out


def worked_path() -> tuple[str, list[str]]:
    blocks = re.findall(r"```sh\n(.*?)```", section(), re.S)
    assert len(blocks) == 2, "the section has the dev block and the second terminal's block"
    return blocks[0].strip(), commands(blocks[1])


class Shell:
    """One bash process fed command by command, like a terminal (background jobs stay its jobs)."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        pipe = subprocess.PIPE
        self.proc = subprocess.Popen(["bash", "--norc", "--noprofile"], cwd=cwd, env=env, text=True, bufsize=1,
                                     stdin=pipe, stdout=pipe, stderr=subprocess.STDOUT)  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def run(self, command: str, timeout: float) -> tuple[int, str, float]:
        assert self.proc.stdin is not None
        started = time.monotonic()
        self.proc.stdin.write(f"{command}\necho {MARK}$?\n")
        self.proc.stdin.flush()
        output: list[str] = []
        while True:
            left = timeout - (time.monotonic() - started)
            try:
                line = self.lines.get(timeout=max(0.01, left))
            except queue.Empty:
                raise AssertionError(f"`{command}` still running after {timeout} s:\n{''.join(output)}") from None
            if line.startswith(MARK):
                return int(line[len(MARK) :]), "".join(output), time.monotonic() - started
            output.append(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.run("kill $(jobs -p) 2>/dev/null; wait", 30)
            self.proc.stdin.close()  # type: ignore[union-attr]
            self.proc.wait(10)


def test_readme_json_delta_example_is_a_delta():
    text = README.read_text("utf-8")
    example = re.search(r"```json\n(\{.*?\})\n```", text, re.S)
    assert example, "README.md shows a JSON delta"
    delta = delta_from_json(example.group(1))
    assert delta.id and delta.additions and delta.removals and delta.removals[0].g


def test_readme_worked_path_runs_as_written(tmp_path: Path, redis_url: str):
    dev_command, steps = worked_path()
    assert dev_command == "knhk-stream dev"
    for needed in ("knhk-stream worker", "knhk-stream produce", "knhk-stream prove", "knhk-stream verify-proof"):
        assert any(needed in step for step in steps), f"the README's path has no `{needed}`"
    prefix = f"readme-{uuid.uuid4().hex[:10]}"
    # knhk-stream on PATH, as after `pip install`; the defaults otherwise, as a user has them
    env = clean_env({"KNHK_PREFIX": prefix, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    env.pop("KNHK_KAFKA_TIMEOUT")
    dev_log = tmp_path / "dev.log"
    dev = spawn(*dev_command.split()[1:], log=dev_log, env={"KNHK_PREFIX": prefix})
    shell: Shell | None = None
    try:
        wait_for(lambda: "stops everything" in dev_log.read_text(), 30, "`knhk-stream dev` to be ready")
        printed = next(line for line in dev_log.read_text().splitlines() if line.startswith("export "))
        work = tmp_path / "terminal-2"
        work.mkdir()
        shell = Shell(work, env)
        outputs: dict[str, str] = {}
        for step in steps:
            command = printed if step.startswith("export KNHK_BOOTSTRAP=") else step
            if step.startswith("export KNHK_BOOTSTRAP=") and "127.0.0.1:9092 " in printed:
                assert step.split("  #")[0].strip() == printed, "the README's export line is the one dev prints"
            rc, output, _ = shell.run(command, timeout=60)
            assert rc == 0, f"README step failed (exit {rc}): {step}\n{output}"
            outputs[step.split()[1] if step.startswith("knhk-stream ") else step] = output
        # What each step left behind, as the README says.
        sent = [json.loads(line) for line in (work / "sent.jsonl").read_text().splitlines()]
        assert sorted(r["id"] for r in sent) == ["o-42", "o-43"]
        assert all(isinstance(r["partition"], int) and isinstance(r["offset"], int) for r in sent)
        proof = json.loads((work / "proof.json").read_text())
        o42 = next(r for r in sent if r["id"] == "o-42")
        assert (proof["shard"], proof["offset"]) == (o42["partition"], o42["offset"])
        rc, output, _ = shell.run("knhk-stream verify-proof proof.json --settings chain.toml", 30)
        assert rc == 0 and "proof OK" in output, output
        # prove and verify-proof number the delta's leaf the same way (issue 16, point 12)
        leaf = re.search(r"leaf (\d+) of (\d+)", outputs["prove"])
        assert leaf and (int(leaf[1]), int(leaf[2])) == (proof["leaf_index"], proof["tree_size"]), outputs["prove"]
        assert f"leaf {leaf[1]} of {leaf[2]}," in outputs["verify-proof"], outputs["verify-proof"]
        rc, output, _ = shell.run("wait; grep -c 'stopped' peer-*.log", 30)  # the workers stopped on the kill
        assert output.count(":1") == 4, output
    finally:
        if shell is not None:
            shell.close()
        if dev.poll() is None:
            stop(dev, signal.SIGTERM, within=10)
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
