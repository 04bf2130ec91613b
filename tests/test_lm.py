"""Tests for jaxdp.lm: GPT-2 loading, tokenizer, LoRA/freezing, per-sequence clipping, exposure."""
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxdp
from jaxdp.lm import (GPT2, GPT2Config, TRAINABLE, ByteTokenizer, CanaryFormat, all_candidate_scores,
                      apply_lora, encode_batch, exposure, exposure_from_rank, extrapolated_exposure, finetune,
                      last_k_filter, load_pretrained, load_tokenizer, lora_filter, make_dp_step, make_loss_fn,
                      merge_lora, rank_of, sample_candidate_scores, save_pretrained, sequence_nll,
                      split_trainable)

CFG = GPT2Config(vocab_size=257, n_positions=16, n_embd=16, n_layer=2, n_head=2)


@functools.lru_cache(maxsize=None)
def _tiny(seed):
    return GPT2(CFG, rngs=nnx.Rngs(seed))


def tiny(seed=0):
    return nnx.clone(_tiny(seed))   # a fresh copy (tests modify models in place); init runs once per seed


def tokens(B=4, T=10, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (B, T)), jnp.int32)


def leaves_equal(a, b):
    return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                          jax.tree_util.tree_leaves(b)))


# ----------------------------------------------------------------------------------------------- model


def _hf_random_checkpoint(path, cfg, rng):
    """A GPT-2 checkpoint with Hugging Face's names and Conv1D ([in, out]) layouts, random values."""
    from safetensors.numpy import save_file

    D, I = cfg.n_embd, cfg.inner
    t = {"transformer.wte.weight": (cfg.vocab_size, D), "transformer.wpe.weight": (cfg.n_positions, D),
         "transformer.ln_f.weight": (D,), "transformer.ln_f.bias": (D,)}
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        t.update({p + "ln_1.weight": (D,), p + "ln_1.bias": (D,), p + "ln_2.weight": (D,), p + "ln_2.bias": (D,),
                  p + "attn.c_attn.weight": (D, 3 * D), p + "attn.c_attn.bias": (3 * D,),
                  p + "attn.c_proj.weight": (D, D), p + "attn.c_proj.bias": (D,),
                  p + "mlp.c_fc.weight": (D, I), p + "mlp.c_fc.bias": (I,),
                  p + "mlp.c_proj.weight": (I, D), p + "mlp.c_proj.bias": (D,)})
    tensors = {k: (0.2 * rng.standard_normal(s)).astype(np.float32) for k, s in t.items()}
    tensors["transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 16, 16), np.float32))   # old mask buffer
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "vocab_size": cfg.vocab_size, "n_positions": cfg.n_positions,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5, "n_inner": None}))
    return tensors


def test_load_hf_safetensors_maps_every_name(tmp_path):
    tensors = _hf_random_checkpoint(tmp_path, CFG, np.random.default_rng(0))
    m = load_pretrained(tmp_path)
    np.testing.assert_array_equal(m.wte.embedding.value, tensors["transformer.wte.weight"])
    np.testing.assert_array_equal(m.h[1].attn.c_attn.kernel.value, tensors["transformer.h.1.attn.c_attn.weight"])
    np.testing.assert_array_equal(m.h[0].mlp.c_proj.bias.value, tensors["transformer.h.0.mlp.c_proj.bias"])
    np.testing.assert_array_equal(m.h[1].ln_2.scale.value, tensors["transformer.h.1.ln_2.weight"])
    # save -> load round trip is exact
    save_pretrained(m, tmp_path / "copy")
    m2 = load_pretrained(tmp_path / "copy")
    x = tokens()
    np.testing.assert_array_equal(m(x), m2(x))
    # wrong shapes are refused with a clear error
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_embd"] = 32
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        load_pretrained(tmp_path)


