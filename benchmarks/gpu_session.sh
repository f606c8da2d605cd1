#!/usr/bin/env bash
# Every GPU figure of the README's Performance section in one call on a lent GPU machine
# (../shared/gpu/README.md: carry the wheels in .whl). Each part runs under its own timeout and writes
# its log to $OUT/PART.log; the last line of each benchmark log is its JSON. Parts in the order given
# (default: all, about 14 minutes on an H200 after the start, more than a 15-minute lease holds with the
# machine's start: give one lease `decode fit`, another `train`):
#
#   decode   static-cache compiled decoding vs HF generate(), GPT-2 124M shape, both presets  (~4 min)
#   train    gpu_train.py: the gpt2 preset's baseline and each lever, then llama's baseline    (~8 min)
#   fit      ./xlab.py fit on the machine's stdlib with --model.compile true: perf/mfu logged  (~2 min)
#
#   OUT=out bash benchmarks/gpu_session.sh decode fit
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if [ -d .whl ]; then  # the image lacks jsonargparse and datasets
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target .site .whl/*.whl
  export PYTHONPATH=$PWD/.site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1

part() {  # part NAME SECONDS COMMAND...: run it, keep its log, print its status and last line
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "$name: exit $? in $((SECONDS - start)) s: $(tail -n 1 "$OUT/$name.log" | cut -c1-600)"
}

SHAPE=(--layers 12 --d-model 768 --heads 12 --vocab 50304 --context 1024)
TRAIN=(python3 benchmarks/gpu_train.py --batch 32 --warmup 12 --steps 30)

decode() {
  part decode_gpt2 150 python3 benchmarks/generate.py --device cuda --dtype bf16 "${SHAPE[@]}" --presets gpt2 \
    --repeats 3 --new-tokens 120 --compile
  part decode_llama 150 python3 benchmarks/generate.py --device cuda --dtype bf16 "${SHAPE[@]}" --presets llama \
    --repeats 3 --new-tokens 120 --compile
}

train() {
  part train_gpt2 120 "${TRAIN[@]}" --preset gpt2
  part train_gpt2_chunked_loss 120 "${TRAIN[@]}" --preset gpt2 --loss-chunk-size 8192
  part train_gpt2_chunked_b64 150 "${TRAIN[@]}" --preset gpt2 --loss-chunk-size 8192 --batch 64  # what the memory buys
  part train_gpt2_cudnn 120 "${TRAIN[@]}" --preset gpt2 --attention-backends cudnn
  part train_llama 120 "${TRAIN[@]}" --preset llama
}

fit() {
  part fit 180 ./xlab.py fit -c conf/xlab.yaml --data.source builtin:python-stdlib --data.val_size 0.05 \
    --data.test_size 0.05 --trainer.max_steps 150 --model.compile true --trainer.logger.init_args.save_dir "$OUT/logs"
  python3 - "$OUT/logs" <<'PY'
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

for events in sorted(Path(sys.argv[1]).rglob("events.out.tfevents.*")):
    scalars = EventAccumulator(str(events)).Reload()
    for tag in ("perf/mfu", "perf/tokens_per_s"):
        if tag in scalars.Tags()["scalars"]:
            print(events.parent.name, tag, [round(e.value, 4) for e in scalars.Scalars(tag)][-3:])
PY
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
for name in "${@:-decode train fit}"; do
  for p in $name; do "$p"; done
done
