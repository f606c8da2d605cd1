"""Every command of README.md's ```bash blocks, run as a user runs it: through bash, in a folder laid out like a
clone (conf/ and the scripts), one after the other in README order, with conf/defaults.yaml's progress bar, logger
and checkpoint callbacks on. Only sizes are shrunk, by the flags each test's id shows after `+`; a placeholder of
the README (CKPT, OUTPUT_DIR, a Hub dataset) is replaced as the id shows in `[old->new]`. A command that cannot
run here says why. A command added to the README without an entry in COMMANDS fails
`test_every_readme_command_has_an_entry`.

`make test` runs the representative part (fit, infer, a SIGTERM and the resume); `make check-readme` runs
them all (minutes: every command is a new interpreter, and some train under DDP, compile or bf16 on the CPU).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT

from xlab.checkpoint import read_checkpoint_file

SLOW = pytest.mark.check_readme  # deselected by `make test` (pyproject.toml), run by `make check-readme`

ARCH = "--model.arch.n_layers=1 --model.arch.d_model=32 --model.arch.n_heads=2 --model.arch.context=32"
DATA = "--data.vocab_size=300 --data.max_documents=24"


def shrunk(steps: int = 4, val_every: int = 2, batch: int = 4) -> str:
    """The flags that shrink a fit to seconds: sizes only (steps, batches, the model, the corpus)."""
    return (f"--trainer.max_steps={steps} --trainer.val_check_interval={val_every} --trainer.limit_val_batches=2 "
            f"--trainer.log_every_n_steps=2 {ARCH} {DATA} --data.batch_size={batch}")


FIT = shrunk()
EVAL = f"{DATA} --trainer.limit_val_batches=2 --trainer.limit_test_batches=2 --model.generation.max_new_tokens=8"
LOCAL = "--data.source=builtin:python-stdlib"  # in place of a config's Hub dataset: the config's own path still runs
# the preempted run: global batch 512 = 64 x 8 accumulated batches, a validation and checkpoint every step
ACCUMULATED = {"batch": 64, "val_every": 8}
PREEMPTED_STEPS, LONGER_STEPS = 6, 8
# lm-eval's tasks on local files (tests/test_harness.py's), in place of the Hub's; a repeated --tasks adds tasks
LOCAL_TASKS = "xlab_test_mc,xlab_test_ppl --include_path tasks/"
V0 = "logs/version_0/checkpoints/last.ckpt"
CKPT = ("CKPT", V0)


@dataclass(frozen=True)
class Skip:
    """A README command that does not run here, and why."""

    reason: str


@dataclass(frozen=True)
class Run:
    """How a README command runs here: `subs` (exact text -> replacement) applied in order, `flags` appended (a
    flag given again wins over the README's own), `stdin` fed to it. It must exit 0 (`mode="sigterm"`: 143, after
    a SIGTERM sent once it has written a checkpoint; `mode="serve"`: a server, stopped once it answers) and print
    each of `prints` and write a file matching each glob of `writes`; `check(work, result)` asserts the rest."""

    flags: str = ""
    subs: tuple[tuple[str, str], ...] = ()
    needs: tuple[str, ...] = ()  # README commands whose outputs this one reads: run first, and a failure skips it
    stdin: str | None = None
    prints: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    check: Callable[[Path, subprocess.CompletedProcess], None] | None = None
    setup: Callable[[Path], None] | None = None
    mode: str = "run"
    slow: bool = True

    def command(self, readme: str) -> str:
        for old, new in self.subs:
            assert old in readme, f"{old!r} is not in {readme!r}"
            readme = readme.replace(old, new)
        return f"{readme} {self.flags}".strip()


# ------------------------------------------------------------------------------ checks reading what commands wrote


def newest_checkpoint(work: Path) -> Path:
    return max(work.glob("logs/**/checkpoints/last.ckpt"), key=lambda path: path.stat().st_mtime)


def step(ckpt: Path) -> int:
    return read_checkpoint_file(ckpt)["global_step"]


PREEMPTED: dict[str, object] = {}  # the SIGTERMed run's folder, and the run folders there were then


def preempted_mid_training(work: Path, result: subprocess.CompletedProcess) -> None:
    ckpt = newest_checkpoint(work)
    assert 0 < step(ckpt) < PREEMPTED_STEPS, f"SIGTERM came at step {step(ckpt)}, not mid-training"
    PREEMPTED.update(run=ckpt.parent.parent, runs=sorted(work.glob("logs/version_*")))


def resumed_in_its_folder(work: Path, result: subprocess.CompletedProcess) -> None:
    run = PREEMPTED["run"]
    assert step(run / "checkpoints/last.ckpt") == LONGER_STEPS
    assert list(run.glob("config-resume-*.yaml")), "the resume saves its own config beside the run's"
    assert sorted(work.glob("logs/version_*")) == PREEMPTED["runs"], "a resumed run continues in its own folder"


def trained_further(ckpt: str, steps: int) -> Callable[[Path, subprocess.CompletedProcess], None]:
    def check(work: Path, result: subprocess.CompletedProcess) -> None:
        assert step(work / ckpt) == steps

    return check


def logged_attention_maps(work: Path, result: subprocess.CompletedProcess) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(newest_checkpoint(work).parent.parent))
    events.Reload()
    assert "attention/0" in events.Tags()["images"], events.Tags()["images"]


def llama_with_two_kv_heads(work: Path, result: subprocess.CompletedProcess) -> None:
    config = (work / "logs/version_1/config.yaml").read_text()
    assert "position: rope" in config and "n_heads: 4" in config and "n_kv_heads: 2" in config, config


def two_replies(work: Path, result: subprocess.CompletedProcess) -> None:
    assert result.stdout.count("--- end of reply ---") == 2, result.stdout


ONNX_SAMPLE = './infer.py model.onnx "def " --temperature 0.7 --top-p 0.9 --seed 1 --max-new-tokens 60'
STDOUT: dict[str, str] = {}  # what each command printed on stdout, for commands that compare with another's


def same_text_as_onnx(work: Path, result: subprocess.CompletedProcess) -> None:
    assert result.stdout == STDOUT[ONNX_SAMPLE]  # "the same text, from PyTorch"


def local_tasks(work: Path) -> None:
    """lm-eval's local test tasks of tests/test_harness.py, in tasks/ (the README's example output is theirs)."""
    pytest.importorskip("lm_eval")
    from test_harness import write_tasks

    (work / "tasks").mkdir(exist_ok=True)
    write_tasks(work / "tasks")


# ------------------------------------------------------------------------------ the table: every README command

SWEEP = ("./manage.py sweep -c conf/defaults.yaml --vary model.arch.position=learned,rope,alibi --seeds 3 "
         "--name positions")
# the README's position ablation: the five types, one seed (not three), named apart from the Sweeps example's
ABLATION = ("./manage.py sweep --vary model.arch.position=learned,sinusoidal,rope,alibi,none --seeds 3 "
            "--name positions --model.arch.context=128 --model.arch.d_model=128 --model.arch.n_heads=4 "
            "--model.arch.n_layers=4 --trainer.max_steps=250 --trainer.val_check_interval=50 "
            "--trainer.limit_val_batches=10")
ABLATION_SMALL = (("--seeds 3", "--seeds 1"), ("--name positions", "--name ablation"))
SWEEP_SMALL = (("learned,rope,alibi", "learned,rope"), ("--seeds 3", "--seeds 1"))  # 2 members, not 9
NO_SLURM = "a line of the sbatch script: needs a SLURM cluster (srun); the requeue it serves is a resume, run above"
# The modern recipe: the learning-rate grid (one seed a point), the three presets (run here shrunk, one seed), prose
RECIPE_BASE = "./manage.py sweep -c conf/extra/{} -c conf/extra/ablation.yaml"
LR_BASE = RECIPE_BASE + " --trainer.val_check_interval=50"
LR_SWEEPS = [
    LR_BASE.format("gpt2.yaml") + " --vary model.learning_rate=1e-3,2e-3,4e-3,8e-3 --name lr-gpt2",
    LR_BASE.format("llama.yaml") + " --vary model.learning_rate=1e-3,2e-3,4e-3,8e-3 --name lr-llama",
    LR_BASE.format("llama.yaml") + " --vary model.learning_rate=1.6e-2 --name lr-llama-high",
    LR_BASE.format("modern.yaml") + " --vary model.muon.lr=0.01,0.02,0.05 --vary model.learning_rate=2e-3,4e-3 "
    "--name lr-modern",
    LR_BASE.format("modern.yaml") + " --vary model.muon.lr=0.005,0.01 --vary model.learning_rate=4e-3,8e-3 "
    "--name lr-modern-fine",
    LR_BASE.format("modern.yaml") + " --vary model.muon.lr=0.0025 --vary model.learning_rate=8e-3 --name lr-modern-low",
    LR_BASE.format("modern.yaml") + " --vary model.muon.lr=0.005 --vary model.learning_rate=1.6e-2 "
    "--name lr-modern-adam",
    "./manage.py compare logs/lr-gpt2 logs/lr-llama logs/lr-llama-high logs/lr-modern logs/lr-modern-fine "
    "logs/lr-modern-low logs/lr-modern-adam",
]
LR_GRID = "the learning-rate grid behind the README's table: 22 runs of ~2 min; the recipe sweeps run shrunk here"
RATES = {"gpt2": "--vary model.learning_rate=4e-3", "llama": "--vary model.learning_rate=8e-3",
         "modern": "--vary model.learning_rate=1.6e-2 --vary model.muon.lr=0.005"}
RECIPES = {f"recipe-{p}": f"{RECIPE_BASE.format(p + '.yaml')} {RATES[p]} --seeds 3 --name recipe-{p}" for p in RATES}
PROSE_SWEEPS = [f"{RECIPE_BASE.format(p + '.yaml')} {RATES[p]} --seeds 3 --name prose-{p} "
                "--data.source=data/enwiki-sample.jsonl" for p in RATES]
PROSE_SWEEPS.append("./manage.py compare logs/prose-gpt2 logs/prose-llama logs/prose-modern --steps-to 2.581")
PROSE = "the prose sample comes from gensim's wheel (not a dependency); the same sweeps run above as recipe-*"


def trained_as_the_modern_preset(work: Path, result: subprocess.CompletedProcess) -> None:
    checkpoint = read_checkpoint_file(newest_checkpoint(work))
    hparams = checkpoint["hyper_parameters"]
    groups = {group["name"]: group for group in checkpoint["optimizer_states"][0]["param_groups"]}
    assert (groups["hidden"]["optimizer"], groups["hidden"]["initial_lr"]) == ("Muon", 0.005)
    assert (hparams["arch"]["mlp"], hparams["arch"]["logit_softcap"], hparams["arch"]["zero_init_proj"]) == \
        ("relu2", 15.0, True)


COMMANDS: dict[str, Skip | Run] = {
    "make train": Skip("the full default experiment (~6 min) in a fresh .venv; its two commands run here, shrunk: "
                       "`./xlab.py fit` and `./infer.py logs/version_0/checkpoints/last.ckpt \"def \"`"),
    "make test": Skip("the test suite this file is part of"),
    "pip install -e .": Skip("installs from the package index; CI's environment is the one `make` installs"),
    "./xlab.py fit": Run(FIT, slow=False, prints=("Epoch 0",),  # the progress bar is on
                         writes=(V0, "logs/version_0/config.yaml", "logs/version_0/hparams.yaml",
                                 "logs/version_0/checkpoints/step*-val*.ckpt", "logs/version_0/events.out.tfevents.*",
                                 "data/*/tokenizer.json", "data/*/train.bin")),
    './infer.py logs/version_0/checkpoints/last.ckpt "def "': Run(needs=("./xlab.py fit",), slow=False,
                                                                    prints=("def ",)),
    "pytest": Skip("the test suite this file is part of"),
    "./xlab.py fit -c conf/tinystories.yaml -c conf/extra/llama.yaml --model.arch.n_kv_heads=2": Run(
        f"{FIT} --model.arch.n_heads=4 {LOCAL}", writes=("logs/version_1/checkpoints/last.ckpt",),
        check=llama_with_two_kv_heads),
    "./xlab.py prepare_data -c conf/xlab.yaml": Run(f"{DATA} {LOCAL}", prints=("encoded train",)),
    "./xlab.py train_tokenizer -c conf/xlab.yaml": Run(f"{DATA} {LOCAL}", prints=("tokenizer",)),
    "./xlab.py compute_stats -c conf/xlab.yaml": Run(f"{DATA} {LOCAL}", prints=("unigram loss",)),
    "./xlab.py fit -c conf/tinystories.yaml": Run(f"{FIT} {LOCAL}", writes=("logs/version_2/checkpoints/last.ckpt",)),
    "./xlab.py fit --trainer.precision=bf16-mixed --model.compile=true --trainer.gradient_clip_val=1.0": Run(
        FIT, writes=("logs/version_3/checkpoints/last.ckpt",)),
    "./xlab.py fit --global_batch_size=512": Run(
        shrunk(PREEMPTED_STEPS, **ACCUMULATED), mode="sigterm",
        slow=False, needs=("./xlab.py fit",), check=preempted_mid_training,
        prints=("global batch 512 = 64 sequences x 1 device x 8 accumulated batches",)),
    "tensorboard --logdir logs": Run("--port 0 --host 127.0.0.1", mode="serve", needs=("./xlab.py fit",)),
    "./xlab.py fit --ckpt_path=last": Run(  # the preempted run above, the newest, trained longer
        f"--global_batch_size=512 {shrunk(LONGER_STEPS, **ACCUMULATED)}",
        slow=False, needs=("./xlab.py fit --global_batch_size=512",), check=resumed_in_its_folder),
    "./xlab.py fit --ckpt_path=logs/version_3/checkpoints/last.ckpt": Run(  # the bf16 + compile run, trained longer
        shrunk(6),
        needs=("./xlab.py fit --trainer.precision=bf16-mixed --model.compile=true --trainer.gradient_clip_val=1.0",),
        check=trained_further("logs/version_3/checkpoints/last.ckpt", 6)),
    SWEEP + " --dry-run": Run(FIT, subs=SWEEP_SMALL, prints=("--seed_everything=0 ",)),
    SWEEP: Run(FIT, subs=SWEEP_SMALL,
               writes=("logs/positions/sweep.json", "logs/positions/position=rope/seed0/checkpoints/last.ckpt",
                       "logs/positions/position=learned/seed0/config.yaml")),
    SWEEP + " --launcher slurm": Skip("needs a SLURM cluster (sbatch); tests/test_sweep.py runs the array with "
                                      "submitit's LocalExecutor, benchmarks/slurm_sweep.sh on a real cluster"),
    "./xlab.py fit -c conf/xlab.yaml -c conf/extra/ddp.yaml": Run(
        f"{FIT} {LOCAL} --trainer.devices=2", prints=("DDP on the CPU: 2 processes per node",)),
    "torchrun --nnodes=2 --nproc-per-node=8 --node-rank=$NODE_RANK --master-addr=node0.example --master-port=29500 "
    "xlab.py fit -c conf/xlab.yaml -c conf/extra/ddp.yaml --trainer.num_nodes=2 --trainer.devices=8": Skip(
        "two machines (node0.example) of 8 GPUs; DDP on 2 CPU processes runs above, and tests/test_distributed.py "
        "runs two nodes on localhost"),
    "source .venv/bin/activate": Skip("the environment this suite already runs in"),
    'RESUME=$(ls logs/version_*/checkpoints/last.ckpt >/dev/null 2>&1 && echo "--ckpt_path=last")': Skip(NO_SLURM),
    "srun ./xlab.py fit -c conf/xlab.yaml -c conf/extra/ddp.yaml --trainer.num_nodes=$SLURM_NNODES "
    "--trainer.devices=$SLURM_NTASKS_PER_NODE $RESUME": Skip(NO_SLURM),
    "./xlab.py validate --ckpt_path=logs/version_0/checkpoints/last.ckpt": Run(
        EVAL, needs=("./xlab.py fit",), prints=("val/loss", "val/perplexity", "val/accuracy", "val/bpb"),
        writes=("logs/version_0/eval/validate-*/config.yaml",)),
    "./xlab.py test --ckpt_path=logs/version_0/checkpoints/last.ckpt": Run(
        EVAL, needs=("./xlab.py fit",), prints=("test/loss", "test/perplexity", "test/accuracy", "test/bpb")),
    "./xlab.py predict --ckpt_path=logs/version_0/checkpoints/last.ckpt": Run(
        EVAL, needs=("./xlab.py fit",), writes=("logs/version_0/eval/predict-*/predictions.jsonl",)),
    # the newest run is the DDP one: evaluated with its own data options, as the README asks
    "./xlab.py predict --ckpt_path=last --data.prompts=prompts.txt --model.generation.strategy=sample "
    "--model.generation.temperature=0.8 --model.generation.top_k=50": Run(
        f"-c conf/xlab.yaml {EVAL} {LOCAL}", needs=("./xlab.py fit -c conf/xlab.yaml -c conf/extra/ddp.yaml",),
        writes=("logs/*/eval/predict-*/predictions.jsonl",)),
    'pip install -e ".[eval]"': Skip("installs from the package index; the dev extra CI installs holds lm-eval"),
    "./evaluate.py --model xlab --model_args checkpoint=logs/version_0/checkpoints/last.ckpt "
    "--tasks hellaswag,lambada_openai,arc_easy,arc_challenge --device cuda --batch_size 32": Run(
        subs=(("hellaswag,lambada_openai,arc_easy,arc_challenge", LOCAL_TASKS), ("--device cuda", "--device cpu")),
        setup=local_tasks, needs=("./xlab.py fit",), prints=("xlab_test_mc", "bits_per_byte")),
    "./manage.py export-hf last.ckpt hf-folder": Run(
        subs=(("last.ckpt", V0),), needs=("./xlab.py fit",), writes=("hf-folder/config.json",)),
    "lm_eval --model hf --model_args pretrained=hf-folder,add_bos_token=True --tasks lambada_openai": Run(
        "--device cpu --batch_size 3", subs=(("lambada_openai", LOCAL_TASKS),), setup=local_tasks,
        needs=("./manage.py export-hf last.ckpt hf-folder",),
        prints=("xlab_test_mc", "bits_per_byte")),
    './infer.py CKPT "def " --greedy': Run(subs=(CKPT,), needs=("./xlab.py fit",), prints=("def ",)),
    './infer.py CKPT "def " --temperature 0.7 --top-p 0.9 --min-p 0.05 --repetition-penalty 1.1 --seed 1': Run(
        subs=(CKPT,), needs=("./xlab.py fit",), prints=("def ",)),
    './infer.py CKPT "def " --beam-width 4 --length-penalty 1.0 --num-samples 3': Run(
        subs=(CKPT,), needs=("./xlab.py fit",), prints=("def ",)),
    "./infer.py CKPT": Run(subs=(CKPT,), stdin="def \n", needs=("./xlab.py fit",), prints=("--- end of reply ---",)),
    "printf 'def \\nclass \\n' | ./infer.py CKPT --greedy": Run(subs=(CKPT,), needs=("./xlab.py fit",),
                                                                  check=two_replies),
    './infer.py model.onnx "def " --top-p 0.9 --seed 1': Run(
        needs=("./manage.py export-onnx logs/version_0/checkpoints/last.ckpt model.onnx --kv-cache",),
        prints=("def ",)),
    './infer.py CKPT "def " --attention maps.png --max-new-tokens 0': Run(
        subs=(CKPT,), needs=("./xlab.py fit",), writes=("maps.png",)),
    "./manage.py export-onnx logs/version_0/checkpoints/last.ckpt model.onnx --kv-cache": Run(
        needs=("./xlab.py fit",), writes=("model.onnx",)),
    ONNX_SAMPLE: Run(needs=("./manage.py export-onnx logs/version_0/checkpoints/last.ckpt model.onnx --kv-cache",),
                     prints=("def ",)),
    './infer.py logs/version_0/checkpoints/last.ckpt "def " --temperature 0.7 --top-p 0.9 --seed 1 '
    "--max-new-tokens 60 --device cpu": Run(needs=("./xlab.py fit", ONNX_SAMPLE), check=same_text_as_onnx),
    "./infer.py logs/version_0/checkpoints/last.ckpt $'def add(x, y):\\n    return x + y\\n' "
    "--attention docs/attention.png --max-new-tokens 0": Run(needs=("./xlab.py fit",), writes=("docs/attention.png",)),
    "./xlab.py fit --trainer.callbacks+=xlab.callbacks.AttentionMaps": Run(FIT, check=logged_attention_maps),
    "./manage.py export-checkpoint CKPT [--output DIR] [--dtype bfloat16] [--force]": Run(
        subs=(CKPT, ("[--output DIR]", "--output exported"), ("[--dtype bfloat16]", "--dtype bfloat16"),
              ("[--force]", "--force")), needs=("./xlab.py fit",), writes=("exported/model.safetensors",)),
    "./manage.py export-hf CKPT OUTPUT_DIR": Run(subs=(CKPT, ("OUTPUT_DIR", "hf-out")), needs=("./xlab.py fit",),
                                                  writes=("hf-out/model.safetensors",)),
    "./manage.py import-hf HF_DIR OUTPUT_DIR": Run(
        subs=(("HF_DIR", "hf-out"), ("OUTPUT_DIR", "imported")), needs=("./manage.py export-hf CKPT OUTPUT_DIR",),
        writes=("imported/xlab.json",)),
    "./manage.py export-onnx CKPT OUT.onnx [--kv-cache] [--opset 17]": Run(
        subs=(CKPT, ("OUT.onnx", "out.onnx"), ("[--kv-cache]", "--kv-cache"), ("[--opset 17]", "--opset 17")),
        needs=("./xlab.py fit",), writes=("out.onnx",)),
    "./manage.py inspect CKPT": Run(subs=(CKPT,), needs=("./xlab.py fit",), prints=("parameters",)),
    "./manage.py inspect OUT.onnx": Run(subs=(("OUT.onnx", "out.onnx"),), prints=("opset",),
                                        needs=("./manage.py export-onnx CKPT OUT.onnx [--kv-cache] [--opset 17]",)),
    "./manage.py extrapolate CKPT [CKPT ...] [--split test] [--factor 4] [--plot out.png]": Run(
        subs=(("[CKPT ...]", "exported"), CKPT, ("[--split test]", "--split test"), ("[--factor 4]", "--factor 4"),
              ("[--plot out.png]", "--plot out.png")),
        needs=("./xlab.py fit", "./manage.py export-checkpoint CKPT [--output DIR] [--dtype bfloat16] [--force]"),
        writes=("out.png",)),
    "./manage.py extrapolate CKPT [CKPT ...] [--split test] [--factor 4] [--windows N] [--plot out.png]": Run(
        subs=(("[CKPT ...] ", ""), CKPT, ("[--split test]", "--split test"), ("[--factor 4]", "--factor 4"),
              ("[--windows N]", "--windows 4"), ("[--plot out.png]", "--plot out4.png")),
        needs=("./xlab.py fit",), writes=("out4.png",)),
    ABLATION: Run(FIT, subs=ABLATION_SMALL, writes=("logs/ablation/position=none/seed0/checkpoints/last.ckpt",)),
    "./manage.py compare logs/positions --plot docs/positions.png": Run(
        subs=(("logs/positions", "logs/ablation"),), needs=(ABLATION,), writes=("docs/positions.png",),
        prints=("| model.arch.position | seeds |", "one seed")),
    "./manage.py extrapolate logs/positions/position={learned,sinusoidal,rope,alibi,none}/seed{0,1,2}/checkpoints/"
    "last.ckpt --split test --factor 4": Run(
        subs=(("logs/positions", "logs/ablation"), ("seed{0,1,2}", "seed0")), needs=(ABLATION,),
        prints=("all 1–32", "all 33–128")),
    "./manage.py extrapolate logs/positions/position={learned,sinusoidal,rope,alibi,none}/seed0/checkpoints/"
    "last.ckpt --split test --factor 4 --plot docs/extrapolation.png": Run(
        subs=(("logs/positions", "logs/ablation"),), needs=(ABLATION,), writes=("docs/extrapolation.png",)),
    "./manage.py compare RUNS_OR_SWEEPS... [--plot curves.png] [--x time] [--steps-to BPB]": Run(
        subs=(("RUNS_OR_SWEEPS...", "logs/ablation"), ("[--plot curves.png]", "--plot curves.png"),
              ("[--x time]", "--x time"), ("[--steps-to BPB]", "--steps-to 100")),
        needs=(ABLATION,),
        writes=("curves.png",), prints=("| model.arch.position | seeds |", "time) to val bpb ≤ 100", "one seed")),
    "./xlab.py fit -c conf/extra/modern.yaml": Run(FIT, check=trained_as_the_modern_preset),
    **{command: Skip(LR_GRID) for command in LR_SWEEPS},
    **{command: Run(FIT, subs=(("--seeds 3", "--seeds 1"),), writes=(f"logs/{name}/*/seed0/checkpoints/last.ckpt",))
       for name, command in RECIPES.items()},
    "./manage.py compare logs/recipe-gpt2 logs/recipe-llama logs/recipe-modern --steps-to 1.831 "
    "--plot docs/recipes.png": Run(needs=tuple(RECIPES.values()), writes=("docs/recipes.png",),
                                   prints=("| sweep | model.learning_rate | model.muon.lr | seeds |", "recipe-modern")),
    "./manage.py compare logs/recipe-gpt2 logs/recipe-llama logs/recipe-modern --plot docs/recipes-time.png "
    "--x time": Run(needs=tuple(RECIPES.values()), writes=("docs/recipes-time.png",)),
    "pip install gensim": Skip("installs from the package index: gensim is not a dependency, only the source of the "
                               "prose sample"),
    "python benchmarks/enwiki_sample.py data/enwiki-sample.jsonl": Skip(
        "needs gensim (not a dependency); the prose sweeps below are the recipe sweeps above on its output"),
    **{command: Skip(PROSE) for command in PROSE_SWEEPS},
    "python benchmarks/gpu_train.py --preset gpt2 --batch 32 --loss-chunk-size 8192": Skip(
        "a GPU benchmark (benchmarks/gpu_session.sh on a lent GPU), not CI"),
    "python benchmarks/gpu_train.py --preset gpt2 --batch 32 --attention-backends cudnn": Skip(
        "a GPU benchmark (benchmarks/gpu_session.sh on a lent GPU), not CI"),
    "make lint": Skip("CI runs it itself, before make test (.ci/run)"),
    "make check-readme": Skip("runs this file"),
    "make bench": Skip("the benchmarks (tens of minutes), not CI"),
}


# ------------------------------------------------------------------------------ reading the README


def strip_comment(line: str) -> str:
    """`line` up to a `#` that starts a shell comment: at the start of a word, outside quotes."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote and line[i - 1] != "\\" else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def readme_commands(text: str) -> list[str]:
    """The commands of the ```bash blocks of a Markdown text, in order, each once: lines continued by `\\` joined,
    comments and blank lines dropped, a `for ...; do` loop one command up to its `done` (body lines joined by `; `)."""
    commands, pending, loop = [], "", None
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        for raw in block.splitlines():
            line = pending + strip_comment(raw).strip()
            pending = line[:-1].rstrip() + " " if line.endswith("\\") else ""
            if pending or not line:
                continue
            if line.startswith("for ") and line.endswith("; do"):
                loop = [line]
            elif loop is not None and line == "done":
                commands.append(f"{loop[0]} {'; '.join(loop[1:])}; done")
                loop = None
            elif loop is not None:
                loop.append(line)
            else:
                commands.append(line)
    return list(dict.fromkeys(commands))


