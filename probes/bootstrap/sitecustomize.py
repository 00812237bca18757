"""Installed by `profilerd run` on PYTHONPATH: probe a training script without code changes.

It takes its own directory off ``sys.path`` so that the program imports exactly what it would
without profilerd (the probes are imported from that directory by path, later), chains to
any other sitecustomize on the path (keeping what that one does), then waits for
`import torch` to complete and installs the probes right after. PYTHONPATH itself keeps our
entry, so that the program's own Python children (torchrun's ranks, spawned workers) are
probed too. Nothing here may raise into the user's program.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types

_HERE = os.path.dirname(os.path.abspath(__file__))


def _leave_sys_path() -> None:
    """Our directory was put on the path by PYTHONPATH for this file alone: take it off."""
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
    sys.path_importer_cache.pop(_HERE, None)


def _chain_to_next_sitecustomize() -> None:
    """Import the sitecustomize that would have run without us, as `site` would have."""
    ours = sys.modules.pop("sitecustomize", None)
    try:
        import sitecustomize  # type: ignore[import-not-found]  # noqa: F401  (the next one on the path, if any)
    except ImportError as exc:
        if exc.name != "sitecustomize":
            _report_like_site(exc)
    except Exception as exc:
        _report_like_site(exc)
    finally:
        # The import system re-reads sys.modules["sitecustomize"] once this module has run.
        if ours is not None and "sitecustomize" not in sys.modules:
            sys.modules["sitecustomize"] = ours


def _report_like_site(exc: BaseException) -> None:
    """The message `site` prints for a failing sitecustomize: the user sees what they would."""
    if sys.flags.verbose:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    else:
        sys.stderr.write(f"Error in sitecustomize; set PYTHONVERBOSE for traceback:\n{type(exc).__name__}: {exc}\n")


def _import_probes() -> types.ModuleType:
    """The probes package from our directory, which is no longer on sys.path."""
    module = sys.modules.get("profilerd_probes")
    if module is not None:
        return module
    spec = importlib.machinery.PathFinder.find_spec("profilerd_probes", [_HERE])
    if spec is None or spec.loader is None:
        raise ImportError(f"profilerd_probes is missing from {_HERE}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["profilerd_probes"] = module  # its submodules are found through its __path__
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("profilerd_probes", None)
        raise
    return module


def _install_probes() -> None:
    try:
        probes = _import_probes()
        if probes.is_launcher_process():
            return
        probes.install()
    except Exception as exc:
        sys.stderr.write(f"profilerd: probes not installed: {exc!r}\n")


class _AfterTorchImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps torch's loader so the probes install after it finishes."""

    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torch")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        original_exec = spec.loader.exec_module

        def exec_module(module):  # type: ignore[no-untyped-def]
            original_exec(module)
            _install_probes()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


_leave_sys_path()
_chain_to_next_sitecustomize()
if os.environ.get("PROFILERD_DISABLE") != "1":
    if "torch" in sys.modules:
        _install_probes()
    else:
        sys.meta_path.insert(0, _AfterTorchImport())
