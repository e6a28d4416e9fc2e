"""Test-session isolation: tests need no internet, so no test may pick up a developer's real W&B
credentials (secrets.env, an exported WANDB_API_KEY, or the ~/.netrc entry `wandb login` writes).
Tests that exercise W&B point it at a fake server on 127.0.0.1 explicitly."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ["MOE_SECRETS"] = os.devnull
for var in [v for v in os.environ if v.startswith("WANDB_")]:
    del os.environ[var]
os.environ["WANDB_MODE"] = "disabled"
