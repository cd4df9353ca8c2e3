"""Which module is running: a stack kept by global forward pre/post hooks.

NOTE [no backward hooks]: full backward hooks (global or per module) wrap module outputs in
BackwardHookFunction views, which turns `nn.ReLU(inplace=True)` or `out += 1` on a module
output into a different error and leaves a global flag set after removal. The stack is
therefore built from forward hooks only; backward writes are attributed by phase instead.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import ExitStack

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_forward_hook,
    register_module_forward_pre_hook,
)

from gradtrace.probes import _torch_compat

LOOP_OWNER = "training loop"


class ModuleStackProbe:
    """Knows the module path (as `named_modules()` spells it from the root) of the running forward.

    A module called with no module around it is a root, labelled by its class name. Names are
    computed once per root from its `named_modules()`; when a bigger root later runs, its tree
    is named from it, so a model whose parts were first called alone still gets full paths.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self._names: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
        self._roots: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        # Forward calls of root modules so far (on any thread): "has a forward run since?"
        self.forwards = 0
        # id(parameter) -> (weakref, its path, its module's path), rebuilt for new roots.
        # Keyed by id: tensors compare elementwise, so they cannot be WeakKeyDictionary keys.
        self._params: dict[int, tuple[weakref.ref[torch.Tensor], str, str]] = {}

    def install(self, stack: ExitStack) -> None:
        stack.enter_context(register_module_forward_pre_hook(self._enter))
        stack.enter_context(register_module_forward_hook(self._leave, always_call=True))

    def _stack(self) -> list[nn.Module]:
        try:
            return self._local.stack
        except AttributeError:
            self._local.stack = []
            return self._local.stack

    def _enter(self, module: nn.Module, args: object) -> None:
        stack = self._stack()
        if not stack:
            self.forwards += 1
        if module not in self._names:
            self._name_tree(stack[0] if stack else module)
        stack.append(module)

    def _leave(self, module: nn.Module, args: object, output: object) -> None:
        stack = self._stack()
        # Pop down to this module: a forward that raised may have left inner ones behind.
        while stack:
            if stack.pop() is module:
                break

    def add_root(self, root: nn.Module) -> None:
        """Name modules from this model before it runs (the API's `model=` argument)."""
        self._name_tree(root)

    def _name_tree(self, root: nn.Module) -> None:
        label = type(root).__name__
        for path, module in root.named_modules(remove_duplicate=False):
            self._names[module] = path or label
            self._roots.discard(module)
        self._roots.add(root)
        self._params.clear()

    def current(self) -> str | None:
        """Path of the innermost running module, or None outside every forward."""
        stack = self._stack()
        if not stack:
            return None
        return self._names.get(stack[-1], type(stack[-1]).__name__)

    def name_of(self, module: nn.Module) -> str:
        return self._names.get(module, type(module).__name__)

    def parameter_path(self, param: torch.Tensor) -> str | None:
        """`encoder.0.weight` for a parameter of a known root, else None."""
        entry = self._param_entry(param)
        return None if entry is None else entry[0]

    def owner_of(self, param: torch.Tensor) -> str:
        """Path of the module that holds the parameter directly."""
        entry = self._param_entry(param)
        return "?" if entry is None else entry[1]

    def _param_entry(self, param: torch.Tensor) -> tuple[str, str] | None:
        entry = self._params.get(id(param))
        if entry is None and not self._params:
            for root in self.roots():
                for module_path, module in root.named_modules(remove_duplicate=False):
                    owner = module_path or type(root).__name__
                    for name, p in module.named_parameters(recurse=False):
                        full = f"{module_path}.{name}" if module_path else name
                        self._params.setdefault(id(p), (weakref.ref(p), full, owner))
            entry = self._params.get(id(param))
        if entry is None or entry[0]() is not param:
            return None
        return entry[1], entry[2]

    def roots(self) -> Iterator[nn.Module]:
        return iter(list(self._roots))

    def parameter_name(self, key: tuple[int, int]) -> str | None:
        """Name of the parameter or buffer stored at this storage key, if any."""
        for root in self.roots():
            named = [*root.named_parameters(remove_duplicate=False), *root.named_buffers()]
            for name, tensor in named:
                if _torch_compat.storage_key(tensor) == key:
                    return name
        return None
