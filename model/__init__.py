"""MateConv model package: ``from model import MateConvConfig, MateConvForCausalLM, get_config, load``."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_mateconv import MateConvConfig
from .loading import load
from .modeling_mateconv import MateConvCausalLMOutput, MateConvForCausalLM, MateConvModel


def get_config(name_or_path, **overrides) -> MateConvConfig:
    """Preset name, config JSON path or checkpoint directory -> ``MateConvConfig`` (see ``model.presets``)."""
    from .presets import get_config as _get_config

    return _get_config(name_or_path, **overrides)


def parameter_report(config: MateConvConfig, seq_len: int | None = None) -> dict:
    """Total / active parameters and FLOPs per token (see ``model.presets.parameter_report``)."""
    from .presets import parameter_report as _report

    return _report(config, seq_len=seq_len)


try:
    AutoConfig.register("mateconv", MateConvConfig)
    AutoModelForCausalLM.register(MateConvConfig, MateConvForCausalLM)
except ValueError:  # already registered (module reloaded)
    pass
# save_pretrained copies the code files beside the weights (trust_remote_code loading)
MateConvConfig.register_for_auto_class()
MateConvForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "MateConvConfig",
    "MateConvForCausalLM",
    "MateConvModel",
    "MateConvCausalLMOutput",
    "get_config",
    "load",
    "parameter_report",
]
