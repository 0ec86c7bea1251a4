"""Bring-your-own measurements: a latency (and optional energy) table measured on real hardware.

File formats (``path`` for latency in seconds, optional ``energy_path`` for energy in joules):

- ``.npy``: a float array of shape ``[L, 8, 8]`` (or ``[L, 64]``), entry
  ``[l, w - 1, a - 1]`` = layer ``l`` at ``w`` weight bits and ``a`` activation bits.
- ``.csv``: one row per (layer, w_bits, a_bits), columns
  ``layer,w_bits,a_bits,latency_s[,energy_j]`` (an optional header row starting with
  ``layer``). ``layer`` is the 0-based layer index in execution order (the order of
  ``extract_layers``); every layer must have all 64 (w, a) pairs, each exactly once.
  When the latency CSV has an ``energy_j`` column, it is the energy table.

Without an energy table, energy is reported as 0 (only latency and size budgets
then mean anything). The table is checked against the model's layer count when
``table(specs)`` is called: "expected L layers, got L'".
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np

from ._analytic import AnalyticCostModel
from ._cost import MAX_BITS, MIN_BITS, NUM_BITS
from ._layers import LayerSpec
from ._registry import register_cost_model

_CSV_COLUMNS = ("layer", "w_bits", "a_bits", "latency_s", "energy_j")


def _load_npy(path: Path, label: str) -> np.ndarray:
    arr = np.load(path, allow_pickle=False)
    if arr.ndim == 2 and arr.shape[1] == NUM_BITS * NUM_BITS:
        arr = arr.reshape(arr.shape[0], NUM_BITS, NUM_BITS)
    if arr.ndim != 3 or arr.shape[1:] != (NUM_BITS, NUM_BITS) or arr.shape[0] == 0:
        raise ValueError(
            f"{label} table {path}: expected shape [L, {NUM_BITS}, {NUM_BITS}] "
            f"(or [L, {NUM_BITS * NUM_BITS}]), got {list(arr.shape)}"
        )
    return arr.astype(np.float64)


def _load_csv(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if lines and lines[0].lower().startswith("layer"):
        lines = lines[1:]
    if not lines:
        raise ValueError(f"table {path}: no rows (expected layer,w_bits,a_bits,latency_s[,energy_j])")
    fields = [ln.split(",") for ln in lines]
    widths = {len(f) for f in fields}
    if len(widths) != 1 or widths.pop() not in (4, 5):
        raise ValueError(
            f"table {path}: expected 4 or 5 columns ({','.join(_CSV_COLUMNS)}) on every row"
        )
    try:
        rows = np.array([[float(x) for x in f] for f in fields])
    except ValueError:
        raise ValueError(
            f"table {path}: expected numeric rows layer,w_bits,a_bits,latency_s[,energy_j]"
        ) from None
    layer, w, a = (rows[:, i] for i in range(3))
    if np.any(layer != np.round(layer)) or np.any(layer < 0):
        raise ValueError(f"table {path}: layer must be a 0-based integer index")
    for label, bits in (("w_bits", w), ("a_bits", a)):
        if np.any(bits != np.round(bits)) or np.any(bits < MIN_BITS) or np.any(bits > MAX_BITS):
            raise ValueError(f"table {path}: {label} must be integers in [{MIN_BITS}, {MAX_BITS}]")
    num_layers = int(layer.max()) + 1
    flat = (layer.astype(np.int64) * NUM_BITS + (w.astype(np.int64) - MIN_BITS)) * NUM_BITS + (
        a.astype(np.int64) - MIN_BITS
    )
    counts = np.bincount(flat, minlength=num_layers * NUM_BITS * NUM_BITS)
    if len(rows) != num_layers * NUM_BITS * NUM_BITS or np.any(counts != 1):
        raise ValueError(
            f"table {path}: expected each of {num_layers} layers x {NUM_BITS * NUM_BITS} "
            f"(w_bits, a_bits) pairs exactly once ({num_layers * NUM_BITS * NUM_BITS} rows), "
            f"got {len(rows)} rows"
        )
    shape = (num_layers, NUM_BITS, NUM_BITS)
    latency = np.empty(num_layers * NUM_BITS * NUM_BITS)
    latency[flat] = rows[:, 3]
    energy = None
    if rows.shape[1] == 5:
        energy = np.empty_like(latency)
        energy[flat] = rows[:, 4]
    return latency.reshape(shape), None if energy is None else energy.reshape(shape)


def load_table(path, label: str = "latency") -> tuple[np.ndarray, np.ndarray | None]:
    """``(values[L, 8, 8], energy[L, 8, 8] or None)`` from a ``.npy`` or ``.csv`` file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{label} table {str(path)!r}: file not found")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        values, energy = _load_npy(path, label), None
    elif suffix == ".csv":
        values, energy = _load_csv(path)
    else:
        raise ValueError(f"{label} table {str(path)!r}: expected a .npy or .csv file, got {suffix or 'no suffix'!r}")
    for name, arr in ((label, values), ("energy", energy)):
        if arr is not None and (not np.all(np.isfinite(arr)) or np.any(arr < 0)):
            raise ValueError(f"{label} table {str(path)!r}: {name} values must be finite and non-negative")
    return values, energy


