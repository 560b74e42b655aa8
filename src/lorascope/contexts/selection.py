"""Streaming per-feature selection: top-k windows, uniform quantile samples, random negatives, stats.

Every selection is "keep the n largest scores", merged shard by shard, so memory is
O(features x samples x window) whatever the store size:

* ``top``: score = sign x activation (the k most activating tokens of each feature sign);
* ``quantile``: score = -key on active tokens (a uniform sample of the activating tokens; keys are one
  seeded uniform per token, so the sample is the same however the store is cut into blocks);
* ``random``: score = -key on tokens that do not activate the feature sign.

Within a shard only (score, position) are tracked; windows (token ids and the feature's activations
around each kept token, never crossing a document) are cut once per shard for the shard's survivors
and then travel with their entries through the merges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorascope.contexts.params import ContextsSection
from lorascope.exclusion import REASONS
from lorascope.sources import Encoder

GROUPS = ("top", "quantile", "random")
BLOCK_TOKENS = 32768
"""Tokens encoded and scored at once (bounds the dense feature block, e.g. 32768 x d_sae floats)."""
PAD_ID = -1


@dataclass(frozen=True)
class ShardView:
    """A shard's tokens and document bounds: ``doc_lo_T[t] <= t < doc_hi_T[t]`` (local indices)."""

    start: int
    acts_TC: Any
    ids_T: Any
    doc_lo_T: Any
    doc_hi_T: Any

    @classmethod
    def build(cls, start: int, acts_TC: Any, ids_T: Any, doc_lengths: list[int]) -> ShardView:
        """Document bounds on the device of ``acts_TC``."""
        import torch

        lengths = torch.tensor(doc_lengths, dtype=torch.long, device=acts_TC.device)
        ends = torch.cumsum(lengths, 0)
        lo_T = torch.repeat_interleave(ends - lengths, lengths)
        hi_T = torch.repeat_interleave(ends, lengths)
        return cls(start, acts_TC, ids_T.to(acts_TC.device), lo_T, hi_T)


