#!/usr/bin/env python
"""Download the data sets of the LoRA-SB experiments into ``data/`` (needs Hugging Face hub access).

What it writes (``--out`` defaults to ``data/`` of this repository), and how to train on it:

==============  ===========================================  =============================================
name            files                                        run settings
==============  ===========================================  =============================================
metamath        metamathqa/train.jsonl                       data.path=data/metamathqa/train.jsonl
                (meta-math/MetaMathQA, train)                (data.format=metamath, the default)
gsm8k           gsm8k/test.jsonl, gsm8k/train.jsonl          evaluation (test); training rows need
                (openai/gsm8k, subset main)                  data.query_field=question
                                                             data.response_field=answer
commonsense     commonsense/commonsense_170k.json            data.path=data/commonsense/commonsense_170k.json
                (LLM-Adapters' ft-training_set JSON)         data.format=commonsense
glue            glue/<task>/<split>.jsonl                    for the GLUE experiments
                (nyu-mll/glue: cola sst2 mrpc qqp stsb
                mnli qnli rte wnli)
==============  ===========================================  =============================================

The commonsense-170k JSON is fetched from the hub mirror ``zwhe99/commonsense_170k`` (``--commonsense_from
hub``, the default) or straight from the LLM-Adapters GitHub repository (``--commonsense_from github``).
Each directory written gets a ``.gitignore`` holding ``*``, so downloaded data never lands in a commit.

Usage: ``python scripts/download_datasets.py [--only NAME ...] [--out DIR] [--glue_tasks cola,rte]``.
Nothing is imported from ``datasets`` or ``huggingface_hub`` until a download starts, so ``--help``
works anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request

NAMES = ("metamath", "gsm8k", "commonsense", "glue")
GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
METAMATH_REPO = "meta-math/MetaMathQA"
GSM8K_REPO, GSM8K_SUBSET = "openai/gsm8k", "main"
GLUE_REPO = "nyu-mll/glue"
COMMONSENSE_HUB_REPO = "zwhe99/commonsense_170k"
COMMONSENSE_GITHUB_URL = ("https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/main/"
                          "ft-training_set/commonsense_170k.json")


def _target_dir(out: str, name: str) -> str:
    path = os.path.join(out, name)
    os.makedirs(path, exist_ok=True)
    ignore = os.path.join(path, ".gitignore")
    if not os.path.exists(ignore):
        with open(ignore, "w") as f:
            f.write("# downloaded by scripts/download_datasets.py: not for commits\n*\n")
    return path


def _write_jsonl(ds, path: str) -> None:
    """A ``datasets.Dataset`` as JSON Lines (rows in the data set's order), written atomically."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in ds:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}: {len(ds)} rows, {os.path.getsize(path)} bytes", flush=True)


def download_metamath(out: str, args) -> None:
    from datasets import load_dataset

    ds = load_dataset(METAMATH_REPO, split="train")
    _write_jsonl(ds, os.path.join(_target_dir(out, "metamathqa"), "train.jsonl"))


def download_gsm8k(out: str, args) -> None:
    from datasets import load_dataset

    target = _target_dir(out, "gsm8k")
    for split in ("test", "train"):
        _write_jsonl(load_dataset(GSM8K_REPO, GSM8K_SUBSET, split=split), os.path.join(target, f"{split}.jsonl"))


def download_commonsense(out: str, args) -> None:
    target = os.path.join(_target_dir(out, "commonsense"), "commonsense_170k.json")
    if args.commonsense_from == "github":
        tmp = target + ".tmp"
        with urllib.request.urlopen(COMMONSENSE_GITHUB_URL, timeout=120) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
        rows = json.load(open(tmp, encoding="utf-8"))  # fails loudly on a truncated download
        os.replace(tmp, target)
    else:
        from datasets import load_dataset

        ds = load_dataset(COMMONSENSE_HUB_REPO, split="train")
        rows = [{k: row.get(k) for k in ("instruction", "input", "output", "answer")} for row in ds]
        tmp = target + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(rows, f, ensure_ascii=False, indent=4)
        os.replace(tmp, target)
    print(f"wrote {target}: {len(rows)} rows, {os.path.getsize(target)} bytes", flush=True)


def download_glue(out: str, args) -> None:
    from datasets import load_dataset

    for task in args.glue_tasks:
        target = _target_dir(os.path.join(out, "glue"), task)
        splits = load_dataset(GLUE_REPO, task)  # every split of the task: train, validation(s), test
        for split, ds in splits.items():
            _write_jsonl(ds, os.path.join(target, f"{split}.jsonl"))


DOWNLOADERS = {"metamath": download_metamath, "gsm8k": download_gsm8k,
               "commonsense": download_commonsense, "glue": download_glue}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(
        description="Download MetaMathQA, GSM8K, LLM-Adapters' commonsense-170k and GLUE into data/ "
                    "(needs Hugging Face hub access).")
    parser.add_argument("--only", action="append", choices=NAMES, metavar="NAME",
                        help=f"download only this data set ({', '.join(NAMES)}); repeat for several; "
                             "default: all")
    parser.add_argument("--out", default=os.path.join(repo, "data"),
                        help="directory to write into (default: data/ of this repository)")
    parser.add_argument("--glue_tasks", default=",".join(GLUE_TASKS),
                        help=f"comma-separated GLUE tasks (default: {','.join(GLUE_TASKS)})")
    parser.add_argument("--commonsense_from", choices=("hub", "github"), default="hub",
                        help=f"hub: {COMMONSENSE_HUB_REPO}; github: LLM-Adapters' own file "
                             "(default: hub)")
    args = parser.parse_args(argv)
    args.glue_tasks = [t for t in args.glue_tasks.replace(" ", "").split(",") if t]
    unknown = sorted(set(args.glue_tasks) - set(GLUE_TASKS))
    if unknown:
        parser.error(f"--glue_tasks: unknown task(s) {', '.join(unknown)}; choose from {', '.join(GLUE_TASKS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    failed = []
    for name in args.only or NAMES:
        print(f"[{name}]", flush=True)
        try:
            DOWNLOADERS[name](args.out, args)
        except Exception as e:  # report and go on with the others
            print(f"[{name}] failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
