"""Stage 7: generate DPO preference pairs (see ``prefs/``; ``--help`` for flags and environment variables).

    export OPENAI_API_KEY=...              # from the environment only; never printed or saved
    python 7.gen_prefs_openai.py           # gpt-4o x4 at T=0.7, judged by gpt-4o-mini, 3000 prompts
"""

import sys

from prefs.runner import main

if __name__ == "__main__":
    sys.exit(main())
