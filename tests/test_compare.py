"""`manage.py compare`: the differing keys and the groups on hand-made configs; the statistics against values
worked out by hand (closed forms of Student's t for 1 and 2 degrees of freedom) and scipy; the table, plot,
--steps-to and HParams records on the events of real short runs laid out as a sweep, against the same events
read independently with TensorBoard's reader; one-line errors."""

from __future__ import annotations

import json
import math
import re
import shutil
import statistics
import time

import numpy as np
import pytest
import yaml
from conftest import run_cli, tiny_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_export import one_thread
from test_manage import run as manage

from xlab.checkpoint import read_checkpoint_file
from xlab.compare import (
    Group,
    Run,
    differing_keys,
    flatten,
    format_table,
    group_runs,
    read_scalars,
    summarize,
    t_quantile,
    t_two_sided_p,
    welch,
)

assert one_thread  # autouse fixture, imported to apply here
POSITIONS, SEEDS = ("learned", "rope"), (1, 2)
STEPS, VAL_EVERY = 6, 2


# ------------------------------------------------------------------------------------------------ statistics


@pytest.mark.parametrize("t", [0.3, 1.0, 2.5, 12.7])
def test_t_distribution_matches_its_closed_forms(t):
    # df = 1 is Cauchy's: P(|T| >= t) = 1 - 2 atan(t) / pi; df = 2: 1 - t / sqrt(2 + t²)
    assert t_two_sided_p(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, rel=1e-10)
    assert t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10)
    assert t_two_sided_p(-t, 2) == t_two_sided_p(t, 2)


def test_t_quantiles_match_their_closed_forms():
    p = 0.975
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)  # 12.706
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)  # 4.303
    assert t_quantile(p, 1e7) == pytest.approx(statistics.NormalDist().inv_cdf(p), rel=1e-5)  # 1.960


def test_summary_by_hand():
    s = summarize([1.0, 2.0, 4.0])
    std = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)  # sqrt(7/3)
    half = 0.95 / math.sqrt(2 * 0.975 * 0.025) * std / math.sqrt(3)  # t(0.975, 2) = 4.303 by its closed form
    assert (s.n, s.mean, s.std) == (3, pytest.approx(7 / 3), pytest.approx(std))
    assert (s.low, s.high) == (pytest.approx(7 / 3 - half), pytest.approx(7 / 3 + half))
    one = summarize([5.0])
    assert one.mean == 5.0 and math.isnan(one.std) and math.isnan(one.low)


def test_welch_by_hand():
    # one sample without spread: t = (1 - 3) / sqrt(var(b) / 3) with var(b) = 1, df = n_b - 1 = 2
    t, df, p = welch([1.0, 1.0, 1.0], [2.0, 3.0, 4.0])
    assert t == pytest.approx(-2 / math.sqrt(1 / 3))
    assert df == pytest.approx(2)
    assert p == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t))  # df = 2's closed form: 0.0742


@pytest.mark.parametrize("a, b", [([1.0, 2.0, 3.0], [4.0, 6.0, 8.0]), ([2.31, 2.35, 2.29, 2.40], [2.44, 2.38]),
                                  ([0.1, 0.5], [0.2, 0.9, 0.4, 0.7, 0.3])])
def test_statistics_match_scipy(a, b):
    stats = pytest.importorskip("scipy.stats")
    expected = stats.ttest_ind(a, b, equal_var=False)
    t, df, p = welch(a, b)
    assert (t, p) == (pytest.approx(expected.statistic, rel=1e-9), pytest.approx(expected.pvalue, rel=1e-7))
    assert df == pytest.approx(expected.df, rel=1e-12)
    low, high = stats.t.interval(0.95, len(a) - 1, loc=np.mean(a), scale=stats.sem(a))
    assert (summarize(a).low, summarize(a).high) == (pytest.approx(low, rel=1e-9), pytest.approx(high, rel=1e-9))
    for df in (1.5, 3, 7.25, 30):
        assert t_quantile(0.975, df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-9)


# ------------------------------------------------------------------------------------------------ keys and groups


def config(position: str, run_seed: int, version: str, **data) -> dict:
    return flatten({"seed_everything": run_seed, "ckpt_path": None,
                    "trainer": {"max_steps": 6, "logger": {"init_args": {"save_dir": "logs", "version": version}},
                                "callbacks": [{"class_path": "ModelCheckpoint", "init_args": {"monitor": "val/loss"}}]},
                    "model": {"arch": {"position": position, "d_model": 32}, "betas": [0.9, 0.95]},
                    "data": {"vocab_size": 300, **data}})


