"""Prepared data as an input: is a committed packed dataset the one this job can train on?

    from longctx.runs.handoff import check_packed_data
    problems = check_packed_data(cfg, manifest, kind="pt")     # [] or one line per mismatch
    problems = check_packed_data(cfg, manifest, kind="sft", same_config=True)   # a rerun reusing its own data

Checked before Ray Train starts (and by the preflight checks): the dataset's kind (Long-PT packed rows or Long-SFT
chats), its row length against `data.seq_len`, its attention mode against `data.attention`, the tokenizer it was
made with (a fingerprint of the tokenizer's full definition) against `data.tokenizer`, and its vocabulary against
the model's embedding rows. With `same_config=True` (a run picking up its own data) the manifest's record of the
data settings must also match the job's: the differing keys are named.
"""

from __future__ import annotations

import json

from longctx import storage
from longctx.runs.identity import tree_differences



class PreparedDataMismatch(ValueError):
    """A committed packed dataset does not fit the job; the message has one line per problem."""


def model_vocab_size(model_uri: str) -> int | None:
    """Embedding rows of a Hugging Face model folder (its config.json; nothing else is read)."""
    try:
        conf = json.loads(storage.read_text(storage.published_path(model_uri, "config.json")))
    except Exception:  # noqa: BLE001 - a missing model is the preflight checks' to report, not this check's
        return None
    conf = conf.get("text_config", conf) if "vocab_size" not in conf else conf
    return conf.get("vocab_size")


def manifest_kind(manifest: dict) -> str:
    from longctx.train.sft_data import SFT_KIND  # deferred: the data engine's package costs a second to import

    return "sft" if manifest.get("kind") == SFT_KIND else "pt"


def check_packed_data(cfg, manifest: dict, kind: str = "pt", *, same_config: bool = False,
                      where: str | None = None) -> list[str]:
    """Problems (one line each) that stop `cfg` training on the dataset described by `manifest`."""
    from longctx.data.fingerprint import (  # deferred: the data package takes ~1 s to import (`longctx --help` imports
        data_fingerprint, data_tree, tokenizer_fingerprint)  # this module); only a check of data needs it

    where = where or manifest.get("uri") or "prepared data"
    d = cfg.data
    problems: list[str] = []
    got_kind = manifest_kind(manifest)
    if got_kind != kind:
        names = {"pt": "Long-PT packed rows", "sft": "Long-SFT chats"}
        problems.append(f"{where}: holds {names[got_kind]}, this job trains on {names[kind]}")
    if manifest.get("seq_len") != d.seq_len:
        problems.append(f"{where}: rows are {manifest.get('seq_len')} tokens, data.seq_len is {d.seq_len}")
    if kind == "pt" and manifest.get("attention") not in (None, d.attention):
        problems.append(f"{where}: made with data.attention={manifest.get('attention')}, the job has {d.attention}")
    tok = manifest.get("tokenizer")
    recorded = (tok.get("fingerprint") if isinstance(tok, dict) else None) or manifest.get("tokenizer_fingerprint")
    if recorded:
        try:
            mine = tokenizer_fingerprint(d.tokenizer)
        except Exception as e:  # noqa: BLE001 - reported as a problem, with the reason
            problems.append(f"data.tokenizer {d.tokenizer}: cannot be loaded to compare with {where} ({e})")
        else:
            if mine != recorded:
                made = tok.get("uri") if isinstance(tok, dict) else tok
                problems.append(f"{where}: made with another tokenizer ({made}, fingerprint {recorded[:12]}) than "
                                f"data.tokenizer {d.tokenizer} ({mine[:12]})")
    vocab = tok.get("vocab_size") if isinstance(tok, dict) else manifest.get("vocab_size")
    model_vocab = model_vocab_size(cfg.model.path)
    if vocab and model_vocab and vocab > model_vocab:
        problems.append(f"{where}: token ids go up to {vocab - 1}, the model {cfg.model.path} has {model_vocab} "
                        f"embedding rows")
    if same_config and manifest.get("data_fingerprint") and manifest["data_fingerprint"] != data_fingerprint(cfg):
        diffs = tree_differences(manifest.get("data_config") or {}, data_tree(cfg), "data")
        problems.append(f"{where}: made with other data settings ({'; '.join(diffs[:8]) or 'fingerprint differs'})")
    return problems


def require_packed_data(cfg, manifest: dict, kind: str = "pt", **kwargs) -> None:
    """`check_packed_data`, raising PreparedDataMismatch with every problem (one line each)."""
    problems = check_packed_data(cfg, manifest, kind, **kwargs)
    if problems:
        raise PreparedDataMismatch("prepared data does not fit this job:\n  " + "\n  ".join(problems))
