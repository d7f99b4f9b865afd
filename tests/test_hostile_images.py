"""Hostile image files (docs/robustness.md, issue 13 items 3, 4 and 10): formats outside the raster allow-list,
paths that are not regular files, huge images in every PIL mode, and calibration listing the same formats.

Real files in tmp_path written with real Pillow; memory is measured with ``ru_maxrss`` in one fresh process per
image, so that one case's high-water mark cannot hide another's.
"""

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

import llava
from conftest import REPO
import eval.calibrate
from eval.calibrate import list_images

RASTER = ["JPEG", "MPO", "PNG", "BMP", "GIF", "WEBP", "TIFF"] + (["AVIF"] if features.check("avif") else [])
"""The formats load_image must open (the issue's allow-list), each where this Pillow can decode it."""


def _subprocess(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(env or os.environ, PYTHONPATH=str(REPO)))


def _xpm(path: Path) -> Path:
    path.write_text('/* XPM */\nstatic char *x[] = {\n"2 2 1 1",\n"a c #ff0000",\n"aa",\n"aa"\n};\n')
    return path


# ------------------------------------------------------------------------------------- format allow-list
@pytest.mark.parametrize("fmt", ["XPM", "ICO", "PPM", "PSD"])
def test_a_file_in_a_format_outside_the_allow_list_is_refused_naming_it(tmp_path, fmt):
    path = tmp_path / "photo.jpg"
    if fmt == "XPM":
        _xpm(path)
    elif fmt == "PSD":  # Pillow cannot write PSD: the smallest valid file, 1 x 1 px grayscale, raw
        path.write_bytes(b"8BPS\0\1" + b"\0" * 6 + b"\0\1" + (1).to_bytes(4, "big") * 2 + b"\0\x08\0\1"
                         + b"\0" * 12 + b"\0\0" + b"\x80")
    else:
        Image.new("RGB", (16, 16), (10, 20, 30)).save(path, format=fmt)
    with Image.open(path) as opened:
        assert opened.format == fmt  # Pillow itself would open it
    message = (rf"image .*photo\.jpg is in (\w+ or )*{fmt}( or \w+)* format, which load_image does not open; "
               r"it reads only the raster formats JPEG, MPO, PNG, BMP, GIF, WEBP, TIFF.*Convert it to PNG or JPEG")
    with pytest.raises(ValueError, match=message):
        llava.load_image(path)


def test_an_eps_file_named_jpg_is_refused_without_running_ghostscript(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (16, 16), (10, 20, 30)).save(path, format="EPS")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ran = tmp_path / "ghostscript_ran"
    gs = bin_dir / "gs"  # a Ghostscript stand-in on PATH that records being run
    gs.write_text(f"#!/bin/sh\necho \"$@\" >> {ran}\n[ \"$1\" = --version ] && exit 0\nexit 1\n")
    gs.chmod(0o755)
    code = ("import sys, llava\n"
            "try:\n    llava.load_image(sys.argv[1])\n"
            "except Exception as err:\n    print(type(err).__name__, err)\n")
    result = _subprocess(code, str(path), env=dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}"))
    assert not ran.exists(), f"Ghostscript was run on a file named .jpg: {ran.read_text()!r}; {result.stdout}"
    assert result.returncode == 0, result.stderr[-3000:]
    assert "photo.jpg is in EPS format, which load_image does not open" in result.stdout, result.stdout


def test_calibration_lists_exactly_the_formats_load_image_opens(tmp_path):
    extensions = Image.registered_extensions()
    wanted = sorted(suffix for suffix, fmt in extensions.items() if fmt in RASTER)
    assert {".jpg", ".png", ".tif", ".webp", ".mpo"} <= set(wanted)
    frames = [Image.new("RGB", (16, 12), (200, 40, 10)), Image.new("RGB", (16, 12), (10, 40, 200))]
    for suffix in wanted:
        fmt = extensions[suffix]
        frames[0].save(tmp_path / f"image{suffix}", format=fmt, save_all=fmt == "MPO", append_images=frames[1:])
    Image.new("RGB", (16, 12)).save(tmp_path / "vector.eps", format="EPS")
    Image.new("RGB", (16, 12)).save(tmp_path / "icon.ico", format="ICO")
    Image.new("RGB", (16, 12)).save(tmp_path / "scan.pdf", format="PDF")
    _xpm(tmp_path / "sprite.xpm")
    with Image.open(tmp_path / "image.mpo") as mpo:
        assert mpo.format == "MPO" and mpo.n_frames == 2  # a real multi-picture file

    listed = [p.name for p in list_images(tmp_path)]
    assert listed == sorted(f"image{suffix}" for suffix in wanted), listed
    for name in listed:
        image = llava.load_image(tmp_path / name)
        assert image.mode == "RGB" and image.size == (16, 12), name
        pixel = image.getpixel((8, 6))
        assert all(abs(a - b) <= 12 for a, b in zip(pixel, (200, 40, 10))), (name, pixel)
    # one source of truth: the calibration suffixes are the allow-list's registered extensions
    assert llava.images.IMAGE_FORMATS == tuple(RASTER)
    assert eval.calibrate.IMAGE_SUFFIXES == llava.images.IMAGE_SUFFIXES == tuple(wanted)


