"""The one place ds_dpo changes a library's global state: its attention kernels registered with transformers.

Nothing is registered at import. A run calls ``install()`` at the start of setup (before any model is built, since
``from_pretrained`` looks the kernel up by name) and ``uninstall()`` in cleanup. Installs are counted: the registries
are changed by the first ``install`` and put back, exactly as it found them, by the matching last ``uninstall`` (a
tool or a test session that installed the kernels keeps them across the runs it starts). In this order:

1. ``ds_dpo_blocks_sdpa`` / ``ds_dpo_blocks_eager``: block attention for packed and prefix-shared rows
   (``ds_dpo.forward.attention``), with the inner kernel's mask function for ordinary forwards;
2. transformers' ``flash_attention_2/3`` wrapped to gather a prefix-shared row's prompt keys when a forward carries
   ``ds_dpo_kv_index`` (``attention.gathering_keys``);
3. all of these wrapped for Ulysses sequence parallelism when a forward carries ``ds_dpo_sp``
   (``sequence_parallel.ulysses``).

A forward that carries none of ds_dpo's keyword arguments runs the kernels exactly as before.
"""

from __future__ import annotations

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ds_dpo.forward.attention import BLOCK_ATTENTION, block_attention, gathering_keys
from ds_dpo.forward.sequence_parallel import ulysses

FLASH = ("flash_attention_2", "flash_attention_3")
_found: tuple[dict, dict] | None = None
"""The two registries as the first ``install`` found them (None: not installed)."""
_count = 0
"""Installs not yet undone."""


def install() -> None:
    """Register ds_dpo's attention kernels with transformers (see the module docstring), once for any number of
    nested calls."""
    global _found, _count
    _count += 1
    if _found is not None:
        return
    attention, masks = AttentionInterface._global_mapping, AttentionMaskInterface._global_mapping
    found = (dict(attention), dict(masks))
    for inner, name in BLOCK_ATTENTION.items():
        AttentionInterface.register(name, block_attention(inner))
        AttentionMaskInterface.register(name, masks[inner])  # ordinary forwards get the inner kernel's masks
    for name in FLASH:
        AttentionInterface.register(name, gathering_keys(attention[name]))
    for name in (*BLOCK_ATTENTION.values(), *FLASH):
        AttentionInterface.register(name, ulysses(attention[name]))
    _found = found


def uninstall() -> None:
    """Undo one ``install``; the last one puts transformers' registries back as the first found them. Without an
    install to undo, nothing happens."""
    global _found, _count
    _count = max(_count - 1, 0)
    if _found is None or _count:
        return
    for registry, found in zip((AttentionInterface._global_mapping, AttentionMaskInterface._global_mapping), _found):
        registry.clear()
        registry.update(found)
    _found = None