@pytest.mark.parity   # against Hugging Face transformers (PyTorch): with `make test-parity`, and in the default run
def test_matches_huggingface_gpt2_logits(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    _hf_random_checkpoint(tmp_path, CFG, np.random.default_rng(1))
    ref = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    x = np.asarray(tokens(2, 12, seed=3))
    with torch.no_grad():
        want = ref(torch.tensor(x, dtype=torch.long)).logits.numpy()
    got = np.asarray(load_pretrained(tmp_path)(jnp.asarray(x)))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_causal_and_sequence_nll_padding():
    m = tiny()
    x = tokens(2, 10)
    y = x.at[:, 6:].set(7)       # changing later tokens leaves earlier logits unchanged (causal)
    np.testing.assert_allclose(m(x)[:, :6], m(y)[:, :6], atol=1e-6)
    mask = jnp.arange(10)[None, :] < jnp.array([[6], [10]])
    # padded positions do not change the per-sequence loss
    a = sequence_nll(m(x), x, mask)
    b = sequence_nll(m(y), y, mask)
    assert a.shape == (2,)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    assert not np.isclose(a[1], b[1])


# ------------------------------------------------------------------------------------------- tokenizer


def test_byte_tokenizer_and_fallback(tmp_path):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("my account number is 4721-3 é")) == "my account number is 4721-3 é"
    assert tok.vocab_size == 257 and tok.eos_id == 256
    t, m = encode_batch(tok, ["ab", "abcdef"], 5)
    assert t.tolist() == [[256, 97, 98, 256, 256], [256, 97, 98, 99, 100]]
    assert m.tolist() == [[True, True, True, True, False], [True] * 5]
    with pytest.warns(UserWarning):
        assert isinstance(load_tokenizer(tmp_path / "missing"), ByteTokenizer)
    with pytest.raises((FileNotFoundError, ImportError)):
        load_tokenizer(tmp_path / "missing", fallback=False)


def test_local_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, "hello": 2, "world": 3}
    hf = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert tok.encode("hello world") == [2, 3]
    assert tok.eos_id == 0 and tok.vocab_size == 4


# -------------------------------------------------------------------------------------- LoRA, freezing


