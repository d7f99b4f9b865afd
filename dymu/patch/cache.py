"""The merged VTU KV cache as a transformers cache layer (host glue around the kernels of :mod:`dymu.kv_cache`).

:class:`MergedKVLayer` keeps one decoder layer's rows in a transformers ``DynamicLayer`` (so ``generate``, beam
search and batch edits treat it like any cache layer) together with the prompt's
:class:`~dymu.kv_cache.VirtualPrompt`; the arithmetic (rotating singleton rows, the decode attention) is in
:mod:`dymu.kv_cache`, which knows nothing of transformers. :class:`dymu.patch.llama.VTUDecoderMixin` installs the
layers in the prefill's ``DynamicCache``; :func:`layer_decode_attention` reads one during a decode step.

Shapes: B batch, H query heads, H_kv key/value heads, D head dim, L_m merged prompt length, S decode tokens
cached so far (current step included), T query tokens of the current step, P virtual positions of multi-member
groups (as in :mod:`dymu.kv_cache`).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..kv_cache import VirtualPrompt, merged_decode_attention, rotate_singletons

__all__ = ["MergedKVLayer", "merged_layer", "layer_decode_attention", "kv_cache_bytes"]


class MergedKVLayer(DynamicLayer):
    """One decoder layer's merged KV cache (a transformers ``DynamicLayer``).

    ``keys`` / ``values`` are ``(B, H_kv, L_m + S, D)``: the first ``L_m`` rows are the merged prompt's keys
    (singleton rows rotated at their position, multi-member rows **before RoPE**) and its values; the ``S`` rows
    after them belong to decode tokens, keys after RoPE, as in an ordinary cache. ``get_seq_length()`` is
    ``L_m + S``, which is also the length of the 2-D attention mask ``generate`` keeps for merged inputs.

    Args:
        prompt: the virtual layout (shared between layers).
        merged_length: ``L_m`` (the prompt's :attr:`~dymu.kv_cache.VirtualPrompt.merged_length`).
    """

    def __init__(self, prompt: VirtualPrompt, merged_length: int):
        super().__init__()
        self.prompt = prompt
        self.merged_length = merged_length

    @property
    def has_prompt(self) -> bool:
        """True once the prefill has stored the merged prompt."""
        return self.is_initialized and self.keys.shape[-2] >= self.merged_length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append K/V: the prefill's merged ``(B, H_kv, L_m, D)`` (keys before RoPE; singleton rows are rotated
        here, at their one position, by :func:`~dymu.kv_cache.rotate_singletons`), then decode rows (rotated).

        Returns:
            ``(keys, values)``, each ``(B, H_kv, L_m + S, D)``: every row cached so far.

        Raises:
            ValueError: the first update is not ``L_m`` rows long.
        """
        if not self.has_prompt:
            if key_states.shape[-2] != self.merged_length:
                raise ValueError(f"MergedKVLayer expects the {self.merged_length} merged prompt rows first, "
                                 f"got {key_states.shape[-2]}.")
            key_states = rotate_singletons(key_states, self.prompt)
        return super().update(key_states, value_states)

    # batch / length edits keep the layout in step with the rows
    def crop(self, tokens_to_remove: int) -> None:
        """Drop decode rows from the end (``tokens_to_remove < 0``); the merged prompt cannot be cropped.

        Raises:
            ValueError: cropping would cut into the prompt.
        """
        if tokens_to_remove < 0 and self.is_initialized and self.keys.shape[-2] + tokens_to_remove < self.merged_length:
            raise ValueError("cannot crop a merged VTU cache into its prompt; use vtu cache='expanded'.")
        super().crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.prompt = self.prompt.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.prompt = self.prompt.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.prompt = self.prompt.map_batch(lambda t: t[indices])


def merged_layer(cache: Cache | None, layer_idx: int) -> MergedKVLayer | None:
    """The merged cache layer of ``layer_idx``, if ``cache`` holds one (else ``None``: no cache, or an expanded /
    ordinary one)."""
    layers = getattr(cache, "layers", None)
    if layers is not None and layer_idx < len(layers) and isinstance(layers[layer_idx], MergedKVLayer):
        return layers[layer_idx]
    return None


def layer_decode_attention(q: torch.Tensor, layer: MergedKVLayer, bias: torch.Tensor, scaling: float,
                           method: str = "auto") -> torch.Tensor:
    """:func:`~dymu.kv_cache.merged_decode_attention` over the rows ``layer`` holds.

    Args:
        q: ``(B, H, T, D)`` queries after RoPE.
        layer: the cache layer, already updated with this step's rows.
        bias: ``(B, T, L_m + S + P)`` from :func:`~dymu.kv_cache.decode_bias`.
        scaling: logit scale.
        method: see :func:`~dymu.kv_cache.virtual_logits`.

    Returns:
        ``(B, T, H, D)`` in ``q.dtype``.
    """
    return merged_decode_attention(q, layer.keys, layer.values, layer.prompt, bias, scaling, method)


def kv_cache_bytes(cache: Cache) -> int:
    """Bytes held by a transformers cache: every layer's keys and values, plus (once) a merged cache's layout.

    Args:
        cache: a ``DynamicCache`` (plain or holding :class:`MergedKVLayer` s).

    Returns:
        Total bytes of the distinct tensors the cache keeps alive.
    """
    seen: dict[int, int] = {}
    for layer in cache.layers:
        tensors = [layer.keys, layer.values]
        if isinstance(layer, MergedKVLayer):
            tensors += list(layer.prompt.tensors())
        for tensor in tensors:
            if tensor is not None and tensor.numel():
                seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(seen.values())
