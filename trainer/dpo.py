"""DPO on the shared trainer: the loss, reference log-probabilities, held-out preference accuracy and a
forgetting probe.

Loss (per preference pair, ``--beta`` = β)::

    π_c, π_r  = policy log-probability of the chosen / rejected answer (summed over answer tokens)
    ρ_c, ρ_r  = the same under the frozen reference model
    dpo       = -log σ( β · ((π_c - ρ_c) - (π_r - ρ_r)) )                         # standard sigmoid DPO
    loss      = dpo + kl_coef · KL_c + sft_coef · NLL_c

- ``KL_c`` (``--kl_coef``, default 0.05) is the token-level KL(policy ‖ reference) on the chosen answer,
  averaged over its tokens: ``mean_t Σ_v p_π(v|t) (log p_π(v|t) - log p_ref(v|t))``. The direction is
  policy-first (the reverse KL of RLHF, mode-seeking); its gradient flows through the policy only.
- ``NLL_c`` (``--sft_coef``, default 0) is the policy's mean negative log-likelihood per token of the
  chosen answer only (never the rejected one).
- ``--length_norm`` uses the mean instead of the sum of the answer-token log-probabilities in the DPO
  term (policy and reference alike), as the original project did; β then acts per token and usually
  needs to be larger. Off by default.

Rewards and logged metrics use TRL's names (sums over pairs; the trainer divides by the pair count):
``rewards/chosen`` = β(π_c - ρ_c), ``rewards/rejected`` = β(π_r - ρ_r), ``rewards/accuracies`` =
[reward_c > reward_r] where a tie (|margin| ≤ ``TIE_TOLERANCE`` = 1e-4) counts 1/2 — unlike TRL's strict
``>``, which turns rounding noise at step 1 (policy = reference) into 0 or 1 — and ``rewards/ties`` the
fraction of such ties, ``rewards/margins``, ``logps/chosen`` = π_c, ``logps/rejected`` = π_r
(summed log-probabilities, also under ``--length_norm``), ``kl`` (the KL_c above, also when ``--kl_coef 0``
as long as it can be computed), ``loss/dpo``, ``loss/sft`` (NLL_c).

Held-out preference accuracy (``--eval_pairs_path``): the same metrics on held-out pairs before
training (step 0) and at each ``--eval_interval``, logged as ``pairs/<name>`` (``pairs/rewards/accuracies``
...); ``pairs/reward_accuracy`` is the same tie-aware accuracy (at step 0 the policy *is* the reference:
every pair ties and it reads 0.5, chance level), and ``pairs/logp_accuracy`` = [π_c > π_r]
(whether the model itself gives the chosen answer more probability; meaningful at step 0 too).

Starting point: ``--init_from`` (an SFT checkpoint or SFT run dir; default: the latest checkpoint of
``<out_dir>/sft_<model tag>``, else of ``out/sft_<model tag>`` where ``5.full_sft.py`` writes) initialises
the policy *and* the reference. No checkpoint found is an error (``--init_from none`` too): DPO never
starts from random or pretraining-only weights. On ``--resume`` the policy continues from the run's
checkpoint and the reference is still the ``--init_from`` SFT model (recorded in ``trainer_state.json``).
``--max_steps`` counts optimizer steps (each of ``--accumulation_steps`` micro-batches of
``--batch_size`` pairs per process), as in the other stages; SIGINT saves and stops (``--resume``).

Defaults: ``--beta 0.2``, ``--kl_coef 0.05``, ``--batch_size 16``, ``--grad_clip 1.0`` (the original's),
``--learning_rate 1e-5`` (typical for DPO: the policy must stay near the reference; the original README
run used 1e-4 with its reference-free loss), ``--warmup_ratio 0.06``. On CPU (demo): batch 8, context
256, lr 1e-4, 40 optimizer steps, evaluation every 20. The MoE balance loss and the router-bias updates are applied by the trainer as in the
other stages (one policy forward per micro-batch, chosen and rejected answers in one [2B, T] batch).

- live reference (default): a frozen copy of the SFT model runs next to the policy on every training
  batch. The held-out pairs' reference values are always computed once at the start (they are fixed).
- ``--precompute_ref``: before training, the reference log-probabilities of every train and eval pair
  are computed once (one pass, no gradients, split across the processes and gathered) and the reference
  model is freed. The KL term needs the
  reference's full next-token distribution on the chosen answers, which is too large to store, so:

  * ``--kl_topk 0`` (default, exact KL): with ``--kl_coef > 0`` the reference model is *kept* and run
    on the chosen answers only, to compute the exact KL; precomputation then saves the reference
    passes over the rejected answers, not memory. With ``--kl_coef 0`` the reference is freed.
  * ``--kl_topk K``: the KL is computed on the coarse-grained vocabulary {the reference's K most likely
    tokens at that position} ∪ {all others}:
    ``Σ_{v∈topK} p_π(v)(log p_π(v) - log p_ref(v)) + p_π(rest)(log p_π(rest) - log p_ref(rest))``.
    This is an exact KL between the two coarse-grained distributions and a lower bound of the full
    KL (log-sum inequality); it equals the full KL when K = vocabulary size. The reference's top-K ids,
    log-probabilities and tail mass are stored per chosen-answer token (8·K + 4 bytes each) and the
    reference model is freed. A live reference with ``--kl_topk K`` computes the same quantity, so live
    and precomputed runs give the same loss for every setting.

  (Estimating the KL from the log-ratio of the *taken* tokens would be biased: the chosen tokens are
  not samples from the policy.)

Forgetting probe (every ``--eval_interval`` and at step 0): token-mean cross-entropy of the policy on
held-out pretraining text (``--probe_pretrain_path``: a pretraining ``.bin`` or a ``{"text"}`` JSONL)
and on the answers of held-out SFT conversations (``--probe_sft_path``), logged as
``probe/pretrain_loss`` and ``probe/sft_loss`` beside the DPO metrics.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from model.losses import IGNORE_INDEX, nll_sum, sequence_nll, token_logprobs

from .tasks import Loss, Task

TIE_TOLERANCE = 1e-4  # |reward margin| at or below this is a tie in ``reward_accuracy``


# --------------------------------------------------------------------------------------------------
# Pure functions: log-probabilities, KL, the DPO loss
# --------------------------------------------------------------------------------------------------


def answer_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: (sum of answer-token log-probabilities [B], number of answer tokens [B])."""
    nll, n = sequence_nll(logits, targets)
    return -nll, n


