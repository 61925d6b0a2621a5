"""gptjax.eval: sliding-window perplexity against transformers, few-shot prompts and scoring."""

import functools
import json
import math
import os
import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_hf_lm

from gptjax import GPT, GPTConfig, init_params
from gptjax.data.tasks import Example
from gptjax.data.tokenizers import CharTokenizer, GPT2BPETokenizer
from gptjax.eval import fewshot
from gptjax.eval import perplexity as ppl
from gptjax.eval import scoring
from gptjax.eval import templates as T
from gptjax.eval import zero_shot as zs


# ================================================================================ windows
@pytest.mark.parametrize("n,context,stride", [(10, 4, 1), (100, 16, 5), (17, 16, 15), (3, 8, 4),
                                              (64, 16, 8)])
def test_windows_score_every_target_once_with_enough_context(n, context, stride):
    scored = []
    for w in ppl.sliding_windows(n, context, stride):
        assert w.end - w.begin <= context
        first_target = w.end - w.n_scored
        # Each scored target sees at least context - stride tokens (or the whole prefix).
        assert first_target - w.begin >= min(context - stride, first_target)
        assert first_target - w.begin >= 1
        scored += list(range(first_target, w.end))
    assert scored == list(range(1, n))


@pytest.mark.parametrize("context,stride", [(1, 1), (8, 0), (8, 8), (8, 9)])
def test_windows_bad_flags_are_one_line_errors(context, stride):
    with pytest.raises(ValueError, match="context|stride"):
        ppl.sliding_windows(100, context, stride)


def test_wikitext_detokenizer():
    raw = (" = = Description = = \n \n Homarus gammarus is a large <unk> , with a body length up "
           "to 60 centimetres ( 24 in ) and 0 @.@ 7 – 2 @,@ 200 kg ; a well @-@ known \" red \" "
           "lobster 's claws . \n")
    assert ppl.wikitext_detokenize(raw) == (
        " == Description ==\n\nHomarus gammarus is a large <unk>, with a body length up to 60 "
        "centimetres (24 in) and 0.7 – 2,200 kg; a well-known \"red\" lobster's claws.\n")
    assert "<unk>" not in ppl.wikitext_detokenize(raw, unk="?")
    assert ppl.count_words(raw) == len(raw.split()) + 3


# ================================================================================ parity with HF
def _wikitext_excerpt(shared_data, chars=2400):
    path = shared_data / "wikitext2_tokens" / "valid.txt"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    with open(path, encoding="utf-8") as fh:
        return fh.read()[:chars]


def test_sliding_window_nll_equals_transformers(shared_data):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from gptjax.nn.convert import from_hf

    bpe = shared_data / "gpt2_bpe"
    if not bpe.is_dir():
        pytest.skip(f"{bpe} is absent")
    tok = GPT2BPETokenizer.from_files(bpe)
    raw = _wikitext_excerpt(shared_data)
    text = ppl.wikitext_detokenize(raw)
    torch.manual_seed(0)
    # A larger init scale than GPT-2's 0.02 gives peaked, input-dependent predictions, so the
    # comparison is not between two near-uniform distributions.
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=tok.vocab_size, n_positions=96, n_embd=64, n_layer=2, n_head=4,
        initializer_range=0.1)).eval()
    config, params = from_hf(hf)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    context, stride = 96, 40

    res = ppl.perplexity(config, params, tok, text, context=context, stride=stride,
                         num_words=ppl.count_words(raw), batch_size=3)
    ids = tok.encode(text)
    assert res.tokens == len(ids) - 1
    # transformers' recipe on the same windows: labels -100 outside the scored targets, the
    # model's mean loss times the number of scored targets.
    total, n_tok = 0.0, 0
    for w in ppl.sliding_windows(len(ids), context, stride):
        x = torch.tensor([ids[w.begin:w.end]])
        labels = x.clone()
        labels[:, :-w.n_scored] = -100
        with torch.no_grad():
            loss = hf(x, labels=labels).loss
        total += float(loss) * w.n_scored
        n_tok += w.n_scored
    assert n_tok == res.tokens and res.windows > 5
    rel = abs(res.nll - total) / total
    print(f"gptjax {res.nll:.6f} vs transformers {total:.6f} nats over {n_tok} tokens: "
          f"rel {rel:.2e}")
    assert rel <= 1e-6
    d = res.as_dict()
    # In log space: exp would multiply the NLL's relative error by the NLL per word (~12).
    assert math.log(d["token_perplexity"]) == pytest.approx(total / n_tok, rel=1e-6)
    assert math.log(d["word_perplexity"]) == pytest.approx(total / ppl.count_words(raw), rel=1e-6)
    assert d["bits_per_byte"] == pytest.approx(total / math.log(2) / len(text.encode()), rel=1e-6)
    # Batching windows differently gives the same sums.
    again = ppl.perplexity(config, params, tok, text, context=context, stride=stride,
                           batch_size=8)
    assert again.nll == pytest.approx(res.nll, rel=1e-6)


