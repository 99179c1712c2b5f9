"""The canaries' own rules: news of a fix only where the bug could show."""

import pytest
from canary import cpu_flags, only_on_cpu_with, still_broken


def test_a_bug_that_cannot_show_on_this_cpu_is_not_reported_fixed():
    with pytest.raises(pytest.skip.Exception) as skipped:
        only_on_cpu_with("no_such_cpu_flag", "pytest", "a bug of some CPUs")
    assert "cannot be checked on this CPU (needs no_such_cpu_flag)" in str(skipped.value)
    assert "no longer shows" not in str(skipped.value)


def test_a_flag_the_cpu_has_lets_the_canary_run():
    flags = cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo here")
    only_on_cpu_with(sorted(flags)[0], "pytest", "a bug of some CPUs")  # returns: the canary goes on


def test_a_fixed_bug_skips_with_the_news():
    still_broken(True, "pytest", "still there")  # returns
    with pytest.raises(pytest.skip.Exception, match="no longer shows this bug: fixed"):
        still_broken(False, "pytest", "fixed")