def _xlogratio(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """p (log p - log q) with 0 where p == 0 (so -inf log-probabilities are harmless)."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))


def reference_topk(ref_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From reference logits [N, V]: (top-k ids [N, k], their log-probs [N, k], log-prob of the rest [N])."""
    logq = torch.log_softmax(ref_logits.float(), dim=-1)
    k = min(k, logq.size(-1))
    top_logq, top_ids = logq.topk(k, dim=-1)
    rest = logq.scatter(-1, top_ids, float("-inf")).logsumexp(-1)
    return top_ids, top_logq, rest


def token_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor | None = None, *,
             topk: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """KL(policy ‖ reference) per position, from logits [N, V] -> [N].

    Exact with ``ref_logits``; with ``topk=(ids, logq, logq_rest)`` (see :func:`reference_topk`) the KL of
    the coarse-grained distributions over {top-k ids} ∪ {rest} (a lower bound of the exact KL).
    """
    logp = torch.log_softmax(policy_logits.float(), dim=-1)
    if topk is None:
        if ref_logits is None:
            raise ValueError("token_kl needs ref_logits or topk")
        logq = torch.log_softmax(ref_logits.float(), dim=-1)
        return _xlogratio(logp, logq).sum(-1)
    ids, top_logq, rest_logq = topk
    top_logp = logp.gather(-1, ids)
    rest_logp = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return _xlogratio(top_logp, top_logq.float()).sum(-1) + _xlogratio(rest_logp, rest_logq.float())


@dataclass
class DPOOutput:
    losses: torch.Tensor            # [B] total per-pair loss (DPO + KL + SFT terms)
    dpo_losses: torch.Tensor        # [B] the sigmoid DPO term alone
    chosen_rewards: torch.Tensor    # [B] β (π_c - ρ_c), detached
    rejected_rewards: torch.Tensor  # [B] β (π_r - ρ_r), detached


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *, beta: float = 0.2,
             chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None,
             length_norm: bool = False, kl: torch.Tensor | None = None, kl_coef: float = 0.0,
             sft_nll: torch.Tensor | None = None, sft_coef: float = 0.0) -> DPOOutput:
    """Per-pair sigmoid DPO loss from summed answer log-probabilities (all tensors [B]).

    ``length_norm`` divides the four log-probabilities by the answer lengths first. ``kl`` (per-pair
    KL(policy ‖ reference), e.g. the token mean on the chosen answer) is added times ``kl_coef``,
    ``sft_nll`` (per-pair NLL of the chosen answer) times ``sft_coef``.
    """
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    if length_norm:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("length_norm needs chosen_lengths and rejected_lengths")
        lc, lr = chosen_lengths.clamp(min=1).to(pc.dtype), rejected_lengths.clamp(min=1).to(pr.dtype)
        pc, rc, pr, rr = pc / lc, rc / lc, pr / lr, rr / lr
    chosen_logratio = pc - rc.detach()
    rejected_logratio = pr - rr.detach()
    dpo = -F.logsigmoid(beta * (chosen_logratio - rejected_logratio))
    losses = dpo
    if kl_coef and kl is not None:
        losses = losses + kl_coef * kl
    elif kl_coef:
        raise ValueError("kl_coef > 0 needs kl")
    if sft_coef:
        if sft_nll is None:
            raise ValueError("sft_coef > 0 needs sft_nll")
        losses = losses + sft_coef * sft_nll
    return DPOOutput(losses, dpo, (beta * chosen_logratio).detach(), (beta * rejected_logratio).detach())


