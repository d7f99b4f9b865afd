"""Training the testbed's projector on generated visual questions, with transformers' :class:`~transformers.Trainer`.

Recipe (LLaVA-1.5's first stage, on :mod:`eval.testbed.data`): the vision tower and the LLM are frozen and unmodified
(no DToMe, no VTU); only the MLP projector learns, optionally with a LoRA on the LLM's attention (``peft``) when the
projector alone does not reach the accuracy target. Each training sequence is one image and all of its questions as
a multi-turn chat, rendered with the checkpoint's chat template: the first turn is exactly the prompt the evaluation
pipeline writes (checked), the later turns follow it, and only the answers (each with its ``<|im_end|>``) are
supervised. One image's 256 visual tokens thus serve about five answers, which matters on a CPU where the LLM's
forward and backward pass over those tokens is the whole cost. The ``blocks`` layout (:class:`TestbedBlocks`)
instead packs each question's own evaluation prompt behind one shared image prefix with a block-causal mask, so
every answer sees exactly its evaluation sequence and none can be read off an earlier turn.

The loss is computed on the supervised positions only (the LM head runs on those rows, not on all 49153-way logits
of every position); it equals transformers' causal-LM loss over the same labels.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from llava.prompts import SYSTEM_VICUNA_V1

from . import data as tdata
from .model import projector_state

__all__ = ["TestbedChats", "ChatCollator", "TestbedBlocks", "BlockCollator", "ProjectorCheckpoints", "ProjectorTrainer", "supervised_loss", "chat_messages", "settings_record",
           "train"]

logger = logging.getLogger(__name__)


def chat_messages(system: str, samples: list[tdata.Sample]) -> list[dict]:
    """The conversation of one image's questions: system, then user / assistant turns, the image in the first."""
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}]
    for i, s in enumerate(samples):
        items = [{"type": "image"}] if i == 0 else []
        messages.append({"role": "user", "content": [*items, {"type": "text", "text": s.question}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": s.answer}]})
    return messages


class _ImageQuestions(Dataset):
    """Base of the training datasets: the questions of images ``0 .. num_images - 1`` of ``split``, grouped per
    image (``self.images``: ``[(image_seed, [Sample, ...]), ...]`` in seed order), one item per image."""

    def __init__(self, pipeline, split: str, num_images: int, every_question: bool = False):
        self.pipeline = pipeline
        by_image: dict[int, list[tdata.Sample]] = {}
        for sample in tdata.split_samples(split, num_images, every=every_question):
            by_image.setdefault(sample.image_seed, []).append(sample)
        self.images = sorted(by_image.items())

    def __len__(self) -> int:
        return len(self.images)


class TestbedChats(_ImageQuestions):
    """One item per image: its questions as a multi-turn chat, tokenised with the image expanded.

    Args:
        pipeline: the testbed's :class:`~llava.pipeline.DyMUPipeline` (unpatched); its processor tokenises and its
            :meth:`~llava.pipeline.DyMUPipeline.prompt` is the evaluation prompt the first turn must equal.
        split: a :data:`eval.testbed.data.SPLITS` name.
        num_images: images ``0 .. num_images - 1`` of the split.
        system: the system message the pipeline's prompt carries (LLaVA-1.5 family: the vicuna_v1 sentence).
        every_question: each image's every well-defined question (:func:`eval.testbed.data.questions` with
            ``every=True``, about 13.8 per image) rather than the benchmark's one per type (about 4.8).

    Items: ``{"input_ids": (T,), "labels": (T,), "pixel_values": (1, 3, H, W)}``; labels are -100 except on the
    answer tokens and the ``<|im_end|>`` closing each answer.
    """

    def __init__(self, pipeline, split: str, num_images: int, system: str, every_question: bool = False):
        super().__init__(pipeline, split, num_images, every_question)
        self.system = system

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        seed, samples = self.images[index]
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
        samples = [samples[i] for i in order]  # every question type gets to be the first turn
        image = tdata.render(tdata.make_scene(seed))
        processor = self.pipeline.processor
        template = processor.chat_template

        def render(messages, generation: bool) -> str:
            return processor.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                           add_generation_prompt=generation)

        messages = chat_messages(self.system, samples)
        first = render(messages[:2], True)
        expected = self.pipeline.prompt(samples[0].question, [image])
        if first != expected:
            raise RuntimeError(f"the training chat's first turn differs from the evaluation prompt:\n{first!r}\n"
                               f"vs\n{expected!r}")
        full = processor(text=render(messages, False), images=[image], return_tensors="pt")
        ids = full["input_ids"][0]
        # The answer spans come from the token counts of the chat's prefixes. The image is processed once (above);
        # a prefix is tokenised as text with its image placeholder expanded to the processor's count, and the
        # prefix-stability check below catches any disagreement with the processor's own tokenisation.
        image_token = processor.image_token
        expanded = image_token * int((ids == processor.image_token_id).sum())

        def prefix_ids(text: str) -> torch.Tensor:
            return torch.tensor(processor.tokenizer(text.replace(image_token, expanded))["input_ids"])

        labels = torch.full_like(ids, -100)
        for turn in range(len(samples)):  # answer span: after the turn's generation prompt, through its <|im_end|>
            prefix = prefix_ids(render(messages[: 2 + 2 * turn], True))
            through = prefix_ids(render(messages[: 3 + 2 * turn], False))  # ... its answer, <|im_end|>, "\n"
            if not (torch.equal(ids[: len(prefix)], prefix) and torch.equal(ids[: len(through)], through)):
                raise RuntimeError("the chat does not tokenise prefix-stably; answer spans cannot be found")
            labels[len(prefix) : len(through) - 1] = ids[len(prefix) : len(through) - 1]  # the final "\n" is not
        return {"input_ids": ids, "labels": labels, "pixel_values": full["pixel_values"]}


@dataclass
class ChatCollator:
    """Right-pads a batch of :class:`TestbedChats` items (``pad_token_id``, labels -100, attention mask 0)."""

    pad_token_id: int

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), length), -100, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = it["input_ids"], it["labels"], 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask,
                "pixel_values": torch.cat([it["pixel_values"] for it in items])}


