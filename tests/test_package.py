"""pip install: the wheel pyproject.toml builds installs into a fresh virtual environment, where, from another folder
and without the repository on the path, it imports Spline, reads a ptAf file and swaps a model's AFs, needing no Triton;
and activationFunctions.py copied alone into an empty folder does the same."""
import os
import shutil
import subprocess
import sys
import tomllib

import torch

from lmafs.network import afFiles
from conftest import REPO
from model import GPT

# Runs in the virtual environment, in a folder of its own: what a user of `pip install .` does.
USER_SCRIPT = r"""
import importlib.util, os, sys
import torch
import activationFunctions
from activationFunctions import Spline, replaceActivations

for module in ("activationFunctions", "lmafs.network.afFiles", "lmafs.network.splineKernel"):  # found, not imported
    origin = importlib.util.find_spec(module).origin
    assert os.path.dirname(origin) != REPO and origin.startswith(sys.prefix), origin
data = torch.load(PTAF, weights_only=True)
spline = Spline().loadValues(data["mlpValues"][1], data["knots"], freeze=True)
torch.save({"knots": spline(data["knots"]), "grid": spline(torch.linspace(-20, 20, 9))}, OUT)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 8), torch.nn.GELU())
lines = replaceActivations(model, afFile=PTAF.replace(".pt", ".csv"), verbose=False)
assert len(lines) == 2 and isinstance(model[3], Spline), lines
assert "triton" not in sys.modules, "Triton was imported on the CPU"
from importlib.metadata import requires
assert requires("lm-afs") == ["torch>=2.11"] + [r for r in requires("lm-afs") if 'extra == "train"' in r], requires("lm-afs")
print("ok", activationFunctions.__file__)
"""


def test_wheelInstallsIntoAFreshVenvAndWorksWithoutTheRepository(tmp_path):
    # Build from a copy holding only what pyproject.toml names, so the build cannot lean on other files of the
    # checkout (and leaves no build/ or .egg-info in it).
    project = tomllib.load(open(os.path.join(REPO, "pyproject.toml"), "rb"))
    source = tmp_path / "source"
    source.mkdir()
    packages = project["tool"]["setuptools"]["packages"]
    for name in ["pyproject.toml", project["project"]["readme"]] + project["project"]["license-files"] + \
            [module + ".py" for module in project["tool"]["setuptools"]["py-modules"]] + \
            [os.path.join(package.replace(".", os.sep), name) for package in packages
             for name in os.listdir(os.path.join(REPO, package.replace(".", os.sep))) if name.endswith(".py")]:
        os.makedirs(os.path.dirname(source / name), exist_ok=True)
        shutil.copy(os.path.join(REPO, name), source / name)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-q", "-w", str(tmp_path / "dist")],
                   cwd=source, env=env, check=True, timeout=300, capture_output=True)
    wheels = list((tmp_path / "dist").glob("lm_afs-*.whl"))
    assert len(wheels) == 1
    # torch comes from this Python's site-packages; the venv adds only the wheel. --no-deps: Python's venv brings its
    # own old setuptools, which torch's metadata rejects, so pip would go to the index for a newer one; the wheel's
    # requirements are checked below instead.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(wheels[0])], env=env, check=True,
                   timeout=300, capture_output=True)

    ours = GPT(vocabSize=128, nLayers=2, nHeads=2, dimEmb=16, afMlp="spline", afAtt="linear")
    with torch.no_grad():
        for af in ours.mlpAfs:
            af.values.copy_(torch.randn(af.values.shape, generator=torch.Generator(device="cpu").manual_seed(3),
                                        device="cpu"))
    ptPath, _ = afFiles.saveAfFiles(str(tmp_path / "ptAf-tiny-step0001"), ours, {}, 1)
    outPath = tmp_path / "out.pt"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = f"REPO, PTAF, OUT = {REPO!r}, {ptPath!r}, {str(outPath)!r}\n" + USER_SCRIPT
    done = subprocess.run([python, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok ") and str(venv) in done.stdout

    out = torch.load(outPath, weights_only=True)
    values = ours.mlpAfs[1].values.detach()
    assert torch.allclose(out["knots"], values, atol=1e-4)
    expected = ours.mlpAfs[1](torch.linspace(-20, 20, 9)).detach()
    assert torch.equal(out["grid"], expected)
    assert out["grid"][0] == values[0] and out["grid"][-1] == values[-1]  # constant outside the knots


# Runs in a folder holding only a copy of activationFunctions.py: what a user who copies the one file does.
ALONE_SCRIPT = r"""
import os, sys
import torch
from activationFunctions import Spline, readAfFile, replaceActivations

assert os.path.dirname(os.path.abspath(sys.modules["activationFunctions"].__file__)) == os.getcwd()
data = readAfFile(PTAF)
for path in (PTAF, PTAF.replace(".pt", ".csv")):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 8), torch.nn.GELU())
    lines = replaceActivations(model, afFile=path, verbose=False)
    assert len(lines) == 2 and "per layer" in lines[0], lines
    for layer, index in enumerate((1, 3)):
        assert torch.allclose(model[index](data["knots"]), data["mlpValues"][layer], atol=1e-4), path
assert not {"lmafs", "model", "triton"} & set(sys.modules), sorted({"lmafs", "model", "triton"} & set(sys.modules))
print("ok")
"""


def test_activationFunctionsCopiedAloneReadsPtAfFilesAndSwapsAfs(tmp_path):
    ours = GPT(vocabSize=128, nLayers=2, nHeads=2, dimEmb=16, afMlp="spline", afAtt="spline", afLayerSpecific=1)
    generator = torch.Generator(device="cpu").manual_seed(5)
    with torch.no_grad():  # distinct values per layer, so each module must get its own layer's spline
        for af in list(ours.mlpAfs) + list(ours.attAfs):
            af.values.copy_(torch.randn(af.values.shape, generator=generator, device="cpu"))
    ptPath, _ = afFiles.saveAfFiles(str(tmp_path / "ptAf-tiny-step0001"), ours, {}, 1)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(os.path.join(REPO, "activationFunctions.py"), alone)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run([sys.executable, "-c", f"PTAF = {ptPath!r}\n" + ALONE_SCRIPT], cwd=alone, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ok\n"
