#!/bin/bash
# `./manage.py sweep --launcher slurm` on a real SLURM: a tiny sweep (two seeds of a 20K-parameter model, 6 steps)
# submitted as a job array; seed0 is sent submitit's time-limit warning (USR2) halfway, saves last.ckpt, is requeued
# and resumes; both members must end at step 6 with the weights of the same sweep run by the local launcher.
#
#   bash benchmarks/slurm_sweep.sh [WORK_DIR]        # on a login node, in the activated environment (xlab[sweep])
#
# WORK_DIR (default: a new folder under ./logs) must be on a file system the compute nodes share. Extra sbatch
# options: SWEEP_SLURM_FLAGS, e.g. "--slurm-partition debug". Exits 0 when all checks pass.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(realpath -m "${1:-logs/slurm-sweep-$(date +%Y%m%d-%H%M%S)}")
mkdir -p "$WORK"
TINY=(--trainer.max_steps=6 --trainer.val_check_interval=2 --trainer.limit_val_batches=2 --trainer.log_every_n_steps=1
      --trainer.enable_model_summary=false --trainer.accelerator=cpu --model.arch.n_layers=1 --model.arch.d_model=32
      --model.arch.n_heads=2 --model.arch.context=32 --model.schedule.warmup_steps=2 --model.sample_prompts=null
      --data.vocab_size=300 --data.batch_size=4 --data.max_documents=40 --data.data_dir="$WORK/data"
      '--trainer.callbacks+={"class_path": "slurm_sweep_hold.HoldAtStep"}')
SWEEP=(--vary model.arch.position=rope --seeds 2 --logs "$WORK")
export OMP_NUM_THREADS=1 PYTHONPATH="$WORK:${PYTHONPATH:-}"

# a member that waits at step 3 while $WORK/hold exists, so that the warning comes mid-training
cat > "$WORK/slurm_sweep_hold.py" <<'EOF'
import os, time
from pathlib import Path
import lightning as L

class HoldAtStep(L.Callback):
    def on_train_batch_end(self, trainer, *args):
        hold = Path(os.environ["PYTHONPATH"].split(":")[0]) / "hold"
        if trainer.global_step == 3 and "seed0" in trainer.log_dir and hold.exists():
            (hold.parent / "held").write_text(os.environ.get("SLURM_JOB_ID", "?"))
            while hold.exists() and not trainer.received_sigterm:
                time.sleep(0.1)
EOF

./xlab.py prepare_data "${TINY[@]}"
./manage.py sweep "${TINY[@]}" "${SWEEP[@]}" --name local
touch "$WORK/hold"
# shellcheck disable=SC2086
./manage.py sweep "${TINY[@]}" "${SWEEP[@]}" --name slurm --launcher slurm --slurm-time 10 ${SWEEP_SLURM_FLAGS:-}
for _ in $(seq 600); do [ -f "$WORK/held" ] && break; sleep 1; done
[ -f "$WORK/held" ] || { echo "FAIL: seed0 never reached step 3 (see $WORK/slurm/)"; exit 1; }
JOB=$(cat "$WORK/held")
echo "seed0 is at step 3 in job $JOB: sending it submitit's time-limit warning (USR2)"
scancel --signal=USR2 "$JOB"
for _ in $(seq 60); do squeue -h -j "$JOB" -o %T 2>/dev/null | grep -q RUNNING || break; sleep 1; done
rm -f "$WORK/hold"
python - "$WORK" <<'EOF'
import sys, time
from pathlib import Path
import torch
from xlab.checkpoint import CheckpointError, load_checkpoint

work = Path(sys.argv[1])

def last(sweep, seed):
    return load_checkpoint(work / sweep / f"position=rope/seed{seed}/checkpoints/last.ckpt")

def steps(seed):
    try:
        return last("slurm", seed).meta["consumed"]["steps"]
    except (FileNotFoundError, CheckpointError):
        return None

deadline = time.monotonic() + 1800
while any(steps(seed) != 6 for seed in (0, 1)):
    assert time.monotonic() < deadline, f"the members did not finish: see {work / 'slurm'}/"
    time.sleep(5)
resumes = list((work / "slurm/position=rope/seed0").glob("config-resume-*.yaml"))
assert resumes, "seed0 was not resumed from its last.ckpt after the requeue"
for seed in (0, 1):
    ran, reference = last("slurm", seed).model.state_dict(), last("local", seed).model.state_dict()
    for name, value in ran.items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-5, msg=name)
print("OK: both members finished at step 6; seed0 was requeued and resumed; the weights equal the local sweep's")
EOF