def pair_metrics(out: DPOOutput, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                 kl: torch.Tensor | None = None, sft_nll: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """TRL-named metrics as *sums* over the pairs of a batch (divide by the pair count for means)."""
    c, r = out.chosen_rewards, out.rejected_rewards
    margin = c - r
    tie = margin.abs() <= TIE_TOLERANCE
    accuracy = torch.where(tie, torch.full_like(margin, 0.5), (margin > 0).float()).sum()
    m = {
        "rewards/chosen": c.sum(),
        "rewards/rejected": r.sum(),
        "rewards/accuracies": accuracy,
        "rewards/ties": tie.float().sum(),
        "rewards/margins": margin.sum(),
        "logps/chosen": policy_chosen_logps.detach().float().sum(),
        "logps/rejected": policy_rejected_logps.detach().float().sum(),
        "loss/dpo": out.dpo_losses.detach().sum(),
        "reward_accuracy": accuracy,
        "logp_accuracy": (policy_chosen_logps.detach() > policy_rejected_logps.detach()).float().sum(),
    }
    if kl is not None:
        m["kl"] = kl.detach().float().sum()
    if sft_nll is not None:
        m["loss/sft"] = sft_nll.detach().float().sum()
    return m


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------


class IndexedPairs(torch.utils.data.Dataset):
    """A preference dataset whose items also carry ``ref_key = [store_id, index]`` so that precomputed
    reference log-probabilities can be looked up in the main process (safe with loader workers)."""

    def __init__(self, base, store_id: int):
        self.base = base
        self.store_id = store_id

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        item = dict(self.base[i])
        item["ref_key"] = torch.tensor([self.store_id, i], dtype=torch.long)
        return item


def _cat_pairs(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    tgt = torch.cat([batch["chosen_targets"], batch["rejected_targets"]])
    att = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    return ids, tgt, att


# --------------------------------------------------------------------------------------------------
# Reference log-probabilities
# --------------------------------------------------------------------------------------------------


class RefStore:
    """Precomputed reference values for one dataset, indexed by item index.

    ``chosen`` / ``rejected`` [N]: summed answer log-probabilities. With ``topk`` > 0 also the reference
    top-k (ids, log-probs, tail log-prob) at every chosen-answer token, flattened, with ``offsets`` [N+1].
    """

    def __init__(self, chosen, rejected, topk_ids=None, topk_logps=None, rest_logps=None, offsets=None):
        self.chosen, self.rejected = chosen, rejected
        self.topk_ids, self.topk_logps, self.rest_logps, self.offsets = topk_ids, topk_logps, rest_logps, offsets

    @property
    def has_topk(self) -> bool:
        return self.topk_ids is not None

    def lookup(self, index: torch.Tensor, device) -> dict[str, torch.Tensor]:
        index = index.cpu()
        out = {"chosen": self.chosen[index].to(device), "rejected": self.rejected[index].to(device)}
        if self.has_topk:
            spans = [slice(int(self.offsets[i]), int(self.offsets[i + 1])) for i in index]
            ids, logq, rest = (torch.cat([t[s] for s in spans]).to(device)
                               for t in (self.topk_ids, self.topk_logps, self.rest_logps))
            out["topk"] = (ids.long(), logq, rest)
        return out


@torch.no_grad()
def precompute_reference(ref_model, dataset, collate, *, batch_size: int, device, topk: int = 0,
                         autocast=None) -> RefStore:
    """One no-grad pass of the reference over ``dataset`` (in order): a :class:`RefStore`.

    Under torchrun / DeepSpeed each process computes a contiguous 1/world of the items and the parts
    are gathered, so every process ends with the same full store for 1/world of the compute.
    """
    from . import distributed

    world, rank = distributed.world_size(), distributed.rank()
    per = -(-len(dataset) // world)
    mine = torch.utils.data.Subset(dataset, range(min(len(dataset), rank * per), min(len(dataset), (rank + 1) * per)))
    loader = torch.utils.data.DataLoader(mine, batch_size=batch_size, shuffle=False, collate_fn=collate)
    chosen, rejected, ids_l, logq_l, rest_l, counts = [], [], [], [], [], []
    was_training = ref_model.training
    ref_model.eval()
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        ids, tgt, att = _cat_pairs(batch)
        with autocast() if autocast is not None else nullcontext():
            logits = ref_model(ids, attention_mask=att).logits
        s, _ = answer_logps(logits, tgt)
        B = batch["chosen_input_ids"].size(0)
        chosen.append(s[:B].float().cpu())
        rejected.append(s[B:].float().cpu())
        if topk:
            mask = batch["chosen_targets"] != IGNORE_INDEX
            top_ids, top_logq, rest = reference_topk(logits[:B][mask], topk)
            ids_l.append(top_ids.to(torch.int32).cpu())
            logq_l.append(top_logq.cpu())
            rest_l.append(rest.cpu())
            counts.append(mask.sum(-1).cpu())
    ref_model.train(was_training)
    parts = [chosen, rejected, ids_l, logq_l, rest_l, counts]
    if world > 1:  # rank order == item order: concatenating the gathered parts restores the dataset order
        gathered = distributed.all_gather_objects(parts)
        parts = [[t for part in gathered for t in part[k]] for k in range(len(parts))]
    chosen, rejected, ids_l, logq_l, rest_l, counts = parts
    store = RefStore(torch.cat(chosen), torch.cat(rejected))
    if topk:
        n = torch.cat(counts)
        store.topk_ids = torch.cat(ids_l)  # int32: 8 bytes per (id, log-prob) entry
        store.topk_logps = torch.cat(logq_l)
        store.rest_logps = torch.cat(rest_l)
        store.offsets = torch.cat([torch.zeros(1, dtype=torch.long), n.cumsum(0)])
    return store


# --------------------------------------------------------------------------------------------------
# The core computation shared by training and evaluation
# --------------------------------------------------------------------------------------------------


def dpo_batch(policy, batch: dict[str, torch.Tensor], *, beta: float, kl_coef: float = 0.0, kl_topk: int = 0,
              sft_coef: float = 0.0, length_norm: bool = False, ref_model=None, ref: dict | None = None,
              want_kl: bool = True, ref_autocast=None):
    """Policy (and, if needed, reference) forward on a collated batch -> (DPOOutput, metrics, policy output).

    Reference values come from ``ref`` (a :meth:`RefStore.lookup` result) when given, else from the live
    ``ref_model``; the exact KL always needs ``ref_model`` (on the chosen half only when ``ref`` is given).
    """
    ids, tgt, att = _cat_pairs(batch)
    B = batch["chosen_input_ids"].size(0)
    out = policy(ids, attention_mask=att)
    logits = out.logits
    tok = token_logprobs(logits, tgt)
    mask = tgt != IGNORE_INDEX
    sums, lengths = tok.sum(-1), mask.sum(-1)
    pc, pr, lc, lr = sums[:B], sums[B:], lengths[:B], lengths[B:]
    chosen_mask = mask[:B]

    need_kl = kl_coef > 0 or want_kl
    ref_logits_c = None
    topk = None
    if ref is not None:
        rc, rr = ref["chosen"], ref["rejected"]
        topk = ref.get("topk") if kl_topk else None
        if need_kl and kl_topk == 0 and ref_model is not None:
            with torch.no_grad(), ref_autocast() if ref_autocast is not None else nullcontext():
                ref_logits_c = ref_model(batch["chosen_input_ids"],
                                         attention_mask=batch["chosen_attention_mask"]).logits
    elif ref_model is not None:
        with torch.no_grad(), ref_autocast() if ref_autocast is not None else nullcontext():
            ref_logits = ref_model(ids, attention_mask=att).logits
        rs = answer_logps(ref_logits, tgt)[0]
        rc, rr = rs[:B], rs[B:]
        ref_logits_c = ref_logits[:B]
        if kl_topk and need_kl:
            topk = reference_topk(ref_logits_c[chosen_mask], kl_topk)
    else:
        raise ValueError("dpo_batch needs a reference: precomputed values or a reference model")

    kl = None
    if need_kl and (topk is not None or ref_logits_c is not None):
        pol_ans = logits[:B][chosen_mask]
        per_tok = (token_kl(pol_ans, topk=topk) if topk is not None
                   else token_kl(pol_ans, ref_logits_c[chosen_mask]))
        # mean over each pair's chosen-answer tokens
        owner = torch.arange(B, device=per_tok.device).repeat_interleave(chosen_mask.sum(-1))
        kl = torch.zeros(B, device=per_tok.device, dtype=per_tok.dtype).index_add_(0, owner, per_tok)
        kl = kl / lc.clamp(min=1).to(kl.dtype)
    if kl_coef > 0 and kl is None:
        raise ValueError("kl_coef > 0 needs the reference model or precomputed top-k reference values")
    sft_nll = -pc / lc.clamp(min=1).to(pc.dtype)
    res = dpo_loss(pc, pr, rc.to(pc.dtype), rr.to(pr.dtype), beta=beta, chosen_lengths=lc, rejected_lengths=lr,
                   length_norm=length_norm, kl=kl, kl_coef=kl_coef, sft_nll=sft_nll, sft_coef=sft_coef)
    metrics = pair_metrics(res, pc, pr, kl=kl, sft_nll=sft_nll)
    return res, metrics, out


def default_path(*candidates) -> str | None:
    for c in candidates:
        if c and Path(c).exists():
            return str(c)
    return str(candidates[0]) if candidates else None


# --------------------------------------------------------------------------------------------------
# Forgetting probe
# --------------------------------------------------------------------------------------------------


def build_probe_datasets(args, tokenizer) -> dict[str, torch.utils.data.Dataset]:
    """Held-out pretraining text and SFT answers for the forgetting probe (missing files are skipped
    with a note; a path given explicitly must exist)."""
    from dataset.datasets import PretrainDataset, SFTDataset, TextWindows

    out = {}
    n = args.probe_samples
    pre = args.probe_pretrain_path
    if pre:
        p = Path(pre)
        if p.suffix == ".bin" and p.is_file():
            ds = PretrainDataset(p, args.max_seq_len, tokenizer)
            out["pretrain"] = torch.utils.data.Subset(ds, range(min(n, len(ds))))
        elif p.is_file():
            # the first window of each document (dataset.datasets: the one text-window definition)
            out["pretrain"] = TextWindows(p, tokenizer, args.max_seq_len, first_only=True, limit=n, on_error="skip")
        elif args.probe_pretrain_path_explicit:
            raise FileNotFoundError(f"--probe_pretrain_path {pre} not found")
    sft = args.probe_sft_path
    if sft:
        if Path(sft).is_file():
            out["sft"] = SFTDataset(sft, tokenizer, args.max_seq_len, on_error="skip", limit=n, seed=0)
        elif args.probe_sft_path_explicit:
            raise FileNotFoundError(f"--probe_sft_path {sft} not found")
    return out


@torch.no_grad()
def probe_loss_sum(model, dataset, collate, *, batch_size: int, device, autocast=None) -> tuple[float, int]:
    """(summed cross-entropy, number of target tokens) of ``model`` on ``dataset``."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            ids = batch["input_ids"].to(device)
            tgt = batch["targets"].to(device)
            att = batch["attention_mask"].to(device)
            with autocast() if autocast is not None else nullcontext():
                logits = model(ids, attention_mask=att).logits
            s, n = nll_sum(logits, tgt)
            total += float(s)
            count += int(n)
    finally:
        model.train(was_training)
    return total, count


# --------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------

TRAIN_STORE, EVAL_STORE0 = 0, 1
# every metric a pair batch yields when the KL is computable (the layout of the eval all-reduce)
EVAL_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/ties", "rewards/margins",
             "logps/chosen", "logps/rejected", "loss/dpo", "reward_accuracy", "logp_accuracy", "kl", "loss/sft")


class DPOTask(Task):
    """DPO stage for the shared trainer (see the module docstring)."""

    name = "dpo"
    #: ``--init_from`` defaults to the latest checkpoint of ``<out_dir>/sft_<model tag>``, else of
    #: ``out/sft_<model tag>`` (where 5.full_sft.py writes by default); none found is an error
    init_from_stage = "sft"
    init_from_root = "out"
    # the original 9.train_dpo.py defaults: batch 16, beta 0.2, kl 0.05, grad_clip 1.0
    defaults = {"batch_size": 16, "learning_rate": 1e-5, "accumulation_steps": 1, "epochs": 1,
                "out_dir": "out_dpo", "grad_clip": 1.0, "warmup_ratio": 0.06, "eval_interval": 100, "log_interval": 10,
                "probe_samples": 256, "probe_sft_path": "data/embedded/sft_validation.jsonl"}
    cpu_defaults = {"batch_size": 8, "max_seq_len": 256, "learning_rate": 1e-4, "max_steps": 40, "num_workers": 0,
                    "log_interval": 5, "save_interval": 100, "eval_interval": 20, "eval_batches": 0,
                    "probe_samples": 32}

    def __init__(self):
        self.args = None
        self.ref_model = None
        self.stores: dict[int, RefStore] = {}
        self.probes: dict[str, torch.utils.data.Dataset] = {}
        self.initial_metrics: dict[str, float] = {}

    # ---------------------------------------------------------------- flags
    @staticmethod
    def add_args(parser) -> None:
        g = parser
        g.add_argument("--pairs_path", default=None,
                       help="training preference pairs, JSONL (canonical or the original q/history/pos/neg); "
                            "--data_path is an alias [./dataset/dpo_pairs.jsonl]")
        g.add_argument("--eval_pairs_path", default=None,
                       help="held-out pairs: reward accuracy at step 0 and every --eval_interval (logged as pairs/...)")
        from dataset.datasets import add_data_args

        add_data_args(g)  # --on_error, --cache_dir, --data_workers
        g.add_argument("--beta", type=float, default=0.2, help="DPO beta (temperature of the implicit reward)")
        g.add_argument("--kl_coef", type=float, default=0.05,
                       help="weight of the token-mean KL(policy || reference) on the chosen answers (0: off)")
        g.add_argument("--kl_topk", type=int, default=0,
                       help="0: exact full-vocabulary KL; K>0: KL over {reference top-K} + {rest} (a lower bound; "
                            "lets --precompute_ref free the reference model)")
        g.add_argument("--sft_coef", type=float, default=0.0,
                       help="weight of the policy's mean NLL on the chosen answer only (0: off)")
        g.add_argument("--length_norm", action="store_true",
                       help="DPO term on mean instead of summed answer log-probabilities (the original's "
                            "normalisation; needs a larger --beta)")
        g.add_argument("--precompute_ref", action="store_true",
                       help="compute the reference log-probabilities once before training and free the reference "
                            "model (it is kept only for the exact KL: --kl_coef > 0 with --kl_topk 0)")
        g.add_argument("--ref_batch_size", type=int, default=None,
                       help="batch size of the reference precomputation and of the probes [--batch_size]")
        g.add_argument("--probe_pretrain_path", default=None,
                       help="held-out pretraining text for the forgetting probe: .bin or {\"text\"} JSONL "
                            "[data/pretrain/pretrain_validation.bin, else data/embedded/pretrain_validation.jsonl]")
        g.add_argument("--probe_sft_path", default=None,
                       help="held-out SFT conversations for the forgetting probe [data/embedded/sft_validation.jsonl]")
        g.add_argument("--probe_samples", type=int, default=None,
                       help="sequences per probe set (pretraining windows / SFT conversations; 0: no probe) "
                            "[256; CPU: 32]")

    # ---------------------------------------------------------------- data
    def resolve_args(self, args, on_cpu: bool) -> None:
        """Derived defaults (called by ``trainer.args.fill_defaults``, before anything reads them)."""
        args.probe_pretrain_path_explicit = args.probe_pretrain_path is not None
        args.probe_sft_path_explicit = "probe_sft_path" not in getattr(args, "defaulted", ())
        if args.probe_pretrain_path is None:
            args.probe_pretrain_path = default_path("data/pretrain/pretrain_validation.bin",
                                                    "data/embedded/pretrain_validation.jsonl")
        if args.pairs_path is None:
            args.pairs_path = args.data_path or "./dataset/dpo_pairs.jsonl"
        if args.kl_topk < 0:
            raise ValueError("--kl_topk must be >= 0")

    def build_datasets(self, args, tokenizer):
        from dataset.datasets import PreferenceDataset, training_dataset

        self.args = args
        if not Path(args.pairs_path).is_file():
            raise FileNotFoundError(f"preference pairs {args.pairs_path} not found: generate them with "
                                    "7.gen_prefs_openai.py, or pass --pairs_path")
        train = training_dataset(PreferenceDataset, args.pairs_path, tokenizer, args, what="preference pairs")
        if len(train) == 0:
            raise ValueError(f"{args.pairs_path}: no usable preference pairs")
        evals = {}
        if args.eval_pairs_path:
            ev = training_dataset(PreferenceDataset, args.eval_pairs_path, tokenizer, args,
                                  what="held-out preference pairs")
            evals["pairs"] = IndexedPairs(ev, EVAL_STORE0)
        self.probes = build_probe_datasets(args, tokenizer) if args.probe_samples > 0 else {}
        self._tokenizer = tokenizer
        return IndexedPairs(train, TRAIN_STORE), evals

    def collate_fn(self, tokenizer):
        from dataset.collate import preference_collate
        from dataset.datasets import pad_token_id

        pad = preference_collate(pad_token_id(tokenizer))

        def collate(items):
            batch = pad(items)
            # both halves as the trainer's token counter sees them ([2B, T]; the loss never reads it)
            batch["attention_mask"] = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
            return batch

        return collate

    def count_units(self, batch) -> int:
        return int(batch["chosen_input_ids"].size(0))

    # ---------------------------------------------------------------- loss
    def _ref_for(self, batch) -> dict | None:
        if "ref_key" not in batch:
            return None
        key = batch["ref_key"]
        store = self.stores.get(int(key[0, 0]))
        if store is None:
            return None
        return store.lookup(key[:, 1], batch["chosen_input_ids"].device)

    def _dpo(self, model, batch):
        a = self.args
        return dpo_batch(model, batch, beta=a.beta, kl_coef=a.kl_coef, kl_topk=a.kl_topk, sft_coef=a.sft_coef,
                         length_norm=a.length_norm, ref_model=self.ref_model, ref=self._ref_for(batch),
                         want_kl=True)

    def compute_loss(self, model, batch) -> Loss:
        res, metrics, out = self._dpo(model, batch)  # one policy forward: chosen and rejected as [2B, T]
        return Loss(res.losses.sum(), batch["chosen_input_ids"].size(0), metrics,
                    aux=out.aux_loss if model.training else None)

    def kl_available(self) -> bool:
        """Whether the KL can be computed (exactly with a reference model, or from precomputed top-k)."""
        return self.ref_model is not None or (self.args.kl_topk > 0 and all(s.has_topk for s in self.stores.values())
                                              and bool(self.stores))

    def evaluate(self, model, eval_batches_iter) -> dict[str, float]:
        """Held-out pairs: loss and the pair metrics as means over pairs, reduced over all ranks."""
        from . import distributed as dist_utils

        keys = ["loss", "count", *EVAL_KEYS]
        total = torch.zeros(len(keys), dtype=torch.float64)
        for batch in eval_batches_iter:
            with torch.no_grad():
                res, metrics, _ = self._dpo(model, batch)
            vals = {"loss": res.losses.sum(), "count": batch["chosen_input_ids"].size(0), **metrics}
            total += torch.tensor([float(vals.get(k, 0.0)) for k in keys], dtype=torch.float64)
        total = dist_utils.all_reduce_sum(total)
        n = float(total[1])
        drop = {"count"} | (set() if self.kl_available() else {"kl"})
        return {k: float(total[i]) / n if n else float("nan") for i, k in enumerate(keys) if k not in drop}

    # ---------------------------------------------------------------- hooks
    def load_reference(self, trainer):
        """A frozen copy of the SFT model (``trainer.init_from``), on the trainer's device."""
        from model import MateConvForCausalLM

        from . import checkpoint as ckpt_lib

        if trainer.init_from is None:
            raise ValueError("DPO needs a starting checkpoint: --init_from the SFT checkpoint or run dir "
                             "(policy and reference both start from it)")
        ref = MateConvForCausalLM(trainer.config)
        ckpt_lib.load_model_weights(ref, trainer.init_from)
        ref.to(trainer.device).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    def on_train_start(self, trainer) -> None:
        import time

        from . import distributed as dist_utils

        a = trainer.args
        ref = self.load_reference(trainer)
        # the held-out pairs are fixed: their reference values are always computed once; the training
        # pairs only with --precompute_ref (else the reference runs live beside the policy)
        t0 = time.time()
        bs = a.ref_batch_size or a.batch_size
        datasets = {ds.store_id: ds for ds in trainer.eval_datasets.values() if isinstance(ds, IndexedPairs)}
        if a.precompute_ref:
            datasets[TRAIN_STORE] = trainer.train_dataset
        for sid, ds in datasets.items():
            self.stores[sid] = precompute_reference(ref, ds, trainer.collate, batch_size=bs, device=trainer.device,
                                                    topk=a.kl_topk, autocast=trainer.autocast)
        keep = not a.precompute_ref or (a.kl_coef > 0 and a.kl_topk == 0)
        if datasets:
            trainer.log(f"dpo: reference log-probabilities of {sum(len(d) for d in datasets.values())} pairs "
                        f"({'train + ' if a.precompute_ref else ''}held-out) precomputed in {time.time() - t0:.1f}s"
                        + (f" on {dist_utils.world_size()} processes" if dist_utils.world_size() > 1 else "")
                        + (f" (+ top-{a.kl_topk} reference distribution per chosen token)" if a.kl_topk else ""))
        if a.precompute_ref:
            trainer.log("dpo: reference model " + ("kept for the exact KL (--kl_topk K frees it)" if keep
                                                   else "freed"))
        self.ref_model = ref if keep else None
        del ref
        trainer.log(f"dpo: beta {a.beta}, kl_coef {a.kl_coef} (KL(policy||reference) on chosen answers, "
                    f"{'exact' if a.kl_topk == 0 else f'top-{a.kl_topk} coarse-grained'}), sft_coef {a.sft_coef}, "
                    f"length_norm {a.length_norm}, reference {'precomputed' if a.precompute_ref else 'live'} "
                    f"from {trainer.init_from}; probes {sorted(self.probes) or 'none'}")
        if trainer.step == 0 and (trainer.eval_datasets or self.probes):
            t0 = time.time()
            res = trainer.evaluate()
            self.initial_metrics = res
            trainer.record(res)
            trainer.log("eval step 0 (before DPO): " + " ".join(f"{k} {v:.4f}" for k, v in res.items())
                        + f" ({time.time() - t0:.1f}s)")

    def extra_eval(self, trainer) -> dict[str, float]:
        """Forgetting probe: token-mean loss on held-out pretraining text and SFT answers (all ranks)."""
        from dataset.collate import pad_collate
        from dataset.datasets import pad_token_id

        from . import distributed as dist_utils

        if not self.probes:
            return {}
        collate = pad_collate(pad_token_id(trainer.tokenizer))
        bs = self.args.ref_batch_size or self.args.batch_size
        rank, world = trainer.dist.rank, trainer.dist.world_size
        names = sorted(self.probes)
        total = torch.zeros(2 * len(names), dtype=torch.float64)
        for i, name in enumerate(names):
            ds = self.probes[name]
            shard = torch.utils.data.Subset(ds, list(range(rank, len(ds), world)))
            if len(shard):
                s, n = probe_loss_sum(trainer.train_model, shard, collate, batch_size=bs, device=trainer.device,
                                      autocast=trainer.autocast)
                total[2 * i], total[2 * i + 1] = s, n
        total = dist_utils.all_reduce_sum(total)
        return {f"probe/{name}_loss": float(total[2 * i] / total[2 * i + 1]) if total[2 * i + 1] > 0 else float("nan")
                for i, name in enumerate(names)}
