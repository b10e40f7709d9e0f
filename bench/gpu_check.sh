#!/usr/bin/env bash
# Every genlab family a few steps on CUDA with bf16, then -- given 2+ GPUs -- DDP over NCCL and
# FSDP (trainer=ddp / trainer=fsdp on all GPUs); prints training images/s per run.
#
#   bash bench/gpu_check.sh                       # 40 steps per family, the first 10 untimed
#   bash bench/gpu_check.sh --steps 60 --warmup 20 --only ddpm,ldm
#   bash bench/gpu_check.sh -- data.batch_size=128 callbacks.compile.mode=default
#
# Each run is the real entry point, `python src/train.py experiment=<shapes recipe> trainer=gpu
# ...`, on the embedded shapes data (drawn on the fly: nothing to download), with the recipe's
# own networks and batch size, bf16 autocast, data.num_workers=4 and pinned memory, no test
# phase, sample grid, generative metrics or logger. The families that build on another model
# (LDM on a VAE, DALL-E on a dVAE, the VQ prior on a VQ-GAN, unCLIP's prior and decoder on a CLIP)
# use the checkpoint that this script's run of that model wrote (a few steps: enough to time).
# images/s is measured inside each run by genlab.callbacks.step_timer: the training batches after
# the warm-up steps (untimed: cuDNN autotuning, first allocations, torch.compile if asked) over
# their wall time, all ranks' images counted; validation and checkpoints are outside it.
#
# Options: --steps N (trainer.max_steps: training batches; genlab's adversarial models count a
# batch once), --warmup N (untimed steps), --only a,b (run names below; ddpm also selects
# ddpm_ddp<N>, ddpm_fsdp<N>), --out DIR (default logs/gpu_check/<date_time>), --no-multi (skip
# DDP/FSDP), --cpu (the same commands on the CPU with trainer=default: checks this script,
# measures nothing useful).
# Everything after `--` goes to every train.py run. The interpreter is $GPU_CHECK_PYTHON, else
# .venv/bin/python, else python. Exit status: 0 when every run finished, 1 when one failed (its
# log is named), 2 without a CUDA device. CI never runs it.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${GPU_CHECK_PYTHON:-}
if [[ -z $PY ]]; then
  if [[ -x $ROOT/.venv/bin/python ]]; then PY=$ROOT/.venv/bin/python; else PY=python; fi
fi

STEPS=40
WARMUP=10
OUT=""
ONLY=""
MULTI=1
CPU=0
EXTRA=()
while (($#)); do
  case $1 in
    --steps) STEPS=$2; shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --no-multi) MULTI=0; shift ;;
    --cpu) CPU=1; shift ;;
    -h | --help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 64 ;;
  esac
done
if ! [[ $STEPS =~ ^[0-9]+$ && $WARMUP =~ ^[0-9]+$ ]] || ((STEPS <= WARMUP)); then
  echo "gpu_check: --steps ($STEPS) must be an integer above --warmup ($WARMUP)" >&2
  exit 64
fi

# ---- a CUDA device, or a clear no --------------------------------------------------------------
if ((CPU)); then
  GPUS=0
  DEVICE="the CPU (--cpu)"
  TRAINER=(trainer=default)
  echo "gpu_check: --cpu: the commands run on the CPU (trainer=default); the numbers mean nothing"
else
  probe='import torch
if not torch.cuda.is_available():
    raise SystemExit(1)
