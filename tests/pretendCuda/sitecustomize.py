"""Makes torch answer LM-AFs' own code that a CUDA GPU is present, in every Python process started with this folder
on PYTHONPATH (.ci/run runs the suite so): a test or a library line of this repository that chooses by
torch.cuda.is_available() instead of by the device it was given then behaves differently from the plain run, and
fails. Torch and the other installed packages keep the true answer, so that only this repository's choices are put to
the test (torch's compiler, for one, would otherwise save the random state of a GPU that is not there)."""
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ["LMAFS_PRETENDED_CUDA"] = "1"  # tests/conftest.py skips the real CUDA tests then
_isAvailable, _deviceCount = torch.cuda.is_available, torch.cuda.device_count


def _askedByThisRepository():
    caller = os.path.abspath(sys._getframe(2).f_code.co_filename)
    return caller.startswith(REPO + os.sep) and "site-packages" not in caller


torch.cuda.is_available = lambda: True if _askedByThisRepository() else _isAvailable()
torch.cuda.device_count = lambda: 1 if _askedByThisRepository() else _deviceCount()
