"""Progress and ETA: the training ETA follows a change of speed from a smoothed step time (fake
clock), and progress written to a file is plain lines without carriage returns."""
import io
import re

import torch

from albef.engine.logging import ETA_HORIZON_STEPS, LineProgress, MetricLogger, StepTimeAverage, progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _eta_seconds(line: str) -> int:
    h, m, s = re.search(r"eta (\d+):(\d\d):(\d\d)", line).groups()
    return int(h) * 3600 + int(m) * 60 + int(s)


def test_eta_of_a_run_whose_step_time_doubles_halfway(tmp_path, capsys):
    """1,000 steps, 1 s each, then 2 s each from step 500, logged every 10 steps. Stated bound:
    the ETA is never above the true remaining time nor below half of it (before the change no
    estimate can know the future: at the change it is exactly half), and from 3 horizons
    (150 steps) after the change on it is within 5% of the truth."""
    clock = FakeClock()
    total, log_every, switch = 1000, 10, 500
    logger = MetricLogger(tmp_path, enabled=True, log_every=log_every, clock=clock)
    logger.total_steps = total
    ratios = {}
    for step in range(1, total + 1):
        clock.now += 1.0 if step <= switch else 2.0
        logger.update({"loss": torch.tensor(1.0)}, images=4, data_wait=0.0)
        if logger.should_log(step):
            logger.log(step, 0, {"lr": 1e-4})
            true_remaining = sum(1.0 if s <= switch else 2.0 for s in range(step + 1, total + 1))
            if true_remaining:
                ratios[step] = logger.eta_s / true_remaining
                printed = _eta_seconds(capsys.readouterr().out.strip().splitlines()[-1])
                assert abs(printed - logger.eta_s) <= 1  # the line shows the same ETA
    logger.close()
    assert all(0.5 - 1e-9 <= r <= 1.0 + 1e-9 for r in ratios.values()), ratios
    settled = {s: r for s, r in ratios.items() if s >= switch + 3 * ETA_HORIZON_STEPS}
    assert settled and all(abs(r - 1.0) <= 0.05 for r in settled.values()), settled
    # before the change the ETA is exact for the speed it has seen
    assert abs(ratios[100] - 900 / 1400) < 1e-9


def test_the_step_time_average_ignores_a_single_slow_window_more_than_the_last_window_would():
    average = StepTimeAverage(horizon=50)
    for _ in range(20):
        average.update(10, 10.0)  # 1 s per step
    average.update(10, 30.0)  # one window 3x slower (another job on the machine)
    assert average.seconds_per_step < 1.5  # the last-window estimate would say 3.0


def test_progress_into_a_file_is_plain_lines_without_carriage_returns():
    clock, stream = FakeClock(), io.StringIO()  # StringIO is not a terminal
    with progress(100, "test: ITM re-rank", "pair", stream=stream, interval=5.0, clock=clock) as bar:
        assert isinstance(bar, LineProgress)
        for _ in range(100):
            clock.now += 0.5
            bar.update(1)
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 10  # every 5 s over 50 s (9 while running) and the closing line
    assert lines[0] == "test: ITM re-rank: 10/100 pair (10%), 2.0 pair/s, eta 0:00:45"
    assert lines[-1] == "test: ITM re-rank: 100/100 pair (100%), 2.0 pair/s, 0:00:50"


def test_progress_is_silent_when_disabled_or_empty():
    stream = io.StringIO()
    for bar in (progress(10, "x", "it", enabled=False, stream=stream), progress(0, "x", "it", stream=stream)):
        with bar:
            bar.update(5)
    assert stream.getvalue() == ""
