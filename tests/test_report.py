"""The run report: built from a real (micro) run — two arms x two seeds trained for a few real steps on
real data with the real tokenizer, evaluated with ``evaluation.evaluate`` — then cross-checked: every
number in report.md equals report.json, and report.json's numbers equal what the metrics files say."""

from __future__ import annotations

import copy
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation import report as report_mod
from evaluation.bpc import HeldoutBPC
from evaluation.evaluate import evaluate_checkpoint
from evaluation.heldout import items_loss, pretrain_items
from evaluation.metrics import paired_bootstrap, paired_ratio_bootstrap, seed_summary
from evaluation.report import fmt
from tokenizer import ORIGINAL_TOKENIZER_FIXTURE

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_TOK = ORIGINAL_TOKENIZER_FIXTURE

POEMS = [
    ("静夜思", "李白", "床前明月光，疑是地上霜。举头望明月，低头思故乡。"),
    ("春晓", "孟浩然", "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。"),
    ("登鹳雀楼", "王之涣", "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"),
    ("相思", "王维", "红豆生南国，春来发几枝。愿君多采撷，此物最相思。"),
    ("江雪", "柳宗元", "千山鸟飞绝，万径人踪灭。孤舟蓑笠翁，独钓寒江雪。"),
    ("悯农", "李绅", "锄禾日当午，汗滴禾下土。谁知盘中餐，粒粒皆辛苦。"),
    ("咏鹅", "骆宾王", "鹅鹅鹅，曲项向天歌。白毛浮绿水，红掌拨清波。"),
    ("登高", "杜甫", "风急天高猿啸哀，渚清沙白鸟飞回。无边落木萧萧下，不尽长江滚滚来。"),
    ("鹿柴", "王维", "空山不见人，但闻人语响。返景入深林，复照青苔上。"),
    ("寻隐者不遇", "贾岛", "松下问童子，言师采药去。只在此山中，云深不知处。"),
    ("画", "王维", "远看山有色，近听水无声。春去花还在，人来鸟不惊。"),
    ("池上", "白居易", "小娃撑小艇，偷采白莲回。不解藏踪迹，浮萍一道开。"),
]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def make_data(d: Path) -> dict[str, Path]:
    """Split by poem: 6 train, 3 validation, 3 test. SFT tasks: author (exact) and the full text."""
    d.mkdir(parents=True, exist_ok=True)
    splits = {"train": POEMS[:6], "validation": POEMS[6:9], "test": POEMS[9:]}
    out = {}
    for split, poems in splits.items():
        out[f"pretrain_{split}"] = _write(d / f"pretrain_{split}.jsonl", [{"text": f"《{t}》{a}：{b}"} for t, a, b in poems])
        sft = []
        for t, a, b in poems:
            sft.append({"id": f"{t}-author", "task": "author", "answer": a, "conversations": [
                {"role": "user", "content": f"《{t}》的作者是谁？"}, {"role": "assistant", "content": a}]})
            sft.append({"id": f"{t}-text", "task": "recite", "conversations": [
                {"role": "user", "content": f"请背诵《{t}》。"}, {"role": "assistant", "content": b}]})
            first, second = b.split("，")[0], b.split("，")[1].split("。")[0]
            form = ("五言" if len(first) == 5 else "七言") + "绝句"
            sft.append({"id": f"{t}-write", "task": "write_poem", "conversations": [
                {"role": "user", "content": f"请以《{t}》为题，写一首{form}。"},
                {"role": "assistant", "content": b.replace("。", "。\n", 1)}]})
            sft.append({"id": f"{t}-next", "task": "continue_line", "answer": second, "conversations": [
                {"role": "user", "content": f"“{first}”的下一句是什么？"}, {"role": "assistant", "content": second + "。"}]})
        out[f"sft_{split}"] = _write(d / f"sft_{split}.jsonl", sft)
    pairs = [{"q": f"《{t}》的作者是谁？", "history": [], "pos": a, "neg": POEMS[(i + 1) % 6][1]}
             for i, (t, a, _) in enumerate(POEMS[:6])]
    out["pairs_train"] = _write(d / "pairs_train.jsonl", pairs)
    return out


MICRO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             intermediate_size=64, max_position_embeddings=96)
ARMS = {"dense": ("mateconv-tiny", {}),
        "moe": ("mateconv-moe-tiny", dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16))}


