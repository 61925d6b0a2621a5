"""Prompt/completion data (gptjax.data.prompt_completion): completion-only loss against
transformers' labels=-100, deterministic and resumable batches, the process split, one-line
errors, and a tiny train_and_evaluate run on a JSONL file."""

import json
import math

import jax
import numpy as np
import pytest

from conftest import small_hf_lm, tiny_run_config
from gptjax.config import ConfigError
from gptjax.data import prompt_completion as pc
from gptjax.data.tokenizers import CharTokenizer, build_tokenizer
from gptjax.nn.losses import lm_loss

QA = [("Q: What is the capital of France?\nA:", " Paris"),
      ("Translate to French: cheese\n", " fromage"),
      ("2 + 2 =", " 4"),
      ("Name a colour:", " blue, or perhaps a deep shade of green"),
      ("", " a row with an empty prompt"),
      ("The opposite of hot is", " cold."),
      ("Once upon a time", " there was a small model that learned to count.")]


def _jsonl(path, rows, keys=("prompt", "completion")):
    path.write_text("".join(json.dumps({keys[0]: p, keys[1]: c}) + "\n" for p, c in rows))
    return path


def _char_split(tmp_path, layout="pad", seq_len=24, n=7):
    rows = pc.read_rows(str(_jsonl(tmp_path / "d.jsonl", [(f"q{i}?", f" a{i * 7}.")
                                                          for i in range(n)])))
    tok = CharTokenizer.from_text("".join(r.prompt + r.completion for r in rows))
    return rows, tok, pc.tokenize_rows(rows, tok, seq_len, layout)


# ================================================================================ parity
@pytest.mark.parametrize("layout", ["pad", "pack"])
def test_loss_equals_transformers_with_labels_minus_100(tmp_path, shared_data, layout):
    """The batch's weighted gptjax loss, with parameters imported from a random GPT-2, equals
    transformers' loss with labels=-100 on prompt and padding tokens (pad) or on the prompt
    tokens of the packed window (pack)."""
    import torch  # heavy: the reference

    from gptjax.nn.convert import from_hf  # heavy: imports the model stack
    from gptjax.nn.model import GPT  # heavy: flax model

    tok = build_tokenizer("gpt2_bpe", path=str(shared_data / "gpt2_bpe"))
    split = pc.tokenize_rows(pc.read_rows(str(_jsonl(tmp_path / "qa.jsonl", QA))), tok, 24,
                             layout)
    bt = split.batcher(4, seed=3)
    b = bt.batch(0)
    assert b["inputs"].dtype == b["targets"].dtype == np.int32 and b["weights"].dtype == np.float32
    # transformers' inputs and labels, built here from the rows: encode(prompt) +
    # encode(completion) + <|endoftext|>, labels -100 on the prompt (and on padding)
    ids = [tok.encode(p) + tok.encode(c) + [50256] for p, c in QA]
    lab = [[-100] * len(tok.encode(p)) + x[len(tok.encode(p)):] for (p, c), x in zip(QA, ids)]
    T1 = 25
    if layout == "pad":
        seq = np.array([ids[r] + [50256] * (T1 - len(ids[r])) for r in bt.rows(0)])
        labels = np.array([lab[r] + [-100] * (T1 - len(lab[r])) for r in bt.rows(0)])
    else:  # the packed windows: the rows in file order, windows at multiples of 24
        stream, lstream = sum(ids, []), sum(lab, [])
        starts = [next(s for s in range(0, len(stream) - 24, 24)
                       if stream[s:s + T1] == row.tolist()) for row in np.c_[b["inputs"],
                                                                            b["targets"][:, -1]]]
        seq = np.array([stream[s:s + T1] for s in starts])
        labels = np.array([[-100] + lstream[s + 1:s + T1] for s in starts])
    np.testing.assert_array_equal(b["inputs"], seq[:, :-1])
    np.testing.assert_array_equal(b["targets"], seq[:, 1:])
    assert 0 < b["weights"].sum() < b["weights"].size
    hf = small_hf_lm("gpt2", 0, n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=50257)
    cfg, params = from_hf(hf)
    ours = float(lm_loss(GPT(cfg).apply({"params": params}, b["inputs"]), b["targets"],
                         b["weights"]))
    with torch.no_grad():
        ref = hf(torch.tensor(seq), labels=torch.tensor(labels)).loss.item()
    assert abs(ours - ref) <= 1e-5 * abs(ref), (ours, ref)


