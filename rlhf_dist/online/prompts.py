"""Which prompts an iteration takes, and the ids of the samples made from them."""

from __future__ import annotations

import random


def sample_ids_for(prompt_ids: list[int], n: int) -> list[int]:
    """Sample j of prompt p gets id p * n + j: the group (and the prompt) of a sample is its id // n, through
    experience, learner, metrics and checkpoints."""
    return [p * n + j for p in prompt_ids for j in range(n)]


class PromptSampler:
    """Seeded passes over the prompt set; the cursor (prompts consumed) is all the state there is."""

    def __init__(self, n: int, seed: int, cursor: int = 0):
        self.n, self.seed, self.cursor = n, seed, cursor
        self._epoch, self._order = -1, []  # one pass's order, made once (a million prompts take ~1 s to shuffle)

    def order(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            self._order = list(range(self.n))
            random.Random(self.seed + epoch).shuffle(self._order)
            self._epoch = epoch
        return self._order

    def next(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            epoch, pos = divmod(self.cursor, self.n)
            order = self.order(epoch)
            take = min(k - len(out), self.n - pos)
            out.extend(order[pos:pos + take])
            self.cursor += take
        return out