# ================================================================================ continuation scores
def _torch_logprob(torch, hf, ctx, cont):
    """log p(cont | ctx) by transformers, the context cut from the left to fit n_positions."""
    ctx = list(ctx)[-(hf.config.n_positions - len(cont)):]
    ids = torch.tensor([ctx + list(cont)])
    with torch.no_grad():
        logp = torch.log_softmax(hf(ids).logits[0].double(), -1).numpy()
    return sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont))


@pytest.mark.parametrize("family", ["openai", "gpt2"])
def test_continuation_scores_and_zero_shot_match_transformers(family):
    """Continuation log-likelihoods, batched and right-padded, equal transformers' per-sequence
    ones; contexts longer than n_ctx lose their beginning. GPT-1's zero-shot heuristics pick
    what those scores say."""
    import torch
    from gptjax.nn.convert import from_hf

    hf = small_hf_lm(family, 3, vocab_size=80, n_positions=24, n_embd=16, n_layer=2, n_head=2)
    cfg, params = from_hf(hf)
    rng = np.random.RandomState(0)
    pairs = [(list(rng.randint(0, 80, n)), list(rng.randint(0, 80, m)))
             for n, m in [(5, 1), (1, 3), (12, 4), (30, 2), (7, 7)]]
    logp, count = scoring.score_continuations(cfg, params, pairs)
    assert list(count) == [1, 3, 4, 2, 7]
    want = [_torch_logprob(torch, hf, ctx, cont) for ctx, cont in pairs]
    np.testing.assert_allclose(logp, want, rtol=1e-6)
    with pytest.raises(ValueError, match="pair 0: context and continuation must be non-empty"):
        scoring.score_continuations(None, None, [([], [1])])
    # The zero-shot predictors pick what those scores say.
    tok = CharTokenizer.from_text(string.ascii_letters + string.digits + " .,?!'\"-:;()")
    assert tok.vocab_size <= 80
    examples = [Example(0, "Tom went home.", choices=("He slept.", "Zzq qx!")),
                Example(1, "It rained all day.", choices=("x", "Wet mud."))]
    got = zs.zero_shot_choice(cfg, params, tok, examples)
    for ex, g in zip(examples, got):
        ctx = tok.encode(ex.text_a)
        means = [_torch_logprob(torch, hf, ctx, tok.encode(" " + c)) / len(" " + c)
                 for c in ex.choices]
        assert g == int(np.argmax(means))
    reviews = [Example(0, "a good film ."), Example(1, "dull and bad ."), Example(2, "fine")]
    got = zs.zero_shot_sentiment(cfg, params, tok, reviews)
    for ex, g in zip(reviews, got):
        ctx = tok.encode(ex.text_a + " very")
        s = [_torch_logprob(torch, hf, ctx, tok.encode(w)) for w in (" negative", " positive")]
        assert g == int(np.argmax(s))


# ================================================================================ tiny model
@pytest.fixture(scope="module")
def tiny():
    text = "0123456789 QWhatisplusminustimesA:?\n()+-*abcdefghijklmnopqrstuvwxyz."
    tok = CharTokenizer.from_text(text)
    config = GPTConfig.preset("tiny", vocab_size=tok.vocab_size, n_ctx=64)
    params = init_params(config, jax.random.key(0))
    # Sharpen the random model so argmaxes and likelihoods differ between candidates.
    params = jax.tree_util.tree_map(lambda p: p * 4.0, params)
    return config, params, tok


def _logprobs(config, params, seq):
    """log-softmax of the model at every position of one sequence, computed on its own (right
    padding to n_ctx is invisible to the causal positions before it; one compilation)."""
    x = np.zeros((1, config.n_ctx), np.int32)
    x[0, :len(seq)] = seq
    return np.asarray(_forward(config, params, x))[:len(seq)]


