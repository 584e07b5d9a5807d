"""LongBench / LEval-format tasks: read the JSONL files, build prompts, score predictions as LongBench does.

    prompts = build_prompts(tokenizer, "hotpotqa", records, max_seq_len=32768)
    scores = score_predictions("preds.jsonl", "scores.json")        # {dataset: score}, LongBench's rules

Data is the user's (local path, glob, folder or s3:// prefix; one file per dataset, named `<dataset>.jsonl`
or `<dataset>_e.jsonl` for LongBench-E). Record formats:
- LongBench: {"input", "context", "answers": [...], "length", "all_classes", "dataset", "language", "_id"}.
- LEval: {"input": document, "instructions": [...], "outputs": [...], "evaluation": "exam"|"f1"|"rouge"|...};
  every instruction becomes one sample.

Prompts use LongBench's per-dataset template and maximum generation length (its `config/dataset2prompt.json`
and `dataset2maxlen.json`, MIT licence, reproduced as data so prompts match published runs), are tokenized
whole and middle-truncated to max_seq_len - max_new_tokens (`truncation.py`). For chat models
(`chat_template=True`) the truncated prompt is wrapped in the tokenizer's chat template except for the
few-shot and code datasets, as LongBench's pred.py does. samsum stops at a newline after >= 1 token.

A predictions JSONL has one object per sample: `pred`, `answers`, `all_classes`, `dataset`, optional
`length` (LongBench-E buckets) and optional `metric` (for datasets outside LongBench's table, e.g. LEval).
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Sequence

from longctx import storage
from longctx.eval import metrics as M
from longctx.eval.documents import iter_records
from longctx.eval.truncation import max_prompt_len, middle_truncate

PROMPTS: dict[str, str] = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "musique": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
    "passage_retrieval_zh": "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是：",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
"""LongBench's prompt template per dataset (verbatim: prompts must match to compare with published scores)."""

MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32,
    "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512,
    "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32,
    "passage_retrieval_en": 32, "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
}
"""LongBench's maximum generation length per dataset."""

