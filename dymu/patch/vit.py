"""DToMe for transformers' pre-LN ViT encoders: ``CLIPVisionModel`` (LLaVA-1.5's tower) and
``SiglipVisionModel`` (LLaVA-OneVision's tower; no CLS token, so every token may merge).

The mixins are swapped into the host modules in place by :func:`dymu.apply_dtome`; they add no
parameters and :func:`dymu.remove` restores the host classes. Method: DyMU Sec. 3.1 /
``docs/dymu-method.md`` Sec. 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.clip import modeling_clip

from ..merge import MergeRule, TokenState, attention_bias, bipartite_match, merge_tokens

__all__ = ["DToMeEncoderOutput", "DToMeVisionOutput", "attention_with_metric"]


@dataclass
class DToMeEncoderOutput(BaseModelOutput):
    """``BaseModelOutput`` plus DToMe bookkeeping.

    Attributes:
        last_hidden_state: ``(B, N, C)`` output of the last layer run (the feature layer), padded.
        hidden_states: tuple of ``(B, N_l, C)`` (embeddings, then each layer run), if requested.
        token_sizes: ``(B, N)`` float32, original tokens per output token (0 for padding).
        group_ids: ``(B, N0)`` long, output token holding each original token.
        padding_mask: ``(B, N)`` bool, True for real tokens, or None when no image is padded.
    """

    token_sizes: torch.Tensor | None = None
    group_ids: torch.Tensor | None = None
    padding_mask: torch.Tensor | None = None


@dataclass
class DToMeVisionOutput(BaseModelOutputWithPooling):
    """``BaseModelOutputWithPooling`` plus ``token_sizes``, ``group_ids``, ``padding_mask``
    (shapes as in :class:`DToMeEncoderOutput`)."""

    token_sizes: torch.Tensor | None = None
    group_ids: torch.Tensor | None = None
    padding_mask: torch.Tensor | None = None

    @classmethod
    def from_encoder(cls, enc: DToMeEncoderOutput, pooler_output) -> "DToMeVisionOutput":
        """The encoder's output plus the tower's pooled features."""
        return cls(last_hidden_state=enc.last_hidden_state, pooler_output=pooler_output,
                   hidden_states=enc.hidden_states, token_sizes=enc.token_sizes, group_ids=enc.group_ids,
                   padding_mask=enc.padding_mask)

    @classmethod
    def of(cls, last_hidden_state, pooler_output, hidden_states, state: TokenState) -> "DToMeVisionOutput":
        """Build from the final tokens, the pooled output and the merge state."""
        return cls(last_hidden_state=last_hidden_state, pooler_output=pooler_output, hidden_states=hidden_states,
                   token_sizes=state.sizes, group_ids=state.group_ids, padding_mask=state.padding_mask)


def run_layers(layers, layer_forward, x: torch.Tensor, settings: "DToMeSettings", rule: MergeRule,
               output_hidden_states: bool = False):
    """Run the first ``settings.num_layers`` layers with merging, carrying the :class:`TokenState`.

    Args:
        layers: the host's blocks.
        layer_forward: ``(layer, x, bias, state, rule, layer_index, protect_first) -> (x, state)``.
        x: ``(B, N0, C)`` embedded tokens.

    Returns:
        ``(x, state, hidden_states)``; ``hidden_states`` is the embeddings then each layer's output, or None.
    """
    state = TokenState.initial(x.shape[0], x.shape[1], device=x.device)
    hidden_states = (x,) if output_hidden_states else None
    for i, layer in enumerate(layers[: settings.num_layers]):
        x, state = layer_forward(layer, x, attention_bias(state, x.dtype), state, rule, i, settings.protect_first)
        if hidden_states is not None:
            hidden_states += (x,)
    return x, state, hidden_states


def attention_with_metric(module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, out_proj,
                          scaling: float, dropout: float, eager: Callable, **kwargs):
    """Self-attention of a ViT block that also returns the DToMe merge metric.

    Args:
        module: the host attention module (``q_proj`` / ``k_proj`` / ``v_proj``, ``head_dim``, ``config``).
        hidden_states: ``(B, N, C)`` normalised tokens.
        attention_mask: the additive proportional-attention / padding bias ``(B, 1, 1, N)``, or None.
        out_proj: the host's output projection.
        scaling: logit scale (``head_dim ** -0.5``); dropout: attention dropout probability (0 in eval).
        eager: the host module's ``eager_attention_forward`` (used when the attention implementation is eager).

    Returns:
        ``(out (B, N, C), weights or None, metric (B, N, D))``: the metric is the keys averaged over heads, taken
        from the same key projection the attention uses (no second projection). The kernel is chosen through
        ``ALL_ATTENTION_FUNCTIONS`` (eager / sdpa / flash), as the host does.
    """
    bsz, n, _ = hidden_states.shape
    heads = (bsz, n, -1, module.head_dim)
    q = module.q_proj(hidden_states).view(heads).transpose(1, 2)  # (B, H, N, D)
    k = module.k_proj(hidden_states).view(heads).transpose(1, 2)
    v = module.v_proj(hidden_states).view(heads).transpose(1, 2)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager)
    out, weights = attention(module, q, k, v, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    return out_proj(out.reshape(bsz, n, -1).contiguous()), weights, k.mean(dim=1)


class DToMeAttentionMixin:
    """Encoder self-attention that also returns the merge metric.

    Modifications (vs ``CLIPAttention.forward``):
        - returns a third value: the keys averaged over heads, ``(B, N, D)`` — the DToMe metric
          (:func:`attention_with_metric`);
        - ``attention_mask`` may be the additive proportional-attention bias ``(B, 1, 1, N)``.

    A host family whose attention names its output projection, scale or dropout otherwise subclasses this and sets
    ``_dymu_eager`` and ``_dymu_names`` (``(output projection, scale, dropout)`` attribute names).
    """

    _dymu_eager: Callable = staticmethod(modeling_clip.eager_attention_forward)
    _dymu_names: tuple[str, str, str] = ("out_proj", "scale", "dropout")

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        out_proj, scale, dropout = self._dymu_names
        return attention_with_metric(self, hidden_states, attention_mask, getattr(self, out_proj),
                                     getattr(self, scale), getattr(self, dropout) if self.training else 0.0,
                                     self._dymu_eager, **kwargs)


class DToMeEncoderLayerMixin:
    """Pre-LN encoder block with a DToMe merge between attention and MLP.

    Modifications (vs ``CLIPEncoderLayer.forward``):
        - takes and returns a :class:`~dymu.merge.TokenState`;
        - ``h = x + Attn(LN1(x))``, then the merge rule picks edges on the attention keys and
          :func:`~dymu.merge.merge_tokens` merges ``h``; the MLP runs on the shorter sequence.
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        state: TokenState,
        rule: MergeRule,
        layer: int,
        protect_first: bool,
    ) -> tuple[torch.Tensor, TokenState]:
        attn, _, metric = self.self_attn(self.layer_norm1(hidden_states), attention_mask=attention_mask)
        h = hidden_states + attn
        scores, dst = bipartite_match(metric, state.padding_mask, protect_first=protect_first)
        h, state = merge_tokens(h, state, rule(layer, scores, state.lengths), dst)
        return h + self.mlp(self.layer_norm2(h)), state


