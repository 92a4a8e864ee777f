"""Where every check must run (CI), a skipped test fails the session.

A skip is a check that did not run. CI (``.ci/run``) installs everything the tests use (the dev
extra with playwright and kaleido, Debian's Chromium, the offline models), so there a skip means a
missing dependency or a broken detection, not a choice. With ``ATTENTION_DRIFT_NO_SKIPS=1`` (or
``ATTENTION_DRIFT_REQUIRE_BROWSER=1``, which ``.ci/run`` sets too) the session fails, naming each
skipped test and its reason, unless the reason starts with a key of :data:`ALLOWED_SKIPS`.
Deselected tests (``-m "not slow"``) are not skips. Loaded by ``tests/conftest.py``.
"""

import os

import pytest

STRICT_ENV = ("ATTENTION_DRIFT_NO_SKIPS", "ATTENTION_DRIFT_REQUIRE_BROWSER")

ALLOWED_SKIPS = {
    "set ATTENTION_DRIFT_EXPLORER_RUN=":
        "test_explorer.py::test_screenshot_of_a_run screenshots a real drift run that a person points it at "
        "(to refresh figures/explorer.png); CI has no such run and the test checks nothing else",
    "this Ray cluster has a GPU":
        "test_sweep.py::test_cuda_without_a_gpu_in_the_cluster_is_refused checks that --device cuda is refused "
        "where the cluster has no GPU; on a machine with one there is nothing to refuse",
}
"""Skip reasons (prefixes) that are fine everywhere, each with why."""


def strict() -> bool:
    """Whether this session fails on skips outside :data:`ALLOWED_SKIPS`."""
    return any(os.environ.get(name) == "1" for name in STRICT_ENV)


def skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def allowed(reason: str) -> bool:
    return any(reason.startswith(prefix) for prefix in ALLOWED_SKIPS)


class SkipPolicy:
    """Collects the unexpected skips of one session (per config: an inner pytester run has its own)."""

    def __init__(self):
        self.unexpected: list[tuple[str, str]] = []

    def _seen(self, report) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            reason = skip_reason(report)
            if not allowed(reason):
                self.unexpected.append((report.nodeid, reason))

    def pytest_runtest_logreport(self, report) -> None:
        self._seen(report)

    def pytest_collectreport(self, report) -> None:
        self._seen(report)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session, exitstatus) -> None:
        if self.unexpected and strict() and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.unexpected and strict():
            names = " / ".join(f"{n}=1" for n in STRICT_ENV)
            terminalreporter.write_sep("=", f"{len(self.unexpected)} unexpected skip(s) fail this run ({names}; "
                                       "allowed reasons: tests/skip_policy.py ALLOWED_SKIPS)", red=True)
            for nodeid, reason in self.unexpected:
                terminalreporter.write_line(f"SKIPPED {nodeid}: {reason}")


def pytest_configure(config) -> None:
    config.pluginmanager.register(SkipPolicy(), "attention_drift_skip_policy")
