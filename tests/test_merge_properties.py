"""Property tests (hypothesis) of the DToMe kernels and of a patched tiny ``CLIPVisionModel``.

``test_merge.py`` checks merging from the unmerged state with the hidden states as metric. Here the
kernels start from *any* valid state (random partitions, padding from the start, garbage in the
padding), with a separate metric, fp32 / bf16 / fp16 inputs up to large magnitudes, several steps; plus
padding-length and batch independence, exact threshold semantics, proportional attention, and the
same invariants through a real encoder with random thresholds.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from transformers import CLIPVisionConfig, CLIPVisionModel

import dymu
from conftest import assert_batch_equals_singles
from dymu.merge import TokenState, attention_bias, bipartite_match, merge_tokens, select_above_threshold
from dymu.thresholds import encoder_fingerprint

PROFILE = dict(deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS32 = torch.finfo(torch.float32).eps


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second thread only adds overhead


# --------------------------------------------------------------------------- random valid states


def _scale(dtype: torch.dtype, which: int) -> float:
    """Input magnitude: small, unit, large; the last is fp16's largest finite value (sums overflow fp16)."""
    big = torch.finfo(torch.float16).max if dtype == torch.float16 else 1e15
    return [1e-2, 1.0, 1e3, big][which]


def _random_state(g: torch.Generator, lengths: list[int], n0: int, protect_first: bool):
    """A valid :class:`TokenState`: image ``b`` has ``lengths[b]`` current tokens holding a random partition
    of its ``n0`` originals (in a random order; with ``protect_first`` original 0 alone at index 0)."""
    bsz, n = len(lengths), max(lengths)
    group_ids = torch.empty(bsz, n0, dtype=torch.long)
    for b, length in enumerate(lengths):
        first = int(protect_first)
        rest = torch.randperm(n0 - first, generator=g) + first  # originals to spread over groups first..L-1
        slots = length - first
        gid = torch.empty(n0, dtype=torch.long)
        if protect_first:
            gid[0] = 0
        if slots > 0:  # every group gets one original, the others go anywhere
            gid[rest[:slots]] = torch.arange(slots) + first
            gid[rest[slots:]] = torch.randint(first, length, (n0 - first - slots,), generator=g)
        group_ids[b] = gid
    sizes = torch.zeros(bsz, n).scatter_add_(1, group_ids, torch.ones(bsz, n0))
    mask = torch.arange(n) < torch.tensor(lengths)[:, None]
    return TokenState(sizes=sizes, group_ids=group_ids, padding_mask=None if mask.all() else mask,
                      merged=bool((sizes > 1).any()) or not mask.all())


def _lengths_strategy(n0: int, batch: int, protect_first: bool):
    low = 2 if protect_first and n0 >= 2 else 1  # a CLS image has CLS plus at least one patch group
    return st.lists(st.integers(low, n0), min_size=batch, max_size=batch)


def _valid(state: TokenState) -> torch.Tensor:
    if state.padding_mask is None:
        return torch.ones(state.sizes.shape, dtype=torch.bool)
    return state.padding_mask


