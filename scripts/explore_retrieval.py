"""Exploration of the base build's retrieval phase (phase 2, `build_sample_assets.py --only retrieval`).

Loads a phase-1 base (--init: a copy of tiny-llama/ as written by `--only model`, before `--only retrieval`; the
shipped tiny-llama/ already had its retrieval phase), runs `train_retrieval_phase` with recipe overrides, and
every --eval-every steps measures passkey at 256 tokens on the real eval and on the "locker" template, plus
held-out NLL at positions 0-255.

    python scripts/explore_retrieval.py --init DIR --name r1 --set steps=600 peak_lr=2e-3 synthetic_weight=0.5

Writes `<--out>/<name>.jsonl` (the recipe, then one line per evaluation) and `<--out>/<name>-model/` (an HF
folder with the tokenizer files). Needs longctx installed (`pip install -e .`), like the build script.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the build script next to this one

import build_sample_assets as B  # noqa: E402
from longctx.train.checkpoint import save_hf_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="run")
    ap.add_argument("--init", required=True, help="phase-1 base model folder")
    ap.add_argument("--set", nargs="*", default=[], help="recipe overrides key=value (JSON values)")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/explore-retrieval", help="folder for the log and the model")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    recipe = dict(B.RETRIEVAL_RECIPE)
    for kv in args.set:
        k, v = kv.split("=", 1)
        recipe[k] = json.loads(v)
    tok = AutoTokenizer.from_pretrained(str(B.TOKENIZER_DIR))
    docs = B.load_train_docs()
    windows, _ = B.training_windows(tok, docs, args.seed)
    L, n_win = B.BASE_SEQ_LEN, len(windows)
    words = B.retrieval_words(docs)
    held = B.read_jsonl_gz(B.CORPUS_DIR / "heldout.jsonl.gz")
    held_rows = torch.tensor([x[:L] for x in tok([d["text"] for d in held[:24]])["input_ids"]])
    model = LlamaForCausalLM.from_pretrained(args.init)
    g = torch.Generator().manual_seed(args.seed)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = open(out_dir / f"{args.name}.jsonl", "w")
    print(json.dumps({"recipe": recipe, "init": args.init, "words": len(words)}), file=log, flush=True)

    def evaluate(step, info):
        if step % args.eval_every and step != recipe["steps"]:
            return
        model.eval()
        with torch.no_grad():
            out = {**info, **B.retrieval_checks(model, tok, trials=args.trials)}
            logits = model(input_ids=held_rows, use_cache=False).logits
            out["heldout_nll_0_255"] = round(float(torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), held_rows[:, 1:].reshape(-1))), 4)
        model.train()
        print(f"[{args.name}] " + json.dumps(out), flush=True)
        print(json.dumps(out), file=log, flush=True)

    evaluate(0, {"step": 0})
    t0 = time.time()
    summary = B.train_retrieval_phase(model, tok, windows, words, args.seed, recipe,
                                      lambda: windows[torch.randint(n_win, (recipe["corpus_rows"],), generator=g)],
                                      on_step=evaluate)
    print(json.dumps({"summary": summary, "wall": round(time.time() - t0)}), file=log, flush=True)
    save_hf_model(model, model.state_dict(), str(out_dir / f"{args.name}-model"), [str(B.TOKENIZER_DIR)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
