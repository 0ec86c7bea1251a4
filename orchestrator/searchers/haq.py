"""HAQ's DDPG agent (Wang et al., CVPR 2019) as a Ray Tune searcher: ``haq``.

How a search maps onto HAQ (reference: mit-han-lab/haq, ``rl_quantize.py``,
``lib/rl/ddpg.py``, ``lib/env/linear_quantize_env.py``):

- **Episode = trial.** One episode is 2L steps, a weight step then an activation
  step for each layer in execution order. The agent's state depends only on the
  layer and on its own previous action, never on the trial's outcome, so the
  whole episode is rolled out at ``suggest`` time and the policy is returned as
  the flat ``w_i``/``a_i`` config.
- **State** (10 features per step): layer index, depthwise flag, in channels, out
  channels, stride, kernel, weight count, input feature-map size (each min-max
  normalized over the network's layers; a constant column becomes 0), the W/A flag
  (1 = weight step) and the previous action as bits / max_bits (1.0 at the first
  step). Linear layers have stride 0 and kernel 1, as in HAQ.
- **Action** a in [0, 1] -> the k-th of the step's n allowed widths (ascending), k =
  min(floor(a * n), n - 1): equal-width bins, one per allowed width. For the range
  [min_bits, max_bits] this is HAQ's round(a * (max - min + 1) + min - 0.5), clipped
  (up to the rounding of exact bin edges);
  for a bit set such as {2, 4, 8} each width gets a third of [0, 1]; a fixed layer
  (``fix_first_last``) has one width, whatever the action.
- **Exploration.** The first ``warmup`` episodes (HAQ's 20, whatever ``num_trials``) draw
  uniform random actions; a ``TooFewLearningEpisodesWarning`` says so when ``num_trials``
  leaves fewer than 20 learned episodes after them. After them, the actor's action plus truncated-normal noise on [0, 1] with
  sigma = init_noise * noise_decay ** (episode - warmup).
- **Budget.** The policy is projected with ``problem.project`` (HAQ's rule) before it
  is suggested; the trial projects it again, which changes nothing.
- **Reward** = 0.1 * (val_acc - ref_acc) of the evaluated (projected) policy, given to
  every step of the episode. HAQ's code measures accuracy in percent, so its reward
  is 0.1 * (acc% - ref%); our trials report fractions, and ``reward_scale=100``
  (default) restores HAQ's magnitude, which its learning rates were tuned for.
  When the metric is not ``val_acc`` (or ``ref_acc`` is missing), the metric itself
  is used (negated for ``mode="min"``); the moving-average baseline absorbs the offset.
- **Baseline**, as HAQ: before each gradient step the sampled batch's mean reward
  updates a moving average (``baseline_alpha=0.5``), which is subtracted from the
  batch's rewards.
- **What the replay stores** (``store_actions``). Default ``"drawn"``, as HAQ: every
  step's action as drawn, in the state the actor saw while drawing it (previous action =
  the drawn, pre-projection bits), with the reward of the policy the trial evaluated
  (the projected one; the result's ``policy`` text, else our own projection). The
  critic thus learns what an action is worth *after* the budget projection it
  triggers: raising an early layer's bits makes the projection cut later layers, and
  that cost shows up in the reward of the raised action. ``"evaluated"`` stores the
  evaluated policy instead (states rebuilt from the evaluated bits, an action the
  projection changed replaced by the centre of the evaluated width's bin): the
  critic then only sees policies inside the budget, never learns that high actions
  trigger cuts elsewhere, and with HAQ's update rate the actor drifts to 8/8 bits
  everywhere, which the projection turns into ~4/4 (``benchmarks/RESULTS.md``,
  "Surrogate regret": 2.0 vs 1.0 points on seed 0). It was this searcher's default
  before; checkpoints written then restore with it.
- **Updates.** After each completed episode, once ``warmup`` episodes have completed:
  ``updates_per_episode`` DDPG steps (critic MSE to r + discount * (1 - done) *
  Q'(s', mu'(s')), actor ascends Q(s, mu(s)), soft target updates with ``tau``), each
  on a batch of ``batch_size`` transitions sampled from the replay buffer (HAQ's
  ``rmsize``: 128 steps per layer). HAQ's rate is one step per stored transition, 2L
  per episode (``updates_per_episode=None``); the default is 8, our one deviation from
  HAQ's hyperparameters, measured on the surrogate benchmark (``benchmarks/RESULTS.md``,
  "Surrogate regret", MobileNetV2, 200 trials, 5 seeds, regret separable / pairwise):
  0 steps (no learning: the initial actor plus decaying noise) 1.00 / 0.98 points, 2
  steps 0.58 / 0.45, 8 steps 0.45 / 0.42, 26 steps 0.51 / 0.51, 2L = 106 steps 1.76 /
  1.65 (std over seeds 1.3 / 1.1: 0.4-4.3 points). Our reading, not proven: a few
  hundred episodes of one shared reward per episode give the critic little to go on,
  and at 2L steps the actor follows the critic's errors to a near-deterministic policy
  before the noise has explored (``discount=0`` instead of HAQ's 1 did worse still at
  2L steps: 3.10 / 2.59, so the 2L-step bootstrap chain is not the cause). One step costs ~2.8 ms CPU on one thread (300x300 networks,
  batch 64), ~25 ms per episode at 8 steps, ~0.3 s at 2L for MobileNetV2: the step is
  compute-bound (~120 MFLOP of forward/backward passes; autograd and Python overhead
  are ~15% of it), so only fewer steps make it cheaper. HAQ interleaves its updates
  with the episode's transitions (one stored, one update); here the episode's
  transitions are stored first, then the steps run: the same data, a negligibly later
  update.
- **Concurrency.** DDPG is off-policy: several trials can be in flight; each pending
  episode keeps its actions until its result arrives, in whatever order.
- **Early stopping.** A trial stopped early by ASHA still calls ``on_trial_complete``
  with its last result: the episode completes with the accuracy it reached, which
  is the honest reward for that policy under that fine-tuning budget.
- **Failures.** ``error=True``, no result, or a result without a finite metric: the
  episode is dropped. Unknown trial ids are ignored.
- **Determinism.** All randomness comes from one seeded ``np.random.Generator``
  (exploration, warm-up actions, replay sampling) and one ``torch.Generator``
  (network initialization); no global RNG is read or advanced. Same seed and the
  same sequence of calls -> the same suggestions; ``save``/``restore`` carry the
  full state, so a restored agent continues exactly where it stopped.

Deviations from HAQ's reference code, all towards its documented intent: its
in-place state update makes the W/A flag 1 for activation steps and carries the
previous episode's first action into the next episode's first state; here the flag
is 1 exactly on weight steps and each episode starts from prev = 1.0.

Module layout: this module is the Ray Tune adapter (episodes, rewards, checkpoints);
the agent's pieces (state features, action <-> bits, noise, networks, replay buffer,
hyperparameters) live in ``_haq_agent.py``.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from ray.tune.search import Searcher
from torch import nn

from hardware import MAX_BITS, MIN_BITS
from search_spaces import config_from_policy
from search_spaces import metrics as M

from ._base import (
    SearchProblem,
    SearchPropertiesMixin,
    check_checkpoint,
    evaluated_policy,
    space_state,
)
from ._haq_agent import (
    _NUM_STATIC,
    NUM_FEATURES,
    REWARD_FACTOR,
    STATE_FEATURES,
    Actor,
    Critic,
    HAQConfig,
    ReplayBuffer,
    action_to_bits,
    bits_to_action,
    episode_states,
    layer_features,
    range_mask,
    step_mask,
    truncated_normal,
)
from ._registry import register_searcher

__all__ = [
    "NUM_FEATURES",
    "STATE_FEATURES",
    "HAQConfig",
    "HAQSearcher",
    "TooFewLearningEpisodesWarning",
    "action_to_bits",
    "bits_to_action",
    "episode_states",
    "layer_features",
    "range_mask",
    "step_mask",
    "truncated_normal",
]

_CHECKPOINT_VERSION = 1
# Fewer learned episodes than this after the warm-up and the agent has hardly started
# (HAQ's searches ran 600 episodes): worth a warning, not an error.
MIN_LEARNING_EPISODES = 20


class TooFewLearningEpisodesWarning(UserWarning):
    """``num_trials`` leaves the agent few episodes after its random warm-up."""

@dataclass
class _Episode:
    """A suggested, not yet completed episode."""

    index: int  # episode number at suggest time
    actions: np.ndarray  # [2L] continuous actions as drawn
    policy: np.ndarray  # [L, 2] the projected policy that was suggested


# ---- the searcher --------------------------------------------------------------------------


@register_searcher(
    "haq",
    description="HAQ's DDPG agent: per-layer W/A bits as continuous actions, reward 0.1*(acc - ref)",
    objective="single",
)
class HAQSearcher(SearchPropertiesMixin, Searcher):
    """HAQ's DDPG reinforcement-learning searcher (see the module docstring).

    ``HAQSearcher(problem, **options)`` with ``options`` the fields of ``HAQConfig``.
    """

    def __init__(self, problem: SearchProblem, **options) -> None:
        known = {f.name for f in fields(HAQConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"haq: unknown option {unknown[0]!r}: choose between {', '.join(sorted(known))}"
            )
        super().__init__(metric=problem.metric, mode=problem.mode)
        self.problem = problem
        self._setup(HAQConfig(**options))
        learning = None if problem.num_trials is None else problem.num_trials - self.warmup
        if learning is not None and learning < MIN_LEARNING_EPISODES:
            warnings.warn(
                f"haq: num_trials={problem.num_trials} leaves {max(learning, 0)} learned episodes "
                f"after {self.warmup} random warm-up episodes (HAQ's searches ran 600): expected "
                f"num_trials >= {self.warmup + MIN_LEARNING_EPISODES}, or a smaller "
                "searcher_options.warmup",
                TooFewLearningEpisodesWarning,
                stacklevel=3,
            )

    def _setup(self, config: HAQConfig) -> None:
        problem = self.problem
        self.config = config
        num_layers = problem.num_layers
        self.num_steps = 2 * num_layers
        self.warmup = config.warmup
        self.updates_per_episode = (
            self.num_steps if config.updates_per_episode is None else config.updates_per_episode
        )
        self.features = layer_features(list(problem.layers))
        self.allowed_mask = step_mask(problem.allowed)  # [2L, 8] allowed widths per step
        self._widths = [np.flatnonzero(m).tolist() for m in self.allowed_mask]  # bits - MIN_BITS, per step
        # Static part of every step's state (all but the previous action).
        self._step_states = episode_states(self.features, np.ones(self.num_steps), 1)

        self._rng = np.random.default_rng(problem.seed)
        self._torch_rng = torch.Generator().manual_seed(problem.seed)
        self.actor = Actor(config.hidden1, config.hidden2, self._torch_rng)
        self.critic = Critic(config.hidden1, config.hidden2, self._torch_rng)
        self.actor_target = copy.deepcopy(self.actor)
        self.critic_target = copy.deepcopy(self.critic)
        self.actor_optim = torch.optim.Adam(self.actor.parameters(), lr=config.lr_actor, fused=True)
        self.critic_optim = torch.optim.Adam(self.critic.parameters(), lr=config.lr_critic, fused=True)
        self.replay = ReplayBuffer(config.replay_per_layer * num_layers)
        self._target_params = [*self.actor_target.parameters(), *self.critic_target.parameters()]
        self._source_params = [*self.actor.parameters(), *self.critic.parameters()]

        self.baseline: float | None = None  # moving average of batch-mean rewards
        self.episodes_suggested = 0
        self.episodes_completed = 0
        self.num_updates = 0
        self.value_loss = float("nan")
        self.policy_loss = float("nan")
        self._pending: dict[str, _Episode] = {}
        self._actor_numpy: tuple | None = None

    # -- Tune API ------------------------------------------------------------------------

    def suggest(self, trial_id: str) -> dict | None:
        if trial_id in self._pending:  # asked twice: same answer
            return config_from_policy(self._pending[trial_id].policy)
        index = self.episodes_suggested
        self.episodes_suggested += 1
        actions = self._rollout(index)
        bits = action_to_bits(actions, self.allowed_mask)
        policy = self.problem.project(bits.reshape(-1, 2))
        self._pending[trial_id] = _Episode(index, actions, policy)
        return config_from_policy(policy)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass  # per-epoch results carry no reward: the episode ends with the trial

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        episode = self._pending.pop(trial_id, None)
        if episode is None or error or not result:
            return
        value = result.get(self._metric)
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            return
        if not math.isfinite(float(value)):
            return
        reward = self._reward(result, float(value))
        self._store(episode, evaluated_policy(result, episode.policy), reward)
        self.episodes_completed += 1
        if self.episodes_completed >= self.warmup and len(self.replay) > 0:
            self._train(self.updates_per_episode)

    # -- acting --------------------------------------------------------------------------

    def noise_sigma(self, episode: int) -> float:
        """Exploration sigma of ``episode`` (only used once ``episode >= warmup``)."""
        return self.config.init_noise * self.config.noise_decay ** max(episode - self.warmup, 0)

    def _actor_arrays(self) -> tuple:
        """The actor as float32 numpy arrays laid out for the per-step loop of ``_rollout``.

        Layer 1's input is the step's static features plus the previous action, which
        takes one of ``max - min + 1`` values, so its output is tabulated once per actor
        update: ``h1[t, k]`` for step t after previous bits ``min + k``, with a trailing 1
        that folds layer 2's bias into its weights. A rollout step is then one matvec.
        """
        if self._actor_numpy is None:
            a = self.actor
            lo, hi = self.problem.min_bits, self.problem.max_bits
            with torch.no_grad():
                w1 = a.fc1.weight
                steps = torch.from_numpy(self._step_states[:, : _NUM_STATIC + 1])
                pre1 = steps @ w1[:, : _NUM_STATIC + 1].T + a.fc1.bias  # [2L, H1]
                prev_values = torch.arange(lo, hi + 1, dtype=torch.float32) / hi
                prev1 = prev_values[:, None] * w1[None, :, _NUM_STATIC + 1]  # [K, H1]
                h1 = torch.ones(self.num_steps, hi - lo + 1, w1.shape[0] + 1)
                h1[..., :-1] = torch.relu(pre1[:, None, :] + prev1[None, :, :])
                w2_bias = torch.cat([a.fc2.weight.T, a.fc2.bias[None, :]]).contiguous()  # [H1 + 1, H2]
                w3 = a.fc3.weight[0].clone()
                self._actor_numpy = (h1.numpy(), w2_bias.numpy(), w3.numpy(), float(a.fc3.bias[0]))
        return self._actor_numpy

    def _rollout(self, episode: int) -> np.ndarray:
        """The 2L continuous actions of one episode."""
        if episode < self.warmup:
            return self._rng.random(self.num_steps)
        sigma = self.noise_sigma(episode)
        uniforms = self._rng.random(self.num_steps).tolist()
        h1, w2_bias, w3, b3 = self._actor_arrays()
        lo = self.problem.min_bits
        widths = self._widths
        h2 = np.empty(w2_bias.shape[1], dtype=np.float32)
        zero = np.float32(0.0)
        matmul, maximum, dot, exp = np.matmul, np.maximum, w3.dot, math.exp
        actions = [0.0] * self.num_steps
        prev = self.problem.max_bits - lo  # index of the previous bits: the first state has prev = 1.0
        # Sequential (each state holds the previous step's bits): one numpy matvec per
        # step on preallocated buffers, ~5x cheaper than a torch forward at batch size 1.
        # A batched speculative variant (guess every step's previous bits, then repair)
        # was measured slower here: a 2L-row GEMM costs about as much as 2L matvecs.
        for t in range(self.num_steps):
            matmul(h1[t, prev], w2_bias, out=h2)
            maximum(h2, zero, out=h2)
            z = float(dot(h2)) + b3
            mu = 1.0 / (1.0 + exp(-z)) if z > -700.0 else 0.0
            action = truncated_normal(mu, sigma, uniforms[t])
            actions[t] = action
            choices = widths[t]  # as action_to_bits: the k-th allowed width
            prev = choices[min(int(action * len(choices)), len(choices) - 1)] + MIN_BITS - lo
        return np.array(actions)

    # -- learning ------------------------------------------------------------------------

    def _reward(self, result: dict, value: float) -> float:
        ref = result.get(M.REF_ACC) if self._metric == M.VAL_ACC else None
        if isinstance(ref, int | float | np.number) and math.isfinite(float(ref)):
            score = value - float(ref)
        else:
            score = value if self._mode == "max" else -value
        return REWARD_FACTOR * self.config.reward_scale * score

    def _store(self, episode: _Episode, policy: np.ndarray, reward: float) -> None:
        drawn_bits = action_to_bits(episode.actions, self.allowed_mask)
        if self.config.store_actions == "drawn":
            # HAQ: the actions as drawn, in the states the actor saw while drawing them; the
            # reward is the evaluated (projected) policy's, so the critic learns what an
            # action is worth *after* the budget projection it triggers.
            bits_seq, actions = drawn_bits, episode.actions
        else:
            bits_seq = self.problem.allowed.snap(np.clip(policy, MIN_BITS, MAX_BITS)).reshape(-1)
            actions = np.where(drawn_bits == bits_seq, episode.actions,
                               bits_to_action(bits_seq, self.allowed_mask))
        states = episode_states(self.features, bits_seq, self.problem.max_bits)
        next_states = np.concatenate([states[1:], states[-1:]])  # last: terminal, unused
        not_done = np.ones(self.num_steps, dtype=np.float32)
        not_done[-1] = 0.0
        rewards = np.full(self.num_steps, reward, dtype=np.float32)
        self.replay.push(states, actions, rewards, next_states, not_done)

    def _train(self, steps: int) -> None:
        for _ in range(steps):
            self._update()
        self._actor_numpy = None
        self._actor_arrays()  # tabulate the new actor now, not in the next suggest

    def _update(self) -> None:
        cfg = self.config
        state, action, reward, next_state, not_done = self.replay.sample(self._rng, cfg.batch_size)
        batch_mean = float(reward.mean())
        if self.baseline is None:
            self.baseline = batch_mean
        else:
            self.baseline += cfg.baseline_alpha * (batch_mean - self.baseline)
        reward = reward - self.baseline

        with torch.no_grad():
            next_q = self.critic_target(next_state, self.actor_target(next_state))
            target_q = reward + cfg.discount * not_done * next_q
        value_loss = nn.functional.mse_loss(self.critic(state, action), target_q)
        self.critic_optim.zero_grad(set_to_none=True)
        value_loss.backward()
        self.critic_optim.step()

        # The actor's loss needs no critic weight gradients: freezing saves a matmul.
        self.critic.requires_grad_(False)
        policy_loss = -self.critic(state, self.actor(state)).mean()
        self.actor_optim.zero_grad(set_to_none=True)
        policy_loss.backward()
        self.actor_optim.step()
        self.critic.requires_grad_(True)

        with torch.no_grad():  # soft target update: target += tau * (source - target)
            torch._foreach_lerp_(self._target_params, self._source_params, cfg.tau)
        self.num_updates += 1
        self.value_loss = float(value_loss.detach())
        self.policy_loss = float(policy_loss.detach())

    # -- checkpointing -------------------------------------------------------------------

    def _state(self) -> dict:
        return {
            "version": _CHECKPOINT_VERSION,
            "config": asdict(self.config),
            "metric": self._metric,
            "mode": self._mode,
            "space": space_state(self.problem),
            "features": torch.from_numpy(self.features.copy()),
            "warmup": self.warmup,
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "actor_target": self.actor_target.state_dict(),
            "critic_target": self.critic_target.state_dict(),
            "actor_optim": self.actor_optim.state_dict(),
            "critic_optim": self.critic_optim.state_dict(),
            "replay": self.replay.state_dict(),
            "baseline": self.baseline,
            "episodes_suggested": self.episodes_suggested,
            "episodes_completed": self.episodes_completed,
            "num_updates": self.num_updates,
            "losses": (self.value_loss, self.policy_loss),
            "np_rng": self._rng.bit_generator.state,
            "torch_rng": self._torch_rng.get_state(),
            "pending": {
                trial_id: {
                    "index": ep.index,
                    "actions": torch.from_numpy(ep.actions.copy()),
                    "policy": torch.from_numpy(ep.policy.copy()),
                }
                for trial_id, ep in self._pending.items()
            },
        }

    def save(self, checkpoint_path: str) -> None:
        """Write the full agent state atomically (temp file in the same directory + rename)."""
        directory = os.path.dirname(os.path.abspath(checkpoint_path))
        fd, tmp_path = tempfile.mkstemp(prefix=".haq-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(self._state(), f)
            os.replace(tmp_path, checkpoint_path)
        except BaseException:
            if os.path.exists(tmp_path):
                os.unlink(tmp_path)
            raise

    def restore(self, checkpoint_path: str) -> None:
        """Load a state written by ``save`` into this searcher (built for the same problem)."""
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        check_checkpoint("haq", checkpoint_path, state, _CHECKPOINT_VERSION, self.problem)
        if not np.allclose(state["features"].numpy(), layer_features(list(self.problem.layers))):
            raise ValueError(
                f"haq checkpoint {checkpoint_path}: expected the same network, got different layer shapes"
            )
        config = dict(state["config"])
        if config.get("warmup") is None:  # written when None meant "derive from num_trials"
            config["warmup"] = state["warmup"]
        # Written before the option existed, when the replay always held the evaluated bits.
        config.setdefault("store_actions", "evaluated")
        self._setup(HAQConfig(**config))
        self._metric, self._mode = state["metric"], state["mode"]
        self.warmup = state["warmup"]
        for name in ("actor", "critic", "actor_target", "critic_target", "actor_optim", "critic_optim"):
            getattr(self, name).load_state_dict(state[name])
        self.replay.load_state_dict(state["replay"])
        self.baseline = state["baseline"]
        self.episodes_suggested = state["episodes_suggested"]
        self.episodes_completed = state["episodes_completed"]
        self.num_updates = state["num_updates"]
        self.value_loss, self.policy_loss = state["losses"]
        self._rng.bit_generator.state = state["np_rng"]
        self._torch_rng.set_state(state["torch_rng"])
        self._pending = {
            trial_id: _Episode(int(ep["index"]), ep["actions"].numpy().copy(), ep["policy"].numpy().copy())
            for trial_id, ep in state["pending"].items()
        }
        self._actor_numpy = None
