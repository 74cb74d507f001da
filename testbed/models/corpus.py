"""Text that is on every machine with Python: the standard library's own docstrings.

Used to train the small BPE tokenizer of test models (no downloads). Deterministic for a given
Python version. The trained tiny model (a later issue) uses the Python documentation sources.
"""

from __future__ import annotations

import importlib
import inspect
import warnings

# English-heavy, pure-Python modules present in every CPython build.
CORPUS_MODULES = (
    "abc", "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum",
    "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "heapq", "hmac",
    "html", "http.client", "imaplib", "inspect", "ipaddress", "json", "logging", "mailbox",
    "netrc", "numbers", "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pprint",
    "queue", "random", "re", "shlex", "shutil", "smtplib", "socket", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "typing",
    "unittest", "urllib.parse", "uuid", "warnings", "wave", "weakref", "zipfile",
)


def stdlib_docstrings() -> list[str]:
    """Docstrings of the modules above and their public members, in a fixed order."""
    texts = []
    with warnings.catch_warnings():  # typing.io and friends warn when their docs are read
        warnings.simplefilter("ignore")
        for module_name in CORPUS_MODULES:
            texts.extend(_module_docstrings(module_name))
    return texts


def _module_docstrings(module_name: str) -> list[str]:
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return []
    texts = [doc] if (doc := inspect.getdoc(module)) else []
    for name in sorted(vars(module)):
        member = vars(module)[name]
        if name.startswith("_") or getattr(member, "__module__", None) != module.__name__:
            continue
        if doc := inspect.getdoc(member):
            texts.append(doc)
    return texts
