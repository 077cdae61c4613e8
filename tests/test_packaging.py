"""The operator needs torch and numpy only; everything else is an extra, and a missing extra is named."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = ["pandas", "pyarrow", "matplotlib", "soundfile", "scipy", "torchaudio", "tqdm", "safetensors", "hypothesis"]

# Runs code in a fresh interpreter where the OPTIONAL packages look uninstalled (their finder returns None).
BLOCKED = """
import sys, importlib.machinery as m
BLOCK = set(sys.argv[1].split(","))
orig = m.PathFinder.find_spec.__func__
def find_spec(cls, name, path=None, target=None):
    return None if name.split(".")[0] in BLOCK else orig(cls, name, path, target)
m.PathFinder.find_spec = classmethod(find_spec)
exec(sys.argv[2])
"""


def _without_extras(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKED, ",".join(OPTIONAL), code], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def test_operator_and_model_code_run_with_torch_and_numpy_only():
    result = _without_extras(
        "import torch, latentflow_fast as lf\n"
        "q = torch.randn(1, 2, 5, 8)\n"
        "out, cap = lf.probed_attention(q, q, q, segments=[0, 2, 5], capture=('entropy', 'segment_mass'))\n"
        "assert cap['segment_mass'].shape == (1, 2, 5, 2)\n"
        "from latentflow_fast.models.tiny import build_tiny_model\n"
        "from latentflow_fast.sampler import sample_ode\n"
        "model = build_tiny_model()\n"
        "r = model.separate(torch.randn(640) * 0.1, 16000, 'chirp', steps=1)\n"
        "import sys; assert not {'pandas', 'matplotlib', 'soundfile', 'scipy'} & set(sys.modules)\n"
        "print('ok')\n")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_missing_extra_is_named():
    result = _without_extras("import latentflow_fast.probe")
    assert result.returncode != 0 and "[probe] extra" in result.stderr and "pip install" in result.stderr
    result = _without_extras("import latentflow_fast.protocol.run")
    assert "[probe] extra" in result.stderr


def test_pyproject_extras_and_setup_script_agree():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [re.split(r"[<>=]", d)[0] for d in project["dependencies"]] == ["torch", "numpy"]
    extras = {k: {re.split(r"[<>=]", d)[0] for d in v} for k, v in project["optional-dependencies"].items()}
    assert extras["all"] == extras["audio"] | extras["probe"] | extras["report"]
    assert "hypothesis" in extras["test"]
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    installed = set(re.findall(r"[A-Za-z0-9_-]+", setup.split("cmake ninja", 1)[1].split("\n\n")[0]))
    missing = (extras["all"] | extras["test"]) - installed - {"torchaudio"}  # torchaudio: pinned with torch above
    assert not missing, missing
    assert "torchaudio==" in setup


def test_hypothesis_is_used_by_the_operator_property_tests():
    assert "from hypothesis import" in (ROOT / "tests" / "test_operator_values.py").read_text()