class TestbedBlocks(_ImageQuestions):
    """One item per image: the evaluation prompt of each of its questions, packed behind one shared image prefix.

    The sequence is ``prefix | block_1 | ... | block_n``: the prefix is the evaluation prompt up to and including
    the image's visual tokens (system turn, ``<|im_start|>user``, the expanded ``<image>``), and block ``i`` is the
    rest of question ``i``'s evaluation prompt followed by its answer and ``<|im_end|>``. A block attends to the
    prefix and causally to itself only, and its positions continue from the prefix's end, so every answer is
    trained on exactly the sequence the evaluation pipeline builds for that question alone (tested against
    separate forward passes), while the tower, the projector and the LLM's pass over the 256 visual tokens run
    once per image. Unlike :class:`TestbedChats`, no answer can be read off an earlier turn.

    Args:
        pipeline, split, num_images, every_question: as in :class:`TestbedChats`.

    Items: ``input_ids``, ``labels``, ``position_ids``, ``block_ids`` (all ``(T,)``; ``block_ids`` 0 on the prefix,
    ``i`` on block ``i``) and ``pixel_values`` ``(1, 3, H, W)``; labels are -100 except on the answer tokens and
    each answer's ``<|im_end|>``.
    """

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        seed, samples = self.images[index]
        image = tdata.render(tdata.make_scene(seed))
        processor = self.pipeline.processor
        end = processor.tokenizer.eos_token  # "<|im_end|>": what generation stops at
        prompts = [self.pipeline.prompt(s.question, [image]) for s in samples]
        first = processor(text=prompts[0], images=[image], return_tensors="pt")
        first_ids = first["input_ids"][0]
        image_positions = (first_ids == processor.image_token_id).nonzero().flatten()
        prefix_len = int(image_positions[-1]) + 1
        expanded = processor.image_token * len(image_positions)

        def text_ids(text: str) -> torch.Tensor:
            return torch.tensor(processor.tokenizer(text.replace(processor.image_token, expanded))["input_ids"])

        if not torch.equal(text_ids(prompts[0]), first_ids):
            raise RuntimeError("the prompt tokenises differently as text than through the processor")
        prefix = first_ids[:prefix_len]
        ids, labels, positions, blocks = [prefix], [torch.full_like(prefix, -100)], [torch.arange(prefix_len)], \
            [torch.zeros_like(prefix)]
        for block, (sample, prompt) in enumerate(zip(samples, prompts), start=1):
            prompt_ids = text_ids(prompt)
            full = text_ids(prompt + sample.answer + end)
            if not (torch.equal(full[:prefix_len], prefix) and torch.equal(full[: len(prompt_ids)], prompt_ids)):
                raise RuntimeError("a question's prompt does not tokenise prefix-stably; its answer cannot be found")
            rest = full[prefix_len:]
            label = rest.clone()
            label[: len(prompt_ids) - prefix_len] = -100
            ids.append(rest)
            labels.append(label)
            positions.append(torch.arange(prefix_len, len(full)))
            blocks.append(torch.full_like(rest, block))
        return {"input_ids": torch.cat(ids), "labels": torch.cat(labels), "position_ids": torch.cat(positions),
                "block_ids": torch.cat(blocks), "pixel_values": first["pixel_values"]}


