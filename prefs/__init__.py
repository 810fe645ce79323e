"""Preference-pair generation (stage 7): K candidate answers per prompt, ranked by a judge, written as
canonical DPO pairs. Generators: any OpenAI-compatible endpoint, or a local checkpoint (on-policy);
judges: an OpenAI-compatible LLM, or ``reference`` (offline similarity to the reference answer).

``python 7.gen_prefs_openai.py --help`` lists every setting and its environment variable.
"""

from __future__ import annotations
