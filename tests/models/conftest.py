"""Test setup for the model area: single-threaded torch and the reference-model helpers."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

# The helpers in eva_reference.py are imported by name from the tests of this folder.
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)
