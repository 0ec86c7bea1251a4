"""Search configuration: a frozen, validated dataclass loaded from YAML, overridden by CLI flags."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from hardware import MAX_BITS
from search_spaces import AllowedBits, Budget, check_bit_range, check_bit_set
from search_spaces import metrics as M
from trainables.data import DatasetOptions
from trainables.node import DEFAULT_DATA_ROOT
from trainables.quantize import QuantOptions
from trainables.training import ReferenceSettings
from trainables.training import TrainSettings as TrainConfig  # the config's training sections

from .errors import HaqtuneError

SCHEDULERS = ("fifo", "asha")
AUTO = "auto"  # max_concurrent: fit the cluster
# Searchers that keep the first layer and the classifier at 8/8 unless ``fix_first_last``
# says otherwise: HAQ's own convention, so ``haq`` reproduces the paper by default.
FIX_FIRST_LAST_BY_DEFAULT = ("haq",)
# The embedded demo (``haqtune search`` without a CONFIG; ``configs/demo.yaml``) is
# SearchConfig's defaults plus these. Every layer is searched, by every searcher alike:
# on the demo, free first and last layers lose less accuracy at 2x BitFusion energy than
# HAQ's fixed 8/8 ones, and only then does the best policy beat the widest uniform one in
# the budget (benchmarks/RESULTS.md, "Quick-start demo"). A config file's unset
# ``fix_first_last`` stays the searcher's default (HAQ's convention for haq).
DEMO_OVERRIDES = {"fix_first_last": False}
BIT_SET_KEYS = ("w", "a")


def _default_reference() -> ReferenceSettings:
    # Reaches ~98% val accuracy on digits with the demo net in ~10 s on one core.
    return ReferenceSettings(epochs=20, lr=0.05, batch_size=64, weight_decay=1e-4)


def _default_finetune() -> TrainConfig:
    # HAQ fine-tunes briefly after quantization; 2 short epochs recover most of the drop.
    return TrainConfig(epochs=2, lr=0.01, batch_size=64)


def _default_final_finetune() -> dict:
    # HAQ's final fine-tune (30 epochs from the reference) plus distillation from the
    # full-precision reference, chosen on validation (benchmarks/experiments/final_distill.py):
    # 0.22 test points lost at 2x BitFusion energy vs 1.23 with labels only (RESULTS.md,
    # "Headline"). A mapping: the keys it leaves out come from ``finetune``.
    return {"epochs": 30, "distill_weight": 0.5, "distill_temperature": 2.0}


def _check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise HaqtuneError(f"{name}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise HaqtuneError(f"{name}: expected an integer >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise HaqtuneError(f"{name}: expected an integer <= {maximum}, got {value}")


@dataclass(frozen=True)
class SearchConfig:
    """A whole search. The defaults are the embedded demo (digits, DemoNet, local Ray)."""

    searcher: str = "haq"
    # 20 of them are haq's random warm-up episodes (HAQ's own), 40 learned ones follow.
    num_trials: int = 60
    # Trials in flight at once, or "auto": as many as the Ray cluster's CPUs/GPUs fit.
    max_concurrent: int | str = AUTO
    scheduler: str = "fifo"
    seed: int = 0
    model: str = "demo"
    dataset: str = "digits"
    input_size: int | None = None
    # Expanded on each node that loads data (trainables/node.py): node-local by default.
    data_root: str = DEFAULT_DATA_ROOT
    # HAQ-style subset: {classes: N, train_per_class: K, val_per_class: V} (trainables.data.DatasetOptions)
    dataset_options: dict = field(default_factory=dict)
    # Price layer shapes at this resolution instead of the data's (HAQ: search on a subset, price 224x224)
    cost_input_size: int | None = None
    # BitFusion at half the 8-bit energy: between uniform 3/3 (1.94x) and 2/2 (2.37x, ~3 test
    # points lost), where a mixed policy has room to beat the widest uniform one that fits.
    hardware: str = "bitfusion"
    hardware_options: dict = field(default_factory=dict)
    batch: int | None = None
    budget: Budget | None = field(default_factory=lambda: Budget.parse("energy=0.5"))
    min_bits: int = 2  # HAQ's experiments; 1-bit layers only over-fit the 360-image validation split
    max_bits: int = MAX_BITS
    # Bit sets a target supports, e.g. {"w": [2, 4, 8], "a": [4, 8]}: each a non-empty
    # list of widths in [min_bits, max_bits]; a missing key means all of that range.
    bits: dict | None = None
    # First layer and classifier at their highest allowed width (8/8); None = the
    # searcher's default (true for haq, false otherwise), see ``fixes_first_last``.
    fix_first_last: bool | None = None
    reference: ReferenceSettings = field(default_factory=_default_reference)  # + weights: pretrained
    finetune: TrainConfig = field(default_factory=_default_finetune)
    # HAQ's protocol: the search ranks policies by the brief ``finetune``; afterwards the
    # best ``test_top_k`` policies and uniform 8-bit are fine-tuned longer from the
    # reference (HAQ: 30 epochs) before the test split, and so are uniform 8-bit and the
    # widest uniform policy inside the budget. A mapping of training settings (missing
    # keys taken from ``finetune``), or None: test the trials' own checkpoints.
    final_finetune: TrainConfig | None = field(default_factory=_default_final_finetune)
    searcher_options: dict = field(default_factory=dict)
    experiment: str = "haqtune"
    tracking_uri: str | None = None
    storage_dir: str = "haqtune_runs"
    address: str | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_failures: int = 1
    test_top_k: int = 3
    # With a budget, also fine-tune and test the widest uniform policy inside it (like
    # uniform 8-bit): the baseline the best policy has to beat. One more final fine-tune.
    compare_uniform: bool = True
    # Quantizer (trainables.quantize.QuantOptions): per_channel | per_tensor, linear | kmeans,
    # weights+activations | weights (weight-only, HAQ's model-size experiments).
    weight_granularity: str = "per_channel"
    weight_quantizer: str = "linear"
    quantize: str = "weights+activations"

    def __post_init__(self) -> None:
        from orchestrator.searchers import searcher_info

        try:
            searcher_info(self.searcher)
        except ValueError as exc:
            raise HaqtuneError(str(exc)) from None
        _check_int("num_trials", self.num_trials, minimum=1)
        if self.max_concurrent != AUTO:
            if isinstance(self.max_concurrent, str) and self.max_concurrent.strip().isdigit():
                object.__setattr__(self, "max_concurrent", int(self.max_concurrent))  # a CLI flag's text
            if isinstance(self.max_concurrent, str):
                raise HaqtuneError(f"max_concurrent: expected an integer >= 1 or {AUTO!r}, "
                                   f"got {self.max_concurrent!r}")
            _check_int("max_concurrent", self.max_concurrent, minimum=1)
        _check_int("seed", self.seed, minimum=0)
        _check_int("max_failures", self.max_failures, minimum=0)
        _check_int("test_top_k", self.test_top_k, minimum=0)
        _check_int("min_bits", self.min_bits)
        _check_int("max_bits", self.max_bits)
        if self.input_size is not None:
            _check_int("input_size", self.input_size, minimum=1)
        if self.cost_input_size is not None:
            _check_int("cost_input_size", self.cost_input_size, minimum=1)
        if self.batch is not None:
            _check_int("batch", self.batch, minimum=1)
        if isinstance(self.reference, TrainConfig) and not isinstance(self.reference, ReferenceSettings):
            # A plain TrainSettings from Python code: the reference section without weights.
            object.__setattr__(self, "reference", ReferenceSettings(**dataclasses.asdict(self.reference)))
        try:
            DatasetOptions.from_dict(self.dataset_options)
        except ValueError as exc:
            raise HaqtuneError(str(exc)) from None
        try:
            check_bit_range(self.min_bits, self.max_bits)
        except ValueError as exc:
            raise HaqtuneError(str(exc)) from None
        self._check_bit_sets()
        if self.fix_first_last is not None and not isinstance(self.fix_first_last, bool):
            raise HaqtuneError(f"fix_first_last: expected true or false, got {self.fix_first_last!r}")
        if not isinstance(self.compare_uniform, bool):
            raise HaqtuneError(f"compare_uniform: expected true or false, got {self.compare_uniform!r}")
        if self.scheduler not in SCHEDULERS:
            raise HaqtuneError(f"scheduler: choose between {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        for name in ("cpus_per_trial", "gpus_per_trial"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise HaqtuneError(f"{name}: expected a non-negative number, got {value!r}")
        if self.cpus_per_trial == 0 and self.gpus_per_trial == 0:
            raise HaqtuneError("cpus_per_trial: a trial needs a CPU or a GPU, got 0 of both")
        if self.final_finetune is not None and not isinstance(self.final_finetune, TrainConfig):
            object.__setattr__(self, "final_finetune",
                               _train_config("final_finetune", self.final_finetune, self.finetune))
        for name in ("reference", "finetune", "final_finetune"):
            # fp16 needs a GradScaler'd CUDA step; a CPU-only search can say so now.
            if getattr(getattr(self, name), "amp", "off") == "fp16" and self.gpus_per_trial == 0:
                raise HaqtuneError(f"{name}.amp: fp16 runs on GPUs only and trials run on the CPU "
                                   "(gpus_per_trial 0): expected bf16 or off, or gpus_per_trial > 0, got fp16")
        for name in ("model", "dataset", "hardware", "experiment", "storage_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise HaqtuneError(f"{name}: expected a non-empty string, got {getattr(self, name)!r}")
        for name in ("hardware_options", "searcher_options"):
            if not isinstance(getattr(self, name), dict):
                raise HaqtuneError(f"{name}: expected a mapping, got {getattr(self, name)!r}")
        try:
            options = self.quant_options()
        except ValueError as exc:
            raise HaqtuneError(str(exc)) from None
        if not options.quantize_activations and self.budget is not None and self.budget.metric != M.SIZE_MB:
            raise HaqtuneError(
                f"quantize: weights leaves activations in float, so it needs a size budget "
                f"(size_mb=... or size=...), got {self.budget}"
            )

    def quant_options(self) -> QuantOptions:
        return QuantOptions(weight_granularity=self.weight_granularity,
                            weight_quantizer=self.weight_quantizer, quantize=self.quantize)

    def _check_bit_sets(self) -> None:
        if self.bits is None:
            return
        if not isinstance(self.bits, dict) or not self.bits or set(self.bits) - set(BIT_SET_KEYS):
            raise HaqtuneError(
                "bits: expected a mapping with keys w and/or a, each a list of bit widths "
                f"(e.g. {{w: [2, 4, 8], a: [4, 8]}}), got {self.bits!r}"
            )
        normalized = {}
        for key in BIT_SET_KEYS:
            if key in self.bits:
                try:
                    widths = check_bit_set(f"bits.{key}", self.bits[key], self.min_bits, self.max_bits)
                except ValueError as exc:
                    raise HaqtuneError(str(exc)) from None
                normalized[key] = list(widths)
        object.__setattr__(self, "bits", normalized)  # sorted, without duplicates

    @property
    def fixes_first_last(self) -> bool:
        """``fix_first_last`` as the search uses it: the setting, or the searcher's default."""
        if self.fix_first_last is None:
            return self.searcher in FIX_FIRST_LAST_BY_DEFAULT
        return self.fix_first_last

    def allowed_bits(self, num_layers: int) -> AllowedBits:
        """The per-layer widths of a search over ``num_layers`` layers."""
        bits = self.bits or {}
        return AllowedBits.build(num_layers, min_bits=self.min_bits, max_bits=self.max_bits,
                                 w_bits=bits.get("w"), a_bits=bits.get("a"),
                                 fix_first_last=self.fixes_first_last)

    # ---- construction -------------------------------------------------------------

    @classmethod
    def demo(cls) -> SearchConfig:
        """The embedded demo: what ``haqtune search`` runs without a CONFIG (``DEMO_OVERRIDES``)."""
        return cls(**DEMO_OVERRIDES)

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "config") -> SearchConfig:
        if not isinstance(data, dict):
            raise HaqtuneError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise HaqtuneError(
                f"{source}: unknown setting(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}"
            )
        kwargs = dict(data)
        if "budget" in kwargs:
            kwargs["budget"] = _parse_budget(kwargs["budget"])
        for name in ("reference", "finetune"):
            if name in kwargs:
                kwargs[name] = _train_config(name, kwargs[name], getattr(cls(), name))
        if kwargs.get("final_finetune") is not None:  # unset keys: the search's own fine-tune
            kwargs["final_finetune"] = _train_config("final_finetune", kwargs["final_finetune"],
                                                     kwargs.get("finetune", _default_finetune()))
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> SearchConfig:
        path = Path(path)
        if not path.is_file():
            raise HaqtuneError(f"config file {str(path)!r} not found: expected a YAML file such as configs/demo.yaml")
        return cls.from_yaml_text(path.read_text(), source=f"config file {str(path)!r}")

    @classmethod
    def from_yaml_text(cls, text: str, *, source: str = "config") -> SearchConfig:
        """A config from YAML text (``source`` names it in errors, e.g. a storage URI)."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise HaqtuneError(f"{source} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
        return cls.from_dict(data or {}, source=source)

    def replace(self, **overrides) -> SearchConfig:
        """A copy with ``overrides`` (``None`` values are ignored: unset CLI flags)."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if "budget" in overrides:
            overrides["budget"] = _parse_budget(overrides["budget"])
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Budget):
                value = str(value)
            elif isinstance(value, TrainConfig):
                value = dataclasses.asdict(value)
            out[f.name] = value
        return out

    def resolved(self, *, tracking_uri: str, storage_dir: str | None = None) -> SearchConfig:
        """The config a search directory keeps: the given (absolute) tracking URI, and
        absolute storage and data roots, so resuming from any working directory or
        environment finds the same MLflow store, search state and data."""
        storage = storage_dir if storage_dir is not None else self.storage_dir
        return dataclasses.replace(self, tracking_uri=tracking_uri,
                                   storage_dir=storage if "://" in storage else os.path.abspath(storage),
                                   data_root=self.data_root if "://" in self.data_root
                                   or self.data_root.startswith("~")  # each node's own home
                                   else os.path.abspath(self.data_root))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def write_yaml(self, path: Path) -> None:
        atomic_write_text(path, self.to_yaml())


