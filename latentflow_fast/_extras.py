"""Optional dependencies: the operator needs torch and numpy only; the rest are extras (docs/design.md, section 9).

    [audio]   soundfile, torchaudio, safetensors   audio files, resampling, loading model weights
    [probe]   pandas, pyarrow, tqdm, scipy (+ audio) probe sweeps, result stores, the protocol's statistics
    [report]  matplotlib                           the protocol's figures
    [all]     all of them (scripts/setup.sh installs this)
"""

from __future__ import annotations

import importlib


def require(module: str, extra: str, feature: str):
    """Import `module`, or raise ModuleNotFoundError naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module.split(".")[0]:
            raise
        raise ModuleNotFoundError(
            f"{feature} needs the package {module.split('.')[0]!r}, part of the [{extra}] extra: "
            f"pip install 'latentflow_fast[{extra}]'", name=exc.name) from None
