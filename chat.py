"""Talk to a trained model in the terminal.

    python chat.py --model out/pipeline                     # a pipeline run (its baseline arm's final model)
    python chat.py --model out/sft_mateconv-tiny            # a trainer run directory (its latest checkpoint)
    python chat.py --model out/sft/checkpoints/step_0000200 # a checkpoint, or an exported native directory
    python chat.py --model DIR --prompt "床前明月光的下一句是什么？"   # one answer, then exit

``--model`` takes anything ``model.load`` does (dense or MoE, our checkpoints and exported native
ones). Answers stream as they are generated. The conversation is kept as history; when it no longer
fits the model's context (prompt + ``--max_new_tokens``), the oldest turns are dropped (the system
message stays). Commands: ``/reset`` (forget the history), ``/system <text>`` (set the system
message and reset; ``/system`` alone clears it), ``/exit`` (or end of input). Ctrl-C stops the
answer being generated; at the prompt it exits.

On a terminal the prompt is ``you> ``; from a pipe every input line is one user message and every
answer is printed on its own line (status lines go to stderr), so ``printf '你好\\n' | python
chat.py --model DIR`` works in scripts. Sampling: ``--temperature`` (0 = greedy), ``--top_p``,
``--max_new_tokens``, ``--seed`` (the whole session's random stream: same seed, same answers).
"""

from __future__ import annotations

import argparse
import sys
import threading


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python chat.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="checkpoint, trainer run dir, pipeline run dir or exported native dir (model.load)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's own, else ours)")
    p.add_argument("--prompt", default=None, help="answer this one message and exit")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy [0.7]")
    p.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling mass [0.9]")
    p.add_argument("--max_new_tokens", type=int, default=256, help="most tokens per answer [256]")
    p.add_argument("--seed", type=int, default=None, help="seed of the session's random stream")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="e.g. float32, bfloat16 (default: as saved)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    return p


def check_args(args) -> None:
    import math

    if not (math.isfinite(args.temperature) and 0 <= args.temperature <= 2):
        raise SystemExit("error: --temperature must be in [0, 2]")
    if not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
        raise SystemExit("error: --top_p must be in (0, 1]")
    if args.max_new_tokens < 1:
        raise SystemExit("error: --max_new_tokens must be at least 1")


def fit_history(tokenizer, system: str | None, turns: list[dict], ctx: int, max_new: int
                ) -> tuple[list[dict], list[int], int]:
    """The messages to send: the system message, then as many of the newest turns as fit in
    ``ctx - max_new`` prompt tokens (whole user/assistant pairs dropped from the oldest; the last user
    message is always kept). Returns ``(messages, prompt ids, number of messages dropped)``."""
    from tokenizer.chat import encode_chat

    head = [{"role": "system", "content": system}] if system else []
    start = 0
    while True:
        msgs = head + turns[start:]
        ids = encode_chat(tokenizer, msgs)
        if len(ids) + max_new <= ctx or start >= len(turns) - 1:
            return msgs, ids, start
        start += 2 if start + 2 <= len(turns) - 1 else 1


class Session:
    def __init__(self, model, tokenizer, args, out=sys.stdout, err=sys.stderr):
        from model.generation import context_length, make_generator

        self.model, self.tok, self.args = model, tokenizer, args
        self.ctx = context_length(model, tokenizer)
        self.system = args.system
        self.turns: list[dict] = []
        self.out, self.err = out, err
        device = next(model.parameters()).device
        self.generator = make_generator(args.seed, device) if args.temperature > 0 else None
        self.cancel = threading.Event()

    def reset(self) -> None:
        self.turns = []

    def answer(self, text: str) -> str:
        """Stream the answer to ``text`` to ``out``; add both to the history."""
        from model.generation import DecodeState, stream_text

        turns = self.turns + [{"role": "user", "content": text}]
        msgs, ids, dropped = fit_history(self.tok, self.system, turns, self.ctx, self.args.max_new_tokens)
        if dropped:
            print(f"[history: dropped the {dropped} oldest message(s) to fit the context of {self.ctx} tokens]",
                  file=self.err, flush=True)
            turns = turns[dropped:]
        room = self.ctx - len(ids)
        if room < 1:
            print(f"[the message is {len(ids)} tokens; the context is {self.ctx}: not answered]", file=self.err,
                  flush=True)
            return ""
        self.cancel.clear()
        state = DecodeState(1)
        pieces = []
        try:
            for piece in stream_text(self.model, self.tok, ids, max_new_tokens=min(self.args.max_new_tokens, room),
                                     temperature=self.args.temperature, top_p=self.args.top_p,
                                     generator=self.generator, cancel=self.cancel, state=state):
                pieces.append(piece)
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:
            self.out.write(" [stopped]")
        self.out.write("\n")
        self.out.flush()
        reply = "".join(pieces)
        self.turns = turns + [{"role": "assistant", "content": reply}]
        return reply

    def command(self, line: str) -> bool:
        """Handle a /command; False means exit."""
        cmd, _, rest = line.partition(" ")
        if cmd in ("/exit", "/quit"):
            return False
        if cmd == "/reset":
            self.reset()
            print("[history cleared]", file=self.err, flush=True)
        elif cmd == "/system":
            self.system = rest.strip() or None
            self.reset()
            print(f"[system message {'set' if self.system else 'cleared'}; history cleared]", file=self.err,
                  flush=True)
        else:
            print(f"[unknown command {cmd}: /reset, /system <text>, /exit]", file=self.err, flush=True)
        return True


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    import torch
    from transformers.utils import logging as hf_logging

    from model import load

    hf_logging.disable_progress_bar()  # no "Loading weights" bar in the conversation
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        model, tok = load(args.model, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    session = Session(model, tok, args)
    if args.prompt is not None:
        session.answer(args.prompt)
        return 0
    tty = sys.stdin.isatty()
    kind = "MoE" if getattr(model.config, "use_moe", False) else "dense"
    print(f"[{type(model).__name__} ({kind}), context {session.ctx} tokens; /reset, /system <text>, /exit]",
          file=sys.stderr, flush=True)
    while True:
        try:
            line = input("you> ") if tty else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            break
        if not tty and line == "":
            break  # end of input
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            if not session.command(line.strip()):
                break
            continue
        if tty:
            sys.stdout.write("bot> ")
        session.answer(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