class Selector:
    """Selection state for ``n_features`` features x ``signs``; ``state`` is a dict of tensors on
    ``device`` (where ``update`` expects the shard and the encoder to be)."""

    def __init__(
        self, n_features: int, signs: tuple[int, ...], cfg: ContextsSection, device: Any = "cpu"
    ) -> None:
        import torch

        self.n_features, self.signs, self.cfg = n_features, signs, cfg
        self.device = torch.device(device)
        self.sizes = {
            "top": cfg.top_k,
            "quantile": cfg.quantile_bins * cfg.quantile_samples,
            "random": cfg.random_samples,
        }
        self.width = cfg.window_before + 1 + cfg.window_after
        S, F, W = len(signs), n_features, self.width
        dev = self.device
        self.state: dict[str, Any] = {
            "tokens": torch.zeros((), dtype=torch.long, device=dev),
            "active": torch.zeros(S, F, dtype=torch.long, device=dev),
            "nonzero": torch.zeros(F, dtype=torch.long, device=dev),
            "sum": torch.zeros(F, dtype=torch.float64, device=dev),
            "sumsq": torch.zeros(F, dtype=torch.float64, device=dev),
            "min": torch.full((F,), float("inf"), device=dev),
            "max": torch.full((F,), float("-inf"), device=dev),
            # tokens left out by the exclusion policy: in all, and per reason (reasons may overlap)
            "excluded": torch.zeros((), dtype=torch.long, device=dev),
            **{f"excluded.{r}": torch.zeros((), dtype=torch.long, device=dev) for r in REASONS},
        }
        for g, n in self.sizes.items():
            self.state[f"{g}.score"] = torch.full((S, F, n), float("-inf"), device=dev)
            self.state[f"{g}.pos"] = torch.full((S, F, n), -1, dtype=torch.long, device=dev)
            self.state[f"{g}.ids"] = torch.full((S, F, n, W), PAD_ID, dtype=torch.int32, device=dev)
            self.state[f"{g}.acts"] = torch.full((S, F, n, W), float("nan"), device=dev)

    def to(self, device: Any) -> Selector:
        """Move the state (e.g. to the CPU for the tables and checkpoints, back to the GPU on resume)."""
        import torch

        self.device = torch.device(device)
        self.state = {k: v.to(self.device) for k, v in self.state.items()}
        return self

    # ------------------------------------------------------------------------------- one shard
    def update(
        self, shard: ShardView, encode: Encoder | None, keys_T: Any, excluded: dict[str, Any] | None = None
    ) -> None:
        """Fold one shard into the state. ``excluded``: per reason, the tokens the exclusion policy
        leaves out (bool ``[T]`` on the device): never selected (top, quantile or random) and not in
        the statistics; they still appear inside their neighbours' windows."""
        import torch

        S, F, T = len(self.signs), self.n_features, shard.ids_T.shape[0]
        dev = self.device
        st = self.state
        out_T = torch.zeros(T, dtype=torch.bool, device=dev)
        for reason, mask in (excluded or {}).items():
            st[f"excluded.{reason}"] += mask.sum()
            out_T |= mask
        st["excluded"] += out_T.sum()
        excluding = bool(out_T.any())
        best = {
            g: (
                torch.full((S, F, n), float("-inf"), device=dev),
                torch.full((S, F, n), -1, dtype=torch.long, device=dev),
            )
            for g, n in self.sizes.items()
            if n
        }
        thr, chunk = self.cfg.active_threshold, self.cfg.feature_chunk
        for b0 in range(0, T, BLOCK_TOKENS):
            b1 = min(T, b0 + BLOCK_TOKENS)
            block = shard.acts_TC[b0:b1].float()
            feats_bF = encode(block) if encode is not None else block
            key_b = keys_T[b0:b1].to(dev)
            out_b = out_T[b0:b1]
            for f0 in range(0, F, chunk):
                f1 = min(F, f0 + chunk)
                raw_fb = feats_bF[:, f0:f1].T.contiguous()
                lo_fb = hi_fb = raw_fb
                if excluding:  # 0 adds nothing to the sums; +-inf never wins a min, max or top-k
                    raw_fb = raw_fb.masked_fill(out_b, 0.0)
                    lo_fb = raw_fb.masked_fill(out_b, float("inf"))
                    hi_fb = raw_fb.masked_fill(out_b, float("-inf"))
                st["min"][f0:f1] = torch.minimum(st["min"][f0:f1], lo_fb.amin(1))
                st["max"][f0:f1] = torch.maximum(st["max"][f0:f1], hi_fb.amax(1))
                st["nonzero"][f0:f1] += (raw_fb != 0).sum(1)
                st["sum"][f0:f1] += raw_fb.sum(1, dtype=torch.float64)
                st["sumsq"][f0:f1] += raw_fb.square().sum(1, dtype=torch.float64)
                for si, sign in enumerate(self.signs):
                    active_fb = raw_fb > thr if sign > 0 else raw_fb < -thr  # excluded: 0, never active
                    st["active"][si, f0:f1] += active_fb.sum(1)

                    if "top" in best:  # the most negative values for the negative sign: no negated copy
                        ranked = hi_fb if sign > 0 else lo_fb
                        v, i = ranked.topk(min(self.sizes["top"], b1 - b0), dim=1, largest=sign > 0)
                        _keep_best(*best["top"], (si, slice(f0, f1)), v if sign > 0 else -v, i + b0)
                    if "quantile" in best or "random" in best:
                        # one tensor serves both samples: active tokens score -key in (-1, 0], the others
                        # key - 2 in [-2, -1); the largest are the active tokens with the smallest keys,
                        # the smallest the inactive tokens with the smallest keys; excluded tokens score
                        # -1, which neither sample keeps
                        s_fb = torch.where(active_fb, -key_b, key_b - 2)
                        if excluding:
                            s_fb = s_fb.masked_fill(out_b, -1.0)
                        if "quantile" in best:
                            v, i = s_fb.topk(min(self.sizes["quantile"], b1 - b0), dim=1)
                            quantile = torch.where(v > -1, v, float("-inf"))
                            _keep_best(*best["quantile"], (si, slice(f0, f1)), quantile, i + b0)
                        if "random" in best:
                            v, i = s_fb.topk(min(self.sizes["random"], b1 - b0), dim=1, largest=False)
                            negatives = torch.where(v < -1, -(v + 2), float("-inf"))
                            _keep_best(*best["random"], (si, slice(f0, f1)), negatives, i + b0)
        st["tokens"] += T - out_T.sum()
        for g, (score, pos) in best.items():
            self._merge(g, shard, encode, score, pos)

    def _merge(self, group: str, shard: ShardView, encode: Encoder | None, score: Any, local: Any) -> None:
        """Cut windows for the shard's survivors and merge them into the running selection."""
        import torch

        # a slot is a sample only with a finite score: a block with fewer active (or inactive) tokens than
        # the group's size fills the rest with -inf-scored positions, which must never enter the state
        valid = (local >= 0) & (score > float("-inf"))
        local = torch.where(valid, local, -1)
        ids, acts = self._windows(shard, encode, local)
        st, n = self.state, score.shape[-1]
        all_score = torch.cat([st[f"{group}.score"], torch.where(valid, score, float("-inf"))], 2)
        all_pos = torch.cat([st[f"{group}.pos"], torch.where(valid, local + shard.start, -1)], 2)
        all_ids = torch.cat([st[f"{group}.ids"], ids], 2)
        all_acts = torch.cat([st[f"{group}.acts"], acts], 2)
        new_score, pick = all_score.topk(n, dim=2)
        st[f"{group}.score"] = new_score
        st[f"{group}.pos"] = all_pos.gather(2, pick)
        wide = pick.unsqueeze(-1).expand(-1, -1, -1, self.width)
        st[f"{group}.ids"] = all_ids.gather(2, wide)
        st[f"{group}.acts"] = all_acts.gather(2, wide)

    def _windows(self, shard: ShardView, encode: Encoder | None, local_SFn: Any) -> tuple[Any, Any]:
        """Token ids and feature activations of the window around each local position
        (``PAD_ID`` / NaN outside the token's document or for empty slots)."""
        import torch

        S, F, n = local_SFn.shape
        offsets_W = torch.arange(-self.cfg.window_before, self.cfg.window_after + 1, device=self.device)
        centre = local_SFn.clamp(min=0)
        where_SFnW = centre.unsqueeze(-1) + offsets_W
        inside = (
            (local_SFn >= 0).unsqueeze(-1)
            & (where_SFnW >= shard.doc_lo_T[centre].unsqueeze(-1))
            & (where_SFnW < shard.doc_hi_T[centre].unsqueeze(-1))
        )
        where_SFnW = torch.where(inside, where_SFnW, 0)
        ids = torch.where(inside, shard.ids_T[where_SFnW], PAD_ID).to(torch.int32)
        feature_SFnW = torch.arange(F, device=self.device).view(1, F, 1, 1).expand(S, F, n, self.width)
        values = _cells(shard.acts_TC, encode, where_SFnW[inside], feature_SFnW[inside])
        acts = torch.full((S, F, n, self.width), float("nan"), device=self.device)
        acts[inside] = values
        return ids, acts


