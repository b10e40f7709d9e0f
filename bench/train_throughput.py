"""Training throughput (images/s) of the default DDPM under precision / layout / attention options.

Runs the real ``DDPM.training_step`` + backward + AdamW step on random 32 px images with shapes-
like captions, each variant after a warm-up, and prints images/s and the ratio to the first
(baseline) variant measured in the same run.

    python bench/train_throughput.py [--steps 20] [--batch 64]
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

from genlab.data.tokenizer import BPETokenizer
from genlab.models.diffusion.model import DiffusionModel
from genlab.nn.text_encoder import TransformerTextEncoder
from genlab.nn.unet import UNet

CAPTIONS = ["a large red circle at the top left", "a small blue square in the center"]


def build(channels_last: bool, attn_impl: str) -> DiffusionModel:
    text = TransformerTextEncoder()
    net = UNet(context_dim=text.width, cond_dim=text.width, attn_impl=attn_impl)
    model = DiffusionModel(
        net=net,
        text_encoder=text,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        channels_last=channels_last,
    )
    model.tokenizer = BPETokenizer.train(CAPTIONS * 10, vocab_size=128)
    model.on_fit_start()
    return model


def measure(model: DiffusionModel, precision: str, steps: int, batch: int) -> float:
    opt = torch.optim.AdamW(model.denoiser.parameters(), lr=1e-3)
    data = {
        "image": torch.rand(batch, 3, 32, 32) * 2 - 1,
        "caption": [CAPTIONS[i % 2] for i in range(batch)],
    }
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model.log = lambda *a, **k: None  # no trainer attached

    def step():
        with torch.autocast("cpu", dtype=dtype, enabled=precision == "bf16"):
            loss = model.training_step(data, 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    variants = [
        ("fp32, contiguous, sdpa", "fp32", False, "sdpa"),
        ("bf16, contiguous, sdpa", "bf16", False, "sdpa"),
        ("bf16, channels_last, sdpa", "bf16", True, "sdpa"),
        ("bf16, channels_last, math", "bf16", True, "math"),
        ("bf16, contiguous, math", "bf16", False, "math"),
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    base = None
    for name, precision, cl, impl in variants:
        torch.manual_seed(0)
        ips = measure(build(cl, impl), precision, args.steps, args.batch)
        base = base or ips
        print(f"{name:32s} {ips:7.1f} images/s   x{ips / base:.2f}")


if __name__ == "__main__":
    main()
