"""Tests of the generated visual questions (eval/testbed/data.py).

Answers are checked two ways: against the scene description, and, for flat backgrounds, against the rendered
pixels alone (connected components of non-background pixels, their fill colour, a shape classifier from region
properties and their centroids), which does not look at the scene at all.
"""

import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from skimage.measure import label, regionprops

from eval.testbed import data as D

SIZE = 224
N_IMAGES = 300


@pytest.fixture(scope="module")
def scenes():
    return [D.make_scene(D.SPLITS["train"] + i) for i in range(N_IMAGES)]


@pytest.fixture(scope="module")
def train_samples():
    return D.split_samples("train", N_IMAGES)


def _seeds_with(background, count, limit=2000):
    found = []
    for seed in range(limit):
        if D.make_scene(seed).background == background:
            found.append(seed)
            if len(found) == count:
                return found
    raise AssertionError(f"fewer than {count} {background} scenes among seeds < {limit}")


# ------------------------------------------------------------------------------- pixel-only image analysis


def _classify(region) -> str:
    """Shape kind from the region's solidity (area / convex area) and extent (area / bounding-box area)."""
    if region.solidity >= 0.88:  # convex: square fills its box, a circle ~pi/4 of it, a triangle ~1/2
        if region.extent > 0.9:
            return "square"
        return "circle" if region.extent > 0.65 else "triangle"
    return "star" if region.extent < 0.48 else "cross"  # star ~0.40, cross ~0.57


def _analyse_flat(image: Image.Image):
    """[(colour, kind, centroid_x)] of the objects of an image on a flat background, from pixels only."""
    pixels = np.asarray(image)
    flat = pixels.reshape(-1, 3)
    values, counts = np.unique(flat, axis=0, return_counts=True)
    background = values[np.argmax(counts)]
    components = label((pixels != background).any(axis=-1), connectivity=2)
    palette = {name: np.array(rgb, dtype=np.uint8) for name, rgb in D.COLOURS.items()}
    objects = []
    for region in regionprops(components):
        inside = pixels[components == region.label]
        votes = {name: int((inside == rgb).all(axis=-1).sum()) for name, rgb in palette.items()}
        colour = max(votes, key=votes.get)
        assert votes[colour] > 0.3 * region.area, "an object is not mostly one palette colour"
        assert sorted(votes.values())[-2] == 0, "an object holds two palette colours"
        objects.append((colour, _classify(region), region.centroid[1]))
    return objects


