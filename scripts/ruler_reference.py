"""Run NVIDIA/RULER's own generators and scorer to make the references `tests/test_ruler.py` compares ours with.

    python scripts/ruler_reference.py --ruler /path/to/RULER                 # samples, then RULER's scores
    python scripts/ruler_reference.py --ruler /path/to/RULER --scores-only   # only re-score the samples

Needs a checkout of NVIDIA/RULER (the commit in `longctx.eval.ruler.constants.RULER_COMMIT`) and, importable,
its generators' packages (`pip install wonderwords==3.0.1 nltk scipy tenacity pyyaml`, e.g. in a
`--target` folder put on PYTHONPATH). No network is used: the script writes RULER's inputs into a copy of
its `scripts/` folder (our shipped haystack prose as PaulGrahamEssays.json, the QA fixtures of
tests/data/ruler/ as squad.json / hotpotqa.json, a small stand-in english_words.json) and makes nltk's
`sent_tokenize` ours (Punkt needs a data download; see `longctx.eval.ruler.words.sent_tokenize`), then runs
RULER's `prepare.py` for every task and length with the shipped tokenizer (`--tokenizer_type hf`) and
collects the rows, each tagged with `task` and `max_seq_length` (reference.jsonl.gz). Then it writes seeded
predictions for those rows, per length, (a random share of each row's references, random case, control characters, some
empty) as RULER's prediction files and runs RULER's `eval/evaluate.py` on them (nemo's two manifest helpers
stubbed as the JSON-lines reader and writer they are); its summary.csv goes to reference_scores.json with the
predictions.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from longctx.eval.ruler.constants import TASK_NAMES

ROOT = Path(__file__).resolve().parents[1]
SITECUSTOMIZE = """
import nltk, nltk.tokenize
from longctx.eval.ruler.words import sent_tokenize
nltk.download = lambda *a, **k: True   # offline: prepare.py asks for punkt it does not need here
nltk.tokenize.sent_tokenize = sent_tokenize
"""
MANIFEST_UTILS = """
import json
def read_manifest(path):
    return [json.loads(x) for x in open(path) if x.strip()]
def write_manifest(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\\n" for r in rows)
"""


def predictions(rows: list[dict], seed: int = 0) -> list[str]:
    """Seeded answers of every kind RULER's scorer sees: some references, any case, control characters."""
    rng = random.Random(seed)  # NOTE: the test reads the stored predictions; this only has to be repeatable
    out = []
    for r in rows:
        k = rng.randint(0, len(r["outputs"]))
        words = [o.upper() if rng.random() < 0.5 else o for o in r["outputs"][:k]]
        out.append(rng.choice(["", "\x07 ", " "]) + " ".join(words) + rng.choice(["", " \n", "\t."]))
    return out


def rulers_scores(work: Path, rows: list[dict], length: int) -> dict:
    """RULER's evaluate.py on seeded predictions of the rows at one length: {"predictions", "scores", "nulls"}."""
    shim = work / "site" / "nemo" / "collections" / "asr" / "parts" / "utils"
    shim.mkdir(parents=True, exist_ok=True)
    for d in [shim, *shim.parents][:5]:
        (d / "__init__.py").touch()
    (shim / "manifest_utils.py").write_text(MANIFEST_UTILS)
    preds_dir = work / "pred" / str(length)
    preds_dir.mkdir(parents=True)
    chosen = [r for r in rows if r["max_seq_length"] == length]
    preds = predictions(chosen, seed=length)
    by_task: dict[str, list[dict]] = {}
    for r, p in zip(chosen, preds):
        by_task.setdefault(r["task"], []).append({"index": r["index"], "pred": p, "input": r["input"],
                                                  "outputs": r["outputs"], "others": {}, "truncation": -1,
                                                  "length": r["length"]})
    for task, prs in by_task.items():
        (preds_dir / f"{task}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in prs))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(work / "site"), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "evaluate.py", "--data_dir", str(preds_dir), "--benchmark", "synthetic"],
                   cwd=work / "scripts" / "eval", env=env, check=True, capture_output=True)
    table = list(csv.reader((preds_dir / "summary.csv").read_text().splitlines()))
    tasks, scores, nulls = table[1][1:], table[2][1:], table[3][1:]
    return {"length": length, "predictions": preds, "scores": dict(zip(tasks, map(float, scores))),
            "nulls": dict(zip(tasks, nulls))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ruler", required=True, help="checkout of NVIDIA/RULER")
    p.add_argument("--output", default=str(ROOT / "tests" / "data" / "ruler" / "reference.jsonl.gz"))
    p.add_argument("--scores-only", action="store_true", help="keep --output's samples, only run RULER's scorer")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096],
                   help="RULER's essay tasks need >= ~1.5K tokens on the shipped tokenizer: below, its first "
                   "haystack step of 500 words never fits and RULER retries forever")
    p.add_argument("--num-samples", type=int, default=2)
    p.add_argument("--tokenizer", default=str(ROOT / "platform" / "longctx" / "assets" / "tiny-tokenizer"))
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ruler-ref-"))
    try:
        shutil.copytree(Path(args.ruler) / "scripts", work / "scripts")
        js = work / "scripts" / "data" / "synthetic" / "json"
        essay = (ROOT / "platform" / "longctx" / "assets" / "haystack" / "default.txt").read_text()
        (js / "PaulGrahamEssays.json").write_text(json.dumps({"text": essay}))
        for name in ("squad.json", "hotpotqa.json"):
            shutil.copy(ROOT / "tests" / "data" / "ruler" / name, js / name)
        (js / "english_words.json").write_text(json.dumps({str(i): f"word{i}" for i in range(100)}))
        (work / "site").mkdir()
        (work / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(work / "site"), os.environ.get("PYTHONPATH", "")]))
        rows = []
        for length in [] if args.scores_only else args.lengths:
            for task in TASK_NAMES:
                out = work / "out" / str(length)
                subprocess.run([sys.executable, "prepare.py", "--save_dir", str(out), "--benchmark", "synthetic",
                                "--task", task, "--tokenizer_path", args.tokenizer, "--tokenizer_type", "hf",
                                "--max_seq_length", str(length), "--model_template_type", "base",
                                "--num_samples", str(args.num_samples)],
                               cwd=work / "scripts" / "data", env=env, check=True, capture_output=True)
                lines = (out / task / "validation.jsonl").read_text().splitlines()
                if len(lines) != args.num_samples:
                    raise SystemExit(f"RULER wrote {len(lines)} rows for {task} at {length}")
                rows += [{"task": task, "max_seq_length": length, **json.loads(x)} for x in lines]
        if args.scores_only:
            with gzip.open(args.output, "rt") as f:
                rows = [json.loads(x) for x in f]
        else:
            with gzip.GzipFile(args.output, "wb", mtime=0) as f:
                f.write("".join(json.dumps(r) + "\n" for r in rows).encode())
            print(f"wrote {len(rows)} RULER rows to {args.output}")
        scores = [rulers_scores(work, rows, n) for n in sorted({r["max_seq_length"] for r in rows})]
        out = Path(args.output).with_name("reference_scores.json")
        out.write_text(json.dumps(scores, indent=1) + "\n")
        print(f"wrote RULER's scores of {sum(len(x['predictions']) for x in scores)} predictions to {out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
