"""VTU for transformers' RoPE decoders: ``LlamaModel`` (LLaVA-1.5's LLM) and ``Qwen2Model`` (LLaVA-OneVision's).

Both share the same forward structure; Qwen2 adds q/k/v biases (inside the projections), GQA, an optional
``sliding_window`` passed to the kernel, and per-layer-type masks (``config.layer_types``).

Three mixins, swapped in place by :func:`dymu.apply_vtu` (no parameters added, :func:`dymu.remove`
restores the host classes):

- :class:`VTUAttentionMixin` on every attention module, one method per path: the prefill (Q/K/V on merged
  tokens, expanded to virtual positions, RoPE at virtual positions, the host's attention kernel, re-merge by
  group mean), decode over a merged cache (the kernels of :mod:`dymu.kv_cache`, the cache layer of
  :mod:`dymu.patch.cache`), decode over an expanded cache (the host's forward).
- :class:`VTUDecoderMixin` on the decoder stack, the same three paths: virtual-length causal mask and RoPE
  tables for the prefill; the merged cache's additive mask, or a virtual-length padding mask, for decode steps.
- :class:`VTURootMixin` on the model ``generate`` is called on, so that ``vtu=`` is a declared
  forward argument (``generate`` rejects undeclared ones) and reaches every step.

RoPE is applied inside the host's attention forward before its kernel call, so VTU replaces that forward
(DyMU Sec. 3.2, ``docs/dymu-method.md`` Sec. 3; ``docs/architecture.md``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..kv_cache import VirtualPrompt, decode_bias
from ..vtu import VTUInputs, exact_attention, expand, remerge
from ._host import cache_keyword, one_cache, output_cache_field
from .cache import MergedKVLayer, layer_decode_attention, merged_layer

__all__ = ["VTUAttentionMixin", "VTUDecoderMixin", "VTURootMixin"]

logger = logging.getLogger(__name__)
_WARNED: set[str] = set()  # fallbacks already reported


class VTUAttentionMixin:
    """RoPE self-attention with virtual token unmerging.

    :meth:`forward` keeps the host's signature (the decoder layer passes ``attention_mask=``) and hands over to
    one of three paths; what the mask holds differs between them, so each path names it for what it is:

    - :meth:`_prefill` (``vtu`` given, no merged prompt cached yet): ``virtual_causal_mask``, the host's causal
      and padding mask over the ``L`` virtual positions;
    - :meth:`_decode_merged` (``vtu`` given, this layer's :class:`~dymu.patch.cache.MergedKVLayer` holds the
      prompt): ``merged_bias``, the ``(B, T, L_m + S + P)`` additive mask of :func:`~dymu.kv_cache.decode_bias`;
    - :meth:`_decode_expanded` (no ``vtu``: decode steps over an expanded cache, and any call without VTU):
      ``host_mask``, the host decoder's own mask, passed through.

    The KV cache may come as ``cache=`` (the host's name from transformers 5.24) or ``past_key_values=`` (before);
    it is passed on under the host's keyword, and two different caches raise ``ValueError``.
    Set by :func:`dymu.apply_vtu`: ``_dymu_rope`` (the host module's ``apply_rotary_pos_emb``) and
    ``_dymu_eager`` (its ``eager_attention_forward``).

    Shapes: B batch, H query heads, H_kv key/value heads, D head dim, C hidden size, L virtual prompt length,
    L_m merged prompt length, S decode tokens cached (current step included), T tokens of a decode step, P
    virtual positions of multi-member groups (:mod:`dymu.kv_cache`).
    """

    _dymu_rope: Callable
    _dymu_eager: Callable

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        vtu: VTUInputs | None = None,
        past_key_values=None,
        **kwargs,
    ):
        cache = one_cache(cache, past_key_values, type(self).__name__)
        if vtu is None:
            return self._decode_expanded(hidden_states, position_embeddings, attention_mask, cache, **kwargs)
        layer = merged_layer(cache, self.layer_idx)
        if layer is not None and layer.has_prompt:
            return self._decode_merged(hidden_states, position_embeddings, attention_mask, cache, layer)
        return self._prefill(hidden_states, position_embeddings, attention_mask, cache, layer, vtu, **kwargs)

    def _prefill(self, hidden_states, position_embeddings, virtual_causal_mask, cache, layer: MergedKVLayer | None,
                 vtu: VTUInputs, **kwargs):
        """Prefill: per-token work on the ``L_m`` merged tokens, attention over the ``L`` virtual ones.

        Modifications (vs ``LlamaAttention.forward`` / ``Qwen2Attention.forward``):
            - ``hidden_states`` are the ``L_m`` merged tokens; the Q/K/V projections run on them;
            - Q/K/V are expanded to the ``L`` virtual positions (``vtu.group_index``) and RoPE is applied there;
            - the cache stores the merged K (before RoPE) and V when ``layer`` is a merged cache layer
              (``vtu.cache == "merged"``), else the expanded, rotated K and V (``L`` rows, as the host would);
            - causal attention over the virtual sequence through ``ALL_ATTENTION_FUNCTIONS`` (or
              :func:`~dymu.vtu.exact_attention` when ``vtu.mode == "exact"``);
            - outputs are averaged per group back to ``L_m`` tokens (:func:`~dymu.vtu.remerge`) before ``o_proj``;
              no attention weights are returned.

        Args:
            hidden_states: ``(B, L_m, C)``.
            position_embeddings: the host's ``(cos, sin)``, each ``(B, L, D)``, at the virtual positions.
            virtual_causal_mask: the causal and padding mask over the ``L`` virtual positions, as the host's
                ``create_causal_mask`` (or ``create_sliding_window_causal_mask``) builds it for the configured
                attention implementation: e.g. ``(B, 1, L, L)`` additive for eager, ``None`` where the kernel
                masks causally by itself. The exact mode builds its own from ``vtu``.
            cache: ``None``, an empty host cache, or a cache of merged layers.
            layer: this layer's merged cache layer (not holding the prompt yet), or ``None``.
            vtu: the virtual layout.
            **kwargs: passed on to the attention kernel.

        Returns:
            ``(out, None)``, ``out`` ``(B, L_m, C)``.
        """
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)  # (B, L_m, C*)
        cos, sin = position_embeddings
        q_virtual, k_virtual = self._dymu_rope(_heads(expand(q, vtu.group_index), self.head_dim),
                                               _heads(expand(k, vtu.group_index), self.head_dim), cos, sin)
        v_virtual = _heads(expand(v, vtu.group_index), self.head_dim)  # (B, H_kv, L, D)
        q, k, v = _heads(q, self.head_dim), _heads(k, self.head_dim), _heads(v, self.head_dim)  # (B, H*, L_m, D)
        if layer is not None:
            cache.update(k, v, self.layer_idx)  # merged rows, keys before RoPE
        elif cache is not None:
            k_virtual, v_virtual = cache.update(k_virtual, v_virtual, self.layer_idx)
        if vtu.mode == "exact":
            out = exact_attention(q, k, v, cos, sin, vtu, self.scaling)
        else:
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self._dymu_eager)
            if getattr(self, "sliding_window", None) is not None:  # Qwen2 sliding layers; None on Llama
                kwargs["sliding_window"] = self.sliding_window
            out, _ = attention(
                self,
                q_virtual,
                k_virtual,
                v_virtual,
                virtual_causal_mask,
                dropout=0.0 if not self.training else self.attention_dropout,
                scaling=self.scaling,
                **kwargs,
            )  # (B, L, H, D)
        return self.o_proj(remerge(_merge_heads(out), vtu)), None  # (B, L_m, C)

    def _decode_merged(self, hidden_states, position_embeddings, merged_bias, cache, layer: MergedKVLayer):
        """Decode step of ``T`` new tokens over a merged cache that holds the prompt.

        Modifications (vs ``LlamaAttention.forward`` / ``Qwen2Attention.forward``):
            - the attention kernel is :func:`~dymu.kv_cache.merged_decode_attention` (through
              :func:`~dymu.patch.cache.layer_decode_attention`), not ``ALL_ATTENTION_FUNCTIONS``: the keys of
              multi-member groups are read at their members' virtual positions and the probabilities summed per
              group before the one matmul with the merged values (exact);
            - the mask is ``merged_bias``, not a host mask; no attention weights are returned.
        Projections, RoPE at the new tokens' positions and the cache append are the host's.

        Args:
            hidden_states: ``(B, T, C)`` the new tokens.
            position_embeddings: ``(cos, sin)``, each ``(B, T, D)``, at the new tokens' virtual positions.
            merged_bias: ``(B, T, L_m + S + P)`` float32 additive mask over the cached rows (the prompt's stored
                rows, then the decode rows: padding and causality) and then the virtual positions of
                multi-member groups, from :func:`~dymu.kv_cache.decode_bias`; the same for every layer.
            cache: the cache that holds ``layer``.
            layer: this layer's :class:`~dymu.patch.cache.MergedKVLayer`.

        Returns:
            ``(out, None)``, ``out`` ``(B, T, C)``.
        """
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)  # (B, T, C*)
        cos, sin = position_embeddings
        q, k = self._dymu_rope(_heads(q, self.head_dim), _heads(k, self.head_dim), cos, sin)  # (B, H*, T, D)
        cache.update(k, _heads(v, self.head_dim), self.layer_idx)
        out = layer_decode_attention(q, layer, merged_bias, self.scaling)  # (B, T, H, D)
        return self.o_proj(_merge_heads(out)), None

    def _decode_expanded(self, hidden_states, position_embeddings, host_mask, cache, **kwargs):
        """Decode step over an expanded cache, and every call without ``vtu``: the host's forward.

        Modifications (vs ``LlamaAttention.forward`` / ``Qwen2Attention.forward``): none; the cache is passed on
        under the keyword the host declares. An expanded cache holds the ``L`` expanded, rotated prompt rows, so
        the host's decode attention over it is already the virtual sequence's.

        Args:
            hidden_states: ``(B, T, C)``.
            position_embeddings: the host's ``(cos, sin)``, each ``(B, T, D)``.
            host_mask: the host decoder's mask for its attention implementation, over the cache's rows (with VTU:
                the ``L`` expanded prompt rows and the ``S`` decode rows, e.g. ``(B, 1, T, L + S)`` for eager;
                :class:`VTUDecoderMixin` rewrote the 2-D mask it comes from to that length).
            cache: the host cache, or ``None``.
            **kwargs: the host's.
        """
        kwargs[cache_keyword(super().forward)] = cache
        return super().forward(hidden_states, position_embeddings, host_mask, **kwargs)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Split heads: ``(B, N, H * D)`` -> ``(B, H, N, D)`` (a view of a contiguous ``x``, as the host's
    ``view(...).transpose(1, 2)``)."""
    return x.view(*x.shape[:2], -1, head_dim).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """Merge heads: ``(B, N, H, D)`` -> ``(B, N, H * D)`` (the kernels' output layout; copies if not contiguous).

    Plain ``view`` / ``reshape`` here and in :func:`_heads`, not ``einops.rearrange``: these run four times per
    layer and decode step, and ``rearrange`` cost 2.4x as much per call (27 vs 11 us on the AMD EPYC CI machine,
    measured side by side), about 2 ms per token over 32 layers."""
    return x.reshape(*x.shape[:2], -1)


class VTUDecoderMixin:
    """Decoder stack (``LlamaModel``) that understands ``vtu=``.

    :meth:`forward` hands a call with ``vtu`` to one of three paths, as :class:`VTUAttentionMixin` does.

    Modifications (vs ``LlamaModel.forward``), only when ``vtu`` is given:
        - prefill (empty cache, :meth:`_prefill`): the causal mask and RoPE tables are built over the ``L``
          virtual positions (``vtu.attention_mask``, ``vtu.position_ids``); ``vtu`` is passed to every layer. With
          ``vtu.cache == "merged"`` and a ``DynamicCache`` (what ``generate`` makes), each cache layer is
          replaced by a :class:`~dymu.patch.cache.MergedKVLayer` sharing the prompt's layout and RoPE tables;
        - decode over a merged cache (:meth:`_decode_merged`): the layers run with ``vtu`` and a
          ``(B, T, L_m + S + P)`` additive mask (:func:`~dymu.kv_cache.decode_bias`: stored rows, ``generate``'s
          2-D mask for the decode tokens, causal among them, then the positions of multi-member groups); RoPE
          tables at ``position_ids`` (``generate`` continues them from the last prompt position);
        - decode over an expanded cache (:meth:`_decode_expanded`): the host's 2-D mask covers ``L_m`` prompt
          slots plus the new tokens; it is rewritten to ``vtu.attention_mask`` plus the new tokens, so it matches
          the length-``L`` cache; without ``position_ids`` the new tokens continue each sample's own virtual
          length (:func:`continue_positions`); the host forward runs unchanged otherwise.
        - the KV cache is accepted as ``cache=`` or ``past_key_values=`` and passed to the host, the decoder
          layers and the mask functions under the keyword each declares (:func:`dymu.patch._host.cache_keyword`);
          the output's cache field is the host's (``cache`` from transformers 5.24).
    """

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        vtu: VTUInputs | None = None,
        past_key_values=None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        cache = one_cache(cache, past_key_values, type(self).__name__)
        if vtu is None:
            return self._host_forward(cache, input_ids=input_ids, attention_mask=attention_mask,
                                      position_ids=position_ids, inputs_embeds=inputs_embeds, use_cache=use_cache,
                                      **kwargs)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if cache is None or cache.get_seq_length() == 0:
            return self._prefill(input_ids, inputs_embeds, cache, use_cache, vtu, **kwargs)
        if attention_mask is None or attention_mask.ndim != 2:
            raise ValueError("VTU decode steps need the 2-D attention mask that generate() passes.")
        decode = self._decode_merged if merged_layer(cache, 0) is not None else self._decode_expanded
        return decode(input_ids, inputs_embeds, attention_mask, position_ids, cache, use_cache, vtu, **kwargs)

    def _host_forward(self, cache, **host) -> BaseModelOutputWithPast:
        """The host's forward, ``cache`` passed under the keyword it declares (``cache`` / ``past_key_values``)."""
        return super().forward(**{cache_keyword(super().forward): cache}, **host)

    def _prefill(self, input_ids, inputs_embeds, cache, use_cache, vtu: VTUInputs, **kwargs) -> BaseModelOutputWithPast:
        """The prefill over the ``L_m`` merged tokens, masks and RoPE tables at the ``L`` virtual positions.

        Raises:
            ValueError: the inputs are not ``vtu``'s ``(B, L_m)``.
        """
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        bsz, lm, _ = inputs_embeds.shape
        if lm != vtu.merged_length or vtu.group_index.shape[0] != bsz:
            raise ValueError(
                f"VTU prefill got {bsz} x {lm} merged tokens but vtu describes {vtu.group_index.shape[0]} x "
                f"{vtu.merged_length}; build inputs and VTUInputs together (llava.build_inputs)."
            )
        positions = vtu.position_ids.to(inputs_embeds.device)
        mask_kwargs = dict(
            config=self.config,
            inputs_embeds=inputs_embeds.new_empty(bsz, vtu.virtual_length, 0),  # only shape / dtype are read
            attention_mask=vtu.attention_mask.to(inputs_embeds.device),
            position_ids=positions,
        )
        mask_kwargs[cache_keyword(create_causal_mask)] = cache
        layer_types = getattr(self.config, "layer_types", None) or ["full_attention"] * self.config.num_hidden_layers
        masks = {"full_attention": create_causal_mask(**mask_kwargs)}  # each layer's virtual_causal_mask
        if "sliding_attention" in layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=positions)  # (B, L, D) each
        if vtu.cache == "merged" and cache is not None:
            self._install_merged_cache(cache, vtu, position_embeddings, layer_types)
        return self._run_layers(inputs_embeds, masks, layer_types, position_embeddings, positions, cache,
                                use_cache, vtu, **kwargs)

    def _decode_expanded(self, input_ids, inputs_embeds, attention_mask, position_ids, cache, use_cache, vtu,
                         **kwargs) -> BaseModelOutputWithPast:
        """One decode step over an expanded cache: the host's forward, its 2-D mask at the cache's length ``L + S``.

        The layers run without ``vtu`` (:meth:`VTUAttentionMixin._decode_expanded`).
        """
        tail = attention_mask[:, vtu.merged_length :]
        mask = torch.cat([vtu.attention_mask.to(attention_mask), tail], dim=1)
        if position_ids is None:  # the host would count the padded length L (wrong for left-padded samples)
            t = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            position_ids = continue_positions(vtu.attention_mask.to(tail.device), tail.bool(), t)
        return self._host_forward(cache, input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                  inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)

    def _run_layers(self, hidden_states, masks, layer_types, position_embeddings, positions, past_key_values,
                    use_cache, vtu, **kwargs) -> BaseModelOutputWithPast:
        """The decoder layers over merged rows. ``output_hidden_states=True`` (or the config's flag) returns the
        host's tuple convention at the merged length: the input of layer 0, then every layer's output, the last
        one after the final norm, each ``(B, L_m, C)`` (``dymu.vtu.expand`` maps them to the virtual layout).

        Raises:
            NotImplementedError: ``output_attentions=True`` (VTU's attention weights live at the virtual length
                and are not collected).
        """
        if kwargs.pop("output_attentions", None):
            raise NotImplementedError("VTU does not return attention weights; run without output_attentions.")
        collect = kwargs.pop("output_hidden_states", None)
        collect = self.config.output_hidden_states if collect is None else collect
        states = [hidden_states] if collect else None
        layers = self.layers[: self.config.num_hidden_layers]
        kwargs[cache_keyword(type(layers[0]).forward)] = past_key_values
        for layer, layer_type in zip(layers, layer_types):
            hidden_states = layer(
                hidden_states,
                attention_mask=masks[layer_type],
                position_embeddings=position_embeddings,
                position_ids=positions,
                use_cache=use_cache,
                vtu=vtu,
                **kwargs,
            )
            if states is not None:
                states.append(hidden_states)
        last = self.norm(hidden_states)
        if states is not None:
            states[-1] = last
        return BaseModelOutputWithPast(last_hidden_state=last, hidden_states=tuple(states) if states is not None else None,
                                       **{output_cache_field(BaseModelOutputWithPast): past_key_values})

    def _install_merged_cache(self, cache, vtu: VTUInputs, position_embeddings, layer_types) -> None:
        """Replace the empty layers of a ``DynamicCache`` by merged layers (else keep the expanded cache)."""
        if "sliding_attention" in layer_types or not isinstance(cache, DynamicCache):
            reason = "sliding-window layers" if "sliding_attention" in layer_types else type(cache).__name__
            if reason not in _WARNED:
                logger.warning("VTU merged KV cache is not available with %s; using the expanded cache.", reason)
                _WARNED.add(reason)
            return
        cos, sin = position_embeddings
        prompt = VirtualPrompt.from_host(vtu.group_index.to(cos.device), vtu.attention_mask.to(cos.device), cos, sin,
                                         merged_length=vtu.merged_length)
        cache.layers = [MergedKVLayer(prompt, vtu.merged_length) for _ in range(self.config.num_hidden_layers)]

    def _decode_merged(self, input_ids, inputs_embeds, attention_mask, position_ids, cache, use_cache, vtu,
                       **kwargs) -> BaseModelOutputWithPast:
        """One decode step (``T`` new tokens) over a merged cache: every layer's ``merged_bias``
        (:meth:`VTUAttentionMixin._decode_merged`) from ``generate``'s 2-D mask, RoPE at the new positions.

        Raises:
            ValueError: the 2-D mask is not ``(B, L_m + S)``.
        """
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        bsz, t, _ = inputs_embeds.shape
        first = merged_layer(cache, 0)
        lm, cached = first.merged_length, cache.get_seq_length()
        if attention_mask.shape != (bsz, cached + t):
            raise ValueError(f"VTU decode: the 2-D attention mask is {tuple(attention_mask.shape)} but the merged cache "
                             f"holds {cached} rows and {t} new tokens come; pass generate()'s mask.")
        prompt_mask = first.prompt.attention_mask  # (B, L)
        tail_mask = attention_mask[:, lm:].to(prompt_mask.device).bool()  # (B, S)
        if position_ids is None:
            position_ids = continue_positions(prompt_mask, tail_mask, t)
        s = tail_mask.shape[1]
        causal = torch.ones(t, s, dtype=torch.bool, device=tail_mask.device).tril(diagonal=s - t)
        merged_bias = decode_bias(first.prompt, tail_mask[:, None, :] & causal)  # (B, T, L_m + S + P), every layer
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        layer_types = ["full_attention"] * self.config.num_hidden_layers
        return self._run_layers(inputs_embeds, {"full_attention": merged_bias}, layer_types, position_embeddings,
                                position_ids, cache, use_cache, vtu, **kwargs)


def continue_positions(prompt_mask: torch.Tensor, tail_mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Virtual positions of a decode step's tokens when ``generate`` passes none (it derives no ``position_ids`` for
    the patched root, whose forward does not declare them): after each sample's own last real virtual position.

    Args:
        prompt_mask: ``(B, L)`` real virtual prompt positions.
        tail_mask: ``(B, S)`` bool, the decode tokens so far (current step's ``T`` last).
        new_tokens: ``T``.

    Returns:
        ``(B, T)`` long: ``(real prompt positions) + (real decode tokens up to and including this one) - 1``, so a
        left-padded sample continues at its own length, not at the padded ``L``.
    """
    real = prompt_mask.sum(-1, keepdim=True) + tail_mask.long().cumsum(-1) - 1
    return real[:, -new_tokens:].clamp_min(0)


class VTURootMixin:
    """Declares ``vtu`` on the forward of the model ``generate()`` is called on.

    Modifications: ``forward(..., vtu=None, ...)`` passes ``vtu`` down through ``**kwargs`` (transformers
    forwards extra keyword arguments to the decoder and every attention call); ``generate`` only accepts
    model kwargs the root forward declares, and then hands them to every step. A cache given as ``cache=`` or
    ``past_key_values=`` is passed on under the keyword the host declares (transformers 5.24 renamed it;
    :mod:`dymu.patch._host`), so neither name is dropped. ``generate``'s input expansion
    (beam search, ``num_return_sequences``) repeats ``vtu`` with the other inputs.
    """

    def forward(self, *args, vtu: VTUInputs | None = None, **kwargs):
        if vtu is not None:
            kwargs["vtu"] = vtu
        if "cache" in kwargs or "past_key_values" in kwargs:  # either name, passed on under the host's
            given = one_cache(kwargs.pop("cache", None), kwargs.pop("past_key_values", None), type(self).__name__)
            kwargs[cache_keyword(super().forward)] = given
        return super().forward(*args, **kwargs)

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids=None,
                                      **model_kwargs):
        """``generate`` repeats every input tensor for beam search / ``num_return_sequences``; ``vtu`` too."""
        if expand_size > 1 and model_kwargs.get("vtu") is not None:
            model_kwargs["vtu"] = model_kwargs["vtu"].repeat_interleave(expand_size)
        return super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **model_kwargs)
