"""Run NVIDIA/RULER's own generators to make the reference samples `tests/test_ruler.py` compares ours with.

    python scripts/ruler_reference.py --ruler /path/to/RULER --output tests/data/ruler/reference.jsonl.gz

Needs a checkout of NVIDIA/RULER (the commit in `longctx.eval.ruler.constants.RULER_COMMIT`) and, importable,
its generators' packages (`pip install wonderwords==3.0.1 nltk scipy tenacity pyyaml`, e.g. in a
`--target` folder put on PYTHONPATH). No network is used: the script writes RULER's inputs into a copy of
its `scripts/` folder (our shipped haystack prose as PaulGrahamEssays.json, the QA fixtures of
tests/data/ruler/ as squad.json / hotpotqa.json, a small stand-in english_words.json) and makes nltk's
`sent_tokenize` ours (Punkt needs a data download; see `longctx.eval.ruler.words.sent_tokenize`), then runs
RULER's `prepare.py` for every task and length with the shipped tokenizer (`--tokenizer_type hf`) and
collects the rows, each tagged with `task` and `max_seq_length`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ruler", required=True, help="checkout of NVIDIA/RULER")
    p.add_argument("--output", default=str(ROOT / "tests" / "data" / "ruler" / "reference.jsonl.gz"))
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096],
                   help="RULER's essay tasks need >= ~1.5K tokens on the shipped tokenizer: below, its first
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
        for length in args.lengths:
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
        with gzip.GzipFile(args.output, "wb", mtime=0) as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows).encode())
        print(f"wrote {len(rows)} RULER rows to {args.output}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
