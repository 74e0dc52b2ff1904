"""The torch stand-ins for flash-attn's paged kernels against dense causal attention.

Each request's keys are scattered into a paged cache through a shuffled block
table (so block order and request order both matter), and the paged functions'
output must equal :func:`dense_causal_attention` (``scaled_dot_product_attention``
with an explicit mask) on that request's contiguous keys.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from hypothesis import given, settings, strategies as st

from megatron_capaware._compat.paged_attention import (
    dense_causal_attention,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
)


def _paged_cache(keys: List[torch.Tensor], block_size: int, num_blocks: int, seed: int
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scatter per-request ``[Lk, H, D]`` into ``[num_blocks, block_size, H, D]`` via a shuffled table."""
    gen = torch.Generator().manual_seed(seed)
    heads, dim = keys[0].shape[1:]
    cache = torch.randn(num_blocks, block_size, heads, dim, generator=gen) * 100  # garbage elsewhere
    free = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(-(-k.shape[0] // block_size) for k in keys)
    table = torch.full((len(keys), max_blocks), -1, dtype=torch.int32)
    for r, k in enumerate(keys):
        for b in range(-(-k.shape[0] // block_size)):
            block = free.pop()
            table[r, b] = block
            part = k[b * block_size:(b + 1) * block_size]
            cache[block, :part.shape[0]] = part
    return cache, table


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(1, 9), st.integers(0, 12)), min_size=1, max_size=4),
    block_size=st.sampled_from([1, 4, 8]),
    heads=st.sampled_from([(2, 2), (4, 2), (4, 1)]),
    seed=st.integers(0, 1000),
)
def test_varlen_on_a_paged_cache_equals_dense_attention(lengths, block_size, heads, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    hq, hk, dim = heads[0], heads[1], 8
    q_lens = [lq for lq, _ in lengths]
    k_lens = [lq + past for lq, past in lengths]  # a prefill chunk after `past` cached tokens
    qs = [torch.randn(lq, hq, dim, generator=gen) for lq in q_lens]
    ks = [torch.randn(lk, hk, dim, generator=gen) for lk in k_lens]
    vs = [torch.randn(lk, hk, dim, generator=gen) for lk in k_lens]
    blocks = sum(-(-lk // block_size) for lk in k_lens) + 3
    k_cache, table = _paged_cache(ks, block_size, blocks, seed)
    v_cache, _ = _paged_cache(vs, block_size, blocks, seed)  # same seed: same table
    cu_q = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + k_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    pad = 3  # the engine's padded rows after the real queries
    q = torch.cat(qs + [torch.randn(pad, hq, dim, generator=gen)])
    out, lse, _ = flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, max(q_lens), max(k_lens),
                                         causal=True, block_table=table, return_attn_probs=True)
    expected = torch.cat([dense_causal_attention(a, b, c) for a, b, c in zip(qs, ks, vs)])
    torch.testing.assert_close(out[:-pad], expected, atol=1e-5, rtol=1e-5)
    assert lse.shape == (hq, q.shape[0]) and torch.isfinite(lse[:, :-pad]).all()
    # Packed (unpaged) keys give the same.
    packed = flash_attn_varlen_func(q, torch.cat(ks), torch.cat(vs), cu_q, cu_k, max(q_lens), max(k_lens),
                                    causal=True)
    torch.testing.assert_close(packed[:-pad], expected, atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    k_lens=st.lists(st.integers(1, 20), min_size=1, max_size=5),
    block_size=st.sampled_from([1, 4, 16]),
    heads=st.sampled_from([(2, 2), (4, 2)]),
    seed=st.integers(0, 1000),
)
def test_kvcache_decode_on_a_paged_cache_equals_dense_attention(k_lens, block_size, heads, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    hq, hk, dim = heads[0], heads[1], 8
    ks = [torch.randn(lk, hk, dim, generator=gen) for lk in k_lens]
    vs = [torch.randn(lk, hk, dim, generator=gen) for lk in k_lens]
    blocks = sum(-(-lk // block_size) for lk in k_lens) + 2
    k_cache, table = _paged_cache(ks, block_size, blocks, seed)
    v_cache, _ = _paged_cache(vs, block_size, blocks, seed)
    q = torch.randn(len(k_lens), 1, hq, dim, generator=gen)  # one decode token per request
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor(k_lens, dtype=torch.int32),
                                  block_table=table, causal=True)
    for r in range(len(k_lens)):
        torch.testing.assert_close(out[r], dense_causal_attention(q[r], ks[r], vs[r]), atol=1e-5, rtol=1e-5)


def test_the_reference_is_causal_attention() -> None:
    """The dense reference itself: the first query sees only the first key (its value comes back)."""
    q = torch.randn(3, 1, 4)
    k = torch.randn(3, 1, 4)
    v = torch.randn(3, 1, 4)
    out = dense_causal_attention(q, k, v)
    torch.testing.assert_close(out[0], v[0])


def test_sliding_window_and_unsupported_arguments() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(5, 1, 4, generator=gen) for _ in range(3))
    cu = torch.tensor([0, 5], dtype=torch.int32)
    out = flash_attn_varlen_func(q, k, v, cu, cu, 5, 5, causal=True, window_size=(0, 0))
    torch.testing.assert_close(out, v)  # a window of one key: each query gets its own value
    import pytest

    with pytest.raises(NotImplementedError, match="dropout"):
        flash_attn_varlen_func(q, k, v, cu, cu, 5, 5, dropout_p=0.1)
