"""The data behind the paper's Figure 1 (category shares of LoRA directions vs MLP neurons) and Figure 2
(category-wise activation density of the SAE features, overall, by subcategory and by layer and component
type), and of the same density for the LoRA directions and MLP neurons themselves (``figure2_lora.json``).

All are plain JSON, so the report stage (or a notebook) plots them without re-reading stores or labels.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorascope.components import parse_name
from lorascope.errors import LorascopeError
from lorascope.extract.store import Store
from lorascope.labelling.prompts import Category

if TYPE_CHECKING:
    from lorascope.exclusion import Exclusion

FIGURE1_SHARES = (
    "share = features of the source assigned the category / features of the source assigned any category "
    "(status ok); uncategorized and failed features are counted in totals only, so each source's shares sum to 1"
)
FIGURE2_NORMALISATION = (
    "mass = sum over the density sample's tokens (`sample`) of relu(sign * activation), summed over the "
    "category's member features (status ok) whose component lies in the cell; density = mass / the cell's mass "
    "summed over all categories, so each cell's densities sum to 1 (null where no member feature fired in the "
    "cell). Cells: (layer, component type) for the LoRA store, layer for the MLP store"
)
FIGURE2_SAE_ATTRIBUTION = (
    "activation x share: a live latent f's activation a_f(t) (the SAE's calibrated threshold over the density "
    "sample's tokens of the LoRA store: `sample`) is split over the adapter components c by its decoder row in the "
    "SAE's training units, w[f, c] = W_dec[f, c] / scale[c] (the unit-norm row; W_dec in x.A units, scale "
    "from cfg.json): share[f, c] = w[f, c]^2 / sum_c' w[f, c']^2, the latent's share of the squared "
    "reconstruction it adds (shares sum to 1, so the cells partition its mass). "
    "cell mass[category] = sum_t sum_{f in category} a_f(t) * sum_{c in cell} share[f, c]"
)
FIGURE2_SAE_NORMALISATION = (
    "overall: density[category] = sum_t sum_{f in category} a_f(t) / the same sum over all categories (the "
    "paper's normalised sum of feature activations per category); subcategories: each subcategory's mass / "
    "the mass of its category's subcategorized latents; cells (layer, component type): the attributed mass "
    "/ the cell's attributed mass over all categories, so each cell's densities sum to 1 (null where no "
    "categorized latent has mass in the cell). Latents: live (alive.json) with status ok only; the mass of "
    "live latents without a category (unlabelled, failed, uncategorized) is `unassigned_mass`, that of dead "
    "latents `dead_mass` (both excluded)"
)
DENSITY_SAMPLE = (
    "whole documents of the store drawn at random without replacement (seeded by categorize.seed) until "
    "`density_tokens` tokens (the last document cut to fit), less the tokens the SAE's exclusion policy "
    "(sae.exclude: first positions, special tokens, norm outliers) keeps out of its training, scaling and "
    "calibration; `excluded` counts those by reason, `tokens` is what the masses sum over"
)
SAE_BLOCK_TOKENS = 4096
"""Tokens encoded at once for Figure 2 (bounds the dense block, tokens x d_sae floats)."""


def figure1(
    assignments: Sequence[dict[str, Any]],
    sources: Sequence[str],
    categories: Sequence[Category],
    subcategories: dict[str, list[Category]],
) -> dict[str, Any]:
    """Per category: each source's count and share of its categorized features; per source: totals by
    status; per category with SAE subcategories: each subcategory's count and share within the category."""
    ids = [c.string_id for c in categories]
    counts = {s: dict.fromkeys(ids, 0) for s in sources}
    totals = {s: {"assigned": 0, "uncategorized": 0, "failed": 0} for s in sources}
    sub_counts = {cat: dict.fromkeys((c.string_id for c in subs), 0) for cat, subs in subcategories.items()}
    sub_missing = dict.fromkeys(subcategories, 0)
    for row in assignments:
        source, status = row["source"], row["status"]
        totals[source]["assigned" if status == "ok" else status] += 1
        if status != "ok":
            continue
        counts[source][row["category"]] += 1
        if source == "sae" and row["category"] in sub_counts:
            if row["subcategory"] is None:
                sub_missing[row["category"]] += 1
            else:
                sub_counts[row["category"]][row["subcategory"]] += 1

    def share(n: int, of: int) -> float | None:
        return n / of if of else None

    rows = [
        {
            "string_id": c.string_id,
            "name": c.name,
            "counts": {s: counts[s][c.string_id] for s in sources},
            "shares": {s: share(counts[s][c.string_id], totals[s]["assigned"]) for s in sources},
        }
        for c in categories
    ]
    subs = []
    for cat, found in sub_counts.items():
        assigned = sum(found.values())
        subs.append(
            {
                "category": cat,
                "subcategorized": assigned,
                "not_subcategorized": sub_missing[cat],
                "subcategories": [
                    {
                        "string_id": c.string_id,
                        "name": c.name,
                        "count": found[c.string_id],
                        "share": share(found[c.string_id], assigned),
                    }
                    for c in subcategories[cat]
                ],
            }
        )
    return {
        "sources": list(sources),
        "share_definition": FIGURE1_SHARES,
        "categories": rows,
        "totals": totals,
        "sae_subcategories": subs,
    }


