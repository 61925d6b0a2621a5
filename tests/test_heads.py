"""GPT-1's task heads: special tokens, input transformations, padding invariance, losses, and the
same heads on weights imported from transformers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import small_hf_lm

from gptjax.config import GPTConfig
from gptjax.data.tasks import TASK_TYPES
from gptjax.finetune import heads
from gptjax.nn.model import GPT

SP = heads.SpecialTokens(start=100, delimiter=101, extract=102)

# Compiling is most of these tests' cost on a 2-core CPU: parameters come from randomly
# initialised transformers models (numpy, no JAX compilation), and the model functions are jitted
# once per configuration and shape.
_forward = jax.jit(heads.forward, static_argnums=(0, 4), static_argnames=("deterministic",))
_loss = jax.jit(heads.finetune_loss, static_argnums=(0, 3), static_argnames=("deterministic",))


@functools.lru_cache(maxsize=None)
def _tiny(norm="pre", dropout=0.0):
    """A tiny decoder (post-LN: GPT-1's block; pre-LN: GPT-2's) with the task tokens added."""
    import torch
    import transformers

    from gptjax.nn.convert import from_hf

    torch.manual_seed(0)
    shape = dict(vocab_size=61, n_positions=24, n_embd=16, n_layer=1, n_head=2)
    if norm == "post":
        hf = transformers.OpenAIGPTLMHeadModel(transformers.OpenAIGPTConfig(**shape))
    else:
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape))
    cfg, params = from_hf(hf, embd_pdrop=dropout, attn_pdrop=dropout, resid_pdrop=dropout)
    return heads.add_special_tokens(cfg, params, jax.random.key(1))


def _params(cfg, dec, head_cfg, seed=2):
    return {"decoder": dec, "head": heads.init_head(jax.random.key(seed), head_cfg, cfg.n_embd)}


# ================================================================================ special tokens
@pytest.mark.parametrize("tie", [True, False])
def test_add_special_tokens_keeps_pretrained_rows(tie):
    C = 64
    rng = np.random.RandomState(0)
    cfg = GPTConfig.preset("tiny", vocab_size=50, n_embd=C, tie_embeddings=tie)
    params = {"wte": {"embedding": rng.normal(0, 0.3, (50, C)).astype(np.float32)},
              "wpe": {"embedding": rng.normal(0, 0.3, (64, C)).astype(np.float32)}}
    if not tie:
        params["lm_head"] = rng.normal(0, 0.3, (C, 50)).astype(np.float32)
    new_cfg, new, sp = heads.add_special_tokens(cfg, params, jax.random.key(1))
    assert new_cfg.vocab_size == 53 and (sp.start, sp.delimiter, sp.extract) == (50, 51, 52)
    wte = np.asarray(new["wte"]["embedding"])
    assert wte.shape == (53, C)
    np.testing.assert_array_equal(wte[:50], params["wte"]["embedding"])
    # GPT-1: new rows from N(0, 0.02); 192 draws put the sample std within ~0.001 of 0.02.
    rows = wte[50:]
    assert abs(rows.std() - 0.02) < 0.004 and abs(rows.mean()) < 0.004
    assert not np.allclose(rows[0], rows[1])
    if not tie:
        head = np.asarray(new["lm_head"])
        assert head.shape == (C, 53)
        np.testing.assert_array_equal(head[:, :50], params["lm_head"])
        assert abs(head[:, 50:].std() - 0.02) < 0.004
    assert new["wpe"] is params["wpe"]


def test_add_special_tokens_rejects_mismatched_table():
    cfg = GPTConfig.preset("tiny", vocab_size=50)
    params = {"wte": {"embedding": np.zeros((40, 32), np.float32)}}
    with pytest.raises(ValueError, match=r"shape \(40, 32\).*\(50, 32\)"):
        heads.add_special_tokens(cfg, params, jax.random.key(1))


# ================================================================================ transforms
def test_transform_layouts():
    s, d, e = 100, 101, 102
    assert heads.transform("classification", SP, 32, [1, 2, 3]) == [[s, 1, 2, 3, e]]
    assert heads.transform("entailment", SP, 32, [1, 2], [7, 8, 9]) == [[s, 1, 2, d, 7, 8, 9, e]]
    assert heads.transform("similarity", SP, 32, [1, 2], [7]) == [[s, 1, 2, d, 7, e],
                                                                  [s, 7, d, 1, 2, e]]
    assert heads.transform("multiple_choice", SP, 32, [1, 2], choices=[[7], [8, 9]]) == [
        [s, 1, 2, d, 7, e], [s, 1, 2, d, 8, 9, e]]


def test_transform_truncation_fits_and_keeps_frame():
    a, b = list(range(1, 41)), list(range(41, 51))
    (cls,) = heads.transform("classification", SP, 16, a)
    assert cls == [100] + a[:14] + [102]
    # 13 positions for text: the longer piece loses a token first until both fit (6 + 7).
    (ent,) = heads.transform("entailment", SP, 16, a, b)
    assert ent == [100] + a[:6] + [101] + b[:7] + [102]
    # Multiple choice keeps the end of the context (where the question is), the same for every
    # candidate, and never drops a candidate's frame.
    mc = heads.transform("multiple_choice", SP, 12, a, choices=[[91, 92], [93, 94, 95, 96]])
    assert mc == [[100] + a[-5:] + [101, 91, 92, 102],
                  [100] + a[-5:] + [101, 93, 94, 95, 96, 102]]


def test_transform_errors_name_the_problem():
    with pytest.raises(ValueError, match="task_type='regression'"):
        heads.transform("regression", SP, 16, [1])
    with pytest.raises(ValueError, match="needs text_b"):
        heads.transform("entailment", SP, 16, [1])
    with pytest.raises(ValueError, match="max_len=2"):
        heads.transform("classification", SP, 2, [1])


def test_pack_right_pads():
    tokens, lengths = heads.pack([[[1, 2, 3]], [[4]]], 5, pad_id=0)
    np.testing.assert_array_equal(tokens, [[[1, 2, 3, 0, 0]], [[4, 0, 0, 0, 0]]])
    np.testing.assert_array_equal(lengths, [[3], [1]])
    with pytest.raises(ValueError, match="example 1 has 2 sequences"):
        heads.pack([[[1]], [[1], [2]]], 4)
    with pytest.raises(ValueError, match="4 tokens, more than length=3"):
        heads.pack([[[1, 2, 3, 4]]], 3)


# ================================================================================ heads
def _batch(sp, task_type, examples, T, pad_id=0):
    """Transform and pack examples given as [text_a, text_b] or [text_a, None, choices]."""
    seqs = [heads.transform(task_type, sp, T, ex[0], ex[1], ex[2] if len(ex) > 2 else ())
            for ex in examples]
    return heads.pack(seqs, T, pad_id)


CASES = {
    "classification": ([[1, 2, 3], None], [[4, 5, 6, 7, 8, 9, 10], None]),
    "entailment": ([[1, 2], [3, 4]], [[5, 6, 7, 8, 9], [10]]),
    "similarity": ([[1, 2], [3]], [[5, 6, 7, 8, 9], [10, 11, 12]]),
    "multiple_choice": ([[1, 2], None, [[3], [4, 5]]], [[6, 7, 8, 9, 10], None, [[11], [12, 13]]]),
}


@pytest.mark.parametrize("task_type,norm", [(t, "pre") for t in TASK_TYPES]
                         + [("classification", "post"), ("multiple_choice", "post")])
def test_head_output_is_independent_of_padding_and_batch(task_type, norm):
    """Right padding is invisible to the extract token: an example scores the same whatever
    fills its padding and whatever other example shares its batch."""
    cfg, dec, sp = _tiny(norm)
    head_cfg = heads.HeadConfig(task_type, 2)
    params = _params(cfg, dec, head_cfg)
    short, long = CASES[task_type]
    tok_a, len_a = _batch(sp, task_type, [short, long], 20)
    other = [[x + 20 for x in long[0]], long[1]] + long[2:]
    tok_b, len_b = _batch(sp, task_type, [short, other], 20, pad_id=7)
    assert (tok_a[0] != tok_b[0]).any()  # only the padding differs
    out_a, logits_a = _forward(cfg, params, tok_a, len_a, head_cfg)
    out_b, _ = _forward(cfg, params, tok_b, len_b, head_cfg)
    np.testing.assert_allclose(np.asarray(out_a[0]), np.asarray(out_b[0]), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(out_a[1]), np.asarray(out_b[1]))
    K = 2 if task_type in ("similarity", "multiple_choice") else 1
    assert logits_a.shape == (2, K, 20, cfg.vocab_size) and cfg.vocab_size == 64
    assert out_a.shape == (2, 2)


def test_similarity_is_symmetric_and_choices_permute():
    cfg, dec, sp = _tiny()
    sim = heads.HeadConfig("similarity", 1)  # STS-B's regression head
    p = _params(cfg, dec, sim)
    t, n = _batch(sp, "similarity", [[[1, 2, 3], [4, 5]], [[4, 5], [1, 2, 3]]], 16)
    out, _ = _forward(cfg, p, t, n, sim)
    assert out.shape == (2,)
    np.testing.assert_allclose(out[0], out[1], rtol=1e-5)
    mc = heads.HeadConfig("multiple_choice", 3)
    p = _params(cfg, dec, mc)
    t, n = _batch(sp, "multiple_choice", [[[1, 2], None, [[3], [4, 5], [6]]],
                                          [[1, 2], None, [[6], [3], [4, 5]]]], 16)
    out, _ = _forward(cfg, p, t, n, mc)
    np.testing.assert_allclose(np.asarray(out[1]), np.asarray(out[0])[[2, 0, 1]], rtol=1e-5)


def test_finetune_loss_is_task_plus_lambda_lm():
    cfg, dec, sp = _tiny()
    tok, lens = _batch(sp, "entailment", [[[1, 2], [3, 4, 5]], [[6], [7, 8]], [[9, 10], [11]]],
                       12)
    labels = jnp.array([0, 2, 1])
    weights = jnp.array([1.0, 1.0, 0.0])  # the last row is batch padding
    batch = {"tokens": tok, "lengths": lens, "labels": labels, "weights": weights}
    hc = heads.HeadConfig("entailment", 3, lm_coef=0.5)
    p = _params(cfg, dec, hc)
    total, aux = _loss(cfg, p, batch, hc, deterministic=True)
    out, logits = _forward(cfg, p, tok, lens, hc)
    # Task loss: cross-entropy of the two real rows only.
    logp = np.asarray(jax.nn.log_softmax(out))
    np.testing.assert_allclose(aux["task_loss"], -(logp[0, 0] + logp[1, 2]) / 2, rtol=1e-5)
    # LM loss: next-token NLL over real tokens of the weighted rows (delimiter and extract
    # included, start never predicted, padding never a target).
    lp = np.asarray(jax.nn.log_softmax(logits[:, 0]))
    nll = [-lp[b, t, tok[b, 0, t + 1]] for b in range(2) for t in range(lens[b, 0] - 1)]
    np.testing.assert_allclose(aux["lm_loss"], np.mean(nll), rtol=1e-5)
    np.testing.assert_allclose(total, aux["task_loss"] + 0.5 * aux["lm_loss"], rtol=1e-6)
    total0, _ = _loss(cfg, p, batch, heads.HeadConfig("entailment", 3, lm_coef=0.0),
                      deterministic=True)
    np.testing.assert_allclose(total0, aux["task_loss"], rtol=1e-6)


def test_regression_and_choice_losses():
    out = jnp.array([1.0, 2.5, 4.0])
    hc = heads.HeadConfig("similarity", 1)
    np.testing.assert_allclose(heads.task_loss(out, jnp.array([1.5, 2.5, 3.0]), hc),
                               (0.25 + 0 + 1.0) / 3, rtol=1e-6)
    np.testing.assert_allclose(heads.predictions(out, hc), out)
    scores = jnp.array([[0.1, 2.0, -1.0], [3.0, 0.0, 0.5]])
    mc = heads.HeadConfig("multiple_choice", 3)
    want = optax.softmax_cross_entropy_with_integer_labels(scores, jnp.array([1, 2])).mean()
    np.testing.assert_allclose(heads.task_loss(scores, jnp.array([1, 2]), mc), want, rtol=1e-6)
    np.testing.assert_array_equal(heads.predictions(scores, mc), [1, 0])


def test_head_dropout():
    cfg, dec, sp = _tiny(dropout=0.1)
    hc = heads.HeadConfig("classification", 2, dropout=0.1)
    p = _params(cfg, dec, hc)
    tok, lens = _batch(sp, "classification", [[[1, 2, 3], None], [[4, 5], None]], 8)
    det1, _ = _forward(cfg, p, tok, lens, hc, rng=jax.random.key(5))  # rng unused
    drop_a, _ = _forward(cfg, p, tok, lens, hc, deterministic=False, rng=jax.random.key(5))
    drop_b, _ = _forward(cfg, p, tok, lens, hc, deterministic=False, rng=jax.random.key(6))
    assert not np.allclose(drop_a, det1) and not np.allclose(drop_a, drop_b)
    with pytest.raises(ValueError, match="needs a dropout rng"):
        heads.forward(cfg, p, tok, lens, hc, deterministic=False)


def test_head_config_validation():
    with pytest.raises(ValueError, match="num_labels=1: multiple choice"):
        heads.HeadConfig("multiple_choice", 1)
    with pytest.raises(ValueError, match="dropout=1.0"):
        heads.HeadConfig("classification", 2, dropout=1.0)
    assert heads.HeadConfig("similarity", 1).regression
    assert not heads.HeadConfig("multiple_choice", 4).regression


# ================================================================================ HF weights
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("family", ["openai", "gpt2"])
def test_heads_on_weights_imported_from_transformers(family):
    """The features the heads read are transformers' final hidden states (OpenAI-GPT: the last
    block's output; GPT-2: after ln_f), and the gradient of the finetuning loss on imported
    weights reaches the head, every block and the new task-token rows."""
    from gptjax.nn.convert import from_hf

    hf = small_hf_lm(family, 0, vocab_size=97, n_positions=20, n_embd=24, n_layer=2, n_head=3)
    cfg, params = from_hf(hf)
    assert cfg.final_norm == (family == "gpt2")
    cfg, dec, sp = heads.add_special_tokens(cfg, params, jax.random.key(0))
    assert sp.start == 97
    hc = heads.HeadConfig("similarity", 2)
    p = _params(cfg, dec, hc)
    x = np.random.RandomState(0).randint(0, 97, (3, 2, 20)).astype(np.int32)
    lens = np.array([[20, 7], [3, 12], [1, 20]], np.int32)
    _, hidden = jax.jit(lambda q, t: GPT(cfg).apply({"params": q}, t, return_hidden=True))(
        dec, jnp.asarray(x.reshape(6, 20)))
    feats = heads.gather_extract(hidden.reshape(3, 2, 20, -1), jnp.asarray(lens))
    with torch.no_grad():
        ref = hf(torch.tensor(x.reshape(6, 20), dtype=torch.long),
                 output_hidden_states=True).hidden_states[-1].numpy().reshape(3, 2, 20, -1)
    want = np.stack([[ref[b, k, lens[b, k] - 1] for k in range(2)] for b in range(3)])
    np.testing.assert_allclose(np.asarray(feats), want, atol=2e-5)
    # Then the head and the loss on real transformed inputs with the new special tokens.
    seqs = [heads.transform("similarity", sp, 20, [5, 6, 7], [8, 9]),
            heads.transform("similarity", sp, 20, [10], [11, 12, 13, 14])]
    tok, ln = heads.pack(seqs, 12)
    batch = {"tokens": tok, "lengths": ln, "labels": jnp.array([1, 0])}
    loss, grads = jax.jit(jax.value_and_grad(
        lambda q: heads.finetune_loss(cfg, q, batch, hc, deterministic=True)[0]))(p)
    assert np.isfinite(float(loss))
    assert np.abs(np.asarray(grads["head"]["kernel"])).sum() > 0
    for i in range(cfg.n_layer):
        assert np.abs(np.asarray(grads["decoder"][f"h_{i}"]["attn"]["c_attn"]["kernel"])).sum() > 0
    g_wte = np.asarray(grads["decoder"]["wte"]["embedding"])
    assert all(np.abs(g_wte[t]).sum() > 0 for t in (sp.start, sp.delimiter, sp.extract))
