"""Every case of docs/reliability.md, run now: its exit code is the expected one and its row is the doc's."""

from __future__ import annotations

from pathlib import Path

import pytest
from reliability_cases import CASES, parse, run_case

DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
REGENERATE = "regenerate it: PYTHONPATH=. python bench/reliability_table.py"


@pytest.fixture(scope="module")
def doc_rows() -> dict:
    return parse(DOC.read_text())


def test_the_doc_lists_exactly_the_cases(doc_rows):
    assert list(doc_rows) == [case.id for case in CASES], f"docs/reliability.md is stale; {REGENERATE}"


# a SIGTERM case runs the command in a fresh interpreter (imports torch, timm, mlflow): seconds each
@pytest.mark.parametrize("case", [pytest.param(case, id=case.id, marks=[pytest.mark.slow] if case.sigterm_after or case.slow else [])
                                  for case in CASES])
def test_case(case, tmp_path, tiny_weights, doc_rows):
    row = run_case(case, tmp_path, tiny_weights)
    assert row["exit"] == str(case.exit), row
    assert "Traceback" not in row["message"], row
    if case.exit == 2 and not row["command"].startswith("data check"):  # data check lists its findings instead
        assert row["message"].startswith("error: "), row
    assert row == doc_rows.get(case.id), f"docs/reliability.md differs from what the command does now; {REGENERATE}"
    if row["command"].startswith("finetune") and case.exit != 0:
        assert_no_dead_run_folder(tmp_path / "runs", doc_rows[case.id]["left on disk"])


def assert_no_dead_run_folder(out: Path, documented: str) -> None:
    """After a failed finetune every run folder is complete (made by the case's setup) or resumable; the one case
    a failure cannot clean up (kill -9 before the first epoch) is removed by rerunning the same command, see
    test_run_folders.test_a_start_killed_before_its_first_epoch_is_replaced_by_the_same_command.
    With no run folder to inspect, the doc's row must say that nothing was left (``no runs/`` or ``runs/ empty``),
    so a case that stops watching runs/ fails here instead of passing unchecked."""
    runs = sorted(out.iterdir()) if out.is_dir() else []
    if not runs:
        nothing_left = "runs/ empty" if out.is_dir() else "no runs/"
        assert nothing_left in documented.split("; "), f"{out}: nothing on disk, but the doc says {documented!r}"
    for run in runs:
        names = {p.name for p in run.iterdir()}
        assert names & {"result.json", "resume.pt"}, f"{run} is a dead run folder: {sorted(names)}"