def component_cell(name: str) -> tuple[int, str]:
    """``L3.q_proj`` / ``L3.q_proj.0`` -> (3, "q_proj"); ``L3.mlp.17`` -> (3, "mlp")."""
    parsed = parse_name(name)
    if parsed is None or parsed.sign is not None:
        raise LorascopeError(f"store component {name!r} is not named L<layer>.<type>[.<index>]")
    return parsed.layer, parsed.kind


class DensitySample:
    """The tokens of one store that the Figure 2 densities sum over (``DENSITY_SAMPLE``): a seeded random
    draw of whole documents up to ``n_tokens``, less what ``exclusion`` names. ``blocks`` streams the kept
    rows shard by shard (only the shards that hold drawn documents are read) and counts what it left out."""

    def __init__(self, store: Store, n_tokens: int, seed: int, exclusion: Exclusion | None) -> None:
        import random

        self.store, self.exclusion = store, exclusion
        order = list(range(len(store.documents)))
        random.Random(f"lorascope-figure2-{seed}").shuffle(order)
        self.take: dict[int, int] = {}  # document index -> tokens taken from its start
        left = n_tokens
        for doc in order:
            if left <= 0:
                break
            self.take[doc] = min(store.documents[doc][2], left)
            left -= self.take[doc]
        self.drawn = n_tokens - max(left, 0)
        self.used = 0
        self.excluded: dict[str, int] = {}

    def blocks(self, device: Any, label: str) -> Iterator[Any]:
        """``acts_TC`` of the kept tokens of each shard holding drawn documents, in store order, on ``device``."""
        import torch

        from lorascope.devices import prefetched
        from lorascope.exclusion import count
        from lorascope.progress import track

        docs = self.store.documents
        shards = [s for s in self.store.shards if any(s.first_doc <= d < s.last_doc for d in self.take)]
        self.used, self.excluded = 0, {}
        for shard, (acts_TC, ids_T) in track(
            prefetched(shards, self.store.read, device), label, total=len(shards)
        ):
            drawn_T = torch.zeros(acts_TC.shape[0], dtype=torch.bool, device=acts_TC.device)
            for d in range(shard.first_doc, shard.last_doc):
                if d in self.take:
                    lo = docs[d][1] - shard.start
                    drawn_T[lo : lo + self.take[d]] = True
            keep_T = drawn_T.clone()
            if self.exclusion is not None:
                reasons = self.exclusion.reasons(acts_TC, ids_T, self.store.document_starts(shard))
                count({r: m & drawn_T for r, m in reasons.items()}, self.excluded)
                for mask in reasons.values():
                    keep_T &= ~mask
            self.used += int(keep_T.sum())
            yield acts_TC[keep_T]

    def summary(self) -> dict[str, Any]:
        """What the masses summed over, for the figure's JSON (after ``blocks`` ran)."""
        return {
            "sample": DENSITY_SAMPLE,
            "documents": len(self.take),
            "drawn_tokens": self.drawn,
            "tokens": self.used,
            "excluded": dict(sorted(self.excluded.items())),
        }


