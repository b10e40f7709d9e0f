"""Gradient (activation) checkpointing of a network's blocks: ``gradient_checkpointing=true`` on
the UNet, the Transformers and the text encoder keeps only each block's inputs during the
forward pass and recomputes the block's activations during the backward pass, trading about
one more forward pass of compute for the activation memory of all blocks but one.

Gradients are those of the plain network (``use_reentrant=False``: the recomputation replays
the forward pass, dropout masks included, with the same random state), tested in
``tests/test_nn.py``. Only training forwards with gradients are checkpointed; sampling and
evaluation run the blocks as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def run_block(block: nn.Module, *args: Any, enabled: bool, **kwargs: Any) -> Any:
    """``block(*args, **kwargs)``, checkpointed when ``enabled`` and a backward pass will need
    its activations (grad mode on, the block in training mode)."""
    if enabled and block.training and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False, **kwargs)
    return block(*args, **kwargs)