def _pad_batch(items, key_ids="input_ids", key_tgt="targets", pad=2):
    n = max(len(it[key_ids]) for it in items)
    ids = torch.full((len(items), n), pad)
    tgt = torch.full((len(items), n), -100)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    for i, it in enumerate(items):
        k = len(it[key_ids])
        ids[i, :k], tgt[i, :k], mask[i, :k] = it[key_ids], it[key_tgt], 1
    return ids, tgt, mask


def _ce_steps(model, items, steps, rows, stage_tokens, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    ids, tgt, mask = _pad_batch(items)
    t0 = time.time()
    for step in range(1, steps + 1):
        model.train()
        out = model(input_ids=ids, attention_mask=mask)
        ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), tgt.reshape(-1),
                                               ignore_index=-100)
        (ce + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        model.update_router_bias()
        stage_tokens += int(mask.sum())
        rows.append({"step": step, "epoch": step, "loss": float(ce.detach()), "lr": lr, "tokens": stage_tokens,
                     "tokens_per_s": stage_tokens / max(time.time() - t0, 1e-6), "elapsed_s": time.time() - t0})
    return stage_tokens


def build_run(run_dir: Path, tok, seeds=(0, 1)) -> Path:
    from dataset.datasets import PreferenceDataset, SFTDataset
    from model import MateConvForCausalLM, get_config
    from trainer.dpo import answer_logps, dpo_loss

    data = make_data(run_dir / "data")
    pre_train = [{"input_ids": torch.tensor(w[:-1]), "targets": torch.tensor(w[1:])}
                 for w in ([1] + tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [2]
                           for line in data["pretrain_train"].read_text(encoding="utf-8").splitlines())]
    pre_val = pretrain_items(data["pretrain_validation"], tok, 64)
    sft_train = [SFTDataset(data["sft_train"], tok, 64)[i] for i in range(12)]
    sft_val_ds = SFTDataset(data["sft_validation"], tok, 64)
    sft_val = [sft_val_ds[i] for i in range(len(sft_val_ds))]
    pairs_ds = PreferenceDataset(data["pairs_train"], tok, 64)
    pairs = [pairs_ds[i] for i in range(len(pairs_ds))]
    (run_dir / "run.json").write_text(json.dumps({"baseline_arm": "dense", "max_seq_len": 64}), encoding="utf-8")
    for arm, (preset, extra) in ARMS.items():
        for seed in seeds:
            torch.manual_seed(seed)
            model = MateConvForCausalLM(get_config(preset, **MICRO, **extra))
            base = run_dir / "arms" / arm / f"seed{seed}"
            for stage, items in (("pretrain", pre_train), ("sft", sft_train)):
                rows = []
                _ce_steps(model, items, 2, rows, 0)
                val = pre_val if stage == "pretrain" else sft_val
                rows.append({"step": 2, "epoch": 2, "val/loss": items_loss(model, val, 8)["loss"]})
                if stage == "pretrain":  # what the trainer logs beside val/loss (evaluation.bpc.HeldoutBPC)
                    rows[-1]["val/bpc"] = HeldoutBPC(tok, data["pretrain_validation"], n=None, max_seq_len=64
                                                     ).evaluate(model)["bpc"]
                if stage == "pretrain":  # the trainer's cumulative FLOPs (sft: the report falls back to tokens)
                    for r in rows:
                        if "tokens" in r:
                            r["flops"] = r["tokens"] * 1000.0
                (base / stage).mkdir(parents=True, exist_ok=True)
                _write(base / stage / "metrics.jsonl", rows)
            model.save_pretrained(base / "sft")
            ref = copy.deepcopy(model).eval()
            opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
            ci, ct, cm = _pad_batch(pairs, "chosen_input_ids", "chosen_targets")
            ri, rt, rm = _pad_batch(pairs, "rejected_input_ids", "rejected_targets")
            with torch.no_grad():
                rc, _ = answer_logps(ref(input_ids=ci, attention_mask=cm).logits, ct)
                rr, _ = answer_logps(ref(input_ids=ri, attention_mask=rm).logits, rt)
                ref_chosen_logits = ref(input_ids=ci, attention_mask=cm).logits
            rows = []
            for step in range(0, 3):
                if step > 0:
                    model.train()
                    lc = model(input_ids=ci, attention_mask=cm).logits
                    pc, _ = answer_logps(lc, ct)
                    pr, _ = answer_logps(model(input_ids=ri, attention_mask=rm).logits, rt)
                    res = dpo_loss(pc, pr, rc, rr, beta=0.2)
                    res.losses.mean().backward()
                    opt.step()
                    opt.zero_grad()
                model.eval()
                with torch.no_grad():
                    lc = model(input_ids=ci, attention_mask=cm).logits
                    pc, _ = answer_logps(lc, ct)
                    pr, _ = answer_logps(model(input_ids=ri, attention_mask=rm).logits, rt)
                    res = dpo_loss(pc, pr, rc, rr, beta=0.2)
                    lp, lq = lc.log_softmax(-1), ref_chosen_logits.log_softmax(-1)
                    kl_tok = (lp.exp() * (lp - lq)).sum(-1)
                    kl = float((kl_tok * (ct != -100)).sum() / (ct != -100).sum())
                rows.append({"step": step, "loss": float(res.losses.mean()),
                             "rewards/chosen": float(res.chosen_rewards.mean()),
                             "rewards/rejected": float(res.rejected_rewards.mean()),
                             "rewards/margins": float((res.chosen_rewards - res.rejected_rewards).mean()),
                             "rewards/accuracies": float((res.chosen_rewards > res.rejected_rewards).float().mean()),
                             "kl": kl, "probe/pretrain_loss": items_loss(model, pre_val, 8)["loss"],
                             "probe/sft_loss": items_loss(model, sft_val, 8)["loss"]})
            (base / "dpo").mkdir(parents=True, exist_ok=True)
            _write(base / "dpo" / "metrics.jsonl", rows)
            model.save_pretrained(base / "dpo")
            for stage in ("sft", "dpo"):
                evaluate_checkpoint(base / stage, out=run_dir / "eval" / f"{arm}_seed{seed}_{stage}.json",
                                    tokenizer=FIXTURE_TOK, split="validation", data_dir=run_dir / "data",
                                    max_examples=8, max_new_tokens=4, max_seq_len=64, seed=0, n_resamples=500,
                                    mc_items=12, verse_examples_per_task=3, verse_new_tokens=6)
    return run_dir


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from tokenizer import load_tokenizer

    tok = load_tokenizer(FIXTURE_TOK)
    run_dir = build_run(tmp_path_factory.mktemp("run"), tok)  # one torch thread (tests/conftest.py)
    rep = report_mod.write_report(run_dir, n_resamples=500, seed=0)
    return run_dir, rep


def _eval(run_dir, arm, seed, stage):
    return json.loads((run_dir / "eval" / f"{arm}_seed{seed}_{stage}.json").read_text(encoding="utf-8"))


def _gens(run_dir, arm, seed, stage):
    p = run_dir / "eval" / f"{arm}_seed{seed}_{stage}_generations.jsonl"
    return [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines()]


def test_report_files_and_figures_exist(tiny_run):
    run_dir, rep = tiny_run
    assert (run_dir / "report.md").is_file() and (run_dir / "report.json").is_file()
    names = {Path(f["file"]).name for f in rep["figures"]}
    assert {"loss_by_step.png", "loss_by_flops.png", "dpo_curves.png", "expert_load_moe_sft.png",
            "expert_load_moe_dpo.png", "arm_differences.png"} <= names
    for f in rep["figures"]:
        png = run_dir / f["file"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert rep["training_seeds"] == {"dense": [0, 1], "moe": [0, 1]}
    assert rep["baseline_arm"] == "dense"
    assert rep["arms"]["moe"]["use_moe"] is True and rep["arms"]["dense"]["use_moe"] is False


def test_metric_table_matches_eval_files(tiny_run):
    run_dir, rep = tiny_run
    rows = {(r["arm"], r["stage"], r["metric"]): r for r in rep["table"]}
    for arm in ("dense", "moe"):
        for stage in ("sft", "dpo"):
            evs = [_eval(run_dir, arm, s, stage) for s in (0, 1)]
            r = rows[(arm, stage, "pretrain_loss")]
            assert r["per_seed"]["0"]["value"] == evs[0]["pretrain"]["loss"]
            assert r["per_seed"]["1"]["ci_low"] == evs[1]["pretrain"]["loss_ci_low"]
            vals = [e["pretrain"]["loss"] for e in evs]
            assert r["mean"] == pytest.approx(sum(vals) / 2) and r["std"] == pytest.approx(abs(vals[0] - vals[1]) / math.sqrt(2))
            # the generation metric is the mean of the per-example file
            for s in (0, 1):
                g = _gens(run_dir, arm, s, stage)
                f1 = sum(x["token_f1_char"] for x in g) / len(g)
                assert rows[(arm, stage, "token_f1_char")]["per_seed"][str(s)]["value"] == pytest.approx(f1)
                em = [x["exact_match"] for x in g if "exact_match" in x]
                if em:
                    assert rows[(arm, stage, "exact_match")]["per_seed"][str(s)]["value"] == pytest.approx(
                        sum(em) / len(em))
                    tasks = {x["task"] for x in g if "answer_in_prediction" in x}
                    assert tasks
                    for task in tasks:
                        hits = [x["answer_in_prediction"] for x in g if x["task"] == task]
                        assert rows[(arm, stage, f"task_accuracy/{task}")]["per_seed"][str(s)]["value"] == \
                            pytest.approx(sum(hits) / len(hits))
    assert (("moe", "sft", "router_max_violation") in rows) and (("dense", "sft", "router_max_violation") not in rows)


def test_comparisons_and_forgetting_recomputed(tiny_run):
    run_dir, rep = tiny_run
    comp = {(c["arm"], c["stage"], c["metric"]): c for c in rep["comparisons"]}
    c = comp[("moe", "sft", "rouge_l_char")]
    per = []
    for s in (0, 1):
        a = {x["id"]: x["rouge_l_char"] for x in _gens(run_dir, "moe", s, "sft")}
        b = {x["id"]: x["rouge_l_char"] for x in _gens(run_dir, "dense", s, "sft")}
        ids = sorted(a)
        r = paired_bootstrap([a[i] for i in ids], [b[i] for i in ids], 500, 0)
        assert c["per_seed"][str(s)]["diff"] == pytest.approx(r["diff"])
        assert c["per_seed"][str(s)]["ci_low"] == pytest.approx(r["ci_low"])
        per.append(r["diff"])
    assert c["across_seeds"]["mean"] == pytest.approx(seed_summary(per)["mean"])
    c = comp[("moe", "dpo", "sft_loss")]
    ea, eb = _eval(run_dir, "moe", 1, "dpo"), _eval(run_dir, "dense", 1, "dpo")
    assert c["per_seed"]["1"]["diff"] == pytest.approx(ea["sft"]["loss"] - eb["sft"]["loss"])
    forg = {(f["arm"], f["heldout"]): f for f in rep["forgetting"]}
    assert set(forg) == {(a, p) for a in ("dense", "moe") for p in ("pretrain", "sft")}
    for (arm, part), f in forg.items():
        for s in (0, 1):
            d, sft = _eval(run_dir, arm, s, "dpo")[part], _eval(run_dir, arm, s, "sft")[part]
            r = paired_ratio_bootstrap(d["item_nll_sum"], sft["item_nll_sum"], sft["item_tokens"], 500, 0)
            got = f["per_seed"][str(s)]
            assert got["diff"] == pytest.approx(d["loss"] - sft["loss"])
            assert (got["ci_low"], got["ci_high"]) == pytest.approx((r["ci_low"], r["ci_high"]))
            assert got["ci_low"] <= got["diff"] <= got["ci_high"]


def test_routing_matches_eval_files(tiny_run):
    run_dir, rep = tiny_run
    (r,) = [x for x in rep["routing"] if x["arm"] == "moe" and x["stage"] == "sft"]
    evs = [_eval(run_dir, "moe", s, "sft")["routing"] for s in (0, 1)]
    for i, lay in enumerate(r["layers"]):
        for e, v in enumerate(lay["load_fraction"]):
            assert v == pytest.approx((evs[0]["layers"][i]["load_fraction"][e] + evs[1]["layers"][i]["load_fraction"][e]) / 2)
        assert lay["max_violation"]["mean"] == pytest.approx(
            (evs[0]["layers"][i]["max_violation"] + evs[1]["layers"][i]["max_violation"]) / 2)
        assert sum(lay["load_fraction"]) == pytest.approx(1.0)
    assert not [x for x in rep["routing"] if x["arm"] == "dense"]


def test_training_numbers_match_metrics_jsonl(tiny_run):
    run_dir, rep = tiny_run
    for t in rep["training"]:
        rows = [json.loads(x) for x in (run_dir / "arms" / t["arm"] / f"seed{t['seed']}" / t["stage"] /
                                        "metrics.jsonl").read_text().splitlines()]
        assert t["final_train_loss"] == [r["loss"] for r in rows if "loss" in r][-1]
        if t["stage"] in ("pretrain", "sft"):
            assert t["final_val/loss"] == rows[-1]["val/loss"]


_NUM = re.compile(r"-?\d+\.\d+")


def test_markdown_numbers_equal_report_json(tiny_run):
    run_dir, rep = tiny_run
    md = (run_dir / "report.md").read_text(encoding="utf-8")
    table = md.split("## All metrics")[1].split("## Training")[0]
    md_rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] in ("dense", "moe"):
            md_rows[tuple(cells[:3])] = cells
    assert len(md_rows) == len(rep["table"]) > 20
    for r in rep["table"]:
        cells = md_rows[(r["arm"], r["stage"], r["metric"])]
        value = [float(x) for x in _NUM.findall(cells[3])]
        assert value[0] == pytest.approx(r["mean"], abs=1e-4, rel=1e-4)
        assert value[1] == pytest.approx(r["std"], abs=1e-4, rel=1e-4)  # 2 seeds: mean ± std
        if r.get("ci_low") is not None:
            lo, hi = (float(x) for x in _NUM.findall(cells[4]))
            assert (lo, hi) == pytest.approx((r["ci_low"], r["ci_high"]), abs=1e-4, rel=1e-4)
        assert cells[5] == "0, 1"
    forg = md.split("## Forgetting")[1].split("## Expert load")[0]
    for f in rep["forgetting"]:
        line = next(x for x in forg.splitlines() if x.startswith(f"| {f['arm']} | {f['heldout']} |"))
        nums = [float(x) for x in _NUM.findall(line)]
        assert nums[0] == pytest.approx(f["across_seeds"]["mean"], abs=1e-4)
        assert nums[1] == pytest.approx(f["across_seeds"]["std"], abs=1e-4)
        d0 = f["per_seed"]["0"]
        assert nums[2:7] == pytest.approx([d0["sft_loss"], d0["dpo_loss"], d0["diff"], d0["ci_low"], d0["ci_high"]],
                                          abs=1e-4)
    # every number printed in the comparison section is one of report.json's comparison numbers
    comp_md = md.split("## Dense vs MoE")[1].split("## Forgetting")[0]
    known = {round(v, 4) for c in rep["comparisons"] for v in
             [*(c["across_seeds"][k] for k in ("mean", "std", "ci_low", "ci_high") if c["across_seeds"][k] is not None),
              *(d[k] for d in c["per_seed"].values() for k in ("diff", "ci_low", "ci_high"))]}
    printed = [float(x) for x in _NUM.findall(comp_md)]
    assert printed and all(round(x, 4) in known or any(abs(x - k) <= 1.01e-4 for k in known) for x in printed)
    # the summary's statements use report.json numbers only (comparisons, forgetting, routing, FLOPs ratio)
    known |= {round(v, 4) for f in rep["forgetting"] for v in
              [*(f["across_seeds"][k] for k in ("mean", "std", "ci_low", "ci_high")),
               *(d[k] for d in f["per_seed"].values() for k in ("diff", "ci_low", "ci_high"))]}
    known |= {round(v, 4) for r in rep["routing"] for lay in r["layers"] for v in
              (lay["max_violation"]["mean"], lay["router_entropy"]["mean"])}
    known |= {round(r["router_entropy_max"], 4) for r in rep["routing"]}
    known.add(round(rep["arms"]["moe"]["flops_ratio_to_baseline"], 4))
    known |= {round(v, 4) for d in rep["compute"]["by_arm"].values() for r in d["ratio_to_baseline"].values()
              for v in r.values() if v is not None}
    known |= {round(d["load_fraction"], 4) for r in rep["routing"] for lay in r["layers"] for d in lay["near_dead"]}
    known |= {round(r["near_dead_threshold"], 4) for r in rep["routing"]}
    summary = md.split("## Summary")[1].split("\n## ")[0]
    printed = [float(x) for x in _NUM.findall(summary)]
    assert len(printed) > 20
    assert all(any(abs(x - k) <= 1.01e-4 for k in known) for x in printed)
    assert "Forgetting of **dense**" in summary and "Load balance of **moe**" in summary


def test_no_metric_used_training_data(tiny_run):
    run_dir, rep = tiny_run
    for name, e in rep["evaluations"].items():
        assert e["split"] == "validation"
        for key in ("pretrain_file", "sft_file", "generation_file"):
            assert "train" not in Path(e[key]).stem.replace("pretrain", ""), (name, key, e[key])
    train_ids = {json.loads(x)["id"] for x in (run_dir / "data" / "sft_train.jsonl").read_text().splitlines()}
    for p in (run_dir / "eval").glob("*_generations.jsonl"):
        ids = {json.loads(x)["id"] for x in p.read_text().splitlines()}
        assert ids and not ids & train_ids
    ev = _eval(run_dir, "moe", 0, "sft")
    assert ev["sft"]["train_overlap_check"]["checked"] is True


def test_report_tolerates_missing_files(tmp_path):
    (tmp_path / "arms" / "dense" / "seed0" / "pretrain").mkdir(parents=True)
    _write(tmp_path / "arms" / "dense" / "seed0" / "pretrain" / "metrics.jsonl",
           [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}])
    rep = report_mod.write_report(tmp_path, n_resamples=100)
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert rep["table"] == [] and any("no evaluation files" in n for n in rep["notes"])
    assert "no DPO" in md or "no dpo" in md
    assert (tmp_path / "figures" / "loss_by_step.png").is_file()


