"""AQGAN's algorithm (Kao, Ramamurthy, Krishna, arXiv 2006.03968), our design: networks,
training, sampling. The Ray Tune adapter is ``aqgan.py``; ``haqtune generate`` loads an
exported ``AQGAN`` with ``AQGAN.from_export``.

The paper's internals are not public. What is here, and why:

- **Policy encoding.** A policy ``[L, 2]`` (w, a bits per layer) is one-hot over the
  ``K = max_bits - min_bits + 1`` allowed bitwidths: ``[L, 2, K]``, flattened for the
  discriminator.
- **Accuracy scale.** Trial accuracies are skewed (most policies inside a budget land
  within a point of each other, a few collapse), so the condition is the accuracy's
  *quantile* among the training data (mid-ranks, piecewise linear in between): a target
  of 0.9 means "better than 90% of what was seen". Uniform conditions spread the
  generator's capacity over the whole range instead of the few collapsed policies, and
  map back to accuracy through the same table. Targets outside the observed range clip
  to its ends (0 or 1): the generator knows nothing beyond the data.
- **Generator**: ``[noise (noise_dim), target quantile]`` -> MLP (LeakyReLU) -> logits
  ``[L, 2, K]``. Training samples with straight-through Gumbel-softmax (hard one-hot
  forward, soft gradient) at a temperature annealed geometrically from ``tau_start`` to
  ``tau_end`` over each training round; inference samples the categorical exactly
  (Gumbel-max), so generated policies are discrete by construction.
- **Discriminator** (ACGAN-style): one-hot policy -> shared MLP -> a real/fake score
  and an accuracy-regression head (sigmoid: the quantile). The regression head learns
  from real (evaluated) policies only; training it on fakes with their *targets* as
  labels would teach it the generator's mistakes.
- **Losses.** Hinge (default; ``loss="wgan-gp"`` adds a gradient penalty on one-hot
  interpolates instead) for the adversarial part, the regression head's MSE on real
  data, and for the generator a *consistency* term: MSE between its target and a
  predictor's estimate for what it generated (the ridge below by default, see
  "Consistency judge"). Targets for fakes are drawn
  from the data's own quantiles plus a small jitter, so the condition the generator
  sees matches the distribution it is trained to reproduce.
- **Selection predictor** (``predict``): generate-and-select ranks candidates by a ridge
  regression of val_acc on the (thermometer-coded) bits, fitted in closed form on the
  same data, its penalty picked by exact leave-one-out error; not by the discriminator's
  regression head (``head_predict``). Measured on the demo's 40-trial acceptance
  history (first design): 5-fold CV mean abs error 3.4 points for the ridge vs 6.6 for
  the head, and 5.3 vs 14.5 on 40 policies of other searchers (haq, tpe) of the same
  experiment.
  The head is trained jointly with an adversarial objective on a few dozen points and
  over-predicts policies unlike its data; a linear model on one-hot bits is what
  accuracy mostly is (per-layer sensitivities add up). The head stays part of the
  discriminator (ACGAN-style); it no longer judges anything by default. The ridge is a
  deterministic function of the data,
  so checkpoints and exports carry the data, not its weights.
- **Consistency judge** (``consistency="ridge"``, default): the generator's consistency
  term compares its target with the *ridge's* prediction of its (straight-through)
  sample, the ridge being linear in the one-hot code; ``"head"`` uses the regression
  head (the first design). Measured on the demo (acceptance history 0.39..0.94): with
  the head as judge, samples conditioned on the 10th percentile had 0.4% 1-bit entries
  (the history's low policies: 14%) and the ridge predicted 0.86-0.91 for them: the
  generator had learned to satisfy a head that mis-scored them, not to produce
  low-accuracy policies, and `generate` missed the p10 / p30 targets by 33 / 16 points.
- **Determinism.** Every random number comes from one ``torch.Generator`` (init,
  batches, noise, Gumbel draws); no global RNG is read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from torch import nn

from ._base import check_float_option, check_int_option
from ._nets import seeded_linear

LOSSES = ("hinge", "wgan-gp")
CONSISTENCY = ("ridge", "head")
EXPORT_VERSION = 1
_EPS = 1e-10


def _check_int(name: str, value, low: int, *, optional: bool = False) -> None:
    check_int_option(f"aqgan: {name}", value, low, optional=optional)


def _check_float(name: str, value, low: float, high: float, *, optional: bool = False) -> None:
    check_float_option(f"aqgan: {name}", value, low, high, optional=optional)


@dataclass(frozen=True, kw_only=True)
class GANConfig:
    """Networks and training. Defaults measured on the demo and the surrogate
    (``benchmarks/bench_aqgan.py``): small networks train in well under a second."""

    noise_dim: int = 8
    hidden: int = 128
    lr: float = 2e-3
    train_steps: int = 150  # per training round; rounds warm-start from the last one
    batch_size: int = 64
    loss: str = "hinge"
    gp_weight: float = 10.0  # wgan-gp only
    regression_weight: float = 4.0  # discriminator: MSE of the accuracy head on real data
    consistency_weight: float = 4.0  # generator: MSE(target, predicted accuracy of its output)
    consistency: str = "ridge"  # which predictor judges the generator's output: see the module docstring
    tau_start: float = 2.0
    tau_end: float = 0.5
    target_jitter: float = 0.05  # quantile noise on the fakes' targets

    def __post_init__(self) -> None:
        _check_int("noise_dim", self.noise_dim, 1)
        _check_int("hidden", self.hidden, 1)
        _check_float("lr", self.lr, 1e-8, 1.0)
        _check_int("train_steps", self.train_steps, 0)
        _check_int("batch_size", self.batch_size, 1)
        if self.loss not in LOSSES:
            raise ValueError(f"aqgan: loss: choose between {', '.join(LOSSES)}, got {self.loss!r}")
        _check_float("gp_weight", self.gp_weight, 0.0, 1e4)
        _check_float("regression_weight", self.regression_weight, 0.0, 1e4)
        _check_float("consistency_weight", self.consistency_weight, 0.0, 1e4)
        if self.consistency not in CONSISTENCY:
            raise ValueError(f"aqgan: consistency: choose between {', '.join(CONSISTENCY)}, "
                             f"got {self.consistency!r}")
        _check_float("tau_start", self.tau_start, 1e-3, 100.0)
        _check_float("tau_end", self.tau_end, 1e-3, 100.0)
        _check_float("target_jitter", self.target_jitter, 0.0, 1.0)


GAN_OPTIONS = frozenset(f.name for f in fields(GANConfig))


class Generator(nn.Module):
    """[noise, target quantile] -> logits ``[B, L, 2, K]``."""

    def __init__(self, noise_dim: int, hidden: int, num_layers: int, num_choices: int,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.shape = (num_layers, 2, num_choices)
        self.net = nn.Sequential(
            seeded_linear(noise_dim + 1, hidden, generator), nn.LeakyReLU(0.2),
            seeded_linear(hidden, hidden, generator), nn.LeakyReLU(0.2),
            seeded_linear(hidden, num_layers * 2 * num_choices, generator))

    def forward(self, noise: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = self.net(torch.cat([noise, target[:, None]], dim=1))
        return logits.view(-1, *self.shape)


class Discriminator(nn.Module):
    """One-hot policy ``[B, L*2*K]`` -> (real/fake score ``[B]``, accuracy quantile ``[B]``)."""

    def __init__(self, in_dim: int, hidden: int, generator: torch.Generator) -> None:
        super().__init__()
        self.body = nn.Sequential(
            seeded_linear(in_dim, hidden, generator), nn.LeakyReLU(0.2),
            seeded_linear(hidden, hidden, generator), nn.LeakyReLU(0.2))
        self.adv = seeded_linear(hidden, 1, generator)
        self.reg = seeded_linear(hidden, 1, generator)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.adv(h)[:, 0], torch.sigmoid(self.reg(h)[:, 0])


class AccuracyScale:
    """Accuracy <-> quantile among the training accuracies (mid-ranks of ties, linear between)."""

    def __init__(self, accs) -> None:
        accs = np.sort(np.asarray(accs, dtype=np.float64))
        self.values, first = np.unique(accs, return_index=True)
        counts = np.diff(np.append(first, len(accs)))
        mid_rank = first + (counts - 1) / 2.0
        n = len(accs)
        self.quantiles = mid_rank / (n - 1) if n > 1 else np.full(len(self.values), 0.5)
        if len(self.values) > 1:  # the ends are 0 and 1 whatever the ties
            self.quantiles = (self.quantiles - self.quantiles[0]) / (self.quantiles[-1] - self.quantiles[0])

    @classmethod
    def from_table(cls, values: np.ndarray, quantiles: np.ndarray) -> AccuracyScale:
        scale = cls.__new__(cls)
        scale.values, scale.quantiles = np.array(values, dtype=np.float64), np.array(quantiles, dtype=np.float64)
        return scale

    def to_unit(self, acc) -> np.ndarray:
        return np.interp(np.asarray(acc, dtype=np.float64), self.values, self.quantiles)

    def to_acc(self, unit) -> np.ndarray:
        return np.interp(np.asarray(unit, dtype=np.float64), self.quantiles, self.values)

    @property
    def low(self) -> float:
        return float(self.values[0])

    @property
    def high(self) -> float:
        return float(self.values[-1])


def one_hot(policies: np.ndarray, min_bits: int, num_choices: int) -> torch.Tensor:
    """``[N, L, 2]`` bits -> ``[N, L*2*K]`` float32 one-hot."""
    idx = torch.from_numpy(np.ascontiguousarray(policies, dtype=np.int64) - min_bits)
    return nn.functional.one_hot(idx, num_choices).to(torch.float32).flatten(1)


RIDGE_ALPHAS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


class RidgePredictor:
    """val_acc ~ ridge regression on thermometer-coded bits (one indicator "bits <= t" per
    entry and threshold t) with an unpenalized intercept; the penalty ``alpha`` minimizes
    the exact leave-one-out squared error (closed form from the hat matrix, one thin SVD
    of the data for all alphas).

    Thermometer columns span the same functions as one-hot ones (per-entry effects of each
    bitwidth); the difference is what the penalty shrinks: the *step* between adjacent
    bitwidths instead of each bitwidth's level, i.e. neighbouring bitwidths are assumed to
    cost similar accuracy. Measured on the demo's acceptance history (40 policies): 5-fold
    CV mean abs error 3.4 points vs 3.9 for one-hot, 5.3 vs 5.7 on other searchers' policies.
    """

    def __init__(self, *, policies: np.ndarray, accs: np.ndarray, min_bits: int, max_bits: int,
                 alphas=RIDGE_ALPHAS) -> None:
        self.thresholds = np.arange(min_bits, max_bits)
        x = self.features(policies)
        y = np.asarray(accs, dtype=np.float64)
        n = len(y)
        self.x_mean, self.y_mean = x.mean(axis=0), float(y.mean())
        xc, yc = x - self.x_mean, y - self.y_mean
        # Thin SVD xc = U diag(s) V^T: min(n, d) columns whatever the shape (a few dozen
        # to a few thousand trials; L*2*(K-1) = 742 columns for MobileNetV2).
        u, sv, vt = np.linalg.svd(xc, full_matrices=False)
        uy = u.T @ yc
        best = None
        for alpha in alphas:
            shrink = sv ** 2 / (sv ** 2 + alpha)
            fitted = u @ (shrink * uy)
            # Hat matrix of the centred fit plus the intercept's 1/n on the diagonal.
            leverage = (u ** 2) @ shrink + 1.0 / n
            residual = (yc - fitted) / np.clip(1.0 - leverage, 1e-6, None)
            loo_mse = float(np.mean(residual ** 2))
            if best is None or loo_mse < best[0]:
                best = (loo_mse, alpha, vt.T @ (sv / (sv ** 2 + alpha) * uy))
        self.loo_mse, self.alpha, self.coef = best

    def features(self, policies: np.ndarray) -> np.ndarray:
        """``[N, L, 2]`` bits -> ``[N, L*2*(K-1)]`` thermometer code (float64)."""
        bits = np.asarray(policies, dtype=np.int64).reshape(len(policies), -1, 1)
        return (bits <= self.thresholds).reshape(len(policies), -1).astype(np.float64)

    def predict(self, policies: np.ndarray) -> np.ndarray:
        if len(policies) == 0:
            return np.zeros(0)
        return (self.features(policies) - self.x_mean) @ self.coef + self.y_mean

    def one_hot_weights(self) -> tuple[torch.Tensor, float]:
        """(w ``[L*2*K]``, b) with ``predict(p) == one_hot(p) @ w + b``: the same linear model on
        the one-hot code, so the generator's straight-through samples get its gradient.
        Choosing bitwidth ``min_bits + k`` switches on every threshold ``t >= min_bits + k``."""
        coef = self.coef.reshape(-1, len(self.thresholds))  # [L*2, K-1]
        suffix = np.cumsum(coef[:, ::-1], axis=1)[:, ::-1]  # sum over thresholds j >= k
        weights = np.concatenate([suffix, np.zeros((len(coef), 1))], axis=1)  # max_bits: no threshold
        bias = self.y_mean - float(self.x_mean @ self.coef)
        return torch.from_numpy(weights.reshape(-1).astype(np.float32)), bias


class AQGAN:
    """Conditional GAN over quantization policies of one network (see the module docstring).

    ``fit(policies, accs, steps)`` trains (warm-starting from the previous round) and
    fits the selection predictor; ``generate(n, target_acc)`` samples policies;
    ``predict(policies)`` is the selection predictor's accuracy estimate (ridge, see the
    module docstring; ``fit_predictor`` refits it on more data), ``head_predict`` the
    discriminator's regression head's.
    """

    def __init__(self, *, num_layers: int, min_bits: int, max_bits: int, config: GANConfig,
                 seed: int) -> None:
        self.num_layers, self.min_bits, self.max_bits = num_layers, min_bits, max_bits
        self.num_choices = max_bits - min_bits + 1
        self.config = config
        self.torch_rng = torch.Generator().manual_seed(seed)
        in_dim = num_layers * 2 * self.num_choices
        self.gen = Generator(config.noise_dim, config.hidden, num_layers, self.num_choices, self.torch_rng)
        self.disc = Discriminator(in_dim, config.hidden, self.torch_rng)
        # Adam with beta1 = 0.5, beta2 = 0.9: the usual GAN setting (WGAN-GP, BigGAN).
        self.opt_g = torch.optim.Adam(self.gen.parameters(), lr=config.lr, betas=(0.5, 0.9))
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=config.lr, betas=(0.5, 0.9))
        self.scale: AccuracyScale | None = None
        self.predictor: RidgePredictor | None = None
        self.rounds = 0
        self.losses = {"d": float("nan"), "g": float("nan"), "reg_mse": float("nan")}

    @property
    def trained(self) -> bool:
        return self.scale is not None

    # ---- training -----------------------------------------------------------------------

    def _gumbel(self, shape) -> torch.Tensor:
        u = torch.rand(shape, generator=self.torch_rng)
        return -torch.log(-torch.log(u + _EPS) + _EPS)

    def _relaxed(self, noise: torch.Tensor, target: torch.Tensor, tau: float) -> torch.Tensor:
        """Straight-through Gumbel-softmax sample of the generator: ``[B, L*2*K]``."""
        logits = self.gen(noise, target)
        soft = torch.softmax((logits + self._gumbel(logits.shape)) / tau, dim=-1)
        hard = nn.functional.one_hot(soft.argmax(-1), self.num_choices).to(soft.dtype)
        return (hard - soft.detach() + soft).flatten(1)

    def fit(self, policies: np.ndarray, accs: np.ndarray, steps: int | None = None) -> None:
        """``steps`` (default ``config.train_steps``) alternating D/G updates on the data."""
        cfg = self.config
        steps = cfg.train_steps if steps is None else steps
        self.scale = AccuracyScale(accs)
        self.fit_predictor(policies, accs)
        x_all = one_hot(policies, self.min_bits, self.num_choices)
        y_all = torch.from_numpy(self.scale.to_unit(accs).astype(np.float32))
        n, batch = len(x_all), cfg.batch_size
        ratio = cfg.tau_end / cfg.tau_start
        ridge_w, ridge_b = self.predictor.one_hot_weights()
        acc_var = max(float(np.var(accs)), _EPS)
        mse = nn.functional.mse_loss
        for step in range(steps):
            tau = cfg.tau_start * ratio ** (step / max(steps - 1, 1))
            idx = torch.randint(n, (batch,), generator=self.torch_rng)
            x_real, y_real = x_all[idx], y_all[idx]
            jitter = (torch.rand(batch, generator=self.torch_rng) * 2 - 1) * cfg.target_jitter
            target = (y_all[torch.randint(n, (batch,), generator=self.torch_rng)] + jitter).clamp(0, 1)
            noise = torch.randn(batch, cfg.noise_dim, generator=self.torch_rng)
            fake = self._relaxed(noise, target, tau)

            score_real, pred_real = self.disc(x_real)
            score_fake, _ = self.disc(fake.detach())
            if cfg.loss == "hinge":
                adv = torch.relu(1 - score_real).mean() + torch.relu(1 + score_fake).mean()
            else:
                adv = score_fake.mean() - score_real.mean() + cfg.gp_weight * self._gradient_penalty(
                    x_real, fake.detach())
            reg_mse = mse(pred_real, y_real)
            d_loss = adv + cfg.regression_weight * reg_mse
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            self.opt_d.step()

            self.disc.requires_grad_(False)  # the generator's step needs no D weight gradients
            score_fake, pred_fake = self.disc(fake)
            if cfg.consistency == "ridge":
                # In accuracy units, scaled by the data's variance (unitless like the quantiles).
                target_acc = torch.from_numpy(self.scale.to_acc(target.numpy()).astype(np.float32))
                consistency = mse(fake @ ridge_w + ridge_b, target_acc) / acc_var
            else:
                consistency = mse(pred_fake, target)
            g_loss = -score_fake.mean() + cfg.consistency_weight * consistency
            self.opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            self.opt_g.step()
            self.disc.requires_grad_(True)
            self.losses = {"d": float(d_loss.detach()), "g": float(g_loss.detach()),
                           "reg_mse": float(reg_mse.detach())}
        self.rounds += 1

    def fit_predictor(self, policies: np.ndarray, accs: np.ndarray) -> None:
        """(Re)fit the selection predictor on ``policies`` ``[N, L, 2]`` and their val_acc."""
        self.predictor = RidgePredictor(policies=np.asarray(policies), accs=np.asarray(accs),
                                        min_bits=self.min_bits, max_bits=self.max_bits)

    def _gradient_penalty(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        alpha = torch.rand(len(real), 1, generator=self.torch_rng)
        mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
        score, _ = self.disc(mixed)
        (grad,) = torch.autograd.grad(score.sum(), mixed, create_graph=True)
        return ((grad.norm(dim=1) - 1) ** 2).mean()

    # ---- sampling -----------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, num: int, target_acc: float | np.ndarray, *, spread: float = 0.0) -> np.ndarray:
        """``num`` policies ``[num, L, 2]`` (int64 bits) sampled at ``target_acc``
        (one accuracy, or one per policy), before any budget projection. ``spread`` > 0
        draws each policy's condition uniformly within +-``spread`` of the target's
        quantile (clipped to [0, 1]): a wider pool for a predictor to select from."""
        if not self.trained:
            raise RuntimeError("aqgan: the generator has not been trained yet")
        unit = torch.from_numpy(np.broadcast_to(self.scale.to_unit(target_acc), (num,)).astype(np.float32))
        if spread > 0:
            unit = (unit + (torch.rand(num, generator=self.torch_rng) * 2 - 1) * spread).clamp(0, 1)
        noise = torch.randn(num, self.config.noise_dim, generator=self.torch_rng)
        logits = self.gen(noise, unit)
        choice = (logits + self._gumbel(logits.shape)).argmax(-1)  # Gumbel-max: exact sampling
        return choice.numpy().astype(np.int64) + self.min_bits

    def predict(self, policies: np.ndarray) -> np.ndarray:
        """The selection predictor's val_acc estimate of policies ``[N, L, 2]``: ``[N]``."""
        if self.predictor is None:
            raise RuntimeError("aqgan: no selection predictor: call fit or fit_predictor first")
        return self.predictor.predict(policies)

    @torch.no_grad()
    def head_predict(self, policies: np.ndarray) -> np.ndarray:
        """The regression head's val_acc estimate of policies ``[N, L, 2]``: ``[N]``."""
        if not self.trained:
            raise RuntimeError("aqgan: the generator has not been trained yet")
        if len(policies) == 0:
            return np.zeros(0)
        _, unit = self.disc(one_hot(policies, self.min_bits, self.num_choices))
        return self.scale.to_acc(unit.numpy())

    # ---- state --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "num_layers": self.num_layers, "min_bits": self.min_bits, "max_bits": self.max_bits,
            "config": asdict(self.config),
            "gen": self.gen.state_dict(), "disc": self.disc.state_dict(),
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
            # The scale's (values, quantiles) table, [2, m]: all that maps accuracy <-> quantile.
            "scale": None if self.scale is None else torch.from_numpy(
                np.stack([self.scale.values, self.scale.quantiles])),
            "rounds": self.rounds, "losses": dict(self.losses),
            "torch_rng": self.torch_rng.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.gen.load_state_dict(state["gen"])
        self.disc.load_state_dict(state["disc"])
        if "opt_g" in state:  # an exported generator has no optimizers: it is not trained further
            self.opt_g.load_state_dict(state["opt_g"])
            self.opt_d.load_state_dict(state["opt_d"])
        table = state["scale"]
        if table is None:
            self.scale = None
        else:
            self.scale = AccuracyScale.from_table(*table.numpy())
        self.rounds = int(state["rounds"])
        self.losses = dict(state["losses"])
        self.torch_rng.set_state(state["torch_rng"])

    @classmethod
    def from_state_dict(cls, state: dict, *, seed: int = 0) -> AQGAN:
        model = cls(num_layers=int(state["num_layers"]), min_bits=int(state["min_bits"]),
                    max_bits=int(state["max_bits"]), config=GANConfig(**state["config"]), seed=seed)
        model.load_state_dict(state)
        return model
