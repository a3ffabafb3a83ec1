"""The loop-lag metric's window maximum (`metrics.WindowMax`)."""

from raftq.cluster.metrics import WindowMax


def test_the_largest_value_of_the_window_and_only_of_the_window():
    window = WindowMax(10.0)
    assert window.add(0.0, 0.001) == 0.001
    assert window.add(1.0, 0.8) == 0.8  # a pause
    assert window.add(2.0, 0.002) == 0.8  # later small samples do not hide it
    assert window.add(10.5, 0.003) == 0.8  # still inside the window
    assert window.add(11.5, 0.002) == 0.003  # the pause left the window; the next largest remains
    assert window.add(21.0, 0.0) == 0.002
    assert window.add(40.0, 0.0) == 0.0


def test_equal_values_and_a_long_run_keep_memory_bounded():
    window = WindowMax(1.0)
    for step in range(10_000):
        window.add(step * 0.02, (step % 7) * 0.001)
    assert window.add(200.0, 0.0) == 0.006
    assert len(window._candidates) <= 60  # at most one window of samples (50 at 20 ms)
