"""`manage.py compare`: runs side by side, grouped by their settings, with the seed noise stated.

Each run folder (`./xlab.py fit`'s `logs/version_N/`, or a member of a sweep folder, which holds `sweep.json`) gives
its config (config.yaml, or the newest config-resume-*.yaml of a resumed run) and its scalars, read with
TensorBoard's own reader. The config keys whose values differ between runs (the seed aside) define the groups, or,
when only sweeps are named, what each sweep varies (its `--vary` values, after its name when there are several); the
runs of a group differ only by seed. The table gives each group's mean ± std over seeds and a 95% interval of the
mean (Student's t), marks the group with the lowest final val bpb and tests its lead over the next with Welch's
t-test. The members of a sweep also get a TensorBoard HParams record (`<run>/hparams/`).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from xlab.checkpoint import atomic_output, check_output, run_counters

SEED = "seed_everything"
# settings that differ between runs by nature (where the run is filed, what it resumed from), not experiments
PER_RUN = ("trainer.logger.init_args.save_dir", "trainer.logger.init_args.name", "trainer.logger.init_args.version",
           "ckpt_path")
TOKENIZER_KEYS = ("data.vocab_size", "data.pretrained_tokenizer")
HPARAMS_FOLDER = "hparams"  # in each sweep member's run folder: its TensorBoard HParams record, rewritten by compare
EVENTS = "events.out.tfevents.*"


# ------------------------------------------------------------------------------------------------ statistics


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), 0 <= x <= 1."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):  # where the fraction converges fast; else by symmetry
        return front * _betacf(a, b, x) / a
    return 1 - front * _betacf(b, a, 1 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom (df may be fractional, as Welch's is)."""
    return incomplete_beta(df / 2, 0.5, df / (df + t * t))


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p, p in (0.5, 1): bisection on the distribution function."""
    lo, hi = 0.0, 1.0
    while 1 - t_two_sided_p(hi, df) / 2 < p:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 1 - t_two_sided_p(mid, df) / 2 < p else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation (n - 1) and the 95% interval of the mean, mean ± t(0.975, n-1) std / √n,
    of n values; std and the interval are nan for n = 1."""

    n: int
    mean: float
    std: float
    low: float
    high: float


