"""``python -m repo_jax.compare RUN_DIR... [--by KEY] [--metrics K1,K2] [--out compare.png]``.

Reads each run's ``metrics.jsonl`` and ``config.yaml``, groups the runs by a config key
(``--by``, a dotted path into the saved config, or several comma-separated, e.g.
``--by loss.name,pairs.mode``; default ``train.loss.name``; ``loss.name`` is read as
``train.loss.name``), and prints per group and metric the **final** value (the last
iteration) and the **best** value (the maximum over iterations; the minimum for ``kl``/``loss``
keys) as the mean over the group's runs (seeds) with a 95% Student-t interval, then plots every
group's mean curve with its interval band (``compare.png``, one panel per metric).

``--paired GROUP`` (e.g. ``irepo``, or ``irepo/0`` with two ``--by`` keys) also prints, for every
other group, the per-seed differences GROUP minus that group, runs matched by ``--pair-key``
(default ``train.seed``: the same prompts, samples and rater noise), with the mean and its 95%
interval, for the final and the best value; a difference is "separable" when the interval
excludes 0. Runs without a partner are named, not dropped silently.

A run folder without ``metrics.jsonl`` or ``config.yaml`` is an error naming it; runs of one
group may stop at different iterations (curves use the iterations every run of the group has).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import yaml

from repo_jax import buckets
from repo_jax import config as config_lib
from repo_jax import reporting

DEFAULT_METRICS = ("eval/reward", "eval/accuracy", "eval/win_rate", "eval/kl")
LOWER_IS_BETTER = ("kl", "loss")

# two-sided 95% Student-t quantiles for 1..30 degrees of freedom (then the normal's 1.96)
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


def mean_interval(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, half-width)`` of the 95% Student-t interval of the mean (half-width 0 for one value)."""
    x = np.asarray(values, np.float64)
    if len(x) < 2:
        return float(x.mean()), 0.0
    t = _T95[len(x) - 2] if len(x) - 1 <= len(_T95) else 1.96
    return float(x.mean()), float(t * x.std(ddof=1) / math.sqrt(len(x)))


def lookup(cfg: Mapping, key: str):
    """A dotted key of a saved config (``loss.name`` also finds ``train.loss.name``)."""
    for path in (key, f"train.{key}"):
        node = cfg
        for part in path.split("."):
            if not isinstance(node, Mapping) or part not in node:
                break
            node = node[part]
        else:
            return node
    raise KeyError(key)


def load_run(run_dir: str | Path) -> tuple[dict, list[dict]]:
    """A run folder's config and metric records; a ``gs://`` one is downloaded to its local copy
    first (``repo_jax.buckets``)."""
    if buckets.is_remote(run_dir):
        buckets.Mirror(str(run_dir), writer=False).pull()
    run = buckets.local_path(run_dir)
    for name in ("config.yaml", "metrics.jsonl"):
        if not (run / name).is_file():
            raise FileNotFoundError(f"{run_dir} has no {name} (not a finished or running repo_jax run folder)")
    cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    records = reporting.read_jsonl(run / "metrics.jsonl")
    if not records:
        raise ValueError(f"{run}/metrics.jsonl holds no records")
    return cfg, records


def _labels(values: Sequence[object]) -> list[str]:
    """One label per run for one ``--by`` key: the value itself, or for a structured value (a
    panel list, a dict) only the fields that differ between the runs (``count=3``)."""
    if all(not isinstance(v, (dict, list)) for v in values):
        return [v if isinstance(v, str) else json.dumps(v) for v in values]
    leaves = [config_lib.flatten(v, lists=True) for v in values]
    paths = sorted(set().union(*leaves))
    differ = [p for p in paths if len({json.dumps(x.get(p), sort_keys=True) for x in leaves}) > 1]
    if not differ:
        return [json.dumps(v, sort_keys=True) for v in values]
    short = {p: p.rsplit(".", 1)[-1] for p in differ}
    if len(set(short.values())) < len(differ):  # two fields of the same name: keep their paths
        short = {p: p for p in differ}
    return [",".join(f"{short[p]}={json.dumps(x.get(p)) if not isinstance(x.get(p), str) else x.get(p)}"
                     for p in differ) for x in leaves]


