"""Hostile benchmark data: row ids and image paths that try to leave their folder.

- Hub rows (GQA, TextVQA, SEED-Bench) whose id is ``../../..`` or an absolute path are cached inside the cache
  folder under a safe name, and a row that fails validation writes nothing.
- Local benchmark files whose image (or video) path leaves the data folder are refused with an error naming
  the file and entry, the path and the opt-in ``allow_external_images``, unless the user opts in.

The Hub loaders run unchanged from the benchmark constructors; only ``datasets.load_dataset`` (behind
``eval.benchmarks._hub``) is replaced by :class:`Table`, a list of rows in the layout ``datasets`` yields
(undecoded images as ``{"bytes", "path"}``, SEED-Bench's as lists of PIL images), because the download is
not what these tests are about and ``datasets`` is an optional dependency.
"""

import io
import json
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from PIL import Image

from conftest import REPO
from eval.benchmarks import _hub
from eval.benchmarks.gqa import GQABenchmark
from eval.benchmarks.llava_bench import LLaVABenchWildBenchmark
from eval.benchmarks.mmvet import MMVetBenchmark
from eval.benchmarks.pope import POPEBenchmark
from eval.benchmarks.sample import SampleBenchmark
from eval.benchmarks.scienceqa import ScienceQABenchmark
from eval.benchmarks.seed import SEEDBenchmark
from eval.benchmarks.textvqa import TextVQABenchmark
from eval.benchmarks.videomme import VideoMMEBenchmark


