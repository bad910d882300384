"""The core install (torch, numpy, safetensors) is enough for the layer and the models; training's packages
(sentencepiece, tqdm, matplotlib: the `train` extra) are imported only where needed, and their absence is a
one-line error naming the extra."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN_EXTRA = ("sentencepiece", "tqdm", "matplotlib")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_layer_and_models_work_without_the_train_extra():
    """With the train extra's packages unimportable, the layer and the models import and run (torch itself
    imports tqdm when it is installed, so the check blocks the packages instead of looking at sys.modules)."""
    code = f"""
import sys
for name in {TRAIN_EXTRA!r}:
    sys.modules[name] = None  # `import name` now raises ImportError
import torch
import switchformer, switchformer.moe, switchformer.models
from switchformer.moe import SwitchFFN
layer = SwitchFFN(d_model=8, d_ff=16, num_experts=4)
y, aux = layer(torch.randn(2, 5, 8))
assert y.shape == (2, 5, 8)
model = switchformer.build_model(switchformer.ModelConfig(vocab_size=128, d_model=16, d_ff=32, d_kv=4, num_heads=2,
                                                          num_layers=1, num_decoder_layers=1))
ids = torch.randint(0, 128, (1, 6))
assert model(input_ids=ids, labels=ids).loss.isfinite()
print("ok")
"""
    proc = _python(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_plain_import_loads_none_of_the_train_extra():
    code = """
import sys
import switchformer, switchformer.moe, switchformer.models
print(sorted(name for name in ("sentencepiece", "matplotlib") if name in sys.modules))
"""
    proc = _python(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", (proc.stdout, proc.stderr)


def test_missing_train_extra_is_a_one_line_error_naming_it(tmp_path):
    tiny = ROOT / "configs" / "tiny_test.toml"
    code = f"""
import sys
sys.modules["sentencepiece"] = None
from switchformer.cli import main
sys.exit(main(["train", {str(tiny)!r}, "out_dir={tmp_path}", "train.num_threads=1"]))
"""
    proc = _python(code)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "sentencepiece" in lines[0] and "pip install 'switchformer[train]'" in lines[0]


@pytest.mark.parametrize("package", ["tqdm", "matplotlib"])
def test_missing_progress_bar_or_plot_package_names_the_extra(package, monkeypatch):
    from switchformer.plot import plot_losses
    from switchformer.train.loop import _progress_bar

    monkeypatch.setitem(sys.modules, package, None)
    monkeypatch.setitem(sys.modules, f"{package}.auto", None)
    with pytest.raises(ModuleNotFoundError, match=re.escape(f" {package}: pip install 'switchformer[train]'")):
        _progress_bar(3, 0, "run") if package == "tqdm" else plot_losses([], "x.png")
