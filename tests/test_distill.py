"""Knowledge distillation from the full-precision reference in a quantized fine-tune."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import trainables.trial as trial_module
from trainables import TrainSettings, TrialContext, build_model, load_dataset, train
from trainables.training import ReferenceSettings, distillation_loss


def test_distillation_loss_is_hintons_formula():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 10, generator=gen, requires_grad=True)
    teacher = torch.randn(16, 10, generator=gen)
    labels = torch.randint(0, 10, (16,), generator=gen)
    ce = F.cross_entropy(logits, labels)
    assert torch.allclose(distillation_loss(logits, labels, teacher, weight=0.0, temperature=3.0), ce)
    # Same logits as the teacher: the soft term is zero, whatever T.
    assert distillation_loss(teacher, labels, teacher, weight=1.0, temperature=4.0).abs() < 1e-6

    weight, t = 0.25, 2.0
    p_t = torch.softmax(teacher / t, -1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(logits / t, -1))).sum(-1).mean()
    loss = distillation_loss(logits, labels, teacher, weight=weight, temperature=t)
    assert torch.allclose(loss, (1 - weight) * ce + weight * t * t * kl)
    # The T^2 factor: the soft term's gradient is (p_s - p_t) * T / batch, not / T.
    (grad,) = torch.autograd.grad(distillation_loss(logits, labels, teacher, weight=1.0, temperature=t), logits)
    expected = (torch.softmax(logits / t, -1) - p_t) * t / len(logits)
    assert torch.allclose(grad, expected, atol=1e-6)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"distill_weight": 1.5}, "distill_weight: expected a number between 0 and 1"),
    ({"distill_weight": -0.1}, "distill_weight: expected a number >= 0"),
    ({"distill_temperature": 0}, "distill_temperature: expected a number > 0"),
])
def test_distillation_settings_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainSettings(epochs=1, lr=0.1, **kwargs)


def test_the_reference_cannot_distill():
    with pytest.raises(ValueError, match="the reference is the teacher"):
        ReferenceSettings(epochs=1, lr=0.1, distill_weight=0.5)


@pytest.fixture(scope="module")
def context():
    from orchestrator.config import SearchConfig
    from orchestrator.search import prepare

    prepared = prepare(SearchConfig())
    model = build_model("demo", seed=0, **prepared.model_kwargs).model
    train(model, load_dataset("digits"), TrainSettings(epochs=3, lr=0.1), seed=0, device=torch.device("cpu"))
    return TrialContext(
        model="demo", dataset="digits", model_kwargs=prepared.model_kwargs, input_size=None,
        layer_names=tuple(s.name for s in prepared.layers), reference_state=model.state_dict(),
        ref_acc=0.9, table=prepared.table, budget=None, finetune=TrainSettings(epochs=1, lr=0.02), seed=0)


def _finetuned(context, distill_weight, *, monkeypatch=None, shuffle_labels=False):
    if shuffle_labels:  # the training labels replaced by a permutation of them
        data = load_dataset("digits")
        x, y = data.train.tensors
        permuted = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
        data = dataclasses.replace(data, train=TensorDataset(x, permuted))
        monkeypatch.setattr(trial_module, "_cached_dataset", lambda *a, **k: data)
    finetune = dataclasses.replace(context.finetune, distill_weight=distill_weight, distill_temperature=2.0)
    model, *_ = trial_module.finetune_policy(dataclasses.replace(context, finetune=finetune),
                                             context.table.uniform(3))
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_distillation_learns_from_the_reference_not_the_labels(context, monkeypatch):
    plain = _finetuned(context, 0.0)
    assert _same(plain, _finetuned(context, 0.0))  # deterministic
    distilled = _finetuned(context, 1.0)
    assert not _same(plain, distilled)
    # weight 1: the labels play no part (shuffling them changes nothing) ...
    assert _same(distilled, _finetuned(context, 1.0, monkeypatch=monkeypatch, shuffle_labels=True))
    monkeypatch.undo()
    # ... while weight 0.5 still learns from them.
    half = _finetuned(context, 0.5)
    assert not _same(half, _finetuned(context, 0.5, monkeypatch=monkeypatch, shuffle_labels=True))
    # The teacher is the full-precision reference, not the quantized model being trained
    # (distilling from itself would give a zero loss and leave the model where it started).
    start = _finetuned(dataclasses.replace(context, finetune=dataclasses.replace(context.finetune, epochs=0)), 1.0)
    changed = [k for k in start if start[k].is_floating_point() and not torch.equal(start[k], distilled[k])]
    assert any(k.endswith("weight") for k in changed)
