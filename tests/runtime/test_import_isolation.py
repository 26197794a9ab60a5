import subprocess
import sys

BLOCKER = r"""
import sys
BLOCKED = ("torch", "transformers", "peft", "optimum", "tensorrt", "sentence_transformers")
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
import angle_rt
enc = angle_rt.Encoder(sys.argv[1])
v = enc.encode(["runs without torch", ""])
assert v.shape == (2, enc.dim), v.shape
heavy = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not heavy, heavy
print("ok", v.shape)
"""


def test_runtime_imports_and_encodes_without_torch(tiny_bert_bundle):
    out = subprocess.run([sys.executable, "-c", BLOCKER, str(tiny_bert_bundle)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")
