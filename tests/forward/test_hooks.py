"""``ds_dpo.forward.hooks``: importing ds_dpo changes no library's global state; ``install`` registers the attention
kernels a run needs, and ``uninstall`` puts transformers' registries back exactly as they were."""

import subprocess
import sys
import textwrap

from helpers.runs import REPO


def test_importing_every_module_leaves_transformers_registries_untouched_and_install_is_undone():
    script = textwrap.dedent("""
        import importlib, pkgutil
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        def snapshot():
            return [dict(AttentionInterface._global_mapping), dict(AttentionMaskInterface._global_mapping)]

        before = snapshot()
        import ds_dpo
        for module in pkgutil.walk_packages(ds_dpo.__path__, "ds_dpo."):
            if not module.name.endswith(".docs"):  # a script's __main__ guard, imported all the same below
                importlib.import_module(module.name)
        importlib.import_module("ds_dpo.config.docs")
        assert snapshot() == before, "importing ds_dpo changed transformers' attention registries"

        from ds_dpo.forward import hooks
        hooks.install()
        hooks.install()  # nested: one registration, undone by the matching last uninstall
        attention, masks = snapshot()
        assert {"ds_dpo_blocks_sdpa", "ds_dpo_blocks_eager"} <= attention.keys() <= before[0].keys() | {
            "ds_dpo_blocks_sdpa", "ds_dpo_blocks_eager"}
        assert attention["flash_attention_2"] is not before[0]["flash_attention_2"]  # wrapped
        assert masks["ds_dpo_blocks_sdpa"] is before[1]["sdpa"]
        hooks.uninstall()
        assert snapshot() == [attention, masks], "the inner uninstall must keep the outer install's kernels"
        hooks.uninstall()
        assert snapshot() == before, "uninstall did not restore the registries"
        hooks.uninstall()  # nothing left to undo
        assert snapshot() == before
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
