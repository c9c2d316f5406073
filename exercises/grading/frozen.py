"""The grader's code, frozen before the learner's file is imported: a file that patches a check is caught.

The worker imports the checks, then takes a `Snapshot` of what a verdict depends on:
- the grader's own modules (exercises.grading.*): every global (a new one too: it could shadow a builtin),
- everything reachable from them that the grader or the library owns: a function's code, defaults and closure
  cells, a class's attributes, a Check's or an Exercise's fields, the dicts and lists they hold (EXERCISES, a
  check's strategies and examples), a library class or oracle the checks call (Transformer, attention),
- the functions and classes of the libraries the checks call (LIBRARIES) and torch.Tensor's / nn.Module's methods,
- the interpreter's trace and profile hooks.
After the learner's file is imported, and after each check, the worker compares: a file that replaced a check's
body, a helper, an oracle, a torch function or a function's `__code__` earns no points, the change is named in
the verdict, and `restore()` puts the grader back for the next file. Plain data a library changes by itself (a
counter, a cache) is not compared: only callables, classes and modules, so a correct file is never flagged.
"""

import os
import sys
import types
from dataclasses import is_dataclass

GRADER = "exercises.grading"
OWNED = (GRADER, "nanomodels", "kernels")  # whose objects are followed from the grader's globals
LIBRARIES = ("builtins", "math", "random", "copy", "inspect", "functools", "torch", "torch.nn", "torch.nn.functional",
             "torch.nn.init", "torch.testing", "hypothesis", "hypothesis.core", "hypothesis.strategies")
_MISSING = object()


def _owned(obj) -> bool:
    return str(getattr(obj, "__module__", None) or "").startswith(OWNED)


def _cells(fn) -> tuple:
    out = []
    for cell in fn.__closure__ or ():
        try:
            out.append(cell.cell_contents)
        except ValueError:  # an empty cell
            out.append(_MISSING)
    return tuple(out)


def _state(fn) -> tuple:
    return fn.__code__, fn.__defaults__, fn.__kwdefaults__, _cells(fn)


def _api(value) -> bool:
    """What a library's module attribute is compared by: callables, classes and modules, never plain data."""
    return callable(value) or isinstance(value, (type, types.ModuleType))


def _rewrapped(old, new) -> bool:
    """A library wrapping its own function, as torch._dynamo wraps torch.manual_seed when it is first imported:
    the new function wraps the old one and its code lies in the library's own files."""
    import torch

    code = getattr(new, "__code__", None)
    return (getattr(new, "__wrapped__", None) is old and code is not None
            and code.co_filename.startswith(os.path.dirname(torch.__file__) + os.sep))


