"""Benchmarks, metrics and evaluation runners for DyMU-merged vision-language models.

Importing the package registers the scripts' typed config schemas (:mod:`eval.config`) and the OmegaConf resolver ``dymu_budget_tag`` that ``hydra_conf/eval.yaml`` uses
to give budgeted runs their own output folder. The resolver also validates the budget: Hydra resolves the run
folder (``hydra.run.dir`` -> ``output_dir`` -> ``run_name``) before it creates it, so an invalid budget
override fails before anything is written.
"""

import math

from hydra.errors import CompactHydraException
from omegaconf import ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from . import config  # noqa: F401 - registers the scripts' config schemas (eval/config.py)

_BOUNDS = (("max_visual_tokens", "max"), ("min_visual_tokens", "min"))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_budget(budget) -> None:
    """Validate a ``budget`` config node (``hydra_conf/budget/none.yaml``) without loading a model.

    Checks what needs no model: ``threshold_scale`` is a positive finite number; each bound is null, an int
    (``max_visual_tokens`` >= 1, ``min_visual_tokens`` >= 0) or a list of them (one per image); and
    ``min_visual_tokens <= max_visual_tokens`` (per image where lists are given). Whether the encoder can reach
    a bound is checked when the model is loaded (``dymu.budget``).

    Raises:
        ValueError: naming the key, the value given and an example of a valid override.
    """
    if budget is None:
        return
    scale = budget.get("threshold_scale", 1.0)
    try:
        ok = not isinstance(scale, (bool, str)) and float(scale) > 0 and math.isfinite(float(scale))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"invalid budget: budget.threshold_scale must be a positive number (1.0 = thresholds as "
                         f"calibrated), got {scale!r}. Example: budget.threshold_scale=1.1")
    values = {}
    for key, _ in _BOUNDS:
        value = budget.get(key)
        if value is None:
            values[key] = None
            continue
        items = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
        least = 1 if key == "max_visual_tokens" else 0
        if not items or not all(_is_int(v) and v >= least for v in items):
            raise ValueError(f"invalid budget: budget.{key} must be null, an int >= {least} (visual tokens per "
                             f"image) or a list of them (one per image), got {value!r}. "
                             f"Example: budget.{key}=64 or budget.{key}=[64,128]")
        values[key] = items
    hi, lo = values["max_visual_tokens"], values["min_visual_tokens"]
    if hi is not None and lo is not None:
        if len(hi) > 1 and len(lo) > 1 and len(hi) != len(lo):
            raise ValueError(f"invalid budget: budget.max_visual_tokens and budget.min_visual_tokens are lists of "
                             f"different lengths ({len(hi)} and {len(lo)}); give one entry per image in both.")
        n = max(len(hi), len(lo))
        hi, lo = hi * n if len(hi) == 1 else hi, lo * n if len(lo) == 1 else lo
        bad = [i for i, (a, b) in enumerate(zip(lo, hi)) if a > b]
        if bad:
            raise ValueError(f"invalid budget: budget.min_visual_tokens > budget.max_visual_tokens "
                             f"({budget.get('min_visual_tokens')} > {budget.get('max_visual_tokens')}); "
                             f"the minimum must not exceed the maximum.")


class BudgetConfigError(InterpolationResolutionError, CompactHydraException, ValueError):
    """An invalid ``budget`` found while resolving a config. Hydra prints just its message (no traceback of
    OmegaConf's resolver internals) and exits 1; OmegaConf passes it on unwrapped (an interpolation error)."""


def budget_tag(budget) -> str:
    """Run-name suffix of a ``budget`` config node: ``""`` for the default budget, else e.g. ``"-s1.1-max64"``.

    Budgeted runs thus never resume into (or mix with) the predictions of an unbudgeted run.

    Raises:
        BudgetConfigError: (a ValueError) an invalid budget (see :func:`check_budget`).
    """
    try:
        check_budget(budget)
    except ValueError as err:
        raise BudgetConfigError(str(err)) from None
    if budget is None:
        return ""
    parts = []
    if float(budget.get("threshold_scale", 1.0)) != 1.0:
        parts.append(f"s{float(budget.threshold_scale):g}")
    for key, short in _BOUNDS:
        value = budget.get(key)
        if value is not None:
            parts.append(short + ("_".join(str(v) for v in value) if not isinstance(value, int) else str(value)))
    return "".join(f"-{p}" for p in parts)


if not OmegaConf.has_resolver("dymu_budget_tag"):
    OmegaConf.register_new_resolver("dymu_budget_tag", budget_tag)
