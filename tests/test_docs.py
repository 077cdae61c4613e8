"""The docs a user gets point inside the repository, and state what the code does."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
USER_FACING = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md")),
               *sorted((ROOT / "latentflow_fast").rglob("*.py")),
               *sorted(p for folder in ("kernels", "csrc", "benchmarks", "scripts", "training")
                       for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".cu", ".cuh", ".h", ".cpp", ".sh"))]


def test_no_reference_to_files_outside_the_repository():
    offenders = []
    for path in USER_FACING:
        text = path.read_text()
        for pattern in ("DESIGN.md", "../shared", "/work/shared"):
            if pattern in text:
                offenders.append(f"{path.relative_to(ROOT)}: {pattern}")
    assert not offenders, offenders


def test_design_doc_sections_that_code_points_to_exist():
    design = (ROOT / "docs" / "design.md").read_text()
    headings = set(re.findall(r"^## (\d+)\. ", design, flags=re.M))
    for path in USER_FACING:
        for section in re.findall(r"docs/design\.md, sections? (\d+)", path.read_text()):
            assert section in headings, f"{path.relative_to(ROOT)} points to missing section {section}"
    assert "### tiny" in design and "docs/small_model.md" in design  # shipped models


def test_readme_lists_the_default_models_vocabulary():
    from latentflow_fast.models.tiny import TINY_VOCABULARY

    readme = (ROOT / "README.md").read_text()
    assert ", ".join(TINY_VOCABULARY) in readme


def test_probe_help_shows_the_real_defaults():
    from latentflow_fast.protocol.base import ProtocolConfig

    out = subprocess.run([sys.executable, "-m", "latentflow_fast.cli", "probe", "--help"], capture_output=True,
                         text=True, cwd=ROOT).stdout
    assert f"(default {ProtocolConfig().num_clips};" in " ".join(out.split())


def test_info_reads_the_model():
    out = subprocess.run([sys.executable, "-m", "latentflow_fast.cli", "info", "--json"], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    import json

    info = json.loads(out.stdout)
    from latentflow_fast import load_model

    model = load_model("tiny")
    assert info["prompt_vocabulary"] == list(model.text_encoder.vocabulary)
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["latent_frames_per_second"] == model.audio_codec.frame_rate
    assert info["max_input_seconds"] == model.config.max_positions / model.audio_codec.frame_rate
    assert info["trained_clip_seconds"] == 2.0


def test_info_on_another_model_folder(tmp_path):
    from cli_helpers import latentflow, save_small_tiny_model

    folder = save_small_tiny_model(tmp_path / "m")
    result = latentflow("info", "--model", folder)
    assert result.returncode == 0 and "trained on clips of: unknown" in result.stdout
    assert "prompt words (4 at most per prompt): sine, tone" in result.stdout
    bad = latentflow("info", "--model", tmp_path / "nope")
    assert bad.returncode == 2 and "--model" in bad.stderr
