"""Batches of encoded conversations: seeded shuffling, padding or packing, held-out split, resumable position.

The order of epoch e is a permutation drawn from (seed, e) alone, so a loader rebuilt from
`state_dict()` (epoch, batches already yielded in it, seed) yields exactly the batches that an
uninterrupted run would have yielded next.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch

from fastmedusa.data.chat import IGNORE_INDEX

T = TypeVar("T")
Encoded = dict[str, list[int]]
Batch = dict[str, torch.Tensor]
PACK_LOOKBACK = 16


def train_eval_split(items: Sequence[T], n_eval: int | float, seed: int = 0) -> tuple[list[T], list[T]]:
    """Split off a held-out set: `n_eval` items (an int) or that fraction of them (a float in (0, 1)).

    The split depends only on `seed` and the number of items, so train and eval never overlap across runs.
    """
    count = round(n_eval * len(items)) if isinstance(n_eval, float) else n_eval
    if isinstance(n_eval, float) and not 0.0 < n_eval < 1.0:
        raise ValueError(f"eval size {n_eval} (--eval-size): a fraction must lie in (0, 1); pass an int for a count")
    if not isinstance(count, int) or not 1 <= count < len(items):
        raise ValueError(
            f"eval size {n_eval} (--eval-size) gives {count} held-out items out of {len(items)}: "
            "leave at least one item on each side (pass fewer eval items or more data)"
        )
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    eval_ids = set(order[:count])
    train = [x for i, x in enumerate(items) if i not in eval_ids]
    held_out = [items[i] for i in sorted(eval_ids)]
    return train, held_out


def pad_rows(rows: Sequence[Encoded], length: int, pad_id: int = 0) -> Batch:
    """Right-pad rows (truncating longer ones) into LongTensors (B, length); pads get mask 0, label -100."""
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for r, row in enumerate(rows):
        n = min(len(row["input_ids"]), length)
        input_ids[r, :n] = torch.tensor(row["input_ids"][:n])
        labels[r, :n] = torch.tensor(row["labels"][:n])
        attention_mask[r, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pack_rows(encoded: Sequence[Encoded], order: Sequence[int], seq_len: int) -> list[list[int]]:
    """Group conversations (in `order`) into rows of at most `seq_len` tokens, never splitting one.

    First fit among the last `PACK_LOOKBACK` open rows: nearly as tight as full first fit, and linear
    in the number of conversations. One longer than `seq_len` gets its own row and `pad_rows` truncates it.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = min(len(encoded[i]["input_ids"]), seq_len)
        for r in range(max(0, len(rows) - PACK_LOOKBACK), len(rows)):
            if n <= room[r]:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(seq_len - n)
    return rows


def concat_rows(encoded: Sequence[Encoded], members: Sequence[int]) -> Encoded:
    """One packed row: the conversations' ids and labels end to end, each keeping its own labels."""
    return {
        "input_ids": [t for i in members for t in encoded[i]["input_ids"]],
        "labels": [t for i in members for t in encoded[i]["labels"]],
    }


class ConversationBatches:
    """Resumable, seeded batches of `{"input_ids", "attention_mask", "labels"}` LongTensors (B, L).

    `iter(loader)` yields the rest of the current epoch and then moves to the next, so
    `while step < max_steps: for batch in loader: ...` runs across epochs; `forever()` does the same
    as one iterator. L is the batch's longest row, or `seq_len` when given (fixed shapes).

    `pack=True` fills rows of `seq_len` tokens with whole conversations (first fit, in shuffled order).
    Attention then crosses conversation boundaries inside a row (plain causal mask, positions run on):
    cheap, and each conversation's labels are kept exactly; only its context gains the earlier ones.
    Positions near a boundary whose shifted targets (t+1 for the LM, t+k+1 for head k) fall in the next
    conversation mostly hit its system/user header, which is -100, so few cross-boundary targets train.
    """

    def __init__(
        self,
        encoded: Sequence[Encoded],
        batch_size: int,
        seq_len: int | None = None,
        seed: int = 0,
        pack: bool = False,
        drop_last: bool = False,
        pad_id: int = 0,
        shuffle: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: pass a positive number of rows per batch")
        if seq_len is not None and seq_len < 2:
            raise ValueError(f"seq_len={seq_len}: pass at least 2 (a token and the one it predicts)")
        if pack and seq_len is None:
            raise ValueError("pack=True needs seq_len: the length of the rows to fill")
        self.encoded = encoded
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.pack = pack
        self.drop_last = drop_last
        self.pad_id = pad_id
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0  # batches of `epoch` already yielded
        self._plan_cache: tuple[int, list[list[list[int]]]] | None = None
        if len(encoded) == 0:
            raise ValueError(
                "no conversation is left to train on: each was dropped while encoding (cut off before its first "
                "assistant token, or rejected by the chat template): raise --seq-len, or check the data"
            )
        if len(self._plan(0)) == 0:
            raise ValueError(
                f"only {len(encoded)} training conversation(s) left after encoding, too few for one batch of "
                f"{batch_size}: pass more data (--data, --max-conversations), a smaller --eval-size (held-out "
                "conversations are not trained on) or a smaller --batch-size"
            )

    def _plan(self, epoch: int) -> list[list[list[int]]]:
        """Epoch `epoch` as batches of rows of conversation indices (one index per row unless packing)."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        order = list(range(len(self.encoded)))
        if self.shuffle:  # Python's string-seeded RNG: the same order on every platform and torch version
            random.Random(f"fastmedusa-data:{self.seed}:{epoch}").shuffle(order)
        rows = pack_rows(self.encoded, order, self.seq_len) if self.pack else [[i] for i in order]
        batches = [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        self._plan_cache = (epoch, batches)
        return batches

    def __len__(self) -> int:
        """Batches in the current epoch (with packing the count may differ slightly between epochs)."""
        return len(self._plan(self.epoch))

    def _collate(self, batch: list[list[int]]) -> Batch:
        rows = [concat_rows(self.encoded, members) for members in batch]
        length = self.seq_len or max(len(row["input_ids"]) for row in rows)
        return pad_rows(rows, length, self.pad_id)

    def __iter__(self) -> Iterator[Batch]:
        plan = self._plan(self.epoch)
        while self.index < len(plan):
            batch = plan[self.index]
            self.index += 1  # before yielding: a state_dict taken after this step resumes at the next batch
            yield self._collate(batch)
        self.epoch += 1
        self.index = 0

    def forever(self) -> Iterator[Batch]:
        """Batches across epochs without end, for `--max-steps` training."""
        while True:
            yield from self

    def state_dict(self) -> dict[str, int | bool | None]:
        """The position (epoch, batches yielded in it) and what must match for it to mean the same data."""
        return {"epoch": self.epoch, "index": self.index, **self._layout()}

    def _layout(self) -> dict[str, int | bool | None]:
        return {
            "seed": self.seed,
            "n_conversations": len(self.encoded),
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "pack": self.pack,
            "drop_last": self.drop_last,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, int | bool | None]) -> None:
        """Continue at the saved position; refuse a different data layout, whose order would differ."""
        changed = [
            f"{k}: saved {state[k]!r}, now {v!r}"
            for k, v in self._layout().items()
            if k in state and state[k] != v
        ]
        if changed:
            raise ValueError(
                f"the data position was saved for another data layout ({'; '.join(changed)}): "
                "resume with the same data, --seed, --batch-size, --seq-len and packing"
            )
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
