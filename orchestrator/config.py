"""Search configuration: a frozen, validated dataclass loaded from YAML, overridden by CLI flags."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from hardware import MAX_BITS, MIN_BITS
from search_spaces import Budget, check_bit_range
from search_spaces import metrics as M
from trainables.quantize import QuantOptions
from trainables.training import TrainSettings as TrainConfig  # the config's training sections

from .errors import HaqtuneError

SCHEDULERS = ("fifo", "asha")


def _default_reference() -> TrainConfig:
    # Reaches ~98% val accuracy on digits with the demo net in ~10 s on one core.
    return TrainConfig(epochs=20, lr=0.05, batch_size=64, weight_decay=1e-4)


def _default_finetune() -> TrainConfig:
    # HAQ fine-tunes briefly after quantization; 2 short epochs recover most of the drop.
    return TrainConfig(epochs=2, lr=0.01, batch_size=64)


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

    searcher: str = "random"
    num_trials: int = 20
    max_concurrent: int = 2
    scheduler: str = "fifo"
    seed: int = 0
    model: str = "demo"
    dataset: str = "digits"
    input_size: int | None = None
    data_root: str = "./data"
    hardware: str = "bismo-edge"
    hardware_options: dict = field(default_factory=dict)
    batch: int | None = None
    budget: Budget | None = field(default_factory=lambda: Budget.parse("latency=0.5"))
    min_bits: int = MIN_BITS
    max_bits: int = MAX_BITS
    reference: TrainConfig = field(default_factory=_default_reference)
    finetune: TrainConfig = field(default_factory=_default_finetune)
    searcher_options: dict = field(default_factory=dict)
    experiment: str = "haqtune"
    tracking_uri: str | None = None
    storage_dir: str = "haqtune_runs"
    address: str | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_failures: int = 1
    test_top_k: int = 3
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
        _check_int("max_concurrent", self.max_concurrent, minimum=1)
        _check_int("seed", self.seed, minimum=0)
        _check_int("max_failures", self.max_failures, minimum=0)
        _check_int("test_top_k", self.test_top_k, minimum=0)
        _check_int("min_bits", self.min_bits)
        _check_int("max_bits", self.max_bits)
        if self.input_size is not None:
            _check_int("input_size", self.input_size, minimum=1)
        if self.batch is not None:
            _check_int("batch", self.batch, minimum=1)
        try:
            check_bit_range(self.min_bits, self.max_bits)
        except ValueError as exc:
            raise HaqtuneError(str(exc)) from None
        if self.scheduler not in SCHEDULERS:
            raise HaqtuneError(f"scheduler: choose between {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        for name in ("cpus_per_trial", "gpus_per_trial"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise HaqtuneError(f"{name}: expected a non-negative number, got {value!r}")
        if self.cpus_per_trial == 0 and self.gpus_per_trial == 0:
            raise HaqtuneError("cpus_per_trial: a trial needs a CPU or a GPU, got 0 of both")
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

    # ---- construction -------------------------------------------------------------

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
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> SearchConfig:
        path = Path(path)
        if not path.is_file():
            raise HaqtuneError(f"config file {str(path)!r} not found: expected a YAML file such as configs/demo.yaml")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise HaqtuneError(f"config file {str(path)!r} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
        return cls.from_dict(data or {}, source=f"config file {str(path)!r}")

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

    def write_yaml(self, path: Path) -> None:
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


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
    if isinstance(value, TrainConfig):
        return value
    if not isinstance(value, dict):
        raise HaqtuneError(f"{name}: expected a mapping (epochs, lr, ...), got {value!r}")
    known = {f.name for f in fields(TrainConfig)}
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
