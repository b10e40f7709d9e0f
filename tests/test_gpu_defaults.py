"""GPU-ready defaults (issue 23, item 7) as far as the CPU can check them: TF32 is set only for
CUDA; ``torch.compile`` (callbacks.compile) is opt-in, really compiles the network, trains to the
same weights and keeps checkpoint keys; the GPU recipes state their batch and learning-rate rule
and load data with workers and pinned memory; bench/gpu_check.sh refuses a machine without CUDA."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import genlab
from conftest import CONF, ROOT, TINY, check_ok, quiet_trainer, run_entry
from genlab.callbacks.compile import CompileNet, find_net, is_compiled
from genlab.data.shapes import ShapesDataModule
from genlab.nn.attention import attention
from genlab.utils.checkpoint import ModelConfigInCheckpoint
from genlab.utils.cuda import set_tf32
from genlab.utils.instantiate import instantiate

MODEL = {
    "_target_": "genlab.models.diffusion.model.DiffusionModel",
    "net": {
        "_target_": "genlab.nn.unet.UNet",
        "channels": [16, 32],
        "attention_levels": [1],
        "heads": 2,
        "context_dim": 32,
        "cond_dim": 32,
        "dropout": 0.1,  # the compiled graph draws the same dropout masks
    },
    "text_encoder": {
        "_target_": "genlab.nn.text_encoder.TransformerTextEncoder",
        "vocab_size": 128,
        "context_length": 24,
        "width": 32,
        "layers": 1,
        "heads": 2,
    },
    "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 2e-3},
    "image_size": 16,
    "tokenizer_vocab_size": 128,
}
GPU_RECIPES = sorted(p.stem for p in (CONF / "experiment").glob("*_coco*.yaml"))


@pytest.fixture
def float32_flags():
    """Restore torch's TF32 flags after a test that sets them."""
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield
    torch.set_float32_matmul_precision(before[0])
    torch.backends.cudnn.allow_tf32 = before[1]


def test_tf32_is_set_for_cuda_only(float32_flags) -> None:
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    assert set_tf32("cpu") is False  # the CPU: nothing changes
    assert torch.get_float32_matmul_precision() == "highest"
    assert torch.backends.cudnn.allow_tf32 is False
    assert set_tf32("cuda") is True
    assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32  # what "high" means for CUDA matmuls
    assert set_tf32("cuda", enabled=False) is True  # tf32=false: full float32
    assert torch.get_float32_matmul_precision() == "highest"
    assert torch.backends.cudnn.allow_tf32 is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_attention_auto_runs_a_fused_sdpa_kernel_on_cuda() -> None:
    """attn_impl=auto (every config's default) takes scaled_dot_product_attention on CUDA: the
    flash kernel for unmasked bf16 self-attention, the memory-efficient one with a key mask."""
    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = torch.ones(2, 256, dtype=torch.bool, device="cuda")
    mask[:, 200:] = False
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    for key_mask, kernels in [(None, ("flash",)), (mask, ("efficient", "flash", "cudnn"))]:
        with torch.profiler.profile(activities=activities) as prof:
            out = attention(q, k, v, key_mask)
        ops = " ".join(e.key for e in prof.key_averages()).lower()
        assert "_scaled_dot_product" in ops and any(n in ops for n in kernels), ops
        expected = attention(q.float(), k.float(), v.float(), key_mask, impl="math")
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


def fit_two_steps(tmp_path: Path, callbacks: list) -> tuple:
    """A tiny text DDPM (dropout on) fitted for 2 steps on 16 px shapes from seed 0."""
    torch.manual_seed(0)
    model = instantiate(MODEL)
    data = ShapesDataModule(resolution=16, batch_size=8, train_size=64, val_size=8, test_size=8)
    trainer = quiet_trainer(
        tmp_path,
        max_steps=2,
        limit_val_batches=0,
        callbacks=[*callbacks, ModelConfigInCheckpoint(MODEL)],
        precision="32-true",
    )
    trainer.fit(model, data)
    return model, trainer


