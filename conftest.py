"""Tests and the nbval run of the notebook never touch the network: the Hub is off before anything
imports it (the notebook's kernel inherits this environment)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
