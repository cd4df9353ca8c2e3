"""Which module is running: a stack kept by global forward pre/post hooks.

NOTE [no backward hooks]: full backward hooks (global or per module) wrap module outputs in
BackwardHookFunction views, which turns `nn.ReLU(inplace=True)` or `out += 1` on a module
output into a different error and leaves a global flag set after removal. The stack is
therefore built from forward hooks only; backward writes are attributed by phase instead.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Generic, TypeVar

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_forward_hook,
    register_module_forward_pre_hook,
)

from gradtrace.probes import _torch_compat
from gradtrace.probes.guard import GuardedProbe, ProbeGuard

LOOP_OWNER = "training loop"

V = TypeVar("V")


class ByModule(Generic[V]):
    """A value per live module, found by identity in one dict lookup.

    `weakref.WeakKeyDictionary` builds a weak reference on every lookup (about 1 µs); these
    lookups run for every module call and every saved tensor. An entry leaves as its module
    dies, before the module's id can be reused.
    """

    def __init__(self) -> None:
        self._items: dict[int, tuple[weakref.ref[nn.Module], V]] = {}

    def get(self, module: nn.Module) -> V | None:
        item = self._items.get(id(module))
        return None if item is None or item[0]() is not module else item[1]

    def __setitem__(self, module: nn.Module, value: V) -> None:
        key = id(module)
        self._items[key] = (weakref.ref(module, functools.partial(self._drop, key)), value)

    def _drop(self, key: int, ref: weakref.ref[nn.Module]) -> None:
        item = self._items.get(key)
        if item is not None and item[0] is ref:
            del self._items[key]

    def items(self) -> list[tuple[nn.Module, V]]:
        """The live entries, as a list: modules may die while the caller iterates."""
        return [
            (module, value)
            for ref, value in list(self._items.values())
            if (module := ref()) is not None
        ]


class ModuleStackProbe(GuardedProbe):
    """Knows the module path (as `named_modules()` spells it from the root) of the running forward.

    A module called with no module around it is a root, labelled by its class name. Names are
    computed once per root from its `named_modules()`. A new root renames a module only if the
    module's current root is gone or lies inside the new root's tree: a model whose parts
    were first called alone gets full paths once it runs whole, while a throwaway container
    (`model[:2]`, a new `nn.Sequential` each step) never clobbers the model's own paths.
    """

    def __init__(self, *, guard: ProbeGuard | None = None) -> None:
        self._guard = guard or ProbeGuard("module stack")
        self._local = threading.local()
        # Module -> its path from its root ("" for a root) and that root.
        self._names: ByModule[str] = ByModule()
        self._root_of: weakref.WeakKeyDictionary[nn.Module, weakref.ref[nn.Module]] = (
            weakref.WeakKeyDictionary()
        )
        # Forward calls of root modules so far (on any thread): "has a forward run since?"
        self.forwards = 0
        # A torch.compile'd module ran (under the write log it runs eagerly).
        self.saw_compiled = False
        # Called as a root module's forward starts (stack empty), on its thread.
        self._root_starts: list[Callable[[], None]] = []
        # Called with (module path, output) as a module's forward returns, on its thread.
        self._outputs: list[Callable[[str, object], None]] = []
        # Module path -> how activation checkpointing ran it (its saved tensors are
        # checkpoint's to keep, not gradtrace's to watch).
        self.checkpointed: dict[str, str] = {}
        # id(parameter) -> (weakref, its path, its module's path), rebuilt for new roots.
        # Keyed by id: tensors compare elementwise, so they cannot be WeakKeyDictionary keys.
        self._params: dict[int, tuple[weakref.ref[torch.Tensor], str, str]] = {}
        # Told this thread's innermost module path (None: outside every forward) whenever it
        # changes: the native core attributes saved tensors and writes without calling back.
        self._publish: Callable[[str | None], None] | None = None

    def publish_to(self, publish: Callable[[str | None], None] | None) -> None:
        """Call `publish(path)` on the running thread whenever `current()` changes."""
        self._publish = publish

    def _install(self, stack: ExitStack) -> None:
        guard = self._guard
        stack.enter_context(register_module_forward_pre_hook(guard(self._enter)))
        stack.enter_context(register_module_forward_hook(guard(self._leave), always_call=True))

    def _stack(self) -> list[tuple[nn.Module, str]]:
        """This thread's running modules with their paths: `current()` runs for every saved
        tensor and write, so the path is looked up once per module call."""
        return thread_stack(self._local)

    def _enter(self, module: nn.Module, args: object) -> None:
        if _torch_compat.compiling():
            return
        stack = self._stack()
        if not stack:
            self.forwards += 1
            for callback in self._root_starts:
                callback()
        path = self._names.get(module)
        if path is None:
            self._name_tree(stack[0][0] if stack else module)
            stack[:] = [(outer, self.name_of(outer)) for outer, _ in stack]
            path = self._names.get(module)
        name = path or self.name_of(module)
        stack.append((module, name))
        if self._publish is not None:
            self._publish(name)
        how = _torch_compat.checkpointing()
        if how is not None:
            self.checkpointed.setdefault(name, how)

    def _leave(self, module: nn.Module, args: object, output: object) -> None:
        if _torch_compat.compiling():
            return
        stack = self._stack()
        name = None
        # Pop down to this module: a forward that raised may have left inner ones behind.
        while stack:
            popped, path = stack.pop()
            if popped is module:
                name = path
                break
        if name is not None and stack:
            for callback in self._outputs:
                callback(name, output)
        if self._publish is not None:
            self._publish(stack[-1][1] if stack else None)

    def on_output(self, callback: Callable[[str, object], None]) -> None:
        """Call `callback(path, output)` whenever a module called inside another returns."""
        self._outputs.append(callback)

    def on_root_start(self, callback: Callable[[], None]) -> None:
        """Call `callback` whenever a forward starts with no module around it."""
        self._root_starts.append(callback)

    def add_root(self, root: nn.Module) -> None:
        """Name modules from this model before it runs (the API's `model=` argument)."""
        self._name_tree(root)

    def _name_tree(self, root: nn.Module) -> None:
        while (inner := self._wrapped(root)) is not None:
            self._names[root] = ""
            self._root_of[root] = weakref.ref(inner)
            root = inner
        tree = list(root.named_modules(remove_duplicate=False))
        members = {id(module) for _, module in tree}
        for path, module in tree:
            owner = self._root_of.get(module)
            current_root = None if owner is None else owner()
            if current_root is None or current_root is module or id(current_root) in members:
                self._names[module] = _torch_compat.unwrapped_path(path)
                self._root_of[module] = weakref.ref(root)
        self._params.clear()

    def _wrapped(self, module: nn.Module) -> nn.Module | None:
        """The user's model inside a torch.compile or data-parallel wrapper, else None."""
        if _torch_compat.compiled_original(module) is not None:
            self.saw_compiled = True
        return _unwrap(module)

    def owner_of(self, obj: object) -> str | None:
        """The path of `obj` if it is a module whose code runs where the hooks cannot see it.

        NOTE [modules that override __call__]: some research code wraps `forward` in its own
        `__call__`, so the global forward hooks never fire for that module and a write inside
        it would be blamed on its parent. `obj` is the `self` of the user frame behind such a
        write; a module the hooks did see (it is on the stack) keeps the stack's answer.
        """
        if not isinstance(obj, nn.Module) or type(obj).__call__ is nn.Module.__call__:
            return None
        if any(module is obj for module, _ in self._stack()):
            return None
        return self.name_of(obj)

    def current(self) -> str | None:
        """Path of the innermost running module, or None outside every forward."""
        stack = self._stack()
        return stack[-1][1] if stack else None

    def name_of(self, module: nn.Module) -> str:
        path = self._names.get(module)
        if path:
            return path
        while (inner := _unwrap(module)) is not None:
            module = inner
        return type(module).__name__

    def parameter_entry(self, param: torch.Tensor) -> tuple[str, str] | None:
        """(parameter path, path of the module holding it) for a parameter of a named module."""
        entry = self._params.get(id(param))
        if entry is None and not self._params:
            for _, path, name, tensor in self._named_tensors(buffers=False):
                self._params.setdefault(id(tensor), (weakref.ref(tensor), name, path))
            entry = self._params.get(id(param))
        if entry is None or entry[0]() is not param:
            return None
        return entry[1], entry[2]

    def parameter_name(self, key: tuple[int, int]) -> str | None:
        """Name of the parameter or buffer stored at this storage key, if any."""
        for _, _, name, tensor in self._named_tensors(buffers=True):
            if _torch_compat.storage_key(tensor) == key:
                return name
        return None

    def _named_tensors(
        self, *, buffers: bool
    ) -> Iterator[tuple[nn.Module, str, str, torch.Tensor]]:
        """(module, module label, full name, tensor) for the direct tensors of named modules."""
        for module, path in self._names.items():
            label = path or type(module).__name__
            tensors = list(module.named_parameters(recurse=False))
            if buffers:
                tensors += module.named_buffers(recurse=False)
            for name, tensor in tensors:
                yield module, label, f"{path}.{name}" if path else name, tensor


def thread_stack(local: threading.local) -> list:
    """This thread's list in `local.stack`, created on first use (forward runs per thread)."""
    try:
        return local.stack
    except AttributeError:
        local.stack = []
        return local.stack


def _unwrap(module: nn.Module) -> nn.Module | None:
    original = _torch_compat.compiled_original(module)
    return original if original is not None else _torch_compat.data_parallel_original(module)