NO_CHAT = {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
LEVAL_PROMPT = ("Now you are given a very long document. Please follow the instruction based on this document. "
                "For multi-choice questions, there could be a single correct option or multiple correct options. "
                "Please only provide the letter corresponding to the answer (like A or AB) when answering.\n"
                "Document is as follows.\n{context}\nInstruction: {input}\nAnswer:")
LEVAL_METRIC = {"exam": "exam", "f1": "qa_f1", "rouge": "rouge", "human": "rouge", "llm": "rouge"}
METRICS_BY_NAME = {
    "qa_f1": M.qa_f1_score, "qa_f1_zh": M.qa_f1_zh_score, "rouge": M.rouge_score, "rouge_zh": M.rouge_zh_score,
    "classification": M.classification_score, "retrieval": M.retrieval_score, "retrieval_zh": M.retrieval_zh_score,
    "count": M.count_score, "code_sim": M.code_sim_score,
}


def base_name(dataset: str) -> str:
    return dataset[:-2] if dataset.endswith("_e") and dataset[:-2] in PROMPTS else dataset


def exam_score(prediction: str, ground_truth: str, **_) -> float:
    """LEval multiple choice: the option letters (A-D) of the first answer-like token equal the answer's."""
    gold = set(re.findall(r"[A-D]", ground_truth.split(")")[0] if ")" in ground_truth else ground_truth))
    found = re.search(r"\b([A-D]{1,4})\b", prediction)
    return float(bool(found) and set(found.group(1)) == gold)


METRICS_BY_NAME["exam"] = exam_score


@dataclass
class TaskSample:
    dataset: str
    index: int
    input_ids: list[int]
    max_new_tokens: int
    answers: list[str]
    all_classes: list[str] | None = None
    length: int | None = None
    metric: str | None = None
    stop_ids: list[int] = field(default_factory=list)
    truncated: bool = False

    def to_row(self) -> dict:
        return asdict(self)


def dataset_name(uri: str) -> str:
    """Dataset name of a task file: its file name without the suffix (`hotpotqa_e.jsonl` -> hotpotqa_e)."""
    name = os.path.basename(uri.rstrip("/"))
    for suffix in (".jsonl.gz", ".jsonl.zst", ".jsonl", ".json.gz", ".json", ".parquet"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_task_file(uri: str) -> tuple[str, list[dict]]:
    """(dataset name from the file name, records) of one LongBench / LEval JSONL file."""
    return dataset_name(uri), [rec for _, rec in iter_records(uri)]


def samples_from_records(dataset: str, records: Sequence[dict]) -> list[dict]:
    """Normalise LongBench and LEval records to {context, input, answers, all_classes, length, metric}."""
    out = []
    for i, r in enumerate(records):
        if "instructions" in r and "outputs" in r:  # LEval: one sample per instruction
            metric = LEVAL_METRIC.get(str(r.get("evaluation", "rouge")).lower(), "rouge")
            for inst, ans in zip(r["instructions"], r["outputs"]):
                out.append({"context": r.get("input", ""), "input": inst, "answers": [ans], "all_classes": None,
                            "length": None, "metric": metric})
            continue
        if "answers" not in r or "context" not in r:
            raise ValueError(f"{dataset} record {i}: neither LongBench (context, input, answers) nor LEval "
                             f"(input, instructions, outputs) format; keys: {sorted(r)}")
        answers = r["answers"] if isinstance(r["answers"], list) else [r["answers"]]
        out.append({"context": r["context"], "input": r.get("input", ""), "answers": [str(a) for a in answers],
                    "all_classes": r.get("all_classes"), "length": r.get("length"), "metric": None})
    return out


def build_prompts(tokenizer, dataset: str, records: Sequence[dict], max_seq_len: int, *,
                  chat_template: bool = False, max_samples: int | None = None) -> list[TaskSample]:
    """Tokenized, middle-truncated prompts of one dataset."""
    base = base_name(dataset)
    samples = samples_from_records(dataset, records)[:max_samples]
    template = PROMPTS.get(base, LEVAL_PROMPT)
    new_tokens = MAX_NEW_TOKENS.get(base, 128)
    budget = max_prompt_len(max_seq_len, new_tokens)
    stop = []
    if base == "samsum":
        stop = tokenizer.encode("\n", add_special_tokens=False)[-1:]
    out = []
    for i, s in enumerate(samples):
        prompt = template.format(context=s["context"], input=s["input"])
        ids = tokenizer(prompt, add_special_tokens=True, truncation=False)["input_ids"]
        cut = middle_truncate(ids, budget)
        if chat_template and base not in NO_CHAT and getattr(tokenizer, "chat_template", None):
            text = tokenizer.decode(cut, skip_special_tokens=True)
            cut = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True)
            # transformers 5 returns a BatchEncoding (a Mapping), older versions a plain list of ids
            cut = list(cut["input_ids"] if hasattr(cut, "keys") else cut)
        out.append(TaskSample(dataset, i, cut, new_tokens, s["answers"], s["all_classes"], s["length"], s["metric"],
                              stop, truncated=len(ids) > budget))
    return out


# ------------------------------------------------------------------------------------------- scoring
def score_rows(rows: Sequence[dict], *, longbench_e: bool = False, code_sim_backend: str = "difflib") -> dict:
    """{dataset: score} (or {dataset: {bucket: score}} for LongBench-E) from prediction rows."""
    by_ds: dict[str, list[dict]] = defaultdict(list)
    for i, r in enumerate(rows):
        for key in ("pred", "answers", "dataset"):
            if key not in r:
                raise ValueError(f"prediction {i}: missing field {key!r} (need pred, answers, all_classes, dataset)")
        by_ds[str(r["dataset"])].append(r)
    scores: dict = {}
    for ds, drows in by_ds.items():
        metric_name = drows[0].get("metric")
        kwargs = {"code_sim_backend": code_sim_backend}
        if metric_name and base_name(ds) not in M.DATASET_METRIC:
            fn = METRICS_BY_NAME[metric_name]
            vals = [max([0.0] + [fn(r["pred"], gt, all_classes=r.get("all_classes")) for gt in r["answers"]]) for r in drows]
            scores[ds] = round(100 * sum(vals) / len(vals), 2)
            continue
        preds = [str(r["pred"]) for r in drows]
        answers = [list(r["answers"]) for r in drows]
        classes = [r.get("all_classes") for r in drows]
        if longbench_e:
            lengths = [r.get("length") for r in drows]
            if any(n is None for n in lengths):
                raise ValueError(f"{ds}: LongBench-E scoring needs a `length` on every prediction")
            scores[ds] = M.score_dataset_e(ds, preds, answers, lengths, classes, **kwargs)
        else:
            scores[ds] = M.score_dataset(ds, preds, answers, classes, **kwargs)
    return scores


def scores_table(scores: dict) -> str:
    """A plain-text table of dataset scores and LongBench category averages (what the CLI prints)."""
    lines = []
    for ds in sorted(scores):
        v = scores[ds]
        if isinstance(v, dict):
            lines.append(f"{ds:24s} " + "  ".join(f"{b}: {'-' if x is None else f'{x:6.2f}'}" for b, x in v.items()))
        else:
            lines.append(f"{ds:24s} {v:6.2f}")
    flat = {k: v for k, v in scores.items() if isinstance(v, (int, float))}
    for lang, cats in M.category_averages(flat).items():
        lines.append(f"-- {lang}: " + "; ".join(f"{c} {v:.2f}" for c, v in cats.items()))
    return "\n".join(lines)


def score_predictions(path_or_uri: str, output: str | None = None, *, longbench_e: bool = False,
                      code_sim_backend: str = "difflib", print_table: bool = True) -> dict:
    """Score a predictions JSONL (local or s3://) with LongBench's rules; write `{dataset: score}` to output.

    Prints a table with category averages when `print_table`. Returns the dict that was written.
    """
    rows = []
    for where, rec in iter_records(path_or_uri):
        rows.append(rec)
    if not rows:
        raise ValueError(f"{path_or_uri}: no predictions")
    scores = score_rows(rows, longbench_e=longbench_e, code_sim_backend=code_sim_backend)
    if output:
        storage.write_text(output, json.dumps(scores, ensure_ascii=False, indent=4) + "\n")
    if print_table:
        print(scores_table(scores), flush=True)
    return scores
