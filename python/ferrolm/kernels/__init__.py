"""GPU kernels for ferrolm's model, each behind a function with a torch fallback.

Importing this package imports torch (``import ferrolm`` does not); triton is imported only when a
kernel first runs.
"""

from ferrolm.kernels.attention import attention_reference, flash_attention, flash_attention_varlen

__all__ = ["attention_reference", "flash_attention", "flash_attention_varlen"]
