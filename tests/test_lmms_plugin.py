"""The lmms-eval plugin (optional extra ``lmms``: skipped unless lmms-eval is installed).

Run in an environment with ``pip install -e ".[dev,lmms]"`` (CI does, in a separate venv).
"""

import pytest
from PIL import Image

import llava  # conftest.py has called dymu.prepare_cpu_torchvision(): torchvision (imported by lmms_eval) loads
from conftest import SAMPLE_IMAGES

lmms_eval_models = pytest.importorskip("lmms_eval.models")
from lmms_eval.api.instance import Instance  # noqa: E402


def request(i, question, until=None):
    kwargs = {"max_new_tokens": 5, **({"until": until} if until else {})}
    return Instance(request_type="generate_until",
                    arguments=(question, kwargs, lambda doc: [doc["image"]], i, "toy", "test"),
                    idx=0, metadata={"task": "toy", "doc_id": i, "repeats": 1})


def test_registered_through_the_entry_point_and_generates_offline(tiny_path):
    cls = lmms_eval_models.get_model("dymu_llava")  # found via the lmms_eval.models entry point
    assert cls.__module__ == "eval.lmms_plugin"
    mid = str(tiny_path / "thresholds" / "mid.json")
    model = cls(pretrained=str(tiny_path), dymu=mid, batch_size=2)
    images = [Image.open(SAMPLE_IMAGES / name).convert("RGB") for name in ("chelsea.jpg", "coffee.jpg", "moon.jpg")]
    model.task_dict = {"toy": {"test": [{"image": im} for im in images]}}  # what lmms-eval's evaluator sets
    questions = ["What animal is this?", "What is in the cup?", "Is it night?"]
    answers = model.generate_until([request(i, q) for i, q in enumerate(questions)])
    direct, inputs = llava.load_model(tiny_path, dymu=mid).generate(questions, images, max_new_tokens=5)
    assert answers == direct  # same pipeline, same greedy answers
    assert model.visual_token_counts == inputs.visual_tokens and all(n < 576 for n in inputs.visual_tokens)
    cut = model.generate_until([request(0, questions[0], until=[direct[0][1:3]])])
    assert cut == [direct[0].split(direct[0][1:3])[0]]  # stop strings end the answer