class TableCostModel(AnalyticCostModel):
    """Costs looked up in a measured ``[L, 8, 8]`` table instead of simulated.

    ``table(specs)`` pairs row ``l`` with ``specs[l]`` (and remembers their names);
    ``layer_cost(spec, ...)`` finds the row by ``spec.name`` among the names bound by the
    last ``table`` call or given as ``layer_names``, so both agree exactly.
    """

    name = "table"
    description = "Measured per-layer latency/energy table from a .npy or .csv file (L x 8 x 8)"

    def __init__(
        self,
        *,
        path,
        energy_path=None,
        batch: int = 1,
        layer_names: Sequence[str] | None = None,
    ) -> None:
        latency, energy = load_table(path, "latency")
        if energy_path is not None:
            energy, _ = load_table(energy_path, "energy")
        if energy is not None and energy.shape != latency.shape:
            raise ValueError(
                f"energy table: expected shape {list(latency.shape)} (as the latency table), "
                f"got {list(energy.shape)}"
            )
        self.path = str(path)
        self.latency_s = latency
        self.energy_j = energy if energy is not None else np.zeros_like(latency)
        self.has_energy = energy is not None
        self.default_batch = AnalyticCostModel._batch(self, batch)
        self._rows: dict[str, int] = {}
        if layer_names is not None:
            self._bind(list(layer_names))

    @property
    def num_layers(self) -> int:
        return int(self.latency_s.shape[0])

    def _check_count(self, count: int) -> None:
        if count != self.num_layers:
            raise ValueError(
                f"table {self.path!r}: expected {self.num_layers} layers (its rows), "
                f"got a model with {count} quantizable layers"
            )

    def _bind(self, names: list[str]) -> None:
        self._check_count(len(names))
        self._rows = {n: i for i, n in enumerate(names)}

    def _batch(self, batch: int | None) -> int:
        batch = super()._batch(batch)
        if batch != self.default_batch:
            raise ValueError(f"batch: the table was measured at batch {self.default_batch}, got {batch}")
        return batch

    def table(self, specs: Sequence[LayerSpec], batch: int | None = None):
        self._bind([s.name for s in specs])
        return super().table(specs, batch)

    def grid_costs(self, specs: Sequence[LayerSpec], w_bits, a_bits, batch: int):
        try:
            rows = np.array([self._rows[s.name] for s in specs], dtype=np.int64)
        except KeyError as exc:
            raise ValueError(
                f"table: unknown layer {exc.args[0]!r}: call table(specs) first or pass layer_names"
            ) from None
        w = np.asarray(w_bits, dtype=np.int64) - MIN_BITS
        a = np.asarray(a_bits, dtype=np.int64) - MIN_BITS
        shape = np.broadcast_shapes(w.shape, a.shape)
        idx = (rows.reshape((-1,) + (1,) * len(shape)), w[None], a[None])
        return self.latency_s[idx], self.energy_j[idx]


@register_cost_model("table", TableCostModel.description)
def table(**kwargs) -> TableCostModel:
    """``get_cost_model("table", path=..., energy_path=None, batch=1, layer_names=None)``."""
    known = ("path", "energy_path", "batch", "layer_names")
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise ValueError(f"table: unknown option(s) {', '.join(unknown)}: choose between {', '.join(known)}")
    if kwargs.get("path") is None:
        raise ValueError("table: expected path=<.npy or .csv latency table>, got none")
    return TableCostModel(**kwargs)


# HAQ's released BISMO-cloud latency table for MobileNetV2 (hardware/presets/README.md): cycles
# at batch 16. HAQ's cloud BISMO runs at 200 MHz, like ``bismo-cloud``.
HAQ_CLOUD_TABLE = "qmobilenetv2_imagenet100_batch16_latency_table.npy"
HAQ_CLOUD_CLOCK_HZ = 200e6
HAQ_CLOUD_BATCH = 16
_HAQ_DESCRIPTION = (
    "HAQ's released BISMO-cloud latency table for torchvision mobilenet_v2 (53 layers, batch 16, "
    "MIT license; no energy)"
)


def haq_cloud_table_path() -> Path:
    """Path of the shipped HAQ table (package data)."""
    return Path(str(resources.files("hardware") / "presets" / HAQ_CLOUD_TABLE))


@register_cost_model("haq-cloud-mobilenetv2", _HAQ_DESCRIPTION)
def haq_cloud_mobilenetv2(**kwargs) -> TableCostModel:
    """The ``table`` model on HAQ's own table: the reference the BISMO models are checked against."""
    if kwargs:
        raise ValueError(
            f"haq-cloud-mobilenetv2: unknown option(s) {', '.join(sorted(kwargs))}: it takes none"
        )
    model = TableCostModel(path=haq_cloud_table_path(), batch=HAQ_CLOUD_BATCH)
    model.latency_s = model.latency_s / HAQ_CLOUD_CLOCK_HZ  # cycles -> seconds
    model.name = "haq-cloud-mobilenetv2"
    model.description = _HAQ_DESCRIPTION
    return model
