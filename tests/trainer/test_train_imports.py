"""A training worker starts its data streams before it imports the model's libraries."""

import subprocess
import sys


def test_the_workers_entry_does_not_import_timm():
    """``trainer.train`` (what a Ray Train worker loads to run its loop) imports neither timm nor the loop itself;
    the loop (``trainer.loop``), which the worker imports once its streams have started, does."""
    code = (
        "import sys, trainer.train;"
        "assert 'timm' not in sys.modules and 'trainer.loop' not in sys.modules, sorted(sys.modules);"
        "import trainer.loop;"
        "assert 'timm' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
