"""lorasb-ds: LoRA-SB fine-tuning (arXiv 2411.19557) on DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
