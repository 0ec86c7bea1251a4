"""``haqtune hardware`` and ``haqtune cost``: the cost models, usable without a search.

Attached to the ``haqtune`` group by ``orchestrator.cli`` (``main.add_command``).
Every bad input is one ``haqtune: error: ...`` line on stderr and exit code 2
(``orchestrator.errors.user_errors``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import numpy as np

from .errors import HaqtuneError, user_errors

_BITS_RE = re.compile(r"^\s*(\d+)\s*(?:/\s*(\d+)\s*)?$")
# torchvision classifiers at 224 are ImageNet models: price their 1000-way classifier.
IMAGENET_CLASSES = 1000


@click.command("hardware")
@user_errors
def hardware() -> None:
    """List the hardware cost models (and the bit widths each really distinguishes)."""
    from hardware import cost_model_natural_bits, list_cost_models

    models = list_cost_models()
    width = max(len(name) for name in models)
    for name, description in models.items():
        click.echo(f"{name:<{width}}  {description}")
        note = natural_bits_note(cost_model_natural_bits(name))
        if note:
            click.echo(f"{'':<{width}}  {note}")


def natural_bits_note(natural_bits) -> str | None:
    """One line on a model's natural bit widths and the search setting that uses them."""
    if natural_bits is None:
        return None
    widths = ", ".join(map(str, natural_bits))
    return (f"natural bits {widths}: other widths compute as the next one up (memory traffic "
            f"still scales per bit); suggested setting: bits: {{w: [{widths}], a: [{widths}]}}")


def parse_bits(text: str) -> tuple[int, int]:
    """``"W"`` or ``"W/A"`` -> (w_bits, a_bits), each in [1, 8]."""
    from hardware import MAX_BITS, MIN_BITS

    match = _BITS_RE.match(text)
    if match is None:
        raise HaqtuneError(f"--bits: expected W or W/A (e.g. 4 or 4/8), got {text!r}")
    w_bits = int(match.group(1))
    a_bits = int(match.group(2)) if match.group(2) is not None else w_bits
    for label, bits in (("weight", w_bits), ("activation", a_bits)):
        if not MIN_BITS <= bits <= MAX_BITS:
            raise HaqtuneError(
                f"--bits: {label} bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}"
            )
    return w_bits, a_bits


def load_policy(path: str, num_layers: int) -> np.ndarray:
    """Policy ``[L, 2]`` from JSON: ``[[w, a], ...]``, ``{"policy": [[w, a], ...]}``, ``{"w_0": .., "a_0": ..}``
    or ``{"policy": "8/8 4/6 ..."}`` (the w/a text of a search's ``best_policy.json``)."""
    from hardware import MAX_BITS, MIN_BITS
    from search_spaces import policy_from_config

    file = Path(path)
    if not file.is_file():
        raise HaqtuneError(f"--policy: file {path!r} not found")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HaqtuneError(f"--policy: {path!r} is not valid JSON ({exc})") from None
    if isinstance(data, dict) and "policy" in data:
        data = data["policy"]
    if isinstance(data, str):
        try:
            data = [[int(w), int(a)] for w, a in (tok.split("/") for tok in data.split())]
        except ValueError:
            raise HaqtuneError(f"--policy: {path!r} expected \"w/a\" bits per layer (\"8/8 4/6\"), "
                               f"got {data[:60]!r}") from None
    if isinstance(data, dict):
        try:
            policy = policy_from_config(data, num_layers)
        except KeyError as exc:
            raise HaqtuneError(
                f"--policy: {path!r} expected keys w_0..w_{num_layers - 1} and a_0..a_{num_layers - 1} "
                f"(one per layer), missing {exc.args[0]!r}"
            ) from None
        except (TypeError, ValueError):
            raise HaqtuneError(f"--policy: {path!r} expected integer bits for every w_i/a_i") from None
        extra = sorted(k for k in data if re.fullmatch(r"[wa]_\d+", k) and int(k[2:]) >= num_layers)
        if extra:
            raise HaqtuneError(
                f"--policy: {path!r} expected {num_layers} layers, got keys beyond them ({extra[0]})"
            )
    else:
        try:
            policy = np.asarray(data, dtype=np.float64)
        except (TypeError, ValueError):
            policy = None
        if policy is None or policy.ndim != 2 or policy.shape[1] != 2:
            raise HaqtuneError(
                f"--policy: {path!r} expected a list of [w_bits, a_bits] pairs, one per layer"
            )
        if policy.shape[0] != num_layers:
            raise HaqtuneError(
                f"--policy: {path!r} expected {num_layers} layers ([w, a] per layer), "
                f"got {policy.shape[0]}"
            )
        if not np.all(np.isfinite(policy)) or np.any(policy != np.round(policy)):
            raise HaqtuneError(f"--policy: {path!r} expected integer bits")
        policy = policy.astype(np.int64)
    if policy.min() < MIN_BITS or policy.max() > MAX_BITS:
        raise HaqtuneError(
            f"--policy: {path!r} bits must be in [{MIN_BITS}, {MAX_BITS}], "
            f"got values in [{policy.min()}, {policy.max()}]"
        )
    return policy


