"""DToMe for open_clip's vision towers — optional extra ``openclip``.

Two tower families: open_clip's own ``VisionTransformer`` (OpenAI CLIP weights, e.g. ``ViT-L-14-336``) and timm's
``VisionTransformer``, the trunk of open_clip's ``TimmModel`` towers (SigLIP, e.g. ``ViT-B-16-SigLIP``; no CLS
token, attention-pool "map" head, which gets the proportional size bias too).

Gives standalone dynamic-length image features: after :func:`dymu.apply_dtome`, ``CLIP.encode_image`` (and so
zero-shot classification) runs on merged tokens. open_clip is not imported here; it is only inspected when a
model holding one of its towers is patched. Install with ``pip install -e ".[openclip]"``; on CPU-only torch
builds call :func:`dymu.prepare_cpu_torchvision` before importing open_clip or transformers, so torchvision imports
(``import dymu`` does not do it).

Only the top-level tower (or trunk) class is swapped; the blocks keep their class and are driven by
:func:`_block_forward` / :func:`_timm_block_forward`. Same method as the transformers patches: keys averaged over heads as the metric (taken
from the fused in-projection the attention already computes), merge between attention and MLP, log-size
proportional attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..merge import MergeRule, TokenState, attention_bias, bipartite_match, merge_tokens
from ..thresholds import EncoderSpec
from ._swap import swap_class
from .vit import DToMeSettings, DToMeVisionOutput, run_layers

__all__ = ["is_host", "encoder_spec", "patch", "DToMeOpenClipVisionMixin", "DToMeTimmVisionMixin"]


def _host_class(module: torch.nn.Module) -> type:
    return getattr(module, "_dymu_original_class", None) or type(module)  # a patched module's original class


def _is_timm_vit(module: torch.nn.Module) -> bool:
    cls = _host_class(module)
    return cls.__module__ == "timm.models.vision_transformer" and cls.__name__ == "VisionTransformer"


def _is_open_clip_vit(module: torch.nn.Module) -> bool:
    cls = _host_class(module)
    return cls.__module__ == "open_clip.transformer" and cls.__name__ == "VisionTransformer"


def is_host(module: torch.nn.Module) -> bool:
    """True for a tower this module patches (checked by class and module name: no import of the extras)."""
    return _is_open_clip_vit(module) or _is_timm_vit(module)


def encoder_spec(visual: torch.nn.Module) -> EncoderSpec:
    """Spec of a tower: ``open_clip_vit-h<width>-l<layers>-p<patch>-s<image>`` or ``timm_vit-...``."""
    if _is_timm_vit(visual):
        grid_h, grid_w = visual.patch_embed.grid_size
        prefix = visual.num_prefix_tokens
        fingerprint = (f"timm_vit-h{visual.embed_dim}-l{len(visual.blocks)}-p{visual.patch_embed.patch_size[0]}"
                       f"-s{visual.patch_embed.img_size[0]}")
        return EncoderSpec(fingerprint, len(visual.blocks), grid_h * grid_w + prefix, prefix == 1)
    grid_h, grid_w = visual.grid_size
    fingerprint = (f"open_clip_vit-h{visual.transformer.width}-l{visual.transformer.layers}"
                   f"-p{visual.patch_size[0]}-s{visual.image_size[0]}")
    return EncoderSpec(fingerprint, visual.transformer.layers, grid_h * grid_w + 1, True)


def patch(visual: torch.nn.Module, settings: DToMeSettings) -> None:
    """Swap ``visual``'s class for the DToMe one (called by :func:`dymu.apply_dtome`).

    Raises:
        NotImplementedError: attentional pooling (CoCa), custom blocks, a sequence-first transformer, register
            tokens, gated attention, or a pooling type other than token / avg / map.
    """
    if _is_timm_vit(visual):
        if visual.num_prefix_tokens > 1 or visual.dynamic_img_size:
            raise NotImplementedError("DToMe supports timm ViTs with at most one prefix (CLS) token and a fixed size.")
        if visual.attn_pool is None and visual.global_pool not in ("token", "avg"):
            raise NotImplementedError(f"DToMe does not support timm global_pool={visual.global_pool!r}.")
        for block in visual.blocks:
            if type(block).__name__ != "Block" or getattr(block.attn, "gate", None) is not None:
                raise NotImplementedError(f"DToMe supports timm's Block / Attention, not {type(block).__name__}.")
        swap_class(visual, DToMeTimmVisionMixin, _dymu=settings)
        return
    if getattr(visual, "attn_pool", None) is not None:
        raise NotImplementedError("DToMe does not support open_clip's attentional pooler (CoCa-style towers).")
    if not getattr(visual.transformer, "batch_first", False):
        raise NotImplementedError("DToMe needs open_clip's batch-first transformer (open_clip >= 2.23).")
    for block in visual.transformer.resblocks:
        if type(block).__name__ != "ResidualAttentionBlock" or not isinstance(block.attn, torch.nn.MultiheadAttention):
            raise NotImplementedError(f"DToMe supports open_clip's ResidualAttentionBlock, not {type(block).__name__}.")
    swap_class(visual, DToMeOpenClipVisionMixin, _dymu=settings)


def _merge_then_mlp(block_mlp, x, out, keys, state, rule, layer, protect_first):
    """``h = x + out``; merge ``h`` on the attention ``keys`` (averaged over heads); ``h + MLP(h)``."""
    h = x + out
    scores, dst = bipartite_match(keys.mean(dim=1), state.padding_mask, protect_first=protect_first)
    h, state = merge_tokens(h, state, rule(layer, scores, state.lengths), dst)
    return h + block_mlp(h), state


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
    out = block.ls_1(attn.out_proj(out.transpose(1, 2).reshape(b, n, c)))
    return _merge_then_mlp(lambda t: block.ls_2(block.mlp(block.ln_2(t))), x, out, k, state, rule, layer, protect_first)


def _timm_block_forward(block, x, bias, state: TokenState, rule: MergeRule, layer: int, protect_first: bool):
    """One timm ``Block`` with a DToMe merge between attention and MLP (its ``Attention`` recomputed from its
    own weights: fused qkv, optional q/k norms, SDPA with the additive bias, optional output norm, proj)."""
    attn = block.attn
    h = block.norm1(x)
    b, n, _ = h.shape
    q, k, v = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)  # (B, H, N, D)
    out = attn.proj(attn.norm(out.transpose(1, 2).reshape(b, n, attn.attn_dim)))
    out = block.drop_path1(block.ls1(out))
    mlp = lambda t: block.drop_path2(block.ls2(block.mlp(block.norm2(t))))  # noqa: E731
    return _merge_then_mlp(mlp, x, out, k, state, rule, layer, protect_first)


def _weighted_mean(tokens: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Size-weighted mean over tokens ``(B, N, C)`` (padding has size 0): the plain mean over original tokens."""
    weights = sizes[..., None].to(tokens.dtype)
    return (tokens * weights).sum(1) / weights.sum(1)


