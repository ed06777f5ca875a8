"""Write docs/reliability.md: every bad-input case of tests/reliability_cases.py, run now, as one table.

    PYTHONPATH=. python bench/reliability_table.py      # about a minute on 2 cores

tests/test_reliability_table.py runs the same cases and fails when a row of the doc differs from what the
command does, so after changing a message or a case, rerun this script.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import reliability_cases  # noqa: E402  (tests/ holds the cases the tests run)

DOC = REPO / "docs" / "reliability.md"


def tiny_weights(folder: Path) -> Path:
    """The tests' tiny random-init backbone (conftest.tiny_weights), saved once for all cases."""
    import json

    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = folder / f"{reliability_cases.TINY_BACKBONE}.safetensors"
    model = timm.create_model(reliability_cases.TINY_BACKBONE, pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({"data_config": {"input_size": [3, 64, 64]}}))
    return path


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        weights = tiny_weights(Path(tmp))
        rows = []
        for case in reliability_cases.CASES:
            root = Path(tmp) / case.id
            root.mkdir()
            rows.append(reliability_cases.run_case(case, root, weights))
            print(f"{case.id}: exit {rows[-1]['exit']}", file=sys.stderr)
    DOC.write_text(reliability_cases.render(rows))
    print(f"{len(rows)} cases -> {DOC}")


if __name__ == "__main__":
    main()
