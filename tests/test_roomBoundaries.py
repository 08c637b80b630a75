"""The run's rooms keep to their own state, checked on the source as test_importGraph checks imports: no function
outside trainLmAf.py takes the Trainer, no file reads or writes another object's private attributes, and no function
sets attributes of an object it was handed (the hyperparameters' forced values and autograd's ctx aside)."""
import ast
import glob
import os

from conftest import REPO

# autograd Functions keep what the backward needs on the ctx they are given (the hyperparameters are frozen: the
# flags' checks return new ones, flagChecks.settle)
MAY_SET_ATTRIBUTES_OF = {"ctx"}


def sourceFiles():
    return sorted(glob.glob(os.path.join(REPO, "*.py")) + glob.glob(os.path.join(REPO, "lmafs", "**", "*.py"),
                                                                   recursive=True)
                  + glob.glob(os.path.join(REPO, "bench", "*.py")))


def parse(path):
    with open(path) as f:
        return ast.parse(f.read())


def importedModules(tree):
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.asname or alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmafs"):
            # from lmafs.run import runPlan: a module, where its name's file is in that folder
            folder = os.path.join(REPO, *node.module.split("."))
            names.update(alias.asname or alias.name for alias in node.names
                         if os.path.isfile(os.path.join(folder, alias.name + ".py")))
    return names


def functions(tree):
    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def parameterNames(function):
    arguments = function.args
    return {a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs}


def privateAccesses(tree):
    """(line, expression) of each `x._name` whose x is not self, cls, super() or an imported module."""
    modules, found = importedModules(tree), []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
            continue
        owner, root = node.value, node.value
        while isinstance(root, ast.Attribute):
            root = root.value
        ownOrInherited = isinstance(owner, ast.Name) and owner.id in ("self", "cls") or \
            isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super"
        if ownOrInherited or isinstance(root, ast.Name) and root.id in modules:
            continue
        found.append((node.lineno, ast.unparse(node)))
    return found


def attributesSetOnArguments(tree):
    """(line, function, target) of each `arg.name = ...` (or +=) where arg is a parameter of the function."""
    found = []
    for function in functions(tree):
        parameters = parameterNames(function) - {"self", "cls"} - MAY_SET_ATTRIBUTES_OF
        for node in ast.walk(function):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for target in targets:
                if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and \
                        target.value.id in parameters:
                    found.append((node.lineno, function.name, ast.unparse(target)))
    return found


def testTheCheckersFindWhatTheyLookFor():
    tree = ast.parse("import torch\n"
                     "def f(trainer, hp):\n"
                     "    trainer.step = 3\n"
                     "    trainer.window += 1\n"
                     "    hp.lr = 1\n"
                     "    mine = object()\n"
                     "    mine.x = 1\n"
                     "    return trainer._secret, torch._dynamo, self._own\n")
    assert attributesSetOnArguments(tree) == [(3, "f", "trainer.step"), (4, "f", "trainer.window"), (5, "f", "hp.lr")]
    assert privateAccesses(tree) == [(8, "trainer._secret")]
    assert [f.name for f in functions(tree) if "trainer" in parameterNames(f)] == ["f"]


def testNoFunctionOutsideTheEntryPointTakesTheTrainer():
    """Of the repository's modules; the benchmark scripts, like the tests, drive a Trainer through its methods."""
    offenders = []
    for path in sourceFiles():
        if os.path.basename(path) == "trainLmAf.py" or os.path.dirname(path) == os.path.join(REPO, "bench"):
            continue
        tree = parse(path)
        offenders += [f"{os.path.relpath(path, REPO)}:{f.lineno} {f.name}" for f in functions(tree)
                      if "trainer" in parameterNames(f)]
    assert offenders == []


def testNoFileReachesIntoAnotherObjectsPrivateState():
    offenders = [f"{os.path.relpath(path, REPO)}:{line} {expression}" for path in sourceFiles()
                 for line, expression in privateAccesses(parse(path))]
    assert offenders == []


def testNoFunctionSetsTheAttributesOfWhatItWasHanded():
    offenders = [f"{os.path.relpath(path, REPO)}:{line} {function}: {target}" for path in sourceFiles()
                 for line, function, target in attributesSetOnArguments(parse(path))]
    assert offenders == []


def testTheHyperparametersAreFrozen():
    """Settled once (flagChecks.settle returns new ones): nothing can assign to them after parsing."""
    import dataclasses

    import trainLmAf

    hp, _ = trainLmAf.parseArgs(["--lr", "0.1"])
    try:
        hp.lr = 1.0
    except dataclasses.FrozenInstanceError:
        return
    raise AssertionError("Hyperparameters accepted an assignment")