def _metric(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A similarity metric that is a fixed function of each token (like the keys of a layer), not ``x``."""
    return x.float() @ w


def _step(x, state, w, threshold, protect_first):
    scores, dst = bipartite_match(_metric(x, w), state.padding_mask, protect_first=protect_first)
    return merge_tokens(x, state, select_above_threshold(scores, threshold), dst)


def _check_state(x: torch.Tensor, state: TokenState, n0: int, protect_first: bool) -> None:
    """Bookkeeping invariants: padding last with size 0, sizes sum to N0, group ids partition the originals."""
    valid = _valid(state)
    lengths = valid.sum(-1)
    bsz = x.shape[0]
    assert x.shape[:2] == state.sizes.shape and state.group_ids.shape == (bsz, n0)
    assert torch.isfinite(x).all()
    assert torch.equal(valid, torch.arange(x.shape[1]) < lengths[:, None])  # padding at the end of each row
    assert (state.padding_mask is None) == bool(valid.all())
    assert torch.equal(state.sizes.sum(-1), torch.full((bsz,), float(n0)))
    assert (state.sizes[~valid] == 0).all() and (state.sizes[valid] >= 1).all()
    gid = state.group_ids
    assert ((gid >= 0) & (gid < lengths[:, None])).all()  # every original sits in a real current token
    counts = torch.zeros_like(state.sizes).scatter_add_(1, gid, torch.ones(bsz, n0))
    assert torch.equal(counts, state.sizes)  # and every real token holds exactly `size` originals
    if protect_first:
        assert (gid[:, 0] == 0).all() and (state.sizes[:, 0] == 1).all()


def _mean_of_originals(x0: torch.Tensor, state0: TokenState, state: TokenState) -> torch.Tensor:
    """float64 reference: each current token = the plain mean of the originals it holds, where original
    ``o`` has the value of the start token ``state0.group_ids[o]`` (start tokens are means themselves)."""
    bsz, _, c = x0.shape
    orig = x0.double().gather(1, state0.group_ids[..., None].expand(-1, -1, c))  # (B, N0, C)
    total = torch.zeros(bsz, state.sizes.shape[1], c, dtype=torch.float64)
    total.scatter_add_(1, state.group_ids[..., None].expand(-1, -1, c), orig)
    return total / state.sizes.double().clamp_min(1)[..., None]


def _garbage_padding(x: torch.Tensor, state: TokenState, g: torch.Generator, extra: int) -> tuple:
    """The same batch with ``extra`` more padding slots, and finite garbage in every padding slot."""
    bsz, n, c = x.shape
    valid = torch.cat([_valid(state), torch.zeros(bsz, extra, dtype=torch.bool)], 1)
    big = min(1e4, float(torch.finfo(x.dtype).max))
    garbage = ((torch.rand(bsz, n + extra, c, generator=g) * 2 - 1) * big).to(x.dtype)
    x_pad = torch.where(valid[..., None], torch.cat([x, garbage[:, n:]], 1), garbage)
    sizes = torch.cat([state.sizes, torch.zeros(bsz, extra)], 1)
    return x_pad, TokenState(sizes, state.group_ids.clone(), valid, merged=state.merged)


# --------------------------------------------------------------------------- merge steps from any state


@settings(max_examples=300, **PROFILE)
@given(
    batch=st.integers(1, 4),
    n0=st.integers(1, 40),
    c=st.integers(1, 6),
    d=st.integers(1, 6),
    protect_first=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    scale=st.integers(0, 3),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_merge_steps_from_any_state(batch, n0, c, d, protect_first, dtype, scale, seed, data):
    """Several steps from a random padded state: invariants, CLS untouched, finite, size-weighted means,
    images that merge nothing unchanged."""
    lengths = data.draw(_lengths_strategy(n0, batch, protect_first), label="lengths")
    thresholds = data.draw(st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=4), label="thresholds")
    g = torch.Generator().manual_seed(seed)
    state0 = _random_state(g, lengths, n0, protect_first)
    x0 = ((torch.rand(batch, max(lengths), c, generator=g) * 2 - 1) * _scale(dtype, scale)).to(dtype)
    x0, state0 = _garbage_padding(x0, state0, g, extra=0) if state0.padding_mask is not None else (x0, state0)
    w = torch.randn(c, d, generator=g)
    _check_state(x0, state0, n0, protect_first)

    x, state = x0, state0
    for step, threshold in enumerate(thresholds, 1):
        x_prev, state_prev = x, state
        x, state = _step(x, state, w, threshold, protect_first)
        _check_state(x, state, n0, protect_first)
        assert x.dtype == dtype and state.merged == (state_prev.merged or state is not state_prev)
        len_prev, len_new = _valid(state_prev).sum(-1), _valid(state).sum(-1)
        assert (len_new <= len_prev).all()
        for b in torch.nonzero(len_new == len_prev).flatten().tolist():  # merged nothing: same order
            n = int(len_new[b])
            # values: x * s / s in fp32 may move an fp32 input by an ulp (exact for bf16 / fp16 inputs)
            torch.testing.assert_close(x[b, :n], x_prev[b, :n], rtol=2 * EPS32, atol=0)
            assert torch.equal(state.sizes[b, :n], state_prev.sizes[b, :n])
            assert torch.equal(state.group_ids[b], state_prev.group_ids[b])
        if protect_first:
            assert torch.equal(x[:, 0], x0[:, 0])  # CLS never merges: bit-identical

        # merged token == mean of its originals; rounding: one cast to `dtype` per step and fp32 sums
        # (a convex combination does not amplify earlier errors)
        valid = _valid(state)
        ref = _mean_of_originals(x0, state0, state)
        peak = x0.double()[_valid(state0)].abs().max()
        tol = float(peak) * (step * torch.finfo(dtype).eps + 2 * n0 * EPS32)
        err = (x.double() - ref).abs()[valid]
        assert err.max() <= tol, (err.max(), tol)


@settings(max_examples=250, **PROFILE)
@given(
    batch=st.integers(1, 4),
    n0=st.integers(1, 40),
    c=st.integers(3, 6),  # metrics in general position, see the docstring
    protect_first=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    extra=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_image_result_independent_of_batch_and_padding(batch, n0, c, protect_first, dtype, extra, seed, data):
    """Per image: in a padded batch == alone == with ``extra`` more (garbage) padding slots, over several steps.

    Not for exact ties: the batched ``a @ b.T`` of :func:`bipartite_match` rounds differently for different
    batch shapes (an ulp), so candidates whose cosines tie in exact arithmetic (e.g. collinear metrics)
    may be ranked differently; metrics here are in general position (C >= 3 channels into D = 4).
    """
    lengths = data.draw(_lengths_strategy(n0, batch, protect_first), label="lengths")
    thresholds = data.draw(st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=4), label="thresholds")
    g = torch.Generator().manual_seed(seed)
    state0 = _random_state(g, lengths, n0, protect_first)
    x0 = (torch.randn(batch, max(lengths), c, generator=g) * 3).to(dtype)
    w = torch.randn(c, 4, generator=g)
    x0, state0 = _garbage_padding(x0, state0, g, extra=0) if state0.padding_mask is not None else (x0, state0)
    x_more, state_more = _garbage_padding(x0, state0, g, extra=extra)

    def run(x, state):
        for threshold in thresholds:
            x, state = _step(x, state, w, threshold, protect_first)
        return x, state

    x, state = run(x0, state0)
    x_more, state_more = run(x_more, state_more)
    _check_state(x_more, state_more, n0, protect_first)
    n_batch, n_more = _valid(state).sum(-1), _valid(state_more).sum(-1)
    assert torch.equal(n_batch, n_more)
    tol = 4 * len(thresholds) * EPS32 * float(x0.float()[_valid(state0)].abs().max())
    for b, length in enumerate(lengths):
        alone = TokenState(state0.sizes[b : b + 1, :length].clone(), state0.group_ids[b : b + 1].clone(),
                           merged=state0.merged)
        x_alone, s_alone = run(x0[b : b + 1, :length], alone)
        n = int(n_batch[b])
        assert x_alone.shape[1] == n and s_alone.padding_mask is None
        for xs, ss in ((x, state), (x_more, state_more)):
            assert torch.equal(ss.group_ids[b], s_alone.group_ids[0])
            assert torch.equal(ss.sizes[b, :n], s_alone.sizes[0])
            # an image that merges nothing alone is returned as is, but in a batch that merges it goes
            # through x * s / s in fp32 (an ulp for fp32 inputs of size > 1): allow that per step
            torch.testing.assert_close(xs[b, :n], x_alone[0], rtol=0, atol=tol)


# --------------------------------------------------------------------------- threshold semantics


def _on_a_line(g: torch.Generator, bsz: int, n: int, d: int, signs: str) -> torch.Tensor:
    """Metric rows ``+-2^k e_j``: normalised exactly, so cosine similarities are exactly +1 or -1; for
    ``"collinear"`` rows ``+-r v`` (random ``r``, ``v``), whose rounded cosines may leave [-1, 1] unclamped."""
    if signs == "collinear":
        sign = torch.randint(0, 2, (bsz, n, 1), generator=g).float() * 2 - 1
        return sign * (torch.rand(bsz, n, 1, generator=g) * 10 + 0.1) * torch.randn(d, generator=g)
    axis = torch.zeros(d)
    axis[int(torch.randint(d, (1,), generator=g))] = 1.0
    if signs == "same":
        sign = torch.ones(bsz, n, 1)
    elif signs == "alternate":  # A-tokens (+) and B-tokens (-) antipodal: every best score is -1
        sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).expand(bsz, n)[..., None]
    else:
        sign = torch.randint(0, 2, (bsz, n, 1), generator=g).float() * 2 - 1
    return sign * 2.0 ** torch.randint(-3, 4, (bsz, n, 1), generator=g) * axis


@settings(max_examples=300, **PROFILE)
@given(
    batch=st.integers(1, 4),
    n=st.integers(1, 40),
    protect_first=st.booleans(),
    kind=st.sampled_from(["random", "same", "alternate", "mixed", "collinear"]),
    threshold=st.floats(-2.0, 2.0),
    pick=st.integers(0, 10**6),
    use_score=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
@example(batch=2, n=9, protect_first=True, kind="same", threshold=math.nextafter(1.0, 0.0), pick=0,
         use_score=False, seed=0)
@example(batch=2, n=9, protect_first=False, kind="alternate", threshold=math.nextafter(-1.0, -2.0), pick=0,
         use_score=False, seed=0)
def test_selection_is_a_strict_comparison_with_the_exact_threshold(batch, n, protect_first, kind, threshold,
                                                                   pick, use_score, seed):
    """``select_above_threshold`` merges exactly the edges with ``score > threshold`` (Python floats, no
    rounding of the threshold to the scores' dtype); a score equal to the threshold never merges."""
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(batch, n, 3, generator=g) if kind == "random" else _on_a_line(g, batch, n, 3, kind)
    scores, _ = bipartite_match(metric, protect_first=protect_first)
    finite = scores[torch.isfinite(scores)]
    if use_score and finite.numel():
        threshold = float(finite[pick % finite.numel()])  # ties: the threshold is one of the scores
    mask = select_above_threshold(scores, threshold)
    expected = [[float(s) > threshold for s in row] for row in scores.tolist()]
    assert mask.tolist() == expected


@settings(max_examples=250, **PROFILE)
@given(
    batch=st.integers(1, 4),
    n0=st.integers(1, 40),
    protect_first=st.booleans(),
    kind=st.sampled_from(["random", "same", "alternate", "mixed", "collinear"]),
    high=st.one_of(st.just(1.0), st.floats(1.0, 1e6)),
    low=st.one_of(st.just(math.nextafter(-1.0, -2.0)), st.floats(-1e6, -1.0, exclude_max=True)),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_extreme_thresholds(batch, n0, protect_first, kind, high, low, seed, data):
    """Scores are clamped to [-1, 1] and the rule is strict: a threshold >= 1 merges nothing, even identical
    tokens; a threshold < -1 merges every eligible A-token (real, not CLS, with a real B-token), even
    antipodal ones: an image of L tokens keeps ``floor(L / 2)`` plus CLS."""
    lengths = data.draw(_lengths_strategy(n0, batch, protect_first), label="lengths")
    g = torch.Generator().manual_seed(seed)
    state = _random_state(g, lengths, n0, protect_first)
    n = max(lengths)
    metric = torch.randn(batch, n, 3, generator=g) if kind == "random" else _on_a_line(g, batch, n, 3, kind)
    x = torch.randn(batch, n, 2, generator=g)
    scores, dst = bipartite_match(metric, state.padding_mask, protect_first=protect_first)
    finite = scores[torch.isfinite(scores)]
    assert ((finite >= -1) & (finite <= 1)).all()

    x_same, state_same = merge_tokens(x, state, select_above_threshold(scores, high), dst)
    assert x_same is x and state_same is state  # nothing merged anywhere

    x_all, state_all = merge_tokens(x, state, select_above_threshold(scores, low), dst)
    expected = [length if length == 1 else length // 2 + int(protect_first) for length in lengths]
    assert _valid(state_all).sum(-1).tolist() == expected
    _check_state(x_all, state_all, n0, protect_first)


@settings(max_examples=200, **PROFILE)
@given(
    batch=st.integers(1, 4),
    n0=st.integers(1, 40),
    protect_first=st.booleans(),
    t=st.lists(st.floats(-1.0, 1.0), min_size=2, max_size=2),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_higher_threshold_merges_a_subset(batch, n0, protect_first, t, seed, data):
    """One step: the A-tokens merged at a higher threshold are a subset of those at a lower one, so a
    higher threshold never leaves fewer tokens."""
    lengths = data.draw(_lengths_strategy(n0, batch, protect_first), label="lengths")
    low, high = sorted(t)
    g = torch.Generator().manual_seed(seed)
    state = _random_state(g, lengths, n0, protect_first)
    x = torch.randn(batch, max(lengths), 4, generator=g)
    scores, dst = bipartite_match(x + 0.3 * torch.randn(x.shape, generator=g), state.padding_mask, protect_first)
    m_low, m_high = select_above_threshold(scores, low), select_above_threshold(scores, high)
    assert not (m_high & ~m_low).any()
    _, s_low = merge_tokens(x, state, m_low, dst)
    _, s_high = merge_tokens(x, state, m_high, dst)
    assert (_valid(s_high).sum(-1) >= _valid(s_low).sum(-1)).all()


# --------------------------------------------------------------------------- matching and attention bias


@settings(max_examples=150, **PROFILE)
@given(
    batch=st.integers(1, 4),
    n0=st.integers(1, 40),
    d=st.integers(1, 8),
    protect_first=st.booleans(),
    log_scale=st.floats(-12.0, 12.0),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_bipartite_match_against_float64_cosines(batch, n0, d, protect_first, log_scale, seed, data):
    """Best score of each A-token = max float64 cosine over the real B-tokens, reached by ``dst``; -inf
    exactly for CLS, padded A-tokens and images without a B-token; invariant to per-token scaling."""
    lengths = data.draw(_lengths_strategy(n0, batch, protect_first), label="lengths")
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    mask = torch.arange(n) < torch.tensor(lengths)[:, None]
    metric = torch.randn(batch, n, d, generator=g)
    scaled = metric * 10 ** (log_scale * torch.rand(batch, n, 1, generator=g))  # per-token magnitudes 1e-12..1e12
    scaled[~mask] = 1e30  # garbage padding
    scores, dst = bipartite_match(scaled, mask, protect_first=protect_first)
    ref, _ = bipartite_match(metric, mask, protect_first=protect_first)
    unit = torch.nn.functional.normalize(metric.double(), dim=-1)
    for b, length in enumerate(lengths):
        for i, pos in enumerate(range(0, n, 2)):
            real_b = list(range(1, length, 2))
            if pos >= length or (protect_first and pos == 0) or not real_b:
                assert scores[b, i] == -math.inf
                continue
            cos = unit[b, real_b] @ unit[b, pos]
            assert int(dst[b, i]) * 2 + 1 in real_b
            assert abs(float(scores[b, i]) - float(cos.max().clamp(-1, 1))) <= 1e-5
            assert float(cos[real_b.index(int(dst[b, i]) * 2 + 1)]) >= float(cos.max()) - 1e-5
    torch.testing.assert_close(scores, ref, rtol=0, atol=1e-5)  # scale invariance


@settings(max_examples=200, **PROFILE)
@given(
    batch=st.integers(1, 4),
    n0=st.integers(1, 40),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_proportional_attention_equals_attention_over_the_unmerged_tokens(batch, n0, dtype, seed, data):
    """Softmax over current keys with the ``log s`` bias == softmax over the originals, each carrying its
    group's key (a merged token attends like ``s`` copies); padding keys get exactly zero weight."""
    lengths = data.draw(_lengths_strategy(n0, batch, False), label="lengths")
    g = torch.Generator().manual_seed(seed)
    state = _random_state(g, lengths, n0, protect_first=False)
    n = max(lengths)
    bias = attention_bias(state, dtype)
    if not state.merged:
        assert bias is None  # unmerged, unpadded: the host's attention runs as unpatched
        return
    assert bias.shape == (batch, 1, 1, n) and bias.dtype == dtype
    valid = _valid(state)
    logits = torch.randn(batch, n, generator=g) * 4  # one query's logits over the current keys
    logits[~valid] = 1e4  # garbage logits on padding must not matter
    p = (logits + bias[:, 0, 0].float()).softmax(-1)
    assert (p[~valid] == 0).all()
    p_orig = logits.gather(1, state.group_ids).softmax(-1)  # (B, N0): originals with their group's logit
    expected = torch.zeros(batch, n).scatter_add_(1, state.group_ids, p_orig)
    # log s rounded to `dtype` (error <= log(N0) eps / 2 per key) perturbs each weight by about twice that
    atol = 2 * math.log(max(n0, 2)) * torch.finfo(dtype).eps + 1e-6
    torch.testing.assert_close(p, expected, rtol=0, atol=atol)


# --------------------------------------------------------------------------- a real patched encoder

IMAGE, PATCH, LAYERS = 28, 7, 3
N0 = (IMAGE // PATCH) ** 2 + 1  # 17, CLS included
_MODELS: dict = {}


def _clip(attn: str) -> CLIPVisionModel:
    if attn not in _MODELS:
        config = CLIPVisionConfig(image_size=IMAGE, patch_size=PATCH, hidden_size=32, num_hidden_layers=LAYERS,
                                  num_attention_heads=4, intermediate_size=64, attn_implementation=attn)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            _MODELS[attn] = CLIPVisionModel(config).eval()
    return _MODELS[attn]


def _pixels(g: torch.Generator, kinds: list[int]) -> torch.Tensor:
    """Images of different redundancy: noise, smooth gradient, flat with a square, constant."""
    out = []
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, IMAGE), torch.linspace(-1, 1, IMAGE), indexing="ij")
    for kind in kinds:
        if kind == 0:
            img = torch.randn(3, IMAGE, IMAGE, generator=g)
        elif kind == 1:
            a = torch.randn(3, 2, generator=g)
            img = a[:, :1, None] * xx + a[:, 1:, None] * yy
        elif kind == 2:
            img = torch.full((3, IMAGE, IMAGE), float(torch.randn((), generator=g)))
            i, j = (int(v) for v in torch.randint(0, IMAGE - 10, (2,), generator=g))
            img[:, i : i + 10, j : j + 10] = -1.0
        else:
            img = torch.full((3, IMAGE, IMAGE), 0.5)
        out.append(img)
    return torch.stack(out)


@settings(max_examples=120, **PROFILE)
@given(
    kinds=st.lists(st.integers(0, 3), min_size=2, max_size=4),
    feature_layer=st.sampled_from([-1, -2]),
    attn=st.sampled_from(["eager", "sdpa"]),
    values=st.lists(st.one_of(st.floats(-1.0, 1.0), st.floats(0.9, 1.0)), min_size=LAYERS, max_size=LAYERS),
    seed=st.integers(0, 2**31 - 1),
)
def test_patched_clip_bookkeeping_and_batch_independence(kinds, feature_layer, attn, values, seed):
    """Random thresholds on a real CLIP tower: sizes sum to N0, groups partition the patches, CLS stays
    unmerged at index 0, and every image alone gives the same groups and features as in the batch."""
    model = _clip(attn)
    n_run = LAYERS + 1 + feature_layer
    thresholds = dymu.Thresholds(values=values[:n_run], encoder=encoder_fingerprint(model.config),
                                 num_layers=LAYERS, feature_layer=feature_layer)
    pixels = _pixels(torch.Generator().manual_seed(seed), kinds)
    dymu.apply_dtome(model, thresholds, feature_layer=feature_layer)
    try:
        with torch.no_grad():
            out = model(pixels)
            singles = [model(pixels[i : i + 1]) for i in range(len(kinds))]
    finally:
        dymu.remove(model)
    state = TokenState(out.token_sizes, out.group_ids, out.padding_mask)
    _check_state(out.last_hidden_state, state, N0, protect_first=True)
    lengths = _valid(state).sum(-1)
    assert (lengths >= 1 + (N0 - 1) // 2 ** n_run).all()  # at most half the patches merge per layer
    assert_batch_equals_singles(out, singles, lengths)