def test_flatten_dots_the_keys_and_numbers_lists_of_dicts():
    flat = config("rope", 1, "v0")
    assert flat["model.arch.position"] == "rope" and flat["model.betas"] == [0.9, 0.95]
    assert flat["trainer.callbacks.0.init_args.monitor"] == "val/loss"


def test_differing_keys_ignore_the_seed_and_where_runs_are_filed():
    configs = [config(position, seed, f"version_{i}", **({"seed": 7} if i == 3 else {}))
               for i, (position, seed) in enumerate([("rope", 1), ("rope", 2), ("alibi", 1), ("alibi", 2)])]
    # data.seed is a setting (the split), absent from three configs: absent counts as a value
    assert differing_keys(configs) == ["model.arch.position", "data.seed"]
    assert differing_keys(configs[:2]) == []  # two seeds of one setting
    runs = [Run(None, c, {}, 0.0) for c in configs]
    groups = group_runs(runs, differing_keys(configs))
    assert [(g.values, [r.seed for r in g.runs]) for g in groups] == [
        (("rope", None), [1, 2]), (("alibi", None), [1]), (("alibi", 7), [2])]


def fake_run(seed: int, bpb: list[float], vocab_size: int = 300) -> Run:
    steps = np.arange(1, len(bpb) + 1) * 2
    scalars = {"val/bpb": (steps, np.array(bpb), steps * 1.0), "val/loss": (steps, np.array(bpb) * 2, steps * 1.0),
               "train/tokens_seen": (steps, steps * 100.0, steps * 1.0)}
    return Run(None, {"seed_everything": seed, "data.vocab_size": vocab_size}, scalars, float(steps[-1]))


def test_different_tokenizers_compare_on_bpb_only():
    groups = [Group((300,), [fake_run(1, [3.0, 2.5]), fake_run(2, [3.1, 2.6])]),
              Group((500,), [fake_run(1, [3.0, 2.0])])]
    table = format_table(groups, ["data.vocab_size"])
    assert "val loss" not in table and "final val bpb" in table
    assert "different tokenizers (data.vocab_size differ): compared on bits per byte only" in table
    assert "one seed: no test" in table
    rows = [line for line in table.splitlines() if line.startswith("| 500") or line.startswith("| 300")]
    assert rows[0].startswith("| 500 ★ | 1 |")  # the lower final bpb first, marked


# ------------------------------------------------------------------------------------------------ real runs


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two position types x two seeds of a tiny model, 6 steps, validated every 2, filed as a sweep folder with a
    hand-written sweep.json: `<sweep>/<position>/seed<k>/`, through the real `xlab.py fit`."""
    root = tmp_path_factory.mktemp("compare")
    folder = root / "positions"
    members = []
    for position in POSITIONS:
        for seed in SEEDS:
            overrides = {"model.arch.position": position, "seed_everything": seed,
                         "trainer.logger.init_args.save_dir": folder / position,
                         "trainer.logger.init_args.version": f"seed{seed}"}
            run_cli("fit", *tiny_args(root, steps=STEPS, **overrides))
            members.append({"member": position, "seed": seed, "overrides": {"model.arch.position": position},
                            "run": f"{position}/seed{seed}"})
    (folder / "sweep.json").write_text(json.dumps({"name": "positions", "base": [], "seeds": len(SEEDS),
                                                   "vary": {"model.arch.position": list(POSITIONS)},
                                                   "members": members}))
    return folder


def events(run) -> EventAccumulator:
    accumulator = EventAccumulator(str(run), size_guidance={"scalars": 0})
    accumulator.Reload()
    return accumulator


def table_rows(out: str) -> dict[str, list[str]]:
    """The table's rows by their first cell, the best marker removed."""
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in rows[0]]
    return {"header": header, **{cells[0].strip(" ★"): [c.strip() for c in cells] for cells in rows[1:]}}


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def test_table_of_a_sweep_matches_its_events(sweep, capsys):
    code, out, err = manage(capsys, "compare", sweep)
    assert code == 0, err
    rows = table_rows(out)
    assert rows["header"][:6] == ["model.arch.position", "seeds", "steps", "tokens", "wall time", "tokens/s"]
    assert not any("seed_everything" in cell or "save_dir" in cell for cell in rows["header"])
    finals = {}
    for position in POSITIONS:
        runs = [sweep / position / f"seed{seed}" for seed in SEEDS]
        scalars = [events(run) for run in runs]
        bpb = [[s.value for s in e.Scalars("val/bpb")] for e in scalars]
        loss = [[s.value for s in e.Scalars("val/loss")] for e in scalars]
        assert len(bpb[0]) == STEPS // VAL_EVERY
        ckpts = [read_checkpoint_file(run / "checkpoints" / "last.ckpt") for run in runs]
        cells = dict(zip(rows["header"], rows[position], strict=True))
        assert cells["seeds"] == "2" and cells["steps"] == str(STEPS)
        assert ckpts[0]["global_step"] == STEPS
        assert cells["tokens"] == f"{ckpts[0]['xlab']['tokens_seen']:,}" == f"{STEPS * 4 * 32:,}"  # batch 4 x 32
        # the last tokens_seen logged is the checkpoint's count
        assert scalars[0].Scalars("train/tokens_seen")[-1].value == STEPS * 4 * 32
        assert cells["final val bpb"].startswith(mean_std([b[-1] for b in bpb]))
        assert cells["best val bpb"].startswith(mean_std([min(b) for b in bpb]))
        assert cells["final val loss"].startswith(mean_std([v[-1] for v in loss]))
        finals[position] = [b[-1] for b in bpb]
        walls = [max(s.wall_time for tag in e.Tags()["scalars"] for s in e.Scalars(tag)) - e.FirstEventTimestamp()
                 for e in scalars]
        assert walls[0] < 60 and cells["wall time"] == f"{statistics.mean(walls):.1f} s"
    best = min(POSITIONS, key=lambda p: statistics.mean(finals[p]))
    assert re.search(rf"^\| {best} ★ \|", out, re.M)
    other = next(p for p in POSITIONS if p != best)
    stats = pytest.importorskip("scipy.stats")
    p = stats.ttest_ind(finals[best], finals[other], equal_var=False).pvalue
    assert f"{best} leads {other}" in out and f"p = {p:.3g}" in out


