"""Byte-pair-encoding tokenizer trained on a dataset's captions (Sennrich et al. 2016).

Built on the `tokenizers` library. The trained vocabulary serialises to a JSON string, which the
model stores in its checkpoint, so a loaded model tokenizes prompts exactly as in training.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

log = logging.getLogger(__name__)

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS]  # ids 0..3 in this order


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
