"""The adapted layers PEFT would not load an exported adapter onto (:func:`check_peft_targets`),
asked of the installed PEFT itself: a job refuses them before it trains, so that every export loads."""

from __future__ import annotations

import importlib.util

from torch import nn

from fedlora.models.quiet import import_bitsandbytes


def check_peft_targets(model: nn.Module, names: list[str]) -> None:
    """Refuse a layer whose factors PEFT would not load onto it (asked of PEFT itself, where it is
    installed): on a mixture of experts whose experts transformers 5 fused (Qwen3-MoE, DeepSeek-V3,
    GLM-4-MoE, Mixtral, ...), PEFT reads a target named as the old experts' layers (``gate_proj``,
    ``up_proj``, ``down_proj``; Mixtral's ``w1``...) as those experts, a dense MLP's or a shared
    expert's too; on a Mamba model (Mamba, Falcon-H1, ...) it refuses ``out_proj`` and ``conv1d``.

    Raises
    ------
    ValueError
        The first such layer of ``names``, in one line.
    """
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if any("Mamba" in type(m).__name__ for m in model.modules()):
        _check_mamba(model, names, kind)
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # transformers 4: nothing was fused
        return
    convert = (_from_peft("peft.utils.transformers_weight_conversion", "convert_peft_config_for_transformers")
               if get_checkpoint_conversion_mapping(kind) is not None else None)
    if convert is None:
        return
    from peft import LoraConfig

    for name in names:
        config = LoraConfig(target_modules=[name])
        try:
            convert(config, model, None)
            loaded = set(config.target_modules) == {name}
        except ValueError:  # one of a fused pair (up_proj without gate_proj)
            loaded = False
        if not loaded:
            raise ValueError(f"PEFT would load the adapter of {name} onto this {kind} model's experts, not"
                             f" onto {name} (it reads a mixture of experts' {name.rsplit('.', 1)[-1]} as its"
                             " fused experts' since transformers 5), so the export would not load as"
                             " trained: leave it out of --target-modules (name the others)")


def _check_mamba(model: nn.Module, names: list[str], kind: str | None) -> None:
    """:func:`check_peft_targets`' refusal of the layers PEFT refuses on a Mamba model."""
    check = _from_peft("peft.tuners.tuners_utils", "_check_lora_target_modules_mamba")
    if check is None:
        return
    from peft import LoraConfig

    for name in names:
        try:
            check(LoraConfig(), model, name.rsplit(".", 1)[-1])
        except ValueError:
            raise ValueError(f"PEFT refuses an adapter on {name} of a {kind} model (Mamba's fused kernels"
                             " read its weight themselves), so the export would not load: leave it out of"
                             " --target-modules (name the others)") from None


def _from_peft(module: str, name: str):
    """PEFT's function ``name`` of ``module``, or None where PEFT is not installed or is a version
    without it (PEFT is no dependency of fedlora's, and these are its private functions): the check is
    then left out, as without PEFT, not an ImportError traceback."""
    if not _import_peft():
        return None
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _import_peft() -> bool:
    """Import PEFT (whether it is installed), only where a check needs it (it takes about 3 s) and with
    bitsandbytes imported first without its CPU-kernel warning (PEFT imports it)."""
    if importlib.util.find_spec("peft") is None:
        return False
    if importlib.util.find_spec("bitsandbytes") is not None:
        import_bitsandbytes()
    import peft  # noqa: F401

    return True
