"""Secret Sharer exposure (Carlini, Liu, Erlingsson, Kos, Song; USENIX Security 2019).

A canary ``s[r]`` is a format ``s`` (``"my account number is ____-__"``) filled with randomness ``r`` drawn
uniformly from a space ``R`` (here: digit strings). After training on data that contains the canary, rank
every candidate ``r' in R`` by the model's log-perplexity of ``s[r']``,

    Px(s[r']) = -sum_i log2 p(x_i | x_<i)   over the tokens after the fixed prefix,

and let ``rank(r)`` be the canary's position in that order (1 = the model's most likely candidate). Then

    exposure(r) = log2 |R| - log2 rank(r)

ranges from 0 (the canary is the least likely candidate) to ``log2 |R|`` (it is the most likely: the model
has memorised it). A canary the model never saw has, in expectation, exposure about 1 bit (rank ~ |R|/2).
Reference numbers (docs/privacy.md): ``|R| = 2^30``: rank 1 -> 30 bits, rank 1024 -> 20 bits.

When ``|R|`` is too large to enumerate, the paper's extrapolation fits a skew-normal distribution to the
log-perplexities of a random sample of candidates and estimates ``rank / |R|`` by its CDF at the canary:
``exposure ~ -log2 CDF(Px(canary))`` (:func:`extrapolated_exposure`).

Ties: a candidate with exactly the canary's log-perplexity counts as ranked after it (rank = 1 + number of
candidates strictly more likely). This is the optimistic-for-the-attacker convention (the larger exposure).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["exposure_from_rank", "rank_of", "exposure", "extrapolated_exposure", "sequence_log_perplexity",
           "CanaryFormat", "all_candidate_scores", "sample_candidate_scores"]


def exposure_from_rank(rank: int | float | np.ndarray, space_size: int | float) -> float | np.ndarray:
    """``log2 |R| - log2 rank`` (bits). ``rank`` is 1-based and at most ``|R|``."""
    rank = np.asarray(rank, dtype=np.float64)
    if np.any(rank < 1) or np.any(rank > space_size):
        raise ValueError(f"rank must be in [1, |R| = {space_size}], got {rank}")
    out = math.log2(space_size) - np.log2(rank)
    return float(out) if out.ndim == 0 else out


def rank_of(canary_score: float, candidate_scores: np.ndarray) -> int:
    """1 + the number of candidates with a strictly smaller log-perplexity than the canary.

    ``candidate_scores`` is the whole space ``R`` (it may or may not contain the canary itself; the canary's
    own score is never strictly smaller than itself, so the result is the same)."""
    return 1 + int(np.sum(np.asarray(candidate_scores) < canary_score))


def exposure(canary_score: float, candidate_scores: np.ndarray, space_size: int | None = None) -> float:
    """Exact exposure from a full enumeration: ``log2 |R| - log2 rank_of(...)``; ``|R|`` defaults to the
    number of candidate scores."""
    n = len(candidate_scores) if space_size is None else space_size
    return float(exposure_from_rank(rank_of(canary_score, candidate_scores), n))   # a scalar rank: a float


def extrapolated_exposure(canary_score: float, sample_scores: np.ndarray) -> float:
    """The paper's estimate ``-log2 F(Px(canary))`` with ``F`` a skew-normal fitted (maximum likelihood,
    ``scipy.stats.skewnorm``) to log-perplexities of candidates drawn uniformly from ``R``."""
    from scipy import stats

    a, loc, scale = stats.skewnorm.fit(np.asarray(sample_scores, np.float64))
    logcdf = stats.skewnorm.logcdf(canary_score, a, loc, scale)
    return float(-logcdf / math.log(2.0))


def sequence_log_perplexity(logits: jax.Array, tokens: jax.Array, score_mask: jax.Array) -> jax.Array:
    """``-sum_t log2 p(tokens[t+1] | tokens[<=t])`` over positions with ``score_mask[:, t+1]``; ``[B]`` bits."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    lp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return -jnp.sum(lp * score_mask[:, 1:], axis=1) / jnp.log(2.0)


class CanaryFormat:
    """A canary template over single-token symbols: ``prefix`` + ``pattern`` where ``pattern`` has one ``_``
    per secret symbol (e.g. ``"my account number is "`` + ``"____-__"``), symbols from ``alphabet``.

    ``|R| = len(alphabet) ** pattern.count("_")``. Each symbol must be one token of the tokenizer (true for
    digits with the byte-level tokenizer), and the pattern must end with a ``_``.
    """

    def __init__(self, prefix: str = "my account number is ", pattern: str = "____-_",
                 alphabet: str = "0123456789"):
        if not pattern.endswith("_"):
            raise ValueError("the pattern must end with a secret symbol '_'")
        self.prefix, self.pattern, self.alphabet = prefix, pattern, alphabet
        self.length = pattern.count("_")

    @property
    def space_size(self) -> int:
        return len(self.alphabet) ** self.length

    def fill(self, secret: Sequence[int] | str) -> str:
        sym = [self.alphabet[int(i)] for i in secret] if not isinstance(secret, str) else list(secret)
        if len(sym) != self.length:
            raise ValueError(f"secret needs {self.length} symbols, got {len(sym)}")
        it = iter(sym)
        return self.prefix + "".join(next(it) if c == "_" else c for c in self.pattern)

    def random_secret(self, rng: np.random.Generator) -> str:
        return "".join(rng.choice(list(self.alphabet), self.length))

    def index(self, secret: str) -> int:
        """Position of ``secret`` in the lexicographic enumeration of ``R``."""
        base = len(self.alphabet)
        return int(sum(self.alphabet.index(c) * base ** (self.length - 1 - i) for i, c in enumerate(secret)))


