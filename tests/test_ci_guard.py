"""In CI a skipped test is a failure, a module skipped at collection included (conftest.py)."""
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

MODULE_SKIP = "import pytest\npytest.importorskip('no_such_module_anywhere')\n\ndef test_never_runs():\n    pass\n"
TEST_SKIP = "import pytest\n\ndef test_skips():\n    pytest.skip('nope')\n\ndef test_passes():\n    pass\n"


def _pytest(folder, ci):
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder)],
                          cwd=folder, env=env, capture_output=True, text=True)


def test_skips_fail_in_ci_and_stay_skips_elsewhere(tmp_path):
    shutil.copy(os.path.join(HERE, "conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_module_skip.py").write_text(MODULE_SKIP)
    (tmp_path / "test_inner_skip.py").write_text(TEST_SKIP)
    local = _pytest(tmp_path, ci=False)
    assert local.returncode == 0 and "1 passed, 2 skipped" in local.stdout, local.stdout
    ci = _pytest(tmp_path, ci=True)
    assert ci.returncode != 0, ci.stdout
    assert "test_module_skip.py" in ci.stdout and "skipped in CI" in ci.stdout
    (tmp_path / "test_module_skip.py").unlink()   # the in-test skip on its own fails too
    ci = _pytest(tmp_path, ci=True)
    assert ci.returncode == 1 and "1 failed, 1 passed" in ci.stdout, ci.stdout
