"""Makes torch answer that a CUDA GPU is present, in every Python process started with this folder on PYTHONPATH
(.ci/run runs the suite so): a test or a library line that chooses by torch.cuda.is_available() instead of by the
device it was given then behaves differently from the plain run, and fails."""
import os

import torch

os.environ["LMAFS_PRETENDED_CUDA"] = "1"  # tests/conftest.py skips the real CUDA tests then
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
