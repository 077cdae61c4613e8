"""The causal probing protocol P0-P6 (docs/design.md, section 6): needs the [probe] and [report] extras."""

from .._extras import require as _require

_require("pandas", "probe", "the probing protocol")
_require("scipy", "probe", "the probing protocol (statistics)")
_require("matplotlib", "report", "the probing protocol (figures)")