print(torch.cuda.device_count())
print(f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")'
  if ! found=$("$PY" -c "$probe" 2>/dev/null); then
    {
      echo "gpu_check: no CUDA device: torch.cuda.is_available() is False for $PY"
      echo "gpu_check: this check trains on NVIDIA GPUs only and ran nothing (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-<unset>})."
      echo "gpu_check: run it on a machine with a GPU; --cpu runs the same commands here as a dry check."
    } >&2
    exit 2
  fi
  GPUS=$(head -n1 <<<"$found")
  DEVICE=$(tail -n1 <<<"$found")
  TRAINER=(trainer=gpu)
  echo "gpu_check: $DEVICE"
fi

OUT=${OUT:-$ROOT/logs/gpu_check/$(date +%Y-%m-%d_%H-%M-%S)}
mkdir -p "$OUT"
echo "gpu_check: runs and logs in $OUT"

COMMON=(
  trainer.max_steps="$STEPS"
  trainer.precision=bf16-mixed
  ++trainer.limit_val_batches=2
  data.train_size=4096
  data.num_workers=4
  data.pin_memory=$([[ $GPUS -gt 0 ]] && echo true || echo false)
  paths.data_dir="$OUT/data"
  test=false
  logger=null
  callbacks.sample_grid=null
  callbacks.generative_metrics=null
  callbacks.rich_progress_bar=null
  callbacks.model_summary=null
  "+callbacks.step_timer={_target_: genlab.callbacks.step_timer.StepTimer, warmup_steps: $WARMUP}"
)

# name | recipe | overrides ({run} stands for that run's last checkpoint)
RUNS=(
  "ddpm|ddpm_shapes|"
  "imagen|imagen_shapes|"
  "imagen_sr|imagen_shapes_sr|"
  "vae|vae_shapes_64|"
  "ldm|ldm_shapes|model.space.first_stage_ckpt={vae}"
  "vqgan|vqgan_shapes|"
  "vq_prior|vq_prior_shapes|model.tokenizer_ckpt={vqgan}"
  "dvae|dvae_shapes|"
  "dalle|dalle_shapes|model.tokenizer_ckpt={dvae}"
  "ae|ae_shapes|"
  "gan|gan_shapes|"
  "glow|glow_shapes|"
  "clip|clip_shapes|"
  "unclip_prior|unclip_prior_shapes|model.clip_ckpt={clip}"
  "unclip_decoder|unclip_decoder_shapes|model.conditioners.image_embed.clip_ckpt={clip}"
)
if ((GPUS >= 2 && MULTI)); then
  RUNS+=(
    "ddpm_ddp${GPUS}|ddpm_shapes|trainer=ddp trainer.devices=$GPUS"
    "ddpm_fsdp${GPUS}|ddpm_shapes|trainer=fsdp trainer.devices=$GPUS"
    "dalle_ddp${GPUS}|dalle_shapes|trainer=ddp trainer.devices=$GPUS model.tokenizer_ckpt={dvae}"
  )
elif ((MULTI && !CPU)); then
  echo "gpu_check: one GPU: no DDP / FSDP runs (they need 2+)"
fi

FAILED=()
selected() { [[ -z $ONLY || ",$ONLY," == *",$1,"* || ",$ONLY," == *",${1%_*},"* ]]; }
for spec in "${RUNS[@]}"; do
  IFS='|' read -r name recipe overrides <<<"$spec"
  selected "$name" || continue
  args=()
  missing=""
  for o in $overrides; do
    while [[ $o =~ \{([a-z_]+)\} ]]; do
      dep=${BASH_REMATCH[1]}
      ckpt=$OUT/$dep/checkpoints/last.ckpt
      [[ -e $ckpt ]] || missing=$dep
      o=${o//\{$dep\}/$ckpt}
    done
    args+=("$o")
  done
  if [[ -n $missing ]]; then
    echo "gpu_check: $name skipped: it needs the checkpoint of run '$missing' (run it too)"
    FAILED+=("$name (no $missing checkpoint)")
    continue
  fi
  echo "gpu_check: $name (experiment=$recipe) ..."
  start=$SECONDS
  if (cd "$ROOT" && "$PY" src/train.py "experiment=$recipe" "${TRAINER[@]}" "${COMMON[@]}" \
    "${args[@]}" "hydra.run.dir=$OUT/$name" "${EXTRA[@]}") >"$OUT/$name.log" 2>&1; then
    echo "gpu_check: $name done in $((SECONDS - start)) s"
  else
    echo "gpu_check: $name FAILED after $((SECONDS - start)) s: see $OUT/$name.log" >&2
    tail -n 5 "$OUT/$name.log" | sed 's/^/    /' >&2
    FAILED+=("$name")
  fi
done

# ---- the table ---------------------------------------------------------------------------------
"$PY" - "$OUT" "$STEPS" "$WARMUP" "${EXTRA[*]-}" "$DEVICE" <<'EOF' | tee "$OUT/summary.md"
import json, sys
from pathlib import Path

out, steps, warmup, extra, device = Path(sys.argv[1]), *sys.argv[2:6]
print(f"\nbench/gpu_check.sh on {device}\n")
print("| run | global batch | timed batches | s/batch | images/s |")
print("| --- | ---: | ---: | ---: | ---: |")
for record_file in sorted(out.glob("*/step_times.json"), key=lambda p: p.stat().st_mtime):
    r = json.loads(record_file.read_text())
    name = record_file.parent.name
    if not r.get("images_per_second"):
        print(f"| {name} | - | 0 | - | - (no step after the warm-up) |")
        continue
    batch = r["images"] / r["timed_batches"]
    per_batch = r["seconds"] / r["timed_batches"]
    print(f"| {name} | {batch:.0f} | {r['timed_batches']} | {per_batch:.4f} | "
          f"{r['images_per_second']:.0f} |")
print(f"\n{steps} training steps per run, the first {warmup} untimed; bf16 autocast"
      + (f"; extra overrides: {extra}" if extra.strip() else ""))
EOF

if ((${#FAILED[@]})); then
  echo "gpu_check: failed or skipped: ${FAILED[*]}" >&2
  exit 1
fi
echo "gpu_check: every run finished; table in $OUT/summary.md"