def _parse_budget(value) -> Budget | None:
    if value is None or isinstance(value, Budget):
        return value
    if isinstance(value, str) and value.strip().lower() in ("", "none", "null"):
        return None
    try:
        return Budget.parse(str(value))
    except ValueError as exc:
        raise HaqtuneError(str(exc)) from None


def _train_config(name: str, value, default: TrainConfig) -> TrainConfig:
    if isinstance(value, type(default)):
        return value
    if not isinstance(value, dict):
        raise HaqtuneError(f"{name}: expected a mapping (epochs, lr, ...), got {value!r}")
    known = {f.name for f in fields(type(default))}
    unknown = sorted(set(value) - known)
    if unknown:
        raise HaqtuneError(f"{name}: unknown setting(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}")
    try:
        return dataclasses.replace(default, **value)
    except (ValueError, TypeError) as exc:
        raise HaqtuneError(f"{name}.{exc}") from None


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path``, then ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fit_concurrency(cluster: dict, *, cpus_per_trial: float, gpus_per_trial: float, num_trials: int) -> int:
    """Trials the cluster's resources fit at once (``max_concurrent: auto``): the CPUs
    (and GPUs, when a trial asks for some) divided by one trial's share, capped by
    ``num_trials``, at least 1 (an autoscaler adds nodes as pending trials ask for them)."""
    fits = []
    if cpus_per_trial > 0:
        fits.append(int(cluster.get("CPU", 0) // cpus_per_trial))
    if gpus_per_trial > 0:
        fits.append(int(cluster.get("GPU", 0) // gpus_per_trial))
    return max(1, min(num_trials, *fits))
