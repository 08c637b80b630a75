"""The repository's modules (the scripts at the root and the layers in lmafs/) import one another without a cycle
(every import counts, also those inside functions), each opens with a docstring saying what it owns, and the layers
depend downwards: data on nothing of the others, the network on data at most, a run on the network and data, the
study tool on runs."""
import ast
import glob
import os

from conftest import REPO


def modules():
    """{dotted name: path} of the root's scripts and the package's modules (packages as their __init__)."""
    found = {os.path.basename(path)[:-3]: path for path in glob.glob(os.path.join(REPO, "*.py"))}
    for path in glob.glob(os.path.join(REPO, "lmafs", "**", "*.py"), recursive=True):
        parts = os.path.relpath(path, REPO)[:-3].split(os.sep)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def importGraph():
    """{module: the repository's modules it imports}."""
    known = modules()
    graph = {}
    for module, path in known.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module)
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)  # from a package, a module
        graph[module] = sorted(imported & set(known) - {module} - {"lmafs"} - {
            name for name in imported if name.count(".") and name.rsplit(".", 1)[0] == module})
    return graph


def findCycle(graph):
    """A list of modules that import each other in a circle, or None."""
    state, path = {}, []

    def visit(module):
        state[module] = "open"
        path.append(module)
        for other in graph[module]:
            if state.get(other) == "open":
                return path[path.index(other):] + [other]
            if other not in state:
                cycle = visit(other)
                if cycle:
                    return cycle
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def testFindCycleFindsOne():
    assert findCycle({"a": ["b"], "b": ["c"], "c": ["a"], "d": []}) == ["a", "b", "c", "a"]
    assert findCycle({"a": ["b", "c"], "b": ["c"], "c": []}) is None


def testModulesImportWithoutACycle():
    graph = importGraph()
    assert {"trainLmAf", "lmafs.run.runPlan", "lmafs.run.runOutputs", "lmafs.run.checkpoints"} <= set(graph)
    assert findCycle(graph) is None, " -> ".join(findCycle(graph))
    for module in ("lmafs.run.preflight", "lmafs.run.checkpoints", "lmafs.run.runPlan", "lmafs.run.runOutputs"):
        assert "trainLmAf" not in graph[module], module
    # copied on its own, activationFunctions works (its Triton kernels are optional): it leans on no other module
    assert set(graph["activationFunctions"]) <= {"lmafs.network.splineKernel"}, graph["activationFunctions"]


def testTheRunPlanIsPure():
    """Schedules, starts, due-predicates, passes and tokens: no files, devices, models or other rooms."""
    with open(modules()["lmafs.run.runPlan"]) as f:
        tree = ast.parse(f.read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names} | {node.module for node in ast.walk(tree)
                                            if isinstance(node, ast.ImportFrom)}
    assert imported <= {"math", "numpy"}, imported


def testLayersDependDownwards():
    """lmafs/data needs no other layer, lmafs/network at most data, lmafs/run no study; the scripts at the root lean
    on the package, never the package on a script (activationFunctions, model and plotting excepted: the original's
    own modules, kept at the root where it has them; and the study tool reads its runs' flags with trainLmAf's
    parser)."""
    graph = importGraph()
    below = {"data": set(), "network": {"data"}, "run": {"data", "network"}, "study": {"data", "network", "run"}}
    for module, imported in graph.items():
        if not module.startswith("lmafs."):
            continue
        layer = module.split(".")[1]
        for other in imported:
            if other.startswith("lmafs.") and other.count(".") >= 2:
                assert other.split(".")[1] in below.get(layer, set()) | {layer}, (module, other)
            elif not other.startswith("lmafs"):
                allowed = ("activationFunctions", "model", "plotting") + (("trainLmAf",) if layer == "study" else ())
                assert other in allowed, (module, other)


def testScriptsThatLoadAModelDoNotImportTheTrainer():
    # they take the one-line argparse errors from cliErrors, not from trainLmAf, so no training module loads with them
    graph = importGraph()
    for script in ("evalBlimp", "evalHarness", "generate"):
        seen, todo = set(), [script]
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo.extend(graph[module])
        assert "trainLmAf" not in seen, script
    assert graph["lmafs.cliErrors"] == []


def testEveryModuleSaysWhatItOwns():
    for module, path in modules().items():
        with open(path) as f:
            assert ast.get_docstring(ast.parse(f.read())), module