def positive_mass(sample: DensitySample, device: Any = "cpu") -> tuple[Any, Any]:
    """Per store column over the sample's tokens: ``(sum relu(acts), sum relu(-acts))``, float64 (CPU
    tensors), the shards streamed one at a time to ``device`` and summed there."""
    import torch

    width = len(sample.store.components)
    pos_C = torch.zeros(width, dtype=torch.float64, device=device)
    neg_C = torch.zeros(width, dtype=torch.float64, device=device)
    for acts_TC in sample.blocks(device, f"categorize: density {sample.store.source}"):
        acts_TC = acts_TC.to(torch.float64)
        pos_C += acts_TC.clamp(min=0).sum(0)
        neg_C += acts_TC.neg().clamp(min=0).sum(0)
    return pos_C.cpu(), neg_C.cpu()


def figure2_source(
    sample: DensitySample,
    members: Sequence[tuple[str, int, str]],
    category_ids: Sequence[str],
    by_type: bool,
    device: Any = "cpu",
) -> dict[str, Any]:
    """Category-wise activation density of one store over ``sample``: ``members`` are ``(feature_name, sign,
    category)`` of the categorized features; cells are (layer, component type) with ``by_type``, else layer."""
    store = sample.store
    column = {name: i for i, name in enumerate(store.components)}
    pos_C, neg_C = positive_mass(sample, device)
    cell_of: list[tuple[Any, ...]] = []
    for name in store.components:
        layer, kind = component_cell(name)
        cell_of.append((layer, kind) if by_type else (layer,))
    cells: dict[tuple[Any, ...], dict[str, Any]] = {}
    for key in cell_of:  # store order: layer-major, then the component order
        cells.setdefault(key, {"features": 0, "mass": dict.fromkeys(category_ids, 0.0)})
    for name, sign, category in members:
        base = name[:-1] if name[-1:] in "+-" and name[:-1] in column else name
        if base not in column:
            raise LorascopeError(
                f"feature {name} is not a component of the store {store.root}; re-run the labels"
            )
        i = column[base]
        cell = cells[cell_of[i]]
        cell["features"] += 1
        cell["mass"][category] += float(pos_C[i] if sign > 0 else neg_C[i])
    out = []
    for key, cell in cells.items():
        total = sum(cell["mass"].values())
        where = {"layer": key[0], "component_type": key[1]} if by_type else {"layer": key[0]}
        density = {c: (m / total if total > 0 else None) for c, m in cell["mass"].items()}
        out.append(
            {**where, "features": cell["features"], "total": total, "mass": cell["mass"], "density": density}
        )
    return {**sample.summary(), "cells": out}


def figure2(
    samples: dict[str, DensitySample],
    assignments: Sequence[dict[str, Any]],
    category_ids: Sequence[str],
    n_tokens: int,
    device: Any = "cpu",
) -> dict[str, Any]:
    """Figure 2 data for the LoRA store (cells: layer x component type) and the MLP store (cells: layer),
    each over its density sample; the density pass runs on ``device``."""
    out: dict[str, Any] = {
        "normalisation": FIGURE2_NORMALISATION,
        "density_tokens": n_tokens,
        "categories": list(category_ids),
    }
    for source, sample in samples.items():
        members = [
            (r["feature_name"], int(r["sign"]), r["category"])
            for r in assignments
            if r["source"] == source and r["status"] == "ok"
        ]
        out[source] = figure2_source(sample, members, category_ids, source == "lora", device)
    return out


