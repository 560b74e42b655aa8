"""s1-style generation for lm-eval models: the training chat format, a thinking budget, "Wait".

A request's context is the bare user turn. Each question is generated in phases, as s1 evaluates:

1. thinking: the chat prompt plus ``<|im_start|>think\\n``, stopped at the model's next
   ``<|im_start|>`` (where it would open the answer) or at the thinking budget;
2. "Wait" extensions (``wait_extensions`` times): a thinking phase that stopped on its own before the
   budget gets ``wait_text`` appended and continues with what is left of the budget;
3. answer: ``\\n<|im_start|>answer\\n`` is appended and the answer generated up to ``<|im_end|>``.

With ``thinking_tokens`` unset there is no forcing: thinking may use all of ``max_gen_toks`` and a
question that runs out of tokens while thinking gets no answer phase (as with plain generation).
With it set, thinking is capped and the answer is forced (s1's budget forcing).

The mixin works over any lm-eval LM whose ``generate_until`` takes ``(context, gen_kwargs)`` requests
(HFLM, VLLM): each phase is one batched call of the parent's ``generate_until``. Requests go
through all phases in chunks, and each finished question is handed to lm-eval's request cache, so
a killed run resumes after the last finished chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

THINK = "<|im_start|>think\n"
ANSWER = "\n<|im_start|>answer\n"
THINK_STOPS = ["<|im_start|>", "<|im_end|>"]
ANSWER_STOPS = ["<|im_end|>"]


@dataclass(frozen=True)
class Budget:
    """How one question is generated (from the ``evaluate`` params)."""

    max_gen_toks: int
    thinking_tokens: int | None
    answer_tokens: int
    wait_extensions: int
    wait_text: str
    chunk_size: int


@dataclass
class _Question:
    prompt: str
    thinking: str = ""
    used: int = 0
    stopped_early: bool = False
    answer: str | None = None

    @property
    def output(self) -> str:
        text = THINK + self.thinking
        return text if self.answer is None else text.rstrip("\n") + ANSWER + self.answer


class BudgetForcing:
    """Mixin for an lm-eval LM: see the module docstring. Set ``budget`` before use."""

    budget: Budget
    generated_requests: int = 0

    def chat_prompt(self, user: str) -> str:
        """The user turn through the tokenizer's chat template, as in training (system turn included)."""
        tok = self.tokenizer  # type: ignore[attr-defined]
        messages = [{"role": "user", "content": user}]
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + THINK

    def _phase(self, prompts: list[str], max_tokens: list[int], stops: list[str]) -> list[str]:
        from lm_eval.api.instance import Instance
        from lm_eval.api.model import CacheHook

        requests = [
            Instance(
                request_type="generate_until",
                doc={},
                arguments=(p, {"until": stops, "max_gen_toks": n, "do_sample": False, "temperature": 0.0}),
                idx=0,
            )
            for p, n in zip(prompts, max_tokens, strict=True)
        ]
        # phase prompts are not the requests lm-eval asked for: keep them out of its cache
        hook, self.cache_hook = self.cache_hook, CacheHook(None)  # type: ignore[has-type]
        try:
            return super().generate_until(requests, disable_tqdm=True)  # type: ignore[misc]
        finally:
            self.cache_hook = hook

    def _count(self, text: str) -> int:
        return len(self.tok_encode(text))  # type: ignore[attr-defined]

    def _think(self, questions: list[_Question], budget: int) -> None:
        """One thinking phase for ``questions``, each continuing from what it has."""
        todo = [q for q in questions if budget - q.used > 0]
        if not todo:
            return
        texts = self._phase(
            [q.prompt + q.thinking for q in todo], [budget - q.used for q in todo], THINK_STOPS
        )
        for q, text in zip(todo, texts, strict=True):
            n = self._count(text)
            q.thinking += text
            q.used += n
            q.stopped_early = q.used < budget

    def generate_questions(self, users: list[str]) -> list[str]:
        """The full s1-format assistant output for each user turn."""
        b = self.budget
        forced = b.thinking_tokens is not None
        budget = min(b.thinking_tokens or b.max_gen_toks, b.max_gen_toks)
        questions = [_Question(self.chat_prompt(u)) for u in users]
        self._think(questions, budget)
        for _ in range(b.wait_extensions):
            waiting = [q for q in questions if q.stopped_early]
            for q in waiting:  # s1: the text so far, then the wait text, and think on
                q.thinking += b.wait_text
            self._think(waiting, budget)
        # without forcing, a question that spent every token thinking has no answer phase
        answering = [q for q in questions if forced or q.stopped_early]
        limits = [b.answer_tokens if forced else max(b.max_gen_toks - q.used, 0) for q in answering]
        live = [(q, n) for q, n in zip(answering, limits, strict=True) if n > 0]
        if live:
            prompts = [q.prompt + q.thinking.rstrip("\n") + ANSWER for q, _ in live]
            answers = self._phase(prompts, [n for _, n in live], ANSWER_STOPS)
            for (q, _), text in zip(live, answers, strict=True):
                q.answer = text
        return [q.output for q in questions]

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from lorascope.progress import track

        outputs: list[str] = []
        size = self.budget.chunk_size
        chunks = [requests[i : i + size] for i in range(0, len(requests), size)]
        for chunk in track(chunks, description=f"generating {len(requests)} answers"):
            done = self.generate_questions([r.args[0] for r in chunk])
            for request, text in zip(chunk, done, strict=True):
                self.cache_hook.add_partial("generate_until", request.args, text)  # type: ignore[has-type]
            self.generated_requests += len(chunk)
            outputs.extend(done)
        return outputs
