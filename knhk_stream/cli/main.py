"""The `knhk-stream` command group: one module per command family, registered here."""

from __future__ import annotations

import click

from knhk_stream import __version__
from knhk_stream.cli import audit, chain, epoch, keys, produce, rebuild, roots, run


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="knhk-stream")
def main() -> None:
    """knhk-stream: a quorum-signed, hash-chained audit log of Kafka deltas (the lockchain)."""


for _cmd in (
    keys.keys,
    chain.chain,
    epoch.epoch,
    produce.topics,
    produce.produce,
    run.worker,
    run.status,
    run.dev,
    run.demo,
    audit.prove,
    audit.verify_proof,
    audit.audit,
    roots.roots,
):
    main.add_command(_cmd)
for _cmd in (audit.export, audit.import_, rebuild.rebuild):
    chain.chain.add_command(_cmd)
