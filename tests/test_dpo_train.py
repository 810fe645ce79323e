"""9.train_dpo.py on the real shared trainer: SFT checkpoint -> DPO, held-out reward accuracy at step 0 and
after training, forgetting probe, missing --init_from, and resume. Tiny real model and a real tokenizer."""

import json
import random
from pathlib import Path

import pytest

import trainer
from tokenizer import ORIGINAL_TOKENIZER_FIXTURE
from trainer import SFTTask
from trainer.dpo import DPOTask

TOKENIZER = str(ORIGINAL_TOKENIZER_FIXTURE)

POEMS = [
    ("床前明月光", "疑是地上霜"), ("举头望明月", "低头思故乡"), ("白日依山尽", "黄河入海流"),
    ("欲穷千里目", "更上一层楼"), ("春眠不觉晓", "处处闻啼鸟"), ("夜来风雨声", "花落知多少"),
    ("红豆生南国", "春来发几枝"), ("愿君多采撷", "此物最相思"), ("千山鸟飞绝", "万径人踪灭"),
    ("孤舟蓑笠翁", "独钓寒江雪"), ("松下问童子", "言师采药去"), ("只在此山中", "云深不知处"),
    ("离离原上草", "一岁一枯荣"), ("野火烧不尽", "春风吹又生"), ("锄禾日当午", "汗滴禾下土"),
    ("谁知盘中餐", "粒粒皆辛苦"), ("空山不见人", "但闻人语响"), ("返景入深林", "复照青苔上"),
    ("独在异乡为异客", "每逢佳节倍思亲"), ("两岸猿声啼不住", "轻舟已过万重山"),
    ("海内存知己", "天涯若比邻"), ("会当凌绝顶", "一览众山小"), ("国破山河在", "城春草木深"),
    ("劳动最光荣", "学习最快乐"),
]


def _garble(text: str, rng: random.Random) -> str:
    chars = list(text)
    rng.shuffle(chars)
    return "嗯" + "".join(chars) + "吧吧吧"


