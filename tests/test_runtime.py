"""nanomodels/runtime.py: the quick-mode switch and the median timer the chapters' benchmarks use."""

import pytest

from nanomodels import runtime
from nanomodels.runtime import median_seconds, quick_mode


def test_median_seconds_times_each_call_after_one_untimed_warm_up(monkeypatch):
    clock = iter([0.0, 5.0, 10.0, 11.0, 20.0, 23.0])  # three timed calls of 5, 1 and 3 seconds
    monkeypatch.setattr(runtime.time, "perf_counter", lambda: next(clock))
    calls = []
    assert median_seconds(lambda: calls.append(1), 3) == 3.0
    assert len(calls) == 4  # the warm-up and three timed calls; the warm-up read no clock


@pytest.mark.parametrize("repeats", [0, -1, 1.5, True])
def test_median_seconds_rejects_a_repeat_count_that_is_not_a_positive_integer(repeats):
    with pytest.raises(ValueError, match="repeats: must be a positive integer"):
        median_seconds(lambda: None, repeats)


@pytest.mark.parametrize("value,quick", [("1", True), ("true", True), ("YES", True), ("", False), ("0", False)])
def test_quick_mode_reads_nanomodels_quick(monkeypatch, value, quick):
    monkeypatch.setenv("NANOMODELS_QUICK", value)
    assert quick_mode() is quick
