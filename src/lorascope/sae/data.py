"""SAE training data from an activation store: held-out documents, statistics, shuffled batches.

Memory stays at one shard whatever the store size: statistics are one streaming pass, and batches
come from one shard at a time (its training tokens in a seeded random order; the remainder of a shard
that does not fill a batch is carried into the next). The stream's position is a small state dict, so
a resumed run continues with exactly the batches an uninterrupted run would have seen. On a GPU the
shards are streamed to it (``lorascope.devices.prefetched``: the next shard is read and shuffled into
pinned memory while the current one trains); the shuffles are drawn on the CPU, so the batches are the
same on every device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from lorascope import kernels
from lorascope.errors import LorascopeError
from lorascope.exclusion import Exclusion, count
from lorascope.extract.store import Shard, Store


def heldout_documents(store: Store, fraction: float) -> torch.Tensor:
    """Boolean per document: held out of training (a hash of the doc id, so stable across runs)."""
    cut = int(fraction * 2**32)
    held = torch.tensor(
        [int.from_bytes(hashlib.sha1(str(d[0]).encode()).digest()[:4], "big") < cut for d in store.documents]
    )
    if bool(held.all()) or not bool(held.any()):
        raise LorascopeError(
            f"sae.heldout_fraction: {fraction} leaves {'no training' if held.all() else 'no held-out'} documents "
            f"among the store's {len(held)}"
        )
    return held


def token_mask(store: Store, shard: Shard, held_docs: torch.Tensor, want_heldout: bool) -> torch.Tensor:
    """Per token of ``shard``: whether it belongs to the wanted split."""
    lengths = torch.tensor([d[2] for d in store.documents[shard.first_doc : shard.last_doc]])
    held_T = torch.repeat_interleave(held_docs[shard.first_doc : shard.last_doc], lengths)
    return held_T if want_heldout else ~held_T


def kept(
    store: Store,
    shard: Shard,
    acts_TC: torch.Tensor,
    ids_T: torch.Tensor,
    held_docs: torch.Tensor,
    want_heldout: bool,
    exclusion: Exclusion | None,
) -> torch.Tensor:
    """Per token of ``shard``: in the wanted split and not excluded by the policy (on ``acts_TC``'s device)."""
    mask = token_mask(store, shard, held_docs, want_heldout).to(acts_TC.device)
    if exclusion is not None:
        mask &= ~exclusion.excluded(acts_TC, ids_T, store.document_starts(shard))
    return mask


@dataclass
class Stats:
    """Training-split statistics from one pass: per-component mean and RMS, token counts."""

    mean_D: torch.Tensor
    rms_D: torch.Tensor
    mean_sq_norm: float
    tokens: int
    nonfinite_tokens: int
    sample_ND: torch.Tensor
    """Up to 4096 training tokens (for the geometric-median initialisation)."""
    excluded: dict[str, int]
    """Tokens of the whole store (both splits) the exclusion policy leaves out: ``excluded`` and
    one count per reason (reasons may overlap)."""


def scan(
    store: Store,
    held_docs: torch.Tensor,
    drop_nonfinite: bool,
    device: Any = "cpu",
    exclusion: Exclusion | None = None,
) -> Stats:
    """Statistics of the training tokens the exclusion policy keeps (on ``device``); non-finite rows
    are an error naming where they are, or dropped and counted with ``drop_nonfinite``. A policy that
    leaves no training tokens is a one-line error."""
    from lorascope.devices import stream_to

    D = len(store.components)
    total = torch.zeros(D, dtype=torch.float64, device=device)
    sq = torch.zeros(D, dtype=torch.float64, device=device)
    tokens = bad = 0
    sample: list[torch.Tensor] = []
    excluded: dict[str, int] = {}
    for shard, acts_TC, ids_T in stream_to(store, torch.device(device)):
        train_T = token_mask(store, shard, held_docs, False).to(acts_TC.device)
        if exclusion is not None:
            reasons = exclusion.reasons(acts_TC, ids_T, store.document_starts(shard))
            count(reasons, excluded)
            for mask in reasons.values():
                train_T &= ~mask
        x_TD = acts_TC[train_T].double()
        finite_T = torch.isfinite(x_TD).all(1)
        n_bad = int((~finite_T).sum())
        if n_bad and not drop_nonfinite:
            token = shard.start + int(train_T.nonzero().flatten()[(~finite_T).nonzero()[0]])
            doc = max(i for i in range(shard.first_doc, shard.last_doc) if store.documents[i][1] <= token)
            doc_id, start, _ = store.documents[doc]
            raise LorascopeError(
                f"{store.root / shard.file}: {n_bad} training tokens with NaN/inf activations (first: document "
                f"{doc_id} token {token - start}); set sae.drop_nonfinite: true to skip them"
            )
        bad += n_bad
        x_TD = x_TD[finite_T]
        total += x_TD.sum(0)
        sq += x_TD.square().sum(0)
        tokens += x_TD.shape[0]
        if sum(s.shape[0] for s in sample) < 4096:
            sample.append(x_TD[:4096].float())
    if tokens == 0 and excluded.get("excluded"):
        by = ", ".join(f"{r} {n}" for r, n in excluded.items() if r != "excluded")
        raise LorascopeError(
            f"sae.exclude: leaves no training tokens in {store.root} ({excluded['excluded']} of {store.tokens} "
            f"excluded: {by})"
        )
    if tokens == 0:
        raise LorascopeError(f"{store.root}: no finite training tokens")
    return Stats(
        mean_D=(total / tokens).float(),
        rms_D=kernels.sqrt(sq / tokens).float(),
        mean_sq_norm=float(sq.sum() / tokens),
        tokens=tokens,
        nonfinite_tokens=bad,
        sample_ND=torch.cat(sample)[:4096],
        excluded=excluded,
    )


def geometric_median(x_ND: torch.Tensor, iterations: int = 50) -> torch.Tensor:
    """Weiszfeld's algorithm from the mean."""
    y_D = x_ND.mean(0)
    for _ in range(iterations):
        w_N = 1 / (x_ND - y_D).norm(dim=1).clamp(min=1e-8)
        y_D = (w_N[:, None] * x_ND).sum(0) / w_N.sum()
    return y_D


class TokenStream:
    """Endless shuffled batches of training tokens (float32, unscaled, on ``device``)."""

    def __init__(
        self,
        store: Store,
        held_docs: torch.Tensor,
        batch_size: int,
        seed: int,
        device: Any = "cpu",
        exclusion: Exclusion | None = None,
    ) -> None:
        self.store, self.held_docs, self.batch_size, self.seed = store, held_docs, batch_size, seed
        self.exclusion = exclusion
        self.device = torch.device(device)
        self.state: dict[str, Any] = {
            "epoch": 0,
            "cursor": 0,
            "offset": 0,
            "carry": torch.zeros(0, len(store.components), device=self.device),
        }

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        return torch.randperm(len(self.store.shards), generator=g).tolist()

    def _shard_tokens(self, epoch: int, shard_index: int) -> torch.Tensor:
        shard = self.store.shards[shard_index]
        acts_TC, ids_T = self.store.read(shard)
        x_TD = acts_TC[kept(self.store, shard, acts_TC, ids_T, self.held_docs, False, self.exclusion)].float()
        x_TD = x_TD[torch.isfinite(x_TD).all(1)]
        g = torch.Generator().manual_seed((self.seed * 7919 + epoch) * 100_003 + shard_index)
        return x_TD[torch.randperm(x_TD.shape[0], generator=g)]

    def __iter__(self) -> Iterator[torch.Tensor]:
        from lorascope.devices import prefetched

        st = self.state
        st["carry"] = st["carry"].to(self.device)  # a checkpoint may come from another device
        while True:
            order = self._order(st["epoch"])
            epoch = st["epoch"]
            shards = prefetched(order[st["cursor"] :], partial(self._shard_tokens, epoch), self.device)
            for _, x_TD in shards:
                while True:
                    need = self.batch_size - st["carry"].shape[0]
                    piece = x_TD[st["offset"] : st["offset"] + need]
                    if piece.shape[0] < need:  # shard exhausted: carry the rest over
                        st["carry"] = torch.cat([st["carry"], piece])
                        st["cursor"], st["offset"] = st["cursor"] + 1, 0
                        break
                    batch = torch.cat([st["carry"], piece])
                    st["carry"] = batch[:0]
                    st["offset"] += need
                    yield batch
            st["epoch"], st["cursor"] = st["epoch"] + 1, 0
