"""Side-by-side runs of the default job with one lever changed each (issue 21's ablations).

Every variant is the default job (``experiment=ddpm_shapes``) plus its overrides, trained
through ``src/train.py`` for the same number of optimizer steps (``--steps``; no validation,
grids, final test or metrics), timed by ``callbacks/step_timer.py``, then scored by
``bench/binding.py`` on ``--groups`` with ``--n`` prompts each. ``--parallel 2`` trains two
variants at once on one thread each (both see the same machine load, so their images/s compare);
with ``--parallel 1`` each run takes ``--threads`` threads.

Writes ``<out>/<variant>/`` (the run, ``binding.json``) and ``<out>/ablation.md`` (variant,
overrides, images/s, the groups' exact rates and attributes). Variants already scored are not
rerun (delete their folder to redo one).

    python bench/binding_ablation.py --steps 600 --parallel 2 --n 256 --groups 2 \
        --variant base= --variant cross16='model.net.cross_attention_levels=[1]'
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUIET = [
    "test=false",
    "callbacks.generative_metrics=null",
    "callbacks.sample_grid=null",
    "optimized_metric=null",
    "++trainer.limit_val_batches=0",
    "+callbacks.step_timer={_target_: genlab.callbacks.step_timer.StepTimer, warmup_steps: 5}",
]


def run(cmd: list[str], log: Path, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        f.write(shlex.join(cmd) + "\n")
        f.flush()
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"{shlex.join(cmd[:3])}... failed ({done.returncode}); see {log}")


def variant(name: str, overrides: list[str], args) -> dict:
    """Train and score one variant (or read its earlier result)."""
    folder = args.out / name
    result_file = folder / "binding.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    train_dir = folder / "train"
    started = time.monotonic()
    run(
        [
            sys.executable,
            str(ROOT / "src/train.py"),
            f"experiment={args.experiment}",
            f"trainer.max_steps={args.steps}",
            *QUIET,
            *overrides,
            f"hydra.run.dir={train_dir}",
        ],
        folder / "train.log",
        args.threads,
    )
    train_seconds = time.monotonic() - started
    timing = json.loads((train_dir / "step_times.json").read_text())
    scored = folder / "scores.json"
    run(
        [
            sys.executable,
            str(ROOT / "bench/binding.py"),
            str(train_dir / "checkpoints/last.ckpt"),
            f"--n={args.n}",
            f"--groups={args.groups}",
            f"--json={scored}",
            *args.binding,
        ],
        folder / "binding.log",
        args.threads,
    )
    result = {
        "variant": name,
        "overrides": overrides,
        "steps": args.steps,
        "threads": args.threads,
        "seconds_per_step": timing["seconds_per_step"],
        "train_seconds": round(train_seconds, 1),
        **json.loads(scored.read_text()),
    }
    result_file.write_text(json.dumps(result, indent=2))
    return result


def table(results: list[dict], args) -> str:
    groups = sorted({g for r in results for g in r["results"]}, key=str)
    head = ["variant", "overrides", "s/step", "images/s"]
    head += [f"{g} exact" for g in groups] + [f"{g} shape/colour/size/cell/extra" for g in groups]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        per_step = r["seconds_per_step"]
        batch = next(
            (int(o.split("=")[1]) for o in r["overrides"] if o.startswith("data.batch_size=")),
            args.batch,
        )
        images_s = batch / per_step if per_step else float("nan")
        row = [r["variant"], " ".join(f"`{o}`" for o in r["overrides"]) or "(the default job)"]
        row += [f"{per_step:.3f}", f"{images_s:.0f}"]
        row += [f"{r['results'][g]['exact']:.3f}" if g in r["results"] else "" for g in groups]
        for g in groups:
            v = r["results"].get(g)
            row.append(
                "/".join(f"{v[k]:.2f}" for k in ("shape", "color", "size", "cell", "extra"))
                if v
                else ""
            )
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="ddpm_shapes")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps of every variant")
    parser.add_argument("--n", type=int, default=256, help="prompts per group")
    parser.add_argument("--groups", default="2", help="bench/binding.py --groups")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="default: 2 // parallel")
    parser.add_argument("--batch", type=int, default=64, help="the batch size (for images/s)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME=OVERRIDES (space-separated Hydra overrides; empty: the default job)",
    )
    parser.add_argument("--binding", action="append", default=[], help="an option of binding.py")
    parser.add_argument("--out", type=Path, default=ROOT / "logs/binding_ablation")
    args = parser.parse_args()
    args.threads = args.threads or max(1, 2 // args.parallel)
    args.out = args.out.resolve()
    variants = {}
    for spec in args.variant:
        name, _, overrides = spec.partition("=")
        variants[name] = shlex.split(overrides)
    if not variants:
        parser.error("give at least one --variant NAME=OVERRIDES")
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = {n: pool.submit(variant, n, o, args) for n, o in variants.items()}
    for name, future in futures.items():
        try:
            future.result()
        except RuntimeError as error:
            print(f"{name}: {error}", file=sys.stderr)
    # every variant scored in this folder, this invocation's or an earlier (interrupted) one's
    known = [json.loads(f.read_text()) for f in sorted(args.out.glob("*/binding.json"))]
    text = table(known, args)
    (args.out / "ablation.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
