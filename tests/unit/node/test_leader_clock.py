"""LeaderClock: the applied clock plus the leader's monotonic time, never behind the applied clock."""

from raftq.cluster.leader_clock import LeaderClock


class Monotonic:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def test_first_reading_of_a_term_is_the_applied_clock_then_advances_by_monotonic_time():
    mono = Monotonic()
    clock = LeaderClock(mono)
    assert clock.read(50_000) == 50_000
    mono.now_s += 2.5
    assert clock.read(50_000) == 52_500
    mono.now_s += 0.001
    assert clock.read(52_500) == 52_501


def test_reading_moves_up_to_an_applied_clock_ahead_of_it_and_continues_from_there():
    mono = Monotonic()
    clock = LeaderClock(mono)
    assert clock.read(10_000) == 10_000
    mono.now_s += 1.0
    # The predecessor's last entries applied after we took office carried a later time.
    assert clock.read(90_000) == 90_000
    mono.now_s += 1.0
    assert clock.read(90_000) == 91_000


def test_new_term_starts_from_the_applied_clock_so_time_stands_still_between_terms():
    mono = Monotonic()
    clock = LeaderClock(mono)
    clock.read(10_000)
    mono.now_s += 5.0
    assert clock.read(10_000) == 15_000
    clock.take_office()
    mono.now_s += 60.0  # a long election, or another node led and we only applied up to 12_000
    assert clock.read(12_000) == 12_000


def test_readings_never_go_backwards_within_a_term():
    mono = Monotonic()
    clock = LeaderClock(mono)
    readings = []
    applied = 0
    for step in range(200):
        mono.now_s += (step % 7) * 0.013
        if step % 11 == 0:
            applied = readings[-1] - 500 if readings else 0  # an older entry applied late: no jump back
        readings.append(clock.read(applied))
    assert readings == sorted(readings)