def summarize(values: list[float]) -> Summary:
    n, mean = len(values), float(np.mean(values))
    if n < 2:
        return Summary(n, mean, math.nan, math.nan, math.nan)
    std = float(np.std(values, ddof=1))
    half = t_quantile(0.975, n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def welch(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Welch's t-test of equal means, unequal variances: (t, Welch-Satterthwaite df, two-sided p). Needs two values
    in each sample and some spread in one."""
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return float(t), float(df), t_two_sided_p(float(t), float(df))


# ------------------------------------------------------------------------------------------------ reading runs


@dataclass
class Run:
    """One run folder: its flattened config and its scalars, `tag -> (steps, values, seconds)` arrays where a step
    counts the optimizer steps done (TensorBoard's step + 1) and seconds are the run's wall time at the record."""

    path: Path
    config: dict[str, object]
    scalars: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
    wall: float  # seconds: each session (events file) from its first to its last record, summed
    counters: tuple[int, int] | None = None  # last.ckpt's (optimizer steps, tokens seen), when there is one

    @property
    def seed(self) -> object:
        return self.config.get(SEED)

    @property
    def steps(self) -> int:
        if self.counters:
            return self.counters[0]
        return int(max(steps[-1] for steps, _, _ in self.scalars.values()))

    def tokens_at(self, steps: np.ndarray) -> np.ndarray:
        """Tokens trained on after `steps` optimizer steps: interpolated between the logged `train/tokens_seen`
        (and last.ckpt's counters), proportionally past the last of them (a constant batch)."""
        known_steps, known_tokens, _ = self.scalars.get("train/tokens_seen", (np.zeros(0),) * 3)
        points = dict(zip(known_steps.tolist(), known_tokens.tolist(), strict=True))
        if self.counters:
            points[self.counters[0]] = self.counters[1]
        if not points:
            raise ValueError(f"{self.path} logged no train/tokens_seen and has no checkpoints/last.ckpt: "
                             "its tokens are unknown")
        xs, ys = zip(*sorted({0: 0, **points}.items()), strict=True)
        steps = np.asarray(steps, dtype=float)
        return np.where(steps <= xs[-1], np.interp(steps, xs, ys), steps * ys[-1] / max(xs[-1], 1))

    @property
    def tokens(self) -> float:
        return self.counters[1] if self.counters else float(self.tokens_at(np.array([self.steps]))[0])

    def val(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.scalars.get(f"val/{name}", (np.zeros(0),) * 3)


def flatten(tree: object, prefix: str = "") -> dict[str, object]:
    """Nested dicts to dotted keys; a list holding dicts (callbacks) by index, other lists stay values."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list) and any(isinstance(item, dict) for item in tree):
        items = enumerate(tree)
    else:
        return {prefix: tree}
    flat = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def read_config(folder: Path) -> dict[str, object]:
    """The settings the run last ran with: its newest config-resume-*.yaml, else its config.yaml."""
    newest = sorted(folder.glob("config-resume-*.yaml"))[-1:] or [folder / "config.yaml"]
    return flatten(yaml.safe_load(newest[0].read_text()) or {})


def read_scalars(folder: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], float]:
    """Every scalar of the folder's events files, read in the order they were written: a later file (a resume)
    replaces the earlier files' records from its first step on, as TensorBoard purges orphaned data. Also the
    wall time: each file from its first event to its last record, summed."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sessions = []
    for path in folder.glob(EVENTS):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})  # 0: every record, no sampling
        events.Reload()
        records = {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}
        sessions.append((events.FirstEventTimestamp(), records))
    merged: dict[str, dict[int, tuple[float, float]]] = {}
    wall = 0.0
    for start, records in sorted(sessions, key=lambda session: session[0]):
        if not any(records.values()):
            continue
        first = min(r.step for rs in records.values() for r in rs) + 1  # in optimizer steps done, as the keys
        for points in merged.values():
            for step in [s for s in points if s >= first]:
                del points[step]
        for tag, rs in records.items():  # seconds into the run: earlier sessions' time, then this one's
            merged.setdefault(tag, {}).update({r.step + 1: (r.value, wall + r.wall_time - start) for r in rs})
        wall += max(r.wall_time for rs in records.values() for r in rs) - start
    scalars = {}
    for tag, points in merged.items():
        steps = sorted(points)
        scalars[tag] = (np.array(steps), *(np.array(column) for column in zip(*map(points.get, steps), strict=True)))
    return {tag: value for tag, value in scalars.items() if len(value[0])}, wall


def is_run(folder: Path) -> bool:
    return (folder / "config.yaml").is_file() and any(folder.glob(EVENTS))


def read_run(folder: Path) -> Run:
    scalars, wall = read_scalars(folder)
    return Run(folder, read_config(folder), scalars, wall, run_counters(folder))


@dataclass
class Sweep:
    """A sweep folder (`sweep.json`): its varied keys, its members' run folders and each one's values of them."""

    path: Path
    vary: list[str]
    runs: list[Path]
    overrides: dict[Path, dict[str, str]]  # run folder -> its --vary values, as given


def locate(paths: list[str]) -> tuple[list[Path], list[Sweep]]:
    """The run folders named and the sweeps named, with their members' folders (those started)."""
    runs, sweeps = [], []
    for name in paths:
        folder = Path(name)
        if (folder / "sweep.json").is_file():
            described = json.loads((folder / "sweep.json").read_text())
            members = described["members"]
            started = {folder / m["run"]: m["overrides"] for m in members if is_run(folder / m["run"])}
            sweeps.append(Sweep(folder, list(described["vary"]), list(started), started))
            if len(sweeps[-1].runs) < len(members):
                print(f"note: {len(members) - len(sweeps[-1].runs)} of the {len(members)} members of {folder} "
                      "have not started: left out", file=sys.stderr)
        elif is_run(folder):
            runs.append(folder)
        else:
            raise ValueError(f"{folder} is neither a run folder (config.yaml and TensorBoard events, as ./xlab.py "
                             "fit writes) nor a sweep folder (sweep.json)")
    return runs, sweeps


def read_runs(folders: list[Path], sweeps: list[Sweep]) -> dict[Path, Run]:
    """Each run once, by its resolved path. A run named that has not validated is an error; a sweep member that
    has not (yet) is left out with a note."""
    runs = {}
    for folder in folders + [run for sweep in sweeps for run in sweep.runs]:
        if folder.resolve() in runs:
            continue
        run = read_run(folder)
        if len(run.val("bpb")[0]):
            runs[folder.resolve()] = run
        elif folder in folders:
            raise ValueError(f"{folder} logged no val/bpb: it has not validated yet (compare needs validations)")
        else:
            print(f"note: {folder} has not validated yet: left out", file=sys.stderr)
    return runs


# ------------------------------------------------------------------------------------------------ grouping


def differing_keys(configs: list[dict[str, object]]) -> list[str]:
    """The config keys whose values are not the same in every run (absent counts as a value), per-run keys and
    the seed excepted, in the order of the first config."""
    keys = list(dict.fromkeys(key for config in configs for key in config))
    missing = object()
    return [key for key in keys if key not in PER_RUN and key != SEED
            and len({repr(config.get(key, missing)) for config in configs}) > 1]


@dataclass
class Group:
    """Runs with the same values of the differing keys: they differ only by seed."""

    values: tuple[object, ...]
    runs: list[Run]

    def final(self, name: str) -> list[float]:
        return [float(run.val(name)[1][-1]) for run in self.runs]

    def best(self, name: str) -> list[float]:
        return [float(run.val(name)[1].min()) for run in self.runs]

    def curve(self, name: str, x: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """At the validations every run of the group made (the same steps): x (the runs' mean tokens, or
        seconds), and the runs' mean, min and max of val/`name`."""
        common = self.validated_steps(name)
        rows, xs = [], []
        for run in self.runs:
            steps, values, seconds = run.val(name)
            keep = np.isin(steps, common)
            rows.append(values[keep])
            xs.append(run.tokens_at(steps[keep]) if x == "tokens" else seconds[keep])
        rows = np.stack(rows)
        return np.mean(xs, axis=0), rows.mean(0), rows.min(0), rows.max(0)

    def validated_steps(self, name: str) -> list[int]:
        """The steps at which every run of the group logged val/`name`."""
        return sorted(set.intersection(*(set(run.val(name)[0].tolist()) for run in self.runs)))

    def reaches(self, target: float) -> tuple[int, float, float] | None:
        """Steps, tokens and seconds (the runs' means) at the first validation where the group's mean val bpb is
        <= target, else None."""
        tokens, mean, _, _ = self.curve("bpb", "tokens")
        seconds = self.curve("bpb", "time")[0]
        reached = np.flatnonzero(mean <= target)
        if not len(reached):
            return None
        first = reached[0]
        return self.validated_steps("bpb")[first], float(tokens[first]), float(seconds[first])


def group_runs(runs: list[Run], keys: list[str], labels: dict[Path, tuple] | None = None) -> list[Group]:
    """Runs with equal values of `keys` in their configs, or with equal `labels` (resolved run path -> values)."""
    groups: dict[str, Group] = {}
    for run in runs:
        values = labels[run.path.resolve()] if labels else tuple(run.config.get(key) for key in keys)
        groups.setdefault(repr(values), Group(values, [])).runs.append(run)
    return list(groups.values())


def sweep_labels(sweeps: list[Sweep]) -> tuple[list[str], dict[Path, tuple]]:
    """Keys and values that group the members of sweeps by what each sweep varies (its --vary values as given),
    the sweep's name first when there are several. A varied config file (`--vary config=a.yaml,b.yaml`) changes
    many keys at once: grouped by the differing keys, each would be a column."""
    several = len(sweeps) > 1
    vary = list(dict.fromkeys(key for sweep in sweeps for key in sweep.vary))
    labels = {run.resolve(): (sweep.path.name,) * several + tuple(overrides.get(key, "") for key in vary)
              for sweep in sweeps for run, overrides in sweep.overrides.items()}
    return ["sweep"] * several + vary, labels


# ------------------------------------------------------------------------------------------------ the table


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|")


def _reached(at: tuple[int, float, float] | None) -> str:
    return "not reached" if at is None else f"{at[0]:,} ({_tokens(at[1])}, {_duration(at[2])})"


def _stat(values: list[float], digits: int = 3) -> str:
    s = summarize(values)
    if s.n < 2:
        return f"{s.mean:.{digits}f}"
    return f"{s.mean:.{digits}f} ± {s.std:.{digits}f} [{s.low:.{digits}f}, {s.high:.{digits}f}]"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def _tokens(tokens: float) -> str:
    return f"{tokens:,.0f}"


def ranked(groups: list[Group]) -> list[Group]:
    return sorted(groups, key=lambda group: np.mean(group.final("bpb")))


def verdict(groups: list[Group]) -> str:
    """Whether the best group's lead in final val bpb over the next is larger than the seed noise."""
    if len(groups) < 2:
        return "one group: nothing to rank"
    best, second = ranked(groups)[:2]
    a, b = best.final("bpb"), second.final("bpb")
    lead = f"{label(best)} leads {label(second)} by {np.mean(b) - np.mean(a):.4f} bpb (final val bpb)"
    if min(len(a), len(b)) < 2:
        return f"{lead}; one seed: no test"
    if np.var(a) + np.var(b) == 0:
        return f"{lead}; no spread between seeds: no test"
    t, df, p = welch(a, b)
    larger = "larger than the seed noise" if p < 0.05 else "not larger than the seed noise"
    return f"{lead}; Welch's t-test (two-sided): t = {t:.2f}, df = {df:.1f}, p = {p:.3g}: {larger} (at p < 0.05)"


def label(group: Group) -> str:
    # a sweep's member has no value for a key only other sweeps vary: ""
    return ", ".join(str(value) for value in group.values if value != "") or "all runs"


def format_table(groups: list[Group], keys: list[str], steps_to: float | None = None,
                 differing: list[str] | None = None) -> str:
    """The Markdown table (a row per group, best first), its notes and the verdict. differing: the config keys
    that differ between the runs (default: keys), where a change of tokenizer shows."""
    tokenizers = [key for key in (keys if differing is None else differing) if key in TOKENIZER_KEYS]
    per_token = not tokenizers
    metrics = (("loss", "bpb") if per_token else ("bpb",))
    header = [*(keys or ["runs"]), "seeds", "steps", "tokens", "wall time", "tokens/s"]
    header += [f"{when} val {name}" for name in metrics for when in ("final", "best")]
    header += [f"steps (tokens, time) to val bpb ≤ {steps_to:g}"] if steps_to is not None else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    order = ranked(groups)
    for group in order:
        runs = group.runs
        wall, tokens = np.mean([r.wall for r in runs]), np.mean([r.tokens for r in runs])
        names = [_cell(v) for v in group.values] or ["all runs"]
        names[0] += " ★" if group is order[0] and len(groups) > 1 else ""
        row = [*names, str(len(runs)), f"{np.mean([r.steps for r in runs]):,.0f}", _tokens(tokens),
               _duration(wall), f"{tokens / wall:,.0f}" if wall else "–"]
        row += [_stat(getattr(group, when)(name)) for name in metrics for when in ("final", "best")]
        row += [_reached(group.reaches(steps_to))] if steps_to is not None else []
        lines.append("| " + " | ".join(row) + " |")
    notes = ["", "mean ± std over seeds [95% interval of the mean, Student's t]; ★ lowest final val bpb; wall time: "
             "from each session's first TensorBoard event to its last record (validations included), tokens/s: "
             "tokens over that time"]
    if not per_token:
        notes.append(f"the runs use different tokenizers ({', '.join(tokenizers)} differ): compared on bits per byte "
                     "only, loss per token omitted")
    if steps_to is not None:
        notes.append(f"steps (tokens, time) to val bpb ≤ {steps_to:g}: at the first validation where the group's "
                     "mean over seeds reaches it (time: the seeds' mean since their first event)")
    return "\n".join(lines + notes + [verdict(groups)])


# ------------------------------------------------------------------------------------------------ plot, HParams


def plot(groups: list[Group], path: Path, x: str, force: bool = False) -> None:
    """Val bpb against tokens (or wall time): a line per group (the mean over seeds), its seeds' min-max as a
    band. Written under a temporary name and renamed."""
    from xlab.attention import figure_class

    try:
        figure = figure_class("compare plots")
    except ImportError as err:
        raise ValueError(str(err)) from None
    fig = figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for group in ranked(groups):
        xs, mean, low, high = group.curve("bpb", x)
        line, = ax.plot(xs, mean, marker=".", label=f"{label(group)} (n={len(group.runs)})")
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("tokens trained on" if x == "tokens" else "wall time (s)")
    ax.set_ylabel("val bits per byte")
    ax.set_title("val bpb: mean over seeds, band: min–max of the seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    with atomic_output(path, force=force, is_dir=False) as tmp:
        fig.savefig(tmp / path.name, dpi=100, format="png")


def hparam_value(value: object) -> object:
    """A config value as TensorBoard's HParams take it: a number, a bool or a string."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def write_hparams(run: Run, keys: list[str], domains: dict[str, list]) -> Path:
    """`<run>/hparams/`: one HParams session (the varied settings and the seed, against the final and best val
    bpb), replacing the previous one, so that rerunning compare adds no record."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    values = {key: hparam_value(run.config.get(key)) for key in [*keys, SEED]}
    bpb = run.val("bpb")[1]
    metrics = {"compare/final_val_bpb": float(bpb[-1]), "compare/best_val_bpb": float(bpb.min())}
    folder = run.path / HPARAMS_FOLDER
    tmp = Path(tempfile.mkdtemp(prefix=f".{HPARAMS_FOLDER}.tmp-", dir=run.path))
    tmp.chmod(0o755)  # mkdtemp makes it private; the run folder is not
    with SummaryWriter(str(tmp)) as writer:
        for summary in hparams(values, metrics, {k: v for k, v in domains.items() if k in values}):
            writer.file_writer.add_summary(summary)
        for tag, value in metrics.items():
            writer.add_scalar(tag, value, run.steps)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def log_sweep_hparams(sweep: Sweep, runs: dict[Path, Run]) -> None:
    members = [runs[path.resolve()] for path in sweep.runs if path.resolve() in runs]
    if not members:
        return
    keys = differing_keys([run.config for run in members])
    domains = {}
    for key in keys:  # HParams lists a setting's discrete values only when all are of one type
        values = list(dict.fromkeys(hparam_value(run.config.get(key)) for run in members))
        if len({type(v) for v in values}) == 1:
            domains[key] = values
    for run in members:
        write_hparams(run, keys, domains)
    print(f"TensorBoard HParams: {len(members)} members of {sweep.path} (tensorboard --logdir {sweep.path})",
          file=sys.stderr)


# ------------------------------------------------------------------------------------------------ the command


def compare(paths: list[str], plot_path: str | None = None, x: str = "tokens", steps_to: float | None = None,
            force: bool = False) -> str:
    """What `manage.py compare` does: read, group, print the table; HParams for sweeps; the plot."""
    if x != "tokens" and not plot_path:
        raise ValueError(f"--x {x} chooses the plot's x axis: add --plot PNG")
    if plot_path:
        check_output(plot_path, force)  # before reading every run
    folders, sweeps = locate(paths)
    runs = read_runs(folders, sweeps)
    if not runs:
        raise ValueError(f"no run to compare in {' '.join(paths)}: no member has validated yet")
    differing = differing_keys([run.config for run in runs.values()])
    keys, labels = sweep_labels(sweeps) if sweeps and not folders else (differing, None)
    groups = group_runs(list(runs.values()), keys, labels)
    table = format_table(groups, keys, steps_to, differing)
    print(table)
    for sweep in sweeps:
        log_sweep_hparams(sweep, runs)
    if plot_path:
        plot(groups, Path(plot_path), x, force)
        print(f"plot: {plot_path}", file=sys.stderr)
    return table
