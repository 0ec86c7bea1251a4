"""``haqtune search CONFIG --dry-run``: the plan of a search, printed without running anything.

Everything here comes from ``search.prepare`` (validation only: nothing is written,
no dataset is downloaded, no Ray or MLflow is started).
"""

from __future__ import annotations

from search_spaces import metrics as M
from search_spaces import widest_uniform

from .search import PreparedSearch, _shape_text, input_note, uniform8_note


def cost_command(prepared: PreparedSearch) -> str:
    """The ``haqtune cost`` call that prices the same layers (its 8-bit latency equals the plan's)."""
    config = prepared.config
    shape = prepared.priced_shape
    return (f"haqtune cost --model {config.model} --input-size {shape[1]} "
            f"--num-classes {prepared.model_kwargs['num_classes']} --hardware {config.hardware} "
            f"--batch {prepared.table.batch} --bits 8")


def format_plan(prepared: PreparedSearch) -> str:
    config, layers, table = prepared.config, prepared.layers, prepared.table
    latency_ms, _, _ = table.layer_costs(table.uniform(8))
    total_macs = sum(s.macs for s in layers)
    total_weights = sum(s.weights for s in layers)
    if config.reference.weights is not None:
        reference = f"pretrained {config.reference.weights} (evaluated on val, not retrained)"
    else:
        r = config.reference
        reference = f"trained from scratch ({r.epochs} epochs, lr {r.lr:g}, batch {r.batch_size})"
    facts = prepared.facts
    subset = ", ".join(f"{k}={v}" for k, v in sorted(config.dataset_options.items())) or "none"
    baseline = "uniform 8-bit"
    if config.budget is not None:
        budget = f"{config.budget} -> {config.budget.metric} <= {prepared.budget_limit:.4g}"
        pair = widest_uniform(table, config.budget, prepared.allowed)
        if pair is None:
            budget += "; no uniform policy fits"
        else:
            budget += f"; widest uniform policy inside: {pair[0]}/{pair[1]}"
            if pair != (8, 8) and config.compare_uniform:
                baseline += f" and uniform {pair[0]}/{pair[1]}"
    else:
        budget = "none (accuracy only)"
    f = config.finetune
    at_once = ("as many as the cluster fits (max_concurrent auto)" if config.max_concurrent == "auto"
               else config.max_concurrent)
    lines = [
        "haqtune: search plan (dry run: nothing runs, nothing is written)",
        f"search:    {config.searcher}, {config.num_trials} trials, {at_once} at once, "
        f"scheduler {config.scheduler}, seed {config.seed}, bits {config.min_bits}..{config.max_bits}",
        f"model:     {config.model}: {len(layers)} quantizable layers, {total_macs / 1e6:.2f} M MACs, "
        f"{total_weights / 1e6:.3f} M weights; reference {reference}",
        f"data:      {config.dataset} ({config.data_root}): {facts.num_classes if facts else '?'} classes, "
        f"subset {subset}; {input_note(prepared)}",
        f"input:     {_shape_text(prepared.input_shape)} (trials), {_shape_text(prepared.priced_shape)} (cost table)",
        f"hardware:  {config.hardware} (batch {table.batch}); {uniform8_note(prepared)}",
        f"budget:    {budget}",
        f"finetune:  {f.epochs} epochs, lr {f.lr:g}, batch {f.batch_size}"
        f"{f', at most {f.max_steps_per_epoch} steps/epoch' if f.max_steps_per_epoch else ''}",
        "final:     " + (f"the best {config.test_top_k}, {baseline} fine-tuned {g.epochs} epochs, "
                         f"lr {g.lr:g}, batch {g.batch_size}"
                         + (f", distilled from the reference (weight {g.distill_weight:g}, "
                            f"T {g.distill_temperature:g})" if g.distill_weight > 0 else "")
                         + ", then tested" if (g := config.final_finetune)
                         else f"the best {config.test_top_k} trials' own checkpoints tested; {baseline} "
                              f"fine-tuned like a trial and tested"),
        f"resources: {config.cpus_per_trial:g} CPU + {config.gpus_per_trial:g} GPU per trial, "
        f"{at_once} trials at once, Ray {config.address or 'local'}",
        f"same cost: {cost_command(prepared)}",
        "",
    ]
    name_w = max(len("layer"), *(len(s.name) for s in layers))
    lines.append(f"{'#':>3}  {'layer':<{name_w}}  {'kind':<9}  {'in':>5}  {'out':>5}  {'k':>3}  {'s':>2}  "
                 f"{'in_hw':>9}  {'out_hw':>9}  {'MACs':>12}  {'weights':>9}  {'8-bit ' + M.LATENCY_MS:>17}")
    for i, (s, lat) in enumerate(zip(layers, latency_ms, strict=True)):
        lines.append(
            f"{i:>3}  {s.name:<{name_w}}  {s.kind:<9}  {s.in_channels:>5}  {s.out_channels:>5}  "
            f"{s.kernel[0]}x{s.kernel[1]:<1}  {s.stride[0]:>2}  {s.in_hw[0]:>4}x{s.in_hw[1]:<4}  "
            f"{s.out_hw[0]:>4}x{s.out_hw[1]:<4}  {s.macs:>12,}  {s.weights:>9,}  {lat:>17.6g}"
        )
    return "\n".join(lines)
