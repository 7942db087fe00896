#!/usr/bin/env python3
"""Regenerates the model golden fixtures from an independent implementation.

Hugging Face transformers with CPU torch loads the same GGUF file (dequantized to FP32) and
produces, for tests/model/:
  tokens.json   token ids of a set of strings (unicode, whitespace runs, digits, code)
  logits.json   top-5 logits at several positions for three prompts (given as token ids)
  greedy.json   32-token greedy continuations of the same prompts

Usage (in a virtualenv with scripts/requirements-ref.txt; never needed by CI):
  python scripts/gen-model-fixtures.py [--model models/SmolLM2-135M-Instruct.Q4_1.gguf]
  python scripts/gen-model-fixtures.py --unicode > model/unicode_data.h
  python scripts/gen-model-fixtures.py --bench --threads 2 [--json]   torch speed for ferry-bench
"""
import argparse
import json
import os
import sys
import time
import unicodedata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "model")

STRINGS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading and   multiple    spaces  ",
    "tabs\tand\nnew\n\nlines\r\n end",
    "Numbers: 1234567890, 3.14159, -42 and 1e10",
    "I'm sure you'll see they've done it, won't they? She'd say 'hi'.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < n; i++) { x[i] += y[i] * 2; }",
    "Grüße aus München! Ça va? naïve café",
    "日本語のテキストと中文字符",
    "emoji: 🙂🚀 and 👩‍💻 combined",
    "Ελληνικά и русский текст",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "   ",
    "a",
    "١٢٣ Arabic digits and ½ fractions ²",
]

PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "def add(a, b):\n    return",
]


def fix_pre_tokenizer(tok, model_path):
    """transformers' GGUF import gives every byte-level BPE plain GPT-2 ByteLevel splitting.
    SmolLM2's own tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) first isolates every
    \\p{N} character; without that, " ½" or " ²" tokenize differently. Restore it."""
    from gguf import GGUFReader
    from tokenizers import pre_tokenizers

    field = GGUFReader(model_path).fields.get("tokenizer.ggml.pre")
    pre = bytes(field.parts[field.data[0]]).decode() if field is not None else ""
    if pre == "smollm":
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])


def load(model_path, threads):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    d, f = os.path.dirname(os.path.abspath(model_path)), os.path.basename(model_path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    fix_pre_tokenizer(tok, model_path)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    return tok, model


def gen_fixtures(args):
    import torch

    tok, model = load(args.model, args.threads)
    tokens = [{"text": s, "ids": tok.encode(s, add_special_tokens=False)} for s in STRINGS]
    logits_out, greedy_out = [], []
    for p in PROMPTS:
        ids = tok.encode(p, add_special_tokens=False)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        positions = sorted(set([0, len(ids) // 2, len(ids) - 1]))
        entries = []
        for pos in positions:
            v, i = torch.topk(logits[pos], 5)
            entries.append({"pos": pos, "ids": i.tolist(), "logits": [float(x) for x in v]})
        logits_out.append({"prompt": p, "ids": ids, "top5": entries})
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                 eos_token_id=None, pad_token_id=tok.eos_token_id)
        greedy_out.append({"prompt": p, "ids": ids, "continuation": out[0][len(ids):].tolist()})
    os.makedirs(OUT, exist_ok=True)
    meta = {"model": os.path.basename(args.model), "reference": "transformers+torch (CPU, FP32)"}
    for name, obj in (("tokens", tokens), ("logits", logits_out), ("greedy", greedy_out)):
        with open(os.path.join(OUT, name + ".json"), "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "items": obj}, f, ensure_ascii=False, indent=1)
            f.write("\n")
    print("wrote", OUT)


def gen_unicode():
    def ranges(pred):
        out, start = [], None
        for cp in range(0x110000):
            ok = pred(cp)
            if ok and start is None:
                start = cp
            if not ok and start is not None:
                out.append((start, cp - 1))
                start = None
        if start is not None:
            out.append((start, 0x10FFFF))
        return out

    def emit(name, rs):
        s = "static const uint32_t %s[][2] = {\n" % name
        line = "   "
        for r in rs:
            it = "{0x%x, 0x%x}" % r
            if len(line) + len(it) + 2 > 99:
                s += line + "\n"
                line = "   "
            line += " " + it + ","
        return s + line + "\n};\n"

    cat = lambda cps: (lambda c: unicodedata.category(chr(c)) in cps)
    print("/*\n * unicode_data.h: Unicode letter (L*) and number (N*) ranges for the "
          "pre-tokenizers,\n * generated by scripts/gen-model-fixtures.py --unicode from "
          "Python %s's unicodedata\n * (Unicode %s). Do not edit.\n */\n#include <stdint.h>\n"
          % (sys.version.split()[0], unicodedata.unidata_version))
    print(emit("k_letter_ranges", ranges(cat(("Lu", "Ll", "Lt", "Lm", "Lo")))))
    print(emit("k_number_ranges", ranges(cat(("Nd", "Nl", "No")))))


def bench(args):
    """Prefill and decode tokens/s of transformers+torch, as ferry-bench model measures."""
    import torch

    tok, model = load(args.model, args.threads)
    res = {"threads": args.threads, "torch": torch.__version__}
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    for n in args.prefill:
        ids = torch.randint(100, vocab, (1, n), generator=g)
        best = 0.0
        with torch.no_grad():
            model(ids[:, :16])  # warm-up
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                model(ids)
                best = max(best, n / (time.perf_counter() - t0))
        res["prefill_%d_tok_s" % n] = best
    for b in args.batch:
        ids = torch.randint(100, vocab, (b, args.context), generator=g)
        with torch.no_grad():
            out = model(ids, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(2):  # warm-up steps, as ferry-bench does one
                out = model(nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            best = 0.0
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    out = model(nxt, past_key_values=past, use_cache=True)
                    past = out.past_key_values
                    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                best = max(best, b * args.steps / (time.perf_counter() - t0))
        res["decode_b%d_tok_s" % b] = best
    print(json.dumps(res))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "models",
                                                    "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--unicode", action="store_true", help="print model/unicode_data.h")
    ap.add_argument("--bench", action="store_true", help="print torch speed as JSON")
    ap.add_argument("--prefill", type=int, nargs="*", default=[512, 2048])
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 16])
    ap.add_argument("--context", type=int, default=128, help="decode: prompt length first")
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs; the best is kept")
    args = ap.parse_args()
    if args.unicode:
        gen_unicode()
    elif args.bench:
        bench(args)
    else:
        gen_fixtures(args)


if __name__ == "__main__":
    main()
