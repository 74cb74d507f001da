"""The Python documentation sources (Debian's `python3.11-doc`) as a train / held-out corpus.

`apt-get download` fetches the package (we are root; no network beyond the package registries),
`dpkg-deb -x` unpacks it, and the reStructuredText under `html/_sources` is lightly cleaned
(directive and label lines, section underlines and role markup dropped, prose and code kept).
Files are split by a hash of their path, so the split never depends on the order files are
listed in or on which other files exist. The result is cached as two JSONL files of
`{"path", "text"}` documents.

The documentation is under the PSF licence (see the package's copyright file), which allows
redistribution of derived works with the licence kept.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile

from common.staging import staged_dir

PACKAGE = "python3.11-doc"
SOURCES_DIR = "usr/share/doc/python3.11/html/_sources"
COPYRIGHT_FILE = "usr/share/doc/python3.11-doc/copyright"
HELDOUT_PERCENT = 5  # of files, chosen by hash of their path
# Release-note bullet lists of issue numbers: not prose, and a tenth of the corpus.
EXCLUDED = ("whatsnew/changelog.rst.txt",)
DEFAULT_CACHE = os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "wdmoe-testbed", "pydocs")


class CorpusError(RuntimeError):
    """The corpus could not be fetched or unpacked."""


def is_heldout(rel_path: str, percent: int = HELDOUT_PERCENT) -> bool:
    """Deterministic by-file split: the first 8 bytes of sha256(path) mod 100."""
    digest = hashlib.sha256(rel_path.encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < percent


# --- light reStructuredText cleanup --------------------------------------------------------

_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+<>_:.])\1{2,}\s*$")
# `.. name:: args` lines we drop with their indented option/body lines (no prose inside).
_DROP_BLOCKS = ("index", "highlight", "module", "currentmodule", "moduleauthor",
                "sectionauthor", "toctree", "testsetup", "testcleanup", "include", "image",
                "only", "raw", "tabularcolumns", "literalinclude", "productionlist",
                "code-block", "impl-detail", "audit-event", "availability", "csv-table")
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
_ROLE_TARGET = re.compile(r":[\w:+-]+:`([^`<]*?)\s*<[^`>]*>`")  # :ref:`text <target>`
_PEP_RFC = re.compile(r":(pep|rfc):`(\d+)`")  # :pep:`8` -> PEP 8
_ROLE = re.compile(r":[\w:+-]+:`[~!]?([^`]*)`")  # :func:`~os.path.join` -> os.path.join
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`__?")  # `text <url>`_
_FOOTNOTE = re.compile(r"\s*\[#[\w-]*\]_")


def clean_rst(text: str) -> str:
    """Prose and code of one rst file, markup mostly gone; blank-line runs collapsed."""
    out: list[str] = []
    skip_indent: int | None = None  # inside a dropped block: skip lines indented deeper
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not line.strip() or indent > skip_indent:
                continue
            skip_indent = None
        stripped = line.strip()
        if _UNDERLINE.match(stripped):
            continue
        if stripped.startswith(".. _") or stripped.startswith(".. |") or stripped == "..":
            continue
        m = _DIRECTIVE.match(line)
        if m:
            name, args = m.group(2).split(":")[-1], m.group(3)
            if name in _DROP_BLOCKS or name.startswith("c:") or m.group(2).startswith("c:"):
                skip_indent = indent
                continue
            # function/class/method/data/note/versionadded...: keep the signature or label
            label = {"note": "Note:", "warning": "Warning:", "seealso": "See also:",
                     "versionadded": "New in version", "versionchanged": "Changed in version",
                     "deprecated": "Deprecated since version"}.get(name)
            kept = " ".join(x for x in (label, args) if x)
            if kept:
                out.append(" " * indent + kept)
            continue
        if stripped.startswith(":") and re.match(r"^:[\w -]+:( |$)", stripped) and indent:
            continue  # directive options like `   :synopsis: ...`, `   :noindex:`
        if stripped.startswith(".. "):  # rst comment
            skip_indent = indent
            continue
        line = _PEP_RFC.sub(lambda m: f"{m.group(1).upper()} {m.group(2)}", line)
        line = _ROLE_TARGET.sub(r"\1", line)
        line = _ROLE.sub(r"\1", line)
        line = _LINK.sub(r"\1", line)
        line = _FOOTNOTE.sub("", line)
        out.append(line.rstrip())
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    return text + "\n"


# --- fetching and caching -----------------------------------------------------------------

def _run(cmd: list[str], cwd: str | None = None) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CorpusError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-400:]}")


def fetch_sources(workdir: str, deb: str | None = None) -> str:
    """Unpack the package into WORKDIR (downloading it when DEB is None); return its root.

    Raises CorpusError when apt-get or dpkg-deb fail (no registry, not root, ...).
    """
    if deb is None:
        found = glob.glob(os.path.join(workdir, f"{PACKAGE}_*.deb"))
        if not found:
            _run(["apt-get", "download", PACKAGE], cwd=workdir)
            found = glob.glob(os.path.join(workdir, f"{PACKAGE}_*.deb"))
            if not found:
                raise CorpusError(f"apt-get download {PACKAGE} wrote no .deb")
        deb = sorted(found)[-1]
    root = os.path.join(workdir, "root")
    _run(["dpkg-deb", "-x", deb, root])
    return root


def build_corpus(cache_dir: str = DEFAULT_CACHE, deb: str | None = None) -> dict:
    """Make (or reuse) CACHE_DIR/{train,heldout}.jsonl and info.json; return info.

    Raises CorpusError when the package cannot be fetched or unpacked.
    """
    info_path = os.path.join(cache_dir, "info.json")
    if os.path.exists(info_path):
        with open(info_path) as f:
            return json.load(f)
    with tempfile.TemporaryDirectory(prefix="pydocs-") as work:
        root = fetch_sources(work, deb)
        src = os.path.join(root, SOURCES_DIR)
        paths = sorted(os.path.relpath(p, src)
                       for p in glob.glob(os.path.join(src, "**", "*.txt"), recursive=True))
        if not paths:
            raise CorpusError(f"no rst sources under {SOURCES_DIR} in {PACKAGE}")
        # a cache: a stale or partial one is replaced, never left half-written
        with staged_dir(cache_dir, force=True) as staging:
            counts = {"train": [0, 0], "heldout": [0, 0]}  # files, characters
            with open(os.path.join(staging, "train.jsonl"), "w") as ftrain, \
                    open(os.path.join(staging, "heldout.jsonl"), "w") as fheld:
                for rel in paths:
                    if rel in EXCLUDED:
                        continue
                    with open(os.path.join(src, rel), encoding="utf-8", errors="replace") as f:
                        text = clean_rst(f.read())
                    if len(text) < 200:
                        continue
                    split = "heldout" if is_heldout(rel) else "train"
                    (fheld if split == "heldout" else ftrain).write(
                        json.dumps({"path": rel, "text": text}) + "\n")
                    counts[split][0] += 1
                    counts[split][1] += len(text)
            shutil.copy(os.path.join(root, COPYRIGHT_FILE), os.path.join(staging, "COPYRIGHT"))
            deb_name = os.path.basename(deb) if deb else os.path.basename(
                sorted(glob.glob(os.path.join(work, f"{PACKAGE}_*.deb")))[-1])
            info = {"package": deb_name, "licence": "PSF License (Python documentation)",
                    "heldout_percent": HELDOUT_PERCENT,
                    "train_files": counts["train"][0], "train_chars": counts["train"][1],
                    "heldout_files": counts["heldout"][0],
                    "heldout_chars": counts["heldout"][1]}
            with open(os.path.join(staging, "info.json"), "w") as f:
                json.dump(info, f, indent=1)
    return info


def load_split(cache_dir: str, split: str) -> list[dict]:
    """Documents of SPLIT ('train' or 'heldout') from a built cache, in path order."""
    with open(os.path.join(cache_dir, f"{split}.jsonl")) as f:
        return [json.loads(line) for line in f]
