"""flash-attn's two dynamic-batching kernels as plain torch (for CPU runs of Megatron's dynamic engine).

Megatron-Core's dynamic inference (``Attention.flash_decode_and_prefill``,
0.19.2) calls flash-attn 2's ``flash_attn_varlen_func`` (prefill and mixed
steps) and ``flash_attn_with_kvcache`` (decode-only steps) on a *paged* KV
cache: ``k_cache [num_blocks, block_size, heads_kv, dim]`` and a
``block_table [requests, max_blocks]`` naming each request's blocks. flash-attn
has no CPU build; these functions compute the same thing with dense torch ops
(one padded ``[requests, heads, q, k]`` score tensor per call, no Python loop
over tokens or requests). They are correct, not fast: meant for tests and CPU
runs.

Semantics followed (flash-attn 2.7 docstrings):

* ``causal=True`` aligns the causal mask to the bottom right: query ``i`` of a
  request with ``Lq`` queries and ``Lk`` keys sees keys ``j <= i + Lk - Lq``.
* ``window_size=(left, right)``, ``-1`` meaning unbounded: query ``i`` sees keys
  ``j`` with ``i + Lk - Lq - left <= j <= i + Lk - Lq + right``.
* grouped-query attention: query head ``h`` reads key/value head
  ``h // (heads_q // heads_kv)``.
* ``softmax_lse`` (natural-log sum of exp of the scaled scores): ``[heads, total_q]``
  for the varlen function, ``[batch, heads, q]`` for the kv-cache one.

A query row that sees no key (cannot happen with ``causal`` and ``Lk >= Lq``)
gets zeros and an lse of ``-inf``, like flash-attn.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

Window = Tuple[int, int]


def _lengths(cu: torch.Tensor) -> torch.Tensor:
    return (cu[1:] - cu[:-1]).to(torch.int64)


def gather_keys(cache: torch.Tensor, lengths_k: torch.Tensor, max_k: int,
                block_table: Optional[torch.Tensor] = None,
                cu_seqlens_k: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Each request's keys (or values), padded: ``[B, max_k, heads_kv, dim]``.

    Args:
        cache: paged ``[num_blocks, block_size, H, D]`` (with ``block_table``) or
            packed ``[total_k, H, D]`` (with ``cu_seqlens_k``).
        lengths_k: ``[B]`` keys per request.
        max_k: the padded key length (>= every length).
        block_table: ``[B, max_blocks]`` int block ids, or None.
        cu_seqlens_k: ``[B + 1]`` cumulative key lengths (packed layout), or None.
    Rows past a request's length hold whatever the index clamps to (masked later).
    """
    num = lengths_k.shape[0]
    pos = torch.arange(max_k, device=cache.device).unsqueeze(0).expand(num, max_k)  # [B, Lk]
    if block_table is not None:
        block_size = cache.shape[1]
        col = torch.clamp(pos // block_size, max=block_table.shape[1] - 1)
        blocks = block_table.to(torch.int64).gather(1, col)  # [B, Lk]
        blocks = torch.clamp(blocks, min=0)  # unused entries may be -1
        return cache[blocks, pos % block_size]  # [B, Lk, H, D]
    assert cu_seqlens_k is not None, "a packed key layout needs cu_seqlens_k"
    start = cu_seqlens_k[:-1].to(torch.int64).unsqueeze(1)
    index = torch.clamp(start + pos, max=max(cache.shape[0] - 1, 0))
    return cache[index]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths_q: torch.Tensor,
            lengths_k: torch.Tensor, softmax_scale: Optional[float], causal: bool,
            window_size: Window) -> Tuple[torch.Tensor, torch.Tensor]:
    """Padded attention: ``q [B, Lq, Hq, D]``, ``k, v [B, Lk, Hk, D]`` -> ``(out [B, Lq, Hq, Dv], lse [B, Hq, Lq])``."""
    heads_q, heads_kv = q.shape[2], k.shape[2]
    if heads_q % heads_kv:
        raise ValueError(f"query heads ({heads_q}) must be a multiple of key/value heads ({heads_kv})")
    if heads_q != heads_kv:
        k = k.repeat_interleave(heads_q // heads_kv, dim=2)
        v = v.repeat_interleave(heads_q // heads_kv, dim=2)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale  # [B, H, Lq, Lk]
    max_q, max_k = q.shape[1], k.shape[1]
    i = torch.arange(max_q, device=q.device).view(1, max_q, 1)
    j = torch.arange(max_k, device=q.device).view(1, 1, max_k)
    shift = (lengths_k - lengths_q).view(-1, 1, 1)  # bottom-right alignment
    allowed = (j < lengths_k.view(-1, 1, 1)) & (i < lengths_q.view(-1, 1, 1))  # [B, Lq, Lk]
    left, right = window_size
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if right >= 0:
        allowed = allowed & (j <= i + shift + right)
    if left >= 0:
        allowed = allowed & (j >= i + shift - left)
    scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, Lq]
    probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)  # rows without keys -> 0
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v.float())
    return out.to(q.dtype), lse


