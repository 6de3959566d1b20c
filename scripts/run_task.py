"""Run every (method, bit width) of a task config and write results/<task>.md (see experiments/task.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.errors import entry_point  # noqa: E402
from experiments.task import main  # noqa: E402

if __name__ == "__main__":
    entry_point(main)
