import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

# One torch thread in the test process: on a busy 2-core machine two OpenMP threads can stall on
# barriers (a 1 s MoE test took 95 s). Set at import, so module-scoped fixtures see it too, and reset
# after every test, since in-process trainer runs choose their own count. Subprocess stages choose theirs.
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    yield
    torch.set_num_threads(1)


# A test that needs a resource never skips silently: any skip fails the run (pytest -ra lists the reasons).
# Set MATECONV_ALLOW_SKIPS=1 to let a local run pass with skips.
_SKIPPED: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped:
        _SKIPPED.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if _SKIPPED and os.environ.get("MATECONV_ALLOW_SKIPS") != "1" and exitstatus == 0:
        print(f"\n{len(_SKIPPED)} test(s) skipped; skips count as failures (MATECONV_ALLOW_SKIPS=1 allows them):")
        for nodeid in _SKIPPED:
            print("  SKIPPED", nodeid)
        session.exitstatus = 1
