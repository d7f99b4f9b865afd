"""lmms-eval plugin: DyMU-wrapped LLaVA models as an lmms-eval model (optional extra ``lmms``).

Registered through the ``lmms_eval.models`` entry-point group (see ``setup.py``), so after
``pip install -e ".[lmms]"``::

    python -m lmms_eval --model dymu_llava \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,dymu=clip-vit-large-patch14-336_openai_low_published \\
        --tasks mme,pope --batch_size 1

``model_args``: ``pretrained`` (hub id or local path), ``dymu`` (thresholds file or packaged name; ``off``),
``tome_target`` (int), ``vtu`` (bool), ``layout`` (OneVision: faithful / paper), ``dtype``, ``device``,
``attn_implementation``. The model answers ``generate_until`` requests; likelihood requests are not supported.
"""

from __future__ import annotations

import logging

from dymu import prepare_cpu_torchvision

prepare_cpu_torchvision()  # first: on CPU-only torch it lets torchvision (imported by lmms_eval) load

from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.api.model import lmms  # noqa: E402
from lmms_eval.models.registry_v2 import ModelManifest  # noqa: E402
from PIL import Image  # noqa: E402

from llava import Video, load_model  # noqa: E402

__all__ = ["DyMULlavaLMM", "manifests"]

logger = logging.getLogger(__name__)


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


class DyMULlavaLMM(lmms):
    """An lmms-eval model backed by :func:`llava.load_model` (LLaVA-1.5 or LLaVA-OneVision with DyMU).

    Visuals from a task's ``doc_to_visual`` may be PIL images, image paths, or video paths (sent to the model
    as :class:`llava.Video` frames decoded by the caller's task; a plain video path is not decoded here).
    """

    def __init__(
        self,
        pretrained: str,
        dymu: str = "off",
        tome_target: int | None = None,
        vtu: bool | str = True,
        layout: str = "faithful",
        dtype: str = "auto",
        device: str = "cpu",
        attn_implementation: str | None = None,
        batch_size: int | str = 1,
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            logger.warning("dymu_llava ignores unknown model_args %s", sorted(kwargs))
        self.pipe = load_model(
            pretrained,
            dymu=None if dymu in (None, "off", "None") else dymu,
            tome_target=int(tome_target) if tome_target not in (None, "None") else None,
            vtu=_flag(vtu),
            dtype=dtype,
            device=device,
            attn_implementation=attn_implementation,
            layout=layout,
        )
        self.batch_size_per_gpu = int(batch_size)
        self.visual_token_counts: list[int] = []  # per answered request, for reporting

    def _visuals(self, request: Instance) -> list:
        _, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        flat = []
        for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
            flat.extend(v if isinstance(v, (list, tuple)) else [v])
        return [v if isinstance(v, (Image.Image, Video)) else str(v) for v in flat]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers, cut at the request's ``until`` strings; ``max_new_tokens`` from its gen kwargs."""
        answers = []
        for start in range(0, len(requests), self.batch_size_per_gpu):
            batch = requests[start : start + self.batch_size_per_gpu]
            groups: dict[tuple, list[int]] = {}
            for i, request in enumerate(batch):  # one generate call per distinct generation setting
                kwargs = dict(request.args[1])
                key = (kwargs.get("max_new_tokens", 128), tuple(kwargs.get("until") or []))
                groups.setdefault(key, []).append(i)
            results: dict[int, str] = {}
            for (max_new_tokens, until), members in groups.items():
                texts, inputs = self.pipe.generate(
                    [batch[i].args[0] for i in members], [self._visuals(batch[i]) for i in members],
                    max_new_tokens=int(max_new_tokens),
                )
                self.visual_token_counts.extend(inputs.visual_tokens)
                for i, text in zip(members, texts):
                    for stop in until:
                        text = text.split(stop)[0] if stop else text
                    results[i] = text
            answers.extend(results[i] for i in range(len(batch)))
        return answers

    def loglikelihood(self, requests: list[Instance]):
        raise NotImplementedError("dymu_llava answers generate_until requests only.")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("dymu_llava answers single-round generate_until requests only.")


def manifests() -> list[ModelManifest]:
    """The entry point lmms-eval loads: registers ``dymu_llava``."""
    return [ModelManifest(model_id="dymu_llava", simple_class_path="eval.lmms_plugin.DyMULlavaLMM")]
