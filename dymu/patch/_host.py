"""What the patches need to know about the installed transformers: its tested range and its cache keyword.

transformers 5.24 renamed the KV-cache keyword ``past_key_values`` to ``cache`` in model, decoder-layer,
attention and mask functions (and the output field ``past_key_values`` to ``cache``); the old keyword is still
accepted there with a ``FutureWarning``, but a function that gets *both* keeps ``cache`` and silently drops the
other. The patched forwards therefore accept either keyword, refuse two different caches, and pass the one
cache on under the name the host function declares (read from its signature, not from the version number).
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from dataclasses import fields

from packaging.version import Version

__all__ = [
    "TESTED_TRANSFORMERS",
    "UNTESTED_OK_ENV",
    "check_transformers_version",
    "cache_keyword",
    "one_cache",
    "output_cache_field",
]

# [oldest tested, first untested) minor releases; setup.py declares the same range (a test keeps them equal).
TESTED_TRANSFORMERS = ("5.23", "5.25")
UNTESTED_OK_ENV = "DYMU_ALLOW_UNTESTED_TRANSFORMERS"

_CACHE_NAMES = ("cache", "past_key_values")


def installed_transformers_version() -> str:
    """``transformers.__version__`` of the installed release."""
    import transformers

    return transformers.__version__


def check_transformers_version(version: str | None = None) -> None:
    """Raise unless the installed transformers lies in the range these patches were tested on.

    The patches replace forwards of transformers' attention, decoder and vision modules, whose internals change
    between minor releases (5.24 renamed the cache keyword), so an untested release can break them silently.
    Setting the environment variable ``DYMU_ALLOW_UNTESTED_TRANSFORMERS=1`` turns the error into a warning (at
    your own risk: run the test suite first).

    Args:
        version: the version to check (default: the installed ``transformers.__version__``).

    Raises:
        RuntimeError: the version is outside ``[5.23, 5.25)``; the message names the tested range and the fix.
    """
    version = version or installed_transformers_version()
    low, high = (Version(v) for v in TESTED_TRANSFORMERS)
    release = Version(Version(version).base_version)
    if low <= release < high:
        return
    message = (f"DyMU's patches are tested on transformers >={TESTED_TRANSFORMERS[0]},<{TESTED_TRANSFORMERS[1]} "
               f"but {version} is installed. Install a tested release: pip install "
               f"'transformers>={TESTED_TRANSFORMERS[0]},<{TESTED_TRANSFORMERS[1]}' (or set {UNTESTED_OK_ENV}=1 to "
               "try this one at your own risk, after running the test suite).")
    if os.environ.get(UNTESTED_OK_ENV, "").strip() not in ("", "0"):
        import warnings

        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return
    raise RuntimeError(message)


def cache_keyword(function: Callable) -> str:
    """The KV-cache keyword a host function declares: ``"cache"`` (transformers >= 5.24) or ``"past_key_values"``.

    Reads the signature (``inspect`` follows transformers' ``deprecate_kwarg`` wrappers to the real function);
    a bound method is looked up by its function, so the answer is computed once per host function.

    Args:
        function: a host function or bound method, e.g. ``LlamaAttention.forward`` or ``create_causal_mask``.

    Raises:
        NotImplementedError: the function declares neither keyword (an unsupported host).
    """
    return _cache_keyword(getattr(function, "__func__", function))


@functools.cache
def _cache_keyword(function: Callable) -> str:
    parameters = inspect.signature(function).parameters
    for name in _CACHE_NAMES:
        if name in parameters:
            return name
    raise NotImplementedError(f"{getattr(function, '__qualname__', function)} declares no KV-cache argument "
                              f"({' or '.join(_CACHE_NAMES)}); this transformers release is not supported.")


def one_cache(cache, past_key_values, where: str):
    """The one cache a patched forward was given, under either keyword.

    Raises:
        ValueError: two different caches were given (``cache=`` and ``past_key_values=``); the host would keep one
            and silently drop the other.
    """
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError(f"{where} got two different caches, cache= and past_key_values=; pass one (transformers "
                         "5.24 calls it cache, earlier releases past_key_values).")
    return cache if cache is not None else past_key_values


@functools.cache
def output_cache_field(output_cls: type) -> str:
    """The cache field of a transformers output dataclass: ``"cache"`` (>= 5.24) or ``"past_key_values"``.

    Raises:
        NotImplementedError: the class has neither field.
    """
    names = {f.name for f in fields(output_cls)}
    for name in _CACHE_NAMES:
        if name in names:
            return name
    raise NotImplementedError(f"{output_cls.__name__} has no cache field; this transformers release is not supported.")