@dataclass
class DToMeSettings:
    """Per-encoder configuration set by :func:`dymu.apply_dtome` (no per-call state). Outside the patch classes,
    read it with :func:`dymu.dtome_settings` (``dtome_settings(tower)``), not through the attribute it is kept in.

    Attributes:
        rule: default merge rule (thresholds or fixed r).
        num_layers: encoder layers to run; the last one is the feature layer (later layers are skipped).
        protect_first: token 0 is a CLS token that never merges (CLIP) or not (SigLIP).
    """

    rule: MergeRule
    num_layers: int
    protect_first: bool


class DToMeEncoderMixin:
    """Encoder loop carrying the merge state.

    Modifications (vs ``CLIPEncoder.forward``; ``Dinov2Encoder`` likewise, its blocks in ``layer``):
        - runs only the first ``_dymu.num_layers`` layers (up to the feature layer);
        - builds the proportional-attention / padding bias from the token sizes before every layer;
        - ``merge_rule`` (per call) overrides the configured rule, e.g. for threshold calibration;
        - returns :class:`DToMeEncoderOutput` with sizes, group ids and the padding mask.
    """

    _dymu_blocks: str = "layers"  # the encoder attribute holding its blocks (``layer`` for DINOv2)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        merge_rule: MergeRule | None = None,
        output_hidden_states: bool = False,
        **kwargs,
    ) -> DToMeEncoderOutput:
        if attention_mask is not None:
            raise NotImplementedError("DToMe encoders build their own attention mask; pass attention_mask=None.")
        settings: DToMeSettings = self._dymu
        rule = merge_rule if merge_rule is not None else settings.rule
        x, state, hidden_states = run_layers(
            getattr(self, self._dymu_blocks), lambda layer, *args: layer(*args), inputs_embeds, settings, rule,
            output_hidden_states,
        )
        return DToMeEncoderOutput(
            last_hidden_state=x,
            hidden_states=hidden_states,
            token_sizes=state.sizes,
            group_ids=state.group_ids,
            padding_mask=state.padding_mask,
        )


