"""The HAQ DDPG searcher: state, actions, determinism, resume, projection, learning."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from test_searcher_contract import (
    LAYERS,
    MAX_BITS,
    MIN_BITS,
    bit_set_problem,
    fake_result,
    make_problem,
)

from orchestrator.searchers import SearchProblem, make_searcher
from orchestrator.searchers.haq import (
    NUM_FEATURES,
    HAQSearcher,
    action_to_bits,
    bits_to_action,
    episode_states,
    layer_features,
    range_mask,
    step_mask,
    truncated_normal,
)
from search_spaces import AllowedBits, Budget, format_policy, policy_cost, policy_from_config
from search_spaces import metrics as M

L = len(LAYERS)
SMALL = {"hidden1": 32, "hidden2": 32}  # fast networks where the size does not matter


def haq(seed: int = 0, **options) -> HAQSearcher:
    return make_searcher("haq", make_problem(seed), **options)


def drive(searcher, ids, problem=None) -> list[dict]:
    problem = problem or searcher.problem
    configs = []
    for trial_id in ids:
        config = searcher.suggest(trial_id)
        configs.append(config)
        searcher.on_trial_complete(trial_id, fake_result(problem, config))
    return configs


# ---- state, actions -------------------------------------------------------------------------


def test_layer_features_are_min_max_normalized():
    feats = layer_features(LAYERS)
    assert feats.shape == (L, 8) and feats.dtype == np.float32
    assert feats.min() >= 0.0 and feats.max() <= 1.0
    # layer index, depthwise, in, out, stride, kernel, weights, fmap: all vary here.
    np.testing.assert_allclose(feats.min(axis=0), 0.0)
    np.testing.assert_allclose(feats.max(axis=0), 1.0)
    np.testing.assert_allclose(feats[:, 0], np.linspace(0, 1, L), rtol=1e-6)
    assert feats[:, 1].tolist() == [0, 1, 0, 1, 0, 0]  # depthwise flag
    assert feats[-1, 4] == 0.0  # HAQ: a linear layer has stride 0
    # A constant column (here: all strides equal) becomes 0, not its raw value.
    same = [LAYERS[2], LAYERS[4]]
    assert layer_features(same)[:, 4].tolist() == [0.0, 0.0]


def test_episode_states_carry_the_w_a_flag_and_previous_action():
    feats = layer_features(LAYERS)
    bits = np.arange(2 * L) % 8 + 1
    states = episode_states(feats, bits, max_bits=8)
    assert states.shape == (2 * L, NUM_FEATURES)
    np.testing.assert_array_equal(states[0::2, :8], feats)
    np.testing.assert_array_equal(states[1::2, :8], feats)
    assert states[:, 8].tolist() == [1.0, 0.0] * L  # 1 = weight step
    assert states[0, 9] == 1.0
    np.testing.assert_allclose(states[1:, 9], bits[:-1] / 8)


@pytest.mark.parametrize(("lo", "hi"), [(1, 8), (2, 6), (4, 4)])
def test_action_to_bits_uses_equal_bins(lo, hi):
    actions = np.linspace(0, 1, 100_001)
    bits = action_to_bits(actions, range_mask(lo, hi))
    assert bits.min() == lo and bits.max() == hi
    assert action_to_bits([0.0], range_mask(lo, hi))[0] == lo and action_to_bits([1.0], range_mask(lo, hi))[0] == hi
    counts = np.bincount(bits - lo)
    assert counts.max() - counts.min() <= 2  # each bitwidth gets 1 / (hi - lo + 1) of [0, 1]
    every = np.arange(lo, hi + 1)
    np.testing.assert_array_equal(action_to_bits(bits_to_action(every, range_mask(lo, hi)), range_mask(lo, hi)), every)
    # HAQ's formula, literally.
    a = 0.37
    assert action_to_bits([a], range_mask(lo, hi))[0] == min(max(round(a * (hi - lo + 1) + lo - 0.5), lo), hi)


def test_action_to_bits_maps_onto_each_steps_allowed_widths():
    allowed = AllowedBits.build(2, w_bits=[2, 4, 8], a_bits=[3, 6], fix_first_last=False)
    mask = step_mask(allowed)  # steps w_0, a_0, w_1, a_1
    actions = np.linspace(0, 1, 30_001)
    for step, widths in enumerate([(2, 4, 8), (3, 6)] * 2):
        bits = action_to_bits(actions, mask[step])
        assert set(bits.tolist()) == set(widths)
        counts = np.array([(bits == b).sum() for b in widths])
        assert counts.max() - counts.min() <= 2  # equal bins: each width gets 1/n of [0, 1]
        centres = bits_to_action(np.array(widths), mask[step])
        np.testing.assert_allclose(centres, (np.arange(len(widths)) + 0.5) / len(widths))
        np.testing.assert_array_equal(action_to_bits(centres, mask[step]), widths)
    # Per-step masks broadcast: one call maps a whole episode.
    assert action_to_bits([0.0, 0.99, 0.5, 0.49], mask).tolist() == [2, 6, 4, 3]
    fixed = step_mask(AllowedBits.build(3, fix_first_last=True))
    assert action_to_bits(np.zeros(6), fixed).tolist() == [8, 8, 1, 1, 8, 8]  # fixed: any action


def test_truncated_normal_stays_in_range_and_centres_on_mu():
    rng = np.random.default_rng(0)
    draws = np.array([truncated_normal(0.3, 0.05, u) for u in rng.random(4000)])
    assert draws.min() >= 0.0 and draws.max() <= 1.0
    assert draws.mean() == pytest.approx(0.3, abs=0.005)
    assert draws.std() == pytest.approx(0.05, rel=0.1)
    wide = np.array([truncated_normal(0.95, 5.0, u) for u in rng.random(4000)])
    assert wide.min() >= 0.0 and wide.max() <= 1.0 and abs(wide.mean() - 0.5) < 0.05  # ~uniform
    assert 0.0 <= truncated_normal(1e-9, 1e-6, 0.0) <= 1.0


# ---- options --------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "match"), [
    ({"hidden1": 0}, r"hidden1: expected an integer >= 1, got 0"),
    ({"lr_actor": -1.0}, r"lr_actor: expected a number in \(0.0, 1.0\], got -1.0"),
    ({"tau": 0.0}, "tau: expected"),
    ({"discount": 1.5}, "discount: expected"),
    ({"batch_size": 2.5}, "batch_size: expected an integer"),
    ({"warmup": -1}, r"warmup: expected an integer >= 0, got -1"),
    ({"noise_decay": 2.0}, "noise_decay: expected"),
    ({"updates_per_episode": True}, "updates_per_episode: expected"),
    ({"store_actions": "projected"}, "store_actions: expected one of drawn, evaluated, got 'projected'"),
    ({"hiden1": 3}, "haq: unknown option 'hiden1': choose between"),
])
def test_options_are_validated(options, match):
    with pytest.raises(ValueError, match=match):
        haq(**options)


def test_defaults_are_haqs():
    s = haq()
    c = s.config
    assert (c.hidden1, c.hidden2, c.lr_actor, c.lr_critic, c.tau, c.discount, c.batch_size) == (
        300, 300, 1e-4, 1e-3, 0.01, 1.0, 64)
    assert (c.init_noise, c.noise_decay, c.replay_per_layer) == (0.5, 0.99, 128)
    assert c.store_actions == "drawn"  # HAQ's replay: the actions as drawn, before the projection
    assert s.replay.capacity == 128 * L
    # HAQ's 20 warm-up episodes whatever the number of trials; 8 DDPG updates per episode
    # (the measured deviation), HAQ's one per stored transition (2L) with None.
    assert s.warmup == 20
    assert s.updates_per_episode == 8
    problem = SearchProblem(layers=LAYERS)
    assert HAQSearcher(problem).warmup == 20
    assert HAQSearcher(problem, updates_per_episode=None).updates_per_episode == 2 * L  # HAQ's rate
    assert HAQSearcher(problem, updates_per_episode=2).updates_per_episode == 2  # the fast setting


def test_warns_when_num_trials_leaves_few_learned_episodes():
    import warnings

    from orchestrator.searchers.haq import TooFewLearningEpisodesWarning

    with pytest.warns(TooFewLearningEpisodesWarning, match=r"num_trials=30 leaves 10 learned episodes "
                      r"after 20 random warm-up episodes.*expected num_trials >= 40"):
        HAQSearcher(SearchProblem(layers=LAYERS, num_trials=30))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HAQSearcher(SearchProblem(layers=LAYERS, num_trials=40))
        HAQSearcher(SearchProblem(layers=LAYERS, num_trials=30), warmup=10)
        HAQSearcher(SearchProblem(layers=LAYERS))  # unknown number of trials: nothing to say


# ---- behaviour ------------------------------------------------------------------------------


def test_same_seed_same_suggestions_without_touching_global_rng():
    # The legacy global numpy state is exactly what must stay untouched.
    torch_state, np_state = torch.random.get_rng_state(), np.random.get_state()  # noqa: NPY002
    runs = [drive(haq(seed=7, warmup=2, **SMALL), [f"t{i}" for i in range(6)]) for _ in range(2)]
    assert runs[0] == runs[1]
    assert drive(haq(seed=8, warmup=2, **SMALL), [f"t{i}" for i in range(6)]) != runs[0]
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.random.get_state()[1].tolist() == np_state[1].tolist()  # noqa: NPY002


def test_restore_continues_exactly(tmp_path):
    s = haq(seed=1, warmup=2, **SMALL)
    drive(s, [f"t{i}" for i in range(4)])
    pending = s.suggest("pending")
    path = str(tmp_path / "haq.ckpt")
    s.save(path)

    fresh = HAQSearcher(make_problem(seed=99))  # other seed and default options: all restored
    fresh.restore(path)
    assert fresh.config == s.config and fresh.episodes_suggested == s.episodes_suggested
    for agent in (s, fresh):
        agent.on_trial_complete("pending", fake_result(agent.problem, pending))
    ids = [f"n{i}" for i in range(4)]
    assert drive(fresh, ids) == drive(s, ids)
    for a, b in zip(s.actor.parameters(), fresh.actor.parameters(), strict=True):
        assert torch.equal(a, b)
    assert fresh.baseline == s.baseline and fresh.num_updates == s.num_updates


def test_restore_rejects_another_network(tmp_path):
    s = haq(**SMALL)
    path = str(tmp_path / "haq.ckpt")
    s.save(path)
    other = SearchProblem(layers=LAYERS[:4])
    with pytest.raises(ValueError, match="expected a search over 4 layers"):
        HAQSearcher(other).restore(path)


@pytest.mark.parametrize("bit_sets", [False, True])
def test_fast_rollout_follows_the_actor(bit_sets):
    """With (almost) no noise the rollout's actions are the actor's outputs on its own states
    (whose previous action is the allowed width the rollout mapped the last action to)."""
    problem = bit_set_problem("w2,5,7-a3,6") if bit_sets else make_problem()
    s = make_searcher("haq", problem, warmup=0, init_noise=1e-9, **SMALL)
    drive(s, ["t0", "t1"])  # trained a little: not the initial weights
    actions = s._rollout(5)
    bits = action_to_bits(actions, step_mask(problem.allowed))
    states = episode_states(s.features, bits, problem.max_bits)
    with torch.no_grad():
        expected = s.actor(torch.from_numpy(states)).squeeze(1).numpy()
    np.testing.assert_allclose(actions, expected, atol=1e-5)


def test_suggestions_are_projected_to_the_budget():
    problem = SearchProblem(layers=LAYERS, table=make_problem().table,
                            budget=Budget("latency_ms", 0.3, relative=True),
                            min_bits=MIN_BITS, max_bits=MAX_BITS)
    s = HAQSearcher(problem, warmup=1, **SMALL)
    limit = problem.budget.limit_for(problem.table)
    for config in drive(s, [f"t{i}" for i in range(4)]):
        policy = policy_from_config(config, L)
        assert policy_cost(problem.table, policy, "latency_ms") <= limit
        np.testing.assert_array_equal(problem.project(policy), policy)


def test_stores_the_drawn_actions_with_the_evaluated_policys_reward():
    """HAQ's replay (the default): actions as drawn, states as the actor saw them while
    drawing, the reward of the policy the trial evaluated (here far below the drawn bits)."""
    s = haq(warmup=10, **SMALL)  # warm-up: no updates, the replay is easy to read
    assert s.config.store_actions == "drawn"
    config = s.suggest("t0")
    drawn = s._pending["t0"].actions.copy()
    drawn_bits = action_to_bits(drawn, range_mask(MIN_BITS, MAX_BITS))
    evaluated = np.full((L, 2), MIN_BITS)
    assert not np.array_equal(drawn_bits, evaluated.reshape(-1))
    result = fake_result(s.problem, config) | {M.POLICY: format_policy(evaluated),
                                               M.VAL_ACC: 0.5, M.REF_ACC: 0.9}
    s.on_trial_complete("t0", result)
    n = 2 * L
    np.testing.assert_allclose(s.replay.actions[:n, 0], drawn, rtol=1e-6)
    np.testing.assert_allclose(s.replay.states[:n], episode_states(s.features, drawn_bits, MAX_BITS))
    np.testing.assert_allclose(s.replay.next_states[: n - 1], s.replay.states[1:n])
    np.testing.assert_allclose(s.replay.rewards[:n, 0], 0.1 * 100.0 * (0.5 - 0.9), rtol=1e-6)
    assert s.replay.not_done[:n, 0].tolist() == [1.0] * (n - 1) + [0.0]


def test_checkpoints_from_before_store_actions_restore_as_evaluated(tmp_path):
    s = haq(store_actions="evaluated", **SMALL)
    path = str(tmp_path / "haq.ckpt")
    s.save(path)
    state = torch.load(path, weights_only=True)
    del state["config"]["store_actions"]  # as written before the option existed
    torch.save(state, path)
    fresh = HAQSearcher(make_problem())
    fresh.restore(path)
    assert fresh.config.store_actions == "evaluated"


def test_learns_from_the_evaluated_policy():
    s = haq(warmup=10, store_actions="evaluated", **SMALL)  # warm-up: no updates, the replay is easy to read
    config = s.suggest("t0")
    evaluated = np.full((L, 2), MIN_BITS)
    evaluated[0] = (MAX_BITS, MIN_BITS + 1)
    result = fake_result(s.problem, config) | {M.POLICY: format_policy(evaluated)}
    drawn = s._pending["t0"].actions.copy()
    s.on_trial_complete("t0", result)
    n = 2 * L
    stored_bits = action_to_bits(s.replay.actions[:n, 0], range_mask(MIN_BITS, MAX_BITS))
    np.testing.assert_array_equal(stored_bits, evaluated.reshape(-1))
    # Where the drawn bits survived, the drawn action is kept as drawn.
    kept = action_to_bits(drawn, range_mask(MIN_BITS, MAX_BITS)) == evaluated.reshape(-1)
    np.testing.assert_allclose(s.replay.actions[:n, 0][kept], drawn[kept], rtol=1e-6)
    np.testing.assert_allclose(s.replay.states[1:n, 9], evaluated.reshape(-1)[:-1] / MAX_BITS)
    assert s.replay.not_done[:n, 0].tolist() == [1.0] * (n - 1) + [0.0]

    # Without a policy in the result, the searcher's own projected suggestion is used.
    config = s.suggest("t1")
    result = fake_result(s.problem, config)
    del result[M.POLICY]
    s.on_trial_complete("t1", result)
    stored_bits = action_to_bits(s.replay.actions[n:2 * n, 0], range_mask(MIN_BITS, MAX_BITS))
    np.testing.assert_array_equal(stored_bits, policy_from_config(config, L).reshape(-1))


def test_reward_and_moving_average_baseline():
    s = haq(warmup=0, updates_per_episode=3, **SMALL)
    config = s.suggest("t0")
    result = fake_result(s.problem, config) | {M.VAL_ACC: 0.85, M.REF_ACC: 0.9}
    s.on_trial_complete("t0", result)
    reward = 0.1 * 100.0 * (0.85 - 0.9)  # HAQ's 0.1 * (acc% - ref%)
    np.testing.assert_allclose(s.replay.rewards[: 2 * L, 0], reward, rtol=1e-6)
    # Every batch holds the same reward: the first sets the baseline, later ones keep it.
    assert s.baseline == pytest.approx(reward, rel=1e-6) and s.num_updates == 3
    s.suggest("t1")
    s.on_trial_complete("t1", result | {M.VAL_ACC: 0.9})  # reward 0
    # Batches now mix both episodes: alpha = 0.5 moves the baseline half-way per batch
    # towards the batch mean, which lies between the two rewards.
    assert reward < s.baseline < 0


def test_failed_trials_are_dropped_and_unknown_ids_ignored():
    s = haq(warmup=0, **SMALL)
    cases = [
        {"error": True, "result": {M.VAL_ACC: 0.5}},
        {"result": None},
        {"result": {M.EPOCH: 3}},
        {"result": {M.VAL_ACC: float("nan")}},
        {"result": {M.VAL_ACC: "0.5"}},
    ]
    for i, kwargs in enumerate(cases):
        s.suggest(f"t{i}")
        s.on_trial_complete(f"t{i}", **kwargs)
    assert len(s.replay) == 0 and s.episodes_completed == 0 and not s._pending
    s.on_trial_complete("never", {M.VAL_ACC: 0.5})
    s.on_trial_result("never", {M.VAL_ACC: 0.5})
    assert len(s.replay) == 0


def test_trials_in_flight_complete_in_any_order():
    s = haq(warmup=1, **SMALL)
    configs = {f"t{i}": s.suggest(f"t{i}") for i in range(4)}
    assert s.suggest("t2") == configs["t2"]  # asked twice: same answer
    for trial_id in ["t2", "t0", "t3", "t1"]:
        s.on_trial_complete(trial_id, fake_result(s.problem, configs[trial_id]))
    assert len(s.replay) == 4 * 2 * L and s.episodes_completed == 4 and not s._pending


def test_set_search_properties_and_metric_mode_survive_restore(tmp_path):
    s = haq(**SMALL)
    assert s.set_search_properties("score", "min", {}) is True
    path = str(tmp_path / "haq.ckpt")
    s.save(path)
    fresh = HAQSearcher(make_problem())
    fresh.restore(path)
    assert (fresh.metric, fresh.mode) == ("score", "min")
    config = fresh.suggest("t0")
    fresh.on_trial_complete("t0", {"score": 2.0, M.POLICY: format_policy(policy_from_config(config, L))})
    assert fresh.episodes_completed == 1
    assert fresh.replay.rewards[0, 0] == pytest.approx(-0.1 * 100.0 * 2.0)  # min: negated
    with pytest.raises(ValueError, match="mode: choose between"):
        s.set_search_properties(None, "up", {})


def test_agent_learns_a_simple_preference():
    """Reward grows with the mean bits: after training the actor proposes more bits."""
    problem = SearchProblem(layers=LAYERS[:3], seed=0)
    s = HAQSearcher(problem, warmup=5, updates_per_episode=8, init_noise=0.3, **SMALL)
    for i in range(50):
        config = s.suggest(f"t{i}")
        policy = policy_from_config(config, 3)
        s.on_trial_complete(f"t{i}", {M.VAL_ACC: float(policy.mean()) / 8, M.REF_ACC: 1.0})
    with torch.no_grad():
        greedy = s.actor(torch.from_numpy(s._step_states)).squeeze(1).numpy()
    assert greedy.mean() > 0.75  # random init: ~0.5


def test_pickled_searcher_continues_identically():
    """``Tuner.restore`` unpickles the search algorithm from the experiment directory."""
    s = haq(warmup=1, **SMALL)
    drive(s, ["t0", "t1", "t2"])
    s.suggest("pending")
    copy = pickle.loads(pickle.dumps(s))
    assert drive(copy, ["pending", "n0", "n1"]) == drive(s, ["pending", "n0", "n1"])
