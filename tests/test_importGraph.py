"""The repository's top-level modules import one another without a cycle (every import counts, also those inside
functions), and each opens with a docstring saying what it owns."""
import ast
import os

from conftest import REPO

def topLevelModules():
    return sorted(name[:-3] for name in os.listdir(REPO) if name.endswith(".py"))


def importGraph():
    """{module: the top-level modules it imports}."""
    modules = set(topLevelModules())
    graph = {}
    for module in modules:
        with open(os.path.join(REPO, module + ".py")) as f:
            tree = ast.parse(f.read())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
        graph[module] = sorted(imported & modules - {module})
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


def testTopLevelModulesImportWithoutACycle():
    graph = importGraph()
    assert {"trainLmAf", "runPlan", "runOutputs", "checkpoints", "preflight"} <= set(graph)
    assert findCycle(graph) is None, " -> ".join(findCycle(graph))
    assert "trainLmAf" not in graph["preflight"] + graph["checkpoints"] + graph["runPlan"] + graph["runOutputs"]
    # copied on its own, activationFunctions works (its Triton kernels are optional): it leans on no other module
    assert set(graph["activationFunctions"]) <= {"splineKernel"}, graph["activationFunctions"]



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
    assert graph["cliErrors"] == []

def testEveryTopLevelModuleSaysWhatItOwns():
    for module in topLevelModules():
        with open(os.path.join(REPO, module + ".py")) as f:
            assert ast.get_docstring(ast.parse(f.read())), module
