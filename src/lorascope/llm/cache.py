"""Content-addressed disk cache of LLM answers, so re-running a labelling stage costs no requests.

The key is the SHA-256 of a canonical JSON of everything that determines the answer (backend, base
URL, model, messages, sampling parameters) plus a format version; credentials are never part of it.
One JSON file per entry, sharded by the key's first two hex digits, each written to a temporary
sibling and renamed into place, so concurrent writers and killed runs never leave a partial entry.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorascope.atomic import write_text
from lorascope.llm.completion import Completion

CACHE_FORMAT = 1
"""Bump when the entry layout or the meaning of a key changes: old entries then simply miss."""


@dataclass(frozen=True)
class CacheKey:
    """A request's digest and the inputs it was computed from (stored beside the answer for audits)."""

    digest: str
    inputs: Mapping[str, Any]

    @classmethod
    def of(cls, inputs: Mapping[str, Any]) -> CacheKey:
        """The key of ``inputs`` (JSON-serialisable): sorted keys and fixed separators make it canonical."""
        canonical = json.dumps({"format": CACHE_FORMAT, **inputs}, sort_keys=True, separators=(",", ":"))
        return cls(hashlib.sha256(canonical.encode()).hexdigest(), inputs)


class DiskCache:
    """Answers by key under ``root/<first two hex digits>/<digest>.json``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, key: CacheKey) -> Path:
        return self.root / key.digest[:2] / f"{key.digest}.json"

    def get(self, key: CacheKey) -> Completion | None:
        """The stored answer, marked ``cached``; None when absent or unreadable (it is then re-asked)."""
        try:
            entry = json.loads(self.path(key).read_text(encoding="utf-8"))
            if entry["format"] != CACHE_FORMAT or entry["key"] != key.digest:
                return None
            answer = entry["completion"]
            return Completion(
                text=answer["text"],
                input_tokens=answer["input_tokens"],
                output_tokens=answer["output_tokens"],
                model=answer["model"],
                cached=True,
                structured=answer.get("structured", False),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: CacheKey, completion: Completion) -> None:
        """Store ``completion`` with the request inputs; atomic, so a reader never sees half an entry."""
        entry = {
            "format": CACHE_FORMAT,
            "key": key.digest,
            "request": key.inputs,
            "completion": {
                "text": completion.text,
                "input_tokens": completion.input_tokens,
                "output_tokens": completion.output_tokens,
                "model": completion.model,
                "structured": completion.structured,
            },
        }
        write_text(self.path(key), json.dumps(entry, indent=1, sort_keys=True) + "\n")