# ================================================================================ batches
@pytest.mark.parametrize("layout,sampling", [("pad", "packed"), ("pad", "random_offset"),
                                             ("pack", "packed")])
def test_batches_resume_and_split_over_processes(tmp_path, layout, sampling):
    """batch(step) is a pure function: a new batcher restored from state() gives the same
    batches, and the processes' rows concatenate to the one-process batch."""
    rows, tok, split = _char_split(tmp_path, layout, seq_len=8 if layout == "pack" else 24)
    a = split.batcher(4, seed=5, sampling=sampling)
    first = [a.batch(s) for s in range(6)]
    b = pc.tokenize_rows(rows, tok, split.seq_len, layout).batcher(4, 5, sampling)
    b.restore(json.loads(json.dumps(a.state())))
    for s in (5, 2, 0, 3):  # any order
        for k in ("inputs", "targets", "weights"):
            np.testing.assert_array_equal(b.batch(s)[k], first[s][k])
    assert any((first[0][k] != first[1][k]).any() for k in first[0])
    for step in (0, 3):
        parts = [split.batcher(4, 5, sampling, p, 2).batch(step) for p in range(2)]
        for k in first[0]:
            np.testing.assert_array_equal(np.concatenate([q[k] for q in parts]), first[step][k])
    with pytest.raises(ValueError, match="checkpoint seed=5, now 6"):
        split.batcher(4, 6, sampling).restore(a.state())
    lm_state = {k: v for k, v in a.state().items() if k not in ("dataset", "layout")}
    with pytest.raises(ValueError, match="has no 'dataset'"):  # a plain-text run's checkpoint
        a.restore(lm_state)


def test_pad_epochs_continue_and_weights_mark_completions(tmp_path):
    """'pad': each row once per epoch, epochs continuing inside a batch (7 rows, batch 3);
    weights are 1 exactly where the target is a completion character."""
    from gptjax.train.experiment import resolve_steps  # heavy: the training stack

    rows, tok, split = _char_split(tmp_path, "pad")
    # len() counts the rows' positions, so train.epochs gives whole passes over the rows
    assert len(split) == 7 * 24 and split.num_tokens < len(split)
    config = tiny_run_config("", tmp_path, {"train.epochs": 3.0, "train.batch_size": 3})
    assert resolve_steps(config, len(split), 24) == 7
    bt = split.batcher(3, seed=1)
    seen = np.concatenate([bt.rows(s) for s in range(14)])  # 42 = 6 epochs of 7
    assert all(sorted(seen[e * 7:(e + 1) * 7]) == list(range(7)) for e in range(6))
    assert sorted(seen[:7]) != seen[:7].tolist() or sorted(seen[7:14]) != seen[7:14].tolist()
    b, r = bt.batch(0), bt.rows(0)
    for i, row in enumerate(r):
        p, c = rows[row].prompt, rows[row].completion
        n = len(p) + len(c)
        assert b["weights"][i].tolist() == [0.0] * (len(p) - 1) + [1.0] * len(c) + [0.0] * (
            split.seq_len + 1 - n)
        assert tok.decode(b["targets"][i, len(p) - 1:n - 1]) == c


def test_eval_batches_count_every_completion_token_once(tmp_path):
    for layout in pc.LAYOUTS:
        rows, tok, split = _char_split(tmp_path, layout, seq_len=8 if layout == "pack" else 24)
        n_completion = sum(len(r.completion) for r in rows)
        one = list(split.eval_batches(4))
        assert sum(b["weights"].sum() for b in one) == n_completion
        two = [list(split.eval_batches(4, process_index=p, process_count=2)) for p in range(2)]
        for whole, a, b in zip(one, *two):
            for k in whole:
                np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), whole[k])