def in_order(commands: dict[str, Skip | Run]) -> list[str]:
    """README order, except that a command comes after the commands it needs."""
    order, waiting = [], list(commands)
    while waiting:
        ready = next((c for c in waiting if all(need in order for need in getattr(commands[c], "needs", ()))), None)
        if ready is None:
            raise ValueError(f"these need commands that are not in the table, or each other: {waiting}")
        order.append(ready)
        waiting.remove(ready)
    return order


def test_the_reader_joins_continuations_and_drops_comments():
    text = ("```bash\n#!/bin/bash\n./a.py x \\\n    --y=1   # a comment\n# a line of comment\n"
            "./a.py $'p\\n#q' \"#r\" s#t   # u\n\nfor i in 1 2; do\n  ./a.py $i\ndone\n./a.py x --y=1\n```\n"
            "```python\nprint(1)\n```\n```bash\nmake   # v\n```\n")
    assert readme_commands(text) == ["./a.py x --y=1", "./a.py $'p\\n#q' \"#r\" s#t",
                                     "for i in 1 2; do ./a.py $i; done", "make"]


def test_every_readme_command_has_an_entry():
    commands = readme_commands((ROOT / "README.md").read_text())
    assert not set(commands) - set(COMMANDS), "README commands without an entry in COMMANDS"
    assert not set(COMMANDS) - set(commands), "entries of COMMANDS that are no longer in the README"
    for command, entry in COMMANDS.items():  # `make test` runs the fast ones alone: they need only fast ones
        for need in getattr(entry, "needs", ()):
            assert entry.slow or not COMMANDS[need].slow, f"{command!r} is fast but needs the slow {need!r}"


