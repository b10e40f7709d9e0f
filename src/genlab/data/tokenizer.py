"""Byte-pair-encoding tokenizer trained on a dataset's captions (Sennrich et al. 2016).

Built on the `tokenizers` library. The trained vocabulary serialises to a JSON string, which the
model stores in its checkpoint under :data:`TOKENIZER_KEY`, so a loaded model tokenizes prompts
exactly as in training. :func:`train_for_datamodule` is what every text model calls in its
``setup()``: rank 0 trains on the datamodule's training captions and broadcasts the result.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

log = logging.getLogger(__name__)

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS]  # ids 0..3 in this order
TOKENIZER_KEY = "genlab_tokenizer"  # the tokenizer's JSON in a model checkpoint


class BPETokenizer:
    """Lower-cased BPE over SentencePiece-style word pieces, with [BOS] ... [EOS] framing."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.token_to_id(PAD)
        self.bos_id = tokenizer.token_to_id(BOS)
        self.eos_id = tokenizer.token_to_id(EOS)
        self._warned_truncation = False

    @classmethod
    def train(cls, captions: Iterable[str], *, vocab_size: int) -> BPETokenizer:
        """Learn BPE merges from ``captions`` up to ``vocab_size`` tokens (specials included)."""
        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Metaspace()  # words keep a "▁" prefix: lossless
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False
        )
        captions = list(captions)
        if not captions:
            raise ValueError("cannot train a tokenizer: the dataset has no captions")
        tok.train_from_iterator(captions, trainer=trainer, length=len(captions))
        return cls(tok)

    @classmethod
    def from_json(cls, text: str) -> BPETokenizer:
        return cls(Tokenizer.from_str(text))

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, texts: list[str], *, context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``(B, L)`` framed by [BOS]/[EOS] and padded, and a bool mask of real tokens.

        Captions longer than the context are truncated (keeping [EOS]) with a single warning.
        """
        ids = torch.full((len(texts), context_length), self.pad_id, dtype=torch.long)
        for row, enc in enumerate(self.tokenizer.encode_batch(texts)):
            tokens = [self.bos_id, *enc.ids, self.eos_id]
            if len(tokens) > context_length:
                self._warn_truncation(texts[row], len(tokens), context_length)
                tokens = tokens[: context_length - 1] + [self.eos_id]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids, ids != self.pad_id

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _warn_truncation(self, text: str, length: int, context_length: int) -> None:
        if not self._warned_truncation:
            log.warning(
                "caption of %d tokens truncated to context_length=%d (further truncations are "
                "silent): %r",
                length,
                context_length,
                text,
            )
            self._warned_truncation = True


def train_for_datamodule(
    datamodule: Any, strategy: Any, *, vocab_size: int, max_vocab_size: int, model: str
) -> BPETokenizer:
    """Train a tokenizer on ``datamodule.train_captions()`` on rank 0 and broadcast it.

    Every rank reads the captions, so a dataset without captions fails on all ranks alike
    instead of leaving the others waiting in the broadcast.

    Args:
        datamodule: a genlab DataModule (``train_captions()``), e.g. ``trainer.datamodule``.
        strategy: the Lightning strategy (``trainer.strategy``) whose ``broadcast`` shares
            rank 0's tokenizer, so every rank tokenizes alike.
        vocab_size: the BPE vocabulary to learn (``model.tokenizer_vocab_size``).
        max_vocab_size: the rows of the text encoder's embedding table.
        model: the model's config name, for the error messages (``"clip"``).

    Raises:
        ValueError: the dataset has no captions, or the vocabulary outgrows the text encoder.
    """
    captions = datamodule.train_captions() if hasattr(datamodule, "train_captions") else []
    if not captions:
        source = type(datamodule).__name__ if datamodule is not None else "no datamodule"
        raise ValueError(
            f"model={model} needs captions to train its tokenizer, but {source} gives none: "
            "use a captioned dataset (data=shapes, data=coco, or data=image_folder with a "
            "captions.jsonl or .txt captions)"
        )
    trained = None
    if strategy.global_rank == 0:
        trained = BPETokenizer.train(captions, vocab_size=vocab_size).to_json()
    tokenizer = BPETokenizer.from_json(strategy.broadcast(trained, 0))
    if tokenizer.vocab_size > max_vocab_size:
        raise ValueError(
            f"tokenizer vocabulary {tokenizer.vocab_size} exceeds the text encoder's "
            f"model.text_encoder.vocab_size={max_vocab_size}"
        )
    log.info("trained a BPE tokenizer of %d tokens", tokenizer.vocab_size)
    return tokenizer
