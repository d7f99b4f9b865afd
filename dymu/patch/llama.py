"""VTU for transformers' RoPE decoders: ``LlamaModel`` (LLaVA-1.5's LLM) and ``Qwen2Model`` (LLaVA-OneVision's).

Both share the same forward structure; Qwen2 adds q/k/v biases (inside the projections), GQA, an optional
``sliding_window`` passed to the kernel, and per-layer-type masks (``config.layer_types``).

Three mixins, swapped in place by :func:`dymu.apply_vtu` (no parameters added, :func:`dymu.remove`
restores the host classes):

- :class:`VTUAttentionMixin` on every attention module: Q/K/V on merged tokens, expanded to virtual
  positions, RoPE at virtual positions, the host's attention kernel, re-merge by group mean.
- :class:`VTUDecoderMixin` on the decoder stack: virtual-length causal mask and RoPE tables for the
  prefill; virtual-length padding mask for decode steps.
- :class:`VTURootMixin` on the model ``generate`` is called on, so that ``vtu=`` is a declared
  forward argument (``generate`` rejects undeclared ones) and reaches every step.

RoPE is applied inside the host's attention forward before its kernel call, so VTU replaces that forward
(DyMU Sec. 3.2, ``docs/dymu-method.md`` Sec. 3; ``docs/architecture.md``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..vtu import VTUInputs, exact_attention, expand, remerge

__all__ = ["VTUAttentionMixin", "VTUDecoderMixin", "VTURootMixin"]


class VTUAttentionMixin:
    """RoPE self-attention with virtual token unmerging.

    Modifications (vs ``LlamaAttention.forward``), only when ``vtu`` is given (prefill):
        - ``hidden_states`` are the ``L_m`` merged tokens; Q/K/V projections run on them;
        - Q/K/V are expanded to the ``L`` virtual positions (``index`` gather), RoPE is applied with
          ``position_embeddings`` at the virtual positions, and the KV cache stores the expanded,
          rotated K and V (length ``L``), so decode steps are ordinary;
        - causal attention over the virtual sequence through ``ALL_ATTENTION_FUNCTIONS`` (or the exact
          decomposition when ``vtu.mode == "exact"``);
        - outputs are averaged per group back to ``L_m`` tokens before ``o_proj``.
    Without ``vtu`` (decode steps, or plain use) the host forward runs unchanged.
    Set by :func:`dymu.apply_vtu`: ``_dymu_rope`` (the host module's ``apply_rotary_pos_emb``) and
    ``_dymu_eager`` (its ``eager_attention_forward``).
    """

    _dymu_rope: Callable
    _dymu_eager: Callable

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        vtu: VTUInputs | None = None,
        **kwargs,
    ):
        if vtu is None:
            return super().forward(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
        bsz, lm, _ = hidden_states.shape
        heads = (bsz, lm, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(heads).transpose(1, 2)  # (B, H, L_m, D)
        k = self.k_proj(hidden_states).view(heads).transpose(1, 2)  # (B, H_kv, L_m, D)
        v = self.v_proj(hidden_states).view(heads).transpose(1, 2)
        cos, sin = position_embeddings  # (B, L, D) at virtual positions
        q_virtual, k_virtual = self._dymu_rope(expand(q, vtu.group_index), expand(k, vtu.group_index), cos, sin)
        v_virtual = expand(v, vtu.group_index)  # (B, H_kv, L, D)
        if past_key_values is not None:
            k_virtual, v_virtual = past_key_values.update(k_virtual, v_virtual, self.layer_idx)
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
                attention_mask,
                dropout=0.0 if not self.training else self.attention_dropout,
                scaling=self.scaling,
                **kwargs,
            )  # (B, L, H, D)
        out = remerge(out.reshape(bsz, vtu.virtual_length, -1), vtu)  # (B, L_m, C)
        return self.o_proj(out), None


class VTUDecoderMixin:
    """Decoder stack (``LlamaModel``) that understands ``vtu=``.

    Modifications (vs ``LlamaModel.forward``), only when ``vtu`` is given:
        - prefill (empty cache): the causal mask and RoPE tables are built over the ``L`` virtual
          positions (``vtu.attention_mask``, ``vtu.position_ids``); ``vtu`` is passed to every layer;
        - decode (cache holds the virtual prompt): the host's 2-D mask covers ``L_m`` prompt slots plus the
          new tokens; it is rewritten to ``vtu.attention_mask`` plus the new tokens, so it matches the
          length-``L`` cache; positions come from ``position_ids`` (``generate`` continues them from the
          last prompt position); the host forward runs unchanged otherwise.
    """

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        vtu: VTUInputs | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        host = dict(input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds, use_cache=use_cache)
        if vtu is None:
            return super().forward(attention_mask=attention_mask, past_key_values=past_key_values, **host, **kwargs)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            if attention_mask is None or attention_mask.ndim != 2:
                raise ValueError("VTU decode steps need the 2-D attention mask that generate() passes.")
            mask = torch.cat([vtu.attention_mask.to(attention_mask), attention_mask[:, vtu.merged_length :]], dim=1)
            host["use_cache"] = use_cache
            return super().forward(attention_mask=mask, past_key_values=past_key_values, **host, **kwargs)

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
            past_key_values=past_key_values,
            position_ids=positions,
        )
        layer_types = getattr(self.config, "layer_types", None) or ["full_attention"] * self.config.num_hidden_layers
        masks = {"full_attention": create_causal_mask(**mask_kwargs)}
        if "sliding_attention" in layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=positions)  # (B, L, D) each
        hidden_states = inputs_embeds
        for layer, layer_type in zip(self.layers[: self.config.num_hidden_layers], layer_types):
            hidden_states = layer(
                hidden_states,
                attention_mask=masks[layer_type],
                position_embeddings=position_embeddings,
                position_ids=positions,
                past_key_values=past_key_values,
                use_cache=use_cache,
                vtu=vtu,
                **kwargs,
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), past_key_values=past_key_values)


class VTURootMixin:
    """Declares ``vtu`` on the forward of the model ``generate()`` is called on.

    Modifications: ``forward(..., vtu=None, ...)`` passes ``vtu`` down through ``**kwargs`` (transformers
    forwards extra keyword arguments to the decoder and every attention call); ``generate`` only accepts
    model kwargs the root forward declares, and then hands them to every step.
    """

    def forward(self, *args, vtu: VTUInputs | None = None, **kwargs):
        if vtu is not None:
            kwargs["vtu"] = vtu
        return super().forward(*args, **kwargs)