# ------------------------------------------------------------------------------ running them


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A user's clone: conf/ and the scripts (linked), docs/ (a folder of its own: commands write there), and the
    prompts file of the README's predict example."""
    folder = tmp_path_factory.mktemp("readme")
    for name in ("conf", "xlab.py", "infer.py", "manage.py", "evaluate.py", "benchmarks"):
        (folder / name).symlink_to(ROOT / name)
    (folder / "docs").mkdir()
    (folder / "prompts.txt").write_text("def \nclass \n")
    return folder


def environment() -> dict[str, str]:
    """The user's shell with this suite's Python first on PATH (the scripts' `env python3`, tensorboard,
    lm_eval), a free port for DDP, offline Hugging Face, and one thread per process on the shared cores."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "MASTER_PORT": str(free_port()), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def execute(line: str, entry: Run, work: Path) -> subprocess.CompletedProcess:
    if entry.mode == "serve":
        return serve(line, work)
    if entry.mode == "sigterm":
        return preempt(line, work)
    result = subprocess.run(["bash", "-c", line], cwd=work, env=environment(), input=entry.stdin, text=True,
                            capture_output=True, timeout=600)
    assert result.returncode == 0, f"exit {result.returncode}:\n{tail(result)}"
    return result


def preempt(line: str, work: Path) -> subprocess.CompletedProcess:
    """Start `line`, send it SIGTERM once it has written a checkpoint, and expect exit status 143."""
    started = time.time()
    with subprocess.Popen(["bash", "-c", f"exec {line}"], cwd=work, env=environment(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        while process.poll() is None and not any(p.stat().st_mtime >= started
                                                 for p in work.glob("logs/**/checkpoints/last.ckpt")):
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=600)
    result = subprocess.CompletedProcess(line, process.returncode, stdout, stderr)
    assert result.returncode == 128 + signal.SIGTERM, f"exit {result.returncode}, not 143:\n{tail(result)}"
    return result


def serve(line: str, work: Path) -> subprocess.CompletedProcess:
    """Start a server that prints its address, ask it for its runs, and stop it."""
    with subprocess.Popen(["bash", "-c", f"exec {line}"], cwd=work, env=environment(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as process:
        try:
            printed = ""
            while not (found := re.search(r"http://\S+/", printed)) and process.poll() is None:
                printed += process.stdout.readline()
            assert found, f"exit {process.returncode} before serving:\n{printed}"
            runs = json.loads(urllib.request.urlopen(found.group(0) + "data/runs", timeout=60).read())
            assert "version_0" in runs, runs
        finally:
            process.terminate()
    return subprocess.CompletedProcess(line, 0, printed, "")


def tail(result: subprocess.CompletedProcess) -> str:
    return f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def case_id(command: str) -> str:
    """The README command, then what is replaced in it and the flags added."""
    entry = COMMANDS[command]
    if isinstance(entry, Skip):
        return command
    subs = "".join(f" [{old}->{new}]" for old, new in entry.subs)
    stdin = f" < {entry.stdin!r}" if entry.stdin else ""
    return f"{command}{subs}{' + ' + entry.flags if entry.flags else ''}{stdin}"


def cases() -> list:
    fast = {command for command, entry in COMMANDS.items() if isinstance(entry, Run) and not entry.slow}
    return [pytest.param(command, id=case_id(command), marks=() if command in fast else SLOW)
            for command in in_order(COMMANDS)]


PASSED: dict[str, bool] = {}  # README command -> whether it ran as it should (absent: not run)


@pytest.mark.parametrize("command", cases())
def test_readme_command(command, work):
    entry = COMMANDS[command]
    if isinstance(entry, Skip):
        pytest.skip(entry.reason)
    for need in entry.needs:
        if need not in PASSED:
            pytest.skip(f"needs `{need}`, which did not run (make check-readme runs every command)")
        if not PASSED[need]:
            pytest.skip(f"needs `{need}`, which failed")
    PASSED[command] = False
    if entry.setup:
        entry.setup(work)
    result = execute(entry.command(command), entry, work)
    STDOUT[command] = result.stdout
    output = result.stdout + result.stderr
    for text in entry.prints:
        assert text in output, f"{text!r} is not in the output:\n{tail(result)}"
    for pattern in entry.writes:
        assert list(work.glob(pattern)), f"nothing written at {pattern}:\n{tail(result)}"
    if entry.check:
        entry.check(work, result)
    PASSED[command] = True
