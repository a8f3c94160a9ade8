"""Model inputs from packed micro batches: causal LM (labels = inputs, document masking) and masked LM
(dynamic masking at batch time with transformers' ``DataCollatorForLanguageModeling``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pretrain.data import MicroBatch

IGNORE_INDEX = -100
"""Label value the loss skips (``torch.nn.CrossEntropyLoss`` default ``ignore_index``)."""


def document_position_ids(mb: MicroBatch, offset: int = 0) -> np.ndarray:
    """``(B, T)`` int64 positions that restart at ``offset`` at every document start of each packed sequence.

    ``offset`` is the first position of the model's absolute position embeddings (RoBERTa counts from
    ``pad_token_id + 1``; others from 0).
    """
    batch, seq_len = mb.input_ids.shape
    position_ids = np.tile(np.arange(seq_len, dtype=np.int64), (batch, 1))
    for row, starts in enumerate(mb.document_starts):
        for start in starts:
            if start > 0:
                position_ids[row, start:] -= position_ids[row, start]
    return position_ids + offset


def document_ids(mb: MicroBatch) -> np.ndarray:
    """``(B, T)`` int64: the index of the document each position belongs to; each padding position
    (``>= num_tokens``) gets its own negative id, so it attends only to itself (never a fully masked row)."""
    batch, seq_len = mb.input_ids.shape
    ids = np.zeros((batch, seq_len), dtype=np.int64)
    for row, starts in enumerate(mb.document_starts):
        for start in starts:
            if start > 0:
                ids[row, start:] += 1
    if mb.num_tokens is not None:
        pad = np.arange(seq_len)[None, :] >= mb.num_tokens[:, None]
        ids = np.where(pad, -1 - np.arange(seq_len)[None, :], ids)
    return ids


def block_diagonal_mask(doc_ids: np.ndarray, sliding_window: int | None = None) -> np.ndarray:
    """``(B, 1, T, T)`` bool attention mask (True = may attend) of bidirectional attention within each document.

    With ``sliding_window`` a position also attends only to positions at most that many tokens away, as
    transformers' ``sliding_window_bidirectional_overlay`` does (``|q - kv| <= sliding_window``).
    Memory: ``B * T * T`` bytes (8 MiB at B 8, T 1024).
    """
    mask = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]
    if sliding_window is not None:
        idx = np.arange(doc_ids.shape[1])
        mask &= (np.abs(idx[:, None] - idx[None, :]) <= sliding_window)[None, None]
    return mask


def causal_lm_inputs(mb: MicroBatch, document_masking: bool) -> dict[str, np.ndarray]:
    """Model inputs for a packed causal-LM micro batch: ``input_ids``, ``labels`` and, with
    ``document_masking``, ``position_ids``, all ``(B, T)`` int64.

    With document masking, positions restart at 0 at every document boundary; transformers turns
    such ``position_ids`` (with no attention mask and no cache) into a block-diagonal causal mask
    (``masking_utils.find_packed_sequence_indices``), so no token attends across a boundary, and the
    label of each document's first token is ``IGNORE_INDEX``, so the loss skips the transition from
    one document's EOS to the next document. Labels are the inputs; the model shifts them.
    """
    labels = mb.input_ids.copy()
    if mb.num_tokens is not None:  # tail padding (prep --tail pad): never a label
        labels[np.arange(labels.shape[1])[None, :] >= mb.num_tokens[:, None]] = IGNORE_INDEX
    out = {"input_ids": mb.input_ids, "labels": labels}
    if document_masking:
        for row, starts in enumerate(mb.document_starts):
            labels[row, [s for s in starts if s > 0]] = IGNORE_INDEX
        out["position_ids"] = document_position_ids(mb)
    return out


def word_start_table(tokenizer) -> np.ndarray:
    """``(V,)`` bool: token id begins a word. WordPiece marks continuations with its prefix (``##``);
    Metaspace (``▁``) and ByteLevel (``Ġ``) vocabularies mark word starts. Special tokens count as starts."""
    import json

    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    vocab = tokenizer.get_vocab()
    table = np.ones(len(tokenizer), dtype=bool)
    prefix = model.get("continuing_subword_prefix") if model.get("type") == "WordPiece" else None
    for token, idx in vocab.items():
        if idx >= len(table) or token in tokenizer.all_special_tokens:
            continue
        table[idx] = not token.startswith(prefix) if prefix else token.startswith(("\u2581", "\u0120"))
    return table


class MaskedLMInputs:
    """Dynamic MLM masking of packed sequences (BERT: Devlin et al. 2019, section 3.1).

    ``probability`` of the non-special tokens are selected; of those ``mask_replace_prob`` become
    the mask token, ``random_replace_prob`` a random token, the rest stay (80 / 10 / 10 by default).
    Special tokens ([CLS], [SEP], [PAD]) are never selected; unselected labels are ``IGNORE_INDEX``.
    With ``whole_word_mask`` every sub-token of a selected word is selected (word starts come from
    :func:`word_start_table`, turned into the offsets the collator expects). Masks come from the
    torch / numpy global RNG, which checkpoints save per rank, so a resumed run masks identically.
    Positions ``>= num_tokens`` (padding) get ``attention_mask`` 0 and no label.

    With ``document_masking`` (ModernBERT's packed, unpadded recipe; Warner et al. 2024) each token attends
    only within its document: ``attention_mask`` is the ``(B, 1, T, T)`` bool :func:`block_diagonal_mask`
    and ``position_ids`` restart at every document (from ``position_offset``). For a model with
    sliding-window layers (ModernBERT's local attention) ``attention_mask`` is transformers' per-layer-type
    mapping ``{"full_attention": ..., "sliding_attention": ...}``, the second also limited to
    ``sliding_window`` tokens, since a prepared 4D mask would otherwise replace the window.
    """

    def __init__(self, tokenizer_dir: str, probability: float = 0.15, mask_replace_prob: float = 0.8,
                 random_replace_prob: float = 0.1, whole_word_mask: bool = False, document_masking: bool = False,
                 position_offset: int = 0, sliding_window: int | None = None):
        from transformers import AutoTokenizer, DataCollatorForLanguageModeling

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.collator = DataCollatorForLanguageModeling(
            self.tokenizer, mlm=True, mlm_probability=probability, mask_replace_prob=mask_replace_prob,
            random_replace_prob=random_replace_prob, whole_word_mask=whole_word_mask, return_tensors="np")
        self.word_starts = word_start_table(self.tokenizer) if whole_word_mask else None
        self.document_masking, self.position_offset, self.sliding_window = document_masking, position_offset, sliding_window

    def _offsets(self, input_ids: np.ndarray) -> np.ndarray:
        assert self.word_starts is not None  # built with whole_word_mask
        starts = self.word_starts[np.clip(input_ids, 0, len(self.word_starts) - 1)]
        begin = np.cumsum(1 + starts.astype(np.int64), axis=1)  # a gap of one before each word start
        return np.stack([begin, begin + 1], axis=-1)

    def __call__(self, mb: MicroBatch) -> dict[str, Any]:
        ids = mb.input_ids
        special = np.isin(ids, self.tokenizer.all_special_ids)
        num_tokens = mb.num_tokens if mb.num_tokens is not None else np.full(len(ids), ids.shape[1])
        real = np.arange(ids.shape[1])[None, :] < num_tokens[:, None]
        batch = {"input_ids": ids.copy(), "special_tokens_mask": (special | ~real).astype(np.int64)}
        if self.word_starts is not None:
            batch["offset_mapping"] = self._offsets(ids)
        out = self.collator.numpy_call([{k: v[i] for k, v in batch.items()} for i in range(len(ids))])
        inputs = {"input_ids": out["input_ids"].astype(np.int64), "labels": out["labels"].astype(np.int64),
                  "attention_mask": real.astype(np.int64)}
        if self.document_masking:
            docs = document_ids(mb)
            full = block_diagonal_mask(docs)
            inputs["attention_mask"] = full if self.sliding_window is None else {
                "full_attention": full, "sliding_attention": block_diagonal_mask(docs, self.sliding_window)}
            inputs["position_ids"] = document_position_ids(mb, self.position_offset)
        return inputs

    @classmethod
    def for_model(cls, tokenizer_dir: str, model_config, document_masking: bool, probability: float,
                  mask_replace_prob: float, random_replace_prob: float, whole_word_mask: bool) -> MaskedLMInputs:
        """The inputs for ``model_config``: RoBERTa's position offset and ModernBERT's sliding window taken from it."""
        offset = model_config.pad_token_id + 1 if model_config.model_type == "roberta" else 0
        window = getattr(model_config, "sliding_window", None) if "sliding_attention" in (
            getattr(model_config, "layer_types", None) or ()) else None
        return cls(tokenizer_dir, probability, mask_replace_prob, random_replace_prob, whole_word_mask,
                   document_masking=document_masking, position_offset=offset, sliding_window=window)