def _as_logits_fn(logits_fn):
    """Accept an NNX model (made pure with split/merge, so it can be traced inside ``jax.jit``) or a function."""
    from flax import nnx

    if isinstance(logits_fn, nnx.Module):
        graphdef, state = nnx.split(logits_fn)
        return lambda tokens: nnx.merge(graphdef, state)(tokens)
    return logits_fn


def _encode(tok, text: str) -> list[int]:
    return [tok.eos_id] + tok.encode(text)


def _check_single_tokens(tok, fmt: CanaryFormat) -> list[int]:
    ids = []
    for c in fmt.alphabet:
        e = tok.encode(c)
        if len(e) != 1:
            raise ValueError(f"symbol {c!r} is {len(e)} tokens; exposure enumeration needs one token per symbol")
        ids.append(e[0])
    return ids


def all_candidate_scores(logits_fn: Callable[[jax.Array], jax.Array], tok, fmt: CanaryFormat, *,
                         batch_size: int = 1024) -> np.ndarray:
    """Log-perplexity (bits, over the tokens after ``fmt.prefix``) of EVERY candidate, in the order of
    :meth:`CanaryFormat.index`. Shape ``[|R|]``.

    Uses one forward pass per candidate *without its last symbol*: the logits at the last position score all
    ``len(alphabet)`` completions at once, so the cost is ``|R| / len(alphabet)`` sequences.
    ``logits_fn``: a :class:`jaxdp.lm.GPT2` (or any NNX model), or a pure ``tokens [B, T] -> logits [B, T, V]``.
    """
    logits_fn = _as_logits_fn(logits_fn)
    sym_ids = np.asarray(_check_single_tokens(tok, fmt))
    A, L = len(fmt.alphabet), fmt.length
    n_prefix = len(_encode(tok, fmt.prefix))
    template = np.asarray(_encode(tok, fmt.fill(fmt.alphabet[0] * L)), np.int32)
    T = len(template)
    slot_pos = [n_prefix + i for i, c in enumerate(fmt.pattern) if c == "_"]
    assert slot_pos[-1] == T - 1
    n_head = A ** (L - 1)
    score_mask = np.zeros((1, T), np.float32)
    score_mask[0, n_prefix:T - 1] = 1.0   # every token after the prefix except the last symbol

    @jax.jit
    def scores(tokens):
        logits = logits_fn(tokens)
        partial = sequence_log_perplexity(logits, tokens, jnp.asarray(score_mask))
        last = jax.nn.log_softmax(logits[:, T - 2].astype(jnp.float32), axis=-1)[:, sym_ids] / -jnp.log(2.0)
        return partial[:, None] + last                                         # [B, A]

    out = np.empty((n_head, A), np.float64)
    digits = np.asarray(list(itertools.product(range(A), repeat=L - 1)), np.int64).reshape(n_head, L - 1)
    for start in range(0, n_head, batch_size):
        d = digits[start:start + batch_size]
        n = d.shape[0]
        batch = np.tile(template, (batch_size, 1))
        for j, pos in enumerate(slot_pos[:-1]):
            batch[:n, pos] = sym_ids[d[:, j]]
        out[start:start + n] = np.asarray(scores(jnp.asarray(batch)))[:n]
    return out.reshape(-1)


def sample_candidate_scores(logits_fn, tok, fmt: CanaryFormat, secrets: Sequence[str], *,
                            batch_size: int = 1024) -> np.ndarray:
    """Log-perplexity (bits, after the prefix) of the given filled secrets (for the sampling approach)."""
    logits_fn = _as_logits_fn(logits_fn)
    n_prefix = len(_encode(tok, fmt.prefix))
    seqs = np.asarray([_encode(tok, fmt.fill(s)) for s in secrets], np.int32)
    T = seqs.shape[1]
    mask = np.zeros((1, T), np.float32)
    mask[0, n_prefix:] = 1.0

    @jax.jit
    def scores(tokens):
        return sequence_log_perplexity(logits_fn(tokens), tokens, jnp.asarray(mask))

    out = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - n, 0)])
        out.append(np.asarray(scores(jnp.asarray(chunk)))[:n])
    return np.concatenate(out).astype(np.float64)