def test_single_seed_report_uses_bootstrap_intervals(tiny_run, tmp_path):
    import shutil

    run_dir, _ = tiny_run
    one = tmp_path / "one"
    shutil.copytree(run_dir, one, ignore=shutil.ignore_patterns("seed1", "*_seed1_*", "figures", "report.*"))
    rep = report_mod.write_report(one, n_resamples=300, seed=0)
    assert rep["training_seeds"] == {"dense": [0], "moe": [0]}
    md = (one / "report.md").read_text(encoding="utf-8")
    ev = _eval(one, "moe", 0, "sft")
    row = next(r for r in rep["table"] if (r["arm"], r["stage"], r["metric"]) == ("moe", "sft", "sft_loss"))
    assert (row["mean"], row["ci_low"], row["ci_high"]) == (ev["sft"]["loss"], ev["sft"]["loss_ci_low"],
                                                            ev["sft"]["loss_ci_high"])
    assert row["std"] == 0.0 and row["ci_kind"] == "bootstrap over examples"
    line = next(x for x in md.splitlines() if x.startswith("| moe | sft | sft_loss |"))
    assert f"| {report_mod.fmt(ev['sft']['loss'])} | [{report_mod.fmt(ev['sft']['loss_ci_low'])}, " \
           f"{report_mod.fmt(ev['sft']['loss_ci_high'])}] | 0 |" in line
    c = next(c for c in rep["comparisons"] if (c["stage"], c["metric"]) == ("sft", "sft_loss"))
    a, b = _eval(one, "moe", 0, "sft")["sft"], _eval(one, "dense", 0, "sft")["sft"]
    r = paired_ratio_bootstrap(a["item_nll_sum"], b["item_nll_sum"], a["item_tokens"], 300, 0)
    assert (c["per_seed"]["0"]["ci_low"], c["per_seed"]["0"]["ci_high"]) == pytest.approx((r["ci_low"], r["ci_high"]))
    assert "paired bootstrap 95% CI, 1 seed" in md.split("## Summary")[1].split("\n## ")[0]


