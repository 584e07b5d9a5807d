"""python scripts/build_sample_assets.py [--only corpus|tokenizer|model|retrieval] [--seed 1234] [--base-train-seconds 420]

Build the sample assets shipped under ``platform/longctx/assets/``:

* ``corpus/<source>.jsonl.gz``  -- multi-source training corpus (``code``, ``c``, ``records``),
  records ``{"id", "source", "text"}``; gzip with mtime=0 so the bytes depend only on the seed.
* ``corpus/heldout.jsonl.gz``   -- long documents (>= 1200 tokens, mixed sources) disjoint from the
  training files, for perplexity-by-position evaluation at 1024 tokens.
* ``corpus/LICENSE-PSF.txt``    -- license of the CPython-derived sources (``code`` and ``c``).
* ``tiny-tokenizer/``           -- byte-level BPE (Hugging Face fast tokenizer), ChatML template.
* ``tiny-llama/``               -- ~1M-parameter ``LlamaForCausalLM`` pretrained at 256 tokens
  (rope_theta 10000), plus the tokenizer files, i.e. a complete HF model directory. Two phases: the
  ``model`` stage pretrains on the corpus; the ``retrieval`` stage continues on the corpus mixed with
  synthetic retrieval rows (RETRIEVAL_RECIPE) so that the base can do passkey retrieval at 256 tokens.
* ``README.md``                 -- the section between the GENERATED markers is rewritten here.

Stages run in order corpus -> tokenizer -> model -> retrieval; ``--only`` runs one stage (later stages read
the outputs of earlier ones from disk; ``--only retrieval`` runs once on a phase-1 base).  The corpus and the tokenizer are byte-for-byte reproducible from
``--seed``.  The base model is trained for a number of optimizer steps derived from
``--base-train-seconds`` by timing the first steps on this machine (the LR schedule is defined in
steps); pass ``--base-train-steps N`` to reproduce an exact run (same N, seed and thread count give
the same weights on the same CPU/torch build).

The training pieces are the library's: packing is `longctx.data.pack.ConcatPacker` (concatenate, cut every
256 tokens), the optimizer `longctx.train.optim.adamw`, the schedule `longctx.train.schedule.warmup_cosine_lr`, the
model folder `longctx.train.checkpoint.save_hf_model`. They replaced the script's own copies, which gave the same
bytes: the same windows, the same model.safetensors after phase 1 and phase 2 steps (checked on short builds; the
LR values differ from the old formula in the last bit of a float64 on some steps, never in the float32 scalars
AdamW applies), so the shipped weights are those of the build as described in the assets README.

One file of ~1,200 lines on purpose: it is the recipe of the shipped bytes, run as one program and not imported by
the package; the record generators and the retrieval rows sit next to the stages that use them so that
`build_info.json` and the assets README point at one place.

Sources (from a fresh clone: every stage after ``corpus`` reads the shipped corpus; the ``corpus`` stage needs
CPython 3.11.7, the version the shipped ``code``/``c`` files come from):
* ``code``    Python stdlib of CPython 3.11.7 (PSF license): the running interpreter's when it is 3.11.7, else
              the installation given with ``--cpython PREFIX`` (``PREFIX/lib/python3.11``); one record per
              file, test suites / generated tables / huge data modules excluded.
* ``c``       C headers of the same CPython (``PREFIX/include/python3.11``, PSF license), one record per header.
* ``records`` synthetic, generated from the seed: registries, ledgers, project logs and parts
              catalogs whose made-up entities (ids, names with numbers, hex keys, addresses) are
              defined early and referred back to much later, so long context helps prediction.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import math
import os
import platform
import random
import re
import shutil
import sys
import sysconfig
import time
from pathlib import Path

from longctx import storage
from longctx.data.pack import ConcatPacker, Segment
from longctx.train.checkpoint import save_hf_model
from longctx.train.optim import adamw
from longctx.train.schedule import warmup_cosine_lr

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "platform" / "longctx" / "assets"
CORPUS_DIR = ASSETS / "corpus"
TOKENIZER_DIR = ASSETS / "tiny-tokenizer"
MODEL_DIR = ASSETS / "tiny-llama"
README = ASSETS / "README.md"
BUILD_INFO = ASSETS / "build_info.json"

CPYTHON_VERSION = "3.11.7"  # the CPython whose stdlib and headers the shipped `code` and `c` files are

TRAIN_SOURCES = ("code", "c", "records")
HELDOUT = "heldout"

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB_SIZE = 2048

BASE_SEQ_LEN = 256
HELDOUT_MIN_TOKENS = 1200
EVAL_LEN = 1024

# size budgets (characters of raw text)
CODE_TRAIN_CHARS = 4_600_000
CODE_MAX_FILE_CHARS = 150_000
CODE_HELDOUT_DOCS = 24
C_HELDOUT_DOCS = 10
RECORDS_TRAIN_CHARS = 4_000_000
RECORDS_HELDOUT_DOCS = 26


# --------------------------------------------------------------------------------------------
# small IO helpers (atomic writes)
# --------------------------------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[build_sample_assets] {msg}", flush=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    storage.write_bytes(str(path), data)  # temp file + rename
    os.chmod(path, 0o644)  # shipped files are readable by everyone (the temp file was 0600)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def jsonl_gz_bytes(records: list[dict]) -> bytes:
    buf = io.BytesIO()
    # filename="" and mtime=0: the gzip header carries nothing machine- or time-dependent
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        for r in records:
            gz.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
    return buf.getvalue()


def write_jsonl_gz(path: Path, records: list[dict]) -> None:
    atomic_write_bytes(path, jsonl_gz_bytes(records))


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Swap a fully written temporary directory into place."""
    old = final_dir.with_name(final_dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old.exists():
        shutil.rmtree(old)


def fresh_tmp_dir(final_dir: Path) -> Path:
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def load_build_info() -> dict:
    if BUILD_INFO.exists():
        return json.loads(BUILD_INFO.read_text())
    return {}


def save_build_info(info: dict) -> None:
    atomic_write_text(BUILD_INFO, json.dumps(info, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------
# corpus: CPython sources
# --------------------------------------------------------------------------------------------

_CODE_EXCLUDE_DIRS = {
    "test", "tests", "idle_test", "site-packages", "__pycache__", "pydoc_data", "encodings", "lib-dynload",
    "ensurepip",
}
_CODE_EXCLUDE_DIR = re.compile(r"^config-3\.\d+-")  # the build's Makefile/config folder (config-3.11-<platform>)


def cpython_dirs(prefix: str | None) -> tuple[Path, Path]:
    """(stdlib folder, include folder) of CPython CPYTHON_VERSION: under `prefix` (an installation, e.g.
    `pyenv install 3.11.7`), else the running interpreter's; refused when the headers say another version (the
    corpus would not be the shipped one)."""
    if prefix is None:
        paths = sysconfig.get_paths()
        lib, include, where = Path(paths["stdlib"]), Path(paths["include"]), f"this Python ({sys.executable})"
    else:
        lib, include, where = Path(prefix) / "lib" / "python3.11", Path(prefix) / "include" / "python3.11", prefix
    found = re.search(r'#define\s+PY_VERSION\s+"([^"]+)"', (include / "patchlevel.h").read_text()) if (
        include / "patchlevel.h").is_file() else None
    version = found.group(1) if found else None
    if version != CPYTHON_VERSION or not lib.is_dir():
        raise SystemExit(f"corpus stage: the code and c sources come from CPython {CPYTHON_VERSION}; {where} has "
                         f"{version or 'no CPython headers'} ({lib}, {include}). Run with Python {CPYTHON_VERSION} or "
                         f"pass --cpython PREFIX of such an installation (platform {platform.python_version()} here)")
    return lib, include
_CODE_EXCLUDE_FILES = re.compile(r"^(_sysconfigdata.*|__phello__.*|__hello__\.py|antigravity\.py|this\.py)$")


def _read_source(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    text = text.replace("\r\n", "\n")
    if len(text.strip()) < 40:
        return None
    return text


def _python_files(lib: Path) -> list[tuple[str, str]]:
    out = []
    for p in sorted(lib.rglob("*.py")):
        rel = p.relative_to(lib)
        if any(part in _CODE_EXCLUDE_DIRS or _CODE_EXCLUDE_DIR.match(part) for part in rel.parts[:-1]):
            continue
        if _CODE_EXCLUDE_FILES.match(rel.name) or rel.name.startswith("test_"):
            continue
        text = _read_source(p)
        if text is None or len(text) > CODE_MAX_FILE_CHARS:
            continue
        out.append((rel.as_posix(), text))
    return out


def _c_headers(include: Path) -> list[tuple[str, str]]:
    out = []
    for p in sorted(include.rglob("*.h")):
        rel = p.relative_to(include).as_posix()
        if rel == "pyconfig.h":  # configure output of this particular machine
            continue
        text = _read_source(p)
        if text is not None:
            out.append((rel, text))
    return out


def build_code_sources(rng: random.Random, lib: Path, include: Path) -> tuple[list[dict], list[dict], list[dict],
                                                                           list[dict]]:
    py = _python_files(lib)
    # heldout: long files only (>= 12k chars ~ 3k+ tokens), chosen at random
    long_py = [x for x in py if 12_000 <= len(x[1]) <= 80_000]
    held_py = set(n for n, _ in rng.sample(long_py, CODE_HELDOUT_DOCS))
    rest = [x for x in py if x[0] not in held_py]
    # deterministic subsample of the rest down to the size budget, keeping natural length mix
    order = list(range(len(rest)))
    rng.shuffle(order)
    chosen, total = [], 0
    for i in order:
        n, t = rest[i]
        if total + len(t) > CODE_TRAIN_CHARS:
            continue
        chosen.append(i)
        total += len(t)
    chosen.sort()
    code_train = [{"id": f"code/{rest[i][0]}", "source": "code", "text": rest[i][1]} for i in chosen]
    code_held = [{"id": f"code/{n}", "source": "code", "text": t} for n, t in py if n in held_py]

    hs = _c_headers(include)
    long_h = [x for x in hs if len(x[1]) >= 9_000]
    held_h = set(n for n, _ in rng.sample(long_h, C_HELDOUT_DOCS))
    c_train = [{"id": f"c/{n}", "source": "c", "text": t} for n, t in hs if n not in held_h]
    c_held = [{"id": f"c/{n}", "source": "c", "text": t} for n, t in hs if n in held_h]
    return code_train, code_held, c_train, c_held


# --------------------------------------------------------------------------------------------
# corpus: synthetic records with long-range structure
# --------------------------------------------------------------------------------------------

_SYL = (
    "ka vel mor tri sen dal or bri lu ne ast qui ren tho zal fen gri mo pha sol ul yr ek in "
    "bar cas dro el fai gus hal ish jo kem lor mav nis ov pel rho sav tam ur vos wen xi yal zo "
    "an bel cor dun ev fin gal hem ir jun kor lin mar nor os pim rud sil tor um var wil"
).split()
_WORDS = (
    "shard index cache ledger vault queue bucket relay beacon anchor harbor lattice quarry "
    "filter buffer stream socket kernel parser planner router scheduler mirror archive snapshot "
    "replica tablet cursor bridge gateway monitor sensor valve pump turbine rotor spindle gasket "
    "bearing coupling flange bracket hinge latch piston nozzle manifold sleeve spring washer "
    "north south east west upper lower inner outer primary secondary cold warm hot "
    "migrate rebuild compact verify rotate audit patch drain restore split merge resize "
    "format schema policy quota budget window region zone tier lane rack cell block frame"
).split()
_ADJ = "amber brisk cobalt dusky ember frosty gilded hollow ivory jagged keen lunar misty noble ochre".split()
_REGIONS = ["north", "south", "east", "west", "central", "polar", "coastal", "upland"]
_VERBS_SVC = ["restarted", "rotated the key of", "drained", "patched", "scaled up", "scaled down",
              "audited", "moved traffic off", "pinned", "health-checked", "rolled back", "promoted"]
_STATUS = ["opened", "blocked", "unblocked", "reviewed", "closed", "reopened", "reassigned", "split"]
_UNITS = ["pcs", "kg", "m", "boxes", "rolls", "sets"]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _pname(rng: random.Random) -> str:
    first = _cap("".join(rng.choice(_SYL) for _ in range(rng.randint(1, 2))))
    last = _cap("".join(rng.choice(_SYL) for _ in range(rng.randint(2, 3))))
    return f"{first} {last}-{rng.randint(2, 99)}"


def _hex(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(n))


def _ident(rng: random.Random) -> str:
    return "".join(rng.choice(_SYL) for _ in range(rng.randint(2, 3)))


def _date(rng: random.Random) -> tuple[int, int, int]:
    return rng.randint(2024, 2039), rng.randint(1, 12), rng.randint(1, 28)


def _pick(rng: random.Random, n: int, recent: list[int]) -> int:
    """Mostly uniform over all entities (long gaps), sometimes a recently used one (short gaps)."""
    if recent and rng.random() < 0.3:
        return rng.choice(recent[-4:])
    return rng.randrange(n)


def _title(rng: random.Random) -> str:
    return " ".join([rng.choice(_WORDS) for _ in range(rng.randint(2, 4))])


def _drive(rng: random.Random, n_ent: int, n_events: int, header: list[str], make, define, event,
           summary_title: str | None, summary) -> str:
    """Shared document skeleton: a header defines part of the entities, the log introduces the rest
    progressively ("define" lines mid-log) and refers back to any entity defined so far; long logs
    often end with a summary listing every entity with its current attributes."""
    ents = [make() for _ in range(n_ent)]
    n_def = max(1, min(n_ent, round(n_ent * rng.uniform(0.3, 0.7))))
    lines = list(header)
    lines += [define(e, None) for e in ents[:n_def]]
    lines += ["", "log:"]
    recent: list[int] = []
    for k in range(n_events):
        left = n_events - k
        if n_def < n_ent and rng.random() < min(0.6, 1.3 * (n_ent - n_def) / left):
            lines.append(define(ents[n_def], k))
            recent.append(n_def)
            n_def += 1
        i = _pick(rng, n_def, recent)
        recent.append(i)
        j = _pick(rng, n_def, recent) if n_def > 1 else i
        while j == i and n_def > 1:
            j = rng.randrange(n_def)
        lines.append(event(k, ents[i], ents[j]))
    if summary_title and n_events > 20 and rng.random() < 0.6:
        lines += ["", summary_title]
        lines += [summary(e) for e in ents[:n_def] if rng.random() < 0.8]
    return "\n".join(lines) + "\n"


def gen_registry(rng: random.Random, n_ent: int, n_events: int) -> str:
    y, mo, d = _date(rng)
    clock = {"h": rng.randint(6, 10), "m": 0}

    def now() -> str:
        clock["m"] += rng.randint(1, 40)
        clock["h"], clock["m"] = (clock["h"] + clock["m"] // 60) % 24, clock["m"] % 60
        return f"{clock['h']:02d}:{clock['m']:02d}"

    def make() -> dict:
        return {"id": f"svc.{_ident(rng)}-{_hex(rng, 3)}",
                "host": f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
                "port": rng.randint(1024, 65000), "region": f"{rng.choice(_REGIONS)}-{rng.randint(1, 9)}",
                "key": _hex(rng, 6), "owner": _pname(rng)}

    def define(e: dict, k) -> str:
        pre = "define" if k is None else f"{now()} define"
        return (f"{pre} {e['id']} host={e['host']} port={e['port']} region={e['region']} "
                f"key={e['key']} owner=\"{e['owner']}\"")

    def event(k: int, e: dict, f: dict) -> str:
        r = rng.random()
        t = now()
        if r < 0.2:
            new, old = _hex(rng, 6), e["key"]
            e["key"] = new
            return f"{t} {e['id']} (host={e['host']}, port={e['port']}): key {old} -> {new}; approved by {e['owner']}"
        if r < 0.5:
            return (f"{t} {e['owner']} {rng.choice(_VERBS_SVC)} {e['id']} in {e['region']}; "
                    f"peer {f['id']} at {f['host']}:{f['port']}")
        if r < 0.8:
            return (f"{t} {e['id']} {rng.choice(_VERBS_SVC)} on {e['host']}:{e['port']} "
                    f"(key={e['key']}, region={e['region']}, owner {e['owner']})")
        return (f"{t} incident #{rng.randint(100, 999)} on {e['id']} ({e['host']}): owner {e['owner']} paged, "
                f"key {e['key']} unchanged, {rng.randint(1, 90)} min")

    header = [f"REGISTRY {_ident(rng)}-{rng.choice(_WORDS)}/{rng.randint(100, 9999):04d}",
              f"maintainer: {_pname(rng)}", f"created: {y}-{mo:02d}-{d:02d}", "", "services:"]
    return _drive(rng, n_ent, n_events, header, make, define, event, "final state:",
                  lambda e: f"{e['id']} host={e['host']} port={e['port']} key={e['key']} owner=\"{e['owner']}\"")


def gen_ledger(rng: random.Random, n_ent: int, n_events: int) -> str:
    y, mo, d = _date(rng)
    cal = {"y": y, "mo": mo, "d": d}

    def today() -> str:
        cal["d"] += rng.randint(0, 2)
        if cal["d"] > 28:
            cal["d"], cal["mo"] = 1, cal["mo"] + 1
            if cal["mo"] > 12:
                cal["mo"], cal["y"] = 1, cal["y"] + 1
        return f"{cal['y']}-{cal['mo']:02d}-{cal['d']:02d}"

    def make() -> dict:
        return {"acct": f"ACCT-{rng.randint(10000, 99999)}", "holder": _pname(rng),
                "branch": f"{_cap(_ident(rng))}-{rng.randint(1, 20)}",
                "iban": f"XK{rng.randint(10, 99)} {rng.randint(1000, 9999)} {rng.randint(1000, 9999)} {rng.randint(10, 99)}",
                "bal": rng.randint(100, 50000)}

    def define(e: dict, k) -> str:
        pre = "  open" if k is None else f"#open {today()}"
        return f"{pre} {e['acct']} \"{e['holder']}\" branch={e['branch']} iban={e['iban']} opening={e['bal']}.00"

    def event(k: int, e: dict, f: dict) -> str:
        amt = rng.randint(1, 3000)
        r = rng.random()
        pre = f"#{k + 1:04d} {today()}"
        if r < 0.45:
            return (f"{pre} transfer {amt}.{rng.randint(0, 99):02d} from {e['acct']} ({e['holder']}, {e['iban']}) "
                    f"to {f['acct']} ({f['holder']}, branch {f['branch']})")
        if r < 0.75:
            return (f"{pre} debit {e['acct']} ({e['holder']}) {amt}.00 memo \"{rng.choice(_WORDS)} lot "
                    f"{rng.randint(1000, 9999)}\" branch {e['branch']}")
        return f"{pre} credit {e['acct']} ({e['holder']}) {amt}.00 via {e['iban']}"

    header = [f"LEDGER {_cap(_ident(rng))} Cooperative, book {rng.randint(1, 99)}", f"opened {y}-{mo:02d}-{d:02d}",
              "", "accounts:"]
    return _drive(rng, n_ent, n_events, header, make, define, event, "closing holders:",
                  lambda e: f"  {e['acct']} {e['holder']} {e['branch']} {e['iban']}")


def gen_project(rng: random.Random, n_ent: int, n_events: int) -> str:
    people = []
    for _ in range(max(2, n_ent // 3)):
        name = _pname(rng)
        handle = "@" + name.split()[0].lower() + "." + name.split()[1][:3].lower() + str(rng.randint(1, 9))
        people.append((handle, name, rng.choice(_WORDS)))

    def make() -> dict:
        return {"id": f"T-{rng.randint(100, 9999)}", "title": _title(rng), "lead": rng.randrange(len(people)),
                "est": rng.randint(1, 13)}

    def define(t: dict, k) -> str:
        pre = "  new" if k is None else f"day {k // 3 + 1}: new"
        return f"{pre} {t['id']} \"{t['title']}\" lead={people[t['lead']][0]} estimate={t['est']}d"

    def event(k: int, t: dict, u: dict) -> str:
        h, name, _ = people[t["lead"]]
        pre = f"day {k // 3 + 1}:"
        r = rng.random()
        if r < 0.4:
            return f"{pre} {h} {rng.choice(_STATUS)} {t['id']} \"{t['title']}\""
        if r < 0.65:
            return (f"{pre} {t['id']} \"{t['title']}\" now depends on {u['id']} \"{u['title']}\" "
                    f"(lead {people[u['lead']][0]})")
        if r < 0.85:
            nl = rng.randrange(len(people))
            t["lead"] = nl
            return f"{pre} {t['id']} moved from {h} ({name}) to {people[nl][0]} ({people[nl][1]})"
        return (f"{pre} review of {t['id']} \"{t['title']}\" by {h}: "
                f"{rng.choice(['approved', 'changes requested', 'deferred'])}, estimate was {t['est']}d")

    header = [f"PROJECT {_cap(_ident(rng))} {_cap(rng.choice(_WORDS))} -- engineering log", "", "team:"]
    header += [f"  {h} ({n}), area: {a}" for h, n, a in people]
    header += ["", "tasks:"]
    return _drive(rng, n_ent, n_events, header, make, define, event, "open tasks at end of log:",
                  lambda t: f"  {t['id']} \"{t['title']}\" lead={people[t['lead']][0]}")


def gen_catalog(rng: random.Random, n_ent: int, n_events: int) -> str:
    def make() -> dict:
        return {"pn": f"{rng.choice('BCFGHKMPRSTV')}{rng.choice('BCFGHKMPRSTV')}-{rng.randint(100, 999)}-"
                      f"{_hex(rng, 2).upper()}",
                "desc": f"{rng.choice(_ADJ)} {rng.choice(_WORDS)} {rng.choice(_WORDS)}",
                "bin": f"{rng.choice('ABCDEFGHJK')}{rng.randint(1, 40)}/{rng.randint(1, 9)}",
                "unit": rng.choice(_UNITS), "supplier": f"{_cap(_ident(rng))} & {_cap(_ident(rng))}"}

    def define(p: dict, k) -> str:
        pre = " " if k is None else "  NEW"
        return f"{pre} {p['pn']} | {p['desc']} | bin {p['bin']} | unit {p['unit']} | supplier {p['supplier']}"

    def event(k: int, p: dict, _q: dict) -> str:
        q = rng.randint(1, 400)
        r = rng.random()
        if r < 0.4:
            return f"  IN  {p['pn']} ({p['desc']}) {q} {p['unit']} from {p['supplier']} -> bin {p['bin']}"
        if r < 0.8:
            return f"  OUT {p['pn']} ({p['desc']}) {q} {p['unit']} from bin {p['bin']} order {_hex(rng, 5).upper()}"
        nb = f"{rng.choice('ABCDEFGHJK')}{rng.randint(1, 40)}/{rng.randint(1, 9)}"
        old, p["bin"] = p["bin"], nb
        return f"  MOVE {p['pn']} ({p['desc']}) bin {old} -> {nb}"

    header = [f"PARTS CATALOG {_cap(_ident(rng))} Works, rev {rng.choice('ABCDEFGH')}{rng.randint(1, 9)}", "",
              "parts:"]
    return _drive(rng, n_ent, n_events, header, make, define, event, "stock check:",
                  lambda p: f"  {p['pn']} {p['desc']} bin {p['bin']} supplier {p['supplier']}")


_GENERATORS = [("registry", gen_registry), ("ledger", gen_ledger), ("project", gen_project), ("catalog", gen_catalog)]


def gen_record_doc(rng: random.Random, long: bool = False) -> tuple[str, str]:
    kind, fn = _GENERATORS[rng.randrange(len(_GENERATORS))]
    if long:
        n_ent = rng.randint(8, 24)
        n_events = rng.randint(60, 120)
    else:
        # long-tailed: median ~ 6 entities / 8 events (a few hundred tokens), tail to thousands of tokens
        n_ent = int(min(70, max(2, rng.lognormvariate(math.log(6), 0.7))))
        n_events = int(min(300, max(1, rng.lognormvariate(math.log(8), 1.2))))
    return kind, fn(rng, n_ent, n_events)


def build_records(rng: random.Random) -> tuple[list[dict], list[dict]]:
    train, total, i = [], 0, 0
    while total < RECORDS_TRAIN_CHARS:
        kind, text = gen_record_doc(rng)
        train.append({"id": f"records/{kind}-{i:05d}", "source": "records", "text": text})
        total += len(text)
        i += 1
    held = []
    while len(held) < RECORDS_HELDOUT_DOCS:
        kind, text = gen_record_doc(rng, long=True)
        if len(text) >= 8_000:
            held.append({"id": f"records/heldout-{kind}-{len(held):03d}", "source": "records", "text": text})
    return train, held


def stage_corpus(seed: int, cpython: str | None = None) -> None:
    lib, include = cpython_dirs(cpython)
    log(f"corpus: collecting CPython {CPYTHON_VERSION} sources from {lib} and {include}, generating synthetic records")
    rng_code = random.Random(f"{seed}/code")
    rng_rec = random.Random(f"{seed}/records")
    rng_mix = random.Random(f"{seed}/heldout")
    code_train, code_held, c_train, c_held = build_code_sources(rng_code, lib, include)
    rec_train, rec_held = build_records(rng_rec)
    heldout = code_held + c_held + rec_held
    rng_mix.shuffle(heldout)
    CORPUS_DIR.mkdir(parents=True, exist_ok=True)
    for name, recs in (("code", code_train), ("c", c_train), ("records", rec_train), (HELDOUT, heldout)):
        write_jsonl_gz(CORPUS_DIR / f"{name}.jsonl.gz", recs)
        log(f"  {name}: {len(recs)} docs, {sum(len(r['text']) for r in recs):,} chars, "
            f"{(CORPUS_DIR / f'{name}.jsonl.gz').stat().st_size:,} bytes gz")
    atomic_write_bytes(CORPUS_DIR / "LICENSE-PSF.txt", (lib / "LICENSE.txt").read_bytes())
    info = load_build_info()
    info["seed"] = seed
    info["corpus"] = {
        name: {"docs": len(recs), "chars": sum(len(r["text"]) for r in recs),
               "gz_bytes": (CORPUS_DIR / f"{name}.jsonl.gz").stat().st_size}
        for name, recs in (("code", code_train), ("c", c_train), ("records", rec_train), (HELDOUT, heldout))
    }
    info.pop("tokens", None)
    save_build_info(info)


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------

def load_train_docs() -> list[dict]:
    docs = []
    for s in TRAIN_SOURCES:
        docs += read_jsonl_gz(CORPUS_DIR / f"{s}.jsonl.gz")
    return docs


def stage_tokenizer(seed: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    docs = load_train_docs()
    log(f"tokenizer: training byte-level BPE (vocab {VOCAB_SIZE}) on {len(docs)} training docs")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator((d["text"] for d in docs), trainer=trainer, length=len(docs))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    tmp = fresh_tmp_dir(TOKENIZER_DIR)
    fast.save_pretrained(str(tmp))
    replace_dir(tmp, TOKENIZER_DIR)
    _check_tokenizer(TOKENIZER_DIR)
    token_stats(update_info=True)


def _check_tokenizer(path: Path) -> None:
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(path))
    assert t.eos_token == "<|endoftext|>" and t.pad_token == "<|endoftext|>", (t.eos_token, t.pad_token)
    s = "déjà vu \u2603 def f(x):\n    return x  # ok\n"
    ids = t(s)["input_ids"]
    assert t.decode(ids) == s, "byte-level round trip failed"
    assert t.convert_tokens_to_ids("<|im_start|>") != t.convert_tokens_to_ids("<|im_end|>")
    chat = t.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", repr(chat)


def token_stats(update_info: bool) -> dict:
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    stats = {}
    for s in TRAIN_SOURCES + (HELDOUT,):
        docs = read_jsonl_gz(CORPUS_DIR / f"{s}.jsonl.gz")
        lens = [len(x) for x in t([d["text"] for d in docs])["input_ids"]]
        tot = sum(lens)
        stats[s] = {
            "docs": len(docs), "tokens": tot, "min_doc_tokens": min(lens), "max_doc_tokens": max(lens),
            "median_doc_tokens": sorted(lens)[len(lens) // 2],
            **{f"share_tokens_in_docs_ge_{k}": round(sum(n for n in lens if n >= k) / tot, 4) for k in (256, 512, 1024)},
        }
        log(f"  {s}: {stats[s]}")
    assert stats[HELDOUT]["min_doc_tokens"] >= HELDOUT_MIN_TOKENS, stats[HELDOUT]
    if update_info:
        info = load_build_info()
        info["tokenizer"] = {"vocab_size": len(t), "special_tokens": SPECIAL_TOKENS, "eos_id": t.eos_token_id}
        info["tokens"] = stats
        save_build_info(info)
    return stats


# --------------------------------------------------------------------------------------------
# base model
# --------------------------------------------------------------------------------------------

def model_config(vocab_size: int, eos_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, head_dim=32, hidden_act="silu",
        max_position_embeddings=BASE_SEQ_LEN, rms_norm_eps=1e-5, initializer_range=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
        attention_bias=False, mlp_bias=False, bos_token_id=None, eos_token_id=eos_id, pad_token_id=eos_id,
        use_cache=True,
    )


WEIGHT_DECAY, ADAM_BETAS = 0.1, (0.9, 0.95)  # both phases (longctx.train.optim.adamw)


def training_windows(tokenizer, docs: list[dict], seed: int):
    """The training corpus packed as the data engine's `concat` packing does (`ConcatPacker`: documents in a
    seeded order, each followed by EOS, concatenated and cut every BASE_SEQ_LEN tokens, the tail dropped):
    (windows [n, BASE_SEQ_LEN] int64, tokens in the stream)."""
    import numpy as np
    import torch

    order = list(range(len(docs)))
    random.Random(f"{seed}/pack").shuffle(order)
    ids = tokenizer([docs[i]["text"] for i in order])["input_ids"]
    eos = tokenizer.eos_token_id
    packer, rows, tokens = ConcatPacker(BASE_SEQ_LEN), [], 0
    for i, x in zip(order, ids):
        seg = Segment(np.asarray(x + [eos], dtype=np.int32), docs[i]["source"], docs[i]["id"], len(x) + 1)
        tokens += len(seg.tokens)
        rows += [np.concatenate([s.tokens for s in row]) for row in packer.add(seg)]
    list(packer.finish())  # the tail after the last full window is dropped
    return torch.from_numpy(np.stack(rows).astype(np.int64)), tokens


def save_model_dir(model) -> None:
    """Write `model` plus the tokenizer files as MODEL_DIR (a complete HF folder, `save_hf_model`), swapped in
    whole."""
    tmp = fresh_tmp_dir(MODEL_DIR)
    save_hf_model(model, model.state_dict(), str(tmp), [str(TOKENIZER_DIR)])
    for f in tmp.iterdir():
        os.chmod(f, 0o644)  # safetensors are written 0600 by save_pretrained
    replace_dir(tmp, MODEL_DIR)


def eval_buckets(model, tokenizer, docs: list[dict], seq_len: int = EVAL_LEN, batch: int = 8) -> dict:
    """Mean next-token NLL by target position bucket on the first `seq_len` tokens of each doc."""
    import torch

    rows = [x[:seq_len] for x in tokenizer([d["text"] for d in docs])["input_ids"] if len(x) >= seq_len]
    x = torch.tensor(rows, dtype=torch.long)
    tot = torch.zeros(seq_len - 1, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = x[i:i + batch]
            logits = model(input_ids=xb, use_cache=False).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), xb[:, 1:].reshape(-1), reduction="none"
            ).view(xb.size(0), -1)
            tot += nll.sum(0).double()
    per_pos = tot / len(x)  # index j = target position j+1
    pos = torch.arange(1, seq_len)
    out = {}
    for lo, hi in ((0, 255), (256, 511), (512, 1023)):
        m = (pos >= lo) & (pos <= hi)
        out[f"{lo}-{hi}"] = round(float(per_pos[m].mean()), 4)
    out["docs"] = len(x)
    return out


# --------------------------------------------------------------------------------------------
# retrieval phase: continued pretraining with synthetic retrieval rows (so the base can do passkey at 256)
# --------------------------------------------------------------------------------------------
# The base is first pretrained on the corpus alone (phase 1), then trained further on the corpus mixed with
# synthetic retrieval rows (phase 2). Neither the passkey eval's wording, filler or question form nor those of the
# second check template ("locker") appear in these rows: subjects are random phrases of corpus words ("our
# buffer offset", "the parser flags"), the filler is corpus text or a cycle of made-up sentences, and the
# question forms differ from both ("What is the pass key?", "Tell me my locker combination."). What the rows
# teach is the general skill the eval needs: find the sentence whose subject the question repeats and copy
# the number after it. `retrieval_checks` measures it on the real eval and on the "locker" template of
# longctx.eval.passkey.TEMPLATES.

RETRIEVAL_EXCLUDED_WORDS = frozenset(
    # the passkey eval's task, filler, needle and question
    "there important info hidden inside irrelevant text find memorize them will quiz about information "
    "grass green sky blue sun yellow here back again pass key remember what "
    # the second check template ("locker" in longctx.eval.passkey.TEMPLATES)
    "below long note line holds number asked locker combination lose tell rain fell over old harbor cat "
    "slept warm wall boats rocked wind nobody came market day bell rang twice".split())
RETRIEVAL_DETERMINERS = ("the", "my", "your", "our", "his", "her", "their", "this")
RETRIEVAL_LINKS = ("is", "was", "reads", "equals")
# {S}: "Our buffer offset is", {s}: the same in lower case, {p}: "our buffer offset", {v}: the number
RETRIEVAL_FACTS = (
    "{S} {v}.",
    "{S} {v}. Keep it in mind. {v} {l} {p}.",
    "Note: {s} {v}.",
    "{S} {v}; do not forget it.",
    "Write this down: {s} {v}.",
    "For the record, {s} {v}.",
)
RETRIEVAL_QUERIES = (  # every form ends with the fact's subject and link again, as a passkey question does
    "Question: {p}? Answer: {s}",
    "Recall {p}. {S}",
    "{S}",
    "Now, {s}",
    "Do you know {p}? Yes, {s}",
    "Which number was {p}? {S}",
    "Look back for {p}. {S}",
)
# recipe of phase 2: per step CORPUS_ROWS corpus windows of 256 tokens + SYN_TOKENS tokens of synthetic rows
# whose length follows SYN_SCHEDULE (length, until this fraction of the phase's steps); loss = SYN_WEIGHT x
# (mean over synthetic rows of each row's mean NLL on its supervised tokens) + (1 - SYN_WEIGHT) x corpus NLL.
RETRIEVAL_RECIPE = {
    "steps": 600, "peak_lr": 2e-3, "warmup_steps": 30, "min_lr_frac": 0.1, "corpus_rows": 16,
    "synthetic_tokens": 2048, "synthetic_weight": 0.5,
    "schedule": ((32, 0.15), (64, 0.3), (128, 0.5), (BASE_SEQ_LEN, 1.0)),
    "kinds": (("facts", 0.7), ("copy", 0.3)),
}


def retrieval_words(docs: list[dict], min_count: int = 5) -> list[str]:
    counts: dict[str, int] = {}
    for d in docs:
        for w in re.findall(r"\b[a-z]{3,10}\b", d["text"]):
            counts[w] = counts.get(w, 0) + 1
    return sorted(w for w, c in counts.items() if c >= min_count and w not in RETRIEVAL_EXCLUDED_WORDS)


class RetrievalRows:
    """Seeded synthetic rows as (input ids, labels); labels are -100 where no loss is taken.

    * facts: 1 to length/40 facts ("Our buffer offset is 48213.") hidden in filler (corpus text, or a cycle
      of made-up sentences "The mode is open." that put many "is" before the facts), then queries for
      some of them ("Recall our buffer offset. Our buffer offset is"); loss on the queried numbers and the
      "." after them (without the ".", greedy answers run on past the number: "60494049404").
    * copy: spans of uniformly random tokens, a gap of 0-8 random tokens, then an exact copy of the span; loss
      on the copies (induction). Span and gap lengths vary, so the copy is never at a fixed offset.
    """

    def __init__(self, tokenizer, windows, words: list[str], rng: random.Random, kinds=None):
        self.tok, self.windows, self.words, self.rng = tokenizer, windows, words, rng
        self.kinds = kinds or RETRIEVAL_RECIPE["kinds"]
        self.eos = tokenizer.eos_token_id
        self.dot = self._enc(".")

    def _enc(self, s: str) -> list[int]:
        return self.tok(s, add_special_tokens=False)["input_ids"]

    def _corpus_filler(self, n: int) -> list[int]:
        w = self.windows[self.rng.randrange(len(self.windows))].tolist()
        s = self.rng.randrange(0, max(1, len(w) - n))
        return w[s:s + n]

    def _sentence_filler(self, n: int) -> list[int]:
        rng, W = self.rng, self.words
        sents = []
        for _ in range(rng.randint(3, 6)):
            a, b, c = rng.sample(W, 3)
            sents.append(rng.choice((f" The {a} is {b}.", f" {a.capitalize()} and {b}.", f" A {a} {b} the {c}.",
                                     f" {a.capitalize()} {rng.choice(RETRIEVAL_LINKS)} {b}.")))
        cycle = self._enc("".join(sents))
        out = cycle * (n // max(1, len(cycle)) + 1)
        s = rng.randrange(len(cycle))
        return out[s:s + n] if n <= len(out) - s else (out * 2)[s:s + n]

    def _subject(self) -> tuple[str, str]:
        rng = self.rng
        det = rng.choice(RETRIEVAL_DETERMINERS)
        phrase = " ".join(rng.sample(self.words, rng.choice((1, 2, 2, 3))))
        return f"{det} {phrase}", rng.choice(RETRIEVAL_LINKS)

    def facts(self, length: int):
        rng = self.rng
        n_facts = rng.randint(1, max(1, length // 40))
        subjects = []
        while len(subjects) < n_facts:
            p, link = self._subject()
            if all(p != q for q, _ in subjects):
                subjects.append((p, link))
        vals = [str(rng.randint(10 ** (d - 1), 10 ** d - 1)) for d in (rng.choice((4, 5, 5, 5, 6)) for _ in subjects)]

        def fill(form, p, link, v):
            s = f"{p} {link}"
            return form.format(S=s[0].upper() + s[1:], s=s, p=p, l=link, v=v)

        facts = [self._enc(" " + fill(rng.choice(RETRIEVAL_FACTS), p, link, v)) for (p, link), v in zip(subjects, vals)]
        queries = [(self._enc(" " + fill(rng.choice(RETRIEVAL_QUERIES), *subjects[i], "")), self._enc(" " + vals[i]))
                   for i in rng.sample(range(n_facts), rng.randint(1, n_facts))]
        free = length - sum(map(len, facts)) - sum(len(q) + len(a) + len(self.dot) for q, a in queries)
        if free < 4:
            return None
        filler = self._corpus_filler if rng.random() < 0.5 else self._sentence_filler
        cuts = sorted(rng.randint(0, free) for _ in range(n_facts + 1))
        sizes = [cuts[0]] + [cuts[i + 1] - cuts[i] for i in range(n_facts)] + [free - cuts[-1]]
        ids: list[int] = []
        lab: list[int] = []
        for i, f in enumerate(facts):
            fl = filler(sizes[i])
            ids += fl + f
            lab += [-100] * (len(fl) + len(f))
        fl = filler(sizes[n_facts])
        ids += fl
        lab += [-100] * len(fl)
        for q, a in queries:
            ids += q + a + self.dot
            lab += [-100] * len(q) + a + self.dot
        fl = filler(sizes[-1])
        ids += fl
        lab += [-100] * len(fl)
        return ids, lab

    def copy(self, length: int):
        rng, vocab = self.rng, len(self.tok)
        ids: list[int] = []
        lab: list[int] = []
        while len(ids) < length:
            span = [rng.randrange(3, vocab) for _ in range(rng.randint(4, max(5, length // 3)))]
            gap = [rng.randrange(3, vocab) for _ in range(rng.randint(0, 8))]
            ids += span + gap + span
            lab += [-100] * (len(span) + len(gap)) + span
        return ids, lab

    def row(self, kind: str, length: int) -> tuple[list[int], list[int]]:
        while True:
            r = getattr(self, kind)(length)
            if r is not None:
                ids, lab = r[0][:length], r[1][:length]
                pad = length - len(ids)
                return ids + [self.eos] * pad, lab + [-100] * pad

    def batch(self, length: int, n: int):
        import torch

        rows = []
        for _ in range(n):
            r, acc, kind = self.rng.random(), 0.0, self.kinds[-1][0]
            for k, share in self.kinds:
                acc += share
                if r < acc:
                    kind = k
                    break
            rows.append(self.row(kind, length))
        return torch.tensor([a for a, _ in rows]), torch.tensor([b for _, b in rows])


def syn_length(step: int, total_steps: int, schedule=None) -> int:
    frac = step / max(1, total_steps)
    return next(n for n, until in (schedule or RETRIEVAL_RECIPE["schedule"]) if frac < until)


def row_mean_nll(model, x, y):
    """Mean over rows of each row's mean NLL on its supervised tokens (every row weighs the same, however
    few tokens it supervises: a fact row's answer is 4-8 tokens)."""
    import torch

    logits = model(input_ids=x, use_cache=False).logits[:, :-1]
    tgt = y[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1),
                                            ignore_index=-100, reduction="none").view(tgt.shape)
    m = (tgt != -100).float()
    return ((nll * m).sum(1) / m.sum(1).clamp(min=1)).mean()


def train_retrieval_phase(model, tok, windows, words, seed: int, recipe: dict, next_corpus_batch,
                          on_step=None) -> dict:
    """Phase 2 (see RETRIEVAL_RECIPE). `next_corpus_batch()` gives recipe["corpus_rows"] windows; `on_step(step,
    info)` is called every 50 steps (the exploration script evaluates there)."""
    import numpy as np
    import torch

    syn = RetrievalRows(tok, windows, words, random.Random(f"{seed}/retrieval"), kinds=recipe["kinds"])
    opt = adamw(model, lr=recipe["peak_lr"], weight_decay=WEIGHT_DECAY, betas=ADAM_BETAS)
    total, warmup, peak, lo = recipe["steps"], recipe["warmup_steps"], recipe["peak_lr"], recipe["min_lr_frac"]
    w = recipe["synthetic_weight"]
    corpus_losses, syn_losses, synthetic_tokens = [], [], 0
    t0 = time.time()
    model.train()
    for step in range(total):
        lr = warmup_cosine_lr(step, total_steps=total, warmup_steps=warmup, peak=peak, min_lr_ratio=lo)
        for grp in opt.param_groups:
            grp["lr"] = lr
        length = syn_length(step, total, recipe["schedule"])
        sx, sy = syn.batch(length, recipe["synthetic_tokens"] // length)
        synthetic_tokens += sx.numel()
        xb = next_corpus_batch()
        corpus_loss = model(input_ids=xb, labels=xb, use_cache=False).loss
        syn_loss = row_mean_nll(model, sx, sy)
        loss = w * syn_loss + (1 - w) * corpus_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        corpus_losses.append(corpus_loss.item())
        syn_losses.append(syn_loss.item())
        if (step + 1) % 50 == 0 or step + 1 == total:
            info = {"step": step + 1, "corpus_loss": round(float(np.mean(corpus_losses[-50:])), 4),
                    "synthetic_loss": round(float(np.mean(syn_losses[-50:])), 4), "rows_of": length,
                    "lr": lr, "seconds": round(time.time() - t0, 1)}
            log(f"  retrieval phase step {step + 1}/{total} corpus loss {info['corpus_loss']:.4f} synthetic loss "
                f"{info['synthetic_loss']:.4f} (rows of {length}) lr {lr:.2e} {info['seconds']:.0f}s")
            if on_step is not None:
                on_step(step + 1, info)
    model.eval()
    return {"steps": total, "seconds": round(time.time() - t0, 1),
            "corpus_tokens": total * recipe["corpus_rows"] * BASE_SEQ_LEN,
            "synthetic_tokens": synthetic_tokens,
            "final_corpus_loss_last50_mean": round(float(np.mean(corpus_losses[-50:])), 4),
            "final_synthetic_loss_last50_mean": round(float(np.mean(syn_losses[-50:])), 4)}


RETRIEVAL_CHECK_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


def retrieval_checks(model, tok, trials: int = 10) -> dict:
    """Passkey at 256 tokens with the real eval's template (seed 0) and with the "locker" template (seed 1),
    whose wording, filler and question form are in neither the eval nor the retrieval rows."""
    from longctx.eval import passkey as pk

    depths = list(RETRIEVAL_CHECK_DEPTHS)
    real = pk.run_passkey(model, tok, pk.build_passkey_prompts(tok, [BASE_SEQ_LEN], depths, trials, seed=0), 10)
    alt = pk.run_passkey(model, tok, pk.build_passkey_prompts(tok, [BASE_SEQ_LEN], depths, trials, seed=1,
                                                              template="locker"), 10)
    return {"passkey_256": round(real["overall"], 4),
            "passkey_256_key_nll": round(real["key_nll_by_length"][str(BASE_SEQ_LEN)], 4),
            "alt_template_256": round(alt["overall"], 4),
            "alt_template_256_key_nll": round(alt["key_nll_by_length"][str(BASE_SEQ_LEN)], 4),
            "trials": real["trials"]}


def stage_model(seed: int, train_seconds: float, train_steps: int | None, threads: int = 2) -> None:
    import numpy as np
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    docs = load_train_docs()
    windows, n_tokens = training_windows(tok, docs, seed)
    n_win = len(windows)
    log(f"model: {n_tokens:,} training tokens -> {n_win:,} windows of {BASE_SEQ_LEN}")

    cfg = model_config(len(tok), tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"  params: {n_params:,}; rope_parameters={model.config.rope_parameters}")

    batch, peak_lr, min_lr_frac, warmup = 16, 3e-3, 0.1, 60
    opt = adamw(model, lr=peak_lr, weight_decay=WEIGHT_DECAY, betas=ADAM_BETAS)
    g = torch.Generator().manual_seed(seed)
    perm, perm_pos, epoch = torch.randperm(n_win, generator=g), 0, 0

    def next_batch():
        nonlocal perm, perm_pos, epoch
        if perm_pos + batch > n_win:
            perm, perm_pos, epoch = torch.randperm(n_win, generator=g), 0, epoch + 1
        idx = perm[perm_pos: perm_pos + batch]
        perm_pos += batch
        return windows[idx]

    total_steps = train_steps
    calib_steps = 12
    t0 = time.time()
    step, ema, losses = 0, None, []
    model.train()
    while total_steps is None or step < total_steps:
        if total_steps is None and step == calib_steps:
            per_step = (time.time() - t0) / calib_steps
            total_steps = max(calib_steps + 1, int(train_seconds / per_step))
            log(f"  {per_step:.3f} s/step -> {total_steps} steps for {train_seconds:.0f} s")
        horizon = total_steps or 10**9
        lr = warmup_cosine_lr(step, total_steps=horizon, warmup_steps=warmup, peak=peak_lr, min_lr_ratio=min_lr_frac)
        for grp in opt.param_groups:
            grp["lr"] = lr
        xb = next_batch()
        loss = model(input_ids=xb, labels=xb, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        li = loss.item()
        losses.append(li)
        ema = li if ema is None else 0.98 * ema + 0.02 * li
        step += 1
        if step % 50 == 0 or step == total_steps:
            log(f"  step {step}/{total_steps} loss {li:.4f} (ema {ema:.4f}) lr {lr:.2e} "
                f"{time.time() - t0:.0f}s epoch {epoch}")
    elapsed = time.time() - t0
    final_loss = float(np.mean(losses[-50:]))
    tokens_seen = step * batch * BASE_SEQ_LEN
    log(f"  done: {step} steps, {tokens_seen:,} tokens, {elapsed:.0f}s, final loss (mean last 50) {final_loss:.4f}")

    save_model_dir(model)

    # reload + verify, and evaluate naive extrapolation vs dynamic NTK on the heldout docs
    loaded = LlamaForCausalLM.from_pretrained(str(MODEL_DIR))
    assert loaded.config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}, loaded.config.rope_parameters
    assert loaded.config.max_position_embeddings == BASE_SEQ_LEN
    heldout = heldout_checks(MODEL_DIR, tok)

    info = load_build_info()
    info["model"] = {
        "params": n_params, "config": {k: getattr(cfg, k) for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "head_dim",
            "vocab_size", "max_position_embeddings", "tie_word_embeddings")},
        "rope_parameters": loaded.config.rope_parameters,
        "train": {"seq_len": BASE_SEQ_LEN, "batch": batch, "peak_lr": peak_lr, "warmup_steps": warmup,
                  "min_lr_frac": min_lr_frac, "weight_decay": WEIGHT_DECAY, "steps": step, "tokens_seen": tokens_seen,
                  "epochs": round(tokens_seen / n_tokens, 2), "seconds": round(elapsed, 1),
                  "tokens_per_s": round(tokens_seen / elapsed), "final_loss_last50_mean": round(final_loss, 4),
                  "threads": threads, "train_seconds_arg": train_seconds},
        "heldout_nll": heldout,
        "size_bytes": sum(f.stat().st_size for f in MODEL_DIR.iterdir()),
    }
    save_build_info(info)


def heldout_checks(model_dir: Path, tok) -> dict:
    """Held-out NLL by position at EVAL_LEN with naive extrapolation and with dynamic NTK (factor 4)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    loaded = LlamaForCausalLM.from_pretrained(str(model_dir))
    held = read_jsonl_gz(CORPUS_DIR / f"{HELDOUT}.jsonl.gz")
    naive = eval_buckets(loaded, tok, held)
    dcfg = LlamaConfig.from_pretrained(str(model_dir))
    dcfg.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}
    dyn_model = LlamaForCausalLM.from_pretrained(str(model_dir), config=dcfg)
    assert dyn_model.model.rotary_emb.rope_type == "dynamic"
    dyn = eval_buckets(dyn_model, tok, held)
    log(f"  heldout NLL naive@{EVAL_LEN}: {naive}")
    log(f"  heldout NLL dynamic-NTK x4@{EVAL_LEN}: {dyn}")
    return {"naive_extrapolation": naive, "dynamic_ntk_factor4": dyn}


def stage_retrieval(seed: int, steps: int | None, threads: int = 2) -> None:
    """Phase 2 of the base: RETRIEVAL_RECIPE on top of the phase-1 model in MODEL_DIR (written by the model
    stage), then the held-out and retrieval checks."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    info = load_build_info()
    if "model" not in info or not MODEL_DIR.exists():
        raise SystemExit("retrieval stage: no phase-1 base in tiny-llama/ (run --only model first)")
    if "retrieval" in info["model"]:
        raise SystemExit("retrieval stage: tiny-llama/ already had its retrieval phase; run --only model first "
                         "(the phase runs once, on the phase-1 base)")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    recipe = dict(RETRIEVAL_RECIPE, **({"steps": steps} if steps is not None else {}))
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    docs = load_train_docs()
    windows, _ = training_windows(tok, docs, seed)
    n_win = len(windows)
    words = retrieval_words(docs)
    log(f"retrieval: phase 2 on the phase-1 base, {len(words):,} corpus words for subjects, recipe {recipe}")
    model = LlamaForCausalLM.from_pretrained(str(MODEL_DIR))
    g = torch.Generator().manual_seed(seed + 1)
    summary = train_retrieval_phase(
        model, tok, windows, words, seed, recipe,
        lambda: windows[torch.randint(n_win, (recipe["corpus_rows"],), generator=g)])

    save_model_dir(model)
    loaded = LlamaForCausalLM.from_pretrained(str(MODEL_DIR))
    assert loaded.config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    checks = retrieval_checks(loaded, tok)
    log(f"  retrieval at {BASE_SEQ_LEN} tokens: {checks}")
    m = info["model"]
    m["phase1_heldout_nll"] = m["heldout_nll"]
    m["heldout_nll"] = heldout_checks(MODEL_DIR, tok)
    m["retrieval"] = {**checks, "threads": threads, **summary,
                      "recipe": {k: (list(map(list, v)) if isinstance(v, tuple) else v) for k, v in recipe.items()}}
    m["size_bytes"] = sum(f.stat().st_size for f in MODEL_DIR.iterdir())
    save_build_info(info)


# --------------------------------------------------------------------------------------------
# README (generated section only)
# --------------------------------------------------------------------------------------------

BEGIN, END = "<!-- BEGIN GENERATED (scripts/build_sample_assets.py) -->", "<!-- END GENERATED -->"


def _dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0


def render_generated(info: dict) -> str:
    L = [BEGIN, "", f"Seed: `{info.get('seed')}`", ""]
    if "corpus" in info:
        L += ["| file | docs | chars | gz bytes | tokens | median doc tok | share tok in docs >=256 / >=512 / >=1024 |",
              "|---|---|---|---|---|---|---|"]
        toks = info.get("tokens", {})
        for name, c in info["corpus"].items():
            t = toks.get(name, {})
            share = (" / ".join(f"{t[f'share_tokens_in_docs_ge_{k}']:.2f}" for k in (256, 512, 1024))
                     if t else "-")
            L.append(f"| `corpus/{name}.jsonl.gz` | {c['docs']} | {c['chars']:,} | {c['gz_bytes']:,} | "
                     f"{t.get('tokens', '-'):,} | {t.get('median_doc_tokens', '-')} | {share} |"
                     if t else f"| `corpus/{name}.jsonl.gz` | {c['docs']} | {c['chars']:,} | {c['gz_bytes']:,} | - | - | - |")
        L.append("")
    if "tokenizer" in info:
        L += [f"Tokenizer: vocab {info['tokenizer']['vocab_size']}, eos/pad id {info['tokenizer']['eos_id']}; "
              f"`tiny-tokenizer/` {_dir_size(TOKENIZER_DIR):,} bytes.", ""]
    if "model" in info:
        m, tr = info["model"], info["model"]["train"]
        L += [f"Base model: {m['params']:,} parameters, config {json.dumps(m['config'])}, "
              f"rope_parameters `{json.dumps(m['rope_parameters'])}`; `tiny-llama/` {_dir_size(MODEL_DIR):,} bytes.",
              "",
              f"Training: {tr['steps']} steps x {tr['batch']} x {tr['seq_len']} tokens = {tr['tokens_seen']:,} tokens "
              f"({tr['epochs']} epochs of the training corpus) in {tr['seconds']} s on {tr['threads']} threads "
              f"({tr['tokens_per_s']:,} tok/s), AdamW peak LR {tr['peak_lr']} (warmup {tr['warmup_steps']}, cosine to "
              f"{tr['min_lr_frac']}x), wd {tr['weight_decay']}. **Final train loss (mean of last 50 steps): "
              f"{tr['final_loss_last50_mean']}**. Reproduce exactly with `--base-train-steps {tr['steps']}`.",
              "",
              f"Heldout mean NLL by target position at {EVAL_LEN} tokens ({m['heldout_nll']['naive_extrapolation']['docs']} docs):",
              "",
              "| method | 0-255 | 256-511 | 512-1023 |", "|---|---|---|---|"]
        for k, v in m["heldout_nll"].items():
            L.append(f"| {k} | {v['0-255']:.3f} | {v['256-511']:.3f} | {v['512-1023']:.3f} |")
        L.append("")
        if "phase1_heldout_nll" in m:
            L += ["The same after phase 1 only (before the retrieval phase):", "",
                  "| method | 0-255 | 256-511 | 512-1023 |", "|---|---|---|---|"]
            for k, v in m["phase1_heldout_nll"].items():
                L.append(f"| {k} | {v['0-255']:.3f} | {v['256-511']:.3f} | {v['512-1023']:.3f} |")
            L.append("")
        if "retrieval" in m:
            r, rc = m["retrieval"], m["retrieval"]["recipe"]
            L += [f"Retrieval phase (phase 2, `--only retrieval`): {r['steps']} steps on {r['threads']} thread(s) in "
                  f"{r['seconds']} s, each of {rc['corpus_rows']} corpus windows + {rc['synthetic_tokens']:,} tokens of "
                  f"synthetic retrieval rows (kinds {rc['kinds']}, row length schedule {rc['schedule']}, loss weight "
                  f"{rc['synthetic_weight']}), peak LR {rc['peak_lr']}: {r['corpus_tokens']:,} corpus + "
                  f"{r['synthetic_tokens']:,} synthetic tokens; final corpus loss {r['final_corpus_loss_last50_mean']}, "
                  f"synthetic loss {r['final_synthetic_loss_last50_mean']}.",
                  "",
                  f"Retrieval at {BASE_SEQ_LEN} tokens (greedy, {r['trials']} prompts per template, depths 0.1-0.9): "
                  f"passkey (`longctx.eval.passkey`) **{r['passkey_256']:.0%}** (key NLL {r['passkey_256_key_nll']}); "
                  f"a second template, filler and question form in neither the eval nor training: "
                  f"**{r['alt_template_256']:.0%}** (key NLL {r['alt_template_256_key_nll']}).", ""]
    L.append(END)
    return "\n".join(L)


def update_readme() -> None:
    info = load_build_info()
    gen = render_generated(info)
    if README.exists():
        text = README.read_text()
        if BEGIN in text and END in text:
            pre, rest = text.split(BEGIN, 1)
            post = rest.split(END, 1)[1]
            atomic_write_text(README, pre + gen + post)
            return
        atomic_write_text(README, text.rstrip() + "\n\n" + gen + "\n")
        return
    atomic_write_text(README, "# longctx sample assets\n\nBuilt by `python scripts/build_sample_assets.py`.\n\n"
                      + gen + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[2] if __doc__ else None)
    ap.add_argument("--only", choices=["corpus", "tokenizer", "model", "retrieval"], default=None,
                    help="run a single stage (default: all, in order)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--cpython", default=None, metavar="PREFIX",
                    help=f"corpus stage: a CPython {CPYTHON_VERSION} installation whose stdlib and headers are the code "
                         f"and c sources (default: this interpreter, when it is {CPYTHON_VERSION})")
    ap.add_argument("--base-train-seconds", type=float, default=420.0,
                    help="wall-clock budget for base pretraining (converted to a step count after timing)")
    ap.add_argument("--base-train-steps", type=int, default=None,
                    help="exact number of base pretraining steps (overrides --base-train-seconds)")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads for base pretraining (2 = the laptop target; 1 is more robust on a "
                         "heavily shared CPU, where OpenMP barriers stall)")
    ap.add_argument("--retrieval-steps", type=int, default=None,
                    help=f"steps of the retrieval phase (default {RETRIEVAL_RECIPE['steps']})")
    args = ap.parse_args(argv)
    stages = [args.only] if args.only else ["corpus", "tokenizer", "model", "retrieval"]
    for s in stages:
        t = time.time()
        if s == "corpus":
            stage_corpus(args.seed, args.cpython)
        elif s == "tokenizer":
            stage_tokenizer(args.seed)
        elif s == "model":
            stage_model(args.seed, args.base_train_seconds, args.base_train_steps, args.threads)
        else:
            stage_retrieval(args.seed, args.retrieval_steps, args.threads)
        update_readme()
        log(f"stage {s} done in {time.time() - t:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