def _layers(model_name: str, input_size: int | None, num_classes: int | None):
    from hardware import extract_layers
    from trainables.models import DEMO, build_model

    kwargs = {}
    if input_size is not None:
        if input_size < 1:
            raise HaqtuneError(f"--input-size: expected a positive integer, got {input_size}")
        kwargs["input_size"] = input_size
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    elif model_name != DEMO and ":" not in model_name:
        kwargs["num_classes"] = IMAGENET_CLASSES
    built = build_model(model_name, **kwargs)
    try:
        return extract_layers(built.model, built.input_shape)
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HaqtuneError(
            f"model {model_name!r}: forward pass on input {list(built.input_shape)} failed ({first_line})"
        ) from None


@click.command("cost")
@click.option("--model", "model_name", required=True,
              help="demo | torchvision classifier name | module:callable.")
@click.option("--input-size", type=int, help="Input height/width (torchvision default 224).")
@click.option("--num-classes", type=int,
              help="Classifier outputs (default: 1000 for torchvision names, the model's own otherwise).")
@click.option("--hardware", "hardware_name", required=True, help="Cost model (see `haqtune hardware`).")
@click.option("--batch", type=int, help="Batch size (default: the hardware model's own).")
@click.option("--bits", help="Uniform policy: W or W/A bits for every layer.")
@click.option("--policy", "policy_file", help="JSON policy file: [[w, a], ...], {\"policy\": ...} or w_i/a_i keys.")
@click.option("--table", "table_path", help="Measured latency table (.npy/.csv) for --hardware table.")
@click.option("--energy-table", "energy_path", help="Optional measured energy table for --hardware table.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@user_errors
def cost(model_name, input_size, num_classes, hardware_name, batch, bits, policy_file,
         table_path, energy_path, as_json) -> None:
    """Latency, energy and size of a policy on a hardware model, per layer and in total."""
    from hardware import get_cost_model, list_cost_models

    if (bits is None) == (policy_file is None):
        raise HaqtuneError("expected exactly one of --bits W[/A] or --policy FILE")
    uniform = parse_bits(bits) if bits is not None else None
    if batch is not None and batch < 1:
        raise HaqtuneError(f"--batch: expected a positive integer, got {batch}")
    if hardware_name not in list_cost_models():
        get_cost_model(hardware_name)  # raises "unknown hardware ...: choose between ..."
    if hardware_name == "table":
        if table_path is None:
            raise HaqtuneError("--hardware table needs --table PATH (a measured L x 8 x 8 latency table)")
        options = {"path": table_path, "energy_path": energy_path}
        if batch is not None:
            options["batch"] = batch
        model = get_cost_model("table", **options)
    else:
        if table_path is not None or energy_path is not None:
            raise HaqtuneError("--table/--energy-table only apply to --hardware table")
        model = get_cost_model(hardware_name)

    layers = _layers(model_name, input_size, num_classes)
    if uniform is not None:
        policy = np.tile(np.array(uniform, dtype=np.int64), (len(layers), 1))
    else:
        policy = load_policy(policy_file, len(layers))
    table = model.table(layers, batch)
    latency_ms, energy_mj, size_mb = table.layer_costs(policy)
    totals = {
        "latency_ms": float(latency_ms.sum()),
        "energy_mj": float(energy_mj.sum()),
        "size_mb": float(size_mb.sum()),
    }
    rows = [
        {"name": spec.name, "kind": spec.kind, "w_bits": int(w), "a_bits": int(a),
         "latency_ms": float(lat), "energy_mj": float(en), "size_mb": float(mb)}
        for spec, (w, a), lat, en, mb in zip(layers, policy, latency_ms, energy_mj, size_mb, strict=True)
    ]
    if as_json:
        click.echo(json.dumps({**totals, "model": model_name, "hardware": table.hardware,
                               "batch": table.batch, "layers": rows}))
        return
    click.echo(f"model {model_name}  hardware {table.hardware}  batch {table.batch}  layers {len(rows)}")
    click.echo(
        f"total: latency {totals['latency_ms']:.4f} ms  energy {totals['energy_mj']:.4f} mJ  "
        f"size {totals['size_mb']:.4f} MB"
    )
    name_w = max(len("layer"), *(len(r["name"]) for r in rows))
    header = f"{'layer':<{name_w}}  {'kind':<9}  {'w':>2} {'a':>2}  {'latency_ms':>12}  {'energy_mj':>12}  {'size_mb':>10}"
    click.echo(header)
    for r in rows:
        click.echo(
            f"{r['name']:<{name_w}}  {r['kind']:<9}  {r['w_bits']:>2} {r['a_bits']:>2}  "
            f"{r['latency_ms']:>12.5f}  {r['energy_mj']:>12.5f}  {r['size_mb']:>10.5f}"
        )