def _jsonl(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def test_headline_numbers_equal_their_files(tiny_run):
    run_dir, rep = tiny_run
    rows = {(r["arm"], r["stage"], r["metric"]): r for r in rep["table"]}
    for arm in ("dense", "moe"):
        for stage in ("sft", "dpo"):
            for s in (0, 1):
                ev = _eval(run_dir, arm, s, stage)
                def val(m, arm=arm, stage=stage, s=s):
                    return rows[(arm, stage, m)]["per_seed"][str(s)]["value"]

                for part in ("pretrain", "sft"):  # bpc = summed NLL / characters / ln 2 over the sample's texts
                    b = ev["bpc"][part]
                    assert b["bpc"] == pytest.approx(sum(b["text_nll"]) / sum(b["text_chars"]) / math.log(2))
                    assert val(f"bpc_{part}") == b["bpc"] and b["n_texts"] == len(b["text_chars"])
                mc = _jsonl(run_dir / "eval" / f"{arm}_seed{s}_{stage}_mc.jsonl")
                assert {r["id"] for r in mc} == {it["id"] for it in mc}  # one record per item
                for task in {r["task"] for r in mc}:
                    acc = np.mean([r["correct"] for r in mc if r["task"] == task])
                    assert val(f"mc_acc/{task}") == pytest.approx(acc)
                    assert val(f"mc_centred/{task}") == pytest.approx((acc - 0.25) / 0.75)
                verse = _jsonl(run_dir / "eval" / f"{arm}_seed{s}_{stage}_verse.jsonl")
                wp = [r["verse"]["form_ok"] for r in verse if r["task"] == "write_poem" and "form_ok" in r["verse"]]
                assert wp and val("form_rate") == pytest.approx(np.mean(wp))
                assert val("repetition_rate") == pytest.approx(np.mean([r["verse"]["repetition_rate"] for r in verse]))
                assert val("reference_repetition_rate") == pytest.approx(
                    np.mean([r["verse_reference"]["repetition_rate"] for r in verse]))
    head = {(r["arm"], r["stage"]): r["values"] for r in rep["headline"]["rows"]}
    assert set(rep["headline"]["columns"]) >= {"bpc_pretrain", "mc_centred/next_line", "form_rate", "repetition_rate"}
    for (arm, stage), values in head.items():
        for m, v in values.items():
            assert v["mean"] == rows[(arm, stage, m)]["mean"] and v["ci_low"] == rows[(arm, stage, m)]["ci_low"]
    for f in rep["floors"]:
        r = rows[(f["arm"], "sft", f["metric"])]
        assert f["value"] == r["mean"] and isinstance(f["met"], bool)
        if f["op"] == "<=":
            assert f["met"] == (r["mean"] <= f["threshold"])
    # the markdown's headline table prints report.json's headline numbers
    md = (run_dir / "report.md").read_text(encoding="utf-8")
    sec = md.split("## Headline")[1].split("Repetition rate of the reference")[0]
    cols = rep["headline"]["columns"]
    for line in sec.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 + len(cols) and (cells[0], cells[1]) in head:
            for c, cell in zip(cols, cells[2:]):
                v = head[(cells[0], cells[1])][c]
                nums = [float(x) for x in _NUM.findall(cell)]
                assert nums == pytest.approx([v["mean"], v["ci_low"], v["ci_high"]], abs=1e-4)


def test_new_paired_comparisons_recomputed(tiny_run):
    run_dir, rep = tiny_run
    comp = {(c["arm"], c["stage"], c["metric"]): c for c in rep["comparisons"]}
    for s in (0, 1):
        a, b = _eval(run_dir, "moe", s, "sft")["bpc"]["pretrain"], _eval(run_dir, "dense", s, "sft")["bpc"]["pretrain"]
        assert a["text_chars"] == b["text_chars"]  # the same fixed sample in both arms
        diff = (sum(a["text_nll"]) - sum(b["text_nll"])) / sum(a["text_chars"]) / math.log(2)
        assert comp[("moe", "sft", "bpc_pretrain")]["per_seed"][str(s)]["diff"] == pytest.approx(diff)
        ma = {r["id"]: r["correct"] for r in _jsonl(run_dir / "eval" / f"moe_seed{s}_sft_mc.jsonl") if r["task"] == "cloze"}
        mb = {r["id"]: r["correct"] for r in _jsonl(run_dir / "eval" / f"dense_seed{s}_sft_mc.jsonl") if r["task"] == "cloze"}
        assert set(ma) == set(mb)
        r = paired_bootstrap([ma[i] for i in sorted(ma)], [mb[i] for i in sorted(ma)], 500, 0)
        c = comp[("moe", "sft", "mc_acc/cloze")]["per_seed"][str(s)]
        assert (c["diff"], c["ci_low"], c["ci_high"]) == pytest.approx((r["diff"], r["ci_low"], r["ci_high"]))


def test_compute_and_routing_health_match_their_files(tiny_run):
    run_dir, rep = tiny_run
    rows = {(r["arm"], r["seed"], r["stage"]): r for r in rep["compute"]["rows"]}
    for arm in ("dense", "moe"):
        fpt = rep["arms"][arm]["flops_per_token"]
        for s in (0, 1):
            for stage in ("pretrain", "sft"):
                log = _jsonl(run_dir / "arms" / arm / f"seed{s}" / stage / "metrics.jsonl")
                r = rows[(arm, s, stage)]
                last_t = [x for x in log if "tokens" in x][-1]
                assert r["train_s"] == [x for x in log if "elapsed_s" in x][-1]["elapsed_s"]
                assert r["tokens"] == last_t["tokens"] and r["tokens_source"] == "logged 'tokens'"
                assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["train_s"])
                if stage == "pretrain":
                    assert r["flops"] == last_t["flops"] and r["flops_source"] == "logged 'flops'"
                else:
                    assert r["flops"] == pytest.approx(r["tokens"] * fpt) and r["flops_source"] == "tokens x FLOPs/token"
    moe = rep["compute"]["by_arm"]["moe"]
    dense = rep["compute"]["by_arm"]["dense"]
    assert moe["ratio_to_baseline"]["pretrain"]["train_s"] == pytest.approx(
        moe["stages"]["pretrain"]["train_s"] / dense["stages"]["pretrain"]["train_s"])
    assert moe["stages"]["sft"]["train_s"] == pytest.approx(np.mean([rows[("moe", s, "sft")]["train_s"] for s in (0, 1)]))
    md = (run_dir / "report.md").read_text(encoding="utf-8")
    assert f"{fmt(moe['ratio_to_baseline']['total']['train_s'])}× in measured time" in md
    for r in rep["routing"]:
        E = r["n_routed_experts"]
        for lay in r["layers"]:
            assert [d["expert"] for d in lay["near_dead"]] == [e for e, f in enumerate(lay["load_fraction"]) if f < 0.1 / E]


