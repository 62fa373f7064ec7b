"""lorasb-ds: LoRA-SB fine-tuning (arXiv 2411.19557) on DeepSpeed ZeRO-3.

The library API (``lorasb_ds.api``, loaded on first use so that the command line starts without torch):
``wrap``, ``initialize``, ``save_adapter``, ``layers_of``, ``LoraSBCallback`` and ``LoraSBConfig``.
"""

__version__ = "0.1.0"

API = ("wrap", "initialize", "save_adapter", "layers_of", "LoraSBCallback", "LoraSBConfig")


def __getattr__(name: str):
    if name in API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'lorasb_ds' has no attribute {name!r}")
