"""A missing optional dependency is one ImportError naming the extra that installs it (the CLI prints its one line)."""
import sys

import pytest

import accel
from accel._optional import MissingDependency, require


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    with pytest.raises(MissingDependency, match=r"^plot_control_chart needs matplotlib, which is not installed: "
                                                r"pip install 'accel-train\[plot\]'$"):
        accel.optim.plot_control_chart([{"step": 0, "loss": 1.0, "limit": 2.0}], "chart.png")


def test_to_tltorch_without_tensorly_torch_names_the_extra(monkeypatch):
    layer = accel.nn.BTLinear(16, 16, ranks=2, num_blocks=1)
    monkeypatch.setitem(sys.modules, "tltorch", None)
    with pytest.raises(MissingDependency, match=r"BTLinear.to_tltorch needs tltorch.*accel-train\[tltorch\]"):
        layer.to_tltorch()


def test_require_returns_installed_modules_and_reraises_their_own_failing_imports(tmp_path, monkeypatch):
    with pytest.raises(MissingDependency, match=r"f needs accel_no_such_module.*accel-train\[x\]"):
        require("accel_no_such_module", extra="x", feature="f")
    assert require("json", extra="x", feature="f").__name__ == "json"
    # an installed package whose own import of something else fails: that error, not a missing extra
    (tmp_path / "accel_broken_pkg.py").write_text("import accel_missing_inner\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError) as raised:
        require("accel_broken_pkg", extra="x", feature="f")
    assert not isinstance(raised.value, MissingDependency) and raised.value.name == "accel_missing_inner"
