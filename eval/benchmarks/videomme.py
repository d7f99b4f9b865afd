"""Video-MME (Fu et al., 2024, "Video-MME: The First-Ever Comprehensive Evaluation Benchmark of Multi-modal
LLMs in Video Analysis"), without subtitles.

2,700 four-way multiple-choice questions over 900 videos, each video ``short`` (< 2 min), ``medium``
(4-15 min) or ``long`` (30-60 min).

Local data (``data_dir``), the official release layout:

- questions: ``videomme/test-00000-of-00001.parquet`` (or any ``*.parquet`` / one ``*.json`` in ``data_dir``,
  or ``questions_file=``). Rows carry ``videoID`` (the video file's name) and/or ``video_id``,
  ``question_id``, ``question``, ``options`` (``["A. ...", "B. ...", ...]``), ``answer`` (a letter),
  ``duration``, ``domain``, ``sub_category``, ``task_type``. A JSON file may also be nested: a list of videos,
  each with those video fields and a ``questions`` list;
- videos: ``data/<videoID>.mp4`` (the unzipped ``videos_chunked_*.zip``); or extracted frames
  ``frames/<videoID>/*.jpg|png`` (sorted by name, numbers compared as numbers), used when present.

Without ``data_dir`` the questions come from the Hugging Face dataset ``lmms-lab/Video-MME`` (split ``test``)
and the videos from ``video_dir``.

Frames: ``num_frames`` sampled uniformly over the video (default 32, as LLaVA-OneVision is evaluated on
Video-MME), indices ``floor(i * (n - 1) / (num_frames - 1))`` like ``np.linspace(0, n - 1, num_frames)``;
all frames when there are no more than ``num_frames``. Decoding ``.mp4`` needs PyAV (``pip install av``).

Prompt: the question, the options one per line, then "Answer with the option's letter from the given choices
directly." (LLaVA-1.5's multiple-choice instruction, which lmms-eval's Video-MME task appends by default;
Video-MME's own prompt asks likewise to "Respond with only the letter (A, B, C, or D) of the correct option").

Metric: accuracy in percent, overall (``accuracy``) and per duration (``accuracy/short`` ...). The answer
letter is read as Video-MME's evaluation does: drop lead-ins like "The answer is", then take the first
option letter standing alone (see :func:`extract_choice`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from collections import defaultdict
from pathlib import Path

from eval.benchmarks import _hub
from eval.benchmarks.base import Benchmark, Sample, check_limit, data_path, load_local_or_hub

__all__ = ["VideoMMEBenchmark", "extract_choice", "uniform_indices"]

logger = logging.getLogger(__name__)

DEFAULT_HUB_ID = "lmms-lab/Video-MME"
DURATIONS = ("short", "medium", "long")
MC_PROMPT = "\nAnswer with the option's letter from the given choices directly."
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")
REQUIRED_KEYS = ("question_id", "question", "options", "answer")
_LEAD_INS = re.compile(
    r"^\s*(the\s+)?(best|correct|final)?\s*(answer|option|choice)\s*(is|:)?\s*:?\s*", re.IGNORECASE
)
_LETTER_PREFIX = re.compile(r"^\s*\(?([A-Z])[.)]\s")


def uniform_indices(total: int, num: int) -> list[int]:
    """``num`` indices spread uniformly over ``range(total)``, first and last included; all when ``total <= num``.

    ``uniform_indices(10, 4)`` -> ``[0, 3, 6, 9]``.
    """
    if total <= 0:
        raise ValueError(f"cannot sample frames from a video with {total} frames")
    if num <= 0:
        raise ValueError(f"num_frames must be >= 1, got {num}")
    if total <= num:
        return list(range(total))
    if num == 1:
        return [0]
    return [i * (total - 1) // (num - 1) for i in range(num)]


def extract_choice(prediction: str | None, letters: str = "ABCD", options: list[str] | None = None) -> str | None:
    """The option letter a prediction names, or None.

    Strips a lead-in such as "The best answer is" / "Answer:", then returns the first of ``letters`` standing
    alone (``"B"``, ``"(C)"``, ``"D. a dog"``, ``"I think A"``); failing that, the letter of the option whose
    text the prediction repeats exactly (case-insensitive), if ``options`` are given.
    """
    if prediction is None:
        return None
    text = _LEAD_INS.sub("", prediction.strip(), count=1)
    found = re.search(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", text)
    if found:
        return found.group(1)
    if options:
        wanted = text.strip().rstrip(".").lower()
        for option in options:
            match = _LETTER_PREFIX.match(option)
            if match and option[match.end():].strip().rstrip(".").lower() == wanted:
                return match.group(1)
    return None


class VideoMMEBenchmark(Benchmark):
    """Video-MME multiple-choice accuracy (no subtitles), overall and per video duration.

    Args:
        data_dir: folder with the questions (parquet / JSON) and ``data/`` and/or ``frames/``; None: questions
            from ``hub_id``, videos from ``video_dir``.
        limit: keep only the first ``limit`` questions.
        num_frames: frames sampled uniformly per video.
        video_dir: folder holding ``data/<videoID>.mp4`` and/or ``frames/<videoID>/`` (default: ``data_dir``).
        questions_file: the questions file, when ``data_dir`` holds several candidates.
        hub_id: Hugging Face dataset id used when ``data_dir`` is None.
        allow_external_images: accept ``videoID`` values (local file or Hub rows) whose ``frames/`` or
            ``data/`` path leads outside the video folder (absolute, or with ``..``); refused by default.

    Raises:
        FileNotFoundError: no data dir / questions file, or videos missing (names the first ones).
        ValueError: a malformed question row (names it and what to fix), or (without
            ``allow_external_images``) a video outside the video folder.
        ImportError: some video has no frames folder and PyAV is not installed.
    """

    name = "videomme"
    max_new_tokens = 16

    def __init__(
        self,
        data_dir: str | None = None,
        limit: int | None = None,
        num_frames: int = 32,
        video_dir: str | None = None,
        questions_file: str | None = None,
        hub_id: str | None = DEFAULT_HUB_ID,
        allow_external_images: bool = False,
    ) -> None:
        check_limit(limit)
        self.allow_external_images = bool(allow_external_images)
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.num_frames = num_frames
        rows, folder = load_local_or_hub(
            data_dir, hub_id, lambda local: _read_local(local, questions_file), _read_hub,
            "VideoMMEBenchmark needs data_dir or hub_id",
        )
        root = Path(video_dir) if video_dir is not None else folder
        if root is None:
            raise ValueError(
                "the Video-MME videos are not part of the Hugging Face questions: download and unzip "
                "videos_chunked_*.zip from lmms-lab/Video-MME and pass video_dir= the folder holding data/ "
                "(or frames/<videoID>/ folders)"
            )
        self.video_root = root
        self._samples = [_row_sample(row, root, where, self.allow_external_images) for row, where in rows]
        if len({s.id for s in self._samples}) != len(self._samples):
            raise ValueError("Video-MME question_id values are not unique; each question needs its own id")
        self._by_id = {s.id: s for s in self._samples}
        if limit is not None:
            self._samples = self._samples[:limit]
        self._check_videos()
        logger.info("Video-MME: %d questions, %d frames per video", len(self._samples), num_frames)


    def prompt(self, sample: Sample) -> str:
        """Question, options one per line, then the answer-with-the-letter instruction."""
        return sample.question + "\n" + "\n".join(sample.meta["options"]) + MC_PROMPT

    def visual_inputs(self, sample: Sample) -> list:
        """``[llava.Video(frames)]``: ``num_frames`` frames sampled uniformly from the frames folder (paths) or
        decoded from the video file with PyAV (PIL images)."""
        from llava.images import Video

        path = Path(sample.video_path)
        if path.is_dir():
            frames = _frame_files(path)
            return [Video([str(frames[i]) for i in uniform_indices(len(frames), self.num_frames)])]
        return [Video(decode_uniform_frames(path, self.num_frames))]

    def score(self, records: list[dict]) -> dict[str, float | None]:
        """``accuracy`` and ``accuracy/<duration>`` in percent; a None or unreadable prediction is wrong.

        Raises:
            ValueError: a record whose id is not a question of this benchmark.
        """
        if not records:
            return {}
        by_duration: dict[str, list[bool]] = defaultdict(list)
        every = []
        for record in records:
            sample = self._by_id.get(record["id"])
            if sample is None:
                raise ValueError(f"record id {record['id']!r} is not a Video-MME question loaded by this benchmark")
            options = sample.meta["options"]
            letters = "".join(_LETTER_PREFIX.match(o).group(1) for o in options)
            correct = extract_choice(record["prediction"], letters, options) == sample.answers[0]
            every.append(correct)
            if sample.meta.get("duration"):
                by_duration[sample.meta["duration"]].append(correct)
        metrics: dict[str, float | None] = {"accuracy": 100.0 * sum(every) / len(every)}
        for duration in sorted(by_duration, key=lambda d: (DURATIONS.index(d) if d in DURATIONS else 3, d)):
            values = by_duration[duration]
            metrics[f"accuracy/{duration}"] = 100.0 * sum(values) / len(values)
        return metrics

    def _check_videos(self) -> None:
        missing = sorted({s.meta["video"] for s in self._samples if s.video_path is None})
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} Video-MME video(s) not found under {self.video_root} (neither frames/<videoID>/ nor "
                f"data/<videoID>.mp4), e.g. {missing[:5]}; unzip the videos there or use limit="
            )
        to_decode = [s.video_path for s in self._samples if not Path(s.video_path).is_dir()]
        if to_decode and importlib.util.find_spec("av") is None:
            raise ImportError(
                f"{len(to_decode)} Video-MME question(s) need decoding a video file (e.g. {to_decode[0]}), which "
                "needs PyAV: pip install av; or extract frames into frames/<videoID>/*.jpg next to data/"
            )


def decode_uniform_frames(path: str | Path, num_frames: int) -> list:
    """``num_frames`` frames (RGB PIL images) sampled uniformly from a video file, decoded with PyAV.

    Frames are decoded in order and only the chosen ones are converted; the frame count comes from the
    container (or duration x frame rate), and the whole video is decoded when neither is known.

    Raises:
        ImportError: PyAV is not installed.
        ValueError: no frame could be decoded.
    """
    try:
        import av
    except ImportError as err:
        raise ImportError(f"decoding {path} needs PyAV: pip install av; or extract its frames into a "
                          "frames/<videoID>/ folder (jpg/png)") from err
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        total = int(stream.frames or 0)
        if total <= 0 and stream.duration and stream.average_rate:
            total = int(stream.duration * stream.time_base * stream.average_rate)
        if total <= 0:
            every = [frame.to_image() for frame in container.decode(stream)]
            if not every:
                raise ValueError(f"no frames could be decoded from {path}")
            return [every[i] for i in uniform_indices(len(every), num_frames)]
        wanted = uniform_indices(total, num_frames)
        picked, position = [], 0
        for index, frame in enumerate(container.decode(stream)):
            if index == wanted[position]:
                picked.append(frame.to_image())
                position += 1
                if position == len(wanted):
                    break
    if not picked:
        raise ValueError(f"no frames could be decoded from {path}")
    if len(picked) < len(wanted):
        logger.debug("%s: %d of %d frames (container over-reported its length)", path, len(picked), len(wanted))
    return picked


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _frame_files(folder: Path) -> list[Path]:
    frames = sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES), key=_natural_key)
    if not frames:
        raise ValueError(f"{folder} holds no .jpg/.png frames")
    return frames


def _find_video(root: Path, video: str) -> str | None:
    """``frames/<video>/`` when it holds frames, else ``data/<video>.<ext>``, else None."""
    frames = root / "frames" / video
    if frames.is_dir() and any(p.suffix.lower() in FRAME_SUFFIXES for p in frames.iterdir()):
        return str(frames.resolve())
    for suffix in VIDEO_SUFFIXES:
        path = root / "data" / f"{video}{suffix}"
        if path.is_file():
            return str(path.resolve())
    return None


def _read_local(data_dir: Path, questions_file: str | None) -> list[tuple[dict, str]]:
    """The question rows of the local copy in ``data_dir`` (from ``questions_file`` when given)."""
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"Video-MME data_dir {data_dir} does not exist; download lmms-lab/Video-MME (videomme/*.parquet "
            "and the videos_chunked_*.zip, unzipped into data/) and pass data_dir= that folder"
        )
    return _read_rows(Path(questions_file) if questions_file else _find_questions(data_dir))


def _find_questions(data_dir: Path) -> Path:
    for pattern in ("videomme/*.parquet", "*.parquet", "*.json"):
        found = sorted(data_dir.glob(pattern))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(f"several question files match {data_dir}/{pattern} ({[p.name for p in found]}); "
                             "pass questions_file= the one to use")
    raise FileNotFoundError(
        f"no Video-MME questions in {data_dir}: expected videomme/test-00000-of-00001.parquet (from "
        "lmms-lab/Video-MME), a *.parquet or a *.json file; or pass questions_file="
    )


def _read_rows(path: Path) -> list[tuple[dict, str]]:
    """Flat question rows of a parquet or JSON file, each with a location for error messages."""
    if not path.is_file():
        raise FileNotFoundError(f"Video-MME questions file {path} not found")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow)") from err
        return [(row, f"{path} row {i}") for i, row in enumerate(pq.read_table(path).to_pylist())]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path} must hold a non-empty JSON list of questions (or of videos with 'questions')")
    rows = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise ValueError(f"{path} item {i}: expected an object, got {type(item).__name__}")
        if "questions" in item:  # nested: one entry per video
            video = {k: v for k, v in item.items() if k != "questions"}
            rows += [({**video, **q}, f"{path} item {i} question {j}") for j, q in enumerate(item["questions"])]
        else:
            rows.append((item, f"{path} item {i}"))
    return rows


def _read_hub(hub_id: str) -> list[tuple[dict, str]]:
    rows = _hub.load_dataset(hub_id, split="test", local_hint="a folder with the Video-MME parquet")
    return [(dict(row), f"{hub_id} row {i}") for i, row in enumerate(rows)]


def _row_sample(row: dict, root: Path, where: str, allow_external_images: bool = False) -> Sample:
    """A ``Sample`` from one question row (``video_path`` None when the video is missing); a video whose
    ``frames/`` or ``data/`` path leads outside ``root`` is refused unless ``allow_external_images``."""
    missing = [key for key in REQUIRED_KEYS if key not in row]
    if "videoID" not in row and "video_id" not in row:
        missing.append("videoID (or video_id)")
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; every question needs {list(REQUIRED_KEYS)} and videoID")
    options = list(row["options"]) if not isinstance(row["options"], str) else None
    if not options or not all(isinstance(o, str) and o.strip() for o in options):
        raise ValueError(f"{where}: 'options' must be a non-empty list of strings like ['A. ...', 'B. ...'], "
                         f"got {row['options']!r}")
    if not all(_LETTER_PREFIX.match(o) for o in options):  # bare option texts: letter them
        options = [f"{chr(ord('A') + i)}. {o.strip()}" for i, o in enumerate(options)]
    letters = [_LETTER_PREFIX.match(o).group(1) for o in options]
    answer = str(row["answer"]).strip()
    if answer not in letters:
        raise ValueError(f"{where}: 'answer' must be one of the option letters {letters}, got {row['answer']!r}")
    video = str(row.get("videoID") or row["video_id"])
    for folder, name in (("frames", video), ("data", video + VIDEO_SUFFIXES[0])):
        data_path(root / folder, name, root, where, allow_external=allow_external_images, what="video")
    meta = {key: row.get(key) for key in ("video_id", "videoID", "duration", "domain", "sub_category", "task_type")}
    meta.update(options=options, video=video)
    return Sample(id=str(row["question_id"]), image_paths=[], question=str(row["question"]).strip(),
                  answers=[answer], answer_type="multiple_choice", meta=meta, video_path=_find_video(root, video))
