"""Deterministic data order: which samples each optimiser step sees, and which slice of them
each process and micro-batch takes.

An epoch draws ``weight x rows`` rows from every source (whole copies, plus a fresh random part
for the fraction), groups them by kind — (parameter group, has image), since a batch is all one
kind — shuffles each kind, cuts it into global batches, and shuffles the order of the steps. All
of it is a function of (seed, epoch, global batch size) only, so the data position is just the
step number, and runs with any process count x accumulation of the same global batch see the
same samples.
"""

from __future__ import annotations

import hashlib
import json
from typing import Iterator

import numpy as np
import torch

from .data import Source

Kind = tuple[str, bool]
Key = tuple[int, int, int, int]  # (source, row, epoch, position in the epoch)


def _draw_count(n: int, weight: float) -> int:
    whole = int(weight)
    return whole * n + round((weight - whole) * n)


def _draw(rows: np.ndarray, weight: float, g: torch.Generator) -> np.ndarray:
    whole = int(weight)
    extra = round((weight - whole) * len(rows))
    part = rows[torch.randperm(len(rows), generator=g).numpy()[:extra]] if extra else rows[:0]
    return np.concatenate([np.tile(rows, whole), part])


class DataPlan:
    """The global step sequence: ``step(epoch, i)`` → (kind, keys of the ``global_batch`` samples)."""

    def __init__(self, sources: list[Source], global_batch: int, seed: int) -> None:
        self.sources, self.global_batch, self.seed = sources, global_batch, seed
        self.strata = [
            (i, has_image, np.flatnonzero(s.has_image == has_image))
            for i, s in enumerate(sources)
            for has_image in (False, True)
        ]
        self.strata = [(i, h, rows) for i, h, rows in self.strata if len(rows) and sources[i].weight > 0]
        per_kind: dict[Kind, int] = {}
        for i, has_image, rows in self.strata:
            kind = (sources[i].group, has_image)
            per_kind[kind] = per_kind.get(kind, 0) + _draw_count(len(rows), sources[i].weight)
        self.samples_per_kind = per_kind
        self.steps_per_epoch = sum(n // global_batch for n in per_kind.values())
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"No full global batch of {global_batch} samples in the data ({per_kind}): "
                "lower data.batch_size or optim.grad_accum, or add data"
            )
        self._epoch: int | None = None
        self._steps: list[tuple[Kind, np.ndarray, np.ndarray]] = []

    @property
    def dropped_per_epoch(self) -> int:
        """Samples left over per epoch (an incomplete global batch of a kind is dropped)."""
        return sum(n % self.global_batch for n in self.samples_per_kind.values())

    def fingerprint(self) -> str:
        """Identifies the data order; a resume with another one would not continue the same run."""
        desc = [self.seed, self.global_batch] + [[s.name, len(s), s.weight, s.group] for s in self.sources]
        return hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:16]

    def _build(self, epoch: int) -> None:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence((self.seed, epoch)).generate_state(1)[0]))
        pools: dict[Kind, list[tuple[np.ndarray, np.ndarray]]] = {}
        for i, has_image, rows in self.strata:
            drawn = _draw(rows, self.sources[i].weight, g)
            pools.setdefault((self.sources[i].group, has_image), []).append((np.full(len(drawn), i), drawn))
        steps = []
        for kind in sorted(pools):
            src = np.concatenate([p[0] for p in pools[kind]])
            row = np.concatenate([p[1] for p in pools[kind]])
            perm = torch.randperm(len(src), generator=g).numpy()
            src, row = src[perm], row[perm]
            for k in range(len(src) // self.global_batch):
                sl = slice(k * self.global_batch, (k + 1) * self.global_batch)
                steps.append((kind, src[sl], row[sl]))
        order = torch.randperm(len(steps), generator=g).tolist()
        self._steps = [steps[j] for j in order]
        self._epoch = epoch

    def step(self, epoch: int, index: int) -> tuple[Kind, list[Key]]:
        if self._epoch != epoch:
            self._build(epoch)
        kind, src, row = self._steps[index]
        base = index * self.global_batch
        return kind, [(int(s), int(r), epoch, base + j) for j, (s, r) in enumerate(zip(src, row))]


class StepBatches(torch.utils.data.Sampler):
    """Batch sampler of one process: for each step in ``[start, stop)``, its ``accum``
    micro-batches. Micro-batch ``a`` of rank ``r`` is slice ``a * world + r`` of the step."""

    def __init__(self, plan: DataPlan, start: int, stop: int, *, rank: int, world: int, accum: int, batch: int) -> None:
        self.plan, self.start, self.stop = plan, start, stop
        self.rank, self.world, self.accum, self.batch = rank, world, accum, batch

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.accum

    def __iter__(self) -> Iterator[list[Key]]:
        for step in range(self.start, self.stop):
            epoch, index = divmod(step, self.plan.steps_per_epoch)
            _, keys = self.plan.step(epoch, index)
            for a in range(self.accum):
                lo = (a * self.world + self.rank) * self.batch
                yield keys[lo : lo + self.batch]
