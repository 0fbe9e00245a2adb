"""The demo's task: two-number addition, answered with the number alone; a program checks the reward.

Prompt "17+5=", correct response "22". reward(prompt, response) = 1.0 when the response is exactly the sum
(surrounding whitespace aside), else 0.0: a wrong number, a missing answer or extra text all score 0.

The data deliberately contain a sloppy teacher, so that there is something for RL to fix. The teacher makes two
kinds of mistakes, independently:
  * arithmetic: the number is off by 1, 2 or 10 (carry errors) with probability 1 - `sft_accuracy`;
  * verbosity: with probability `sft_verbose` it goes on after the number with another fact ("22\\n3+4=7"),
    which the ground truth counts as wrong (the instruction is "the number alone").
So the teacher is fully right only sft_accuracy * (1 - sft_verbose) of the time, and a model that imitates it
samples wrong answers about as often. The verbosity mistake is a surface property that a reward model can learn
on some prompts and recognise on any other; the arithmetic mistake needs the sum, which a tiny reward model
mostly memorises per prompt. The report gives the reward model's held-out accuracy on both kinds.

  * pretraining corpus: documents of correct facts "a+b=c" (the model's "world knowledge"),
  * SFT data: chat turns from the sloppy teacher,
  * preference pairs: (correct answer, a mistaken one) for the same prompts, mistakes of both kinds,
  * held-out prompts: (a, b) combinations used by no alignment stage, for the true-score evaluation.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

_PROMPT = re.compile(r"^\s*(\d+)\+(\d+)\s*=?\s*$")

MISTAKES = ("arithmetic", "verbose", "both")


@dataclass
class AdditionTask:
    max_operand: int = 20  # operands in [0, max_operand)
    sft_accuracy: float = 0.6  # share of teacher answers with the right number
    sft_verbose: float = 0.4  # share of teacher answers that go on after the number
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

    @property
    def teacher_score(self) -> float:
        """The teacher's expected true score."""
        return self.sft_accuracy * (1.0 - self.sft_verbose)

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

    def ramble(self, number: str, rng: random.Random) -> str:
        """The verbose mistake: the number, then another fact, as the pretraining documents go on."""
        x, y = rng.randrange(self.max_operand), rng.randrange(self.max_operand)
        return f"{number}\n{x}+{y}={x + y}"

    def mistake(self, a: int, b: int, kind: str, rng: random.Random) -> str:
        if kind not in MISTAKES:
            raise ValueError(f"mistake kind must be one of {MISTAKES}, got {kind!r}")
        number = self.wrong_answer(a, b, rng) if kind in ("arithmetic", "both") else self.answer(a, b)
        return self.ramble(number, rng) if kind in ("verbose", "both") else number

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

    def teacher_response(self, a: int, b: int, rng: random.Random) -> str:
        number = self.answer(a, b) if rng.random() < self.sft_accuracy else self.wrong_answer(a, b, rng)
        return self.ramble(number, rng) if rng.random() < self.sft_verbose else number

    def sft_records(self, prompts, copies: int = 4) -> list[dict]:
        rng = random.Random(self.seed + 2)
        return [{"prompt": self.prompt(a, b), "response": self.teacher_response(a, b, rng)}
                for _ in range(copies) for a, b in prompts]

    def preference_records(self, prompts, copies: int = 4, kinds=MISTAKES, seed_offset: int = 3) -> list[dict]:
        """(correct answer, a mistake) pairs; the mistakes cycle through `kinds` (recorded in each line's "kind")."""
        rng = random.Random(self.seed + seed_offset)
        out = []
        for c in range(copies):
            for i, (a, b) in enumerate(prompts):
                kind = kinds[(c + i) % len(kinds)]
                out.append({"prompt": self.prompt(a, b), "chosen": self.answer(a, b),
                            "rejected": self.mistake(a, b, kind, rng), "kind": kind})
        return out

    def prompt_records(self, prompts) -> list[dict]:
        return [{"prompt": self.prompt(a, b)} for a, b in prompts]