def group_runs(run_dirs: Sequence[str], by: str) -> dict[str, list[tuple[str, list[dict]]]]:
    runs, keys = [], [k.strip() for k in by.split(",")]
    for run in run_dirs:
        cfg, records = load_run(run)
        values = []
        for key in keys:
            try:
                values.append(lookup(cfg, key))
            except KeyError:
                raise KeyError(f"{run}/config.yaml has no key {key!r} (--by takes dotted config keys, "
                               "comma-separated)") from None
        runs.append((run, records, values))
    labels = [_labels([v[i] for _, _, v in runs]) for i in range(len(keys))]
    groups: dict[str, list[tuple[str, list[dict]]]] = {}
    for n, (run, records, _) in enumerate(runs):
        groups.setdefault("/".join(col[n] for col in labels), []).append((run, records))
    return groups


def _values(records: Sequence[dict], key: str) -> list[tuple[int, float]]:
    xs, ys = reporting._series(records, key)
    return list(zip(xs, ys))


def summarise(groups: Mapping[str, list[tuple[str, list[dict]]]], metrics: Sequence[str]) -> list[dict]:
    """One row per (group, metric): final and best as mean and 95% half-width over runs."""
    rows = []
    for name, runs in groups.items():
        for key in metrics:
            series = [_values(recs, key) for _, recs in runs]
            series = [s for s in series if s]
            if not series:
                continue
            lower = any(key.endswith(x) for x in LOWER_IS_BETTER)
            final = [s[-1][1] for s in series]
            # best over the trained iterations (iteration 0 is the shared start)
            best = [(min if lower else max)(v for it, v in s if it > 0) if any(it > 0 for it, _ in s) else s[-1][1]
                    for s in series]
            (fm, fh), (bm, bh) = mean_interval(final), mean_interval(best)
            rows.append({"group": name, "metric": key, "runs": len(series), "final_mean": fm, "final_ci95": fh,
                         "best_mean": bm, "best_ci95": bh, "final": final, "best": best})
    return rows


def paired(groups: Mapping[str, list[tuple[str, list[dict]]]], metrics: Sequence[str], baseline: str,
           pair_key: str = "train.seed") -> tuple[list[dict], list[str]]:
    """``baseline`` minus every other group, per matched run (``pair_key``): one row per
    (group, metric) with the differences of the final and best values, their mean and 95%
    half-width; and the runs left without a partner."""
    if baseline not in groups:
        raise KeyError(f"--paired {baseline!r} is not a group; the groups are {sorted(groups)}")
    by_run = {(r["group"], r["metric"]): r for r in summarise(groups, metrics)}
    key_of = lambda run: json.dumps(lookup(yaml.safe_load((Path(run) / "config.yaml").read_text()) or {}, pair_key))
    keys = {name: [key_of(run) for run, _ in runs] for name, runs in groups.items()}
    rows, unpaired = [], []
    for name in groups:
        if name == baseline:
            continue
        common = [k for k in keys[baseline] if k in keys[name]]
        unpaired += [f"{g} {run} ({pair_key}={k})" for g in (baseline, name)
                     for (run, _), k in zip(groups[g], keys[g]) if k not in common]
        ia, ib = [keys[baseline].index(k) for k in common], [keys[name].index(k) for k in common]
        for metric in metrics:
            a, b = by_run.get((baseline, metric)), by_run.get((name, metric))
            if not a or not b or not common:
                continue
            row = {"baseline": baseline, "group": name, "metric": metric, "pairs": len(common)}
            for what in ("final", "best"):
                diffs = [a[what][i] - b[what][j] for i, j in zip(ia, ib)]
                mean, half = mean_interval(diffs)
                row |= {f"{what}_diffs": diffs, f"{what}_mean": mean, f"{what}_ci95": half,
                        f"{what}_separable": len(diffs) > 1 and abs(mean) > half}
            rows.append(row)
    return rows, sorted(set(unpaired))