@functools.partial(jax.jit, static_argnums=0)
def _forward(config, params, x):
    return jax.nn.log_softmax(GPT(config).apply({"params": params}, x)[0], -1)


def _direct_logprob(config, params, ids, cont):
    """log p(cont | ids), one forward pass per candidate, no batching."""
    logp = _logprobs(config, params, list(ids) + list(cont))
    return float(sum(logp[len(ids) - 1 + i, t] for i, t in enumerate(cont)))


def test_rendered_few_shot_prompt_is_exact_for_a_seed():
    task = fewshot.build_task("2D+", num_examples=3, seed=7)
    demos = fewshot.draw_demos(task, 1, 2, seed=3)
    prompt = T.render_prompt(task.test[1], demos, task.separator)
    # The same seeds give the same problems and demonstrations, recomputed from their definition:
    # GPT-3's format, demonstrations separated by blank lines, the query's answer left out.
    rng = np.random.default_rng([7, 0])
    qs = [tuple(int(x) for x in rng.integers(0, 100, 2)) for _ in range(3)]
    rng_train = np.random.default_rng([8, 0])
    train = [tuple(int(x) for x in rng_train.integers(0, 100, 2)) for _ in range(1000)]
    rows = np.random.default_rng([3, 1]).choice(1000, 2, replace=False)
    expect = "".join(f"Q: What is {a} plus {b}?\nA: {a + b}\n\n" for a, b in
                     (train[r] for r in rows)) + f"Q: What is {qs[1][0]} plus {qs[1][1]}?\nA:"
    assert prompt == expect
    assert prompt.count("Q: What is") == 3 and prompt.endswith("?\nA:")
    # A literal check of one rendering, so a change of format or generator shows up here.
    item = T.Item("Q: What is 6+(4*8)?\nA:", " 38")
    assert T.render_prompt(item, [T.Item("Q: What is 1 plus 2?\nA:", " 3")]) == \
        "Q: What is 1 plus 2?\nA: 3\n\nQ: What is 6+(4*8)?\nA:"


def test_arithmetic_answers_are_right():
    for name in T.ARITHMETIC:
        for it in T.arithmetic_items(name, 50, seed=0):
            q = it.context[len("Q: What is "):-len("?\nA:")]
            expr = q.replace(" plus ", "+").replace(" minus ", "-").replace(" times ", "*")
            assert int(it.target) == eval(expr), (name, q)  # noqa: S307 (our own digits)
            nums = [int(x) for x in __import__("re").findall(r"\d+", q)]
            digits = T.ARITHMETIC[name][1]
            assert all(x < 10 ** digits for x in nums) and len(nums) == (3 if name == "1DC" else 2)


def test_choice_scores_equal_direct_computation(tiny):
    config, params, tok = tiny
    items = [T.Item("abc de", " f", (" f", " ghi", " q"), 0),
             T.Item("Q: What is 1 plus 2?\nA:", " 3", (" 3", " 12"), 0),
             T.Item("zz", " a", (" a", " b"), 1)]
    prompts = [tok.encode(it.context) for it in items]
    scores = fewshot.choice_scores(config, params, tok, prompts, items, batch_size=2)
    for ids, it, (lp, n) in zip(prompts, items, scores):
        for c, got, cnt in zip(it.choices, lp, n):
            cont = tok.encode(c)
            assert cnt == len(cont)
            assert got == pytest.approx(_direct_logprob(config, params, ids, cont), abs=1e-4)
    task = fewshot.FewShotTask("t", "choice", tuple(items), tuple(items))
    r = fewshot.evaluate(config, params, tok, task, 0, return_predictions=True)
    want_sum = [int(np.argmax(lp)) for lp, _ in scores]
    want_mean = [int(np.argmax(lp / n)) for lp, n in scores]
    labels = [it.label for it in items]
    assert r["predictions"] == want_sum
    assert r["accuracy"] == pytest.approx(np.mean(np.equal(want_sum, labels)))
    assert r["accuracy_norm"] == pytest.approx(np.mean(np.equal(want_mean, labels)))


