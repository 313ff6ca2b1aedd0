"""accel's custom ops and ``torch.compile``'s caches: a cache-key tag that names accel's code.

Inductor's FX-graph cache and AOTAutograd's cache key a compiled graph on its Dynamo graph, where a custom
op is only a name (``torch.ops.accel.recurrence``): the op's fake kernel, autograd formula and Python
implementation are not part of the key. A cache filled by an older accel then hands out code compiled for
the older ops. Seen here: the LSTM recurrence's saved tensors changed shape and a warm cache failed with a
size assertion; a change that kept the shapes would have run silently wrong. So importing the modules that
define ops appends a hash of accel's Python sources to ``torch.compiler.config.cache_key_tag``: after
accel changes, each graph compiles afresh once (the user's own tag, if any, is kept in front).
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch

__all__ = ["source_hash", "tag_compile_caches"]

_PACKAGE = Path(__file__).resolve().parents[1]  # the whole accel package


@functools.lru_cache(maxsize=None)
def source_hash(root: Path = _PACKAGE) -> str:
    """SHA-256 (first 16 hex digits) of every ``*.py`` under ``root``, names and contents (~2 ms)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def tag_compile_caches() -> str:
    """Append ``accel-<source hash>`` to ``torch.compiler.config.cache_key_tag`` (once); the tag in use."""
    marker = f"accel-{source_hash()}"
    tag = torch.compiler.config.cache_key_tag
    if marker not in tag.split("+"):
        torch.compiler.config.cache_key_tag = f"{tag}+{marker}" if tag else marker
    return torch.compiler.config.cache_key_tag