class _DToMeTowerMixin:
    """``dtome_forward`` of both open_clip tower mixins: the per-call ``merge_rule`` (default: the configured
    rule) and the patch settings go to the tower's own merged pass, ``_run``."""

    def dtome_forward(self, pixel_values: torch.Tensor, merge_rule: MergeRule | None = None,
                      output_hidden_states: bool = False) -> DToMeVisionOutput:
        """Merged forward pass (see the tower's ``_run``): ``(B, 3, H, W)`` pixels -> :class:`DToMeVisionOutput`."""
        settings: DToMeSettings = self._dymu
        return self._run(pixel_values, settings, merge_rule if merge_rule is not None else settings.rule,
                         output_hidden_states)


class DToMeOpenClipVisionMixin(_DToMeTowerMixin):
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

    def _run(self, pixel_values: torch.Tensor, settings: DToMeSettings, rule: MergeRule,
             output_hidden_states: bool) -> DToMeVisionOutput:
        """Merged forward pass.

        Returns:
            ``last_hidden_state`` ``(B, N, C)`` (CLS first; after ``ln_post`` unless the tower applies it after
            pooling), ``pooler_output`` ``(B, output_dim)`` (projected), sizes / group ids / padding mask.
        """
        x, state, hidden_states = run_layers(self.transformer.resblocks, _block_forward, self._embeds(pixel_values),
                                              settings, rule, output_hidden_states)
        if not self.final_ln_after_pool:
            x = self.ln_post(x)
        if self.pool_type == "tok":
            pooled = x[:, 0]
        elif self.pool_type == "avg":
            pooled = _weighted_mean(x[:, 1:], state.sizes[:, 1:])
        else:
            pooled = x
        if self.final_ln_after_pool:
            pooled = self.ln_post(pooled)
        if self.proj is not None:
            pooled = pooled @ self.proj
        return DToMeVisionOutput.of(x, pooled, hidden_states, state)


class DToMeTimmVisionMixin(_DToMeTowerMixin):
    """timm ``VisionTransformer`` (e.g. the SigLIP trunk of open_clip's ``TimmModel``) with DToMe.

    Modifications (vs ``VisionTransformer.forward``):
        - blocks run with merging (:func:`_timm_block_forward`); only the first ``_dymu.num_layers`` run;
        - the "map" attention-pool head gets the proportional-attention / padding bias as its ``attn_mask``;
          "token" takes the CLS token; "avg" is the size-weighted mean of the non-prefix tokens;
        - ``forward`` returns the pooled features as the host does; :meth:`dtome_forward` returns
          :class:`~dymu.patch.vit.DToMeVisionOutput`.
    """

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs:
            raise NotImplementedError("DToMe timm towers build their own attention mask; call forward(x).")
        return self.dtome_forward(x).pooler_output

    def _run(self, pixel_values: torch.Tensor, settings: DToMeSettings, rule: MergeRule,
             output_hidden_states: bool) -> DToMeVisionOutput:
        """Merged forward pass: ``last_hidden_state`` after the final norm, ``pooler_output`` after the head."""
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(pixel_values))))
        x, state, hidden_states = run_layers(self.blocks, _timm_block_forward, x, settings, rule, output_hidden_states)
        x = self.norm(x)
        prefix = self.num_prefix_tokens
        if self.attn_pool is not None:
            keep = slice(None) if self.pool_include_prefix else slice(prefix, None)
            sub = TokenState(state.sizes[:, keep], state.group_ids,
                             None if state.padding_mask is None else state.padding_mask[:, keep], merged=state.merged)
            pooled = self.attn_pool(x[:, keep], attn_mask=attention_bias(sub, x.dtype))
        elif self.global_pool == "token":
            pooled = x[:, 0]
        else:
            pooled = _weighted_mean(x[:, prefix:], state.sizes[:, prefix:])
        pooled = self.head(self.head_drop(self.fc_norm(pooled)))
        return DToMeVisionOutput.of(x, pooled, hidden_states, state)
