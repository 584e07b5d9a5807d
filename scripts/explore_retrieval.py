"""Exploration (not shipped): can the shipped-shape tiny Llama learn passkey retrieval at 256 tokens?

Trains a fresh model of the shipped shape on a mix of shipped-corpus windows and synthetic retrieval rows,
and measures the real passkey eval (build_passkey_prompts + run_passkey) at 256 tokens every --eval-every steps.

    python scripts/explore_retrieval.py --name r1 --synth 0.5 --seconds 480
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "platform"))

import build_sample_assets as B  # noqa: E402

# ---------------------------------------------------------------------------------------------
# synthetic retrieval rows (no eval filler, no "pass key" wording)
# ---------------------------------------------------------------------------------------------
KINDS = ["access code", "door code", "secret number", "ticket number", "lock code", "vault code", "pin",
         "magic number", "serial number", "room number", "order number", "badge id", "token", "cipher"]
FACT_T = [
    "The {k} is {v}.",
    "The {k} is {v}. Keep it in mind. {v} is the {k}.",
    "Note: the {k} is {v}.",
    "Remember this: the {k} is {v}.",
    "{V} is the {k}; the {k} is {v}.",
]
QUERY_T = [
    "What is the {k}? The {k} is",
    "Question: what was the {k}? Answer: the {k} is",
    "Recall the {k}. The {k} is",
    "So, the {k} is",
]


def rand_key(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


class Synth:
    def __init__(self, tok, windows, seq_len: int, rng: random.Random, args):
        self.tok, self.windows, self.L, self.rng, self.a = tok, windows, seq_len, rng, args
        self.enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]

    def filler(self, n: int) -> list[int]:
        w = self.windows[self.rng.randrange(len(self.windows))].tolist()
        s = self.rng.randrange(0, max(1, len(w) - n))
        return w[s:s + n]

    def kv_row(self):
        """Passkey-like document: several facts (named kinds) hidden in corpus filler, queries at the end
        (and sometimes mid-row). Loss only on the answer tokens (and the rest of the query line)."""
        rng, L = self.rng, self.L
        n_facts = rng.randint(1, max(1, min(self.a.max_facts, L // 48)))
        kinds = rng.sample(KINDS, n_facts)
        vals = [rand_key(rng) for _ in kinds]
        facts = []
        for k, v in zip(kinds, vals):
            t = rng.choice(FACT_T)
            facts.append(self.enc(" " + t.format(k=k, v=v, V=v)))
        n_q = rng.randint(1, n_facts) if self.a.multi_query else 1
        q_idx = rng.sample(range(n_facts), n_q)
        queries = []
        for i in q_idx:
            t = rng.choice(QUERY_T)
            q = self.enc(" " + t.format(k=kinds[i]))
            ans = self.enc(" " + vals[i])
            queries.append((q, ans))
        used = sum(len(f) for f in facts) + sum(len(q) + len(a) + 1 for q, a in queries)
        free = L - used
        if free < 4:
            return None
        # split filler: before/between facts, then before queries
        cuts = sorted(rng.randint(0, free) for _ in range(n_facts + 1))
        sizes = [cuts[0]] + [cuts[i + 1] - cuts[i] for i in range(n_facts)] + [free - cuts[-1]]
        ids, lab = [], []
        for i, f in enumerate(facts):
            fl = self.filler(sizes[i])
            ids += fl + f
            lab += [-100] * (len(fl) + len(f))
        fl = self.filler(sizes[n_facts])
        ids += fl
        lab += [-100] * len(fl)
        dot = self.enc(".")
        for q, a in queries:
            ids += q + a + dot
            lab += [-100] * len(q) + a + (dot if self.a.answer_dot else [-100] * len(dot))
        tail = self.filler(sizes[-1])
        ids += tail
        lab += [-100] * len(tail)
        ids, lab = ids[:L], lab[:L]
        while len(ids) < L:
            ids.append(self.tok.eos_token_id)
            lab.append(-100)
        return ids, lab

    def repeat_row(self):
        """Corpus window where spans are copied later (induction): loss everywhere."""
        rng, L = self.rng, self.L
        w = self.windows[rng.randrange(len(self.windows))].tolist()
        ids = []
        while len(ids) < L:
            n = rng.randint(8, 40)
            if len(ids) > 20 and rng.random() < 0.5:
                s = rng.randrange(0, len(ids) - 8)
                span = ids[s:s + n]
            else:
                s = rng.randrange(0, len(w) - n)
                span = w[s:s + n]
            ids += span
        ids = ids[:L]
        return ids, list(ids)

    def copy_row(self):
        """Spans of corpus text each followed by an exact copy; loss on the copies only."""
        rng, L = self.rng, self.L
        ids, lab = [], []
        while len(ids) < L:
            span = self.filler(rng.randint(16, 96))
            ids += span + span
            lab += [-100] * len(span) + span
        return ids[:L], lab[:L]

    def rcopy_row(self):
        """Spans of uniformly random tokens, a random gap, then an exact copy; loss on the copies only.
        Span and gap lengths vary, so the copy is not at a fixed offset (no positional shortcut)."""
        rng, L = self.rng, self.L
        ids, lab = [], []
        while len(ids) < L:
            span = [rng.randrange(3, len(self.tok)) for _ in range(rng.randint(4, max(5, L // 3)))]
            gap = [rng.randrange(3, len(self.tok)) for _ in range(rng.randint(0, 8))]
            ids += span + gap + span
            lab += [-100] * (len(span) + len(gap)) + span
        return ids[:L], lab[:L]

    def mqar_row(self):
        """Zoology-style multi-query associative recall with word keys and number values."""
        rng, L = self.rng, self.L
        n = self.a.mqar_pairs
        words = rng.sample(self.a.key_words, n)
        vals = [rand_key(rng) for _ in range(n)]
        ids, lab = [], []
        for k, v in zip(words, vals):
            s = self.enc(f" {k} {v}")
            ids += s
            lab += [-100] * len(s)
        order = list(range(n))
        rng.shuffle(order)
        for i in order:
            kk = self.enc(f" {words[i]}")
            vv = self.enc(f" {vals[i]}")
            if len(ids) + len(kk) + len(vv) > L:
                break
            ids += kk + vv
            lab += [-100] * len(kk) + vv
        while len(ids) < L:
            ids.append(self.tok.eos_token_id)
            lab.append(-100)
        return ids[:L], lab[:L]

    def row(self, kind: str, length: int | None = None):
        if length is not None:
            self.L = length
        while True:
            r = getattr(self, f"{kind}_row")()
            if r is not None:
                return r


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="run")
    ap.add_argument("--seconds", type=float, default=480)
    ap.add_argument("--steps", type=int, default=None, help="planned steps (LR horizon); default from seconds")
    ap.add_argument("--mix", default="kv:0.5", help="comma list kind:share (kv, repeat, mqar); rest = corpus")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--max-facts", type=int, default=4)
    ap.add_argument("--multi-query", action="store_true")
    ap.add_argument("--mqar-pairs", type=int, default=24)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-row-mean", dest="row_mean", action="store_false")
    ap.add_argument("--answer-dot", action="store_true",
                    help="also supervise the '.' after each answer (without it greedy answers run on: '60494049404')")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--v2", action="store_true", help="separate synthetic batch with a length schedule")
    ap.add_argument("--syn-sched", default="64:0.3,128:0.6,256:1.0", help="len:until_frac,...")
    ap.add_argument("--syn-tokens", type=int, default=2048, help="synthetic tokens per step (v2)")
    ap.add_argument("--corpus-rows", type=int, default=8, help="corpus rows of 256 per step (v2)")
    ap.add_argument("--syn-weight", type=float, default=0.5, help="loss weight of the synthetic rows (v2)")
    ap.add_argument("--out", default="/tmp/explore")
    args = ap.parse_args()

    import numpy as np
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from longctx.eval.passkey import build_passkey_prompts, run_passkey

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(str(B.TOKENIZER_DIR))
    docs = B.load_train_docs()
    stream = B.packed_stream(tok, docs, random.Random("1234/pack"))
    L = B.BASE_SEQ_LEN
    n_win = len(stream) // L
    windows = torch.from_numpy(stream[: n_win * L].reshape(n_win, L).copy())
    held = B.read_jsonl_gz(B.CORPUS_DIR / "heldout.jsonl.gz")
    held_rows = torch.tensor([x[:L] for x in tok([d["text"] for d in held[:24]])["input_ids"]])
    vocab_words = [w for w, i in tok.get_vocab().items() if w.startswith("Ġ") and w[1:].isalpha() and len(w) > 3]
    vocab_words = sorted(w[1:] for w in vocab_words if w[1:].lower() not in {"pass", "key", "grass", "green", "sky",
                                                                           "blue", "sun", "yellow", "here", "there"})
    args.key_words = vocab_words
    rng = random.Random(args.seed)
    syn = Synth(tok, windows, L, rng, args)
    mix = []
    for part in args.mix.split(","):
        if part:
            k, s = part.split(":")
            mix.append((k, float(s)))
    # held-out synthetic rows for accuracy
    hrng = random.Random(999)
    hsyn = Synth(tok, windows, L, hrng, args)
    held_syn = {k: [hsyn.row(k) for _ in range(32)] for k, _ in mix if k in ("kv", "mqar", "copy", "rcopy")}

    model = LlamaForCausalLM(B.model_config(len(tok), tok.eos_token_id))
    decay, no_decay = [], []
    for n_, p in model.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    prompts = build_passkey_prompts(tok, lengths=[L], depths=[0.1, 0.3, 0.5, 0.7, 0.9], trials=4, seed=0)

    def evaluate(step):
        model.eval()
        with torch.no_grad():
            pk = run_passkey(model, tok, prompts, batch_size=20)
            out = {"step": step, "passkey": pk["overall"], "key_nll": pk["key_nll_by_length"][str(L)],
                   "example": pk["examples"][0]["prediction"]}
            logits = model(input_ids=held_rows, use_cache=False).logits
            out["heldout_nll"] = float(torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), held_rows[:, 1:].reshape(-1)))
            for k, rows in held_syn.items():
                x = torch.tensor([r[0] for r in rows])
                y = torch.tensor([r[1] for r in rows])
                pred = model(input_ids=x, use_cache=False).logits[:, :-1].argmax(-1)
                m = y[:, 1:] != -100
                out[f"{k}_tok_acc"] = float((pred[m] == y[:, 1:][m]).float().mean())
        model.train()
        return out

    t0 = time.time()
    total = args.steps
    step, losses, curve = 0, [], []
    g = torch.Generator().manual_seed(args.seed)
    model.train()
    log = open(Path(args.out + f"-{args.name}.jsonl"), "w")
    print(json.dumps({k: v for k, v in vars(args).items() if k != "key_words"}), file=log, flush=True)
    while True:
        if total is None and step == 10:
            total = int(args.seconds / ((time.time() - t0) / 10))
            print(f"[{args.name}] planned steps {total}", flush=True)
        if total is not None and step >= total:
            break
        horizon = total or 10**9
        if step < args.warmup:
            lr = args.lr * (step + 1) / args.warmup
        else:
            frac = min(1.0, (step - args.warmup) / max(1, horizon - args.warmup))
            lr = args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for grp in opt.param_groups:
            grp["lr"] = lr
        if args.v2:
            frac_done = step / max(1, horizon)
            S = next(int(a) for a, b in (x.split(":") for x in args.syn_sched.split(",")) if frac_done < float(b))
            xs, ys = [], []
            for _ in range(max(1, args.syn_tokens // S)):
                r, acc, kind = rng.random(), 0.0, mix[-1][0]
                for k, sh in mix:
                    acc += sh
                    if r < acc:
                        kind = k
                        break
                a, b = syn.row(kind, S)
                xs.append(a)
                ys.append(b)
            def row_losses(x, y):
                logits = model(input_ids=x, use_cache=False).logits[:, :-1]
                tgt = y[:, 1:]
                nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1),
                                                        ignore_index=-100, reduction="none").view(tgt.shape)
                m = (tgt != -100).float()
                return (nll * m).sum(1) / m.sum(1).clamp(min=1)
            ls = row_losses(torch.tensor(xs), torch.tensor(ys)).mean()
            if args.corpus_rows:
                cw = windows[torch.randint(n_win, (args.corpus_rows,), generator=g)]
                lc = row_losses(cw, cw).mean()
                loss = args.syn_weight * ls + (1 - args.syn_weight) * lc
            else:
                loss = ls
        else:
            xs, ys = [], []
            for _ in range(args.batch):
                r, kind = rng.random(), None
                acc = 0.0
                for k, s in mix:
                    acc += s
                    if r < acc:
                        kind = k
                        break
                if kind is None:
                    w = windows[torch.randint(n_win, (1,), generator=g)].squeeze(0).tolist()
                    xs.append(w)
                    ys.append(w)
                else:
                    a, b = syn.row(kind)
                    xs.append(a)
                    ys.append(b)
            x = torch.tensor(xs)
            y = torch.tensor(ys)
            logits = model(input_ids=x, use_cache=False).logits[:, :-1]
            tgt = y[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1),
                                                    ignore_index=-100, reduction="none").view(tgt.shape)
            m = (tgt != -100).float()
            if args.row_mean:  # every row weighs the same, however few tokens it supervises
                loss = ((nll * m).sum(1) / m.sum(1).clamp(min=1)).mean()
            else:
                loss = (nll * m).sum() / m.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % args.eval_every == 0 or step == total:
            ev = evaluate(step)
            ev["loss50"] = float(np.mean(losses[-50:]))
            ev["elapsed"] = round(time.time() - t0)
            curve.append(ev)
            print(f"[{args.name}] " + json.dumps(ev), flush=True)
            print(json.dumps(ev), file=log, flush=True)
    if args.out:
        model.save_pretrained(args.out + f"-{args.name}-model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
