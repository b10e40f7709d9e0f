"""What gradient checkpointing (``model.net.gradient_checkpointing=true``) costs and saves.

For the default job's UNet (and, with ``--net unet_small``, the 14M one), runs forward + backward
on random inputs with and without checkpointing, side by side in one process, and prints the
step time and the bytes of activations that autograd keeps for the backward pass (counted
exactly with ``torch.autograd.graph.saved_tensors_hooks``: the memory that checkpointing frees,
independent of the allocator and of the device).

    python bench/checkpointing.py [--net unet_tiny|unet_small] [--batch 64] [--res 32] [--steps 5]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from genlab.nn.unet import UNet

NETS = {  # conf/model/net/*.yaml with the default job's 128-wide text context
    "unet_tiny": dict(channels=[32, 64, 128], res_blocks=1, attention_levels=[2]),
    "unet_small": dict(channels=[64, 128, 256], res_blocks=2, attention_levels=[1, 2]),
}


def saved_bytes(net: UNet, x, t, context) -> int:
    """Bytes of the tensors autograd saves for the backward pass of one forward."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = net(x, t, context=context)
    out.square().mean().backward()
    return total


def step_seconds(nets: list[UNet], x, t, context, steps: int) -> list[float]:
    """Median forward + backward seconds of each net, the nets taking turns step by step (so a
    change in the machine's speed hits all of them), after one warm-up step each."""
    times = [[] for _ in nets]
    for step in range(steps + 1):
        for i, net in enumerate(nets):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = net(x, t, context=context)
            out.float().square().mean().backward()
            if step:
                times[i].append(time.perf_counter() - start)
    return [sorted(ts)[len(ts) // 2] for ts in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--net", choices=sorted(NETS), default="unet_tiny")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--res", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    plain = UNet(**NETS[args.net], heads=4, context_dim=128, groups=8)
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing = True
    x = torch.randn(args.batch, 3, args.res, args.res)
    t = torch.randint(0, 1000, (args.batch,))
    context = torch.randn(args.batch, 16, 128)
    params = sum(p.numel() for p in plain.parameters())
    print(
        f"{args.net} ({params / 1e6:.1f}M parameters), batch {args.batch} at {args.res} px, "
        f"{torch.get_num_threads()} threads, bf16 autocast for the times"
    )
    print("| gradient_checkpointing | activations kept (fp32, MiB) | step (fwd + bwd) s | ratio |")
    print("| --- | --- | --- | --- |")
    nets = {"false": plain, "true": checkpointed}
    kept = {name: saved_bytes(net, x, t, context) / 2**20 for name, net in nets.items()}
    seconds = dict(zip(nets, step_seconds(list(nets.values()), x, t, context, args.steps)))
    for name in nets:
        ratio = seconds[name] / seconds["false"]
        print(f"| {name} | {kept[name]:.0f} | {seconds[name]:.3f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