def test_greedy_exact_match_equals_direct_argmax(tiny):
    config, params, tok = tiny
    task = fewshot.build_task("2D+", num_examples=4, seed=0)
    r = fewshot.evaluate(config, params, tok, task, 1, seed=0, batch_size=4,
                         return_predictions=True)
    for i, (query, pred) in enumerate(zip(task.test, r["predictions"])):
        ids, _ = fewshot.fit_prompt(tok, task, query, fewshot.draw_demos(task, i, 1, 0),
                                    config.n_ctx - fewshot._max_new_tokens(tok, task))
        ids = ids[-(config.n_ctx - fewshot._max_new_tokens(tok, task)):]
        for _ in range(fewshot._max_new_tokens(tok, task)):  # greedy decoding by hand
            ids = ids + [int(np.argmax(_logprobs(config, params, ids)[-1]))]
        text = tok.decode(ids[-fewshot._max_new_tokens(tok, task):])
        assert pred == T.first_line(text)
    assert r["accuracy"] == np.mean([p == it.target.strip()
                                     for p, it in zip(r["predictions"], task.test)])


def test_demos_that_do_not_fit_are_dropped_furthest_first(tiny):
    _, _, tok = tiny
    task = fewshot.build_task("3D+", num_examples=2, seed=0)
    demos = fewshot.draw_demos(task, 0, 8, seed=0)
    ids, used = fewshot.fit_prompt(tok, task, task.test[0], demos, 60)
    assert len(ids) <= 60 and 0 < used < 8
    assert tok.decode(ids) == T.render_prompt(task.test[0], demos[8 - used:])


def test_last_word_items_and_report(tmp_path):
    text = ("one two three four five six seven eight nine ten, eleven twelve Bob.\n\n"
            "short one\n\n" + " ".join(f"w{i}" for i in range(40)) + " final!\n")
    items = T.last_word_items(text, min_words=5)
    assert [it.target for it in items] == [" Bob", " final"]
    assert items[0].context.endswith("eleven twelve")
    assert T.last_word_items(text, min_words=5, cloze=True)[0].context.endswith("twelve ____. ->")
    assert T.first_word(" Bob. And") == "Bob"
    rows = [dict(model="m", task="2D+", shots=k, accuracy=0.1 * k, n=5, demos_mean=k,
                 params=10, step=None) for k in (0, 1)]
    rows.append(dict(model="m", task="sst2", shots=0, accuracy=0.5, accuracy_norm=0.6, n=5,
                     demos_mean=0, params=10, step=None))
    paths = fewshot.write_results(rows, str(tmp_path))
    md = open(paths["markdown"]).read()
    assert "| m | 2D+ | accuracy | 0.000 | 0.100 |" in md
    assert "| m | sst2 | accuracy_norm | 0.600 |  |" in md
    assert json.load(open(paths["json"]))[0]["task"] == "2D+"
    assert all(os.path.getsize(p) > 1000 for p in paths["plots"])


def test_glue_task_through_the_same_interface(shared_data):
    d = shared_data / "glue" / "SST-2"
    if not d.is_dir():
        pytest.skip(f"{d} is absent")
    task = fewshot.build_task(f"sst2={d}", num_examples=5, seed=0)
    assert task.kind == "choice" and len(task.test) == 5 and len(task.train) > 60000
    assert task.test[0].choices == (" negative", " positive")
    assert task.test[0].context.endswith("\nQuestion: Is this sentence positive or negative?"
                                         "\nAnswer:")
    with pytest.raises(ValueError, match="no few-shot template"):
        fewshot.build_task(f"stsb={shared_data / 'glue' / 'STS-B'}")
    with pytest.raises(ValueError, match="unknown task spec"):
        fewshot.build_task("7D+")