HELD_OUT = (2, 4)  # PCG64(0).permutation(7)[:2], sorted


def test_validation_rows_from_a_file_or_a_fixed_fraction(tmp_path):
    _jsonl(tmp_path / "a1.jsonl", QA[:4])
    _jsonl(tmp_path / "a2.jsonl", QA[4:])
    _jsonl(tmp_path / "val.jsonl", QA[:2])
    src = pc.load_source(str(tmp_path / "a*.jsonl"), str(tmp_path / "val.jsonl"))
    assert [(r.prompt, r.completion) for r in src.split("train")] == QA  # files sorted
    assert src.split("train")[4].where == f"{tmp_path / 'a2.jsonl'}:1"
    assert [(r.prompt, r.completion) for r in src.split("validation")] == QA[:2]
    frac = pc.load_source(f"{tmp_path / 'a1.jsonl'},{tmp_path / 'a2.jsonl'}", "", 0.3)
    train, val = frac.split("train"), frac.split("validation")
    # round(0.3 * 7) = 2 rows held out by the fixed (seed 0) permutation, file order kept
    assert [(r.prompt, r.completion) for r in val] == [QA[i] for i in HELD_OUT]
    assert [(r.prompt, r.completion) for r in train] == [q for i, q in enumerate(QA)
                                                         if i not in HELD_OUT]
    with pytest.raises(ValueError, match="split 'test' is not in prompt_completion; allowed: "
                       "train, validation"):
        frac.split("test")
    with pytest.raises(ValueError, match=r"validation_fraction=0.0; allowed: 0 < fraction < 1"):
        pc.load_source(str(tmp_path / "a1.jsonl"), "", 0.0)


# ================================================================================ errors
@pytest.mark.parametrize("text,match", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n',
     r"d\.jsonl:2: the row has no 'completion' field \(its keys: \['prompt'\]\); allowed keys: "
     r"data.prompt_key='prompt', data.completion_key='completion'"),
    ('{"completion": "b"}\n', r"d\.jsonl:1: the row has no 'prompt' field"),
    ('\n{"prompt": "a", "completion": "b"}\n{"prompt": "a", completion: 1}\n',
     r"d\.jsonl:3: not JSON \(.*\); allowed: a JSON object with string fields"),
    ('[1, 2]\n', r"d\.jsonl:1: a JSON list, not an object"),
    ('{"prompt": "a", "completion": 3}\n', r"d\.jsonl:1: field 'completion' is a int"),
    ('\n  \n', r"d\.jsonl: empty file \(no JSON rows\)"),
    (b'\xef\xbb\xbf{"prompt": "a", "completion": "b"}\n{"prompt": "\xe9", "completion": "b"}',
     r"d\.jsonl:2: not UTF-8 \(byte 12\)"),
])
def test_bad_rows_name_file_and_line(tmp_path, text, match):
    f = tmp_path / "d.jsonl"
    f.write_bytes(text) if isinstance(text, bytes) else f.write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        pc.read_rows(str(tmp_path / "d.jsonl"))
    assert "\n" not in str(e.value)


def test_row_longer_than_context_and_config_errors(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [("ab", "cd"), ("abcabc", "dddd")])
    rows = pc.read_rows(str(path))
    tok = CharTokenizer.from_text("abcd")
    assert pc.tokenize_rows(rows, tok, 9).num_rows == 2  # 10 tokens = seq_len + 1: fits
    with pytest.raises(ValueError, match=rf"d\.jsonl:2: the row has 10 tokens \(6 prompt \+ 4 "
                       r"completion\), longer than the context; allowed: at most seq_len \+ 1 = 9"):
        pc.tokenize_rows(rows, tok, 8)
    from gptjax.train.experiment import check_train_config  # heavy: the training stack

    c = tiny_run_config(path, tmp_path, {"data.dataset": "prompt_completion"})
    check_train_config(c)
    for change, match in [({"data.pipeline": "sharded"}, r"data.pipeline='sharded'.*allowed: "
                           "'single'"), ({"data.pc_layout": "packed"}, "data.pc_layout"),
                          ({"data.completion_key": "prompt"}, "two different keys")]:
        with pytest.raises(ConfigError, match=match):
            check_train_config(tiny_run_config(path, tmp_path, dict(
                {"data.dataset": "prompt_completion"}, **change)))


