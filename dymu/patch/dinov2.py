"""DToMe for transformers' ``Dinov2Model`` (DINOv2 ViTs: CLS token, LayerScale on both residual branches).

A DINOv2 block is pre-LN like CLIP's, with each branch scaled by a learned per-channel LayerScale before the
residual add. DToMe merges where ToMe does, between attention and MLP: on ``h = x + ls1(Attn(norm1(x)))``, with the
metric from the attention keys; the MLP branch then runs on the merged tokens. Register tokens
(``Dinov2WithRegisters``) are not supported (a different host class). Swapped in by :func:`dymu.apply_dtome`, undone by
:func:`dymu.remove`; no parameters are added. Method: DyMU Sec. 3.1 / ``docs/dymu-method.md`` Sec. 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.models.dinov2 import modeling_dinov2

from ..merge import MergeRule, TokenState, bipartite_match, merge_tokens
from .vit import DToMeAttentionMixin, DToMeEncoderOutput, _DToMeVisionModelMixin

__all__ = ["DToMeDinov2AttentionMixin", "DToMeDinov2LayerMixin", "DToMeDinov2ModelMixin"]


class DToMeDinov2AttentionMixin(DToMeAttentionMixin):
    """``Dinov2Attention`` that also returns the merge metric (:class:`~dymu.patch.vit.DToMeAttentionMixin` with
    DINOv2's names: ``o_proj``, ``scaling``, ``attention_dropout``).

    Modifications (vs ``Dinov2Attention.forward``):
        - returns a third value, the keys averaged over heads ``(B, N, D)`` (:func:`~dymu.patch.vit.attention_with_metric`);
        - ``attention_mask`` may be the additive proportional-attention bias ``(B, 1, 1, N)``.
    """

    _dymu_eager: Callable = staticmethod(modeling_dinov2.eager_attention_forward)
    _dymu_names = ("o_proj", "scaling", "attention_dropout")


class DToMeDinov2LayerMixin:
    """``Dinov2Layer`` with a DToMe merge between attention and MLP.

    Modifications (vs ``Dinov2Layer.forward``):
        - takes and returns a :class:`~dymu.merge.TokenState`;
        - ``h = x + drop_path(ls1(Attn(norm1(x))))``; the merge rule picks edges on the attention keys and
          :func:`~dymu.merge.merge_tokens` merges ``h`` (size-weighted means); then
          ``h + drop_path(ls2(MLP(norm2(h))))`` on the shorter sequence.
    """

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, state: TokenState,
                rule: MergeRule, layer: int, protect_first: bool) -> tuple[torch.Tensor, TokenState]:
        attn, _, metric = self.attention(self.norm1(hidden_states), attention_mask=attention_mask)
        h = hidden_states + self.drop_path(self.layer_scale1(attn))
        scores, dst = bipartite_match(metric, state.padding_mask, protect_first=protect_first)
        h, state = merge_tokens(h, state, rule(layer, scores, state.lengths), dst)
        return h + self.drop_path(self.layer_scale2(self.mlp(self.norm2(h)))), state


class DToMeDinov2ModelMixin(_DToMeVisionModelMixin):
    """``Dinov2Model`` returning :class:`~dymu.patch.vit.DToMeVisionOutput`.

    Modifications (vs ``Dinov2Model.forward``):
        - forwards ``merge_rule`` to the encoder and returns the merge bookkeeping;
        - ``last_hidden_state`` is the feature layer's output *before* the final ``layernorm`` (what LLaVA models
          read from ``hidden_states[vision_feature_layer]``; the host's own ``last_hidden_state`` is normalised);
        - ``pooler_output`` is ``layernorm`` of the CLS token of that output (the host's, for feature layer -1);
        - the position embeddings are always resampled to the input size, as ``Dinov2Embeddings`` does, so
          ``interpolate_pos_encoding`` has no effect; ``bool_masked_pos`` (masked-image pretraining) is not supported.
    """

    def _embed(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool) -> torch.Tensor:
        return self.embeddings(pixel_values)

    def _pool(self, enc: DToMeEncoderOutput) -> torch.Tensor:
        return self.layernorm(enc.last_hidden_state[:, 0, :])
