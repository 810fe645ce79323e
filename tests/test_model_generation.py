"""Generation: cached == uncached == transformers generate; left padding; stopping; sampling; streaming."""


import pytest
import torch

from model import MateConvConfig, MateConvForCausalLM
from model.generation import StaticKVCache, generate, sample_next, stream_generate, stream_text
from tokenizer import ORIGINAL_TOKENIZER_FIXTURE

DENSE = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, max_position_embeddings=256)
MOE = dict(DENSE, use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
           moe_intermediate_size=32)
FIXTURE_TOKENIZER = ORIGINAL_TOKENIZER_FIXTURE



def make(cfg, seed=0):
    torch.manual_seed(seed)
    m = MateConvForCausalLM(MateConvConfig(**cfg)).eval()
    with torch.no_grad():  # larger weights than the init so greedy paths are varied, not one repeated token
        for n, p in m.named_parameters():
            if "norm" not in n:
                p.normal_(0.0, 0.2)
    return m


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
def test_cached_uncached_and_transformers_generate_agree(cfg):
    m = make(cfg)
    x = torch.randint(4, 512, (1, 9))
    cached = generate(m, x, max_new_tokens=40, do_sample=False, eos_token_id=[])
    uncached = generate(m, x, max_new_tokens=40, do_sample=False, eos_token_id=[], use_cache=False)
    hf = m.generate(x, max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=3)
    assert cached.shape == (1, 49)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, hf)
    assert len(set(cached[0, 9:].tolist())) > 3  # not a degenerate constant stream


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
def test_left_padded_batch_equals_each_prompt_alone(cfg):
    m = make(cfg)
    a, b = torch.randint(4, 512, (12,)), torch.randint(4, 512, (5,))
    batch = torch.full((2, 12), 3)
    batch[0], batch[1, 7:] = a, b
    mask = (batch != 3).long()
    mask[0] = 1
    out = generate(m, batch, mask, max_new_tokens=20, do_sample=False, eos_token_id=[])
    assert torch.equal(out[0], generate(m, a, max_new_tokens=20, do_sample=False, eos_token_id=[])[0])
    assert torch.equal(out[1, 7:], generate(m, b, max_new_tokens=20, do_sample=False, eos_token_id=[])[0])
    hf = m.generate(batch, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=3)
    assert torch.equal(out, hf)
    assert torch.equal(out, generate(m, batch, mask, max_new_tokens=20, do_sample=False, eos_token_id=[],
                                     use_cache=False))


def test_stops_on_end_token_and_counts_only_new_tokens():
    m = make(DENSE)
    x = torch.randint(4, 512, (1, 30))
    free = generate(m, x, max_new_tokens=25, do_sample=False, eos_token_id=[])
    assert free.shape[1] == 30 + 25  # max_new_tokens counts new tokens, not the prompt
    new = free[0, 30:].tolist()
    stop_at = next(i for i in range(3, 25) if new[i] not in new[:i])
    eos = new[stop_at]
    out = generate(m, x, max_new_tokens=25, do_sample=False, eos_token_id=eos)
    assert out[0, 30:].tolist() == new[: stop_at + 1]  # ends with the end token, nothing after it
    # in a batch, a finished row is padded while the other continues
    batch = torch.cat([x, torch.randint(4, 512, (1, 30))])
    out = generate(m, batch, max_new_tokens=25, do_sample=False, eos_token_id=eos, pad_token_id=0)
    row = out[0, 30:].tolist()
    assert row[: stop_at + 1] == new[: stop_at + 1]
    assert set(row[stop_at + 1 :]) <= {0}


def test_default_end_token_is_the_config_eos():
    m = make(DENSE)
    x = torch.randint(4, 512, (1, 6))
    with torch.no_grad():
        m.lm_head.weight[2] += 100.0 * m.model.norm.weight.sign()  # make </s> (id 2) the argmax everywhere
    out = generate(m, x, max_new_tokens=10, do_sample=False)
    assert out[0, 6:].tolist() == [2]


def test_sampling_controls():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    assert torch.equal(sample_next(logits, top_k=1), logits.argmax(-1))
    assert torch.equal(sample_next(logits, top_p=1e-6), logits.argmax(-1))
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1))
    top5 = logits.topk(5, -1).indices
    for _ in range(20):
        s = sample_next(logits, top_k=5)
        assert (top5 == s[:, None]).any(-1).all()
    seen = torch.zeros(4, 50, dtype=torch.bool)
    seen[torch.arange(4), logits.argmax(-1)] = True
    assert not torch.equal(sample_next(logits, seen, repetition_penalty=1e6, do_sample=False), logits.argmax(-1))
    m = make(DENSE)
    x = torch.randint(4, 512, (1, 5))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = generate(m, x, max_new_tokens=15, temperature=0.9, top_p=0.9, top_k=40, repetition_penalty=1.1, generator=g1)
    b = generate(m, x, max_new_tokens=15, temperature=0.9, top_p=0.9, top_k=40, repetition_penalty=1.1, generator=g2)
    assert torch.equal(a, b) and a.shape == (1, 20)


def test_stream_yields_the_same_tokens_and_cache_bounds():
    m = make(MOE)
    x = torch.randint(4, 512, (1, 7))
    toks = [int(t[0]) for t in stream_generate(m, x, max_new_tokens=12, do_sample=False, eos_token_id=[])]
    assert toks == generate(m, x, max_new_tokens=12, do_sample=False, eos_token_id=[])[0, 7:].tolist()
    cache = StaticKVCache(m.config, 1, 4)
    with pytest.raises(ValueError, match="full"):
        m(torch.randint(0, 512, (1, 5)), cache=cache)
    assert m.training is False


