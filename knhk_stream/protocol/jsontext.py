"""JSON read from anyone (Redis, topics, files): one way to fail.

`json.loads` raises RecursionError, not ValueError, on text nested past the interpreter's
limit, so a reader that treats ValueError as a finding would crash on `[[[[…`. Every reader
of untrusted JSON goes through `loads_json`.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["loads_json"]


def loads_json(text: str | bytes | bytearray, **kwargs: Any) -> Any:
    """`json.loads` (kwargs go to it), raising ValueError for anything that is not JSON, nesting too
    deep included."""
    try:
        return json.loads(text, **kwargs)
    except RecursionError:
        raise ValueError("nested too deeply to be read (arrays or objects within each other)") from None
