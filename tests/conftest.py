import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module: small convolutions on a shared 2-core CPU run several
    times faster than with two threads competing with other processes."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _in_ci():
    return os.environ.get("CI") == "true"


SKIP_IN_CI = "skipped in CI (every dependency should be installed)"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI every dependency is installed, so a skip means something is
    missing: count it as a failure there instead of a silent pass."""
    outcome = yield
    report = outcome.get_result()
    if _in_ci() and report.skipped and "slow" not in item.keywords:
        report.outcome = "failed"
        report.longrepr = f"{SKIP_IN_CI}: {report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """The same for a whole module skipped while it is collected
    (pytest.importorskip or pytest.skip(allow_module_level=True) at the top)."""
    outcome = yield
    report = outcome.get_result()
    if _in_ci() and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"{SKIP_IN_CI}: {report.longrepr}"