def _write(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    rng = random.Random(0)
    sft = [{"id": f"s{i}", "task": "next_line", "conversations": [
        {"role": "user", "content": f"“{a}”的下一句是什么？"}, {"role": "assistant", "content": f"{b}。"}]}
        for i, (a, b) in enumerate(POEMS)]
    pairs = [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"“{a}”的下一句是什么？"}],
              "chosen": f"{b}。", "rejected": _garble(b, rng)} for i, (a, b) in enumerate(POEMS)]
    paths = {
        "sft": _write(root / "sft.jsonl", sft),
        "sft_val": _write(root / "sft_val.jsonl", sft[-8:]),
        "pairs": _write(root / "pairs_train.jsonl", pairs[:16]),
        "eval_pairs": _write(root / "pairs_val.jsonl", pairs[16:]),
        "pretrain_val": _write(root / "pretrain_val.jsonl", [{"text": f"{a}，{b}。"} for a, b in POEMS[:8]]),
        "config": _write(root / "tiny.json", []),
    }
    Path(paths["config"]).write_text(json.dumps({
        "vocab_size": 6400, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 128, "use_moe": True,
        "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "moe_intermediate_size": 32}))
    # no --dtype: the automatic choice (bf16 on AMX, else fp32; $MATECONV_DTYPE forces either), except
    # where two launch geometries are compared value for value (float32 there)
    common = ["--device", "cpu", "--num_threads", "1", "--tokenizer", TOKENIZER, "--max_seq_len", "64",
              "--num_workers", "0", "--log_interval", "1"]
    out = root / "out"
    rc = trainer.run(SFTTask(), ["--model", paths["config"], "--init_from", "none", "--data_path", paths["sft"],
                                 "--out_dir", str(out), "--run_name", "sft_mateconv-tiny", "--max_steps", "12", "--batch_size", "8",
                                 "--learning_rate", "3e-3", "--eval_interval", "0", *common])
    assert rc == 0
    return root, out, paths, common


def _dpo_args(out, paths, common, run_name, *extra):
    # no --init_from: the default is the latest checkpoint of <out_dir>/sft_<model tag> (CPU: mateconv-tiny)
    return ["--pairs_path", paths["pairs"], "--eval_pairs_path",
            paths["eval_pairs"], "--out_dir", str(out), "--run_name", run_name, "--batch_size", "8",
            "--learning_rate", "2e-3", "--beta", "0.2", "--kl_coef", "0.05", "--warmup_ratio", "0",
            "--accumulation_steps", "2", "--grad_clip", "1.0", "--probe_pretrain_path", paths["pretrain_val"],
            "--probe_sft_path", paths["sft_val"], *common, *extra]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_dpo_raises_heldout_reward_accuracy_and_reports_probe(setup):
    root, out, paths, common = setup
    rc = trainer.run(DPOTask(), _dpo_args(out, paths, common, "dpo", "--max_steps", "8", "--eval_interval", "4",
                                          "--precompute_ref", "--kl_topk", "32"))
    assert rc == 0
    recs = _records(out / "dpo")
    evals = [r for r in recs if "pairs/reward_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 4, 8]
    first, last = evals[0], evals[-1]
    assert first["pairs/reward_accuracy"] == 0.5 and abs(first["pairs/rewards/margins"]) < 1e-4
    assert abs(first["pairs/kl"]) < 1e-4
    assert last["pairs/rewards/accuracies"] > 0.5 and last["pairs/rewards/margins"] > 0
    for r in evals:
        assert r["probe/pretrain_loss"] > 0 and r["probe/sft_loss"] > 0
    train = [r for r in recs if "rewards/accuracies" in r and "loss" in r]
    assert len(train) == 8
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl",
              "moe/balance_loss"):
        assert k in train[-1]
    assert train[-1]["kl"] > 0
    log = (out / "dpo" / "train.log").read_text()
    assert "reference model freed" in log  # --precompute_ref with --kl_topk: the KL needs no reference model


def test_missing_sft_checkpoint_is_an_error(setup, monkeypatch):
    root, out, paths, common = setup
    (root / "cwd").mkdir(exist_ok=True)
    monkeypatch.chdir(root / "cwd")  # the fallback root "out" is relative to the working directory
    with pytest.raises(FileNotFoundError, match="nowhere"):
        trainer.run(DPOTask(), _dpo_args(out, paths, common, "dpo_missing", "--max_steps", "1",
                                         "--init_from", str(root / "nowhere")))
    with pytest.raises(FileNotFoundError, match="sft_mateconv-tiny"):  # default <out_dir>/sft_<tag> absent
        trainer.run(DPOTask(), _dpo_args(out, paths, common, "dpo_missing", "--max_steps", "1",
                                         "--out_dir", str(root / "elsewhere")))
    with pytest.raises(ValueError, match="starting checkpoint"):  # random weights are never a DPO start
        trainer.run(DPOTask(), _dpo_args(out, paths, common, "dpo_missing", "--max_steps", "1",
                                         "--init_from", "none"))


def test_resume_continues_from_the_sft_reference(setup):
    root, out, paths, common = setup
    args = ["--eval_interval", "0", "--eval_pairs_path", "", "--max_steps", "4"]
    assert trainer.run(DPOTask(), _dpo_args(out, paths, common, "full", "--save_interval", "2", *args)) == 0
    mid = out / "full" / "checkpoints" / "step_0000002"
    assert json.loads((mid / "trainer_state.json").read_text())["init_from"].startswith(str(out / "sft_mateconv-tiny"))
    # a second run resumed from the step-2 checkpoint: the reference is still the SFT model, so steps 3-4 match
    assert trainer.run(DPOTask(), _dpo_args(out, paths, common, "resumed", "--resume", str(mid), *args)) == 0
    full = {r["step"]: r for r in _records(out / "full") if "rewards/margins" in r}
    resumed = {r["step"]: r for r in _records(out / "resumed") if "rewards/margins" in r}
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        for k in ("loss", "rewards/margins", "kl"):
            assert resumed[step][k] == pytest.approx(full[step][k], rel=1e-4, abs=1e-6)


def test_original_command_line_parses():
    from trainer.args import fill_defaults, parse_args

    argv = ("--out_dir out_dpo --pairs_path ./dataset/dpo_pairs.jsonl --epochs 20 --max_steps 1800 --batch_size 16 "
            "--learning_rate 1e-4 --beta 0.2 --kl_coef 0.05 --warmup_ratio 0.06 --accumulation_steps 2 "
            "--grad_clip 1.0 --use_wandb --local_rank 0").split()
    task = DPOTask()
    args = fill_defaults(parse_args(task, argv), task, on_cpu=False)
    assert (args.max_steps, args.epochs, args.batch_size, args.accumulation_steps) == (1800, 20, 16, 2)
    assert (args.learning_rate, args.beta, args.kl_coef, args.warmup_ratio, args.grad_clip) == (1e-4, 0.2, 0.05, 0.06, 1.0)
    assert args.use_wandb and args.pairs_path == "./dataset/dpo_pairs.jsonl" and args.out_dir == "out_dpo"
    d = fill_defaults(parse_args(task, []), task, on_cpu=False)
    assert (d.beta, d.kl_coef, d.batch_size, d.grad_clip, d.kl_topk, d.sft_coef) == (0.2, 0.05, 16, 1.0, 0, 0.0)
    assert not d.precompute_ref and not d.length_norm


def test_two_process_dpo_matches_one_process(setup):
    """torchrun with 2 processes (half the per-process batch) gives the 1-process losses and held-out
    metrics; --precompute_ref splits the reference pass across the processes and gathers it."""
    from launchers import launch_cmd, run_ok

    root, out, paths, common = setup
    # float32 pinned: 1 x 8 and 2 x 4 pairs round differently, and bfloat16 noise (~1e-2) would hide a real
    # difference; in float32 they agree to ~1e-6, so the tolerances below are meaningful
    args = ["--max_steps", "4", "--eval_interval", "2", "--precompute_ref", "--kl_topk", "32", "--dtype", "float32"]

    def run(mode, name, batch):
        a = _dpo_args(out, paths, common, name, *args)
        a[a.index("--batch_size") + 1] = batch
        run_ok(launch_cmd(mode, "9.train_dpo.py") + a)
        return _records(out / name)

    one = run("plain", "dpo_one", "8")
    two = run("torchrun", "dpo_two", "4")
    assert "precomputed" in (out / "dpo_two" / "train.log").read_text()
    assert "on 2 processes" in (out / "dpo_two" / "train.log").read_text()
    train_one = [r for r in one if "loss" in r and "rewards/margins" in r]
    train_two = [r for r in two if "loss" in r and "rewards/margins" in r]
    assert len(train_one) == len(train_two) == 4
    for a, b in zip(train_one, train_two):
        for k in ("loss", "rewards/margins", "kl", "logps/chosen"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (k, a, b)
        # counts of pairs: equal exactly (a tie is 1/2 whichever side of 0 rounding puts its margin)
        assert (b["rewards/accuracies"], b["rewards/ties"]) == (a["rewards/accuracies"], a["rewards/ties"]), (a, b)
    assert train_one[0]["rewards/ties"] == 1.0  # step 1: the policy is the reference, every pair ties
    eval_one = [r for r in one if "pairs/reward_accuracy" in r]
    eval_two = [r for r in two if "pairs/reward_accuracy" in r]
    assert [r["step"] for r in eval_one] == [r["step"] for r in eval_two] == [0, 2, 4]
    for a, b in zip(eval_one, eval_two):
        assert b["pairs/reward_accuracy"] == a["pairs/reward_accuracy"], (a, b)
        for k in ("pairs/rewards/margins", "pairs/kl"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (k, a, b)
