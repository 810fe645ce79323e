"""Verse form and degeneration metrics on handwritten strings: a correct 五言绝句 scores 1, the
degenerate string 0; the summary scores model answers and the reference answers alike."""

from __future__ import annotations

import pytest

from evaluation.verse import (
    degeneration,
    form_check,
    given_line,
    requested_form,
    verse_record,
    verse_summary,
)

JINGYESI = "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"
DEGENERATE = "这，这，这，一。"
LUSHI = "国破山河在，城春草木深。\n感时花溅泪，恨别鸟惊心。\n烽火连三月，家书抵万金。\n白头搔更短，浑欲不胜簪。"


def test_correct_wuyan_jueju_scores_one_and_the_degenerate_string_zero():
    ok = form_check(JINGYESI, 5, "绝句")
    assert ok == {"half_lines_ok": True, "punctuation_ok": True, "line_count_ok": True, "form_ok": True,
                  "n_half_lines": 4}
    bad = form_check(DEGENERATE, 5, "绝句")
    assert not bad["form_ok"] and not bad["half_lines_ok"] and not bad["punctuation_ok"]
    assert form_check(LUSHI, 5, "律诗")["form_ok"] and not form_check(LUSHI, 5, "绝句")["form_ok"]
    assert not form_check(JINGYESI, 7, "绝句")["half_lines_ok"]  # 五言 is not 七言
    # one couplet per line or two: the same form; wrong marks or a missing half-line are not
    assert form_check(JINGYESI.replace("\n", ""), 5, "绝句")["form_ok"]
    assert not form_check("床前明月光。疑是地上霜，举头望明月，低头思故乡。", 5, "绝句")["punctuation_ok"]
    assert not form_check("床前明月光，疑是地上霜。\n举头望明月。", 5, "绝句")["line_count_ok"]
    assert not form_check("床前明月光，疑是地上ab。\n举头望明月，低头思故乡。", 5, "绝句")["half_lines_ok"]


def test_degeneration_flags_repetition_and_not_a_real_poem():
    d = degeneration("这，这，这，")
    assert d["degenerate"] and d["repetition_rate"] == pytest.approx(3 / 5) and d["distinct_1"] == pytest.approx(2 / 6)
    commas = degeneration("，，，，，，，，")  # an answer of punctuation only repeats too
    assert commas["degenerate"] and commas["repetition_rate"] == pytest.approx(6 / 7)
    assert degeneration(DEGENERATE)["degenerate"]
    assert degeneration("这首诗的作者是唐代的代的代的《《《")["degenerate"]
    good = degeneration(JINGYESI)
    assert not good["degenerate"] and good["repetition_rate"] == pytest.approx(1 / 23)  # 明月 twice
    assert good["distinct_2"] == pytest.approx(22 / 23) and good["distinct_1"] == pytest.approx(19 / 24)
    assert degeneration("")["degenerate"]


def test_requests_are_read_from_the_prompt():
    assert requested_form("<s>user\n请以《静夜思》为题，写一首五言绝句。</s>\n") == \
        {"chars": 5, "form": "五言绝句", "kind": "绝句"}
    assert requested_form("用词牌《浣溪沙》写一首词。") is None
    assert given_line("《喜雪》中，“傥咏幽兰曲”后面一句是什么？") == "傥咏幽兰曲"
    assert given_line("请接出下一句：树影蒙茏鄣叠岫") == "树影蒙茏鄣叠岫"
    rec = verse_record("continue_line", "“床前明月光”的下一句是什么？", "疑是地上霜。")
    assert rec["form_ok"] and rec["requested_form"] == "5字句"
    assert not verse_record("continue_line", "“床前明月光”的下一句是什么？", "这，这，这，")["form_ok"]
    assert verse_record("author", "x", "y") is None


def test_summary_scores_model_and_reference_answers():
    recs = [{"id": "a", "task": "write_poem", "prompt": "写一首五言绝句，题目是《静夜思》。",
             "prediction": JINGYESI, "reference": JINGYESI},
            {"id": "b", "task": "write_poem", "prompt": "请以《春望》为题，写一首五言律诗。",
             "prediction": DEGENERATE, "reference": LUSHI},
            {"id": "c", "task": "continue_line", "prompt": "对出下句：国破山河在", "prediction": "城春草木深。",
             "reference": "城春草木深。"},
            {"id": "d", "task": "author", "prompt": "?", "prediction": "李白", "reference": "杜甫"}]
    s = verse_summary(recs, n_resamples=200)
    wp = s["tasks"]["write_poem"]
    assert wp["model"]["form_ok"]["mean"] == 0.5 and wp["reference"]["form_ok"]["mean"] == 1.0
    assert wp["model"]["degenerate"]["mean"] == 0.5 and wp["reference"]["degenerate"]["mean"] == 0.0
    assert s["tasks"]["all"]["model"]["n"] == 3 and s["tasks"]["continue_line"]["model"]["form_ok"]["mean"] == 1.0
    assert [p["id"] for p in s["per_example"]] == ["a", "b", "c"]
