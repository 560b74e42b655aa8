"""great-expectations checks on the prepared rows (ephemeral context, nothing written to disk by GX)."""

from __future__ import annotations

import os
from typing import Any

from lorascope.prepare.params import PrepareSection

TEXT_COLUMNS = ("question", "deepseek_thinking_trajectory", "deepseek_attempt", "solution")


def _suite(cfg: PrepareSection) -> list[Any]:
    import great_expectations as gx

    E = gx.expectations
    checks: list[Any] = []
    for col in TEXT_COLUMNS:
        checks.append(E.ExpectColumnValuesToNotBeNull(column=col))
        # \S: rejects empty and whitespace-only strings (nulls are reported by the check above)
        checks.append(E.ExpectColumnValuesToMatchRegex(column=col, regex=r"\S"))
    checks.append(E.ExpectColumnValuesToBeUnique(column="id"))
    checks.append(
        E.ExpectColumnValuesToBeBetween(
            column="n_tokens_full",
            min_value=1,
            max_value=cfg.block_size,
            mostly=1 - cfg.max_truncated_fraction,
        )
    )
    checks.append(E.ExpectColumnValuesToBeBetween(column="n_loss_tokens", min_value=1))
    return checks


def _describe(result: Any, n_rows: int) -> str:
    cfg = result.expectation_config
    column = cfg.kwargs.get("column", "")
    shown_kwargs = [
        f"{k}={int(v) if isinstance(v, float) and v.is_integer() and k != 'mostly' else v}"
        for k in ("regex", "min_value", "max_value", "mostly")
        if (v := cfg.kwargs.get(k)) is not None
    ]
    args = ", ".join([column, *shown_kwargs])
    res = result.result or {}
    if result.exception_info and result.exception_info.get("raised_exception"):
        return f"{cfg.type}({args}): raised {result.exception_info.get('exception_message')}"
    count = res.get("unexpected_count", 0)
    sample = [
        v for v in res.get("partial_unexpected_list") or [] if v is not None and v == v
    ]  # drop null/NaN
    shown = ", ".join(repr(v) for v in sample[:3])
    return f"{cfg.type}({args}): {count} of {n_rows} rows unexpected" + (f" (e.g. {shown})" if shown else "")


def validate(frame: Any, cfg: PrepareSection) -> tuple[bool, dict[str, Any], list[str]]:
    """Run the suite on ``frame``; return (success, the GX result as JSON, one line per failure)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        context.data_sources.add_pandas("prepare")
        .add_dataframe_asset("train")
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": frame})
    )
    suite = context.suites.add(gx.ExpectationSuite(name="prepare", expectations=_suite(cfg)))
    result = batch.validate(suite)
    failures = [_describe(r, len(frame)) for r in result.results if not r.success]
    return bool(result.success), _stable(result.to_json_dict()), failures


def _stable(report: dict[str, Any]) -> dict[str, Any]:
    """The GX result without what differs between runs on the same data (load time, random
    expectation ids), so ``validation.json`` depends only on the data and the suite."""
    report.get("meta", {}).get("batch_markers", {}).pop("ge_load_time", None)
    for result in report.get("results", []):
        result.get("expectation_config", {}).pop("id", None)
    return report
