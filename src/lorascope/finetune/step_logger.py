"""Per-step training metrics into the stage's MLflow run (rank 0 only)."""

from __future__ import annotations

import time
from typing import Any

from transformers import TrainerCallback


class MlflowStepLogger(TrainerCallback):
    """Logs loss, learning rate, grad norm and tokens per second at every Trainer log event.

    Tokens per second counts non-padding input tokens (Trainer's ``num_input_tokens_seen``) over
    the wall time since the previous log, across all processes.
    """

    def __init__(self) -> None:
        self._last: tuple[float, int] | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._last = (time.perf_counter(), state.num_input_tokens_seen)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        import mlflow

        metrics = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and k != "epoch"}
        now, seen = time.perf_counter(), state.num_input_tokens_seen
        if self._last is not None and now > self._last[0] and seen > self._last[1]:
            metrics["tokens_per_second"] = (seen - self._last[1]) / (now - self._last[0])
        self._last = (now, seen)
        if "epoch" in logs:
            metrics["epoch"] = float(logs["epoch"])
        mlflow.log_metrics(metrics, step=state.global_step)
