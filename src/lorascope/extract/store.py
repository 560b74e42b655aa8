"""The activation store: ``index.json`` plus safetensors shards of whole documents.

Each shard holds ``acts_TC`` (tokens x components, the store dtype) and ``token_ids_T`` (int32) for a
run of consecutive documents. The shard plan depends only on the document lengths and
``extract.shard_tokens``, so any number of processes, or a resumed run, produces the same shards.
``Store.open`` checks the index against the shards (missing file, truncated file, wrong shape) before
anything reads them.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorascope.atomic import atomic_path, write_json
from lorascope.errors import LorascopeError

FORMAT = "lorascope-activations/1"
INDEX = "index.json"
ACTS = "acts_TC"
IDS = "token_ids_T"
_DTYPE_TAGS = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


@dataclass(frozen=True)
class Shard:
    """A planned shard: documents ``[first_doc, last_doc)`` = tokens ``[start, start + tokens)``."""

    index: int
    first_doc: int
    last_doc: int
    start: int
    tokens: int

    @property
    def file(self) -> str:
        return f"shard-{self.index:05d}.safetensors"

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "documents": [self.first_doc, self.last_doc],
            "start": self.start,
            "tokens": self.tokens,
        }


def plan_shards(lengths: Sequence[int], shard_tokens: int) -> list[Shard]:
    """Pack documents in order into shards of at most ``shard_tokens`` (a longer document alone)."""
    shards: list[Shard] = []
    first, start, size = 0, 0, 0
    for i, n in enumerate(lengths):
        if size and size + n > shard_tokens:
            shards.append(Shard(len(shards), first, i, start, size))
            first, start, size = i, start + size, 0
        size += n
    if size:
        shards.append(Shard(len(shards), first, len(lengths), start, size))
    return shards


def write_shard(path: Path, acts_TC: Any, ids_T: Any) -> None:
    """Write one shard atomically (temp file in the same directory, then rename)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({ACTS: acts_TC.contiguous(), IDS: ids_T.contiguous()}, str(tmp))


def shard_complete(path: Path, tokens: int, width: int, dtype: str) -> bool:
    """Whether ``path`` is a complete shard of the expected shape (a cheap header check)."""
    try:
        _check_shard(path, tokens, width, dtype)
    except LorascopeError:
        return False
    return True


def _check_shard(path: Path, tokens: int, width: int, dtype: str) -> None:
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise LorascopeError(f"{path}: listed in {INDEX} but missing") from None
    except (OSError, ValueError, struct.error) as e:
        raise LorascopeError(f"{path}: not a readable safetensors shard ({e})") from None
    expected = {ACTS: (_DTYPE_TAGS[dtype], [tokens, width]), IDS: ("I32", [tokens])}
    end = 0
    for name, (tag, shape) in expected.items():
        meta = header.get(name)
        if meta is None or meta.get("dtype") != tag or meta.get("shape") != shape:
            got = None if meta is None else (meta.get("dtype"), meta.get("shape"))
            raise LorascopeError(f"{path}: {name} should be {tag} {shape} per {INDEX}, got {got}")
        end = max(end, meta["data_offsets"][1])
    if size < 8 + header_len + end:
        raise LorascopeError(f"{path}: truncated ({size} bytes, expected {8 + header_len + end})")


@dataclass
class Store:
    """An opened, checked activation store."""

    root: Path
    index: dict[str, Any]

    @property
    def source(self) -> str:
        return self.index["source"]

    @property
    def components(self) -> list[str]:
        return self.index["components"]

    @property
    def tokens(self) -> int:
        return self.index["tokens"]

    @property
    def shards(self) -> list[Shard]:
        return [
            Shard(i, s["documents"][0], s["documents"][1], s["start"], s["tokens"])
            for i, s in enumerate(self.index["shards"])
        ]

    @property
    def documents(self) -> list[list[Any]]:
        """``[doc_id, start, length]`` per document, in order."""
        return self.index["documents"]

    @classmethod
    def open(cls, root: str | Path, hint: str = "") -> Store:
        """Read and check ``root/index.json`` and every shard header. ``hint`` completes the error
        when there is no store (e.g. "run `lorascope extract --source mlp`")."""
        root = Path(root)
        path = root / INDEX
        if not path.is_file():
            raise LorascopeError(
                f"{root}: no activation store ({INDEX} missing){'; ' + hint if hint else ''}"
            )
        try:
            index = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise LorascopeError(f"{path}: unreadable index ({e})") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise LorascopeError(f"{path}: not a {FORMAT} index")
        store = cls(root, index)
        width, total = len(store.components), 0
        for shard in store.shards:
            if shard.start != total:
                raise LorascopeError(f"{path}: shard {shard.file} starts at {shard.start}, expected {total}")
            _check_shard(root / shard.file, shard.tokens, width, index["dtype"])
            total += shard.tokens
        if total != store.tokens:
            raise LorascopeError(f"{path}: shards hold {total} tokens, the index says {store.tokens}")
        return store

    def document_starts(self, shard: Shard) -> Any:
        """Local indices (a torch tensor) of the first token of each document of ``shard``."""
        import torch

        return torch.tensor([d[1] - shard.start for d in self.documents[shard.first_doc : shard.last_doc]])

    def read(self, shard: Shard) -> tuple[Any, Any]:
        """``(acts_TC, token_ids_T)`` of one shard."""
        from safetensors.torch import load_file

        tensors = load_file(str(self.root / shard.file))
        return tensors[ACTS], tensors[IDS]

    def __iter__(self) -> Iterator[tuple[Shard, Any, Any]]:
        for shard in self.shards:
            yield (shard, *self.read(shard))


def write_index(root: Path, index: dict[str, Any]) -> None:
    """Write ``index.json`` last and atomically: its presence marks a finished store."""
    write_json(root / INDEX, {"format": FORMAT, **index})
