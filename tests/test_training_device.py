"""A trial's device, data loading and mixed precision (trainables/training.py)."""

import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from trainables.data import DataSplits, batches
from trainables.training import (
    TrainSettings,
    amp_dtype,
    loader_batches,
    make_grad_scaler,
    make_optimizer,
    pick_device,
    train_epoch,
)

CPU = torch.device("cpu")


def _image_like(n: int = 96, seed: int = 0) -> Subset:
    """A non-tensor dataset (what ImageFolder/CIFAR are to the loader): a Subset."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    return Subset(TensorDataset(x, y), list(range(n)))


def _labels(dataset, *, workers: int, seed: int) -> list[int]:
    out = []
    for _, y in loader_batches(dataset, 16, device=CPU, shuffle=True, num_workers=workers,
                               generator=torch.Generator().manual_seed(seed)):
        out.extend(y.tolist())
    return out


def test_image_dataset_order_depends_on_the_seed_not_on_the_worker_count():
    data = _image_like()
    single = _labels(data, workers=0, seed=3)
    assert _labels(data, workers=2, seed=3) == single  # DataLoader worker processes
    assert _labels(data, workers=0, seed=4) != single
    assert sorted(single) == sorted(int(data[i][1]) for i in range(len(data)))  # one epoch = every sample


def test_tensor_dataset_keeps_the_in_memory_path():
    data = TensorDataset(torch.arange(40.0).reshape(40, 1), torch.arange(40))
    ours = list(loader_batches(data, 8, device=CPU, shuffle=True, num_workers=4,
                               generator=torch.Generator().manual_seed(1)))
    direct = list(batches(data, 8, shuffle=True, generator=torch.Generator().manual_seed(1)))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(ours, direct, strict=True))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _epoch(amp: str, *, workers: int = 0):
    data = _image_like()
    splits = DataSplits(data, data, data, 10, (1, 8, 8), "test")
    model, seen = _net(), []
    model[1].register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    settings = TrainSettings(epochs=1, lr=0.05, batch_size=16, amp=amp)
    optimizer, scheduler = make_optimizer(model, settings, 6)
    loss = train_epoch(model, splits, optimizer, settings, generator=torch.Generator().manual_seed(0),
                       device=CPU, scheduler=scheduler, scaler=make_grad_scaler(amp, CPU), num_workers=workers)
    return loss, set(seen), model


def test_fine_tune_is_deterministic_across_worker_counts():
    loss0, _, model0 = _epoch("off", workers=0)
    loss1, _, model1 = _epoch("off", workers=1)
    assert loss0 == loss1
    assert all(torch.equal(a, b) for a, b in zip(model0.state_dict().values(), model1.state_dict().values(), strict=True))


def test_amp_runs_the_forward_pass_in_the_chosen_precision_on_cpu():
    _, off, _ = _epoch("off")
    _, bf16, _ = _epoch("bf16")
    assert off == {torch.float32} and bf16 == {torch.bfloat16}
    # fp16 is a CUDA mode (GradScaler'd float16 steps); a CPU fallback trains in float32.
    _, fp16, _ = _epoch("fp16")
    assert fp16 == {torch.float32}
    assert amp_dtype("fp16", CPU) is None and make_grad_scaler("fp16", CPU) is None
    assert amp_dtype("fp16", torch.device("cuda", 0)) == torch.float16
    with pytest.raises(ValueError, match="amp: choose between off, bf16, fp16, got 'fp32'"):
        TrainSettings(epochs=1, lr=0.1, amp="fp32")


def test_pick_device_without_cuda_falls_back_to_cpu():
    assert pick_device(0) == CPU
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else CPU
    assert pick_device(1) == expected and pick_device(0.5) == expected


@pytest.mark.cluster
def test_gpu_request_without_cuda_gives_one_warning_line():
    """A Ray node advertising a (fake) GPU whose worker has no CUDA: the driver's one line."""
    import ray

    from orchestrator.cluster_resources import gpu_fallback_note
    from orchestrator.config import SearchConfig

    if torch.cuda.is_available():
        pytest.skip("CUDA works here: no fallback to report")
    ray.init(address="local", num_cpus=1, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        note = gpu_fallback_note(SearchConfig(gpus_per_trial=1, finetune=TrainSettings(
            epochs=1, lr=0.01, amp="fp16")))
        assert gpu_fallback_note(SearchConfig(gpus_per_trial=0)) is None  # no GPU asked: no probe
    finally:
        ray.shutdown()
    assert note is not None and "\n" not in note
    assert note.startswith("haqtune: warning: trials ask for 1 GPU each, but CUDA is not available")
    assert "trials run on the CPU (finetune amp fp16 runs in float32 there)" in note


def test_amp_is_part_of_the_reference_cache_key_only_when_on(tmp_path):
    """bf16 trains another reference; off keeps the key of references cached before amp existed."""

    from trainables.data import load_dataset
    from trainables.models import build_model
    from trainables.training import content_hash, train_reference

    data = load_dataset("digits")

    def build():
        return build_model("demo", seed=0, num_classes=10, input_size=8, in_channels=1).model

    paths = {}
    for amp in ("off", "bf16"):
        settings = TrainSettings(epochs=0, lr=0.1, amp=amp)
        _, _, paths[amp] = train_reference(build, data, settings, seed=0, cache_dir=tmp_path, key={"k": 1},
                                           device=CPU)
    assert paths["off"] != paths["bf16"] and paths["off"].exists() and paths["bf16"].exists()
    # The key of a reference cached before amp (and distillation) existed.
    before_amp = {"epochs": 0, "lr": 0.1, "batch_size": 64, "weight_decay": 0.0, "max_steps_per_epoch": None}
    assert paths["off"].name == f"reference-{content_hash({'k': 1, 'settings': before_amp, 'seed': 0})}.pt"
