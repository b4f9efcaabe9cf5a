"""A Faust app hosting one knhk-stream peer, configured from the environment (used by test_faust.py).

KNHK_BOOTSTRAP KNHK_REDIS KNHK_SETTINGS KNHK_PEER_ID KNHK_KEY KNHK_PREFIX KNHK_TOPIC_PREFIX KNHK_FAUST_DIR
KNHK_MAX_OPEN_BEAT_DELTAS (optional: the node's open-beat bound)
python -m tests.support.faust_app worker -l info
"""

from __future__ import annotations

import os

import faust

from knhk_stream.integrations.faust import add_peer
from knhk_stream.kafka.topics import load_topics
from knhk_stream.protocol.quorum import load_private_key
from knhk_stream.protocol.settings import ChainSettings
from knhk_stream.runtime.node import NodeLimits

env = os.environ
settings = ChainSettings.from_toml(env["KNHK_SETTINGS"])
peer_id = env["KNHK_PEER_ID"]
topic_prefix = env.get("KNHK_TOPIC_PREFIX")
topics = load_topics().renamed(topic_prefix) if topic_prefix else load_topics()

app = faust.App(
    f"knhk.{topic_prefix or settings.chain_id}.{peer_id}",
    broker=f"kafka://{env['KNHK_BOOTSTRAP']}",
    datadir=env.get("KNHK_FAUST_DIR", "faust-data"),
    web_enabled=False,
    autodiscover=False,
    broker_session_timeout=6.0,  # Tansu: a group join takes about half of it
    broker_heartbeat_interval=1.0,
    topic_disable_leader=True,
)

# The app's own work would go here (its agents, tables, ...); the peer is added beside it.
peer = add_peer(
    app,
    settings,
    peer_id,
    load_private_key(env["KNHK_KEY"]),
    redis_url=env["KNHK_REDIS"],
    prefix=env.get("KNHK_PREFIX", "knhk"),
    topics=topics,
    # The tests' embedded Tansu broker ignores message.timestamp.type (records keep the
    # producer's timestamp), so the peer may not insist on LogAppendTime; the tests'
    # producers are trusted.
    allow_producer_timestamps=True,
    limits=NodeLimits(max_open_beat_deltas=int(env["KNHK_MAX_OPEN_BEAT_DELTAS"]))
    if "KNHK_MAX_OPEN_BEAT_DELTAS" in env
    else None,
)

if __name__ == "__main__":
    app.main()