def format_paired(rows: Sequence[dict], pair_key: str) -> str:
    head = (f"{'difference':<28} {'metric':<16} {'pairs':>5}   {'final (mean +- 95%)':>22} {'sep':>4}   "
            f"{'best (mean +- 95%)':>22} {'sep':>4}   per {pair_key} (final)")
    lines = [head, "-" * len(head)]
    for r in rows:
        yes = lambda x: "yes" if x else "no"
        lines.append(f"{r['baseline'] + ' - ' + r['group']:<28} {r['metric']:<16} {r['pairs']:>5}   "
                     f"{r['final_mean']:>12.4f} +- {r['final_ci95']:<6.4f} {yes(r['final_separable']):>4}   "
                     f"{r['best_mean']:>12.4f} +- {r['best_ci95']:<6.4f} {yes(r['best_separable']):>4}   "
                     + " / ".join(f"{d:+.4f}" for d in r["final_diffs"]))
    return "\n".join(lines)


def format_table(rows: Sequence[dict], by: str) -> str:
    head = f"{by:<20} {'metric':<16} {'runs':>4}   {'final (mean +- 95%)':>22}   {'best (mean +- 95%)':>22}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['group']:<20} {r['metric']:<16} {r['runs']:>4}   "
                     f"{r['final_mean']:>12.4f} +- {r['final_ci95']:<6.4f}   {r['best_mean']:>12.4f} +- {r['best_ci95']:<6.4f}")
    return "\n".join(lines)


def plot(groups: Mapping[str, list[tuple[str, list[dict]]]], metrics: Sequence[str], path: str | Path, *, by: str) -> Path:
    """Mean curve per group with its 95% band, one panel per metric."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    keys = [k for k in metrics if any(_values(recs, k) for runs in groups.values() for _, recs in runs)]
    ncols = min(len(keys), 2) or 1
    nrows = max(1, math.ceil(len(keys) / ncols))
    fig = Figure(figsize=(5.0 * ncols, 3.4 * nrows), layout="constrained")
    fig.suptitle(f"runs grouped by {by}")
    for n, key in enumerate(keys, start=1):
        ax = fig.add_subplot(nrows, ncols, n)
        for name, runs in groups.items():
            series = [dict(_values(recs, key)) for _, recs in runs]
            common = sorted(set.intersection(*(set(s) for s in series))) if series else []
            if not common:
                continue
            stats = [mean_interval([s[it] for s in series]) for it in common]
            mean = np.array([m for m, _ in stats])
            half = np.array([h for _, h in stats])
            ax.plot(common, mean, marker="o", label=f"{name} (n={len(series)})")
            ax.fill_between(common, mean - half, mean + half, alpha=0.2)
        ax.set_title(key)
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m repo_jax.compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders (each with config.yaml and metrics.jsonl), local or gs://")
    ap.add_argument("--by", default="train.loss.name", help="the config key that groups runs (dotted)")
    ap.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="comma-separated metric keys")
    ap.add_argument("--out", default="compare.png", help="the plot (a JSON summary is written beside it)")
    ap.add_argument("--paired", default="", help="a group: print it minus every other group, per matched run")
    ap.add_argument("--pair-key", default="train.seed", help="the config key that matches runs for --paired")
    args = ap.parse_args(argv)
    metrics = [m for m in args.metrics.split(",") if m]
    try:
        groups = group_runs(args.runs, args.by)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    rows = summarise(groups, metrics)
    print(format_table(rows, args.by))
    pairs: list[dict] = []
    if args.paired:
        try:
            pairs, unpaired = paired(groups, metrics, args.paired, args.pair_key)
        except KeyError as e:
            print(f"error: {e.args[0]}", file=sys.stderr)
            return 2
        print(format_paired(pairs, args.pair_key))
        for run in unpaired:
            print(f"  no partner, left out of the paired differences: {run}")
    png = plot(groups, metrics, args.out, by=args.by)
    summary = Path(png).with_suffix(".json")
    summary.write_text(json.dumps({"by": args.by, "groups": {k: [r for r, _ in v] for k, v in groups.items()},
                                   "rows": rows, "paired": pairs}, indent=2) + "\n")
    print(f"plot: {png}   summary: {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
