"""Settings of preference generation: defaults, environment variables (the original names), flags.

Resolution order: command-line flag > environment variable > default. API keys are read from the
environment only (``OPENAI_API_KEY``, ``JUDGE_API_KEY``) and are never stored, printed or logged.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, fields

GENERATORS = ("openai", "local")
JUDGES = ("openai", "reference")
METRICS = ("rougeL", "chrf")


@dataclass
class PrefsConfig:
    # data
    prompts: str = "embedded:train"
    out_path: str = "data/prefs/dpo_pairs.jsonl"
    n_prompts: int = 3000
    k_samples: int = 4
    seed: int = 42
    pairs_per_prompt: int = 1
    min_margin: float = 0.05
    # generator
    generator: str = "openai"
    gen_model: str = "gpt-4o"
    gen_temperature: float = 0.7
    gen_top_p: float = 1.0
    gen_max_tokens: int = 512
    base_url: str | None = None
    gen_use_n: str = "auto"
    model_dir: str | None = None
    tokenizer: str | None = None
    local_batch: int = 16
    device: str = "cpu"
    threads: int = 0
    # judge
    judge: str = "openai"
    judge_model: str = "gpt-4o-mini"
    judge_temperature: float = 0.0
    judge_base_url: str | None = None
    judge_tries: int = 3
    judge_max_tokens: int = 256
    metric: str = "rougeL"
    # transport
    max_workers: int = 8
    rps: float = 5.0
    max_tries: int = 8
    timeout: float = 60.0
    backoff_base: float = 1.0
    backoff_cap: float = 30.0
    backoff_cap_429: float = 60.0
    # output
    progress: bool = True
    fsync: bool = False

    def public_dict(self) -> dict:
        """Settings for logs and summaries (no secrets are held here)."""
        return asdict(self)

    def validate(self) -> PrefsConfig:
        if self.generator not in GENERATORS:
            raise ValueError(f"generator must be one of {GENERATORS}, got {self.generator!r}")
        if self.judge not in JUDGES:
            raise ValueError(f"judge must be one of {JUDGES}, got {self.judge!r}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.k_samples < 2:
            raise ValueError("k_samples must be >= 2 (a pair needs two answers)")
        if self.pairs_per_prompt not in (1, 2):
            raise ValueError("pairs_per_prompt must be 1 (best vs worst) or 2 (best vs each of the 2 worst)")
        if self.n_prompts < 0 or self.max_workers < 1 or self.max_tries < 1 or self.judge_tries < 1:
            raise ValueError("n_prompts >= 0, max_workers >= 1, max_tries >= 1 and judge_tries >= 1 are required")
        if self.generator == "local" and not self.model_dir:
            raise ValueError("the local generator needs --model_dir (or env LOCAL_MODEL_DIR)")
        if self.gen_use_n not in ("auto", "true", "false"):
            raise ValueError("gen_use_n must be auto, true or false")
        return self


# field -> (environment variable names, first wins; help)
ENV: dict[str, tuple[tuple[str, ...], str]] = {
    "prompts": (("PROMPTS_PATH",), "prompt source: a JSONL file (prefs_prompts_* or sft_* records) or "
                                   "embedded:train / embedded:validation / embedded:sft_train"),
    "out_path": (("OUT_PATH", "OUTPUT"), "output JSONL of pairs (appended; reruns resume)"),
    "n_prompts": (("N_PROMPTS",), "number of prompts sampled (fixed seed); 0 = all"),
    "k_samples": (("K_SAMPLES",), "candidate answers per prompt"),
    "seed": (("SEED",), "seed of the prompt sample and of local sampling"),
    "pairs_per_prompt": (("PAIRS_PER_PROMPT",), "1: best vs worst; 2: best vs each of the 2 worst (original)"),
    "min_margin": (("MIN_MARGIN",), "write a pair only if score(best) - score(rejected) >= this"),
    "generator": (("GENERATOR",), "openai (any OpenAI-compatible endpoint) or local (a checkpoint)"),
    "gen_model": (("GEN_MODEL",), "generator model name at the endpoint"),
    "gen_temperature": (("GEN_TEMPERATURE",), "generator temperature"),
    "gen_top_p": (("GEN_TOP_P",), "generator top_p"),
    "gen_max_tokens": (("GEN_MAX_TOKENS",), "max new tokens per candidate"),
    "base_url": (("OPENAI_BASE_URL",), "OpenAI-compatible base URL (default: api.openai.com)"),
    "gen_use_n": (("GEN_USE_N",), "ask for K answers in one call with n=K: auto/true/false"),
    "model_dir": (("LOCAL_MODEL_DIR",), "checkpoint directory of the local generator"),
    "tokenizer": (("LOCAL_TOKENIZER",), "tokenizer directory of the local generator"),
    "local_batch": (("LOCAL_BATCH",), "prompts per batch of local sampling (x K rows)"),
    "device": (("DEVICE",), "device of the local generator"),
    "threads": (("TORCH_THREADS",), "torch CPU threads for local sampling (0 = auto: 1 for models under "
                                    "10M parameters, else torch's default)"),
    "judge": (("JUDGE",), "openai (an LLM ranks the candidates) or reference (similarity to the reference)"),
    "judge_model": (("JUDGE_MODEL",), "judge model name"),
    "judge_temperature": (("JUDGE_TEMPERATURE",), "judge temperature"),
    "judge_base_url": (("JUDGE_BASE_URL",), "judge base URL (default: the generator's)"),
    "judge_tries": (("JUDGE_TRIES",), "judge calls per prompt before a malformed verdict fails it"),
    "judge_max_tokens": (("JUDGE_MAX_TOKENS",), "max tokens of a verdict"),
    "metric": (("REF_METRIC",), "reference judge metric: rougeL (character ROUGE-L F1) or chrf"),
    "max_workers": (("MAX_WORKERS",), "concurrent prompts"),
    "rps": (("RPS",), "requests per second (token bucket); 0 = unlimited"),
    "max_tries": (("MAX_TRIES",), "attempts per HTTP request"),
    "timeout": (("REQUEST_TIMEOUT",), "seconds per HTTP request"),
    "backoff_base": (("BACKOFF_BASE",), "first backoff in seconds (doubles, with jitter)"),
    "backoff_cap": (("BACKOFF_CAP",), "backoff cap for 5xx / timeouts / connection errors"),
    "backoff_cap_429": (("BACKOFF_CAP_429",), "backoff cap for 429 without Retry-After"),
    "progress": (("PROGRESS",), "show progress (a bar on a terminal, plain lines in a log)"),
    "fsync": (("FSYNC",), "fsync the output after each prompt"),
}


def _parse_bool(v) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {v!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="7.gen_prefs_openai.py",
        description="Generate DPO preference pairs: K candidate answers per prompt, ranked by a judge. "
                    "Every flag also reads an environment variable (shown); flags win. "
                    "API keys: env OPENAI_API_KEY (generator and judge), JUDGE_API_KEY (judge, optional).",
    )
    defaults = PrefsConfig()
    for f in fields(PrefsConfig):
        envs, help_ = ENV[f.name]
        default = getattr(defaults, f.name)
        h = f"{help_} [env {'/'.join(envs)}; default {default}]"
        if f.type in ("bool", bool):
            p.add_argument(f"--{f.name}", type=_parse_bool, default=None, metavar="BOOL", help=h)
        else:
            p.add_argument(f"--{f.name}", default=None, help=h)
    return p


def resolve(args: argparse.Namespace | None = None, env: dict | None = None) -> PrefsConfig:
    """Flags > environment > defaults, converted to the field types."""
    env = os.environ if env is None else env
    cfg = PrefsConfig()
    for f in fields(PrefsConfig):
        value = getattr(args, f.name, None) if args is not None else None
        if value is None:
            for name in ENV[f.name][0]:
                if env.get(name) not in (None, ""):
                    value = env[name]
                    break
        if value is None:
            continue
        default = getattr(cfg, f.name)
        if isinstance(default, bool):
            value = _parse_bool(value)
        elif isinstance(default, int):
            value = int(value)
        elif isinstance(default, float):
            value = float(value)
        else:
            value = str(value)
        setattr(cfg, f.name, value)
    return cfg.validate()