# ================================================================================ eval.py
def test_eval_cli_perplexity_fewshot_and_errors(tmp_path, shared_data):
    import subprocess
    import sys

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    bpe = shared_data / "gpt2_bpe"
    if not bpe.is_dir():
        pytest.skip(f"{bpe} is absent")
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_positions=64, n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path / "hf")
    text = tmp_path / "t.txt"
    text.write_text("The lobster , a well @-@ known animal , is blue . \n" * 20)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run(*args):
        return subprocess.run([sys.executable, os.path.join(repo, "eval.py"), "--hf_dir",
                               str(tmp_path / "hf"), "--tokenizer", str(bpe), *args],
                              capture_output=True, text=True, cwd=repo, timeout=600)

    r = run("--text", str(text), "--detokenize", "wikitext", "--stride", "32",
            "--out", str(tmp_path / "ppl"))
    assert r.returncode == 0, r.stderr
    res = json.load(open(tmp_path / "ppl" / "perplexity.json"))[0]
    # WikiText words: 12 whitespace tokens and one <eos> per line.
    assert res["words"] == 20 * 13 and res["stride"] == 32 and res["context"] == 64
    assert "word ppl" in r.stdout
    r = run("--mode", "fewshot", "--tasks", "2D+,1DC", "--shots", "0,1", "--num_examples", "3",
            "--out", str(tmp_path / "fs"))
    assert r.returncode == 0, r.stderr
    assert "| hf | 1DC | accuracy |" in open(tmp_path / "fs" / "results.md").read()
    r = run("--text", str(text), "--stride", "64")
    assert r.returncode == 2 and r.stderr.strip().startswith("error: stride=64")
    assert len(r.stderr.strip().splitlines()) == 1


def test_fewshot_names_model_and_task_and_keeps_finished_results(tiny, tmp_path):
    """Issue 23: a character-level model without digits fails on arithmetic naming the model and
    the task, after the models before it have written their results."""
    config, params, tok = tiny
    letters = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz QWhatisplus?:\n")
    lconfig = GPTConfig.preset("tiny", vocab_size=letters.vocab_size, n_ctx=64)
    lparams = init_params(lconfig, jax.random.key(1))
    task = fewshot.build_task("2D+", num_examples=2)
    models = [("digits", config, params, tok, {}), ("letters", lconfig, lparams, letters, {})]
    with pytest.raises(ValueError, match=r"model 'letters', task '2D\+', K=0: character '\d' "
                                         r".*finished models' results are in"):
        fewshot.run(models, [task], [0], out_dir=str(tmp_path), log=lambda s: None)
    rows = json.load(open(tmp_path / "results.json"))
    assert [(r["model"], r["task"], r["shots"]) for r in rows] == [("digits", "2D+", 0)]
    assert (tmp_path / "accuracy_vs_k.png").exists()


def test_accuracy_plots_have_integer_k_ticks_and_distinct_lines(tmp_path, monkeypatch):
    import matplotlib.figure

    figs = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figs.append(fig))
    rows = [dict(model=m, task=t, shots=k, accuracy=0.0, params=p, step=None)
            for m, p in (("a", 10), ("b", 100)) for t in ("2D+", "1DC") for k in (0, 1, 4, 8)]
    fewshot.plot_results(rows, str(tmp_path))
    assert len(figs) == 2
    ax = figs[0].axes[0]
    assert list(ax.get_xticks()) == [0, 1, 4, 8]
    lines = ax.get_lines()
    assert len(lines) == 4  # equal accuracies everywhere: the lines must still tell apart
    styles = {(ln.get_marker(), ln.get_linestyle(), ln.get_linewidth()) for ln in lines}
    assert len(styles) == 4
    assert len({(ln.get_marker(), ln.get_linestyle()) for ln in figs[1].axes[0].get_lines()}) == 8


def test_finetuning_loss_plot_names_the_combined_loss(tmp_path, monkeypatch):
    """A finetuning run logs L3 = task + lambda x LM: its plot must not call that a per-token
    cross-entropy; a pretraining run's plot still does."""
    import matplotlib.figure

    from gptjax.plotting import plot_metrics

    figs = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figs.append(fig))
    ft, pre = tmp_path / "ft.jsonl", tmp_path / "pre.jsonl"
    ft.write_text("".join(json.dumps({"step": i, "loss": 3.0, "task_loss": 0.7, "lm_loss": 4.6})
                          + "\n" for i in range(5)))
    pre.write_text("".join(json.dumps({"step": i, "loss": 3.0}) + "\n" for i in range(5)))
    plot_metrics(str(ft), str(tmp_path / "a.png"))
    plot_metrics(str(pre), str(tmp_path / "b.png"))
    ax_ft, ax_pre = figs[0].axes[0], figs[1].axes[0]
    assert ax_ft.get_ylabel() == "loss (nats)"
    assert [ln.get_label() for ln in ax_ft.get_lines()] == [
        "train loss (task + lambda x LM)", "task loss (cross-entropy)", "LM loss (nats/token)"]
    assert ax_pre.get_ylabel() == "cross-entropy (nats/token)"