def jpeg_bytes(color: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


class Table(list):
    """Rows as ``datasets`` yields them; ``cast_column(..., Image(decode=False))`` leaves them as they are."""

    def cast_column(self, column, feature):
        return self


def serve(monkeypatch, tables: dict) -> None:
    """Make ``_hub.load_dataset(hub_id, config, split=...)`` return ``tables[config]``."""
    monkeypatch.setattr(_hub, "hub_image_feature", lambda hub_id, local_hint: lambda decode=True: None)
    monkeypatch.setattr(_hub, "load_dataset", lambda hub_id, *args, local_hint, **kwargs: tables[args[0] if args else None])


SEED_QUESTION = {"question": "Q?", "choice_a": "a", "choice_b": "b", "choice_c": "c", "choice_d": "d",
                 "answer": "A", "question_type_id": 1, "data_id": "x.jpg", "data_type": "image"}


def hub_benchmark(name: str, ids: list[str], cache: Path, monkeypatch):
    """The ``name`` benchmark loaded from Hub rows with ids ``ids`` (image i has colour i), cached in ``cache``."""
    colors = ["red", "green", "blue", "white"]
    if name == "gqa":
        serve(monkeypatch, {
            "testdev_balanced_images": Table({"id": i, "image": {"bytes": jpeg_bytes(c), "path": None}}
                                             for i, c in zip(ids, colors)),
            "testdev_balanced_instructions": Table({"id": f"q{n}", "imageId": i, "question": "Q?", "answer": "yes"}
                                                   for n, i in enumerate(ids)),
        })
        return GQABenchmark(None, hub_id="hostile/gqa", image_cache_dir=str(cache))
    if name == "textvqa":
        serve(monkeypatch, {None: Table({"question_id": f"q{n}", "image_id": i, "question": "Q?", "answers": ["a"],
                                         "ocr_tokens": [], "image": {"bytes": jpeg_bytes(c), "path": None}}
                                        for n, (i, c) in enumerate(zip(ids, colors)))})
        return TextVQABenchmark(None, hub_id="hostile/textvqa", image_cache_dir=str(cache))
    serve(monkeypatch, {None: Table({**SEED_QUESTION, "question_id": i, "image": [Image.new("RGB", (8, 8), c)]}
                                    for i, c in zip(ids, colors))})
    return SEEDBenchmark(None, image_cache_dir=str(cache), hub_id="hostile/seed")


@pytest.mark.parametrize("name", ["gqa", "textvqa", "seed"])
def test_hub_row_ids_never_escape_the_cache(name, tmp_path, monkeypatch):
    cache = tmp_path / "deep" / "er" / "cache"
    image_dir = cache if name == "seed" else cache / "images"
    suffix = ".png" if name == "seed" else ".jpg"
    climb = os.path.relpath(tmp_path / "climbed", image_dir)  # "../../../../climbed" (or one level less)
    absolute = str(tmp_path / "outside" / "absolute")
    (tmp_path / "outside").mkdir()
    ids = ["n161313", climb, absolute, "v1.2_x-3"]

    bench = hub_benchmark(name, ids, cache, monkeypatch)

    # Nothing lands outside the cache: not where the ids point, not anywhere else under tmp_path.
    assert not (tmp_path / f"climbed{suffix}").exists() and not Path(absolute + suffix).exists()
    written = files_under(tmp_path)
    assert written and all(image_dir in p.parents for p in written), sorted(map(str, written))
    assert all(p.parent == image_dir for p in written)
    samples = bench.samples()
    paths = [Path(s.image_paths[0]) for s in samples]
    assert len(set(paths)) == len(ids) and all(p.is_file() and p.parent == image_dir.resolve() for p in paths)
    # Each sample still gets its own image, and keeps the dataset's id (GQA / TextVQA keep the image id in meta).
    colors = [Image.open(p).convert("RGB").getpixel((4, 4)) for p in paths]
    assert [max(range(3), key=c.__getitem__) for c in colors[:3]] == [0, 1, 2]
    if name == "seed":
        assert [s.id for s in samples] == ids
    else:
        assert [s.meta["image_id"] for s in samples] == ids
    # Ordinary ids keep the file name they always had, so existing caches stay valid.
    assert paths[0].name == f"n161313{suffix}" and paths[3].name == f"v1.2_x-3{suffix}"
    assert ".." not in paths[1].name and paths[1].name.startswith("climbed-") and paths[1].name.endswith(suffix)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"answer": "E"}, r"row 0: answer 'E' is not one of \['A', 'B', 'C', 'D'\]"),
        ({"choice_b": ""}, r"row 0: option\(s\) \['B'\] empty"),
        ({"question_type_id": "x"}, r"row 0: 'question_type_id' must be an integer"),
    ],
)
def test_seed_validates_rows_before_writing(change, message, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    serve(monkeypatch, {None: Table([{**SEED_QUESTION, "question_id": "1", "image": [Image.new("RGB", (8, 8))],
                                      **change}])})
    with pytest.raises(ValueError, match=message):
        SEEDBenchmark(None, image_cache_dir=str(cache), hub_id="hostile/seed")
    assert files_under(tmp_path) == set() and not cache.exists()


def test_gqa_and_textvqa_rows_without_image_bytes_write_nothing(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    serve(monkeypatch, {"testdev_balanced_images": Table([{"id": "n1", "image": {"bytes": None, "path": None}}]),
                        "testdev_balanced_instructions": Table()})
    with pytest.raises(ValueError, match=r"hostile/gqa testdev_balanced_images row 0: 'image' must hold"):
        GQABenchmark(None, hub_id="hostile/gqa", image_cache_dir=str(cache))
    serve(monkeypatch, {None: Table([{"question_id": "q1", "image_id": "n1", "question": "Q?", "answers": "a",
                                      "image": {"bytes": jpeg_bytes("red"), "path": None}}])})
    with pytest.raises(ValueError, match=r"hostile/textvqa row 0: 'answers' must be a list of strings"):
        TextVQABenchmark(None, hub_id="hostile/textvqa", image_cache_dir=str(cache))
    assert files_under(tmp_path) == set()


# --- local files whose image paths leave the data folder ------------------------------------------------------


def escape(kind: str, folder: Path, target: Path) -> str:
    """A path to ``target`` as a data file would write it relative to ``folder`` (created, as in a real data
    folder): climbing out with ``..`` or absolute."""
    folder.mkdir(parents=True, exist_ok=True)
    return str(target) if kind == "absolute" else os.path.relpath(target, folder)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_json(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return path


def local_benchmark(name: str, kind: str, data: Path, outside: Path):
    """(benchmark class, constructor kwargs, where the error must point) for a ``name`` data folder ``data``
    whose only question names the image (or frames folder) ``outside``."""
    if name == "gqa":
        write_json(data / "testdev_balanced_questions.json", {"q1": {"imageId": "n1", "question": "Q?", "answer": "a"}})
        path = write_jsonl(data / "llava_gqa_testdev_balanced.jsonl",
                           [{"question_id": "q1", "image": escape(kind, data / "images", outside), "text": "Q?"}])
        return GQABenchmark, {"data_dir": str(data), "hub_id": None}, f"{path.resolve()}:1"
    if name == "textvqa":
        image_id = escape(kind, data / "train_images", outside.with_suffix(""))  # the loader appends ".jpg"
        path = write_json(data / "TextVQA_0.5.1_val.json", {"data": [
            {"question_id": 7, "image_id": image_id, "question": "q?", "answers": ["a"] * 10, "ocr_tokens": []}]})
        return TextVQABenchmark, {"data_dir": str(data), "hub_id": None}, f"{path.resolve()} data[0] (question_id 7)"
    if name == "seed":
        path = write_json(data / "SEED-Bench.json", {"questions": [
            {**SEED_QUESTION, "question_id": "1", "data_id": escape(kind, data / "SEED-Bench-image", outside)}]})
        return SEEDBenchmark, {"data_dir": str(data)}, f"{path}: questions[0]"
    if name == "llava_bench":
        image = escape(kind, data / "images", outside)
        path = write_jsonl(data / "questions.jsonl", [{"question_id": 1, "image": image, "text": "q", "category": "conv"}])
        write_jsonl(data / "answers_gpt4.jsonl", [{"question_id": 1, "text": "a"}])
        write_jsonl(data / "context.jsonl", [{"image": image, "caption": "c"}])
        return LLaVABenchWildBenchmark, {"data_dir": str(data)}, f"{path}:1"
    if name == "mmvet":
        path = write_json(data / "mm-vet.json", {"v1_0": {"imagename": escape(kind, data / "images", outside),
                                                          "question": "q", "answer": "a", "capability": ["ocr"]}})
        return MMVetBenchmark, {"data_dir": str(data)}, f"{path} entry 'v1_0'"
    if name == "pope":
        path = write_jsonl(data / "coco_pope_random.json", [
            {"question_id": 1, "image": escape(kind, data / "val2014", outside), "text": "q", "label": "yes"}])
        return POPEBenchmark, {"data_dir": str(data), "splits": ["random"], "hub_id": None}, f"{path.resolve()}:1"
    if name == "sample":
        path = write_jsonl(data / "questions.jsonl", [{"question_id": "q1", "image": escape(kind, data, outside),
                                                       "question": "q", "answer": "yes", "answer_type": "yes_no"}])
        return SampleBenchmark, {"data_dir": str(data)}, f"{path}:1"
    if name == "scienceqa":
        path = write_json(data / "problems.json", {"p1": {
            "question": "q", "choices": ["a", "b"], "answer": 0, "split": "test",
            "image": escape(kind, data / "images" / "test" / "p1", outside)}})
        return ScienceQABenchmark, {"data_dir": str(data)}, f"{path}: problem 'p1'"
    assert name == "videomme"
    frames = outside.parent / "outside_frames"
    frames.mkdir()
    (frames / "0001.jpg").write_bytes(outside.read_bytes())
    path = write_json(data / "videomme.json", [{"question_id": "1", "question": "q", "options": ["A. x", "B. y"],
                                                 "answer": "A", "videoID": escape(kind, data / "frames", frames)}])
    return VideoMMEBenchmark, {"data_dir": str(data)}, f"{path} item 0"


LOCAL_BENCHMARKS = ["gqa", "textvqa", "seed", "llava_bench", "mmvet", "pope", "sample", "scienceqa", "videomme"]


@pytest.mark.parametrize("kind", ["climbing", "absolute"])
@pytest.mark.parametrize("name", LOCAL_BENCHMARKS)
def test_local_image_paths_outside_the_data_folder_are_refused_unless_opted_in(name, kind, tmp_path):
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(jpeg_bytes("red"))
    data = tmp_path / "data"
    data.mkdir()
    cls, kwargs, where = local_benchmark(name, kind, data, outside)

    with pytest.raises(ValueError) as refused:
        cls(**kwargs)
    message = str(refused.value)
    assert message.startswith(f"{where}: ")
    assert "leads outside the data folder" in message and str(data.resolve().parent / "outside") in message
    assert "allow_external_images=True" in message and "benchmark.task.allow_external_images=true" in message

    (sample,) = cls(**kwargs, allow_external_images=True).samples()
    seen = sample.video_path if name == "videomme" else sample.image_paths[0]
    target = outside.parent / "outside_frames" if name == "videomme" else outside
    assert Path(seen).resolve() == target.resolve()


def test_allow_external_images_is_reachable_from_hydra(tmp_path):
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(jpeg_bytes("red"))
    data = tmp_path / "data"
    local_benchmark("sample", "climbing", data, outside)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "hydra_conf"), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=["benchmark=sample", f"benchmark.task.data_dir={data}"])
        with pytest.raises(InstantiationException, match=r"questions\.jsonl:1: image path '\.\./outside\.jpg' leads outside"):
            instantiate(cfg.benchmark.task)
        cfg = compose(config_name="eval", overrides=["benchmark=sample", f"benchmark.task.data_dir={data}",
                                                     "benchmark.task.allow_external_images=true"])
        (sample,) = instantiate(cfg.benchmark.task).samples()
    GlobalHydra.instance().clear()
    assert Path(sample.image_paths[0]) == outside.resolve()