def latent_mass(sample: DensitySample, sae: Any, block: int = SAE_BLOCK_TOKENS) -> Any:
    """Per SAE latent, ``sum_t a_f(t)`` over the sample's tokens (float64, CPU); the tokens are encoded with
    the SAE's calibrated threshold, one block at a time, on the SAE's device (the shards streamed to it)."""
    import torch

    device = sae.W_enc_DF.device
    mass_F = torch.zeros(sae.d_sae, dtype=torch.float64, device=device)
    with torch.no_grad():
        for acts_TC in sample.blocks(device, "categorize: SAE density"):
            for b0 in range(0, acts_TC.shape[0], block):
                mass_F += sae.encode(acts_TC[b0 : b0 + block].float()).sum(0, dtype=torch.float64)
    return mass_F.cpu()


def decoder_shares(W_dec_FC: Any, scale_C: Any) -> Any:
    """``share[f, c] = w[f, c]^2 / sum_c' w[f, c']^2`` with ``w = W_dec / scale`` (float64; a zero row gets
    zero shares)."""
    import torch

    w_FC = W_dec_FC.to(torch.float64) / scale_C.to(torch.float64)[None, :]
    sq_FC = w_FC.square()
    total_F = sq_FC.sum(1, keepdim=True)
    return torch.where(total_F > 0, sq_FC / total_F.clamp(min=1e-300), torch.zeros_like(sq_FC))


def _density(mass: dict[str, float]) -> dict[str, float | None]:
    """Each key's share of the total mass (None throughout when nothing has mass)."""
    total = sum(mass.values())
    return {k: (v / total if total > 0 else None) for k, v in mass.items()}


def _load_sae_of(store: Store, sae_dir: Path, device: Any) -> tuple[Any, dict[str, Any]]:
    """The SAE in eval mode and its cfg; an SAE trained on other components than the store holds is a
    one-line error (its decoder rows would be attributed to the wrong cells)."""
    from lorascope.sae.load import load_sae

    sae, cfg = load_sae(sae_dir, device)
    sae.eval()
    if list(cfg["components"]) != list(store.components):
        raise LorascopeError(
            f"{sae_dir}/cfg.json: the SAE was trained on other components than {store.root} holds; "
            "retrain it with `lorascope sae`"
        )
    return sae, cfg


def _cell_shares(sae: Any, cfg: dict[str, Any], store: Store) -> tuple[list[tuple[int, str]], Any]:
    """The (layer, component type) cells in store order and each latent's decoder share per cell
    (``share_FK``: ``decoder_shares`` summed over the cell's components)."""
    import torch

    scale_C = torch.tensor(cfg.get("scale") or [1.0] * sae.d_in, dtype=torch.float64)
    share_FC = decoder_shares(sae.W_dec_FD.detach().cpu(), scale_C)
    cell_of = [component_cell(name) for name in store.components]
    cells = list(dict.fromkeys(cell_of))  # store order: layer-major, then the component order
    where_C = torch.tensor([cells.index(c) for c in cell_of], dtype=torch.long)
    return cells, torch.zeros(sae.d_sae, len(cells), dtype=torch.float64).index_add_(1, where_C, share_FC)


def _live_categories(
    members: Sequence[tuple[int, str, str | None]], live: Any, sae_dir: Path
) -> dict[int, tuple[str, str | None]]:
    """``latent -> (category, subcategory)``; a categorized dead latent is a one-line error (labels
    older than the SAE)."""
    cat_of: dict[int, tuple[str, str | None]] = {}
    for latent, category, sub in members:
        if not live[latent]:
            raise LorascopeError(
                f"sae.{latent} is a dead latent (not in {sae_dir}/alive.json) but categorized"
            )
        cat_of[latent] = (category, sub)
    return cat_of


