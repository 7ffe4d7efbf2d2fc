"""The discovery of claim and finding modules: by file name, guarded, checked."""

import sys

from bnlab.lab.registry import discover


def test_discover_orders_by_number_reports_broken_and_incomplete_modules(tmp_path, monkeypatch):
    pkg = tmp_path / "plugpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "c10_late.py").write_text("ID = 'c10'\nA = 1\n")
    (pkg / "c2_early.py").write_text("ID = 'C2'\nA = 1\n")
    (pkg / "c3_broken.py").write_text("raise RuntimeError('boom')\n")
    (pkg / "c4_lacking.py").write_text("ID = 'C4'\n")
    (pkg / "helper.py").write_text("ID = 'X'\nA = 1\n")  # not a c<N>_ name: not a plug-in
    monkeypatch.syspath_prepend(str(tmp_path))
    import plugpkg

    try:
        found, broken = discover("plugpkg", plugpkg.__path__, "c", ("ID", "A"))
        assert list(found) == ["C2", "C10"]
        assert set(broken) == {"c3_broken", "c4_lacking"}
        assert "boom" in broken["c3_broken"] and broken["c4_lacking"] == "c4_lacking lacks A"
    finally:
        for name in [n for n in sys.modules if n == "plugpkg" or n.startswith("plugpkg.")]:
            del sys.modules[name]