@dataclass
class BlockCollator:
    """Right-pads a batch of :class:`TestbedBlocks` items and builds their block-causal attention.

    ``attention_mask`` is a ``(B, 1, T, T)`` additive float mask (0 where a query may attend a key, the dtype's
    minimum elsewhere), which transformers passes to the attention as it is: a key is visible when it is not later
    than the query, not padding, and in the prefix or the query's own block. A padding query sees only itself, so
    no row of the softmax is empty.
    """

    pad_token_id: int
    dtype: torch.dtype = torch.float32

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(len(it["input_ids"]) for it in items)
        batch = len(items)
        ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, length), -100, dtype=torch.long)
        positions = torch.zeros((batch, length), dtype=torch.long)
        blocks = torch.full((batch, length), -1, dtype=torch.long)  # -1: padding
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            ids[row, :n], labels[row, :n] = it["input_ids"], it["labels"]
            positions[row, :n], blocks[row, :n] = it["position_ids"], it["block_ids"]
        query, key = blocks[:, :, None], blocks[:, None, :]  # (B, T, 1), (B, 1, T)
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        visible = causal & (key >= 0) & ((key == 0) | (key == query))
        visible |= torch.eye(length, dtype=torch.bool)
        mask = torch.zeros((batch, 1, length, length), dtype=self.dtype)
        mask.masked_fill_(~visible[:, None], torch.finfo(self.dtype).min)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": positions,
                "pixel_values": torch.cat([it["pixel_values"] for it in items])}


def _base_model(model):
    """The LLaVA model inside a ``peft`` wrapper (or ``model`` itself when it is not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supervised_loss(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the supervised positions of a LLaVA model.

    Runs the backbone (``model.model``), then the LM head only on the rows whose next token is supervised: equal
    to ``model(**inputs).loss`` (transformers' shifted causal-LM loss) without the ``(B, T, V)`` logits.

    Args:
        model: a ``LlavaForConditionalGeneration`` (or a ``peft`` model around one).
        inputs: :class:`ChatCollator` or :class:`BlockCollator` output (``labels`` ``(B, T)``, -100 where
            unsupervised; ``position_ids`` and a 4-D ``attention_mask`` from the latter).
    """
    labels = inputs["labels"]
    base = _base_model(model)
    hidden = base.model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                        attention_mask=inputs["attention_mask"],
                        position_ids=inputs.get("position_ids")).last_hidden_state  # (B, T, C)
    targets = labels[:, 1:]
    keep = targets != -100
    logits = base.lm_head(hidden[:, :-1][keep])  # (n_supervised, V)
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def _load_projector(model, path: Path) -> None:
    """Load the projector weights ``path`` (:func:`~eval.testbed.model.projector_state` keys) into ``model``.

    Raises:
        ValueError: the file holds keys the model does not have.
    """
    from safetensors.torch import load_file

    result = model.load_state_dict(load_file(str(path)), strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{path} holds keys the model does not have: {result.unexpected_keys[:3]}")


class ProjectorCheckpoints(TrainerCallback):
    """Keeps the projector in every checkpoint as ``projector.safetensors`` and restores it on resume.

    Needed because the checkpoint's own ``model.safetensors`` is written by ``save_pretrained``, which stores a LLaVA
    model under its legacy key names (``multi_modal_projector.*``), while ``Trainer``'s resume loads it into the
    live model, whose keys are ``model.multi_modal_projector.*``: the projector would silently restart from its
    initialisation (seen with transformers 5.24; the test of the training script catches it).

    Args:
        resume_from: the checkpoint folder training resumes from, or None.
    """

    def __init__(self, resume_from: Path | None):
        self.resume_from = resume_from

    def on_save(self, args, state, control, model=None, **kwargs):
        from safetensors.torch import save_file

        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        save_file(projector_state(_base_model(model)), str(folder / "projector.safetensors"))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.resume_from is None:
            return
        path = self.resume_from / "projector.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing, so the projector cannot be resumed; delete the checkpoint "
                                    "folder to start over.")
        _load_projector(_base_model(model), path)