# ================================================================================ end to end
def test_train_and_evaluate_on_prompt_completion_rows(tmp_path):
    """A tiny scratch run on a JSONL file: finite losses, and the final val loss is the mean
    over the validation rows' completion characters only (recomputed here by hand)."""
    from gptjax.nn.model import GPT  # heavy: flax model
    from gptjax.train.loop import train_and_evaluate  # heavy: the training stack

    qa = [(f"{i}+{i % 5}=", f"{i + i % 5};") for i in range(40)]
    path = _jsonl(tmp_path / "sums.jsonl", qa, keys=("question", "answer"))
    config = tiny_run_config(path, tmp_path, {
        "data.dataset": "prompt_completion", "data.prompt_key": "question",
        "data.completion_key": "answer", "data.validation_fraction": 0.2, "model.n_ctx": 16,
        "train.steps": 6, "train.eval_every": 3, "train.eval_batch_size": 4,
        "train.save_every": 6, "optim.decay_steps": 6})
    result = train_and_evaluate(config, str(tmp_path / "run"), progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().split("\n")
             if x]
    losses = [m["loss"] for m in lines if "loss" in m]
    vals = [m["val_loss"] for m in lines if "val_loss" in m]
    assert len(losses) == 6 and len(vals) == 2 and all(map(math.isfinite, losses + vals))
    # The held-out rows, tokenized by hand (char tokenizer: no end-of-text), one per row.
    val_rows = pc.split_validation(pc.read_rows(str(path), "question", "answer"), 0.2)[1]
    assert len(val_rows) == 8
    model, tok = GPT(result.model_config), result.tokenizer
    tot = n = 0.0
    for r in val_rows:
        ids = np.asarray(tok.encode(r.prompt + r.completion))
        logp = jax.nn.log_softmax(model.apply({"params": result.state.params}, ids[None, :-1]))
        nll = -np.take_along_axis(np.asarray(logp[0]), ids[1:, None], axis=1)[:, 0]
        tot += nll[len(r.prompt) - 1:].sum()
        n += len(r.completion)
    assert result.val_loss == pytest.approx(tot / n, rel=1e-5)
    assert vals[-1] == result.val_loss


def test_accumulated_loss_is_the_whole_batch_s_weighted_mean():
    """With weights (completion-only), accumulation gives the same loss and update as one
    microbatch, however unevenly the completion tokens fall into the microbatches."""
    import jax.numpy as jnp
    import optax

    from gptjax import GPTConfig, init_params
    from gptjax.train.step import TrainState, make_train_step

    cfg = GPTConfig.preset("tiny", vocab_size=64, n_layer=1, n_head=2, n_embd=16, n_ctx=8,
                           embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    params = init_params(cfg, jax.random.key(0))
    rs = np.random.RandomState(0)
    batch = {"inputs": rs.randint(0, 64, (4, 8)).astype(np.int32),
             "targets": rs.randint(0, 64, (4, 8)).astype(np.int32),
             "weights": np.zeros((4, 8), np.float32)}
    batch["weights"][0, 2:] = 1.0  # 6 completion tokens in the first microbatch,
    batch["weights"][3, 7:] = 1.0  # 1 in the second
    opt = optax.sgd(0.1)
    out = []
    for accum in (1, 2):
        step = jax.jit(make_train_step(cfg, opt, lambda s: 0.1, accum_steps=accum))
        st = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params))
        out.append(step(st, batch, jax.random.key(0)))
    (s1, m1), (s2, m2) = out
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
