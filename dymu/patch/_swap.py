"""In-place, reversible class swapping (ToMe's patching style, plus an exact ``remove``)."""

from __future__ import annotations

import torch.nn as nn

_ORIGINAL = "_dymu_original_class"
_ATTRS = "_dymu_attrs"
_CLASS_CACHE: dict[tuple[type, type], type] = {}


def is_patched(module: nn.Module) -> bool:
    """True if ``module``'s class was swapped by DyMU."""
    return getattr(module, _ORIGINAL, None) is not None


def patched_class(mixin: type, host_cls: type) -> type:
    """The class ``mixin + host_cls`` (created once, then cached so class identity is stable)."""
    key = (mixin, host_cls)
    if key not in _CLASS_CACHE:
        _CLASS_CACHE[key] = type(f"{mixin.__name__.removesuffix('Mixin')}[{host_cls.__name__}]", (mixin, host_cls), {})
    return _CLASS_CACHE[key]


def swap_class(module: nn.Module, mixin: type, **attrs) -> None:
    """Swap ``module``'s class for ``mixin + its class`` in place and set ``attrs`` on it.

    Swapping an already swapped module only updates ``attrs`` (patching twice is idempotent).
    The attributes are plain configuration (no parameters or buffers are added, so ``state_dict``
    is unchanged); :func:`restore` deletes them again.
    """
    if getattr(module, _ORIGINAL, None) is None:
        original = type(module)
        module.__class__ = patched_class(mixin, original)
        setattr(module, _ORIGINAL, original)
        setattr(module, _ATTRS, set())
    elif not isinstance(module, mixin):
        raise RuntimeError(f"{type(module).__name__} is already patched differently; call dymu.remove(model) first.")
    for name, value in attrs.items():
        setattr(module, name, value)
        getattr(module, _ATTRS).add(name)


def restore(model: nn.Module, mixins: tuple[type, ...] | None = None) -> int:
    """Undo :func:`swap_class` on every submodule of ``model`` (optionally only those of ``mixins``).

    Returns:
        The number of modules restored.
    """
    count = 0
    for module in model.modules():
        original = getattr(module, _ORIGINAL, None)
        if original is None or (mixins is not None and not isinstance(module, mixins)):
            continue
        for name in getattr(module, _ATTRS, ()):
            delattr(module, name)
        delattr(module, _ATTRS)
        delattr(module, _ORIGINAL)
        module.__class__ = original
        count += 1
    return count