def _category_masses(
    cat_of: dict[int, tuple[str, str | None]],
    mass_F: Any,
    share_FK: Any,
    category_ids: Sequence[str],
    subcategories: dict[str, list[Category]],
) -> tuple[dict[str, float], dict[str, Any], dict[str, dict[str, float]], dict[str, float]]:
    """Summed over each category's latents (in latent order): ``(overall mass, mass per cell, mass per
    subcategory, mass of the category's latents without a subcategory)``."""
    import torch

    overall = dict.fromkeys(category_ids, 0.0)
    cell_mass = {c: torch.zeros(share_FK.shape[1], dtype=torch.float64) for c in category_ids}
    sub_mass = {c: dict.fromkeys((s.string_id for s in subs), 0.0) for c, subs in subcategories.items()}
    sub_missing = dict.fromkeys(subcategories, 0.0)
    for latent, (category, sub) in sorted(cat_of.items()):
        m = float(mass_F[latent])
        overall[category] += m
        cell_mass[category] += mass_F[latent] * share_FK[latent]
        if category in sub_mass:
            if sub is None:
                sub_missing[category] += m
            else:
                sub_mass[category][sub] += m
    return overall, cell_mass, sub_mass, sub_missing


def figure2_sae(
    sample: DensitySample,
    sae_dir: Path,
    alive: Sequence[int],
    members: Sequence[tuple[int, str, str | None]],
    category_ids: Sequence[str],
    subcategories: dict[str, list[Category]],
    n_tokens: int,
    device: Any = "cpu",
) -> dict[str, Any]:
    """Figure 2 of the paper: the category-wise activation density of the SAE latents. ``members`` are
    ``(latent, category, subcategory)`` of the categorized latents; ``alive`` the live latents. See
    ``FIGURE2_SAE_ATTRIBUTION`` and ``FIGURE2_SAE_NORMALISATION``."""
    import torch

    sae, cfg = _load_sae_of(sample.store, sae_dir, device)
    mass_F = latent_mass(sample, sae)
    cells, share_FK = _cell_shares(sae, cfg, sample.store)
    live = torch.zeros(sae.d_sae, dtype=torch.bool)
    live[list(alive)] = True
    cat_of = _live_categories(members, live, sae_dir)
    overall, cell_mass, sub_mass, sub_missing = _category_masses(
        cat_of, mass_F, share_FK, category_ids, subcategories
    )
    categorized = torch.zeros(sae.d_sae, dtype=torch.bool)
    categorized[list(cat_of)] = True
    out_cells = []
    for k, (layer, kind) in enumerate(cells):
        mass = {c: float(cell_mass[c][k]) for c in category_ids}
        out_cells.append({"layer": layer, "component_type": kind, "total": sum(mass.values()), "mass": mass,
                          "density": _density(mass)})  # fmt: skip
    return {
        "features": "sae",
        "attribution": FIGURE2_SAE_ATTRIBUTION,
        "normalisation": FIGURE2_SAE_NORMALISATION,
        "density_tokens": n_tokens,
        **sample.summary(),
        "categories": list(category_ids),
        "latents": {
            "d_sae": sae.d_sae,
            "alive": int(live.sum()),
            "dead": sae.d_sae - int(live.sum()),
            "categorized": len(cat_of),
        },
        "mass_total": float(mass_F[live].sum()),
        "unassigned_mass": float(mass_F[live & ~categorized].sum()),
        "dead_mass": float(mass_F[~live].sum()),
        "overall": {"mass": overall, "density": _density(overall)},
        "subcategories": [
            {
                "category": c,
                "mass": sub_mass[c],
                "density": _density(sub_mass[c]),
                "not_subcategorized_mass": sub_missing[c],
            }
            for c in subcategories
        ],
        "cells": out_cells,
    }