def test_lora_starts_at_base_and_merge_is_exact():
    m = tiny()
    x = tokens()
    base_out = m(x)
    apply_lora(m, rank=2, alpha=4.0, targets=("q", "v", "mlp.c_fc"), rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(m(x), base_out)          # B = 0 at init
    for b in m.h:                                           # give the adapters non-zero B
        for lb in b.attn.c_attn.lora_b:
            lb.value = 0.3 * jnp.ones_like(lb.value)
        b.mlp.c_fc.lora_b[0].value = -0.2 * jnp.ones_like(b.mlp.c_fc.lora_b[0].value)
    lora_out = m(x)
    assert not np.allclose(lora_out, base_out)
    # q/v adapters leave the k third of c_attn's output alone
    d = m.h[0].attn.c_attn.delta()
    assert bool(jnp.all(d[:, 16:32] == 0)) and bool(jnp.any(d[:, :16] != 0)) and bool(jnp.any(d[:, 32:] != 0))
    merge_lora(m)
    assert isinstance(m.h[0].attn.c_attn, nnx.Linear)
    np.testing.assert_allclose(m(x), lora_out, atol=1e-5)
    with pytest.raises(ValueError, match="unknown LoRA target"):
        apply_lora(m, 2, 4.0, ("query",), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("which", ["lora", "last_k"])
def test_dp_step_changes_only_trainable(which):
    m = tiny()
    if which == "lora":
        apply_lora(m, 2, 4.0, ("q", "v"), rngs=nnx.Rngs(1))
        filt = lora_filter
    else:
        filt = last_k_filter(m, 1)
    graphdef, params = split_trainable(m, filt)
    names = jaxdp.clipping.leaf_names(params["trainable"])
    if which == "lora":
        assert names and all("lora_" in n for n in names)
    else:
        assert names and all(n.startswith(("h/1/", "ln_f/", "wte/")) for n in names)
    x = tokens(8, 8)
    batch = {"tokens": x, "mask": jnp.ones_like(x, bool)}
    if which == "lora":
        step, tx = make_dp_step(graphdef, l2_clip_norm=0.5, noise_multiplier=1.0, expected_batch_size=4,
                                learning_rate=1e-2, key=jax.random.key(0), method="auto")
        opt_state = tx.init(params)
        new = params
        for _ in range(2):
            new, opt_state, stats = step(new, opt_state, batch, jnp.array([True] * 7 + [False]))
    else:   # through the finetune() loop: Poisson sampling (one padded shape of 8), noise, Adam
        res = finetune(m, np.asarray(x), np.ones(x.shape, bool), steps=2, learning_rate=1e-2, seed=0,
                       trainable=filt, batch_size=4, private=True, noise_multiplier=1.0, l2_clip_norm=0.5,
                       key=jax.random.key(0), pad_to_multiple=8)
        assert res.sampling == "poisson" and len(res.losses) == 2
        _, new = split_trainable(res.model, filt)
        assert leaves_equal(split_trainable(m, filt)[1], params)   # the input model is not modified
    assert leaves_equal(new["frozen"], params["frozen"])        # bit-for-bit unchanged
    for a, b in zip(jax.tree_util.tree_leaves(new["trainable"]), jax.tree_util.tree_leaves(params["trainable"])):
        assert not bool(jnp.array_equal(a, b))                  # every trainable leaf moved (noise alone would)
    if which != "lora":
        return
    # clipped_grad returns exact zeros on frozen leaves and only differentiates the trainable ones
    summed, _ = jax.jit(jaxdp.clipped_grad(make_loss_fn(graphdef), 0.5, method="vmap", trainable=TRAINABLE))(
        params, batch)
    assert all(bool(jnp.all(g == 0)) for g in jax.tree_util.tree_leaves(summed["frozen"]))
    assert any(bool(jnp.any(g != 0)) for g in jax.tree_util.tree_leaves(summed["trainable"]))


def test_lm_clipped_sum_equals_per_example_reference():
    """clipped_grad on the LM (LoRA trainable) == a hand-written loop: grad of each sequence alone, clip with
    min(1, C/(||g|| + 1e-6)), sum over real sequences. Both "vmap" and "auto" (ghost once it lands)."""
    m = tiny()
    apply_lora(m, 2, 4.0, ("c_attn", "mlp.c_proj"), rngs=nnx.Rngs(1))
    for b in m.h:                                               # non-zero B so A gets gradients too
        b.attn.c_attn.lora_b[0].value = 0.1 * jnp.ones_like(b.attn.c_attn.lora_b[0].value)
    graphdef, params = split_trainable(m, lora_filter)
    loss_fn = make_loss_fn(graphdef)
    x = tokens(4, 9, seed=5)
    tok_mask = jnp.arange(9)[None, :] < jnp.array([[9], [5], [7], [9]])   # padded sequences
    batch = {"tokens": x, "mask": tok_mask}
    ex_mask = jnp.array([True, True, True, False])
    C = 0.05   # small enough that every example is clipped (checked below)

    ref = jax.tree_util.tree_map(jnp.zeros_like, params["trainable"])
    norms = []
    one_grad = jax.jit(jax.grad(lambda t, one: loss_fn({"trainable": t, "frozen": params["frozen"]}, one)[0]))
    for i in range(4):
        one = jax.tree_util.tree_map(lambda a: a[i:i + 1], batch)
        g = one_grad(params["trainable"], one)
        n = float(jnp.sqrt(sum(jnp.sum(l ** 2) for l in jax.tree_util.tree_leaves(g))))
        norms.append(n)
        if ex_mask[i]:
            ref = jax.tree_util.tree_map(lambda r, gi: r + min(1.0, C / (n + 1e-6)) * gi, ref, g)
    assert min(norms[:3]) > C
    # "auto" materialises the small LoRA layers' per-example gradients inside the ghost backward pass, "ghost"
    # forces the sequence formula <A A^T, G G^T> on every adapter.
    methods = ["vmap", "auto", "ghost"]
    for method in methods:
        summed, stats = jax.jit(jaxdp.clipped_grad(loss_fn, C, method=method, trainable=TRAINABLE))(
            params, batch, ex_mask)
        for a, b in zip(jax.tree_util.tree_leaves(summed["trainable"]), jax.tree_util.tree_leaves(ref)):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7)
        np.testing.assert_allclose(stats.per_example_norms[:3], norms[:3], rtol=1e-4)
        assert float(stats.per_example_norms[3]) == 0.0 and float(stats.clip_fraction) == 1.0


# ---------------------------------------------------------------------------------------------- exposure


def test_exposure_reference_numbers():
    assert exposure_from_rank(1, 2 ** 30) == 30.0
    assert exposure_from_rank(1024, 2 ** 30) == 20.0
    assert exposure_from_rank(2 ** 30, 2 ** 30) == 0.0
    with pytest.raises(ValueError):
        exposure_from_rank(0, 2 ** 30)
    # constructed example: 2^12 candidates, the canary the 16th most likely -> 12 - 4 = 8 bits
    scores = np.random.default_rng(0).permutation(np.arange(2 ** 12, dtype=float))
    canary = 15.0
    assert rank_of(canary, scores) == 16
    assert exposure(canary, scores) == 8.0
    assert exposure(0.0, scores) == 12.0
    # ties count in the canary's favour of being found (rank = 1 + strictly more likely)
    assert rank_of(1.0, np.array([0.0, 1.0, 1.0, 2.0])) == 2


def test_extrapolated_exposure_matches_normal_tail():
    from scipy import stats

    sample = np.random.default_rng(0).normal(50.0, 4.0, 20000)
    # canary 3 sd below the mean: P = Phi(-3) = 1.35e-3 -> 9.53 bits; the fit from 20000 draws recovers
    # the tail to within a few tenths of a bit (skew-normal MLE on normal data; std of log2 estimate ~ 0.1)
    want = -math.log2(stats.norm.cdf(-3.0))
    assert abs(extrapolated_exposure(38.0, sample) - want) < 0.5


def test_candidate_enumeration_matches_direct_scoring():
    m = tiny(3)
    tok = ByteTokenizer()
    fmt = CanaryFormat("id ", "__-_", alphabet="0123")
    assert fmt.space_size == 64 and fmt.fill("012") == "id 01-2" and fmt.index("012") == 6
    fwd = jax.jit(lambda x: m(x))
    every = all_candidate_scores(fwd, tok, fmt, batch_size=8)
    secrets = ["".join(s) for s in np.array(np.meshgrid(*[list("0123")] * 3, indexing="ij")).reshape(3, -1).T]
    direct = sample_candidate_scores(fwd, tok, fmt, secrets, batch_size=64)
    assert [fmt.index(s) for s in secrets] == list(range(64))
    np.testing.assert_allclose(every, direct, rtol=1e-5)


@pytest.mark.slow
def test_canary_example_end_to_end():
    """examples/lm_canaries.py (about 3-5 min on 2 cores): non-private LoRA exposes the 16x canaries far
    more than DP-LoRA at epsilon 8. Bounds are loose against seed noise: the run with seed 0 gives a mean
    exposure of about 9 bits non-private vs about 3 bits with DP (docs/lm.md)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parent.parent / "examples" / "lm_canaries.py"
    spec = importlib.util.spec_from_file_location("lm_canaries", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.run(seed=0, verbose=False)
    ex = out["exposure"]
    assert abs(out["config"]["epsilon"] - 8.0) < 1e-2
    nonpriv, dp = ex["non-private LoRA"]["inserted x16"]["exposure"], ex["DP LoRA (eps=8)"]["inserted x16"]["exposure"]
    assert nonpriv > 5.0 and nonpriv > dp + 2.0
