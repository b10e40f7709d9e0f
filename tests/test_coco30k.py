"""The field's COCO protocol (issue 24 item 6): the coco30k preset (random val captions with a
fixed seed, reference statistics of the val images, stated in the protocol) and the CLIP score
with a pretrained Hugging Face CLIP from a local folder, never downloaded in tests.

The CLIP is a tiny random ``CLIPModel`` with a tokenizer over a tiny vocabulary, saved with
``save_pretrained`` (the layout of a real one); the scores are checked against a hand
computation from the model's own forward pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import check_ok, run_entry
from genlab.data.coco import CocoDataModule
from genlab.evaluation.generation import generate_chunk, random_captions
from genlab.metrics.text_image import CLIPScore
from test_data_files import write_coco_part
from test_wandb import artifacts, staged

WORDS = [
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "with",
    "and",
    "at",
    "red",
    "blue",
    "green",
    "photo",
    "dog",
    "cat",
    "man",
    "street",
    "table",
    "two",
]
VAL = {  # 5 val images, 9 captions
    21: [(1, "a photo of a dog"), (2, "a dog on the street")],
    22: [(3, "a red table")],
    23: [(4, "two cats"), (5, "a cat with a man"), (6, "the cat")],
    24: [(7, "a blue street")],
    25: [(8, "a man at a table"), (9, "green photo")],
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A tiny random CLIPModel and its processor, saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder = tmp_path_factory.mktemp("tiny_clip")
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges = []
    for word in WORDS:  # merge each word left to right into one token
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    merges = list(dict.fromkeys(merges))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    ids = {"bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"]}
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            pad_token_id=ids["eos_token_id"],
            **ids,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def hand_clip_score(folder: Path, images: torch.Tensor, prompts: list[str]) -> float:
    """100 · mean max(cos, 0) from the CLIP's forward pass (its normalised embeddings)."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    pictures = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    inputs = processor(
        text=prompts,
        images=[p.permute(1, 2, 0).numpy() for p in pictures],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        out = model(**inputs)
    cos = (out.image_embeds * out.text_embeds).sum(dim=1).double()  # both unit vectors
    return float(100 * cos.clamp(min=0).mean())


def test_pretrained_clip_score_equals_the_hand_computation(tiny_clip: Path) -> None:
    from genlab.metrics.pretrained_clip import PretrainedCLIP

    clip = PretrainedCLIP(str(tiny_clip), batch_size=3)  # batches of 3: results must not depend
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    prompts = ["a photo of a dog", "a red table", "two cats", "the cat", "a blue street"]
    metric = CLIPScore()
    metric.update(clip.encode_images(images), clip.encode_texts(prompts))
    result = metric.compute()
    expected = hand_clip_score(tiny_clip, images, prompts)
    assert float(result["clip_score"]) == pytest.approx(expected, abs=1e-4)
    assert float(result["clip_score_w2.5"]) == pytest.approx(expected / 40, abs=1e-6)
    assert clip.describe()["extractor"] == f"hf-clip:{tiny_clip}"
    assert len(clip.version) == 12  # the weights file's SHA-256


def test_a_hub_name_is_never_downloaded_unless_asked(monkeypatch, tmp_path: Path) -> None:
    from genlab.metrics.pretrained_clip import PretrainedCLIP

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a download would fail loudly
    with pytest.raises(FileNotFoundError, match="clip_download=true"):
        PretrainedCLIP("openai/clip-vit-base-patch32")


def test_random_captions_fixed_seed_each_caption_once_before_twice(tmp_path: Path) -> None:
    write_coco_part(tmp_path / "coco", "val", VAL)
    data = CocoDataModule(data_dir=str(tmp_path), resolution=16, val_size=2)
    pool = data.caption_pool("test")  # every val2017 image (test_size null)
    assert len(pool) == 9 and pool[:2] == ["a photo of a dog", "a dog on the street"]
    assert data.caption_pool("val") == pool[:3]
    first, size = random_captions(data, 20, split="test", seed=7)
    assert size == 9 and first == random_captions(data, 20, split="test", seed=7)[0]
    assert sorted(first[:9]) == sorted(pool) and sorted(first[9:18]) == sorted(pool)
    assert first != random_captions(data, 20, split="test", seed=8)[0]
    with pytest.raises(ValueError, match="caption_pool"):
        random_captions(object(), 3, split="test", seed=0)


