"""The flat module paths of 0.1 (`knhk_stream.settings`, ...) as deprecated aliases of their new homes.

One import hook instead of a shim file per old module: `import knhk_stream.node`
warns once and returns the very module `knhk_stream.runtime.node`, so classes
stay identical. Removed in 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from importlib.machinery import ModuleSpec
from types import ModuleType

OLD_TO_NEW = {
    "encoding": "protocol.encoding",
    "decode": "protocol.decode",
    "hooks": "protocol.hooks",
    "receipts": "protocol.receipts",
    "merkle": "protocol.merkle",
    "beats": "protocol.beats",
    "chain": "protocol.entry",
    "committed": "protocol.committed",
    "quorum": "protocol.quorum",
    "settings": "protocol.settings",
    "proof": "protocol.proof",
    "peer": "protocol.engine",
    "consensus": "protocol.consensus",
    "wire": "protocol.wire",
    "topics": "kafka.topics",
    "admin": "kafka.admin",
    "producer": "kafka.producer",
    "embedded": "kafka.embedded",
    "roots": "kafka.roots",
    "node": "runtime.node",
    "worker": "runtime.worker",
    "telemetry": "runtime.telemetry",
    "status": "runtime.status",
    "demo": "runtime.demo",
    "faust": "integrations.faust",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: object = None, target: object = None) -> ModuleSpec | None:
        pkg, _, old = fullname.rpartition(".")
        if pkg != "knhk_stream" or old not in OLD_TO_NEW:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: ModuleSpec) -> ModuleType:
        new = "knhk_stream." + OLD_TO_NEW[spec.name.rpartition(".")[2]]
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """The new module is already executed."""


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
