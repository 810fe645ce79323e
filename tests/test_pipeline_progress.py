"""The main job's ETA: planned seconds of the stages left, per lane, scaled by the pace of the finished ones
once those are a tenth of the plan."""

from __future__ import annotations

import re

from pipeline import Progress


def _eta_seconds(line: str) -> float:
    m = re.search(r"ETA (\d+)m(\d+)s", line)
    assert m, line
    return int(m.group(1)) * 60 + int(m.group(2))


def test_short_first_stage_does_not_scale_the_eta():
    planned = {"data": 10.0, "a_pretrain": 2000.0, "b_pretrain": 2000.0, "a_sft": 700.0, "b_sft": 700.0}
    progress = Progress(planned, lanes=2)
    # the data stage took twice its plan: too small a part of the job to say anything about the rest
    assert abs(_eta_seconds(progress.finish("data", 20.0)) - 2700) <= 1
    # the two pretraining stages (most of the plan) ran 10% over: the rest is scaled by that pace
    progress.finish("a_pretrain", 2200.0)
    eta = _eta_seconds(progress.finish("b_pretrain", 2200.0))
    pace = (20.0 + 4400.0) / 4010.0
    assert abs(eta - pace * 1400 / 2) <= 1