def flash_attn_varlen_func(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int,
    dropout_p: float = 0.0, softmax_scale: Optional[float] = None, causal: bool = False,
    window_size: Window = (-1, -1), softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False, return_attn_probs: bool = False,
    block_table: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, None]]:
    """flash-attn 2's ``flash_attn_varlen_func`` in torch.

    Args:
        q: ``[total_q, Hq, D]`` the step's queries, request after request.
        k, v: ``[num_blocks, block_size, Hk, D]`` with ``block_table``, else ``[total_k, Hk, D]``.
        cu_seqlens_q, cu_seqlens_k: ``[B + 1]`` int32 cumulative lengths.
        max_seqlen_q, max_seqlen_k: the largest lengths (upper bounds).
        block_table: ``[B, max_blocks]`` int32, or None (packed keys).
    Returns:
        ``out [total_q, Hq, Dv]``; with ``return_attn_probs`` ``(out, softmax_lse [Hq, total_q], None)``.
    """
    if dropout_p or softcap or alibi_slopes is not None:
        raise NotImplementedError("the CPU flash_attn_varlen_func stand-in has no dropout, softcap or alibi")
    lengths_q, lengths_k = _lengths(cu_seqlens_q), _lengths(cu_seqlens_k)
    num = lengths_q.shape[0]
    max_q, max_k = int(max_seqlen_q), int(max_seqlen_k)
    total_q = q.shape[0]
    # Each query's (request, row): scatter q into [B, Lq, H, D] without a loop.
    token = torch.arange(total_q, device=q.device)
    starts = cu_seqlens_q[:-1].to(torch.int64)
    request = torch.searchsorted(cu_seqlens_q[1:].to(torch.int64), token, right=True).clamp(max=num - 1)
    row = token - starts[request]
    valid = row < lengths_q[request]  # rows past cu_seqlens_q[-1] (padding) stay out
    q_pad = q.new_zeros((num, max_q, *q.shape[1:]))
    q_pad[request[valid], row[valid]] = q[valid]
    keys = gather_keys(k, lengths_k, max_k, block_table, cu_seqlens_k)
    values = gather_keys(v, lengths_k, max_k, block_table, cu_seqlens_k)
    out_pad, lse_pad = _attend(q_pad, keys, values, lengths_q, lengths_k, softmax_scale, causal, window_size)
    out = out_pad.new_zeros((total_q, *out_pad.shape[2:]))
    out[valid] = out_pad[request[valid], row[valid]]
    if not return_attn_probs:
        return out
    lse = lse_pad.new_full((q.shape[1], total_q), float("-inf"))
    lse[:, valid] = lse_pad[request[valid], :, row[valid]].transpose(0, 1)
    return out, lse, None


def flash_attn_with_kvcache(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    k: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None,
    rotary_cos: Optional[torch.Tensor] = None, rotary_sin: Optional[torch.Tensor] = None,
    cache_seqlens: Optional[Union[int, torch.Tensor]] = None,
    cache_batch_idx: Optional[torch.Tensor] = None, cache_leftpad: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None, softmax_scale: Optional[float] = None,
    causal: bool = False, window_size: Window = (-1, -1), softcap: float = 0.0,
    rotary_interleaved: bool = True, alibi_slopes: Optional[torch.Tensor] = None,
    num_splits: int = 0, return_softmax_lse: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """flash-attn 2's ``flash_attn_with_kvcache`` in torch (reading the cache; no in-place append).

    Args:
        q: ``[B, Sq, Hq, D]``.
        k_cache, v_cache: ``[num_blocks, block_size, Hk, D]`` with ``block_table``, else ``[B, Lmax, Hk, D]``.
        cache_seqlens: ``[B]`` int32 keys per request (an int: the same for all).
        block_table: ``[B, max_blocks]`` int32, or None.
    Returns:
        ``out [B, Sq, Hq, Dv]``, or ``(out, softmax_lse [B, Hq, Sq])``.
    """
    if k is not None or v is not None or rotary_cos is not None or cache_batch_idx is not None \
            or cache_leftpad is not None or softcap or alibi_slopes is not None:
        raise NotImplementedError("the CPU flash_attn_with_kvcache stand-in only reads the cache "
                                  "(no k/v append, rotary, batch index, left padding, softcap or alibi)")
    num, sq = q.shape[0], q.shape[1]
    if cache_seqlens is None:
        raise ValueError("cache_seqlens is required")
    lengths_k = (torch.full((num,), int(cache_seqlens), device=q.device) if not torch.is_tensor(cache_seqlens)
                 else cache_seqlens.to(torch.int64).reshape(-1))
    if block_table is not None:
        max_k = block_table.shape[1] * k_cache.shape[1]
        keys = gather_keys(k_cache, lengths_k, max_k, block_table)
        values = gather_keys(v_cache, lengths_k, max_k, block_table)
    else:
        keys, values = k_cache[:num], v_cache[:num]
    lengths_q = torch.full((num,), sq, dtype=torch.int64, device=q.device)
    out, lse = _attend(q, keys, values, lengths_q, lengths_k, softmax_scale, causal, window_size)
    return (out, lse) if return_softmax_lse else out


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           softmax_scale: Optional[float] = None) -> torch.Tensor:
    """Reference: one sequence, ``q [Lq, H, D]`` the last ``Lq`` of ``k, v [Lk, H, D]``, causal.

    Written independently of the functions above (``torch.nn.functional.scaled_dot_product_attention``
    with an explicit boolean mask), for the tests.
    """
    lq, lk = q.shape[0], k.shape[0]
    mask = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)
    heads_q, heads_kv = q.shape[1], k.shape[1]
    if heads_q != heads_kv:
        k = k.repeat_interleave(heads_q // heads_kv, dim=1)
        v = v.repeat_interleave(heads_q // heads_kv, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1).float(), k.transpose(0, 1).float(), v.transpose(0, 1).float(),
        attn_mask=mask, scale=softmax_scale)
    return out.transpose(0, 1).to(q.dtype)
