"""Per-step target sparsities."""

import pytest

from comparison.schedule import sparsity_schedule


@pytest.mark.parametrize("kind", ["cubic", "linear"])
@pytest.mark.parametrize("target", [0.0, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("steps", [1, 2, 3, 10])
def test_schedule_rises_monotonically_to_exactly_the_target(kind, target, steps):
    schedule = sparsity_schedule(target, steps, kind)
    assert len(schedule) == steps
    assert schedule[-1] == target
    assert all(a <= b for a, b in zip(schedule, schedule[1:]))
    assert all(0.0 <= s <= target for s in schedule)


def test_cubic_follows_zhu_and_gupta():
    target, steps = 0.9, 4
    expected = [target * (1 - (1 - t / steps) ** 3) for t in range(1, steps + 1)]
    assert sparsity_schedule(target, steps, "cubic") == pytest.approx(expected)
    # Front-loaded: the first step removes more than a linear schedule would.
    assert sparsity_schedule(target, steps, "cubic")[0] > sparsity_schedule(target, steps, "linear")[0]


def test_linear_is_evenly_spaced_from_initial():
    assert sparsity_schedule(0.99, 3, "linear", initial=0.9) == pytest.approx([0.93, 0.96, 0.99])


@pytest.mark.parametrize(
    "args, message",
    [((0.9, 0), "steps"), ((1.0, 3), "target"), ((0.5, 3, "cubic", 0.6), "initial"), ((0.5, 3, "exp"), "cubic, linear")],
)
def test_invalid_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        sparsity_schedule(*args)
