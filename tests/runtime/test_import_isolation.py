import subprocess
import sys

import pytest

# The exporter's and trainer's stacks (torch, onnx, scipy, datasets, ...), TensorRT, and tqdm
# (optional: show_progress_bar=True only). None of them is a base dependency of angle-rt.
BLOCKED = ("torch", "transformers", "peft", "optimum", "tensorrt", "sentence_transformers",
           "onnx", "scipy", "datasets", "tqdm")

SCRIPT = r"""
import sys
BLOCKED = tuple(sys.argv[3].split(","))
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
if sys.argv[2] == "block":
    sys.meta_path.insert(0, Block())
import angle_rt
enc = angle_rt.Encoder(sys.argv[1])
v = enc.encode(["runs without torch", ""])
assert v.shape == (2, enc.dim), v.shape
heavy = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not heavy, heavy
print("ok", v.shape)
"""


@pytest.mark.parametrize("mode", ["block", "installed"])
def test_runtime_imports_and_encodes_without_torch(tiny_bert_bundle, mode):
    """block: works where none of them is installed; installed: loads none of them even where
    they are (this venv has them all but tensorrt), so no optional import hides at import or
    encode time."""
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_bert_bundle), mode,
                          ",".join(BLOCKED)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")
