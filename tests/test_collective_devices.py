"""Every tensor handed to a collective or point-to-point call in parallel/ and core/ lives on
the rank's device: a process group started with NCCL alone has no CPU backend, so a CPU
tensor there fails on the first GPU run (never on the CPU runs of this suite).

The check reads the source (AST). It flags a tensor argument of a torch.distributed
collective or p2p call (or of a P2POp) that is created in the call, or assigned in the same
function, by a tensor factory (torch.tensor, torch.empty, zeros, ones, full, arange, ...)
without a `device=` argument, or by `.cpu()`. The `*_like` factories inherit their input's
device and are not flagged.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHECKED_PACKAGES = ("parallel", "core")
# torch.distributed calls that read or write tensors on the group's backend
# (the *_object calls take Python objects and place their own buffers).
COLLECTIVES = {
    "all_reduce", "broadcast", "reduce", "send", "recv", "isend", "irecv", "all_gather",
    "all_gather_into_tensor", "_all_gather_base", "reduce_scatter", "reduce_scatter_tensor",
    "_reduce_scatter_base", "gather", "scatter", "all_to_all", "all_to_all_single", "P2POp",
    "batch_isend_irecv",
}
# Factories that make a CPU tensor unless given device=.
FACTORIES = {
    "tensor", "as_tensor", "empty", "zeros", "ones", "full", "arange", "linspace",
    "logspace", "eye", "rand", "randn", "randint", "randperm", "empty_strided", "scalar_tensor",
}
# Methods that keep their receiver's device: `torch.tensor(shape).contiguous()` is still CPU.
DEVICE_PRESERVING = {
    "clone", "contiguous", "detach", "float", "double", "half", "bfloat16", "int", "long",
    "view", "reshape", "flatten", "squeeze", "unsqueeze",
}

# The V-schedule evaluation as it was before issue 17: the shape travelled in CPU tensors.
CPU_SHAPE_EXCHANGE = '''
import torch
import torch.distributed as dist

def exchange(hidden, group, device):
    shape = torch.empty(3, dtype=torch.int64)
    dist.recv(shape, group=group, group_src=0)
    dist.send(torch.tensor(hidden.shape, dtype=torch.int64), group=group, group_dst=1)
    ops = [dist.P2POp(dist.isend, torch.zeros(2).contiguous(), 1)]
    dist.all_gather([torch.ones(2) for _ in range(2)], hidden.cpu())
'''
DEVICE_SHAPE_EXCHANGE = '''
import torch
from torch import distributed as dist
from torch.distributed import send

def exchange(hidden, group, device):
    shape = torch.empty(3, dtype=torch.int64, device=device)
    dist.recv(shape, group=group, group_src=0)
    send(torch.tensor(hidden.shape, dtype=torch.int64, device=device), group=group, group_dst=1)
    dist.all_reduce(torch.zeros_like(hidden))
    dist.all_gather_object([None, None], hidden.shape)
'''


def _distributed_names(tree: ast.Module) -> tuple[set[str], set[str]]:
    """(names bound to torch.distributed or a module under it, collectives imported by name)."""
    modules, functions = {"torch.distributed"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("torch.distributed") and alias.asname:
                    modules.add(alias.asname)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full.startswith("torch.distributed") and alias.name not in COLLECTIVES:
                    modules.add(alias.asname or alias.name)
                elif full.startswith("torch.distributed"):
                    functions.add(alias.asname or alias.name)
    return modules, functions


def _is_collective(call: ast.Call, modules: set[str], functions: set[str]) -> bool:
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr in COLLECTIVES and ast.unparse(func.value) in modules
    return isinstance(func, ast.Name) and func.id in functions


def _assigned_values(scope: ast.AST, name: str) -> Iterator[ast.expr]:
    """The values assigned to `name` anywhere in `scope` (a function, or the module)."""
    for node in ast.walk(scope):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets = [node.target]
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            assert node.value is not None
            yield node.value


def _host_tensors(expr: ast.expr, scope: ast.AST, seen: frozenset[str] = frozenset()
                  ) -> Iterator[ast.expr]:
    """The sub-expressions of `expr` (or of what a name in it was assigned) that make a tensor
    on the host: a factory without device=, or `.cpu()`."""
    if isinstance(expr, ast.List | ast.Tuple):
        for element in expr.elts:
            yield from _host_tensors(element, scope, seen)
    elif isinstance(expr, ast.ListComp | ast.GeneratorExp):
        yield from _host_tensors(expr.elt, scope, seen)
    elif isinstance(expr, ast.Starred):
        yield from _host_tensors(expr.value, scope, seen)
    elif isinstance(expr, ast.Name) and expr.id not in seen:
        for value in _assigned_values(scope, expr.id):
            yield from _host_tensors(value, scope, seen | {expr.id})
    elif isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute):
        method, receiver = expr.func.attr, expr.func.value
        if method == "cpu":
            yield expr
        elif method in DEVICE_PRESERVING:
            yield from _host_tensors(receiver, scope, seen)
        elif (method in FACTORIES and ast.unparse(receiver) == "torch"
              and not any(keyword.arg == "device" for keyword in expr.keywords)):
            yield expr


class _CollectiveCalls(ast.NodeVisitor):
    """Collects the collective calls given a host tensor; a name resolves in the innermost
    function around the call (or the module)."""

    def __init__(self, tree: ast.Module):
        self.modules, self.functions = _distributed_names(tree)
        self.scope: ast.AST = tree
        self.found: list[str] = []
        self.checked: list[str] = []  # every collective call seen, by name

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        outer, self.scope = self.scope, node
        self.generic_visit(node)
        self.scope = outer

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Call(self, node: ast.Call) -> None:
        if _is_collective(node, self.modules, self.functions):
            self.checked.append(ast.unparse(node.func))
            arguments = [*node.args, *(keyword.value for keyword in node.keywords)]
            if any(next(_host_tensors(arg, self.scope), None) is not None for arg in arguments):
                self.found.append(f"line {node.lineno}: {ast.unparse(node)}")
        self.generic_visit(node)


def host_tensors_in_collectives(source: str) -> list[str]:
    """'line N: <call>' for each collective or p2p call in `source` given a host tensor."""
    tree = ast.parse(source)
    calls = _CollectiveCalls(tree)
    calls.visit(tree)
    return calls.found


# An expert-parallel dispatch that counts on the host: the counts exchange, a split-size
# tensor and an aux-loss count all-reduce, each of a tensor made without device=.
CPU_EXPERT_DISPATCH = '''
import torch
import torch.distributed as dist

def dispatch(x, flat, group, ep, experts):
    counts = torch.zeros(experts, dtype=torch.long).scatter_add_(0, flat, torch.ones_like(flat))
    received = torch.empty(experts, dtype=torch.long)
    dist.all_to_all_single(received, counts, group=group)
    dist.all_reduce(torch.tensor([x.size(0)]), group=group)
    out = x.new_empty(x.shape)
    dist.all_to_all_single(out, x, group=group)
'''


def test_checker_flags_host_tensors_of_an_expert_dispatch():
    found = host_tensors_in_collectives(CPU_EXPERT_DISPATCH)
    assert [line.split(":")[0] for line in found] == ["line 8", "line 9"], found


def test_expert_parallel_collectives_are_checked_and_on_the_device():
    """The checker sees expert parallelism's collectives (the counts and tokens all-to-all,
    the cp count all-reduce) and none is given a host tensor."""
    tree = ast.parse((REPO / "parallel" / "expert_parallel.py").read_text())
    calls = _CollectiveCalls(tree)
    calls.visit(tree)
    assert calls.checked.count("dist.all_to_all_single") == 2, calls.checked
    assert "dist.all_reduce" in calls.checked and calls.found == [], calls.found


def test_checker_flags_every_host_tensor_of_the_old_pipeline_shape_exchange():
    found = host_tensors_in_collectives(CPU_SHAPE_EXCHANGE)
    assert [line.split(":")[0] for line in found] == [
        "line 7", "line 8", "line 9", "line 10"], found


def test_checker_accepts_tensors_on_the_device_and_like_factories():
    assert host_tensors_in_collectives(DEVICE_SHAPE_EXCHANGE) == []


def test_no_collective_in_parallel_or_core_is_given_a_host_tensor():
    found = [
        f"{path.relative_to(REPO)} {line}"
        for package in CHECKED_PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
        for line in host_tensors_in_collectives(path.read_text())
    ]
    assert found == [], "tensors created without the rank's device:\n" + "\n".join(found)
