"""Serve a MateConv checkpoint over an OpenAI-compatible API: ``python serve.py --model DIR [--port 8000]``.

Same as ``python -m serving``; see ``serving/cli.py`` for the flags.
"""

import sys

from serving.cli import main

if __name__ == "__main__":
    sys.exit(main())