def _keep_best(score: Any, pos: Any, rows: tuple[int, slice], c_score: Any, c_pos: Any) -> None:
    """Merge candidates into ``score[rows]`` / ``pos[rows]``, keeping the largest scores."""
    import torch

    merged_score = torch.cat([score[rows], c_score], 1)
    merged_pos = torch.cat([pos[rows], c_pos], 1)
    top_score, pick = merged_score.topk(score.shape[-1], dim=1)
    score[rows] = top_score
    pos[rows] = merged_pos.gather(1, pick)


def _cells(acts_TC: Any, encode: Encoder | None, pos_N: Any, feature_N: Any) -> Any:
    """Feature activations at (token, feature) pairs, encoding each needed token once, in blocks."""
    import torch

    if encode is None:
        return acts_TC[pos_N, feature_N].float()
    tokens, inverse = torch.unique(pos_N, return_inverse=True)
    order = torch.argsort(inverse)
    out = torch.empty(pos_N.shape[0], device=pos_N.device)
    steps = torch.arange(0, tokens.shape[0] + BLOCK_TOKENS, BLOCK_TOKENS, device=pos_N.device)
    bounds = torch.searchsorted(inverse[order], steps)
    for i in range(bounds.shape[0] - 1):
        sel = order[bounds[i] : bounds[i + 1]]
        if sel.numel() == 0:
            continue
        b0 = i * BLOCK_TOKENS
        feats_bF = encode(acts_TC[tokens[b0 : b0 + BLOCK_TOKENS]].float())
        out[sel] = feats_bF[inverse[sel] - b0, feature_N[sel]]
    return out