class ProjectorTrainer(Trainer):
    """:class:`~transformers.Trainer` with :func:`supervised_loss` (through the documented ``compute_loss`` hook)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = supervised_loss(model, inputs)
        return (loss, None) if return_outputs else loss


def settings_record(cfg: dict) -> dict:
    """What a training run's output folder is bound to (a resume with other settings is refused)."""
    keys = ("num_images", "every_question", "layout", "feature_layer", "init_projector", "train_projector", "epochs", "batch_size", "learning_rate", "warmup_ratio", "seed", "lora",
            "image_size")
    record = {k: cfg[k] for k in keys} | {"generator_version": tdata.GENERATOR_VERSION}
    if cfg.get("align"):  # only when set, so folders written before the alignment stage existed still resume
        record["align"] = dict(cfg["align"])
    if cfg["init_projector"] is not None:  # the file's content, not only its path, binds the run
        from .weights import _sha256

        record["init_projector_sha256"] = _sha256(Path(cfg["init_projector"]))
    return record


_ALIGN_SET_HERE = {"seed", "image_size", "progress"}
"""Keyword arguments of :func:`eval.testbed.align.align_projector` that the training settings fill in themselves."""


def _check_align(align: dict) -> None:
    """Raise ValueError unless ``align`` holds exactly keyword arguments of ``align_projector`` it may set, and
    its required ones (read from the function's signature, so the two cannot drift apart)."""
    import inspect

    from .align import align_projector

    params = {n: p for n, p in inspect.signature(align_projector).parameters.items()
              if p.kind is p.KEYWORD_ONLY and n not in _ALIGN_SET_HERE}
    required = [n for n, p in params.items() if p.default is p.empty]  # in signature order
    if set(align) - set(params) or not set(required) <= set(align):
        optional = [n for n in params if n not in required]
        raise ValueError(f"align takes {', '.join(required)} (required) and {', '.join(optional)}; got "
                         f"{', '.join(sorted(align))}")


def _align_stage(cfg: dict, pipeline, out: Path) -> dict:
    """Align the projector (:func:`eval.testbed.align.align_projector`) once per output folder; a rerun loads the
    saved result instead of computing it again. Returns the alignment's result record."""
    from safetensors.torch import save_file

    from .align import align_projector

    weights, record = out / "aligned_projector.safetensors", out / "align_result.json"
    model = pipeline.model
    if weights.is_file() and record.is_file():
        _load_projector(model, weights)
        logger.info("reusing the aligned projector in %s", weights)
        return json.loads(record.read_text(encoding="utf-8"))
    started = time.time()
    result = align_projector(model, pipeline.processor, **cfg["align"], seed=cfg["seed"],
                             image_size=cfg["image_size"])
    result["seconds"] = round(time.time() - started, 1)
    save_file(projector_state(model), str(weights))
    record.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")  # last: marks it done
    return result


