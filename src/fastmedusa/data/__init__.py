"""Conversations to training batches: ShareGPT reading, chat-template label masking, padding/packing.

Nothing here touches the GPU: batches are CPU LongTensors that the trainer moves.
"""

from fastmedusa.data.batching import ConversationBatches, pack_rows, pad_rows, train_eval_split
from fastmedusa.data.chat import (
    IGNORE_INDEX,
    EncodedDataset,
    EncodeStats,
    encode_conversation,
    encode_dataset,
    generation_prompt,
    render_with_spans,
)
from fastmedusa.data.sharegpt import (
    Conversations,
    ReadStats,
    default_data_path,
    iter_sharegpt,
    normalize_record,
    read_sharegpt,
    resolve_data_path,
)

__all__ = [
    "IGNORE_INDEX",
    "ConversationBatches",
    "Conversations",
    "EncodeStats",
    "EncodedDataset",
    "ReadStats",
    "default_data_path",
    "encode_conversation",
    "encode_dataset",
    "generation_prompt",
    "iter_sharegpt",
    "normalize_record",
    "pack_rows",
    "pad_rows",
    "read_sharegpt",
    "render_with_spans",
    "resolve_data_path",
    "train_eval_split",
]
