"""The bad-input catalogue (tests/bad_input_cases.py, listed in docs/reliability.md): every case
exits non-zero with one line `moe: error: ...`, no traceback, and overwrites nothing."""

import pytest
from bad_input_cases import CASES, build_fixtures, last_line, run_case, snapshot

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return build_fixtures(tmp_path_factory.mktemp("bad-input"))


def check(case, rc, err, fx, before):
    if case.accepted:
        assert rc == 0, err[-2000:]
    else:
        assert rc not in (0, None), f"{case.id}: accepted (rc 0)\n{err[-2000:]}"
        assert "Traceback" not in err, err[-3000:]
        line = last_line(err)
        assert line.startswith("moe: error: "), err[-2000:]
        assert case.expect in line, line
        errors = [ln for ln in err.splitlines() if "error" in ln.lower()]
        assert errors == [line], errors
    assert not (fx["tmp"].parent / "pwned").exists(), "a resume file was unpickled"
    after = snapshot(fx["tmp"].parent)
    changed = [k for k in before if after.get(k) != before[k]]
    assert not changed, f"{case.id} changed or removed {changed}"


def test_catalogue_has_30_cases():
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, fx):
    before = snapshot(fx["tmp"].parent)
    rc, err = run_case(case, fx)
    check(case, rc, err, fx, before)


SUB = [c for c in CASES if c.subprocess]


@pytest.mark.parametrize("case", SUB, ids=[c.id for c in SUB])
def test_bad_input_subprocess(case, fx):
    """A few cases through `python -m moe.cli`: the real exit code and the real stderr."""
    before = snapshot(fx["tmp"].parent)
    rc, err = run_case(case, fx, in_process=False)
    assert rc == 2
    check(case, rc, err, fx, before)
    assert [ln for ln in err.splitlines() if ln.startswith("moe:")] == [last_line(err)]
