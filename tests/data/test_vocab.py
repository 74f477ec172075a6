"""The draft vocabulary's counting: labelled positions only, most frequent first, canonical ties, bad ids."""

import pytest
import torch

from fastmedusa.data.vocab import count_label_tokens, draft_token_map, label_token_map


def test_counts_only_labelled_positions_and_picks_the_most_frequent():
    examples = [
        {"input_ids": [9, 9, 9, 9], "labels": [-100, 3, 3, 5]},
        [7, 3, -100, 5, 1],
        torch.tensor([[2, -100], [7, 7]]),
    ]
    counts = count_label_tokens(examples, 10)
    assert counts.tolist() == [0, 1, 1, 3, 0, 2, 0, 3, 0, 0]  # 9 appears only unlabelled
    assert draft_token_map(counts, 2).tolist() == [3, 7]  # sorted by id
    assert draft_token_map(counts, 3).tolist() == [3, 5, 7]
    assert draft_token_map(counts, 4).tolist() == [1, 3, 5, 7]  # tie 1 vs 2: the smaller id
    assert draft_token_map(counts, 8).tolist() == list(range(8))  # unseen ids fill up, smallest first
    token_map, coverage = label_token_map(examples, 10, 3)
    assert token_map.tolist() == [3, 5, 7] and coverage == pytest.approx(8 / 10)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="label id 12 is outside the vocabulary"):
        count_label_tokens([[1, 12]], 10)
    with pytest.raises(ValueError, match="draft_vocab_size=11 is more than the model's 10 tokens"):
        draft_token_map(torch.zeros(10, dtype=torch.long), 11)
