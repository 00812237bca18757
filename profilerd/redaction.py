"""What of a training command line may leave the user's process: an allow-list, not a deny-list.

A deny-list of secret-looking flag names always misses one (`--db-pass`, `--pwd=`, `-p X`), so
values are hidden unless known harmless. Shown: the script (argv[0]), every flag name, and the
values of the flags in SAFE_VALUE_FLAGS or the config's ``argv_safe_flags``. Every other value,
positional arguments included, becomes ``***``. ``key=value`` arguments (Hydra overrides,
``WANDB_API_KEY=...``) keep their key; the value follows the same rule by the key's last dotted
part. As a second line, anything shaped like a credential (cloud and forge tokens, URL
passwords, ``Bearer ...``) is masked even inside what is shown.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

MASK = "***"

# Hyper-parameters and launch settings: numbers and names that say how a job trains, never who
# may access what. Compared after normalising (lower case, leading dashes dropped, _ -> -).
SAFE_VALUE_FLAGS = frozenset(
    {
        "lr",
        "learning-rate",
        "min-lr",
        "batch-size",
        "micro-batch-size",
        "global-batch-size",
        "b",  # pytorch/examples: -b 256
        "epochs",
        "max-epochs",
        "steps",
        "max-steps",
        "train-steps",
        "warmup-steps",
        "num-workers",
        "workers",
        "j",  # pytorch/examples: -j 4
        "seed",
        "weight-decay",
        "wd",
        "momentum",
        "dropout",
        "gradient-accumulation-steps",
        "accumulate-grad-batches",
        "grad-accum",
        "clip-grad",
        "max-grad-norm",
        "precision",
        "dtype",
        "optimizer",
        "scheduler",
        "lr-scheduler",
        "model",
        "arch",
        "a",  # pytorch/examples: -a resnet50
        "device",
        "devices",
        "backend",
        "dist-backend",
        "nproc-per-node",
        "nnodes",
        "world-size",
        "local-rank",
        "rank",
        "hidden-size",
        "num-layers",
        "seq-len",
        "max-seq-len",
        "block-size",
        "image-size",
        "log-interval",
        "eval-interval",
        "save-interval",
        "prefetch-factor",
    }
)

_SECRET_SHAPES = re.compile(
    r"(?:glpat|gldt|glrt|glptt)-[A-Za-z0-9_-]{8,}"  # GitLab
    r"|\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[0-9A-Z]{12,}"  # AWS access key ids
    r"|\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{8,}|\bgithub_pat_[A-Za-z0-9_]{8,}"  # GitHub
    r"|\bhf_[A-Za-z0-9]{8,}"  # Hugging Face
    r"|\bsk-[A-Za-z0-9_-]{8,}"  # OpenAI, Anthropic and similar
    r"|\bxox[abposr]-[A-Za-z0-9-]{8,}"  # Slack
    r"|\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"  # JWT
    r"|\bAIza[0-9A-Za-z_-]{20,}"  # Google API keys
    r"|(?i:\b(?:bearer|basic)\s+\S+)"
)
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s:/@]+:)[^\s@/]+@")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?", re.IGNORECASE)
# A flag or key name is shown only when it looks like a name, so `-pSECRET` is not one.
_LONG_FLAG = re.compile(r"--[A-Za-z][A-Za-z0-9_.-]*")
_SHORT_FLAG = re.compile(r"-[A-Za-z]")
_KEY = re.compile(r"[+~]{0,2}[A-Za-z_][A-Za-z0-9_.\-]*")


def normalise(flag: str) -> str:
    return flag.lstrip("-+~").lower().replace("_", "-")


def mask_secrets(text: str) -> str:
    """Credential shapes masked wherever they appear, even in text otherwise shown."""
    return _SECRET_SHAPES.sub(MASK, _URL_PASSWORD.sub(rf"\1{MASK}@", text))


class ArgvRedactor:
    """Applies the allow-list; ``extra_safe`` comes from the config's ``argv_safe_flags``."""

    def __init__(self, extra_safe: Iterable[str] = ()) -> None:
        self.safe = SAFE_VALUE_FLAGS | {normalise(name) for name in extra_safe}

    def _value(self, name: str, value: str) -> str:
        key = normalise(name).rsplit(".", 1)[-1]
        return mask_secrets(value) if key in self.safe else MASK

    def _flag_name(self, arg: str) -> str | None:
        """The flag's name if ``arg`` is a flag that may be shown, else None."""
        if _LONG_FLAG.fullmatch(arg) or _SHORT_FLAG.fullmatch(arg):
            return arg
        if arg.startswith("-") and not arg.startswith("--") and normalise(arg) in self.safe:
            return arg  # single-dash long names some scripts use: -lr 0.1
        return None

    def __call__(self, argv: Sequence[str]) -> list[str]:
        if not argv:
            return []
        out = [mask_secrets(argv[0])]
        pending: str | None = None  # a flag whose value may be the next argument
        positional_only = False
        for arg in argv[1:]:
            if positional_only:
                out.append(MASK)
                continue
            if arg == "--":
                out.append(arg)
                positional_only = True
                pending = None
                continue
            is_value = not arg.startswith("-") or _NUMBER.fullmatch(arg) is not None
            if pending is not None and is_value:
                out.append(self._value(pending, arg))
                pending = None
                continue
            pending = None
            if arg.startswith("-") and not is_value:
                name, eq, value = arg.partition("=")
                shown = self._flag_name(name)
                if shown is None:
                    out.append(f"-{MASK}" if not arg.startswith("--") else f"--{MASK}")
                elif eq:
                    out.append(f"{mask_secrets(shown)}={self._value(shown, value)}")
                else:
                    out.append(mask_secrets(shown))
                    pending = shown
                continue
            name, eq, value = arg.partition("=")
            if eq and _KEY.fullmatch(name):
                out.append(f"{mask_secrets(name)}={self._value(name, value)}")
            else:
                out.append(MASK)
        return out


DEFAULT_REDACTOR = ArgvRedactor()


def redact_argv(argv: Sequence[str], extra_safe: Iterable[str] = ()) -> list[str]:
    """``argv`` as it may be shown: see the module docstring."""
    return (ArgvRedactor(extra_safe) if extra_safe else DEFAULT_REDACTOR)(argv)
