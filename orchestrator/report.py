"""Reports: the plots and tables of one search and of several side by side.

Pure pandas + matplotlib (``Figure`` on the Agg canvas, never pyplot, so no display
and no global state); the MLflow side lives in ``tracking.py``. Every figure is
returned as PNG bytes, ready to be written or logged as an artifact.

- ``search_artifacts``: ``policy.png`` (per-layer W/A bits of the best policy, as in
  HAQ's figures) and ``pareto.png`` (cost vs val_acc of every trial, Pareto front,
  uniform 8-bit cost) for the parent run of a search.
- ``compare_searches``: one row per search, plus best-so-far curves, for
  ``haqtune compare`` (RL vs Bayesian vs GAN ...).
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd

from search_spaces import metrics as M

# Reaching this fraction of a search's best val_acc counts as "converged" in compare.
CONVERGED_FRACTION = 0.99
COST_UNITS = {M.LATENCY_MS: "latency (ms)", M.ENERGY_MJ: "energy (mJ)", M.SIZE_MB: "model size (MB)"}
W_COLOR, A_COLOR, FRONT_COLOR = "#1f77b4", "#ff7f0e", "#d62728"
DPI = 110


def _figure(width_in: float, height_in: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    return fig, axes


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ---- one search --------------------------------------------------------------------


def pareto_mask(cost, acc) -> np.ndarray:
    """True where no other point has lower-or-equal cost and strictly higher accuracy
    (the first of equal points is kept): minimize cost, maximize accuracy."""
    cost, acc = np.asarray(cost, dtype=float), np.asarray(acc, dtype=float)
    order = np.lexsort((-acc, cost))  # by cost, then best accuracy first
    best_before = np.concatenate(([-np.inf], np.maximum.accumulate(acc[order])[:-1]))
    mask = np.zeros(len(cost), dtype=bool)
    mask[order] = acc[order] > best_before
    return mask


def policy_figure(policy, layer_names, layer_kinds=None, *, title: str = "") -> bytes:
    """Grouped bars: weight and activation bits per layer; depthwise layers shaded."""
    from matplotlib.patches import Patch

    pol = np.asarray(policy)
    num_layers = pol.shape[0]
    kinds = list(layer_kinds) if layer_kinds is not None else [None] * num_layers
    fig, ax = _figure(max(7.0, 0.32 * num_layers + 2.5), 4.2)
    x = np.arange(num_layers)
    width = 0.4
    ax.bar(x - width / 2, pol[:, 0], width, color=W_COLOR, label="weight bits")
    ax.bar(x + width / 2, pol[:, 1], width, color=A_COLOR, label="activation bits")
    depthwise = [i for i, k in enumerate(kinds) if k == "depthwise"]
    for i in depthwise:
        ax.axvspan(i - 0.5, i + 0.5, color="0.88", zorder=0)
    labels = [f"{name} ({kind})" if kind else str(name) for name, kind in zip(layer_names, kinds, strict=True)]
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7 if num_layers > 20 else 8)
    ax.set_xlim(-0.6, num_layers - 0.4)
    ax.set_ylim(0, 8.6)
    ax.set_yticks(range(0, 9))
    ax.set_ylabel("bits")
    ax.set_xlabel("layer (execution order)")
    ax.grid(axis="y", alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    if depthwise:
        handles.append(Patch(color="0.88", label="depthwise layer"))
    ax.legend(handles=handles, loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8, ncols=3,
              frameon=False)
    fig.suptitle(title or "bitwidth policy", fontsize=10)
    return _png(fig)


def pareto_figure(frame: pd.DataFrame, *, cost_metric: str, reference_cost: float | None = None,
                  budget_limit: float | None = None, ref_acc: float | None = None,
                  title: str = "") -> bytes:
    """Cost vs val_acc of every trial with a result; the Pareto front highlighted."""
    data = frame[frame[M.VAL_ACC].notna() & frame[cost_metric].notna()]
    cost = data[cost_metric].to_numpy(dtype=float)
    acc = data[M.VAL_ACC].to_numpy(dtype=float)
    stopped = (data["status"] == "KILLED").to_numpy() if "status" in data else np.zeros(len(data), bool)
    fig, ax = _figure(7.0, 4.6)
    ax.scatter(cost[~stopped], acc[~stopped], s=22, color="0.45", alpha=0.8, label="trial")
    if stopped.any():
        ax.scatter(cost[stopped], acc[stopped], s=22, facecolors="none", edgecolors="0.45",
                   label="trial (stopped early)")
    if len(data):
        front = pareto_mask(cost, acc)
        order = np.argsort(cost[front])
        ax.step(cost[front][order], acc[front][order], where="post", color=FRONT_COLOR, lw=1.5)
        ax.scatter(cost[front], acc[front], s=40, color=FRONT_COLOR, zorder=3, label="Pareto front")
        best = int(np.argmax(acc))
        ax.scatter([cost[best]], [acc[best]], s=160, marker="*", color="gold", edgecolors="k",
                   zorder=4, label="best val_acc")
    if reference_cost is not None:
        ax.axvline(reference_cost, color="k", ls="--", lw=1, label=f"uniform 8-bit ({reference_cost:.3g})")
    if budget_limit is not None:
        ax.axvline(budget_limit, color=FRONT_COLOR, ls=":", lw=1.2, label=f"budget ({budget_limit:.3g})")
    if ref_acc is not None:
        ax.axhline(ref_acc, color="green", ls=":", lw=1, label=f"full precision ({ref_acc:.3f})")
    ax.set_xlabel(COST_UNITS.get(cost_metric, cost_metric))
    ax.set_ylabel("validation accuracy")
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title or f"accuracy vs {cost_metric}", fontsize=10)
    return _png(fig)


def search_artifacts(frame: pd.DataFrame, best: dict | None, *, layer_names, layer_kinds=None,
                     cost_metric: str = M.LATENCY_MS, reference: dict | None = None,
                     budget_limit: float | None = None, ref_acc: float | None = None,
                     label: str = "") -> dict[str, bytes]:
    """``policy.png`` (the best policy; absent without one) and ``pareto.png``."""
    from search_spaces import parse_policy

    out = {}
    reference = reference or {}
    if best:
        ratio = ""
        if reference.get(cost_metric) and best.get(cost_metric):
            ratio = f" ({reference[cost_metric] / best[cost_metric]:.2f}x less than 8-bit)"
        title = (f"{label} best policy\nval_acc {best[M.VAL_ACC]:.4f}, {cost_metric} "
                 f"{best[cost_metric]:.4g}{ratio}").strip()
        out["policy.png"] = policy_figure(parse_policy(best[M.POLICY]), layer_names, layer_kinds,
                                          title=title)
    out["pareto.png"] = pareto_figure(frame, cost_metric=cost_metric,
                                      reference_cost=reference.get(cost_metric),
                                      budget_limit=budget_limit, ref_acc=ref_acc,
                                      title=f"{label} trials: val_acc vs {cost_metric}".strip())
    return out


# ---- several searches --------------------------------------------------------------


def best_so_far(children: list[dict], started_ms: int | None) -> pd.DataFrame:
    """A search's trials in completion order: trial (1-based), elapsed_s since the
    search started, val_acc (NaN if failed) and best_val_acc so far."""
    done = sorted((c for c in children if c.get("end_time_ms")), key=lambda c: (c["end_time_ms"], c["start_time_ms"] or 0))
    acc = [c["metrics"].get(M.VAL_ACC, np.nan) if c["status"] != "FAILED" else np.nan for c in done]
    frame = pd.DataFrame({
        "trial": np.arange(1, len(done) + 1),
        "elapsed_s": [(c["end_time_ms"] - (started_ms or done[0]["start_time_ms"])) / 1000 for c in done],
        M.VAL_ACC: np.asarray(acc, dtype=float),
    })
    frame["best_val_acc"] = frame[M.VAL_ACC].cummax().ffill()  # a failed trial keeps the best
    return frame


def _reached(curve: pd.DataFrame, best: float) -> tuple[float, float]:
    if not len(curve) or not np.isfinite(best):
        return np.nan, np.nan
    hit = curve[curve["best_val_acc"] >= CONVERGED_FRACTION * best]
    if hit.empty:
        return np.nan, np.nan
    return float(hit["trial"].iloc[0]), float(hit["elapsed_s"].iloc[0])


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return np.nan


def compare_searches(parents: list[dict], children: list[dict]) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """One row per search (parent run) and its best-so-far curve, keyed by search id."""
    by_parent: dict[str, list[dict]] = {}
    for child in children:
        by_parent.setdefault(child["parent_run_id"], []).append(child)
    rows, curves = [], {}
    for parent in parents:
        kids = by_parent.get(parent["run_id"], [])
        curve = best_so_far(kids, parent["start_time_ms"])
        pm, pp = parent["metrics"], parent["params"]
        best = pm.get("best_val_acc", curve["best_val_acc"].max() if len(curve) else np.nan)
        row = {"search_id": parent["search_id"], "searcher": parent["searcher"] or pp.get("searcher"),
               "hardware": pp.get("hardware"), "budget": pp.get("budget"),
               "trials": len(curve), "failed": sum(c["status"] == "FAILED" for c in kids),
               "best_val_acc": _float(best), "best_test_acc": _float(pm.get("best_test_acc"))}
        best_child = None
        if len(curve) and curve[M.VAL_ACC].notna().any():
            ok = [c for c in kids if c["status"] != "FAILED" and M.VAL_ACC in c["metrics"]]
            best_child = max(ok, key=lambda c: c["metrics"][M.VAL_ACC])
        for key in M.COST_METRICS:
            value = pm.get(f"best_{key}", best_child["metrics"].get(key) if best_child else np.nan)
            row[key] = _float(value)
        for key in M.COST_METRICS:
            name = f"{key.split('_')[0]}_reduction_x"
            uniform = pm.get(f"uniform8_{key}")
            fallback = uniform / row[key] if uniform and row[key] else np.nan
            row[name] = _float(pm.get(name, fallback))
        # Test points over the widest uniform policy inside the budget (fine-tuned alike):
        # positive where the mixed policy beats what no search was needed for.
        uniform = _float(pm.get(f"{M.UNIFORM_IN_BUDGET}_{M.TEST_ACC}"))
        row["vs_uniform_pts"] = (row["best_test_acc"] - uniform) * 100 if np.isfinite(uniform) else np.nan
        row["trials_to_99pct"], row["time_to_99pct_s"] = _reached(curve, row["best_val_acc"])
        end = parent["end_time_ms"] or (max(c["end_time_ms"] or 0 for c in kids) if kids else None)
        row["wall_time_s"] = (end - parent["start_time_ms"]) / 1000 if end else np.nan
        rows.append(row)
        curves[parent["search_id"]] = curve
    frame = pd.DataFrame(rows)
    if len(frame):
        frame = frame.sort_values(["best_val_acc", "wall_time_s"], ascending=[False, True],
                                  na_position="last").reset_index(drop=True)
    return frame, curves


def format_compare(frame: pd.DataFrame) -> str:
    """The table ``haqtune compare`` prints."""
    shown = frame.rename(columns={"latency_reduction_x": "lat_x", "energy_reduction_x": "energy_x",
                                  "size_reduction_x": "size_x", "trials_to_99pct": "trials@99%",
                                  "time_to_99pct_s": "time@99%_s"})
    formats = {"best_val_acc": "{:.4f}", "best_test_acc": "{:.4f}", M.LATENCY_MS: "{:.4g}",
               M.ENERGY_MJ: "{:.4g}", M.SIZE_MB: "{:.4g}", "lat_x": "{:.2f}x", "energy_x": "{:.2f}x",
               "size_x": "{:.2f}x", "vs_uniform_pts": "{:+.2f}", "trials@99%": "{:.0f}", "time@99%_s": "{:.0f}", "wall_time_s": "{:.0f}"}
    return shown.to_string(index=False, na_rep="-", formatters={
        k: (lambda v, f=f: "-" if pd.isna(v) else f.format(v)) for k, f in formats.items() if k in shown})


def compare_figure(frame: pd.DataFrame, curves: dict[str, pd.DataFrame], *, title: str = "") -> bytes:
    """Best-so-far val_acc of every search, against trials and against wall time."""
    fig, (by_trial, by_time) = _figure(11.0, 4.4, ncols=2)
    for _, row in frame.iterrows():
        curve = curves.get(row["search_id"])
        if curve is None or curve["best_val_acc"].isna().all():
            continue
        label = f"{row['searcher']} ({row['search_id']})"
        line = by_trial.step(curve["trial"], curve["best_val_acc"], where="post", label=label)[0]
        by_time.step(curve["elapsed_s"], curve["best_val_acc"], where="post", color=line.get_color())
        if np.isfinite(row["trials_to_99pct"]):
            at = curve[curve["trial"] == row["trials_to_99pct"]]
            by_trial.plot(at["trial"], at["best_val_acc"], "o", color=line.get_color(), ms=5)
            by_time.plot(at["elapsed_s"], at["best_val_acc"], "o", color=line.get_color(), ms=5)
    from matplotlib.ticker import MaxNLocator

    by_trial.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_trial.set_xlabel("trials completed")
    by_time.set_xlim(left=0)  # the search's start, Ray's start-up included
    by_time.set_xlabel("wall time since search start (s)")
    for ax in (by_trial, by_time):
        ax.set_ylabel("best val_acc so far")
        ax.grid(alpha=0.3)
    by_trial.legend(fontsize=8, loc="lower right")
    fig.suptitle(title or "best-so-far val_acc (dot: 99% of the search's best reached)", fontsize=10)
    return _png(fig)