# --------------------------------------------------------------------------------- non-regular files
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_named_pipe_is_refused_at_once_never_opened(tmp_path):
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    outcome = {}

    def load():
        try:
            llava.load_image(fifo)
        except Exception as err:  # noqa: BLE001 - reported below
            outcome["error"] = err

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout=20)
    if thread.is_alive():  # blocked opening the pipe: give it a writer and EOF so the thread ends, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=20)
        pytest.fail("load_image blocked on a named pipe (it opened the FIFO for reading)")
    error = outcome.get("error")
    assert isinstance(error, ValueError), repr(error)
    assert "photo.jpg is a named pipe (FIFO), not a regular file; it is not read" in str(error), str(error)
    assert "Save the image to a file" in str(error)


def test_a_directory_a_device_and_a_symlink_loop_fail_clearly(tmp_path):
    folder = tmp_path / "photo.jpg"
    folder.mkdir()
    loop = tmp_path / "loop.jpg"
    loop.symlink_to(tmp_path / "loop2.jpg")
    (tmp_path / "loop2.jpg").symlink_to(loop)
    cases = {
        folder: r"image path .*photo\.jpg is a directory, not an image file; pass the path of an image file\.$",
        loop: r"cannot access image path .*loop\.jpg: Too many levels of symbolic links; check the path and any "
              r"symbolic links on it\.$",
        Path(os.devnull): r"image path /dev/null is a character device, not a regular file; it is not read",
    }
    for path, message in cases.items():
        with pytest.raises(ValueError, match=message):
            llava.load_image(path)


# ------------------------------------------------------------------------------------------ large images
def _image(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A ``mode`` image of random pixels (``Pt``: palette with a transparent entry)."""
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.int32))
    if mode in ("P", "Pt"):
        image = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).convert("P")
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tolist())
        if mode == "Pt":
            image.info["transparency"] = 3
        return image
    bands = len(Image.new(mode, (1, 1)).getbands())
    data = rng.integers(0, 256, (h, w, bands), dtype=np.uint8)
    if mode == "1":
        return Image.fromarray(data[..., 0]).convert("1")
    return Image.frombytes(mode, size, data.tobytes())


def test_a_reduced_image_follows_the_same_colour_rules_as_a_small_one():
    """Above MAX_IMAGE_SIDE every mode gives its full-size RGB conversion, reduced: alpha dropped (not
    premultiplied by the reduction), CMYK and 32-bit integers converted before averaging."""
    differ = {}
    for mode in ["1", "L", "P", "Pt", "LA", "RGBA", "CMYK", "I;16", "I"]:
        image = _image(mode, (4701, 1301))  # factor 2, several tiles, partial boxes at the right and bottom edges
        if mode.startswith("I"):
            full = Image.fromarray(np.round(np.asarray(image) / 257).astype(np.uint8)).convert("RGB")
        elif mode == "Pt":
            full = image.convert("RGBA").convert("RGB")
        else:
            full = image.convert("RGB")
        got = np.asarray(llava.load_image(image)).astype(int)
        assert got.shape == (651, 2351, 3), mode
        error = np.abs(got - np.asarray(full.reduce(2)))
        if error.any():
            differ[mode] = f"{(error > 0).mean():.0%} of pixels, by up to {error.max()}"
    assert not differ, f"reduced images that differ from the full-size conversion, reduced: {differ}"


MEMORY_BOUND_MIB = 160
"""load_image's documented bound on peak memory above the decoded image."""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="measures each case in a forked process (POSIX)")
def test_every_image_mode_stays_within_the_memory_bound(tmp_path):
    side = 8000  # 64 M px, under PIL's warning threshold; reduced by 2 to 4000 x 4000 (61 MiB as RGB)
    cases = {"I;16": Image.new("I;16", (side, side), 40000), "1": Image.new("1", (side, side), 1),
             "P": Image.new("P", (side, side), 1), "Pt": Image.new("P", (side, side), 1),
             "L": Image.new("L", (side, side), 90), "RGB": Image.new("RGB", (side, side), (200, 30, 40)),
             "RGBA": Image.new("RGBA", (side, side), (200, 30, 40, 128))}
    paths = []
    for mode, image in cases.items():
        paths.append(tmp_path / f"{mode.replace(';', '')}.png")
        if mode.startswith("P"):
            image.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
        image.save(paths[-1], compress_level=1, **({"transparency": 0} if mode == "Pt" else {}))
    del cases, image
    # llava is imported once; each image is loaded in a child forked from there, which starts its own
    # high-water mark (ru_maxrss), so no case can hide behind another's peak
    code = ("import os, resource, sys, llava\n"
            "for path in sys.argv[1:]:\n"
            "    pid = os.fork()\n"
            "    if pid == 0:\n"
            "        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "        image = llava.load_image(path)\n"
            "        assert image.size == (4000, 4000) and image.mode == 'RGB', image\n"
            "        extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024\n"
            "        print(os.path.basename(path), extra, flush=True)\n"
            "        os._exit(0)\n"
            "    assert os.waitpid(pid, 0)[1] == 0, path\n")
    result = _subprocess(code, *map(str, paths))
    assert result.returncode == 0, result.stderr[-3000:]
    above = {}
    for line, mode in zip(result.stdout.splitlines(), ["I;16", "1", "P", "Pt", "L", "RGB", "RGBA"], strict=True):
        decoded_mib = side * side * {"I;16": 2, "RGB": 4, "RGBA": 4}.get(mode, 1) / 2**20
        above[mode] = round(float(line.split()[-1]) - decoded_mib)
    too_much = {mode: mib for mode, mib in above.items() if mib >= MEMORY_BOUND_MIB}
    assert not too_much, f"MiB above the decoded 8000 x 8000 image, per mode: {above} (bound {MEMORY_BOUND_MIB})"
