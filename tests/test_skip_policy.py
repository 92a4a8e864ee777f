"""The skip policy of tests/skip_policy.py: where checks must run (CI), an unexpected skip fails the run."""

import pytest

from skip_policy import ALLOWED_SKIPS, STRICT_ENV

INNER = '''
import pytest

def test_runs():
    assert True

def test_skipped_for_a_missing_tool():
    pytest.skip("kaleido is not installed")

@pytest.mark.skipif(True, reason={allowed!r})
def test_skipped_for_an_allowed_reason():
    pass

@pytest.mark.xfail(reason="known")
def test_xfail():
    assert False
'''


@pytest.fixture
def inner(pytester, monkeypatch):
    for name in STRICT_ENV:
        monkeypatch.delenv(name, raising=False)
    allowed = next(iter(ALLOWED_SKIPS)) + " for this test"
    pytester.makepyfile(test_inner=INNER.format(allowed=allowed))
    return pytester


@pytest.mark.parametrize("env", STRICT_ENV)
def test_an_unexpected_skip_fails_a_strict_run_and_is_named(inner, monkeypatch, env):
    monkeypatch.setenv(env, "1")
    result = inner.runpytest("-p", "skip_policy", "-rs")
    result.assert_outcomes(passed=1, skipped=2, xfailed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*1 unexpected skip(s) fail this run*",
                                 "SKIPPED test_inner.py::test_skipped_for_a_missing_tool: kaleido is not installed"])
    assert "test_skipped_for_an_allowed_reason:" not in result.stdout.str()


def test_without_the_variables_skips_pass_and_allowed_ones_always_do(inner, monkeypatch):
    result = inner.runpytest("-p", "skip_policy")
    assert result.ret == pytest.ExitCode.OK and "unexpected skip" not in result.stdout.str()
    monkeypatch.setenv("ATTENTION_DRIFT_NO_SKIPS", "1")
    result = inner.runpytest("-p", "skip_policy", "-k", "not missing_tool")
    result.assert_outcomes(passed=1, skipped=1, xfailed=1)
    assert result.ret == pytest.ExitCode.OK


def test_a_failing_run_keeps_its_own_exit_status(inner, monkeypatch):
    monkeypatch.setenv("ATTENTION_DRIFT_NO_SKIPS", "1")
    inner.makepyfile(test_fails="def test_fails():\n    assert False\n")
    result = inner.runpytest("-p", "skip_policy")
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_a_module_skipped_at_collection_counts_too(pytester, monkeypatch):
    monkeypatch.setenv("ATTENTION_DRIFT_NO_SKIPS", "1")
    pytester.makepyfile(test_mod="import pytest\npytest.importorskip('no_such_module_here')\n\ndef test_x():\n    pass\n",
                        test_other="def test_y():\n    pass\n")
    result = pytester.runpytest("-p", "skip_policy")
    result.assert_outcomes(passed=1, skipped=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["SKIPPED test_mod.py: could not import 'no_such_module_here'*"])