def test_dpo_on_the_shared_pair_set_matches_the_pair_files(tiny_run):
    run_dir, rep = tiny_run
    d = rep["dpo_shared"]
    assert {(r["arm"], r["seed"]) for r in d["rows"]} == {(a, s) for a in ("dense", "moe") for s in (0, 1)}
    for r in d["rows"]:
        dpo = {x["id"]: x for x in _jsonl(run_dir / "eval" / f"{r['arm']}_seed{r['seed']}_dpo_pairs.jsonl")}
        sft = {x["id"]: x for x in _jsonl(run_dir / "eval" / f"{r['arm']}_seed{r['seed']}_sft_pairs.jsonl")}
        assert set(dpo) == set(sft) and r["n_pairs"] == len(dpo)
        margins = [(dpo[i]["logp_chosen"] - sft[i]["logp_chosen"]) - (dpo[i]["logp_rejected"] - sft[i]["logp_rejected"])
                   for i in sorted(dpo)]
        acc = np.mean([1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins])
        assert r["reward_accuracy"]["mean"] == pytest.approx(acc)
        assert r["sft_preference_accuracy"]["mean"] == pytest.approx(
            np.mean([1.0 if x["logp_chosen"] > x["logp_rejected"] else 0.0 for x in sft.values()]))
    # the same pairs for every arm
    ids = {(a, s): {x["id"] for x in _jsonl(run_dir / "eval" / f"{a}_seed{s}_sft_pairs.jsonl")}
           for a in ("dense", "moe") for s in (0, 1)}
    assert len({frozenset(v) for v in ids.values()}) == 1
    (c,) = d["comparisons"]
    assert c["arm"] == "moe" and set(c["per_seed"]) == {"0", "1"}


def test_trainer_bpc_is_reported_and_plotted(tiny_run):
    run_dir, rep = tiny_run
    for t in rep["training"]:
        if t["stage"] == "pretrain":
            rows = _jsonl(run_dir / "arms" / t["arm"] / f"seed{t['seed']}" / "pretrain" / "metrics.jsonl")
            assert t["final_val/bpc"] == [r for r in rows if "val/bpc" in r][-1]["val/bpc"]
    assert any(f["file"] == "figures/bpc_curves.png" for f in rep["figures"])
    assert (run_dir / "figures" / "bpc_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (run_dir / "figures" / "headline.png").is_file()
