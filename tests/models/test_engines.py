import subprocess
import sys

from helpers.runs import REPO


def test_model_code_of_every_sub_model_is_imported_before_zero_init():
    """A vision-language model builds its language model and vision tower from their configs inside zero.Init; their
    modules must be imported before it (transformers 5.25's ``kernels`` class decorators are undone by zero.Init for
    classes first defined inside it: 'LlamaAttention' object has no attribute '_kernel_funcs'). In a fresh process,
    where nothing imported them yet."""
    script = (
        "import sys\n"
        "from transformers import AutoConfig\n"
        "from ds_dpo.models.engines import _import_model_code\n"
        "names = ['transformers.models.' + m for m in ('llama.modeling_llama', 'clip.modeling_clip', "
        "'llava.modeling_llava', 'idefics3.modeling_idefics3')]\n"
        "assert not any(n in sys.modules for n in names)\n"
        "_import_model_code(AutoConfig.for_model('llava'))\n"
        "_import_model_code(AutoConfig.for_model('idefics3'))\n"
        "missing = [n for n in names if n not in sys.modules]\n"
        "assert not missing, missing\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