def test_stream_text_with_a_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(FIXTURE_TOKENIZER)
    m = make(dict(DENSE, vocab_size=len(tok)))
    pieces = list(stream_text(m, tok, "你好", max_new_tokens=20, do_sample=False))
    ids = generate(m, torch.tensor([tok("你好", add_special_tokens=False)["input_ids"]]), max_new_tokens=20,
                   do_sample=False, eos_token_id=tok.eos_token_id)
    new = [i for i in ids[0, len(tok("你好", add_special_tokens=False)["input_ids"]):].tolist() if i != tok.eos_token_id]
    assert "".join(pieces) == tok.decode(new, skip_special_tokens=True).rstrip("\ufffd")


def test_decode_per_row_settings_streams_callback_and_cancel():
    import threading

    from model.generation import Sampling, decode, make_generator

    m = make(DENSE)
    prompts = [torch.randint(4, 512, (n,)).tolist() for n in (9, 4, 6)]
    greedy_alone = [decode(m, [p], 12, eos_token_ids=[])[0][0] for p in prompts]
    # per-row max_new_tokens and greedy rows batched with sampled rows: greedy rows are unchanged
    g = make_generator(5)
    ids, reasons = decode(m, prompts, [12, 3, 12], [Sampling(), Sampling(), Sampling(0.9, 0.9, g)], eos_token_ids=[])
    assert ids[0] == greedy_alone[0] and ids[1] == greedy_alone[1][:3]
    assert reasons == ["length", "length", "length"] and len(ids[2]) == 12
    # the sampled row draws the same numbers alone (its own generator)
    alone = decode(m, [prompts[2]], 12, Sampling(0.9, 0.9, make_generator(5)), eos_token_ids=[])[0][0]
    assert alone == ids[2]
    # the callback stops a row (reason "stop"); the other row goes on
    got: list = []

    def on_token(row, tok):
        if row == 0:
            got.append(tok)
            return len(got) == 2
        return False

    ids, reasons = decode(m, prompts[:2], 12, eos_token_ids=[], on_token=on_token)
    assert reasons == ["stop", "length"] and ids[0] == got == greedy_alone[0][:2] and ids[1] == greedy_alone[1]
    # a set cancel event stops the rows it belongs to
    ev = threading.Event()
    ev.set()
    ids, reasons = decode(m, prompts[:2], 12, eos_token_ids=[], cancel=[ev, None])
    assert reasons == ["cancelled", "length"] and ids[0] == [] and ids[1] == greedy_alone[1]
    with pytest.raises(ValueError, match="seed"):
        make_generator(2**64)
    with pytest.raises(ValueError, match="seed"):
        make_generator(-(2**63) - 1)


def test_native_export_decodes_through_the_same_loop():
    from model.export import to_native
    from model.generation import decode

    m = make(DENSE)
    native = to_native(m).eval()
    prompts = [torch.randint(4, 512, (n,)).tolist() for n in (7, 3)]
    ours, _ = decode(m, prompts, 15, eos_token_ids=[])
    theirs, _ = decode(native, prompts, 15, eos_token_ids=[])
    assert ours == theirs


def test_text_stream_emits_only_complete_characters_and_equals_the_full_decode():
    from model.generation import TextStream
    from tokenizer import load_tokenizer
    from tokenizer.fast_encode import bytes_to_unicode

    text = "春眠不觉晓，处处闻啼鸟。 Hello world — 夜来风雨声\n花落知多少 🌸"
    for path in (None, FIXTURE_TOKENIZER):
        tok = load_tokenizer(path)
        byte_char = bytes_to_unicode()
        # one token per byte: every multi-byte character arrives in pieces
        byte_ids = [tok.convert_tokens_to_ids(byte_char[b]) for b in text.encode("utf-8")]
        for ids in (tok(text, add_special_tokens=False)["input_ids"], byte_ids):
            ts = TextStream(tok)
            deltas = [ts.add(t)[0] for t in ids]
            deltas.append(ts.finish())
            assert all("\ufffd" not in d for d in deltas)
            assert "".join(deltas) == ts.text == tok.decode(ids, skip_special_tokens=True) == text
        # an unfinished character at the end is not text; a stop string split across tokens is found
        ts = TextStream(tok, stop=["闻啼"])
        out = []
        for t in byte_ids:
            d, hit = ts.add(t)
            out.append(d)
            if hit:
                break
        out.append(ts.finish())
        assert "".join(out) == "春眠不觉晓，处处"
        ts = TextStream(tok)
        out = [ts.add(t)[0] for t in byte_ids[:-2]] + [ts.finish()]
        assert "".join(out) == text[:-1]  # the last two bytes of the 4-byte emoji are missing


def test_stream_text_is_the_same_loop_as_requests():
    from model.generation import Request, generate_requests
    from tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    m = make(dict(DENSE, vocab_size=len(tok)))
    ids = [tok.bos_token_id] + tok("user\n你好", add_special_tokens=False)["input_ids"]
    got = "".join(stream_text(m, tok, ids, max_new_tokens=16, temperature=0.8, top_p=0.9, seed=3))
    want = generate_requests(m, tok, [Request([ids], max_tokens=16, temperature=0.8, top_p=0.9, seed=3)])
    assert got == want[0][0][0].text and len(want[0][0][0].token_ids) > 3
    stop = want[0][0][0].text[2:4]
    assert len(stop) == 2
    cut = "".join(stream_text(m, tok, ids, max_new_tokens=16, temperature=0.8, top_p=0.9, seed=3, stop=[stop]))
    assert cut == want[0][0][0].text[:want[0][0][0].text.find(stop)]
