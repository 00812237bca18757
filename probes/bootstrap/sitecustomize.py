"""Installed by `profilerd run` on PYTHONPATH: probe a training script without code changes.

It chains to any other sitecustomize on the path, then waits for `import torch` to complete
and installs the probes right after. Nothing here may raise into the user's program.
"""

import importlib.abc
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def _chain_to_next_sitecustomize() -> None:
    ours = sys.modules.pop("sitecustomize", None)
    saved_path = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
    try:
        import sitecustomize  # noqa: F401  (the next one on the path, if any)
    except ImportError:
        pass
    except Exception as exc:
        sys.stderr.write(f"profilerd: the chained sitecustomize failed: {exc!r}\n")
    finally:
        sys.path[:] = saved_path
        if ours is not None and "sitecustomize" not in sys.modules:
            sys.modules["sitecustomize"] = ours


def _install_probes() -> None:
    try:
        import profilerd_probes as probes

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


_chain_to_next_sitecustomize()
if os.environ.get("PROFILERD_DISABLE") != "1":
    if "torch" in sys.modules:
        _install_probes()
    else:
        sys.meta_path.insert(0, _AfterTorchImport())
