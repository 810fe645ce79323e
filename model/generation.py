"""Fast incremental decoding with a preallocated KV cache, and a streaming generator.

    from model.generation import generate, stream_generate, stream_text
    ids = generate(model, input_ids, attention_mask, max_new_tokens=64, temperature=0.7, top_p=0.9)
    for tok in stream_generate(model, input_ids, max_new_tokens=64): ...   # tok: LongTensor [B]

* The cache is preallocated once (``StaticKVCache``: [layers, B, kv_heads, prompt + new, head_dim]) and
  written in place; each step runs the model on one token per sequence.
* ``max_new_tokens`` counts new tokens only; a sequence stops at the end token (``eos_token_id``, by
  default the model's / tokenizer's ``</s>``) and is padded with ``pad_token_id`` afterwards.
* Batched prompts are left-padded (``attention_mask`` marks real tokens); positions count real tokens,
  so a padded prompt decodes exactly like the same prompt alone.
* ``use_cache=False`` recomputes the whole sequence at every step (the reference the cache must match).

``model.generate(...)`` (transformers' GenerationMixin with its ``DynamicCache``) works too; this loop is
the fast path: no per-step ``GenerationConfig``/logits-processor machinery.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .modeling_mateconv import build_attention_mask, rope_cos_sin


class StaticKVCache:
    """Preallocated KV cache with the transformers ``Cache`` calls the model uses (``update``, ``get_seq_length``)."""

    def __init__(self, config, batch_size: int, max_len: int, dtype=torch.float32, device="cpu"):
        hd = config.hidden_size // config.num_attention_heads
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, hd)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.n_layers = config.num_hidden_layers
        self.max_len = max_len
        self.pos = 0  # tokens already stored (all layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.pos

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        T = k.shape[2]
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"StaticKVCache is full ({self.max_len} positions)")
        self.k[layer_idx, :, :, self.pos : end] = k
        self.v[layer_idx, :, :, self.pos : end] = v
        if layer_idx == self.n_layers - 1:
            self.pos = end
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]


def _resolve_ids(model, eos_token_id, pad_token_id):
    cfg = model.config
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = pad_token_id if pad_token_id is not None else cfg.pad_token_id
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    return eos_ids, pad


def sample_next(
    logits: torch.Tensor,
    seen: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    do_sample: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token [B] from logits [B, V] (fp32). ``seen`` [B, V] bool marks tokens for the repetition penalty."""
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:  # CTRL / transformers convention
        pen = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, pen, logits)
    if not do_sample or temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        sorted_p = sorted_logits.softmax(-1)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    # inverse-CDF draw: one uniform number per row (cheaper on CPU than torch.multinomial); masked tokens
    # have probability 0, so the search never lands on them
    cum = logits.softmax(-1).cumsum(-1)
    u = (1.0 - torch.rand((cum.shape[0], 1), generator=generator, device=cum.device)) * cum[:, -1:]
    return torch.searchsorted(cum, u).squeeze(-1).clamp_(max=cum.shape[-1] - 1)


@torch.inference_mode()
def stream_generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    do_sample: bool | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence ([B] long tensor) until all ended or ``max_new_tokens``.

    Sequences that already produced the end token yield ``pad_token_id``. ``do_sample`` defaults to
    ``temperature > 0``; greedy decoding when False.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    device = input_ids.device
    B, P = input_ids.shape
    eos_ids, pad = _resolve_ids(model, eos_token_id, pad_token_id)
    do_sample = (temperature > 0) if do_sample is None else do_sample
    if attention_mask is None:
        attention_mask = torch.ones(B, P, dtype=torch.long, device=device)
    attention_mask = attention_mask.long()
    padded = not bool(attention_mask.all())
    eos_t = torch.tensor(eos_ids, device=device, dtype=torch.long)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    seen = None
    V = model.config.vocab_size
    if repetition_penalty != 1.0:
        seen = torch.zeros(B, V, dtype=torch.bool, device=device)
        seen.scatter_(1, input_ids.clamp(0, V - 1), attention_mask.bool())
    was_training = model.training
    model.eval()
    core, head = model.model, model.lm_head
    try:
        if use_cache:
            dtype = next(model.parameters()).dtype
            cache = StaticKVCache(model.config, B, P + max_new_tokens, dtype=dtype, device=device)
            pos = (attention_mask.cumsum(-1) - 1).clamp_min(0)
            h, _ = core(input_ids, attention_mask if padded else None, pos, cache)
            next_pos = pos[:, -1:] + 1
            # RoPE cos/sin of every position this call can reach, computed once
            rope = rope_cos_sin(torch.arange(P + max_new_tokens, device=device), core.config.head_dim,
                                core.config.rope_theta)
        else:
            seq, mask = input_ids, attention_mask
            h, _ = core(seq, mask if padded else None, None, None)
        logits = head(h[:, -1])
        full_mask = attention_mask
        for step in range(max_new_tokens):
            tok = sample_next(logits, seen, temperature, top_k, top_p, repetition_penalty, do_sample, generator)
            tok = torch.where(finished, torch.full_like(tok, pad), tok)
            if seen is not None:
                seen.scatter_(1, tok[:, None], (~finished)[:, None])
            yield tok
            if eos_t.numel():
                finished |= torch.isin(tok, eos_t)
                if bool(finished.all()):
                    return
            if step == max_new_tokens - 1:
                return
            full_mask = torch.cat([full_mask, full_mask.new_ones(B, 1)], dim=1)
            if use_cache:
                am = full_mask if padded else None
                if am is not None:
                    am = build_attention_mask(am, 1, cache.pos)
                    h = _step(core, tok[:, None], next_pos, cache, am, rope)
                else:
                    h = _step(core, tok[:, None], next_pos, cache, None, rope)
                next_pos = next_pos + 1
                logits = head(h[:, -1])
            else:
                seq = torch.cat([seq, tok[:, None]], dim=1)
                h, _ = core(seq, full_mask if padded else None, None, None)
                logits = head(h[:, -1])
    finally:
        model.train(was_training)


def _step(core, tok, pos, cache, attn_mask, rope):
    """One decoding step through the layers with a prebuilt mask and RoPE table (no generic mask logic)."""
    x = core.embed_tokens(tok)
    cos, sin = rope[0][pos][:, :, None], rope[1][pos][:, :, None]
    for layer in core.layers:
        x, _ = layer(x, cos, sin, attn_mask, cache, None, with_aux=False)
    return core.norm(x)


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """Prompt + new tokens, [B, P + n_new] (sequences that ended early are padded with ``pad_token_id``).

    Keyword arguments as ``stream_generate``.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    new = list(stream_generate(model, input_ids, attention_mask, **kwargs))
    if not new:
        return input_ids
    return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)


def stream_text(model, tokenizer, prompt: str, **kwargs) -> Iterator[str]:
    """Stream the decoded text of one prompt, piece by piece (waits for complete UTF-8 characters)."""
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=device)
    kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    if tokenizer.pad_token_id is not None:
        kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    eos = kwargs["eos_token_id"]
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    out: list[int] = []
    emitted = ""
    for tok in stream_generate(model, ids, **kwargs):
        t = int(tok[0])
        if t in eos:
            break
        out.append(t)
        text = tokenizer.decode(out, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(emitted):
            yield text[len(emitted):]
            emitted = text
