"""One held-out preference-pair set shared by every arm, so DPO evaluations are comparable.

Each arm's DPO logs measure reward accuracy on *that arm's own* generated pairs (different sets for
different arms). This module builds one fixed set from a held-out SFT file, independent of any model:

* prompt = a held-out SFT prompt (tasks ``write_poem``, ``continue_line``, ``author``, ``title``, ``form``,
  ``cipai``, ``explain``, ``recite``), a fixed seeded sample spread over collections and tasks
  (:func:`evaluation.bpc.spread_sample`);
* chosen = its reference answer; rejected = the reference answer of another held-out prompt of the same
  task (a fluent answer to a different question: an arm-independent negative), drawn deterministically.

:func:`pair_logps` gives, per pair, the log-probability (nats, :func:`model.losses.sequence_nll_of`) of the
chosen and of the rejected answer (its tokens and end token; the prompt is context; windowing as
:func:`evaluation.bpc.answer_item`). The report combines the SFT and DPO checkpoints of one arm and seed:
DPO implicit reward of an answer = ``logp_dpo - logp_sft`` (beta = 1; the sign, hence the accuracy, does not
depend on beta), reward accuracy = share of pairs whose chosen reward exceeds the rejected one (a tie
counts 0.5), with a bootstrap CI over pairs and paired differences between arms on the same pairs. Each
checkpoint's *preference accuracy* (``logp_chosen > logp_rejected``) is reported too.
"""

from __future__ import annotations

import hashlib
import random

import torch

from dataset.collate import pad_collate
from model.losses import sequence_nll_of

from .bpc import answer_item, read_jsonl, spread_sample, stratum_of
from .metrics import bootstrap_mean_ci

PAIR_TASKS = ("write_poem", "continue_line", "author", "title", "form", "cipai", "explain", "recite")


def shared_pairs(sft_file, n: int = 200, seed: int = 0) -> list[dict]:
    """``n`` pairs ``{"id", "task", "messages", "chosen", "rejected", "rejected_from"}`` (see module doc)."""
    recs = []
    for r in read_jsonl(sft_file):
        conv = r.get("conversations") or []
        if r.get("task") in PAIR_TASKS and len(conv) == 2 and conv[1].get("role") == "assistant":
            recs.append(r)
    by_task: dict[str, list[dict]] = {}
    for r in recs:
        by_task.setdefault(r["task"], []).append(r)
    out = []
    for i in spread_sample(recs, n, seed, stratum_of):
        r = recs[i]
        rid = str(r.get("id", i))
        rng = random.Random(int.from_bytes(hashlib.blake2b(f"pairs:{seed}:{rid}".encode(), digest_size=8).digest(),
                                           "big"))
        same = [x for x in by_task[r["task"]] if x["conversations"][1]["content"] != r["conversations"][1]["content"]]
        if not same:
            continue
        other = rng.choice(same)
        out.append({"id": f"pair-{rid}", "task": r["task"], "messages": r["conversations"][:1],
                    "chosen": r["conversations"][1]["content"], "rejected": other["conversations"][1]["content"],
                    "rejected_from": other.get("id")})
    return out


@torch.no_grad()
def pair_logps(model, tokenizer, pairs: list[dict], max_seq_len: int, batch_size: int = 16, device=None) -> list[dict]:
    """Per pair: ``id``, ``task``, ``logp_chosen``, ``logp_rejected`` (nats, summed over the answer's tokens and
    end token), ``tokens_chosen``, ``tokens_rejected``."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = pad_collate(pad)
    rows = []
    for k, p in enumerate(pairs):
        for side in ("chosen", "rejected"):
            item, _ = answer_item(tokenizer, p["messages"] + [{"role": "assistant", "content": p[side]}], max_seq_len)
            rows.append((k, side, item))
    logp = [{} for _ in pairs]
    try:
        for start in range(0, len(rows), batch_size):
            chunk = [r for r in rows[start:start + batch_size] if r[2] is not None]
            if not chunk:
                continue
            batch = collate([r[2] for r in chunk])
            ids, tgt, mask = (batch[x].to(device) for x in ("input_ids", "targets", "attention_mask"))
            s, c = sequence_nll_of(model, ids, mask, tgt)
            for (k, side, _), sv, cv in zip(chunk, s.double().cpu().tolist(), c.cpu().tolist()):
                logp[k][side] = (-sv, int(cv))
    finally:
        model.train(was_training)
    out = []
    for p, lp in zip(pairs, logp):
        if "chosen" in lp and "rejected" in lp:
            out.append({"id": p["id"], "task": p["task"], "logp_chosen": lp["chosen"][0],
                        "logp_rejected": lp["rejected"][0], "tokens_chosen": lp["chosen"][1],
                        "tokens_rejected": lp["rejected"][1]})
    return out


def _win(x: float) -> float:
    return 1.0 if x > 0 else (0.5 if x == 0 else 0.0)


def preference_accuracy(records: list[dict], n_resamples: int = 2000, seed: int = 0) -> dict:
    """Share of pairs where the checkpoint gives the chosen answer the higher log-probability (tie 0.5)."""
    if not records:
        return {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    ci = bootstrap_mean_ci([_win(r["logp_chosen"] - r["logp_rejected"]) for r in records], n_resamples, seed)
    return {k: ci[k] for k in ("mean", "ci_low", "ci_high", "n")}


def reward_wins(dpo: list[dict], sft: list[dict]) -> dict[str, float]:
    """Pair id -> 1 / 0.5 / 0: the DPO implicit reward (``logp_dpo - logp_sft``) prefers the chosen answer."""
    ref = {r["id"]: r for r in sft}
    out = {}
    for r in dpo:
        b = ref.get(r["id"])
        if b is not None:
            out[r["id"]] = _win((r["logp_chosen"] - b["logp_chosen"]) - (r["logp_rejected"] - b["logp_rejected"]))
    return out