class Snapshot:
    """What the grader depends on now; `changed()` names the first difference, `restore()` undoes it.
    modules: more modules to freeze whole (the worker's own); skip: (module, attribute) pairs not compared."""

    def __init__(self, modules=(), skip=()):
        import torch

        self.skip = set(skip)
        self.namespaces = {}  # label -> (holder, {key: value}, strict): a module's or class's attributes
        self.containers = {}  # id -> (label, container, copy): dicts and lists the grader holds
        self.functions = {}  # id -> (label, function, state)
        self.hooks = (sys.gettrace(), sys.getprofile())
        self._seen = set()
        for name in [*sorted(n for n in sys.modules if n == GRADER or n.startswith(GRADER + ".")), *modules]:
            self._module(name, strict=True)
        for name in LIBRARIES:
            if name in sys.modules:
                self._module(name, strict=False)
        for cls in (torch.Tensor, torch.nn.Module):
            self._class(cls, strict=False)

    # ---- taking it --------------------------------------------------------------------------------------------

    def _module(self, name: str, strict: bool) -> None:
        module = sys.modules[name]
        attrs = {k: v for k, v in vars(module).items() if (name, k) not in self.skip and (strict or _api(v))}
        self.namespaces[name] = (module, attrs, strict)
        if strict:
            for key, value in attrs.items():
                if not key.startswith("__"):  # not __builtins__ (the interpreter's own dict) nor __spec__
                    self._follow(value, f"{name}.{key}")

    def _class(self, cls: type, strict: bool) -> None:
        label = f"{cls.__module__}.{cls.__qualname__}"
        attrs = {k: v for k, v in vars(cls).items() if strict or _api(v) or isinstance(v, (property, classmethod,
                                                                                          staticmethod))}
        self.namespaces[label] = (cls, attrs, False)
        for key, value in attrs.items():
            self._follow(getattr(value, "__func__", getattr(value, "fget", value)), f"{label}.{key}")

    def _follow(self, value, label: str) -> None:
        if id(value) in self._seen or isinstance(value, types.ModuleType):
            return
        if isinstance(value, types.FunctionType):
            if _owned(value):
                self._seen.add(id(value))
                self.functions[id(value)] = (label, value, _state(value))
                for i, cell in enumerate(_cells(value)):
                    self._follow(cell, f"{label} (closure {i})")
        elif isinstance(value, type):
            if _owned(value):
                self._seen.add(id(value))
                self._class(value, strict=True)
        elif isinstance(value, (dict, list)):
            self._seen.add(id(value))
            self.containers[id(value)] = (label, value, value.copy())
            for k, v in (value.items() if isinstance(value, dict) else enumerate(value)):
                self._follow(v, f"{label}[{k!r}]")
        elif isinstance(value, tuple):
            for i, v in enumerate(value):
                self._follow(v, f"{label}[{i}]")
        elif _owned(type(value)) and is_dataclass(value):  # a Check, an Exercise, a chapter's registry row
            self._seen.add(id(value))
            self.namespaces[label] = (value, dict(vars(value)), True)
            for key, v in vars(value).items():
                self._follow(v, f"{label}.{key}")

    # ---- comparing and restoring ------------------------------------------------------------------------------

    def changed(self) -> str | None:
        """What was changed since the snapshot (e.g. `exercises.grading.checks.common.expect_tensor`), or None."""
        if (sys.gettrace(), sys.getprofile()) != self.hooks:
            return "the interpreter's trace or profile hook"
        for label, (holder, attrs, strict) in self.namespaces.items():
            now = vars(holder)
            for key, value in attrs.items():
                new = now.get(key, _MISSING)
                if new is not value and not strict and _rewrapped(value, new):
                    attrs[key] = new  # the library's own change: the new value is the frozen one
                elif new is not value:
                    return f"{label}.{key}"
            if strict and isinstance(holder, types.ModuleType):  # a new global may shadow a builtin
                for key in now.keys() - attrs.keys():
                    if not isinstance(now[key], types.ModuleType) and (label, key) not in self.skip:
                        return f"{label}.{key}"
        for label, container, copy in self.containers.values():
            if type(container) is dict and (container.keys() != copy.keys() or any(
                    container[k] is not v for k, v in copy.items())):
                return label
            if type(container) is list and (len(container) != len(copy) or any(
                    a is not b for a, b in zip(container, copy))):
                return label
        for label, fn, state in self.functions.values():
            now = _state(fn)
            if now[:3] != state[:3] or len(now[3]) != len(state[3]) or any(
                    a is not b for a, b in zip(now[3], state[3])):
                return label
        return None

    def restore(self) -> None:
        """Put everything back as the snapshot holds it (after a file that patched the grader)."""
        sys.settrace(self.hooks[0])
        sys.setprofile(self.hooks[1])
        for label, (holder, attrs, strict) in self.namespaces.items():
            now = vars(holder)
            for key, value in attrs.items():
                if now.get(key, _MISSING) is not value:
                    object.__setattr__(holder, key, value) if is_dataclass(holder) else setattr(holder, key, value)
            if strict and isinstance(holder, types.ModuleType):
                for key in now.keys() - attrs.keys():
                    if not isinstance(now[key], types.ModuleType) and (label, key) not in self.skip:
                        delattr(holder, key)
        for _, container, copy in self.containers.values():
            if type(container) is list:
                container[:] = copy
            elif type(container) is dict:
                for key in container.keys() - copy.keys():
                    del container[key]
                container.update(copy)
        for _, fn, (code, defaults, kwdefaults, cells) in self.functions.values():
            fn.__code__, fn.__defaults__, fn.__kwdefaults__ = code, defaults, kwdefaults
            for cell, value in zip(fn.__closure__ or (), cells):
                if value is not _MISSING:
                    cell.cell_contents = value