def test_pixel_classifier_recognises_every_kind_and_size():
    # Check the test's own analyser on hand-built scenes (every kind, both size classes, spread out).
    for size_class, radius in (("small", 0.063 * SIZE), ("small", 0.077 * SIZE), ("large", 0.143 * SIZE)):
        shapes = tuple(
            D.Shape(kind, colour, size_class, (40 + 72 * (i % 3), 50 + 110 * (i // 3)), radius)
            for i, (kind, colour) in enumerate(zip(D.SHAPES, D.COLOURS))
        )
        image = D.render(D.Scene(seed=7, size=SIZE, background="flat", shapes=shapes))
        found = sorted((c, k) for c, k, _ in _analyse_flat(image))
        assert found == sorted((s.color, s.kind) for s in shapes)


def test_centre_pixel_has_the_shape_colour_on_a_hand_built_scene():
    shapes = tuple(
        D.Shape(kind, colour, size_class, (40 + 72 * (i % 3), 50 + 110 * (i // 3)), radius)
        for i, (kind, colour, (size_class, radius)) in enumerate(
            zip(D.SHAPES, reversed(tuple(D.COLOURS)), [("large", 30.0), ("small", 16.0)] * 3)
        )
    )
    scene = D.Scene(seed=3, size=SIZE, background="flat", shapes=shapes)
    pixels = np.asarray(D.render(scene))
    assert pixels.shape == (SIZE, SIZE, 3) and pixels.dtype == np.uint8
    for shape in shapes:
        x, y = shape.center
        assert tuple(pixels[y, x]) == D.COLOURS[shape.color], shape
        # the fill is solid around the centre too (the triangle contains its centre with room to spare)
        assert (pixels[y - 2 : y + 3, x - 2 : x + 3] == D.COLOURS[shape.color]).all(), shape
    corner = pixels[2, 2].astype(float)
    assert min(np.linalg.norm(corner - np.array(rgb)) for rgb in D.COLOURS.values()) >= 80


@pytest.mark.parametrize("every", [False, True], ids=["one_per_type", "every_question"])
def test_answers_agree_with_the_rendered_pixels_on_flat_backgrounds(every):
    seeds = _seeds_with("flat", 30)
    checked = Counter()
    for seed in seeds:
        scene = D.make_scene(seed)
        image = D.render(scene)
        pixels = np.asarray(image)
        for shape in scene.shapes:
            x, y = shape.center
            assert tuple(pixels[y, x]) == D.COLOURS[shape.color], (seed, shape)
        objects = _analyse_flat(image)
        pairs = [(c, k) for c, k, _ in objects]
        for q in D.questions(scene, every=every):
            checked[q.qtype] += 1
            if q.qtype == "count":
                assert q.answer == str(len(objects)) == str(len(scene.shapes))
            elif q.qtype == "shape":
                colour = re.fullmatch(r"What shape is the (\w+) object\?", q.question).group(1)
                matches = [k for c, k in pairs if c == colour]
                assert matches == [q.answer], (seed, q)
            elif q.qtype == "color":
                kind = re.fullmatch(r"What color is the (\w+)\?", q.question).group(1)
                matches = [c for c, k in pairs if k == kind]
                assert matches == [q.answer], (seed, q)
            elif q.qtype == "position":
                colour, kind = re.fullmatch(r"Is the (\w+) (\w+) on the left or the right\?", q.question).groups()
                xs = [x for c, k, x in objects if (c, k) == (colour, kind)]
                assert len(xs) == 1, (seed, q)
                assert abs(xs[0] - SIZE / 2) > 0.1 * SIZE
                assert q.answer == ("left" if xs[0] < SIZE / 2 else "right"), (seed, q)
            elif q.qtype == "exists":
                colour, kind = re.fullmatch(r"Is there a (\w+) (\w+)\?", q.question).groups()
                assert q.answer == ("yes" if (colour, kind) in pairs else "no"), (seed, q)
    assert set(checked) == set(D.QUESTION_TYPES)


# ------------------------------------------------------------------------------------------- determinism


def test_same_seed_gives_the_same_scene_and_pixels_and_different_seeds_differ():
    seeds = [0, 1, 2, 17, 123_456, 2_000_005]
    first = {s: D.make_scene(s) for s in seeds}
    pixels = {s: D.render(first[s]).tobytes() for s in seeds}
    for s in reversed(seeds):  # a different call order must not matter
        again = D.make_scene(s)
        assert again == first[s]
        assert D.render(again).tobytes() == pixels[s]
        assert D.questions(again) == D.questions(first[s])
    assert len({first[s] for s in seeds}) == len(seeds)
    assert len(set(pixels.values())) == len(seeds)


def test_rendering_of_every_background_is_deterministic():
    for background in D.BACKGROUNDS:
        scene = D.make_scene(_seeds_with(background, 1)[0])
        a, b = D.render(scene), D.render(scene)
        assert a.mode == "RGB" and a.size == (SIZE, SIZE)
        assert a.tobytes() == b.tobytes()
        other = D.Scene(seed=scene.seed + 1, size=scene.size, background=background, shapes=scene.shapes)
        assert D.render(other).tobytes() != a.tobytes()  # background randomness comes from the seed


def test_scene_geometry(scenes):
    counts = Counter()
    for scene in scenes:
        assert scene.size == SIZE and scene.background in D.BACKGROUNDS
        assert 1 <= len(scene.shapes) <= 6
        counts[len(scene.shapes)] += 1
        for s in scene.shapes:
            assert s.kind in D.SHAPES and s.color in D.COLOURS and s.size in ("small", "large")
            nominal = {"small": 0.07, "large": 0.13}[s.size] * SIZE
            assert 0.85 * nominal <= s.radius <= 1.15 * nominal
            x, y = s.center
            assert s.radius < x < SIZE - s.radius and s.radius < y < SIZE - s.radius
        for i, a in enumerate(scene.shapes):
            for b in scene.shapes[i + 1 :]:
                gap = np.hypot(a.center[0] - b.center[0], a.center[1] - b.center[1]) - a.radius - b.radius
                assert gap > 0.02 * SIZE
    assert set(counts) == set(range(1, 7))


def test_smaller_images_scale_the_scene():
    scene = D.make_scene(11, size=96)
    image = D.render(scene)
    assert image.size == (96, 96)
    for s in scene.shapes:
        assert s.radius <= 0.15 * 96 and s.radius < s.center[0] < 96 - s.radius


# ------------------------------------------------------------------------------------------------- splits


def test_split_seeds_are_disjoint_and_question_ids_unique():
    per_split = {split: D.split_samples(split, 150) for split in D.SPLITS}
    seeds = {split: {s.image_seed for s in samples} for split, samples in per_split.items()}
    for split, samples in per_split.items():
        assert seeds[split] == {D.SPLITS[split] + i for i in range(150)}
        assert all(s.split == split and s.question_id.startswith(f"{split}-") for s in samples)
    assert not seeds["train"] & seeds["val"] and not seeds["train"] & seeds["test"] and not seeds["val"] & seeds["test"]
    ids = [s.question_id for samples in per_split.values() for s in samples]
    assert len(ids) == len(set(ids))
    # the stride is big enough for far larger splits, and the guard stops a range from spilling over
    assert D.split_samples("train", 1, start=999_999)[0].image_seed == 999_999
    with pytest.raises(ValueError, match="past"):
        D.split_samples("train", 2, start=999_999)


def test_start_offsets_line_up():
    whole = D.split_samples("val", 12)
    assert D.split_samples("val", 7, start=5) == [s for s in whole if int(s.question_id.split("-")[1]) >= 5]
    first = whole[0]
    assert first.question_id == f"val-000000-{first.qtype}" and first.image_seed == D.SPLITS["val"]


# ---------------------------------------------------------------------------------------------- questions


def test_answers_are_one_lowercase_word_from_the_vocabulary(train_samples):
    words = D.answer_words()
    assert words == tuple(sorted(set(words)))
    for s in train_samples:
        assert re.fullmatch(r"[a-z0-9]+", s.answer), s
        assert s.answer in words, s
    # the vocabulary is exact: every word is reached
    assert {s.answer for s in train_samples} == set(words)


def test_question_mix_over_300_images(scenes, train_samples):
    types = Counter(s.qtype for s in train_samples)
    assert set(types) == set(D.QUESTION_TYPES)
    assert types["count"] == types["exists"] == N_IMAGES
    exists = Counter(s.answer for s in train_samples if s.qtype == "exists")
    assert 0.4 <= exists["yes"] / N_IMAGES <= 0.6
    assert set(Counter(s.background for s in scenes)) == set(D.BACKGROUNDS)
    per_image = Counter((s.image_seed, s.qtype) for s in train_samples)
    assert max(per_image.values()) == 1  # at most one question per type per image
    # questions vary: several colours and kinds are asked about
    asked_colours = {re.search(r"the (\w+) object", s.question).group(1) for s in train_samples if s.qtype == "shape"}
    asked_kinds = {re.search(r"the (\w+)\?", s.question).group(1) for s in train_samples if s.qtype == "color"}
    assert asked_colours == set(D.COLOURS) and asked_kinds == set(D.SHAPES)
    positions = Counter(s.answer for s in train_samples if s.qtype == "position")
    assert positions["left"] > 50 and positions["right"] > 50


def test_every_well_defined_type_is_asked_and_answers_match_the_scene(scenes):
    for scene in scenes:
        asked = {q.qtype: q for q in D.questions(scene)}
        shapes = scene.shapes
        colour_counts = Counter(s.color for s in shapes)
        kind_counts = Counter(s.kind for s in shapes)
        pair_counts = Counter((s.color, s.kind) for s in shapes)
        assert ("shape" in asked) == (1 in colour_counts.values())
        assert ("color" in asked) == (1 in kind_counts.values())
        positionable = [
            s for s in shapes if pair_counts[(s.color, s.kind)] == 1 and abs(s.center[0] - SIZE / 2) > 0.12 * SIZE
        ]
        assert ("position" in asked) == bool(positionable)
        assert asked["count"].answer == str(len(shapes))
        if "shape" in asked:
            colour = re.search(r"the (\w+) object", asked["shape"].question).group(1)
            assert colour_counts[colour] == 1
            assert asked["shape"].answer == next(s.kind for s in shapes if s.color == colour)
        if "color" in asked:
            kind = re.search(r"the (\w+)\?", asked["color"].question).group(1)
            assert kind_counts[kind] == 1
            assert asked["color"].answer == next(s.color for s in shapes if s.kind == kind)
        if "position" in asked:
            colour, kind = re.search(r"the (\w+) (\w+) on", asked["position"].question).groups()
            (shape,) = [s for s in shapes if (s.color, s.kind) == (colour, kind)]
            assert abs(shape.center[0] - SIZE / 2) > 0.12 * SIZE
            assert asked["position"].answer == ("left" if shape.center[0] < SIZE / 2 else "right")
        colour, kind = re.search(r"a (\w+) (\w+)\?", asked["exists"].question).groups()
        assert asked["exists"].answer == ("yes" if pair_counts[(colour, kind)] else "no")


def test_every_question_holds_the_benchmark_questions_and_each_well_defined_one(scenes):
    """every=True (training) asks each well-defined question once: it contains the one-per-type questions, one
    shape / color / position question per eligible shape, as many "no" as "yes" existence questions (while absent
    pairs last), and the one-per-type questions are unchanged by it."""
    for scene in scenes[:100]:
        one = D.questions(scene)
        every = D.questions(scene, every=True)
        assert D.questions(scene) == one  # asking every question draws from no shared state
        assert set(one) <= set(every) and len(set(every)) == len(every)
        colour_counts = Counter(s.color for s in scene.shapes)
        kind_counts = Counter(s.kind for s in scene.shapes)
        by_type = Counter(q.qtype for q in every)
        assert by_type["shape"] == sum(colour_counts[s.color] == 1 for s in scene.shapes)
        assert by_type["color"] == sum(kind_counts[s.kind] == 1 for s in scene.shapes)
        assert by_type["count"] == 1
        answers = Counter(q.answer for q in every if q.qtype == "exists")
        assert answers["yes"] == len({(s.color, s.kind) for s in scene.shapes}) == answers["no"]
    samples = D.split_samples("train", 50, every=True)
    assert len({s.question_id for s in samples}) == len(samples) > 3 * len(D.split_samples("train", 50))


# ------------------------------------------------------------------------------------------------ content


def _mean_gradient(image: Image.Image) -> float:
    grey = np.asarray(image.convert("L"), dtype=np.float64)
    return float(np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean())


def test_flat_backgrounds_carry_less_content_than_busy_ones():
    flat = [_mean_gradient(D.render(D.make_scene(s))) for s in _seeds_with("flat", 12)]
    gravel = [_mean_gradient(D.render(D.make_scene(s))) for s in _seeds_with("gravel", 12)]
    photo = [_mean_gradient(D.render(D.make_scene(s))) for s in _seeds_with("photo", 12)]
    assert np.mean(flat) < 0.4 * np.mean(gravel)
    assert np.mean(flat) < 0.6 * np.mean(photo)
    # and more shapes mean more content on the same flat background
    one = D.Scene(5, SIZE, "flat", (D.Shape("circle", "red", "small", (60, 60), 15.0),))
    many = D.Scene(5, SIZE, "flat", one.shapes + tuple(
        D.Shape(k, "blue", "large", (60 + 100 * (i % 2), 60 + 100 * (i // 2)), 28.0)
        for i, k in enumerate(("star", "cross", "triangle"), start=1)
    ))
    assert _mean_gradient(D.render(one)) < _mean_gradient(D.render(many))


def test_flat_and_gradient_backgrounds_avoid_shape_colours():
    palette = np.array(list(D.COLOURS.values()), dtype=np.float64)
    for background in ("flat", "gradient"):
        for seed in _seeds_with(background, 15):
            scene = D.make_scene(seed)
            bare = D.Scene(scene.seed, scene.size, background, ())
            pixels = np.asarray(D.render(bare), dtype=np.float64)[::7, ::7].reshape(-1, 3)
            distance = np.linalg.norm(pixels[:, None] - palette[None], axis=-1).min()
            assert distance >= 80, (background, seed)


# ----------------------------------------------------------------------------------------------- writing


def _mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_write_split_round_trip(tmp_path):
    folder = tmp_path / "val_split"
    path = D.write_split(folder, "val", 4)
    assert path == folder / "questions.jsonl"
    images = sorted((folder / "images").iterdir())
    assert [p.name for p in images] == [f"val-{i:06d}.png" for i in range(4)]
    records = [json.loads(line) for line in path.read_text().splitlines()]
    expected = D.split_samples("val", 4)
    assert [r["question_id"] for r in records] == [s.question_id for s in expected]
    assert [(r["question"], r["answer"], r["type"]) for r in records] == [
        (s.question, s.answer, s.qtype) for s in expected
    ]
    for record in records:
        assert set(record) >= {"question_id", "image", "question", "answer", "type", "background", "num_shapes"}
        index = int(record["question_id"].split("-")[1])
        scene = D.make_scene(D.SPLITS["val"] + index)
        assert record["image"] == f"images/val-{index:06d}.png"
        assert record["background"] == scene.background and record["num_shapes"] == len(scene.shapes)
    for index, image_path in enumerate(images):
        with Image.open(image_path) as image:
            assert image.tobytes() == D.render(D.make_scene(D.SPLITS["val"] + index)).tobytes()
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["split"] == "val" and meta["num_images"] == 4 and meta["size"] == SIZE
    assert meta["generator_version"] == D.GENERATOR_VERSION
    assert not [p for p in folder.rglob(".*")]  # no temporary files left behind

    before = _mtimes(folder)
    assert D.write_split(folder, "val", 4) == path
    assert _mtimes(folder) == before

    with pytest.raises(FileExistsError, match="different"):
        D.write_split(folder, "val", 5)
    with pytest.raises(FileExistsError, match="different"):
        D.write_split(folder, "test", 4)
    with pytest.raises(FileExistsError, match="different"):
        D.write_split(folder, "val", 4, size=128)
    assert _mtimes(folder) == before


def test_interrupted_write_is_redone(tmp_path):
    folder = tmp_path / "split"
    path = D.write_split(folder, "train", 2, size=64)
    complete = path.read_text()
    # simulate a run killed before meta.json: a truncated question file and a missing image
    (folder / "meta.json").unlink()
    path.write_text(complete.splitlines()[0] + "\n")
    (folder / "images" / "train-000001.png").unlink()
    assert D.write_split(folder, "train", 2, size=64) == path
    assert path.read_text() == complete
    assert (folder / "images" / "train-000001.png").exists() and (folder / "meta.json").exists()


def test_unreadable_meta_is_refused(tmp_path):
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(FileExistsError, match="meta"):
        D.write_split(tmp_path, "train", 1)


# --------------------------------------------------------------------------------------------- bad input


def test_bad_input_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match=r"unknown split 'dev'.*train, val, test"):
        D.split_samples("dev", 3)
    with pytest.raises(ValueError, match="num_images must be non-negative"):
        D.split_samples("train", -1)
    with pytest.raises(ValueError, match="start must be non-negative"):
        D.split_samples("train", 1, start=-2)
    assert D.split_samples("test", 0) == []
    with pytest.raises(ValueError, match=r"unknown split 'Train'"):
        D.write_split(tmp_path / "a", "Train", 1)
    with pytest.raises(ValueError, match="num_images must be non-negative"):
        D.write_split(tmp_path / "b", "train", -3)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="seed"):
        D.make_scene(-1)
    with pytest.raises(ValueError, match="size"):
        D.make_scene(0, size=8)
    with pytest.raises(ValueError, match="background"):
        D.render(D.Scene(0, SIZE, "noise", ()))
    with pytest.raises(ValueError, match="kind"):
        D.render(D.Scene(0, SIZE, "flat", (D.Shape("hexagon", "red", "small", (50, 50), 15.0),)))
    with pytest.raises(ValueError, match="at least one shape"):
        D.questions(D.Scene(0, SIZE, "flat", ()))


def test_shape_mask_marks_exactly_the_pixels_of_each_shape_fill_on_flat_backgrounds():
    # Independent of the drawing code: on a flat background, a pixel of the rendered image has a shape's exact fill
    # colour only where that shape lies (muted backgrounds avoid the shape colours), so every such pixel must carry
    # the label of a shape of that colour, and the mask's shape pixels must mostly show that colour (the rest is the
    # outline).
    for seed in _seeds_with("flat", 12):
        scene = D.make_scene(seed)
        pixels = np.asarray(D.render(scene))
        mask = D.shape_mask(scene)
        assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) <= set(range(len(scene.shapes) + 1))
        for index, shape in enumerate(scene.shapes, start=1):
            fill = np.all(pixels == D.COLOURS[shape.color], axis=-1)
            mine = mask == index
            assert mine.sum() > 0
            assert fill[mine].mean() > 0.4, (seed, shape)  # small stars: the outline is nearly half
            same_colour = [i for i, s in enumerate(scene.shapes, start=1) if s.color == shape.color]
            assert np.isin(mask[fill], same_colour).all(), (seed, shape)


def test_patch_labels_name_the_shape_covering_each_patch():
    for seed in range(40):
        scene = D.make_scene(seed)
        labels = D.patch_labels(scene, 14)
        mask = D.shape_mask(scene)
        assert labels.shape == (256,) and labels.dtype == np.int64
        # every shape shows in at least one patch, and a labelled patch is mostly that shape
        assert set(range(1, len(scene.shapes) + 1)) <= set(labels.tolist()), seed
        for p in np.flatnonzero(labels):
            r, c = divmod(int(p), 16)
            block = mask[14 * r:14 * r + 14, 14 * c:14 * c + 14]
            assert (block == labels[p]).mean() >= 0.25
        for p in np.flatnonzero(labels == 0):
            r, c = divmod(int(p), 16)
            block = mask[14 * r:14 * r + 14, 14 * c:14 * c + 14]
            assert max((block == i).mean() for i in range(1, len(scene.shapes) + 1)) < 0.25
    # a larger patch pools more pixels: 28 px patches make an 8 x 8 grid
    assert D.patch_labels(D.make_scene(0), 28).shape == (64,)
    with pytest.raises(ValueError, match="patch_size"):
        D.patch_labels(D.make_scene(0), 0)
    with pytest.raises(ValueError, match="min_cover"):
        D.patch_labels(D.make_scene(0), 14, min_cover=0.0)
