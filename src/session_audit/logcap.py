"""Copy a process's log lines from stdin to a file whose size is bounded: when the next line
would take the file past `--max-bytes`, it is renamed to `<file>.1` (replacing the previous
one) and a new file is started. At most 2 × max-bytes stay on disk.

Envoy writes its own log (there is no size limit in Envoy itself) to stderr, piped here by
`session_audit.envoy.start`:

    envoy … 2>&1 | python -m session_audit.logcap envoy.log --max-bytes 10485760
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_MAX_BYTES = 10 * 1024 * 1024


def copy(source: object, path: Path, max_bytes: int) -> None:
    out = path.open("ab")
    try:
        for line in source:  # type: ignore[attr-defined]
            if out.tell() > 0 and out.tell() + len(line) > max_bytes:
                out.close()
                os.replace(path, path.with_name(path.name + ".1"))
                out = path.open("wb")
            out.write(line[:max_bytes])
            out.flush()
    finally:
        out.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m session_audit.logcap")
    parser.add_argument("path", type=Path)
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES)
    args = parser.parse_args(argv)
    copy(sys.stdin.buffer, args.path, max(1024, args.max_bytes))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
