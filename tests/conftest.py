import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def agent_dir() -> Iterator[Path]:
    """A directory the agent's dropped user (`nobody`) can read: for agent scripts. pytest's
    tmp_path sits below a 0700 directory."""
    path = Path(tempfile.mkdtemp(prefix="mg-agent-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
