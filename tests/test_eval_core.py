"""Perplexity by position, passkey prompts, token-exact haystacks and greedy decoding on tiny real models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from longctx.eval.fixtures import save_tiny_llama
from longctx.eval.generate import greedy_generate
from longctx.eval.haystack import Haystack, fill_with_needles, insert_at_depth
from longctx.eval.passkey import build_passkey_prompts, is_correct, score_passkey_rows
from longctx.eval.perplexity import bucket_ranges, perplexity_by_position, token_nll
from longctx.model.load import load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", hidden_size=32, num_layers=2)
    torch.set_num_threads(1)
    return load_causal_lm(path).eval(), load_tokenizer(path), path


def test_token_nll_matches_hf_loss(tiny):
    model, _, _ = tiny
    ids = torch.randint(0, 2000, (2, 70), generator=torch.Generator().manual_seed(0))
    nll = token_nll(model, ids, logits_chunk=16)  # chunked head must equal the full forward
    assert nll.shape == (2, 70) and torch.all(nll[:, 0] == 0)
    with torch.no_grad():
        ref = model(input_ids=ids, labels=ids, use_cache=False).loss.item()
    assert nll[:, 1:].mean().item() == pytest.approx(ref, rel=1e-5)


def test_bucket_ranges_cover_context():
    assert bucket_ranges([0, 256, 512, 1024], 1024) == [(0, 256), (256, 512), (512, 1024)]
    assert bucket_ranges([256, 512], 1024) == [(0, 256), (256, 512), (512, 1024)]
    assert bucket_ranges([0, 256, 4096], 300) == [(0, 256), (256, 300)]


def test_perplexity_by_position_counts_and_skips(tiny):
    model, tok, _ = tiny
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "x", "y", "(", ")", "=", "+"]
    long_texts = [" ".join(rng.choice(words, 400)) for _ in range(3)]
    texts = [long_texts[0], "too short", long_texts[1], long_texts[2]]
    res = perplexity_by_position(model, tok, texts, 128, [0, 32, 64], batch_size=2, base_context_length=64)
    assert res["documents"] == 3 and res["skipped_short"] == 1
    assert res["buckets"] == [[0, 32], [32, 64], [64, 128]]
    assert res["tokens"] == [3 * 31, 3 * 32, 3 * 64]  # position 0 predicts nothing
    # the bucket means recombine to the overall mean, and the same docs scored in one batch agree
    total = sum(m * c for m, c in zip(res["mean_nll"], res["tokens"])) / sum(res["tokens"])
    assert total == pytest.approx(res["overall_nll"], rel=1e-9)
    assert res["nll_beyond_base"] == pytest.approx(res["mean_nll"][2], rel=1e-9)
    assert res["perplexity"][0] == pytest.approx(math.exp(res["mean_nll"][0]))
    ids = torch.tensor([tok(t)["input_ids"][:128] for t in long_texts])
    direct = token_nll(model, ids)[:, 64:].mean().item()
    assert res["mean_nll"][2] == pytest.approx(direct, rel=1e-5)


def test_haystack_fill_is_exact_and_needle_sits_at_depth(tiny):
    _, tok, _ = tiny
    hay = Haystack.from_sentences(tok, ["The grass is green.", "The sky is blue.", "Here we go."])
    ids, bounds = hay.fill(500)
    assert len(ids) == 500 and bounds[0] == 0
    longest = max(len(s) for s in hay.sentence_ids)
    needle = tok(" The secret is 42.", add_special_tokens=False)["input_ids"]
    for depth in (0.0, 0.25, 0.5, 0.9, 1.0):
        out, at = insert_at_depth(ids, bounds, needle, depth)
        assert out[at : at + len(needle)] == needle and len(out) == 500 + len(needle)
        assert 0 <= depth * 500 - at < longest + 1  # at the sentence boundary just before the depth
        full, (start,) = fill_with_needles(hay, 300, [needle], [depth])
        assert len(full) == 300 and full[start : start + len(needle)] == needle
        assert -0.5 <= depth * (300 - len(needle)) - start < longest  # depth is a fraction of the filler
    # multi-needle: order by depth, each at its depth of the whole sequence
    n2 = tok(" The code is 7.", add_special_tokens=False)["input_ids"]
    full, starts = fill_with_needles(hay, 400, [n2, needle], [0.8, 0.2])
    assert full[starts[0] : starts[0] + len(n2)] == n2 and full[starts[1] : starts[1] + len(needle)] == needle
    filler = 400 - len(n2) - len(needle)
    assert -0.5 <= 0.2 * filler - starts[1] < longest
    assert -0.5 <= 0.8 * filler - (starts[0] - len(needle)) < longest  # the shallower needle sits before it


def test_passkey_prompts_have_exact_length_and_key(tiny):
    _, tok, _ = tiny
    prompts = build_passkey_prompts(tok, [128, 256], [0.1, 0.9], trials=2, seed=3)
    assert len(prompts) == 8
    for p in prompts:
        assert len(p.input_ids) == p.length
        text = tok.decode(p.input_ids)
        assert f"The pass key is {p.key}." in text and text.endswith("The pass key is")
        # depth is measured in tokens of the filler
        assert tok.decode(p.input_ids[p.needle_start :]).lstrip().startswith(f"The pass key is {p.key}")
    shallow = [p.needle_start for p in prompts if p.length == 256 and p.depth == 0.1]
    deep = [p.needle_start for p in prompts if p.length == 256 and p.depth == 0.9]
    assert max(shallow) < 80 < 180 < min(deep)
    assert build_passkey_prompts(tok, [128], [0.5], 2, seed=3)[0].key == build_passkey_prompts(tok, [128], [0.5], 2, seed=3)[0].key


def test_passkey_key_nll_is_the_teacher_forced_loss_of_the_key(tiny):
    from longctx.eval.passkey import key_nll, run_passkey_batch

    model, tok, _ = tiny
    prompts = build_passkey_prompts(tok, [128], [0.5], trials=2, seed=1)
    p = prompts[0]
    target = tok(" " + p.key, add_special_tokens=False)["input_ids"]
    nll = token_nll(model, torch.tensor([p.input_ids + target]))[0, len(p.input_ids):].mean().item()
    assert key_nll(model, tok, prompts)[0] == pytest.approx(nll, rel=1e-5)
    rows = run_passkey_batch(model, tok, prompts)
    assert [r["key"] for r in rows] == [q.key for q in prompts] and rows[0]["key_nll"] == pytest.approx(nll, rel=1e-5)


def test_passkey_scoring():
    assert is_correct(" 12345. Remember", "12345") and not is_correct(" 1234", "12345") and not is_correct("none", "1")
    rows = [{"length": 256, "depth": 0.1, "correct": True}, {"length": 256, "depth": 0.1, "correct": False},
            {"length": 512, "depth": 0.1, "correct": True}, {"length": 256, "depth": 0.5, "correct": True}]
    s = score_passkey_rows(rows)
    assert s["accuracy"]["256"] == {"0.1": 0.5, "0.5": 1.0}
    assert s["accuracy_by_length"] == {"256": pytest.approx(2 / 3), "512": 1.0} and s["overall"] == 0.75


def test_greedy_generate_with_chunked_prefill_matches_full_forward(tiny):
    model, _, _ = tiny
    prompt = torch.randint(0, 2000, (2, 50), generator=torch.Generator().manual_seed(1))
    a = greedy_generate(model, prompt, max_new_tokens=6, prefill_chunk=7)
    b = greedy_generate(model, prompt, max_new_tokens=6, prefill_chunk=1000)
    # reference: recompute the whole sequence without a cache at every step
    ref = []
    for row in prompt:
        seq = row.tolist()
        for _ in range(6):
            with torch.no_grad():
                seq.append(int(model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
        ref.append(seq[50:])
    assert a == b == ref


def test_dynamic_ntk_prefills_in_one_call(tmp_path):
    # dynamic NTK picks its RoPE base from the longest position of each call: chunked prefill would rotate early
    # keys with another base, so generation must match a full no-cache forward.
    from longctx.config import RopeScalingConfig
    from longctx.eval.runner import ModelSpec

    path = save_tiny_llama(tmp_path / "m", max_position_embeddings=32, initializer_range=0.5)
    model = ModelSpec(path, scaling=RopeScalingConfig(type="dynamic", factor=4)).load()
    prompt = torch.randint(0, 2000, (1, 100), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = int(model(input_ids=prompt, use_cache=False).logits[0, -1].argmax())
    assert greedy_generate(model, prompt, max_new_tokens=1, prefill_chunk=16) == [[expected]]


def test_shipped_base_extrapolates_badly_and_dynamic_ntk_helps():
    # The shipped tiny Llama was trained at 256 tokens: naive extrapolation to 1024 must get worse with
    # position, while dynamic NTK keeps late positions near the in-length level (measured: naive 3.67 -> 4.29,
    # NLL beyond 256: naive 4.02 vs dynamic NTK 3.60 on these 4 documents).
    from longctx.config import RopeScalingConfig
    from longctx.eval.documents import iter_texts
    from longctx.eval.runner import ModelSpec

    tok = load_tokenizer("builtin:tiny-llama")
    res = {}
    for name, scaling in (("naive", None), ("dynamic", RopeScalingConfig(type="dynamic", factor=4))):
        model = ModelSpec("builtin:tiny-llama", scaling=scaling).load()
        res[name] = perplexity_by_position(model, tok, iter_texts("builtin:corpus/heldout.jsonl.gz"), 1024,
                                           [0, 256, 768], batch_size=4, limit=4, base_context_length=256)
    naive, dyn = res["naive"], res["dynamic"]
    assert naive["mean_nll"][2] - naive["mean_nll"][0] > 0.3
    assert dyn["nll_beyond_base"] < naive["nll_beyond_base"] - 0.2
    assert abs(dyn["mean_nll"][0] - naive["mean_nll"][0]) < 0.3  # within the trained length both are close


def test_shipped_base_retrieves_at_its_own_length_with_either_template():
    # The shipped base had a retrieval phase (scripts/build_sample_assets.py, stage "retrieval") whose rows hold
    # neither passkey template's wording, filler or question form. Its build recorded passkey at 256 tokens with
    # the published template and with "locker"; both must be recomputable here and >= 90%.
    import json

    from longctx import storage
    from longctx.eval.passkey import run_passkey
    from longctx.eval.runner import ModelSpec

    recorded = json.loads((storage.assets_dir() / "build_info.json").read_text())["model"]["retrieval"]
    assert recorded["passkey_256"] >= 0.9 and recorded["alt_template_256"] >= 0.9, recorded
    tok = load_tokenizer("builtin:tiny-llama")
    model = ModelSpec("builtin:tiny-llama").load()
    depths = [0.1, 0.3, 0.5, 0.7, 0.9]
    for template, seed, field in (("default", 0, "passkey_256"), ("locker", 1, "alt_template_256")):
        prompts = build_passkey_prompts(tok, [256], depths, trials=10, seed=seed, template=template)
        res = run_passkey(model, tok, prompts, batch_size=10)
        assert res["trials"] == 50
        # greedy decoding; another thread count may flip a near-tie, so one or two prompts of 50 may differ
        assert res["overall"] == pytest.approx(recorded[field], abs=0.04), (template, res["overall"], recorded)
    # Negative control: scored against another prompt's key (same prompts, keys rotated), nothing is right: the
    # score above is the key read from the context, not a format that always passes.
    rotated = [p.__class__(**{**p.to_row(), "key": prompts[(i + 1) % len(prompts)].key}) for i, p in enumerate(prompts)]
    assert run_passkey(model, tok, rotated, batch_size=10)["overall"] <= 0.04
