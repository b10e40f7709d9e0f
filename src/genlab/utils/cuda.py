"""CUDA settings of a training run that hold for the whole process: TF32 (``tf32`` in
``conf/train.yaml``, on by default).

TF32 runs float32 matmuls and convolutions on the tensor cores of Ampere and later GPUs with a
10-bit mantissa (about 1e-3 relative error per product, float32's range) instead of full
float32. Under the recipes' ``bf16-mixed`` autocast most matmuls and convolutions already run in
bf16; TF32 speeds up the float32 ones that autocast leaves (ops it keeps in float32, a frozen part
run outside autocast, ``trainer.precision=32``). Only a run on CUDA changes anything: on the CPU
these flags have no effect and are left alone.

torch has two APIs for these flags and raises when a process mixes them
(``torch.backends.cuda.matmul.fp32_precision`` against ``torch.get_float32_matmul_precision``);
Lightning's CUDA accelerator reads the legacy one, so genlab sets the legacy one too.
"""

from __future__ import annotations

import torch

from genlab.utils.rank_logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)


def set_tf32(device_type: str, enabled: bool = True) -> bool:
    """Turn TF32 matmuls and cuDNN convolutions on (or, ``enabled=False``, off) for this
    process when it computes on ``device_type`` ``"cuda"``; returns whether anything was set.

    Called by ``src/train.py`` once the trainer exists (before ``fit``, so Lightning's tensor-core
    hint sees the setting), with the trainer's root device type.
    """
    if device_type != "cuda":
        return False
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled
    log.info(
        f"tf32={enabled}: float32 matmuls and convolutions on CUDA run in "
        + ("TF32 (tensor cores)" if enabled else "full float32")
    )
    return True
