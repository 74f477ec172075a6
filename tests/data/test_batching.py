"""Batches: padding, determinism by seed, exact resume, packing, held-out split."""

import pytest
import torch

from fastmedusa.data import IGNORE_INDEX, ConversationBatches, pack_rows, train_eval_split


def fake_encoded(n: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Conversations of varied lengths; each token id is unique so rows can be traced back."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 20, (n,), generator=g).tolist()
    out, next_id = [], 1
    for length in lengths:
        ids = list(range(next_id, next_id + length))
        next_id += length
        labels = [
            t if k >= length // 2 else IGNORE_INDEX for k, t in enumerate(ids)
        ]  # second half "assistant"
        out.append({"input_ids": ids, "labels": labels})
    return out


def rows_of(batch) -> list[list[int]]:
    return [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]


def test_padding_to_batch_max_and_to_fixed_length():
    data = fake_encoded(10)
    batch = next(iter(ConversationBatches(data, batch_size=4, seed=1)))
    longest = max(len(r) for r in rows_of(batch))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (4, longest)
    assert all(t.dtype == torch.long for t in batch.values())
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    fixed = next(iter(ConversationBatches(data, batch_size=4, seq_len=32, seed=1)))
    assert fixed["input_ids"].shape == (4, 32)
    assert torch.equal(fixed["input_ids"][:, :longest], batch["input_ids"])


def test_one_epoch_sees_every_conversation_once_and_seed_decides_order():
    data = fake_encoded(11)
    epoch = [r for b in ConversationBatches(data, batch_size=3, seed=5) for r in rows_of(b)]
    assert sorted(epoch) == sorted(d["input_ids"] for d in data)
    same = [r for b in ConversationBatches(data, batch_size=3, seed=5) for r in rows_of(b)]
    other = [r for b in ConversationBatches(data, batch_size=3, seed=6) for r in rows_of(b)]
    assert epoch == same and epoch != other


def test_epochs_reshuffle_and_drop_last():
    data = fake_encoded(10)
    loader = ConversationBatches(data, batch_size=4, seed=0, drop_last=True)
    assert len(loader) == 2
    first = [rows_of(b) for b in loader]
    second = [rows_of(b) for b in loader]
    assert loader.epoch == 2 and len(first) == len(second) == 2
    assert first != second
    with pytest.raises(ValueError, match="only 10 training conversation.*too few for one batch of 20.*--eval-size"):
        ConversationBatches(data, batch_size=20, drop_last=True)


@pytest.mark.parametrize("pack", [False, True])
def test_resume_continues_with_exactly_the_next_batch(pack):
    data = fake_encoded(25)
    make = lambda: ConversationBatches(data, batch_size=3, seq_len=24, seed=7, pack=pack)
    reference = [b for _, b in zip(range(20), make().forever())]  # crosses epoch boundaries
    for stop in (1, 4, len(make()), 13):
        run = make()
        stream = run.forever()
        for _ in range(stop):
            next(stream)
        state = run.state_dict()  # taken while the stream is suspended, as a trainer would checkpoint
        resumed = make()
        resumed.load_state_dict(state)
        rest = [b for _, b in zip(range(20 - stop), resumed.forever())]
        for got, want in zip(rest, reference[stop:], strict=True):
            assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="seed: saved 7, now 8"):
        ConversationBatches(data, batch_size=3, seq_len=24, seed=8, pack=pack).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size: saved 3, now 4"):
        ConversationBatches(data, batch_size=4, seq_len=24, seed=7, pack=pack).load_state_dict(state)


def test_packing_keeps_every_conversation_and_its_labels():
    data = fake_encoded(30)
    loader = ConversationBatches(data, batch_size=4, seq_len=40, seed=3, pack=True)
    seen_ids, seen_labels = [], []
    for batch in loader:
        assert batch["input_ids"].shape[1] == 40
        seen_ids += batch["input_ids"][batch["attention_mask"].bool()].tolist()
        seen_labels += batch["labels"][batch["attention_mask"].bool()].tolist()
    assert sorted(seen_ids) == sorted(t for d in data for t in d["input_ids"])  # none lost or split off
    label_of = {t: lab for d in data for t, lab in zip(d["input_ids"], d["labels"])}
    assert seen_labels == [label_of[t] for t in seen_ids]
    assert len(loader) * 4 < len(data)  # rows really hold several conversations


def test_pack_rows_respects_the_row_length():
    data = fake_encoded(50)
    rows = pack_rows(data, range(len(data)), 33)
    assert sorted(i for row in rows for i in row) == list(range(50))
    assert all(sum(len(data[i]["input_ids"]) for i in row) <= 33 for row in rows)
    with pytest.raises(ValueError, match="pack=True needs seq_len"):
        ConversationBatches(data, batch_size=2, pack=True)


def test_train_eval_split():
    items = list(range(100))
    train, held_out = train_eval_split(items, 10, seed=1)
    assert len(held_out) == 10 and sorted(train + held_out) == items
    assert train_eval_split(items, 10, seed=1) == (train, held_out)
    assert train_eval_split(items, 10, seed=2)[1] != held_out
    assert len(train_eval_split(items, 0.25, seed=1)[1]) == 25
    for bad in (0, 100, 1.5, 0.0):
        with pytest.raises(ValueError, match="--eval-size"):
            train_eval_split(items, bad)


def test_no_conversation_left_points_at_the_sequence_length():
    import pytest

    from fastmedusa.data.batching import ConversationBatches

    with pytest.raises(ValueError, match="no conversation is left to train on.*raise --seq-len"):
        ConversationBatches([], batch_size=2, seq_len=32)
