"""Padding-free packing and batch layout (pure Python; `collate` is the only torch user).

Samples are packed best-fit-decreasing into rows of at most max_len tokens. Each sample keeps its own
position ids (restarting at 0), and targets are shifted *within* the sample, so the last token of one
sample never learns to predict the first token of the next. Cross-sample attention is prevented by the
model seeing restarting position ids with no attention mask and use_cache=False (transformers then builds
a block-diagonal causal mask for SDPA, a document BlockMask for FlexAttention: model.training_attention;
tests/trainer/test_packing.py proves both).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Mapping, Sequence
from typing import Any

from .data import IGNORE, Example

Row = list[int]  # indices into the example list
# all examples, or one rank's shard of them by index (shards.py)
Examples = Sequence[Example] | Mapping[int, Example]
Batch = dict[str, Any]  # collate's tensors of one micro-batch


def pack_rows(lengths: Sequence[int], max_len: int) -> list[Row]:
    """Best-fit decreasing bin packing; deterministic for the same lengths."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[Row] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, row id)
    for i in order:
        n = lengths[i]
        if n > max_len:
            raise ValueError(f"example {i} has {n} tokens > max_len {max_len}")
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            cap, rid = free.pop(j)
            rows[rid].append(i)
            if cap - n > 0:
                bisect.insort(free, (cap - n, rid))
        else:
            rows.append([i])
            if max_len - n > 0:
                bisect.insort(free, (max_len - n, len(rows) - 1))
    return rows


def single_rows(n: int) -> list[Row]:
    return [[i] for i in range(n)]


def epoch_order(rows: list[Row], seed: int, epoch: int) -> list[Row]:
    """Rows in this epoch's order: a seeded shuffle, the same on every rank and every restart."""
    out = list(rows)
    random.Random(seed * 1_000_003 + epoch).shuffle(out)
    return out


def step_layout(step_rows: list[Row], lengths: Sequence[int], micro: int, world: int) -> list[list[Row]]:
    """Split one optimizer step's rows into micro-batches: result[rank * accum + m] -> rows.

    Rows are sorted by token count so each micro-batch holds similar lengths (little padding).
    """
    ordered = sorted(step_rows, key=lambda r: -sum(lengths[i] for i in r))
    chunks = [ordered[k : k + micro] for k in range(0, len(ordered), micro)]
    accum = len(chunks) // world
    # chunk c goes to rank c % world, micro-step c // world: every rank gets a similar mix of lengths
    return [chunks[m * world + r] for r in range(world) for m in range(accum)]


def micro_batches_for(
    rank: int, world: int, start: int, ordered_rows: list[Row], lengths: Sequence[int], micro: int, accum: int
) -> list[list[Row]]:
    """This rank's micro-batches of the step that begins at row `start` of the epoch's order: the step takes
    the next global batch of rows whatever the world size, so a resize changes only who trains which row."""
    g = micro * accum * world
    step_rows = ordered_rows[start : start + g]
    layout = step_layout(step_rows, lengths, micro, world)
    return layout[rank * accum : (rank + 1) * accum]


def row_arrays(row: Row, examples: Examples) -> tuple[list[int], list[int], list[int]]:
    """input ids, per-sample shifted targets, restarting position ids for one packed row."""
    ids: list[int] = []
    tgt: list[int] = []
    pos: list[int] = []
    for i in row:
        ex = examples[i]
        ids += ex.input_ids
        tgt += [*ex.labels[1:], IGNORE]
        pos += list(range(len(ex.input_ids)))
    return ids, tgt, pos


def collate(rows: list[Row], examples: Examples, pad_id: int) -> Batch:
    """Tensors for one micro-batch. Padding is its own 'sample' (positions restart, targets ignored)."""
    import torch

    arrays = [row_arrays(r, examples) for r in rows]
    width = max(len(a[0]) for a in arrays)
    ids_t = torch.full((len(rows), width), pad_id, dtype=torch.long)
    tgt_t = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos_t = torch.zeros((len(rows), width), dtype=torch.long)
    for b, (ids, tgt, pos) in enumerate(arrays):
        n = len(ids)
        ids_t[b, :n] = torch.tensor(ids)
        tgt_t[b, :n] = torch.tensor(tgt)
        pos_t[b, :n] = torch.tensor(pos)
        pos_t[b, n:] = torch.arange(width - n)
    real = sum(len(a[0]) for a in arrays)
    # flat positions that carry a label, known here on the host (loss.selective_ce_sum: no device sync)
    label_pos = (tgt_t.flatten() != IGNORE).nonzero().flatten()
    return {
        "input_ids": ids_t,
        "targets": tgt_t,
        "position_ids": pos_t,
        "label_pos": label_pos,
        "real_tokens": real,
    }


def step_counts(mbs: list[list[Row]], examples: Examples) -> tuple[int, int]:
    """(labelled positions, real tokens) of micro-batches without collating them: what `collate` would count.
    The first target of a sample is its second label (targets are shifted within the sample)."""
    labels = tokens = 0
    for mb in mbs:
        for row in mb:
            for i in row:
                ex = examples[i]
                labels += sum(1 for x in ex.labels[1:] if x != IGNORE)
                tokens += len(ex.input_ids)
    return labels, tokens
