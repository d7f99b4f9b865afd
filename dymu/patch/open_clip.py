"""DToMe for open_clip's own ``VisionTransformer`` (OpenAI CLIP weights, e.g. ``ViT-L-14-336``) — optional extra.

Gives standalone dynamic-length image features: after :func:`dymu.apply_dtome`, ``CLIP.encode_image`` (and so
zero-shot classification) runs on merged tokens. open_clip is not imported here; it is only inspected when a
model holding one of its towers is patched. Install with ``pip install -e ".[openclip]"``; on CPU-only torch
builds ``import dymu`` first (or call :func:`dymu.prepare_cpu_torchvision`) so torchvision imports.

Only the top-level tower class is swapped; the blocks keep their class and are driven by
:func:`_block_forward`. Same method as the transformers patches: keys averaged over heads as the metric (taken
from the fused in-projection the attention already computes), merge between attention and MLP, log-size
proportional attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..merge import MergeRule, TokenState, attention_bias, bipartite_match, merge_tokens
from ..thresholds import EncoderSpec
from ._swap import swap_class
from .vit import DToMeSettings, DToMeVisionOutput

__all__ = ["encoder_spec", "patch", "DToMeOpenClipVisionMixin"]


def encoder_spec(visual: torch.nn.Module) -> EncoderSpec:
    """Spec of an open_clip ``VisionTransformer``: ``open_clip_vit-h<width>-l<layers>-p<patch>-s<image>``."""
    grid_h, grid_w = visual.grid_size
    fingerprint = (f"open_clip_vit-h{visual.transformer.width}-l{visual.transformer.layers}"
                   f"-p{visual.patch_size[0]}-s{visual.image_size[0]}")
    return EncoderSpec(fingerprint, visual.transformer.layers, grid_h * grid_w + 1, True)


def patch(visual: torch.nn.Module, settings: DToMeSettings) -> None:
    """Swap ``visual``'s class for the DToMe one (called by :func:`dymu.apply_dtome`).

    Raises:
        NotImplementedError: attentional pooling (CoCa), custom blocks, or a sequence-first transformer.
    """
    if getattr(visual, "attn_pool", None) is not None:
        raise NotImplementedError("DToMe does not support open_clip's attentional pooler (CoCa-style towers).")
    if not getattr(visual.transformer, "batch_first", False):
        raise NotImplementedError("DToMe needs open_clip's batch-first transformer (open_clip >= 2.23).")
    for block in visual.transformer.resblocks:
        if type(block).__name__ != "ResidualAttentionBlock" or not isinstance(block.attn, torch.nn.MultiheadAttention):
            raise NotImplementedError(f"DToMe supports open_clip's ResidualAttentionBlock, not {type(block).__name__}.")
    swap_class(visual, DToMeOpenClipVisionMixin, _dymu=settings)


def _block_forward(block, x, bias, state: TokenState, rule: MergeRule, layer: int, protect_first: bool):
    """One ``ResidualAttentionBlock`` with a DToMe merge between attention and MLP.

    Attention is computed from the block's own weights exactly as ``nn.MultiheadAttention`` defines it
    (fused in-projection, ``softmax(q k^T / sqrt(D) + bias) v``, out-projection), via SDPA with the additive
    proportional-attention / padding bias; the keys it uses are the merge metric.

    Args:
        x: ``(B, N, C)``; bias: ``(B, 1, 1, N)`` or None.

    Returns:
        ``(x', state')``.
    """
    attn = block.attn
    h = block.ln_1(x)
    b, n, c = h.shape
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)  # (B, N, 3C)
    q, k, v = qkv.view(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H, N, D)
    out = attn.out_proj(out.transpose(1, 2).reshape(b, n, c))
    h = x + block.ls_1(out)
    scores, dst = bipartite_match(k.mean(dim=1), state.padding_mask, protect_first=protect_first)
    h, state = merge_tokens(h, state, rule(layer, scores), dst)
    return h + block.ls_2(block.mlp(block.ln_2(h))), state


class DToMeOpenClipVisionMixin:
    """open_clip ``VisionTransformer`` with DToMe.

    Modifications (vs ``VisionTransformer.forward``):
        - the blocks run with merging (:func:`_block_forward`); only the first ``_dymu.num_layers`` run;
        - pooling follows the tower's ``pool_type``: ``tok`` takes the CLS token (never merged); ``avg`` takes
          the size-weighted mean of the merged patch tokens (equal to the plain mean over original patches
          when each patch carries its group's feature); ``none`` returns the padded merged tokens;
        - ``forward`` returns what the host returns (pooled features, and tokens if ``output_tokens``);
          :meth:`dtome_forward` returns :class:`~dymu.patch.vit.DToMeVisionOutput` with the bookkeeping.
    """

    def forward(self, x: torch.Tensor):
        out = self.dtome_forward(x)
        if self.output_tokens:
            tokens = out.last_hidden_state if self.pool_type == "none" else out.last_hidden_state[:, 1:]
            return out.pooler_output, tokens
        return out.pooler_output

    def dtome_forward(
        self,
        pixel_values: torch.Tensor,
        merge_rule: MergeRule | None = None,
        output_hidden_states: bool = False,
    ) -> DToMeVisionOutput:
        """Merged forward pass.

        Returns:
            ``last_hidden_state`` ``(B, N, C)`` (CLS first; after ``ln_post`` unless the tower applies it after
            pooling), ``pooler_output`` ``(B, output_dim)`` (projected), sizes / group ids / padding mask.
        """
        settings: DToMeSettings = self._dymu
        rule = merge_rule if merge_rule is not None else settings.rule
        x = self._embeds(pixel_values)
        state = TokenState.initial(x.shape[0], x.shape[1], device=x.device)
        hidden_states = (x,) if output_hidden_states else None
        for i, block in enumerate(self.transformer.resblocks[: settings.num_layers]):
            x, state = _block_forward(block, x, attention_bias(state, x.dtype), state, rule, i, settings.protect_first)
            if hidden_states is not None:
                hidden_states += (x,)
        if not self.final_ln_after_pool:
            x = self.ln_post(x)
        if self.pool_type == "tok":
            pooled = x[:, 0]
        elif self.pool_type == "avg":
            weights = state.sizes[:, 1:, None].to(x.dtype)  # padding has size 0
            pooled = (x[:, 1:] * weights).sum(1) / weights.sum(1)
        else:
            pooled = x
        if self.final_ln_after_pool:
            pooled = self.ln_post(pooled)
        if self.proj is not None:
            pooled = pooled @ self.proj
        return DToMeVisionOutput(
            last_hidden_state=x,
            pooler_output=pooled,
            hidden_states=hidden_states,
            token_sizes=state.sizes,
            group_ids=state.group_ids,
            padding_mask=state.padding_mask,
        )
