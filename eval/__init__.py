"""Benchmarks, metrics and evaluation runners for DyMU-merged vision-language models.

Importing the package registers the OmegaConf resolver ``dymu_budget_tag`` that ``hydra_conf/eval.yaml`` uses
to give budgeted runs their own output folder.
"""

from omegaconf import OmegaConf


def budget_tag(budget) -> str:
    """Run-name suffix of a ``budget`` config node: ``""`` for the default budget, else e.g. ``"-s1.1-max64"``.

    Budgeted runs thus never resume into (or mix with) the predictions of an unbudgeted run.
    """
    if budget is None:
        return ""
    parts = []
    if float(budget.get("threshold_scale", 1.0)) != 1.0:
        parts.append(f"s{float(budget.threshold_scale):g}")
    for key, short in (("max_visual_tokens", "max"), ("min_visual_tokens", "min")):
        value = budget.get(key)
        if value is not None:
            parts.append(short + ("_".join(str(v) for v in value) if not isinstance(value, int) else str(value)))
    return "".join(f"-{p}" for p in parts)


if not OmegaConf.has_resolver("dymu_budget_tag"):
    OmegaConf.register_new_resolver("dymu_budget_tag", budget_tag)
