"""The demo's task: two-number addition, with a ground-truth reward a program checks.

Prompt "17+5=", correct response "22". reward(prompt, response) = 1.0 when the response is exactly the sum,
else 0.0 (a wrong number, extra text or a missing answer all score 0).

The data deliberately contain a sloppy teacher, so that there is something for RL to fix:
  * pretraining corpus: documents of correct facts "a+b=c" (the model's "world knowledge"),
  * SFT data: chat turns where the teacher answers correctly only with probability `sft_accuracy`, and is off
    by a small amount otherwise; a model that imitates it samples wrong answers about that often,
  * preference pairs: (correct answer, a wrong one) for the same prompts: what a reward model learns from,
  * held-out prompts: (a, b) combinations used by no alignment stage, for the true-score evaluation.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

_PROMPT = re.compile(r"^\s*(\d+)\+(\d+)\s*=?\s*$")


@dataclass
class AdditionTask:
    max_operand: int = 20  # operands in [0, max_operand)
    sft_accuracy: float = 0.5  # the teacher's share of correct SFT answers
    heldout_fraction: float = 0.2
    seed: int = 0

    def all_prompts(self) -> list[tuple[int, int]]:
        return [(a, b) for a in range(self.max_operand) for b in range(self.max_operand)]

    def split(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(train, held-out) operand pairs: a seeded split of every combination."""
        pairs = self.all_prompts()
        random.Random(self.seed).shuffle(pairs)
        n_held = max(1, int(len(pairs) * self.heldout_fraction))
        return sorted(pairs[n_held:]), sorted(pairs[:n_held])

    @staticmethod
    def prompt(a: int, b: int) -> str:
        return f"{a}+{b}="  # the pretraining corpus's own surface form, so its knowledge transfers

    @staticmethod
    def answer(a: int, b: int) -> str:
        return str(a + b)

    def wrong_answer(self, a: int, b: int, rng: random.Random) -> str:
        """A plausible mistake: off by 1, 2 or 10 (carry errors), never negative, never the sum."""
        while True:
            wrong = a + b + rng.choice([-10, -2, -1, 1, 2, 10])
            if wrong >= 0:
                return str(wrong)

    # ---- the ground truth ----
    @staticmethod
    def reward(prompt: str, response: str) -> float:
        m = _PROMPT.match(prompt)
        if m is None:
            raise ValueError(f"not an addition prompt: {prompt!r}")
        return 1.0 if response.strip() == str(int(m.group(1)) + int(m.group(2))) else 0.0

    # ---- data ----
    def corpus(self, n_docs: int, facts_per_doc: int = 40) -> list[str]:
        """Pretraining documents: lines of correct facts in random order (every combination appears)."""
        rng = random.Random(self.seed + 1)
        pairs = self.all_prompts()
        docs = []
        for i in range(n_docs):
            lines = [f"{a}+{b}={a + b}" for a, b in (rng.choice(pairs) for _ in range(facts_per_doc))]
            docs.append(f"# sums {i}\n" + "\n".join(lines) + "\n")
        return docs

    def sft_records(self, prompts, copies: int = 4) -> list[dict]:
        rng = random.Random(self.seed + 2)
        out = []
        for _ in range(copies):
            for a, b in prompts:
                good = rng.random() < self.sft_accuracy
                out.append({"prompt": self.prompt(a, b),
                            "response": self.answer(a, b) if good else self.wrong_answer(a, b, rng)})
        return out

    def preference_records(self, prompts, copies: int = 4) -> list[dict]:
        rng = random.Random(self.seed + 3)
        return [{"prompt": self.prompt(a, b), "chosen": self.answer(a, b), "rejected": self.wrong_answer(a, b, rng)}
                for _ in range(copies) for a, b in prompts]

    def prompt_records(self, prompts) -> list[dict]:
        return [{"prompt": self.prompt(a, b)} for a, b in prompts]