def train(cfg: dict, pipeline, output_dir: str | Path) -> dict:
    """Train the projector (and the LoRA, if ``cfg["lora"]``) and write ``projector.safetensors`` and a summary.

    Args:
        cfg: ``num_images``, ``every_question`` (see :class:`TestbedChats`), ``layout`` (``"blocks"``:
            :class:`TestbedBlocks`, ``"chat"``: :class:`TestbedChats`), ``feature_layer`` (must be the model's
            ``vision_feature_layer``), ``epochs``, ``batch_size``, ``learning_rate``, ``warmup_ratio``, ``seed``, ``lora``
            (null or ``{"r": ..., "alpha": ..., "target_modules": [...]}``), ``image_size``, ``logging_steps``,
            ``save_steps``, ``max_minutes`` (stop early after this much wall time, null: no limit), ``align``
            (null, or the keyword arguments of :func:`eval.testbed.align.align_projector` but ``seed``: the
            projector is first regressed onto the patches' word targets, saved as
            ``output_dir/aligned_projector.safetensors`` and reused from there on a rerun; then the language-model
            stage starts from it).
        pipeline: the testbed pipeline (unpatched: the encoder is unmodified during training).
        output_dir: where checkpoints (``checkpoint-*``, resumable) and results go.

    Returns:
        the summary written to ``output_dir/train_summary.json``.

    Raises:
        FileExistsError: ``output_dir`` holds a run with other settings (the message names them; nothing is
            deleted).
        ValueError: an unknown ``layout``; ``feature_layer`` is not the model's; nothing to train
            (``train_projector`` false and no ``lora``).
    """
    from safetensors.torch import save_file

    # Bad settings are refused before anything is written, so fixing them needs no new output folder.
    if cfg["layout"] not in ("blocks", "chat"):
        raise ValueError(f"layout must be 'blocks' or 'chat', not {cfg['layout']!r}")
    if pipeline.model.config.vision_feature_layer != cfg["feature_layer"]:
        raise ValueError(f"the model reads tower layer {pipeline.model.config.vision_feature_layer}, the settings "
                         f"say feature_layer={cfg['feature_layer']}; build the base with the same feature layer.")
    if not cfg["train_projector"] and not cfg.get("lora"):
        raise ValueError("train_projector=false with lora=null leaves nothing to train; enable one of them.")
    if cfg.get("align"):
        _check_align(cfg["align"])
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = settings_record(cfg)
    settings_file = out / "train_settings.json"
    if settings_file.is_file():
        found = json.loads(settings_file.read_text(encoding="utf-8"))
        if found != record:
            diff = {k: (found.get(k), record.get(k)) for k in set(found) | set(record) if found.get(k) != record.get(k)}
            raise FileExistsError(f"{out} holds a training run with other settings (found, asked): {diff}; pass "
                                  "another output folder, or delete it to start over.")
    else:
        settings_file.write_text(json.dumps(record, indent=2, allow_nan=False) + "\n", encoding="utf-8")

    model = pipeline.model
    align_result = _align_stage(cfg, pipeline, out) if cfg.get("align") else None
    train_projector = cfg["train_projector"]
    for name, p in model.named_parameters():
        p.requires_grad = train_projector and ".multi_modal_projector." in name
    if cfg.get("lora"):
        from peft import LoraConfig, get_peft_model

        lora = cfg["lora"]
        # A regex, not a list of names: the DINOv2 tower names its projections q_proj / k_proj / v_proj / o_proj
        # too, and a name list would put LoRA on the (frozen, unmodified) tower as well.
        names = "|".join(lora["target_modules"])
        target = rf"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.({names})"
        model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=0.0,
                                                 target_modules=target))
        for name, p in model.named_parameters():
            if train_projector and ".multi_modal_projector." in name:
                p.requires_grad = True
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("training %d parameters", trainable)

    # The LLaVA-1.5 family's prompt carries the vicuna_v1 system sentence; TestbedChats checks the first turn
    # against the pipeline's own prompt, so a family that wrote another one would stop training at once.
    if cfg["layout"] == "blocks":
        dataset = TestbedBlocks(pipeline, "train", cfg["num_images"], every_question=cfg["every_question"])
        collator = BlockCollator(pipeline.processor.tokenizer.pad_token_id)
    else:
        dataset = TestbedChats(pipeline, "train", cfg["num_images"], system=SYSTEM_VICUNA_V1,
                               every_question=cfg["every_question"])
        collator = ChatCollator(pipeline.processor.tokenizer.pad_token_id)
    steps_per_epoch = math.ceil(len(dataset) / cfg["batch_size"])
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=cfg["batch_size"], num_train_epochs=cfg["epochs"],
        learning_rate=cfg["learning_rate"], warmup_steps=int(cfg["warmup_ratio"] * steps_per_epoch * cfg["epochs"]),
        lr_scheduler_type="cosine", weight_decay=0.0, logging_steps=cfg["logging_steps"],
        save_steps=cfg["save_steps"], save_total_limit=2, seed=cfg["seed"], data_seed=cfg["seed"],
        dataloader_num_workers=0, report_to=[], remove_unused_columns=False, use_cpu=True,
        disable_tqdm=False, save_only_model=False,
    )
    started = time.time()

    class TimeLimit(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if cfg.get("max_minutes") and time.time() - started > 60 * cfg["max_minutes"]:
                control.should_training_stop = True
                control.should_save = True

    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(out))
    resume = Path(last) if last else None
    trainer = ProjectorTrainer(model=model, args=args, train_dataset=dataset,
                               data_collator=collator,
                               callbacks=[TimeLimit(), ProjectorCheckpoints(resume)])
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    save_file(projector_state(_base_model(model)), str(out / "projector.safetensors"))
    if cfg.get("lora"):
        model.save_pretrained(str(out / "lora"))
    summary = {**record, "align_result": align_result, "trainable_parameters": trainable, "images": len(dataset),
               "steps": trainer.state.global_step, "train_loss": result.training_loss,
               "seconds_this_session": round(time.time() - started, 1),
               "log_history": trainer.state.log_history}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return summary