def test_compile_is_off_by_default_and_refuses_a_model_without_the_net(tmp_path: Path) -> None:
    model = instantiate(MODEL)
    CompileNet().setup(None, model, "fit")  # mode=None: nothing happens
    assert not any(is_compiled(m) for m in model.modules())
    assert find_net(model, ["denoiser.net", "net"])[0] == "denoiser.net"
    with pytest.raises(ValueError, match=r"none of callbacks.compile.nets=\['generator'\]"):
        CompileNet(mode="default", nets=["generator"]).setup(None, model, "fit")


def test_compiled_training_keeps_keys_weights_and_checkpoints(tmp_path: Path) -> None:
    """With a tracing backend (no code generation, the same kernels) the compiled run must
    trace the UNet, end with bitwise the weights of the eager run, and save the same keys."""
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    eager, _ = fit_two_steps(tmp_path / "eager", [])
    compiled, trainer = fit_two_steps(
        tmp_path / "compiled", [CompileNet(mode="default", backend=counting_backend)]
    )
    assert is_compiled(compiled.denoiser.net) and graphs  # the UNet's calls went through dynamo
    assert not is_compiled(compiled.ema.module)  # sampling's EMA copy stays eager
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert all("_orig_mod" not in k for k in compiled.state_dict())
    for key, value in eager.state_dict().items():
        assert torch.equal(compiled.state_dict()[key], value), key
    path = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["state_dict"]
    assert list(saved) == list(eager.state_dict())
    loaded = genlab.load(path)  # strict keys
    assert not is_compiled(loaded.denoiser.net)


@pytest.mark.slow
def test_inductor_compile_through_train_py(tmp_path: Path) -> None:
    """The real thing (minutes on the CPU): train.py with callbacks.compile.mode=default
    compiles the UNet with inductor, trains, samples, and writes ordinary checkpoint keys."""
    run_dir = tmp_path / "run"
    result = run_entry(
        "train.py",
        *TINY,
        "test=false",
        "callbacks.compile.mode=default",
        f"hydra.run.dir={run_dir}",
        tmp_path=tmp_path,
        timeout=1200,
    )
    check_ok(result)
    assert "torch.compile(mode=default, backend=inductor) of denoiser.net" in result.stdout + (
        result.stderr
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    keys = list(torch.load(last, weights_only=False)["state_dict"])
    assert keys and all("_orig_mod" not in k for k in keys)
    assert list(genlab.load(last).state_dict()) == keys


def compose_recipe(recipe: str, tmp_path: Path):
    GlobalHydra.instance().clear()
    overrides = [f"experiment={recipe}", f"paths.output_dir={tmp_path}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train.yaml", overrides=overrides)


@pytest.mark.parametrize("recipe", GPU_RECIPES)
def test_gpu_recipes_load_data_for_a_gpu_and_state_their_lr_rule(
    recipe: str, tmp_path: Path
) -> None:
    cfg = compose_recipe(recipe, tmp_path)
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.trainer.benchmark is True  # cuDNN picks the fastest convolution per shape
    assert cfg.data.num_workers >= 4 and cfg.data.pin_memory is True
    assert cfg.tf32 is True and cfg.callbacks.compile.mode is None  # compile: opt-in
    text = (CONF / "experiment" / f"{recipe}.yaml").read_text()
    assert "Batch and learning rate" in text and "never rescales" in text
    assert f"global batch {cfg.data.batch_size} " in text  # the batch its lr is for


@pytest.mark.parametrize("trainer", ["gpu", "ddp", "fsdp"])
def test_gpu_trainers_turn_on_cudnn_benchmark(trainer: str) -> None:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train.yaml", overrides=[f"trainer={trainer}"])
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.benchmark is True


def test_gpu_check_refuses_a_machine_without_cuda(tmp_path: Path) -> None:
    """bench/gpu_check.sh on this CPU machine: a clear message and exit status 2, in seconds,
    before any training run starts."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env["GPU_CHECK_PYTHON"] = str(ROOT / ".venv" / "bin" / "python")
    if not Path(env["GPU_CHECK_PYTHON"]).exists():
        env["GPU_CHECK_PYTHON"] = shutil.which("python3") or "python3"
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "gpu_check: no CUDA device" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing was run