def test_eval_py_coco30k_reports_the_pretrained_clip_score(
    trained_run: Path, tiny_clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """eval.py protocol=coco30k on a tiny COCO, shrunk to 8 images: the CLIP score of the tiny
    pretrained CLIP equals the hand computation on the same images (float32 generation); FID
    (on that CLIP's image embeddings here, Inception's in the preset) is against every val image;
    with logger=wandb the report is attached to the offline W&B run."""
    import genlab

    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))

    write_coco_part(tmp_path / "coco", "val", VAL)
    write_coco_part(tmp_path / "coco", "train", {1: [(100, "a dog")]})
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    run_dir = tmp_path / "eval"
    result = run_entry(
        "eval.py",
        f"ckpt_path={ckpt}",
        "protocol=coco30k",
        "data=coco",
        f"data.data_dir={tmp_path}",
        "data.resolution=16",
        "data.val_size=2",
        "eval.num_samples=8",
        f"eval.clip_model={tiny_clip}",
        "callbacks.generative_metrics.features=clip",  # no Inception weights here: CLIP's FID
        "callbacks.generative_metrics.batch_size=4",
        "callbacks.generative_metrics.num_reference=5",
        f"callbacks.generative_metrics.cache_dir={tmp_path / 'cache'}",
        "trainer.precision=32-true",
        "logger=wandb",
        f"hydra.run.dir={run_dir}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    report = json.loads((run_dir / "metrics.json").read_text())
    (generated,) = [r for r in report["results"] if r["name"] == "generated"]
    protocol = generated["protocol"]
    assert protocol["preset"] == "coco30k"
    assert protocol["prompts"] == {
        "source": "random captions",
        "split": "test",
        "seed": 2022,
        "pool": 9,
        "distinct": 8,
    }
    assert protocol["clip_model"] == str(tiny_clip) and protocol["paired"] is False
    assert protocol["num_samples"] == 8
    reference = protocol["reference"]  # every val2017 image (test split), at the data's size
    assert (reference["split"], reference["num_images"]) == ("test", 5)
    assert (reference["dataset"], reference["resolution"]) == ("coco", 16)
    assert protocol["extractor"] == "clip-image-embedding" and "fid" in generated["metrics"]
    score = report["metrics"]["test/clip_score"]
    assert score == pytest.approx(generated["metrics"]["clip_score"], rel=1e-6)  # float32 log

    data = CocoDataModule(data_dir=str(tmp_path), resolution=16, val_size=2)
    prompts, _ = random_captions(data, 8, split="test", seed=2022)
    model = genlab.load(ckpt).eval()
    conditions = {"prompts": prompts}
    images = torch.cat(
        [
            generate_chunk(model, conditions, items, seed=0, batch_size=4, options={})
            for items in (range(0, 4), range(4, 8))
        ]
    )
    assert score == pytest.approx(hand_clip_score(tiny_clip, images, prompts), abs=1e-3)
    assert np.isfinite(score)
    (run,) = (run_dir / "wandb").glob("offline-run-*")
    attached = {name for a in artifacts(run)["evaluation"] for name in staged(a)}
    assert attached == {"test_step000000.json", "metrics.json"}


def test_the_coco30k_preset_composes_the_field_protocol() -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from conftest import CONF

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("eval.yaml", overrides=["ckpt_path=x.ckpt", "protocol=coco30k"])
        shrunk = compose("eval.yaml", overrides=["protocol=coco30k", "eval.num_samples=8"])
    metrics = cfg.callbacks.generative_metrics
    assert metrics.num_samples == 30000 and shrunk.callbacks.generative_metrics.num_samples == 8
    assert (metrics.preset, metrics.features) == ("coco30k", "inception")
    assert (metrics.prompt_split, metrics.prompt_seed) == ("test", 2022)
    assert (metrics.reference_split, metrics.num_reference) == ("test", 5000)
