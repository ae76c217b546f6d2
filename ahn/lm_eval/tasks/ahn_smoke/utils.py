"""Loads the ahn_smoke tasks' data from the JSONL files next to this file (any working directory,
no download): lm-eval calls these through ``custom_dataset: !function utils.<name>``."""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _load(name: str) -> datasets.DatasetDict:
    lines = (HERE / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(x) for x in lines if x.strip()])})


def choice(**kwargs) -> datasets.DatasetDict:
    return _load("choice")


def gen(**kwargs) -> datasets.DatasetDict:
    return _load("gen")


def ppl(**kwargs) -> datasets.DatasetDict:
    return _load("ppl")
