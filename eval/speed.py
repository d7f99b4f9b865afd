"""Side-by-side speed and memory benchmark: the unmodified model vs DyMU low / mid / high and fixed-r ToMe.

Everything is measured in one process on one model object; variants are switched by applying and removing
the DyMU patches (class swaps), so weights, allocator and threads are shared and the ratios are fair. Rounds
interleave the variants (round 1: every variant over every image, then round 2, ...) so slow drift of the
machine hits all of them alike; per image the median over rounds is kept.

Measured per variant and image (batch of one prompt with one image):

- ``encoder_s``: vision tower forward (hooks on the tower; preprocessing excluded);
- ``prefill_s``: decoder over the prompt + LM head on the last token, KV cache filled;
- ``prefill_flops`` / ``encoder_flops``: ``torch.utils.flop_counter`` with eager attention (CPU SDPA is not
  counted, ``docs/environment.md``);
- ``decode_ms_per_token``: greedy decode steps over that cache (the LM head on one row);
- ``kv_cache_bytes``: the cache after prefill (:func:`dymu.patch.cache.kv_cache_bytes`);
- ``peak_encode_mb`` / ``peak_llm_mb``: peak memory above what was allocated before, in a separate untimed
  request (CUDA: allocator statistics; Linux CPU: the process' peak resident set, reset through
  ``/proc/self/clear_refs`` after ``malloc_trim``, an approximation);
- ``llm_tokens`` (rows the per-token layers run on, ``L_m``), ``virtual_tokens`` (``L``), ``visual_tokens``.

The unmodified model also times its tower cut to the layers DToMe runs (``encoder_same_layers_s``): DToMe
never runs the layers after the feature layer, so the bookkeeping target compares equal layer counts.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import platform
import statistics
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import DynamicCache

import dymu
from dymu.merge import ThresholdRule, constant_schedule
from dymu.patch import cache_keyword, encoder_spec, find_decoder, layers_to_run
from dymu.patch.cache import kv_cache_bytes

from .calibrate import calibrate
from .factory import DTYPES
from .jsonio import write_json_atomic
from .shapes import build_random
from .tiny import export_calibration_images

__all__ = ["Variant", "parse_variant", "check_counts", "run_benchmark", "summarise", "markdown_table", "plot", "TARGETS"]

logger = logging.getLogger(__name__)

TARGETS = {
    "bookkeeping": 1.05,  # encoder time, thresholds that merge nothing / unpatched (same layers)
    "prefill_time_over_flops": 1.15,  # (DyMU / unmodified prefill time) / (DyMU / unmodified FLOPs)
    "kv_excess": 0.02,  # KV bytes ratio minus merged / full length
    "decode": 1.05,  # decode ms per token, DyMU / unmodified
}
"""Issue 5 targets, reported as measured ratios (never asserted by timed tests)."""


@dataclass(frozen=True)
class Variant:
    """One benchmarked configuration.

    Attributes:
        name: as given (``off``, ``nomerge``, ``low``, ``mid-expanded``, ``tome_94``, ...).
        mode: ``off`` (unmodified model), ``nomerge`` (DToMe thresholds above 1: nothing merges, + VTU),
            ``threshold`` (calibrated thresholds of ``level``), ``tome`` (fixed r leaving ``target`` tokens).
        level: thresholds variant (``low`` / ``mid`` / ``high``) for ``threshold`` mode.
        target: tokens kept by ToMe (CLS included).
        vtu: virtual token unmerging in the LLM (DyMU); ToMe feeds merged tokens at consecutive positions.
        vtu_cache: ``merged`` or ``expanded``.
    """

    name: str
    mode: str
    level: str | None = None
    target: int | None = None
    vtu: bool = False
    vtu_cache: str = "merged"

    @property
    def is_dymu(self) -> bool:
        """DToMe thresholds with VTU (the variants the issue's targets apply to)."""
        return self.mode == "threshold" and self.vtu


def parse_variant(name: str, levels: Sequence[str] = ("low", "mid", "high")) -> Variant:
    """``off`` | ``nomerge`` | ``<level>`` | ``<level>-expanded`` | ``<level>-novtu`` | ``tome_<tokens>``.

    Raises:
        ValueError: anything else (lists the accepted forms).
    """
    if name == "off":
        return Variant(name, "off")
    if name == "nomerge":
        return Variant(name, "nomerge", vtu=True)
    if name.startswith("tome_") and name[5:].isdigit():
        return Variant(name, "tome", target=int(name[5:]))
    level, _, suffix = name.partition("-")
    if level in levels and suffix in ("", "expanded", "novtu"):
        return Variant(name, "threshold", level=level, vtu=suffix != "novtu",
                       vtu_cache="expanded" if suffix == "expanded" else "merged")
    raise ValueError(f"unknown benchmark variant {name!r}: use off, nomerge, {'/'.join(levels)} (optionally with "
                     f"-expanded or -novtu), or tome_<tokens>.")


# ----------------------------------------------------------------------------- measuring helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _PeakMemory:
    """Peak bytes above the starting point of a region (CUDA allocator, or Linux peak RSS)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._libc = None
        if device.type != "cuda" and platform.system() == "Linux":
            try:
                self._libc = ctypes.CDLL("libc.so.6")
            except OSError:
                self._libc = None

    @staticmethod
    def _status(field_name: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def start(self) -> int:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        if self._libc is None:
            return 0
        self._libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return self._status("VmRSS")

    def peak_above(self, start: int) -> float | None:
        """Megabytes (2**20) of peak above ``start``; None where it cannot be measured."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - start) / 2**20
        if self._libc is None:
            return None
        return max(self._status("VmHWM") - start, 0) / 2**20


@contextmanager
def _timed_module(module: torch.nn.Module, device: torch.device, sink: list[float]):
    """Append the wall time of every ``module`` forward to ``sink`` (seconds)."""
    starts = []

    def pre(*_):
        _sync(device)
        starts.append(time.perf_counter())

    def post(*_):
        _sync(device)
        sink.append(time.perf_counter() - starts.pop())

    handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _truncated_tower(tower: torch.nn.Module, layers: int):
    """Run only the first ``layers`` encoder layers of an unpatched CLIP / SigLIP tower."""
    encoder = tower.encoder
    full = encoder.layers
    encoder.layers = full[:layers]
    try:
        yield
    finally:
        encoder.layers = full


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------- one request
class _Bench:
    """The model with DyMU switchable between variants, and one measured request."""

    def __init__(self, pipe, thresholds: Mapping, prompt: str, decode_tokens: int):
        self.pipe = pipe
        self.thresholds = thresholds
        self.prompt = prompt
        self.decode_tokens = decode_tokens
        self.model = pipe.model
        self.tower = pipe.tower
        self.decoder = find_decoder(self.model)
        self.lm_head = self.model.lm_head
        self.device = pipe.device
        spec = encoder_spec(self.tower)
        self.n_run = layers_to_run(spec.num_layers, self.model.config.vision_feature_layer)
        self.num_tokens = spec.num_tokens
        self.memory = _PeakMemory(self.device)

    def configure(self, variant: Variant) -> None:
        dymu.remove(self.model)
        self.pipe.vtu, self.pipe.vtu_cache = variant.vtu, variant.vtu_cache
        if variant.mode == "nomerge":  # cosine scores are clamped to [-1, 1] and must be strictly greater
            dymu.apply_dtome(self.model, ThresholdRule([1.0] * self.n_run))
        elif variant.mode == "threshold":
            dymu.apply_dtome(self.model, self.thresholds[variant.level])
        elif variant.mode == "tome":
            dymu.apply_dtome(self.model, tome_r=constant_schedule(self.num_tokens - variant.target, self.n_run))
        if variant.vtu:
            dymu.apply_vtu(self.model)

    def _cache_kwarg(self, cache) -> dict:
        """``{keyword: cache}`` under the decoder's own name for it (``cache`` from transformers 5.24)."""
        return {cache_keyword(type(self.decoder).forward): cache}

    def _prefill(self, inputs):
        cache = DynamicCache(config=self.decoder.config)
        out = self.decoder(**inputs.model_kwargs(), **self._cache_kwarg(cache), use_cache=True)
        # a 2-D row: a (B, 1, C) slice of the hidden states makes F.linear copy the whole LM-head weight on CPU
        logits = self.lm_head(out.last_hidden_state[:, -1])  # (B, V)
        return cache, logits

    def _decode(self, inputs, cache, logits) -> None:
        token = logits.argmax(-1, keepdim=True)  # (B, 1)
        mask, position = inputs.attention_mask, inputs.position_ids[:, -1:]
        extra = {"vtu": inputs.vtu} if inputs.vtu is not None else {}
        for _ in range(self.decode_tokens):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            position = position + 1
            out = self.decoder(input_ids=token, attention_mask=mask, position_ids=position, **self._cache_kwarg(cache),
                               use_cache=True, **extra)
            token = self.lm_head(out.last_hidden_state[:, -1]).argmax(-1, keepdim=True)

    def _inputs(self, image):
        return self.pipe.build_inputs([self.pipe.prompt(self.prompt, ["image"])], [[image]])

    @torch.no_grad()
    def request(self, image) -> dict:
        """Encode, prefill and decode one prompt with ``image``: timings, cache bytes and token counts."""
        encoder_times: list[float] = []
        with _timed_module(self.tower, self.device, encoder_times):
            inputs = self._inputs(image)
        _sync(self.device)
        t0 = time.perf_counter()
        cache, logits = self._prefill(inputs)
        _sync(self.device)
        t1 = time.perf_counter()
        kv_bytes = kv_cache_bytes(cache)
        self._decode(inputs, cache, logits)
        _sync(self.device)
        t2 = time.perf_counter()
        return dict(
            encoder_s=sum(encoder_times),
            prefill_s=t1 - t0,
            decode_ms_per_token=1e3 * (t2 - t1) / max(self.decode_tokens, 1),
            kv_cache_bytes=kv_bytes,
            llm_tokens=int(inputs.attention_mask.shape[1]),
            virtual_tokens=int(inputs.vtu.virtual_length) if inputs.vtu is not None else int(inputs.attention_mask.shape[1]),
            visual_tokens=int(inputs.visual_tokens[0]),
        )

    @torch.no_grad()
    def peak_memory(self, image) -> dict:
        """Peak memory of encoding and of prefill + decode, in an untimed request (the measurement itself
        returns freed memory to the system, so fresh pages are faulted in afterwards)."""
        start = self.memory.start()
        inputs = self._inputs(image)
        peak_encode = self.memory.peak_above(start)
        start = self.memory.start()
        cache, logits = self._prefill(inputs)
        self._decode(inputs, cache, logits)
        return dict(peak_encode_mb=peak_encode, peak_llm_mb=self.memory.peak_above(start))

    @torch.no_grad()
    def same_layers_encoder_s(self, image) -> float:
        """Unpatched tower cut to the layers DToMe runs (call with the ``off`` variant configured)."""
        pixels = self.pipe.crops(image).to(self.device, self.pipe.dtype)
        with _truncated_tower(self.tower, self.n_run):
            _sync(self.device)
            t0 = time.perf_counter()
            self.tower(pixels)
            _sync(self.device)
        return time.perf_counter() - t0

    @torch.no_grad()
    def flops(self, image) -> dict:
        """Encoder and prefill FLOPs with eager attention (the configured kernel is restored)."""
        kernel = self.model.config._attn_implementation
        self.model.set_attn_implementation("eager")
        try:
            box = {}
            encoder = _flops(lambda: box.setdefault("inputs", self._inputs(image)))
            prefill = _flops(lambda: self._prefill(box["inputs"]))
        finally:
            self.model.set_attn_implementation(kernel)
        return dict(encoder_flops=encoder, prefill_flops=prefill)


# ----------------------------------------------------------------------------- the run
def check_counts(*, rounds=1, decode_tokens=0, max_images=1, batch_size=1) -> None:
    """Check the benchmark's counts before any model is built (each error names its key and range).

    Raises:
        ValueError: ``rounds`` < 1, ``decode_tokens`` < 0, ``calibration.max_images`` < 1 or
            ``calibration.batch_size`` < 1, or any of them not an integer.
    """
    for key, value, least in (("rounds", rounds, 1), ("decode_tokens", decode_tokens, 0),
                              ("calibration.max_images", max_images, 1), ("calibration.batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{key} must be an integer >= {least}, got {value!r}.")


def run_benchmark(
    pipe,
    variants: Sequence[Variant],
    images: Mapping[str, object],
    thresholds: Mapping,
    *,
    prompt: str = "Describe the image in detail.",
    decode_tokens: int = 16,
    rounds: int = 2,
    progress: bool = True,
) -> dict:
    """Measure every variant on every image, interleaved over ``rounds``.

    Args:
        pipe: a :class:`~llava.pipeline.DyMUPipeline` without DyMU applied (it is patched and restored here).
        variants: what to compare; must include ``off`` (the reference).
        images: name -> PIL image.
        thresholds: level -> :class:`dymu.Thresholds` for the ``threshold`` variants.
        prompt: question text (one image placeholder is added).
        decode_tokens: greedy decode steps timed after the prefill.
        rounds: timed rounds (plus one warm-up request per variant, not recorded).
        progress: tqdm bar.

    Returns:
        ``{"per_image": {variant: {image: {metric: value}}}, "variants": [...]}``: per image the median time
        over rounds, the max peak memory, and the (deterministic) FLOPs, bytes and token counts.

    Raises:
        ValueError: ``rounds`` < 1 or ``decode_tokens`` < 0 (or not integers), no images, no ``off`` variant, or
            a threshold level missing from ``thresholds``.
    """
    from tqdm.auto import tqdm

    check_counts(rounds=rounds, decode_tokens=decode_tokens)
    if not images:
        raise ValueError("no images to benchmark; pass at least one (speed.yaml: images=[astronaut,...]).")
    if not any(v.mode == "off" for v in variants):
        raise ValueError("the benchmark needs the 'off' variant (the unmodified model) as its reference.")
    missing = sorted({v.level for v in variants if v.mode == "threshold"} - set(thresholds))
    if missing:
        raise ValueError(f"no thresholds for levels {missing}; calibrate them first.")
    bench = _Bench(pipe, thresholds, prompt, decode_tokens)
    samples: dict[str, dict[str, list[dict]]] = {v.name: {name: [] for name in images} for v in variants}
    first_image = next(iter(images.values()))
    bar = tqdm(total=len(variants) * (rounds * len(images) + 1), desc="benchmark", disable=not progress)
    try:
        for v in variants:  # warm-up: first call of every code path (allocator, kernels, lazy imports)
            bench.configure(v)
            bench.request(first_image)
            bar.update()
        for _ in range(rounds):
            for v in variants:
                bench.configure(v)
                for name, image in images.items():
                    row = bench.request(image)
                    if v.mode == "off":
                        row["encoder_same_layers_s"] = bench.same_layers_encoder_s(image)
                    samples[v.name][name].append(row)
                    bar.set_postfix(variant=v.name, image=name)
                    bar.update()
        per_image: dict[str, dict[str, dict]] = {}
        for v in variants:
            bench.configure(v)
            per_image[v.name] = {}
            for name, image in images.items():
                rows = samples[v.name][name]
                merged = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k.endswith("_s") or k.startswith("decode")}
                for k in ("kv_cache_bytes", "llm_tokens", "virtual_tokens", "visual_tokens"):
                    merged[k] = rows[0][k]
                merged.update(bench.flops(image))
                merged.update(bench.peak_memory(image))
                per_image[v.name][name] = merged
    finally:
        bar.close()
        dymu.remove(pipe.model)
        pipe.vtu = False
    return {"per_image": per_image, "variants": [asdict(v) for v in variants]}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarise(result: dict) -> dict:
    """Per variant: means over images, ratios to ``off`` and the issue-5 target checks.

    Ratios are ratios of means (totals over the images). Target checks (``None`` where they do not apply):
    ``bookkeeping`` on ``nomerge`` (encoder time / the unpatched tower on the same layers); for DyMU variants
    (thresholds + VTU) ``prefill_time_over_flops``, ``kv_excess`` (bytes ratio minus ``L_m / L``) and
    ``decode``. With a ``<level>-novtu`` variant also ``vtu_prefill_overhead``: prefill time over the unmodified
    decoder's on the same merged rows (what VTU itself costs).
    """
    per_image = result["per_image"]
    variants = {v["name"]: Variant(**v) for v in result["variants"]}
    off_name = next(n for n, v in variants.items() if v.mode == "off")
    metrics = ("encoder_s", "prefill_s", "decode_ms_per_token", "encoder_flops", "prefill_flops", "kv_cache_bytes",
               "peak_encode_mb", "peak_llm_mb", "llm_tokens", "virtual_tokens", "visual_tokens")
    means = {name: {m: _mean(row.get(m) for row in rows.values()) for m in metrics} for name, rows in per_image.items()}
    off = means[off_name]
    same_layers = _mean(row.get("encoder_same_layers_s") for row in per_image[off_name].values())
    summary = {}
    for name, m in means.items():
        ratio = {k: (m[k] / off[k] if m[k] is not None and off[k] else None) for k in metrics}
        row = {"mean": m, "ratio": ratio, "checks": {}}
        v = variants[name]
        if v.mode == "nomerge" and same_layers:
            value = m["encoder_s"] / same_layers
            row["checks"]["bookkeeping"] = {"value": value, "target": TARGETS["bookkeeping"],
                                            "ok": value <= TARGETS["bookkeeping"]}
        if v.is_dymu:
            value = ratio["prefill_s"] / ratio["prefill_flops"]
            row["checks"]["prefill_time_over_flops"] = {"value": value, "target": TARGETS["prefill_time_over_flops"],
                                                        "ok": value <= TARGETS["prefill_time_over_flops"]}
            length = m["llm_tokens"] / off["llm_tokens"]
            value = ratio["kv_cache_bytes"] - length
            row["checks"]["kv_excess"] = {"value": value, "target": TARGETS["kv_excess"], "length_ratio": length,
                                          "ok": value <= TARGETS["kv_excess"]}
            value = ratio["decode_ms_per_token"]
            row["checks"]["decode"] = {"value": value, "target": TARGETS["decode"], "ok": value <= TARGETS["decode"]}
            plain = means.get(f"{v.level}-novtu")
            if plain and plain["prefill_s"]:  # the same merged rows through the unmodified decoder
                row["vtu_prefill_overhead"] = m["prefill_s"] / plain["prefill_s"]
        summary[name] = row
    return {"reference": off_name, "encoder_same_layers_s": same_layers, "variants": summary}


def markdown_table(summary: dict, header: str = "") -> str:
    """The summary as a Markdown table (means over images; ratios to the unmodified model in parentheses)."""
    lines = [header, ""] if header else []
    lines += [
        "| variant | visual tokens | LLM rows | encoder s | prefill s | prefill GFLOPs | decode ms/token "
        "| KV cache MiB | peak LLM MiB | targets |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(value, ratio, fmt):
        if value is None:
            return "n/a"
        return f"{fmt.format(value)} ({ratio:.2f}x)" if ratio is not None else fmt.format(value)

    for name, row in summary["variants"].items():
        m, r = row["mean"], row["ratio"]
        checks = "; ".join(f"{k} {c['value']:.3f} {'<=' if c['ok'] else '>'} {c['target']:g} {'ok' if c['ok'] else 'MISS'}"
                           for k, c in row["checks"].items())
        if "vtu_prefill_overhead" in row:
            checks += f"; prefill vs {name}-novtu {row['vtu_prefill_overhead']:.2f}x"
        lines.append(" | ".join([
            f"| {name}",
            f"{m['visual_tokens']:.0f}",
            f"{m['llm_tokens']:.0f}",
            cell(m["encoder_s"], r["encoder_s"], "{:.3f}"),
            cell(m["prefill_s"], r["prefill_s"], "{:.3f}"),
            cell(m["prefill_flops"] / 1e9 if m["prefill_flops"] else None, r["prefill_flops"], "{:.1f}"),
            cell(m["decode_ms_per_token"], r["decode_ms_per_token"], "{:.1f}"),
            cell(m["kv_cache_bytes"] / 2**20, r["kv_cache_bytes"], "{:.1f}"),
            cell(m["peak_llm_mb"], r["peak_llm_mb"], "{:.0f}"),
            (checks or "-") + " |",
        ]))
    if summary.get("encoder_same_layers_s"):
        lines += ["", f"Unpatched tower on the layers DToMe runs: {summary['encoder_same_layers_s']:.3f} s per image "
                      "(the bookkeeping reference)."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: str | Path, title: str = "") -> Path:
    """Bar chart of the ratios to the unmodified model (one group of bars per variant); saves a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = {"encoder_s": "encoder time", "prefill_s": "prefill time", "prefill_flops": "prefill FLOPs",
             "decode_ms_per_token": "decode ms/token", "kv_cache_bytes": "KV cache bytes", "peak_llm_mb": "peak LLM memory"}
    names = [n for n in summary["variants"] if n != summary["reference"]]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names) + 2), 4))
    width = 0.8 / len(shown)
    for i, (key, label) in enumerate(shown.items()):
        values = [summary["variants"][n]["ratio"].get(key) or 0.0 for n in names]
        ax.bar([x + i * width for x in range(len(names))], values, width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names)
    ax.set_ylabel(f"ratio to {summary['reference']} (lower is better)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def machine() -> dict:
    """Where the numbers were measured (recorded in the JSON and the table header)."""
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    cpu = Path("/proc/cpuinfo")
    if cpu.is_file():
        for line in cpu.read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    return info


def write_json(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` as indented, strict JSON (a non-finite number becomes null, :mod:`eval.jsonio`)."""
    path = Path(path)
    write_json_atomic(path, payload)
    return path


# ----------------------------------------------------------------------------- Hydra entry
def load_images(names: Sequence[str]) -> dict:
    """``skimage.data`` photos by name, as RGB PIL images (the wheel ships them; no download).

    Raises:
        ValueError: a name that ``skimage.data`` does not have.
    """
    import numpy as np
    import skimage.data
    from PIL import Image

    images = {}
    for name in names:
        loader = getattr(skimage.data, str(name), None)
        if loader is None:
            raise ValueError(f"skimage.data has no image {name!r}; e.g. astronaut, chelsea, coffee, rocket.")
        array = loader()
        array = array[0] if isinstance(array, tuple) else array
        images[str(name)] = Image.fromarray(np.asarray(array)).convert("RGB")
    return images


def calibrate_levels(pipe, targets: Mapping[str, int], folder: Path, max_images: int, batch_size: int,
                     progress: bool = True) -> dict:
    """Thresholds for a random-weight model from ``find_thresholds``' code on the calibration photos.

    Files in ``folder/<level>.json`` made for this encoder are reused; others are calibrated and written.
    """
    from dymu.thresholds import Thresholds, ThresholdsError

    folder.mkdir(parents=True, exist_ok=True)
    spec = encoder_spec(pipe.tower)
    n_run = layers_to_run(spec.num_layers, pipe.model.config.vision_feature_layer)
    images = export_calibration_images(folder / "images")
    step = max(len(images) // max_images, 1)
    images = images[::step][:max_images]
    out = {}
    for level, target in targets.items():
        path = folder / f"{level}.json"
        if path.is_file():
            try:
                thresholds = Thresholds.load(path)
                thresholds.check(spec, n_run)
                if thresholds.target_tokens == target:
                    out[level] = thresholds
                    continue
            except ThresholdsError as err:
                logger.info("recalibrating %s: %s", path, err)
        logger.info("calibrating '%s' thresholds (target %d tokens) on %d images", level, target, len(images))
        out[level] = calibrate(pipe, images, int(target), batch_size=batch_size, realised_max_images=None,
                               progress=progress, source=f"eval.speed.calibrate_levels ({level}, random weights)")
        out[level].save(path)
    return out


def run_from_config(cfg: Mapping) -> dict:
    """What ``scripts/benchmark.py`` runs (keys: ``hydra_conf/speed.yaml``). Writes ``results.json``,
    ``results.md`` and ``results.png`` to ``output_dir`` and returns the summary (see :func:`summarise`).

    Raises:
        ValueError: a count out of range (:func:`check_counts`), before anything is built.
        FileExistsError: ``output_dir`` already holds results and ``overwrite`` is false (checked first).
    """

    check_counts(rounds=cfg["rounds"], decode_tokens=cfg["decode_tokens"],
                 max_images=cfg["calibration"]["max_images"], batch_size=cfg["calibration"]["batch_size"])
    out_dir = Path(str(cfg["output_dir"]))
    if (out_dir / "results.json").exists() and not cfg.get("overwrite", False):
        raise FileExistsError(f"{out_dir}/results.json exists; pass overwrite=true to replace it, or "
                              "output_dir=<another folder>.")
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    dtype = DTYPES[str(cfg["dtype"])]
    pipe = build_random(str(cfg["shape"]), vision_layers=cfg.get("vision_layers"), llm_layers=cfg.get("llm_layers"),
                        dtype=dtype, device=str(cfg["device"]), attn_implementation=str(cfg["attn_implementation"]),
                        seed=int(cfg.get("seed", 0)))
    # YAML 1.1 reads a bare `off` as false
    variants = [parse_variant("off" if v is False else str(v)) for v in cfg["variants"]]
    levels = {v.level for v in variants if v.mode == "threshold"}
    targets = {k: int(t) for k, t in cfg["calibration"]["targets"].items() if k in levels}
    thresholds = calibrate_levels(pipe, targets, out_dir / "thresholds", int(cfg["calibration"]["max_images"]),
                                  int(cfg["calibration"]["batch_size"]), progress=bool(cfg.get("progress", True)))
    images = load_images(cfg["images"])
    result = run_benchmark(pipe, variants, images, thresholds, prompt=str(cfg["prompt"]),
                           decode_tokens=int(cfg["decode_tokens"]), rounds=int(cfg["rounds"]),
                           progress=bool(cfg.get("progress", True)))
    summary = summarise(result)
    config = pipe.model.config
    setup = {
        "shape": str(cfg["shape"]), "dtype": str(cfg["dtype"]), "device": str(cfg["device"]),
        "attn_implementation": str(cfg["attn_implementation"]),
        "vision_layers": config.vision_config.num_hidden_layers, "llm_layers": config.text_config.num_hidden_layers,
        "images": list(images), "rounds": int(cfg["rounds"]), "decode_tokens": int(cfg["decode_tokens"]),
        "date": time.strftime("%Y-%m-%d"), "machine": machine(),
    }
    write_json(out_dir / "results.json", {"setup": setup, "summary": summary, **result})
    where = setup["machine"].get("gpu") or setup["machine"].get("cpu") or setup["machine"]["processor"]
    header = (f"{setup['shape']} shapes, random weights, {setup['vision_layers']} vision / {setup['llm_layers']} LLM "
              f"layers, {setup['dtype']}, {setup['attn_implementation']}, {where} ({setup['machine']['threads']} "
              f"threads), {len(images)} images x {setup['rounds']} rounds, {setup['date']}")
    table = markdown_table(summary, header)
    (out_dir / "results.md").write_text(table, encoding="utf-8")
    plot(summary, out_dir / "results.png", title=f"{setup['shape']} ({setup['dtype']}, {setup['device']})")
    logger.info("written: %s/results.json, results.md, results.png", out_dir)
    return summary