def test_sweeps_group_by_what_they_vary(sweep, tmp_path, capsys):
    """Sweeps alone are grouped by their --vary values: a sweep that varies config files gets one column (its
    members differ in many config keys), and several sweeps get their names first, so equal values in two sweeps
    stay two groups."""
    presets = tmp_path / "presets"
    members = [{"member": f"config={p}.yaml", "seed": seed, "overrides": {"config": f"{p}.yaml"},
                "run": f"{p}/seed{seed}"} for p in POSITIONS for seed in SEEDS]
    for p in POSITIONS:
        shutil.copytree(sweep / p, presets / p)
    (presets / "sweep.json").write_text(json.dumps({"name": "presets", "base": [], "seeds": len(SEEDS),
                                                    "vary": {"config": [f"{p}.yaml" for p in POSITIONS]},
                                                    "members": members}))
    code, out, err = manage(capsys, "compare", presets)
    assert code == 0, err
    rows = table_rows(out)
    assert rows["header"][:2] == ["config", "seeds"]  # not model.arch.position, which differs too
    own = table_rows(manage(capsys, "compare", sweep)[1])
    for p in POSITIONS:
        assert rows[f"{p}.yaml"][1:] == own[p][1:]  # the same runs: the same figures
    code, out, err = manage(capsys, "compare", sweep, presets)
    assert code == 0, err
    assert table_rows(out)["header"][:4] == ["sweep", "model.arch.position", "config", "seeds"]
    groups = [[cell.strip().removesuffix(" ★") for cell in line.strip("|").split("|")][:4]
              for line in out.splitlines()[2:] if line.startswith("| ")]
    assert sorted(groups) == sorted([["positions", p, "", "2"] for p in POSITIONS]
                                    + [["presets", "", f"{p}.yaml", "2"] for p in POSITIONS])


def hparams_sessions(logdir) -> dict:
    """run -> (session start info, final val bpb metric) of each HParams session TensorBoard's server finds under
    `logdir`: its multiplexer (the plugin event reader) and the HParams plugin's metadata."""
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import metadata
    from tensorboard.util import tensor_util

    mux = EventMultiplexer(tensor_size_guidance={"tensors": 0}).AddRunsFromDirectory(str(logdir))
    mux.Reload()
    sessions = {}
    for run, tags in mux.PluginRunToTagToContent(metadata.PLUGIN_NAME).items():
        for tag, content in tags.items():
            if tag == metadata.SESSION_START_INFO_TAG:
                metric = mux.Tensors(run, "compare/final_val_bpb")[-1].tensor_proto
                sessions.setdefault(run, []).append((metadata.parse_session_start_info_plugin_data(content),
                                                     float(tensor_util.make_ndarray(metric))))
    return sessions


def test_sweep_members_get_one_hparams_record_each(sweep, capsys):
    for _ in range(2):  # rerunning compare adds no record
        assert manage(capsys, "compare", sweep)[0] == 0
    sessions = hparams_sessions(sweep)
    assert sorted(sessions) == sorted(f"{p}/seed{s}/hparams" for p in POSITIONS for s in SEEDS)
    for position in POSITIONS:
        for seed in SEEDS:
            run = sweep / position / f"seed{seed}"
            assert len(list((run / "hparams").glob("events.out.tfevents.*"))) == 1
            [(info, final)] = sessions[f"{position}/seed{seed}/hparams"]
            assert info.hparams["model.arch.position"].string_value == position
            assert info.hparams["seed_everything"].number_value == seed
            assert final == pytest.approx([s.value for s in events(run).Scalars("val/bpb")][-1])


