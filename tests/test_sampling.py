"""Sampling: cached decoding, parity with transformers' greedy and beam search, warpers, stops."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from gptjax import GPT, GPTConfig, init_params
from gptjax.inference import sampling
from gptjax.inference.sampling import (beam_search_loop, decode_step, generate, prefill,
                                       sample_logits, sample_loop, stop_array, warp_logits)
from gptjax.nn.convert import from_hf
from gptjax.nn.param_layout import from_decode_layout, stack_layers

try:  # transformers + torch are the reference (test extras); only the parity tests need them
    import torch
    import transformers
except ImportError:  # pragma: no cover
    torch = transformers = None
needs_hf = pytest.mark.skipif(torch is None, reason="transformers/torch not installed")

RAGGED = [[5, 17, 3, 99, 42, 7, 1], [8, 200], [61, 2, 33, 4]]


@functools.lru_cache(maxsize=None)
def _model(name, scan=False):
    cfg = GPTConfig.preset(name)
    params = init_params(cfg, jax.random.key(0))
    if scan:
        cfg = cfg.replace(scan_layers=True)
        params = stack_layers(cfg, params)
    return cfg, params


# ---------------------------------------------------------------------------- cache == full forward
@functools.partial(jax.jit, static_argnums=0)
def _cached_and_full(cfg, params, tokens_BxP, lengths_B, cont_BxT, full_BxT):
    """Prefill the prompts, feed cont_BxT one token per step (teacher forcing); and the plain
    forward of full_BxT, the reference."""
    P, T = tokens_BxP.shape[1], cont_BxT.shape[1]
    logits_BxPxV, cache = prefill(cfg, params, tokens_BxP, lengths_B, P + T)

    def step(cache, tok_t):
        tok_B, t = tok_t
        logits_BxV, cache = decode_step(cfg, params, tok_B, lengths_B + t, cache)
        return cache, logits_BxV

    _, logits_TxBxV = jax.lax.scan(step, cache, (cont_BxT.T, jnp.arange(T)))
    full_BxTxV = GPT(cfg).apply({"params": params}, full_BxT)
    return logits_BxPxV, logits_TxBxV.transpose(1, 0, 2), full_BxTxV


# The scan layout's cache is covered by test_model's cached-decoding test and by the beam search
# test below, which reorders it.
@pytest.mark.parametrize("name", ["tiny", "tiny-gpt1", "tiny-gpt3"])
def test_cached_decoding_equals_full_forward_with_ragged_left_padding(name):
    cfg, params = _model(name)
    rng = np.random.RandomState(1)
    # tiny-gpt3's band is 8 wide, so 12 continuation tokens cross it in every row.
    cont = rng.randint(0, cfg.vocab_size, (len(RAGGED), 12)).astype(np.int32)
    tokens_BxP, lengths_B = sampling.pad_prompts(RAGGED, bucket=16)
    P = tokens_BxP.shape[1]
    # The reference is the plain causal forward of each whole sequence; right padding to one
    # length does not change a causal model's logits at the real positions.
    seqs = [p + c for p, c in zip(RAGGED, cont.tolist())]
    T = max(map(len, seqs))
    full_BxT = jnp.asarray([s + [0] * (T - len(s)) for s in seqs], jnp.int32)
    prompt_BxPxV, decoded_BxTxV, full_BxTxV = map(np.asarray, _cached_and_full(
        cfg, params, tokens_BxP, lengths_B, jnp.asarray(cont), full_BxT))
    for b, prompt in enumerate(RAGGED):
        n = len(prompt)
        np.testing.assert_allclose(prompt_BxPxV[b, P - n:], full_BxTxV[b, :n], atol=1e-5)
        np.testing.assert_allclose(decoded_BxTxV[b], full_BxTxV[b, n:n + cont.shape[1]],
                                   atol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_prefill_last_only_matches_full_prefill(scan):
    # What generate runs: only the last column's logits, from the same cache.
    cfg, params = _model("tiny-gpt3", scan=scan)
    tokens_BxP, lengths_B = sampling.pad_prompts(RAGGED, bucket=16)
    full_BxPxV, cache = prefill(cfg, params, tokens_BxP, lengths_B, 24)
    last_BxV, last_cache = prefill(cfg, params, tokens_BxP, lengths_B, 24, last_only=True)
    assert last_BxV.shape == (len(RAGGED), cfg.vocab_size)
    np.testing.assert_allclose(last_BxV, full_BxPxV[:, -1], atol=1e-6)
    jax.tree_util.tree_map(np.testing.assert_array_equal, last_cache, cache)


def test_cache_rows_follow_batch_rows():
    # Keys/values are stored [B*H, D, S]; reordering batch rows must move whole head groups.
    cfg, params = _model("tiny")
    tokens_BxP, lengths_B = sampling.pad_prompts(RAGGED, bucket=16)
    _, cache = prefill(cfg, params, tokens_BxP, lengths_B, 20)
    close = functools.partial(np.testing.assert_allclose, atol=1e-5)
    rows = jnp.array([2, 0, 0])
    gathered = sampling.gather_cache(cfg, cache, rows)
    _, ref = prefill(cfg, params, tokens_BxP[np.asarray(rows)], lengths_B[np.asarray(rows)], 20)
    jax.tree_util.tree_map(close, gathered, ref)
    repeated = sampling.repeat_cache(cfg, cache, 2)
    _, ref = prefill(cfg, params, np.repeat(tokens_BxP, 2, 0), np.repeat(lengths_B, 2), 20)
    jax.tree_util.tree_map(close, repeated, ref)


def test_scan_layers_beam_search_equals_per_layer():
    # Beam search reorders the cache every step: this covers the scan layout's batch axis.
    cfg, params = _model("tiny-gpt3")
    scfg, sparams = _model("tiny-gpt3", scan=True)
    a = generate(cfg, params, RAGGED, max_new_tokens=6, num_beams=2, return_scores=True)
    b = generate(scfg, sparams, RAGGED, max_new_tokens=6, num_beams=2, return_scores=True)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


# ---------------------------------------------------------------------------- transformers parity
VOCAB = 97


@functools.lru_cache(maxsize=None)
def _hf(family, seed):
    """A random-init HF model with an odd shape, scaled up so it emits varied, confident tokens.

    Default init (std 0.02) makes every next-token distribution nearly uniform and greedy output one
    repeated token, a comparison that proves little and that float noise could flip.
    """
    torch.manual_seed(seed)
    shape = dict(vocab_size=VOCAB, n_positions=48, n_embd=40, n_layer=2, n_head=5,
                 initializer_range=0.3, pad_token_id=1, eos_token_id=2, bos_token_id=2)
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape)).eval()
    else:
        model = transformers.OpenAIGPTLMHeadModel(transformers.OpenAIGPTConfig(**shape)).eval()
        # Post-LN GPT-1 with tied embeddings ends in a LayerNorm of a residual stream that holds
        # the current token's embedding, so at random init it repeats one token forever. Random
        # LayerNorm gains (either sign) and unit embeddings break that self-attraction.
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "ln" in n:
                    p.normal_(0.0, 1.0 if n.endswith("weight") else 0.1)
                elif "embed" in n:
                    p.normal_(0.0, 1.0)
    cfg, params = from_hf(model)
    return model, cfg, params


def _hf_prompts(seed, lengths=(5, 9, 3, 7)):
    rng = np.random.RandomState(seed)
    return [rng.randint(3, VOCAB, n).tolist() for n in lengths]


def _left_pad(prompts, pad):
    P = max(map(len, prompts))
    ids = torch.full((len(prompts), P), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(p)
        mask[b, P - len(p):] = 1
    return ids, mask


def _hf_generate(model, prompts, **kw):
    ids, mask = _left_pad(prompts, 1)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, pad_token_id=1, do_sample=False, **kw)


def _favourite_token(cfg, params, prompts):
    """The token greedy decoding emits most often: an EOS that beams will actually hit."""
    out = generate(cfg, params, prompts, max_new_tokens=20, temperature=0)
    counts = np.bincount(out.tokens.ravel(), minlength=cfg.vocab_size)
    return int(np.argmax(counts))


@needs_hf
@pytest.mark.parametrize("family", ["gpt2", "openai"])
def test_greedy_equals_transformers(family):
    model, cfg, params = _hf(family, 0)
    prompts = _hf_prompts(0)
    N = 20
    ours = generate(cfg, params, prompts, max_new_tokens=N, temperature=0, return_scores=True)
    # The comparison means something only if outputs vary within rows and across prompts.
    assert all(len(set(row)) >= 3 for row in ours.tokens.tolist()), ours.tokens
    assert len({tuple(row) for row in ours.tokens.tolist()}) == len(prompts)
    # One HF call per prompt (no padding), then one left-padded batch with an attention mask.
    for b, p in enumerate(prompts):
        hf = _hf_generate(model, [p], max_new_tokens=N, eos_token_id=None)
        assert hf[0, len(p):].tolist() == ours.tokens[b].tolist()
    P = max(map(len, prompts))
    hf = _hf_generate(model, prompts, max_new_tokens=N, eos_token_id=None, output_scores=True,
                      return_dict_in_generate=True)
    np.testing.assert_array_equal(hf.sequences[:, P:].numpy(), ours.tokens)
    hf_logp = model.compute_transition_scores(hf.sequences, hf.scores, normalize_logits=True)
    np.testing.assert_allclose(hf_logp.numpy(), ours.scores, atol=1e-4)

    # With an EOS the model emits, rows stop at their first EOS and are padded afterwards.
    eos = _favourite_token(cfg, params, prompts)
    ours = generate(cfg, params, prompts, max_new_tokens=N, temperature=0, eos_id=eos, pad_id=1)
    hf = _hf_generate(model, prompts, max_new_tokens=N, eos_token_id=eos)[:, P:].numpy()
    assert (ours.lengths < N).any()
    for b in range(len(prompts)):
        n = ours.lengths[b]
        assert hf[b, :n].tolist() == ours.tokens[b, :n].tolist()
        assert (ours.tokens[b, n:] == 1).all() and (hf[b, n:] == 1).all()
        assert eos not in ours.tokens[b, :n - 1].tolist()


@needs_hf
@pytest.mark.parametrize("num_beams,length_penalty", [(2, 0.7), (3, 1.3), (4, 0.7)])
def test_beam_search_equals_transformers(num_beams, length_penalty):
    model, cfg, params = _hf("gpt2", 1)
    prompts = _hf_prompts(1)
    eos = _favourite_token(cfg, params, prompts)
    N = 12
    ours = generate(cfg, params, prompts, max_new_tokens=N, num_beams=num_beams, eos_id=eos,
                    length_penalty=length_penalty, num_return_sequences=num_beams,
                    return_scores=True, pad_id=1)
    hf = _hf_generate(model, prompts, max_new_tokens=N, num_beams=num_beams, eos_token_id=eos,
                      length_penalty=length_penalty, early_stopping=False,
                      num_return_sequences=num_beams, output_scores=True,
                      return_dict_in_generate=True)
    P = max(map(len, prompts))
    hf_tokens = hf.sequences[:, P:].numpy()
    hf_lengths = (hf.beam_indices != -1).sum(1).numpy()
    np.testing.assert_array_equal(ours.lengths, hf_lengths)
    # EOS must end some hypotheses, and not all of them, for the test to cover both paths.
    assert (ours.lengths < N).any() and (ours.lengths == N).any()
    for r in range(len(ours.tokens)):
        n = ours.lengths[r]
        assert ours.tokens[r, :n].tolist() == hf_tokens[r, :n].tolist(), r
        assert (ours.tokens[r, n:] == 1).all()
    np.testing.assert_allclose(ours.scores, hf.sequences_scores.numpy(), atol=1e-4, rtol=1e-5)


@needs_hf
@pytest.mark.parametrize("family,early_stopping", [("openai", "never"), ("gpt2", True)])
def test_beam_search_early_stopping_modes_equal_transformers(family, early_stopping):
    model, cfg, params = _hf(family, 2)
    prompts = _hf_prompts(2, (6, 6, 6, 6))
    eos = _favourite_token(cfg, params, prompts)
    ours = generate(cfg, params, prompts, max_new_tokens=12, num_beams=3, eos_id=eos,
                    length_penalty=1.3, early_stopping=early_stopping, num_return_sequences=2,
                    return_scores=True)
    hf = _hf_generate(model, prompts, max_new_tokens=12, num_beams=3, eos_token_id=eos,
                      length_penalty=1.3, early_stopping=early_stopping, num_return_sequences=2,
                      output_scores=True, return_dict_in_generate=True)
    hf_lengths = (hf.beam_indices != -1).sum(1).numpy()
    np.testing.assert_array_equal(ours.lengths, hf_lengths)
    for r in range(len(ours.tokens)):
        n = ours.lengths[r]
        assert ours.tokens[r, :n].tolist() == hf.sequences[r, 6:6 + n].tolist()
    np.testing.assert_allclose(ours.scores, hf.sequences_scores.numpy(), atol=1e-4, rtol=1e-5)
    # These cases are chosen so that the mode changes the result (else the test proves nothing).
    default = generate(cfg, params, prompts, max_new_tokens=12, num_beams=3, eos_id=eos,
                       length_penalty=1.3, num_return_sequences=2)
    assert (default.lengths != ours.lengths).any()


# ---------------------------------------------------------------------------- warpers and sampling
def _fake_logits(V=24, seed=0):
    # Distinct values (no ties at the top-k / top-p boundaries) with a spread of probabilities.
    return jnp.asarray(np.random.RandomState(seed).permutation(V) * 0.25, jnp.float32)[None]


@needs_hf
def test_warpers_match_transformers():
    from transformers.generation.logits_process import (  # optional: transformers (test extras)
        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)
    logits = np.random.RandomState(3).randn(4, 50).astype(np.float32) * 2
    for temperature, top_k, top_p in [(0.7, 0, 1.0), (1.0, 7, 1.0), (1.0, 0, 0.8), (1.5, 12, 0.6),
                                      (0.5, 3, 0.99), (1.0, 0, 0.05)]:
        ref = torch.tensor(logits)
        for w in ([TemperatureLogitsWarper(temperature)] +
                  ([TopKLogitsWarper(top_k)] if top_k else []) +
                  ([TopPLogitsWarper(top_p)] if top_p < 1 else [])):
            ref = w(None, ref)
        ours = np.asarray(warp_logits(jnp.asarray(logits), temperature=temperature, top_k=top_k,
                                      top_p=top_p))
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref.numpy()))
        np.testing.assert_allclose(ours[~np.isinf(ours)], ref.numpy()[~np.isinf(ours)], rtol=1e-6)


def _draw(logits_1xV, n=40000, **kw):
    keys = jax.random.split(jax.random.key(1234), n)
    draw = jax.jit(jax.vmap(lambda k: sample_logits(k, logits_1xV, **kw)[0]))
    return np.bincount(np.asarray(draw(keys)), minlength=logits_1xV.shape[-1])


def _expected(logits_V, keep_V):
    p = np.exp(logits_V - logits_V.max()) * keep_V
    return p / p.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, 1.0), (1.0, 0, 0.7), (0.8, 9, 0.75)])
def test_sampled_frequencies_follow_the_truncated_distribution(temperature, top_k, top_p):
    logits_1xV = _fake_logits()
    z = np.asarray(logits_1xV[0], np.float64) / temperature
    order = np.argsort(-z)
    keep = np.zeros_like(z, bool)
    keep[order[:top_k or len(z)]] = True
    if top_p < 1:
        p = _expected(z, keep)[order]
        mass_before = np.cumsum(p) - p
        keep[order[mass_before >= top_p]] = False
    counts = _draw(logits_1xV, temperature=temperature, top_k=top_k, top_p=top_p)
    assert counts[~keep].sum() == 0  # excluded tokens never appear
    assert 1 < keep.sum() < len(z)   # the truncation is real and leaves a choice
    expected = _expected(z, keep)[keep] * counts.sum()
    assert stats.chisquare(counts[keep], expected).pvalue > 1e-3


def test_untruncated_sampling_follows_the_softmax():
    logits_1xV = _fake_logits(V=12, seed=4)
    counts = _draw(logits_1xV)
    expected = _expected(np.asarray(logits_1xV[0], np.float64), np.ones(12)) * counts.sum()
    assert stats.chisquare(counts, expected).pvalue > 1e-3
    # A wrong distribution (temperature 1.2) must be rejected by the same test.
    wrong = _expected(np.asarray(logits_1xV[0], np.float64) / 1.2, np.ones(12)) * counts.sum()
    assert stats.chisquare(counts, wrong).pvalue < 1e-6


# One sampling configuration shared by the end-to-end sampling tests (one compilation).
SAMPLE_KW = dict(max_new_tokens=12, top_k=40)


def test_top_k_1_and_tiny_top_p_equal_greedy():
    logits_BxV = jax.random.normal(jax.random.key(5), (64, 50)) * 3
    argmax_B = np.asarray(jnp.argmax(logits_BxV, -1))
    for seed in range(3):
        rng = jax.random.key(seed)
        k1 = sample_logits(rng, logits_BxV, top_k=1, temperature=1.7)
        p0 = sample_logits(rng, logits_BxV, top_p=1e-6, temperature=1.7)
        np.testing.assert_array_equal(k1, argmax_B)
        np.testing.assert_array_equal(p0, argmax_B)
    # End to end through generate's compiled loop.
    cfg, params = _model("tiny")
    greedy = generate(cfg, params, RAGGED, max_new_tokens=12, temperature=0)
    tiny_p = generate(cfg, params, RAGGED, top_p=1e-6, temperature=1.7, rng=3, **SAMPLE_KW)
    np.testing.assert_array_equal(tiny_p.tokens, greedy.tokens)


def test_seed_reproducibility():
    cfg, params = _model("tiny")
    a = generate(cfg, params, RAGGED, top_p=0.95, rng=7, **SAMPLE_KW)
    b = generate(cfg, params, RAGGED, top_p=0.95, rng=jax.random.key(7), **SAMPLE_KW)
    c = generate(cfg, params, RAGGED, top_p=0.95, rng=8, **SAMPLE_KW)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()


def test_same_bucket_and_new_knobs_do_not_recompile():
    cfg, params = _model("tiny")
    generate(cfg, params, RAGGED, temperature=0.7, top_p=0.9, rng=0, **SAMPLE_KW)
    n = sampling._sample_core._cache_size()
    # Other prompt lengths within the 16-token bucket, temperature, top_p, EOS, pad and seed.
    for prompts, temp, top_p, eos in (([[4, 5, 6], [7], [8, 9]], 1.3, 0.5, 3),
                                      ([[9] * 16, [1] * 11, [2]], 0.2, 0.99, 7)):
        generate(cfg, params, prompts, temperature=temp, top_p=top_p, eos_id=eos, rng=1,
                 pad_id=5, **SAMPLE_KW)
    assert sampling._sample_core._cache_size() == n


# ---------------------------------------------------------------------------- stopping
def _counting_model(V=16):
    """A fake model whose next token is always (token + 1) mod V; its state counts the calls."""
    def tokens_to_logits(tokens_B, t, calls):
        return jax.nn.one_hot((tokens_B + 1) % V, V) * 10.0, calls + 1
    return tokens_to_logits


def test_stop_sequences_and_eos_stop_rows_without_a_model():
    V, N = 16, 12
    start_B = jnp.array([0, 3, 9, 14])
    first_logits_BxV = jax.nn.one_hot(start_B, V) * 10.0
    run = jax.jit(functools.partial(sample_loop, _counting_model(V), max_new_tokens=N, greedy=True,
                                    pad_id=-7))
    stop_QxL = jnp.asarray(stop_array([[5, 6], [15, 0]]))
    tokens, lengths, _, steps = run(first_logits_BxV, jnp.int32(0), jax.random.key(0),
                                    eos_id=jnp.int32(12), stop_QxL=stop_QxL)
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    # Row 0 counts 0..6 and stops after the stop sequence 5, 6 (its first token 0 is no match for
    # [15, 0]: nothing was generated before it); row 1 stops at 5, 6 too; row 2 hits EOS 12;
    # row 3 wraps 14, 15, 0 and stops at [15, 0].
    assert lengths.tolist() == [7, 4, 4, 3]
    assert tokens[0, :7].tolist() == list(range(7))
    assert tokens[1, :4].tolist() == [3, 4, 5, 6]
    assert tokens[2, :4].tolist() == [9, 10, 11, 12]
    assert tokens[3, :3].tolist() == [14, 15, 0]
    for b, n in enumerate(lengths):
        assert (tokens[b, n:] == -7).all()
    # The loop ends when the last row stops instead of running all N steps.
    assert int(steps) == 7


def test_generate_stops_rows_at_eos_and_stop_sequences():
    cfg, params = _model("tiny")
    free = generate(cfg, params, RAGGED, max_new_tokens=12, temperature=0)
    # Stop sequences taken from the free-running output: row 0's tokens 2..3, row 1's token 5.
    s0, s1 = free.tokens[0, 2:4].tolist(), free.tokens[1, 5:6].tolist()
    # pad_id 1000 is no token id (V = 256): it must appear in the output only, never reach the
    # model, where it would embed as NaN (in the prompt padding it would poison every row).
    out = generate(cfg, params, RAGGED, max_new_tokens=12, temperature=0, stop_sequences=[s0, s1],
                   pad_id=1000)
    for b in range(len(RAGGED)):
        row, n = free.tokens[b].tolist(), out.lengths[b]
        first = min([i + 1 for i in range(1, 12) if row[i - 1:i + 1] == s0] +
                    [i + 1 for i in range(12) if row[i] == s1[0]] + [12])
        assert n == first
        assert out.tokens[b, :n].tolist() == row[:n] and (out.tokens[b, n:] == 1000).all()
    assert out.lengths[0] <= 4 and out.lengths[1] <= 6
    eos = int(free.tokens[2, 3])
    out = generate(cfg, params, RAGGED, max_new_tokens=12, temperature=0, eos_id=eos)
    assert out.lengths[2] <= 4 and out.tokens[2, out.lengths[2] - 1] == eos


def test_beam_loop_ends_hypotheses_at_stop_sequences_without_a_model():
    V, M, N = 16, 2, 8
    # Row 0 counts from 0; the runner-up beam (always the same token's neighbour) never leads.
    first_NxV = jnp.repeat(jax.nn.one_hot(jnp.array([0]), V) * 10.0, M, axis=0)
    tokens, lengths, _ = beam_search_loop(
        _counting_model(V), lambda s, rows: s, first_NxV, jnp.int32(0), num_beams=M,
        max_new_tokens=N, stop_QxL=jnp.asarray(stop_array([[3, 4]])))
    assert int(lengths[0, 0]) == 5
    assert np.asarray(tokens)[0, 0, :5].tolist() == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------- bad input
BAD = [
    (dict(prompts=[list(range(65))]), "longer than the context"),
    (dict(prompts=[list(range(40))], max_new_tokens=30), "> n_ctx=64"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(temperature=-0.5), "temperature=-0.5"),
    (dict(top_k=-1), "top_k=-1"),
    (dict(num_beams=0), "num_beams=0"),
    (dict(prompts=[[1, 2], []]), r"prompts\[1\] is empty"),
    (dict(prompts=[]), "prompts=\\[\\]"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(prompts=[[1, 300]]), "token id 300"),
    (dict(eos_id=256), "eos_id=256"),
    (dict(stop_sequences=[[]]), r"stop_sequences\[0\]"),
    (dict(num_beams=2, top_k=5), "num_beams=2 with"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences=3"),
    (dict(prompts=np.zeros((2, 4), np.int32), prompt_lengths=[4, 0]), r"prompt_lengths\[1\]=0"),
    (dict(num_beams=2, stream_callback=print), "streaming needs"),
]


@pytest.mark.parametrize("kwargs,msg", BAD)
def test_bad_input_raises_one_line_value_error(kwargs, msg):
    cfg, params = _model("tiny")
    args = dict(prompts=[[1, 2, 3]], max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=msg) as e:
        generate(cfg, params, args.pop("prompts"), **args)
    assert "\n" not in str(e.value)


def test_stream_callback_sees_every_token_and_context_can_be_filled():
    cfg, params = _model("tiny")
    prompts, N = [[1, 2, 3, 4], [5], [6, 7]], cfg.n_ctx - 4  # the longest prompt fills n_ctx
    seen = []
    out = generate(cfg, params, prompts, max_new_tokens=N, temperature=0.8, rng=2,
                   stream_callback=lambda row, tok: seen.append((row, tok)))
    assert out.tokens.shape == (3, N) and (out.lengths == N).all()
    for b in range(len(prompts)):
        assert [tok for row, tok in seen if row == b] == out.tokens[b, :out.lengths[b]].tolist()
    # Tokens arrive step by step: all rows' first tokens before anyone's second.
    assert sorted(row for row, _ in seen[:len(prompts)]) == list(range(len(prompts)))


def test_padded_array_prompts_equal_lists():
    cfg, params = _model("tiny")
    arr = np.full((len(RAGGED), 9), 77, np.int32)
    for b, p in enumerate(RAGGED):
        arr[b, :len(p)] = p
    a = generate(cfg, params, arr, prompt_lengths=[len(p) for p in RAGGED], max_new_tokens=12,
                 temperature=0)
    b = generate(cfg, params, RAGGED, max_new_tokens=12, temperature=0)
    np.testing.assert_array_equal(a.tokens, b.tokens)


# ---------------------------------------------------------------------------- prepared params
@pytest.mark.parametrize("name,scan", [("tiny", False), ("tiny-gpt1", False),
                                       ("tiny-gpt3", False), ("tiny-gpt3", True)])
def test_prepared_params_decode_like_plain_params(name, scan):
    # prepare_for_decoding stores the c_proj kernels [out, in] (param_layout.decode_layout); the
    # cached, full and generated outputs must not change.
    cfg, params = _model(name, scan=scan)
    prepared = sampling.prepare_for_decoding(cfg, params)
    assert prepared.out_in  # these tests run on CPU
    lead = 1 if scan else 0
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        keys = jax.tree_util.keystr(path)
        y = functools.reduce(lambda t, k: t[k.key], path, prepared.params)
        if "c_proj']['kernel" in keys:
            n_in = 1 if "mlp" in keys else 2
            perm = tuple(range(lead)) + tuple(lead + i for i in range(n_in, x.ndim - lead)) + \
                tuple(lead + i for i in range(n_in))
            np.testing.assert_array_equal(y, np.transpose(x, perm))
        else:
            assert y is x  # nothing else is copied
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_decode_layout(cfg, prepared.params),
                           params)

    tokens_BxP, lengths_B = sampling.pad_prompts(RAGGED, bucket=16)
    cont_BxT = jnp.asarray(np.random.RandomState(2).randint(0, cfg.vocab_size, (3, 10)), jnp.int32)

    @jax.jit
    def cached(p):
        logits_BxPxV, cache = prefill(cfg, p, tokens_BxP, lengths_B, 26)

        def step(cache, tok_t):
            logits_BxV, cache = decode_step(cfg, p, tok_t[0], lengths_B + tok_t[1], cache)
            return cache, logits_BxV
        return logits_BxPxV, jax.lax.scan(step, cache, (cont_BxT.T, jnp.arange(10)))[1]

    for a, b in zip(cached(params), cached(prepared)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    full = GPT(cfg).apply({"params": params}, cont_BxT)
    full_prepared = GPT(cfg, decode_layout=True).apply({"params": prepared.params}, cont_BxT)
    np.testing.assert_allclose(full, full_prepared, atol=1e-5)
    for kw in (dict(temperature=0), dict(temperature=0.9, top_k=20, rng=3),
               dict(num_beams=3, return_scores=True)):
        a = generate(cfg, params, RAGGED, max_new_tokens=8, **kw)
        b = generate(cfg, prepared, RAGGED, max_new_tokens=8, **kw)
        np.testing.assert_array_equal(a.tokens, b.tokens)
        if a.scores is not None:
            np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    assert sampling.prepare_for_decoding(cfg, prepared) is prepared
    plain = sampling.prepare_for_decoding(cfg, params, out_in=False)
    assert not plain.out_in and plain.params is params


def test_check_request_validates_before_decoding_and_clips_to_the_context():
    """textgen.check_request: generate's option errors before anything is decoded or printed,
    and max_new_tokens clipped to the room each prompt leaves (sample.py, issue 23)."""
    from gptjax.data.tokenizers import CharTokenizer
    from gptjax.inference import textgen

    tok = CharTokenizer.from_text("abcdefgh ")
    config = GPTConfig.preset("tiny", vocab_size=tok.vocab_size, n_ctx=16)
    assert textgen.check_request(config, tok, ["ab", "abcdefgh"], max_new_tokens=10) == [10, 8]
    assert textgen.check_request(config, tok, ["a"], max_new_tokens=200, top_k=3) == [15]
    with pytest.raises(ValueError, match="temperature=-1.0"):
        textgen.check_request(config, tok, ["a"], max_new_tokens=5, temperature=-1.0)
    with pytest.raises(ValueError, match="num_beams=2 with temperature=0.5"):
        textgen.check_request(config, tok, ["a"], max_new_tokens=5, temperature=0.5, num_beams=2)
    with pytest.raises(ValueError, match="the prompt has 16 tokens: no room left .*n_ctx=16"):
        textgen.check_request(config, tok, ["abcdefgh" * 2], max_new_tokens=1)
    params = init_params(config, jax.random.key(0))
    fit = textgen.check_request(config, tok, ["abc"], max_new_tokens=100, temperature=0.0)[0]
    text = textgen.complete(config, params, tok, ["abc"], max_new_tokens=fit, temperature=0.0)[0]
    assert len(text) == 13  # generated up to the context
