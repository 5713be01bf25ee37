"""Sparsity and learning-rate schedules against their formulas, computed here independently."""
import math

import pytest

from prunekit.errors import ConfigError
from prunekit.decisions.schedules import LearningRateSchedule, SparsitySchedule


def zhu_gupta(t, s_i, s_f, t0, n, dt):
    """Zhu & Gupta (2017), eq. 1: s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3 on [t0, t0 + n dt]."""
    if t < t0:
        return s_i
    if t >= t0 + n * dt:
        return s_f
    return s_f + (s_i - s_f) * (1.0 - (t - t0) / (n * dt)) ** 3


@pytest.mark.parametrize("s_i, s_f, t0, n, dt", [(0.0, 0.9, 0, 10, 100), (0.0, 0.5, 37, 4, 25), (0.2, 0.98, 100, 7, 13),
                                                 (0.0, 0.0, 0, 3, 1)])
def test_cubic_matches_zhu_gupta(s_i, s_f, t0, n, dt):
    end = t0 + n * dt
    sched = SparsitySchedule(s_f, begin_step=t0, end_step=end, frequency=dt, kind="cubic", initial_sparsity=s_i)
    updates = [t for t in range(0, end + 3 * dt) if sched.is_update_step(t)]
    assert updates == [t0 + j * dt for j in range(n + 1)]          # every dt steps, from t0 to the end
    for t in range(0, end + 2 * dt):
        assert sched.sparsity_at(t) == pytest.approx(zhu_gupta(t, s_i, s_f, t0, n, dt), abs=1e-12), t
    values = [sched.sparsity_at(t) for t in range(0, end + 2 * dt)]
    assert all(b >= a - 1e-15 for a, b in zip(values, values[1:]))  # monotone non-decreasing
    assert sched.sparsity_at(t0) == pytest.approx(s_i)
    assert sched.sparsity_at(end) == s_f                              # reaches the final sparsity
    assert sched.sparsity_at(end + 10 ** 6) == s_f
    if n > 1 and s_f > s_i:  # the cubic prunes fast first: more than a linear ramp at the first update
        assert sched.sparsity_at(t0 + dt) - s_i > (s_f - s_i) / n


def test_cubic_end_not_on_update_grid():
    sched = SparsitySchedule(0.8, begin_step=0, end_step=250, frequency=100, kind="cubic")
    assert [t for t in range(400) if sched.is_update_step(t)] == [0, 100, 200, 250]
    assert sched.sparsity_at(250) == 0.8
    assert sched.sparsity_at(100) == pytest.approx(0.8 * (1 - (1 - 100 / 250) ** 3))


@pytest.mark.parametrize("s_f, t0, U, dt", [(0.9, 0, 10, 100), (0.99, 50, 8, 7), (0.5, 0, 1, 20)])
def test_exponential_density(s_f, t0, U, dt):
    D = 1.0 - s_f
    end = t0 + U * dt
    sched = SparsitySchedule(s_f, begin_step=t0, end_step=end, frequency=dt, kind="exponential")
    assert [t for t in range(end + 2 * dt) if sched.is_update_step(t)] == [t0 + u * dt for u in range(U + 1)]
    for u in range(U + 1):
        density = 1.0 - sched.sparsity_at(t0 + u * dt)
        assert density == pytest.approx(D ** (u / U), rel=1e-12), u
    assert 1.0 - sched.sparsity_at(t0) == pytest.approx(1.0)   # starts dense
    assert sched.sparsity_at(end) == s_f
    if t0 > 0:
        assert sched.sparsity_at(t0 - 1) == 0.0
    # densities form a geometric sequence: constant ratio between consecutive updates
    ratios = [(1 - sched.sparsity_at(t0 + (u + 1) * dt)) / (1 - sched.sparsity_at(t0 + u * dt)) for u in range(U)]
    assert all(r == pytest.approx(D ** (1 / U)) for r in ratios)
    values = [sched.sparsity_at(t) for t in range(end + dt)]
    assert all(b >= a for a, b in zip(values, values[1:]))


def test_oneshot():
    sched = SparsitySchedule(0.7, begin_step=5, end_step=100, frequency=10, kind="oneshot")
    assert [t for t in range(300) if sched.is_update_step(t)] == [5]
    assert sched.sparsity_at(4) == 0.0
    assert all(sched.sparsity_at(t) == 0.7 for t in (5, 6, 99, 100, 1000))


@pytest.mark.parametrize("kwargs, needle", [
    (dict(final_sparsity=0.9, kind="linear"), "linear"),
    (dict(final_sparsity=1.0), "1.0"),
    (dict(final_sparsity=-0.2), "-0.2"),
    (dict(final_sparsity="x"), "x"),
    (dict(final_sparsity=0.5, initial_sparsity=1.5), "1.5"),
    (dict(final_sparsity=0.5, frequency=0), "0"),
    (dict(final_sparsity=0.5, begin_step=10, end_step=5), "10"),
    (dict(final_sparsity=0.5, begin_step=-1), "-1"),
])
def test_sparsity_schedule_rejects(kwargs, needle):
    with pytest.raises(ConfigError) as info:
        SparsitySchedule(**kwargs)
    assert needle in str(info.value)


def test_lr_constant_and_warmup():
    lr = LearningRateSchedule(0.3, 100, "constant")
    assert all(lr.lr_at(t) == 0.3 for t in (0, 50, 99, 100, 500))
    warm = LearningRateSchedule(0.4, 100, "constant", warmup_steps=4)
    assert [warm.lr_at(t) for t in range(6)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])


def test_lr_cosine():
    base, total = 0.1, 200
    lr = LearningRateSchedule(base, total, "cosine")
    for t in range(0, total + 1, 7):
        assert lr.lr_at(t) == pytest.approx(base * (1 + math.cos(math.pi * t / total)) / 2)
    assert lr.lr_at(0) == pytest.approx(base)
    assert lr.lr_at(total // 2) == pytest.approx(base / 2)
    assert lr.lr_at(total) == pytest.approx(0.0, abs=1e-15)
    assert lr.lr_at(total + 50) == pytest.approx(0.0, abs=1e-15)   # stays at zero after the end
    values = [lr.lr_at(t) for t in range(total + 1)]
    assert all(b <= a for a, b in zip(values, values[1:]))


def test_lr_step():
    lr = LearningRateSchedule(0.1, 164, "step", milestones=(81, 122), gamma=0.1)
    assert lr.lr_at(0) == pytest.approx(0.1)
    assert lr.lr_at(80) == pytest.approx(0.1)
    assert lr.lr_at(81) == pytest.approx(0.01)
    assert lr.lr_at(121) == pytest.approx(0.01)
    assert lr.lr_at(122) == pytest.approx(0.001)
    assert lr.lr_at(1000) == pytest.approx(0.001)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(base_lr=0.1, total_steps=10, kind="poly"), "poly"),
    (dict(base_lr=0.0, total_steps=10), "0.0"),
    (dict(base_lr=-1.0, total_steps=10), "-1.0"),
    (dict(base_lr=float("nan"), total_steps=10), "nan"),
    (dict(base_lr=float("inf"), total_steps=10), "inf"),
])
def test_lr_schedule_rejects(kwargs, needle):
    with pytest.raises(ConfigError) as info:
        LearningRateSchedule(**kwargs)
    assert needle in str(info.value)