def test_compare_names_runs_and_plots(sweep, tmp_path, capsys):
    runs = [sweep / "rope" / f"seed{seed}" for seed in SEEDS]
    png = tmp_path / "curves.png"
    code, out, err = manage(capsys, "compare", *runs, "--plot", png)
    assert code == 0, err
    assert "all runs" in out and "one group: nothing to rank" in out  # two seeds of one setting
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert manage(capsys, "compare", *runs, "--plot", png)[0] == 2  # an existing plot is kept without --force
    code, out, err = manage(capsys, "compare", sweep, "--plot", png, "--x", "time", "--force")
    assert code == 0 and png.stat().st_size > 1000, err


def test_steps_to(sweep, capsys):
    curves = {}
    for position in POSITIONS:
        scalars = [events(sweep / position / f"seed{seed}") for seed in SEEDS]
        mean = np.mean([[s.value for s in e.Scalars("val/bpb")] for e in scalars], axis=0)
        tokens = {s.step: s.value for s in scalars[0].Scalars("train/tokens_seen")}
        # the seeds' mean wall time at each validation, from each run's first event
        seconds = np.mean([[s.wall_time - e.FirstEventTimestamp() for s in e.Scalars("val/bpb")] for e in scalars],
                          axis=0)
        steps = [s.step + 1 for s in scalars[0].Scalars("val/bpb")]  # optimizer steps done
        curves[position] = mean, [tokens[s.step] for s in scalars[0].Scalars("val/bpb")], seconds, steps
    # a target that the second validation's mean reaches for rope, and one nobody reaches
    target = float(curves["rope"][0][1]) + 1e-6
    code, out, err = manage(capsys, "compare", sweep, "--steps-to", target)
    assert code == 0, err
    rows = table_rows(out)
    column = rows["header"].index(f"steps (tokens, time) to val bpb ≤ {target:g}")
    for position, (mean, tokens, seconds, steps) in curves.items():
        reached = [(n, f"{t:,.0f}", f"{s:.1f} s") for m, t, s, n in zip(mean, tokens, seconds, steps, strict=True)
                   if m <= target]
        assert rows[position][column] == ("{} ({}, {})".format(*reached[0]) if reached else "not reached")
    out = manage(capsys, "compare", sweep, "--steps-to", 0.01)[1]
    assert out.count("not reached") == len(POSITIONS)


# ------------------------------------------------------------------------------------------------ events files


def test_a_resumed_runs_later_events_file_wins_from_its_first_step(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    # the first session logged steps 0-5, its last checkpoint was at step 3; the resume logs steps 3-7
    sessions = []
    for suffix, first_step, base, late in ((".a", 0, 10, 100), (".b", 3, 100, 200)):
        now = time.time()
        with SummaryWriter(str(tmp_path), filename_suffix=suffix) as writer:
            steps = range(first_step, first_step + 5 if first_step else 6)
            for step in steps:
                writer.add_scalar("train/loss", base - step if first_step == 0 else base + step, step,
                                  walltime=now + late + step)
        accumulator = EventAccumulator(str(next(tmp_path.glob(f"events.out.tfevents.*{suffix}"))))
        accumulator.Reload()
        sessions.append(now + late + steps[-1] - accumulator.FirstEventTimestamp())
    scalars, wall = read_scalars(tmp_path)
    steps, values, _ = scalars["train/loss"]
    assert steps.tolist() == [s + 1 for s in range(8)]  # optimizer steps done: TensorBoard's step + 1
    assert values.tolist() == [10, 9, 8, 103, 104, 105, 106, 107]
    assert wall == pytest.approx(sum(sessions), abs=1e-3)


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_input_is_one_line(sweep, tmp_path, capsys):
    code, out, err = manage(capsys, "compare", tmp_path)
    assert code == 2 and err.count("\n") == 1 and "neither a run folder" in err
    run = tmp_path / "unvalidated"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"seed_everything": 1}))
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run)) as writer:
        writer.add_scalar("train/loss", 5.0, 0)
    code, out, err = manage(capsys, "compare", run, sweep / "rope" / "seed1")
    assert code == 2 and err.count("\n") == 1 and "logged no val/bpb" in err
    code, out, err = manage(capsys, "compare", sweep, "--x", "time")
    assert code == 2 and "--plot" in err