class _DToMeVisionModelMixin:
    """The forward both vision-model mixins share: embeddings (CLIP: then ``pre_layrnorm``), the DToMe encoder
    with ``merge_rule`` forwarded, the merge bookkeeping returned; each family pools in :meth:`_pool`."""

    def forward(self, *args, **kwargs) -> DToMeVisionOutput:
        return self.dtome_forward(*args, **kwargs)

    def dtome_forward(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        merge_rule: MergeRule | None = None,
        output_hidden_states: bool = False,
        **kwargs,
    ) -> DToMeVisionOutput:
        x = self._embed(pixel_values, interpolate_pos_encoding)
        enc = self.encoder(x, merge_rule=merge_rule, output_hidden_states=output_hidden_states)
        return DToMeVisionOutput.from_encoder(enc, self._pool(enc))

    def _embed(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool) -> torch.Tensor:
        x = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        if hasattr(self, "pre_layrnorm"):  # CLIP normalises before the encoder; SigLIP does not
            x = self.pre_layrnorm(x)
        return x

    def _pool(self, enc: DToMeEncoderOutput) -> torch.Tensor | None:
        raise NotImplementedError


class DToMeCLIPVisionModelMixin(_DToMeVisionModelMixin):
    """``CLIPVisionModel`` returning :class:`DToMeVisionOutput`.

    Modifications (vs ``CLIPVisionModel.forward``): forwards ``merge_rule`` to the encoder and returns
    the merge bookkeeping. ``last_hidden_state`` is the feature layer's output (not normalised);
    ``pooler_output`` is ``post_layernorm`` of the CLS token, which never merges and stays at index 0.
    """

    def _pool(self, enc: DToMeEncoderOutput) -> torch.Tensor:
        return self.post_layernorm(enc.last_hidden_state[:, 0, :])


class DToMeSiglipVisionModelMixin(_DToMeVisionModelMixin):
    """``SiglipVisionModel`` returning :class:`DToMeVisionOutput`.

    Modifications (vs ``SiglipVisionModel.forward``):
        - forwards ``merge_rule`` to the encoder and returns the merge bookkeeping;
        - ``last_hidden_state`` is the feature layer's output *before* ``post_layernorm`` (what LLaVA
          models read from ``hidden_states[vision_feature_layer]``);
        - the attention-pooling head (``vision_use_head``) sees ``post_layernorm`` of the merged tokens with
          proportional attention: ``log s_j`` added to each key's logit, padding keys masked (DyMU applies
          the size bias wherever tokens are attended over).
    """

    def _pool(self, enc: DToMeEncoderOutput) -> torch.Tensor | None:
        if not getattr(self, "use_head", False):
            return None
        last = enc.last_hidden_state
        merged = enc.padding_mask is not None or last.shape[1] != enc.group_ids.shape[1]
        state = TokenState(enc.token_sizes, enc.group_ids, enc.padding_mask, merged=merged)
        return _attention_pool(self.head, self.post_layernorm(last), attention_bias(state, last.dtype))


def _attention_pool(head: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """SigLIP's multihead attention pooling with an additive key bias.

    Args:
        head: ``SiglipMultiheadAttentionPoolingHead`` (``probe``, ``attention``, ``layernorm``, ``mlp``).
        x: ``(B, N, C)`` normalised tokens.
        bias: ``(B, 1, 1, N)`` from :func:`~dymu.merge.attention_bias`, or None (then exactly the host's head).

    Returns:
        ``(B, C)`` pooled features.
    """
    probe = head.probe.expand(x.shape[0], -1, -1)  # (B, 1, C)
    mask = None
    if bias is not None:  # nn.MultiheadAttention takes a (B * H, 1, N) additive float mask
        mask = bias[:, 0].repeat_interleave(head.attention.num_heads, dim=0).to(x.dtype)
    h = head.attention(probe, x, x, attn_mask=mask, need_weights=False)[0]  # (B, 1, C)
    h = h + head.mlp(head.layernorm(h))
    return h[:, 0]
